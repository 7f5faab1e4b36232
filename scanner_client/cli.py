"""``image-scanner``: run a scanner engine for a handler.

Every flag also reads an ``IMAGE_SCANNER_*`` environment variable (``--slots`` reads
``IMAGE_SCANNER_SLOTS``, ``--proxy-url`` reads ``IMAGE_SCANNER_PROXY_URL``, ...); a flag given
on the command line wins. SIGTERM or SIGINT drains (finish the running jobs, take nothing new)
and exits 0; a second signal stops at once. A handler that refuses the scanner makes it print
the catalogue message (``HNDL-0NN: text: detail``) and exit 2; so does a setting the engine
cannot work with (a ``--scratch-dir`` that cannot be written, too little free space in it). A
scanner that breaks while running (its scratch directory removed, its disk full) hands its job
back, takes nothing more, and exits 3 once its running jobs end, printing why.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagehandler.channel import channel_credentials
from scanner_client.client import ClientConfig, ScannerClient, default_scanner_id, package_version
from scanner_client.engine import Kind, Policy, ScannerBroken
from scanner_client.engines import ENGINES, EngineSettings
from scanner_client.errors import ScannerRejected
from scanner_client.extras import MissingExtra, builtin_engine_extra
from scanner_client.health import start_health_server
from scanner_client.job_policy import ScannerPolicy
from scanner_client.logs import LOG_FORMATS, LOG_LEVELS, configure_logging

ENV_PREFIX = "IMAGE_SCANNER_"
DEFAULT_HANDLER = "127.0.0.1:50051"
EXIT_REJECTED = 2
EXIT_BROKEN = 3
EVENT_LOOPS = ("asyncio", "uvloop")


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
    # builtin and command engines (see scanner_client.engines.EngineSettings).
    db_dir: str = ""
    db_update_url: tuple[str, ...] = ()
    db_update_interval: float = 0.0
    scratch_dir: str = ""
    min_free_scratch: float = 256.0
    layer_cache_dir: str = ""
    layer_cache_size: float = 2048.0
    credentials_file: str = ""
    insecure_registries: tuple[str, ...] = ()
    platform: str = "linux/amd64"
    # The job policy (scanner_client.job_policy): comma-separated, as the flags take them.
    allowed_registries: str = "*"
    allowed_artifact_urls: str = ""
    allowed_networks: str = ""
    artifact_roots: str = ""
    node_roots: str = ""
    credential_grants: str = ""
    command: str = ""
    command_format: str = "trivy-json"
    command_timeout: float = 600.0
    command_databases: tuple[str, ...] = ()
    # TLS to the handler (any of these turns it on) and the bearer token (never shown).
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token: str = field(default="", repr=False)
    # "asyncio" (the standard loop) or "uvloop" (optional: pip install 'image-handler[uvloop]').
    event_loop: str = "asyncio"
    # Plaintext HOST:PORT serving grpc.health.v1 for probes (scanner_client.health); "": none.
    health_listen: str = ""


def _words(value: str) -> tuple[str, ...]:
    """A comma-separated list: ``a, b`` -> ("a", "b")."""
    return tuple(word.strip() for word in value.split(",") if word.strip())


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


def _mebibytes(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of MiB") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is out of range")
    return number


def duration(value: str) -> float:
    """Seconds, or a number with s, m, h or d (``6h``)."""
    text = value.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], 0)
    try:
        number = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a time (600, 30m, 6h, 1d)") from None
    if number < 0 or number != number:
        raise argparse.ArgumentTypeError(f"{value!r} is out of range")
    return number


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
    option("--db-dir", "", "builtin engine: databases directory (default: packaged)", metavar="DIR")
    option(
        "--db-update-url",
        "",
        "builtin engine: update the vulnerability database in --db-dir from these sources "
        "(URLs or paths, comma-separated) every --db-update-interval",
        parse=_words,
        metavar="SOURCES",
    )
    option(
        "--db-update-interval",
        "0",
        "builtin engine: time between database updates: seconds, or 30m, 6h, 1d (0: never)",
        parse=duration,
        metavar="TIME",
    )
    option(
        "--scratch-dir",
        "",
        "builtin engine: where images are unpacked, created if missing (default: the system "
        "temporary directory)",
        metavar="DIR",
    )
    option(
        "--min-free-scratch",
        "256",
        "builtin engine: MiB the scratch directory must have free to start, and to go on after "
        "a failed scan (0: no check)",
        parse=_mebibytes,
        metavar="MIB",
    )
    option(
        "--layer-cache-dir",
        "",
        "builtin engine: keep what was learned from each image layer here, so that a layer "
        "seen before is neither downloaded nor unpacked again; several scanners may share it "
        "(default: no cache)",
        metavar="DIR",
    )
    option(
        "--layer-cache-size",
        "2048",
        "builtin engine: MiB the layer cache may take; the least recently used layers go first",
        parse=_mebibytes,
        metavar="MIB",
    )
    option(
        "--credentials-file",
        "",
        "builtin engine: JSON file of pull credentials by credentials_ref",
        metavar="FILE",
    )
    option(
        "--insecure-registries",
        "",
        "builtin engine: registries pulled over plain HTTP, comma-separated (loopback always is)",
        parse=_words,
        metavar="HOSTS",
    )
    option("--platform", "linux/amd64", "builtin engine: platform to pull", metavar="OS/ARCH")
    option(
        "--allowed-registries",
        "*",
        "builtin and command engines: registries a job may name, comma-separated HOST[:PORT] "
        "patterns (* any part; without a port only the default port)",
        metavar="PATTERNS",
    )
    option(
        "--allowed-artifact-urls",
        "",
        "builtin and command engines: artifact URL prefixes a job may name, comma-separated "
        "SCHEME://HOST[:PORT]/PATH ('' = none)",
        metavar="PREFIXES",
    )
    option(
        "--allowed-networks",
        "",
        "builtin and command engines: internal networks (CIDR, comma-separated) a job may reach; "
        "loopback, link-local and private addresses are refused otherwise",
        metavar="CIDRS",
    )
    option(
        "--artifact-roots",
        "",
        "builtin and command engines: directories artifact paths may be under, after links "
        "are resolved ('' = none)",
        metavar="DIRS",
    )
    option(
        "--node-roots",
        "",
        "builtin and command engines: directories node root paths may be under, after links "
        "are resolved ('' = none)",
        metavar="DIRS",
    )
    option(
        "--credential-grants",
        "",
        "builtin engine: JSON file granting each credentials_ref to callers and registries "
        "(instead of the grants in --credentials-file)",
        metavar="FILE",
    )
    option(
        "--command",
        "",
        "command engine: command template, e.g. 'trivy image --quiet --format json {image}'",
        metavar="TEMPLATE",
    )
    option(
        "--command-format",
        "trivy-json",
        "command engine: output format, trivy-json or scanresult-json",
        parse=_one_of(("trivy-json", "scanresult-json")),
        metavar="FORMAT",
    )
    option(
        "--command-timeout",
        "600",
        "command engine: seconds before the command is killed",
        parse=_seconds(False),
        metavar="SECONDS",
    )
    option(
        "--command-databases",
        "",
        "command engine: databases the command uses, NAME=VERSION@RELEASED_AT, comma-separated",
        parse=_words,
        metavar="DBS",
    )
    option("--tls", "false", "connect with TLS (implied by --tls-ca/--tls-cert)", parse=_yes_no)
    option(
        "--tls-ca",
        "",
        "PEM CA bundle the handler's certificate is checked against (default: the system's)",
        metavar="FILE",
    )
    option(
        "--tls-cert",
        "",
        "client certificate, PEM (mutual TLS; its identity is the "
        "scanner id: give it as --scanner-id)",
        metavar="FILE",
    )
    option("--tls-key", "", "private key of --tls-cert, PEM", metavar="FILE")
    option(
        "--token",
        "",
        "bearer token with the scanner role (prefer the environment variable or --token-file)",
        metavar="TOKEN",
    )
    option("--token-file", "", "file holding the bearer token (a mounted Secret)", metavar="FILE")
    option(
        "--event-loop",
        "asyncio",
        "asyncio, or uvloop (less CPU per job; needs the uvloop package)",
        parse=_one_of(EVENT_LOOPS),
        metavar="LOOP",
    )
    option(
        "--health-listen",
        "",
        "plaintext HOST:PORT serving grpc.health.v1 for probes: '' is alive, "
        "imagehandler.v1.ScannerService is registered ('' = none)",
        parse=_optional_address,
        metavar="HOST:PORT",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def _optional_address(value: str) -> str:
    """``HOST:PORT`` (port 0 picks a free one), or empty for none."""
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return value


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    environment = os.environ if env is None else env
    parser = build_parser(environment)
    args = parser.parse_args(argv)
    if args.backoff_max < args.backoff_initial:
        parser.error(
            f"--backoff-max ({args.backoff_max}) is below --backoff-initial "
            f"({args.backoff_initial})"
        )
    if args.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error(
            "--event-loop uvloop needs the uvloop package: pip install uvloop "
            "(or pip install 'image-handler[uvloop]'), or use --event-loop asyncio"
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
        db_dir=args.db_dir,
        db_update_url=args.db_update_url,
        db_update_interval=args.db_update_interval,
        scratch_dir=args.scratch_dir,
        min_free_scratch=args.min_free_scratch,
        layer_cache_dir=args.layer_cache_dir,
        layer_cache_size=args.layer_cache_size,
        credentials_file=args.credentials_file,
        insecure_registries=args.insecure_registries,
        platform=args.platform,
        allowed_registries=args.allowed_registries,
        allowed_artifact_urls=args.allowed_artifact_urls,
        allowed_networks=args.allowed_networks,
        artifact_roots=args.artifact_roots,
        node_roots=args.node_roots,
        credential_grants=args.credential_grants,
        command=args.command,
        command_format=args.command_format,
        command_timeout=args.command_timeout,
        command_databases=args.command_databases,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=_token(parser, args.token, args.token_file),
        event_loop=args.event_loop,
        health_listen=args.health_listen,
    )


def _yes_no(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def _token(parser: argparse.ArgumentParser, token: str, token_file: str) -> str:
    if token_file:
        try:
            return Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            parser.error(f"cannot read --token-file {token_file}: {exc.strerror}")
    return token


def build_client(settings: Settings) -> ScannerClient:
    engine = ENGINES[settings.engine](
        EngineSettings(
            delay=settings.delay,
            proxy_url=settings.proxy_url,
            db_dir=settings.db_dir,
            db_update_from=settings.db_update_url,
            db_update_interval=settings.db_update_interval,
            scratch_dir=settings.scratch_dir,
            min_free_scratch=settings.min_free_scratch,
            layer_cache_dir=settings.layer_cache_dir,
            layer_cache_size=settings.layer_cache_size,
            credentials_file=settings.credentials_file,
            insecure_registries=settings.insecure_registries,
            platform=settings.platform,
            # ValueError naming the flag of a policy value that does not parse (exit 2).
            policy=ScannerPolicy.parse(
                allowed_registries=settings.allowed_registries,
                allowed_artifact_urls=settings.allowed_artifact_urls,
                allowed_networks=settings.allowed_networks,
                artifact_roots=settings.artifact_roots,
                node_roots=settings.node_roots,
                credential_grants=settings.credential_grants,
                handler=settings.handler,
            ),
            command=settings.command,
            command_format=settings.command_format,
            command_timeout=settings.command_timeout,
            command_databases=settings.command_databases,
        )
    )
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
        credentials=(
            channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
            if settings.tls or settings.tls_ca or settings.tls_cert or settings.tls_key
            else None
        ),
        token=settings.token,
    )


async def serve(client: ScannerClient, health_listen: str = "") -> None:
    """Run the client; the first SIGTERM/SIGINT drains it, a second one stops it. With
    ``health_listen``, probes are answered there until the client ends."""
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
    health_server = None
    try:
        if health_listen:
            health_server, port = await start_health_server(client, health_listen)
            client.log.info("health listening", address=health_listen, port=port)
        await client.run()
    finally:
        if health_server is not None:
            await health_server.stop(0)
        for signum in handled:
            loop.remove_signal_handler(signum)


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--event-loop`` asks for (None: asyncio's own)."""
    if event_loop != "uvloop":
        return None
    import uvloop  # optional: parse_args checked that it is installed

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def db_main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """``image-scanner db info|verify|build|update``: see :mod:`scanner_client.db_cli`."""
    try:
        with builtin_engine_extra("image-scanner db"):
            from scanner_client.db_cli import main as db_cli_main

            return db_cli_main(argv, os.environ if env is None else env)
    except MissingExtra as missing:
        print(f"image-scanner: {missing}", file=sys.stderr)
        return EXIT_REJECTED


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["db"]:
        return db_main(arguments[1:])
    settings = parse_args(arguments)
    configure_logging(settings.log_format, settings.log_level)
    try:
        client = build_client(settings)
    except ValueError as exc:
        print(f"image-scanner: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(serve(client, settings.health_listen))
    except ScannerRejected as rejected:
        print(rejected.message, file=sys.stderr)
        return EXIT_REJECTED
    except ScannerBroken as broken:
        print(f"image-scanner: the scanner cannot work: {broken}", file=sys.stderr)
        return EXIT_BROKEN
    except ValueError as exc:  # --health-listen cannot be bound
        print(f"image-scanner: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
