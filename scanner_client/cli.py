"""``image-scanner``: run a scanner engine for a handler.

Every flag also reads an ``IMAGE_SCANNER_*`` environment variable (``--slots`` reads
``IMAGE_SCANNER_SLOTS``, ``--proxy-url`` reads ``IMAGE_SCANNER_PROXY_URL``, ...); a flag given
on the command line wins. SIGTERM or SIGINT drains (finish the running jobs, take nothing new)
and exits 0; a second signal stops at once. A handler that refuses the scanner makes it print
the catalogue message (``HNDL-0NN: text: detail``) and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scanner_client.client import ClientConfig, ScannerClient, default_scanner_id, package_version
from scanner_client.engine import Kind, Policy
from scanner_client.engines import ENGINES, EngineSettings
from scanner_client.errors import ScannerRejected
from scanner_client.logs import LOG_FORMATS, LOG_LEVELS, configure_logging

ENV_PREFIX = "IMAGE_SCANNER_"
DEFAULT_HANDLER = "127.0.0.1:50051"
EXIT_REJECTED = 2


@dataclass(frozen=True)
class Settings:
    handler: str
    engine: str
    slots: int
    scanner_id: str
    # None: the engine's kinds.
    kinds: frozenset[Kind] | None
    delay: float
    proxy_url: str
    policies: tuple[Policy, ...]
    log_format: str
    log_level: str
    backoff_initial: float
    backoff_max: float


def _address(value: str) -> str:
    """``host:port`` (``[v6]:port`` too), or a gRPC target with a scheme (``unix:``, ``dns:``)."""
    if "://" in value or value.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _seconds(allow_zero: bool) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
        if number < 0 or (number == 0 and not allow_zero) or number != number:
            raise argparse.ArgumentTypeError(f"{value!r} is out of range")
        return number

    return parse


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _kinds(value: str) -> frozenset[Kind] | None:
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if not names:
        return None
    try:
        return frozenset(Kind(name) for name in names)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: kinds are {', '.join(kind.value for kind in Kind)}"
        ) from None


def _policies(value: str) -> tuple[Policy, ...]:
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    try:
        return tuple(dict.fromkeys(Policy(name) for name in names))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: policies are {', '.join(policy.value for policy in Policy)}"
        ) from None


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-scanner",
        description="Connect a scanning engine to an image handler and scan the jobs it assigns.",
        epilog="Every flag also reads IMAGE_SCANNER_<FLAG> from the environment "
        "(for example IMAGE_SCANNER_SLOTS=4); the command line wins.",
    )

    def option(
        flag: str,
        default: str,
        help_text: str,
        parse: Callable[[str], object] = str,
        metavar: str | None = None,
    ) -> None:
        variable = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
        # argparse converts a string default with the option's type, so a bad environment
        # value fails like a bad flag.
        parser.add_argument(
            flag,
            default=env.get(variable, default),
            type=parse,
            metavar=metavar,
            help=f"{help_text} (env {variable})",
        )

    option(
        "--handler", DEFAULT_HANDLER, "the handler's HOST:PORT", parse=_address, metavar="HOST:PORT"
    )
    option(
        "--engine",
        "noop",
        f"scanning engine: {', '.join(sorted(ENGINES))}",
        parse=_one_of(sorted(ENGINES)),
        metavar="NAME",
    )
    option("--slots", "1", "jobs run at once", parse=_positive_int, metavar="N")
    option(
        "--scanner-id",
        "",
        "stable id of this scanner (default: HOSTNAME-PID)",
        metavar="ID",
    )
    option(
        "--kinds",
        "",
        "object kinds to scan, comma-separated: image,node,artifact (default: the engine's)",
        parse=_kinds,
        metavar="KINDS",
    )
    option(
        "--policies",
        "",
        "policies this scanner applies, comma-separated: vulnerabilities,malware,"
        "misconfigurations,secrets (default: all)",
        parse=_policies,
        metavar="POLICIES",
    )
    option(
        "--delay",
        "0",
        "seconds each scan takes (noop engine)",
        parse=_seconds(True),
        metavar="SECONDS",
    )
    option("--proxy-url", "", "proxy for registry pulls and database updates", metavar="URL")
    option(
        "--log-format",
        "auto",
        "json, console, or auto (console on a terminal, JSON otherwise)",
        parse=_one_of(LOG_FORMATS),
        metavar="FORMAT",
    )
    option(
        "--log-level",
        "info",
        "debug, info, warning or error",
        parse=_one_of(LOG_LEVELS),
        metavar="LEVEL",
    )
    option(
        "--backoff-initial",
        "0.1",
        "first reconnect wait bound in seconds",
        parse=_seconds(False),
        metavar="SECONDS",
    )
    option(
        "--backoff-max",
        "30",
        "largest reconnect wait bound in seconds",
        parse=_seconds(False),
        metavar="SECONDS",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    environment = os.environ if env is None else env
    parser = build_parser(environment)
    args = parser.parse_args(argv)
    if args.backoff_max < args.backoff_initial:
        parser.error(
            f"--backoff-max ({args.backoff_max}) is below --backoff-initial "
            f"({args.backoff_initial})"
        )
    return Settings(
        handler=args.handler,
        engine=args.engine,
        slots=args.slots,
        scanner_id=args.scanner_id or default_scanner_id(),
        kinds=args.kinds,
        delay=args.delay,
        proxy_url=args.proxy_url,
        policies=args.policies,
        log_format=args.log_format,
        log_level=args.log_level,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
    )


def build_client(settings: Settings) -> ScannerClient:
    engine = ENGINES[settings.engine](EngineSettings(delay=settings.delay))
    return ScannerClient(
        settings.handler,
        engine,
        ClientConfig(
            scanner_id=settings.scanner_id,
            slots=settings.slots,
            kinds=settings.kinds,
            proxy_url=settings.proxy_url,
            policies=settings.policies,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
        ),
    )


async def serve(client: ScannerClient) -> None:
    """Run the client; the first SIGTERM/SIGINT drains it, a second one stops it."""
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        if len(received) == 1:
            client.log.info("signal received: draining", signal=signum.name)
            client.request_drain()
        else:
            client.log.warning("second signal: stopping now", signal=signum.name)
            client.request_stop()

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await client.run()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    try:
        client = build_client(settings)
    except ValueError as exc:
        print(f"image-scanner: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    try:
        asyncio.run(serve(client))
    except ScannerRejected as rejected:
        print(rejected.message, file=sys.stderr)
        return EXIT_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
