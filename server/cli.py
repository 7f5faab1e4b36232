"""``image-handler serve``: run the handler until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time
from collections.abc import Callable, Sequence

import structlog

from imagehandler.errors import Catalogue, HandlerError
from server import config as config_module
from server.app import HandlerServer, open_postgres
from server.observability import logs
from server.security.tokens import add_token_arguments, token_main

# The collector's full passes scan every tracked object, about eight per job: with a million
# jobs in memory one pass stops the loop for one to two seconds, and CPython starts one each
# time the old objects have grown by a quarter (every few hundred thousand submits on a large
# queue). Jobs hold no reference cycles (reference counting returns their memory); the cycles
# the handler makes (calls, tasks, exceptions) nearly all die young and the young generations
# find them. So automatic full passes are off, and one runs at this interval for the few
# cycles that grew old.
FULL_COLLECTION_INTERVAL = 3600.0


def young_collections_only() -> None:
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 2**31 - 1)


async def full_collections(interval: float = FULL_COLLECTION_INTERVAL) -> None:
    log = structlog.get_logger("imagehandler")
    while True:
        await asyncio.sleep(interval)
        started = time.perf_counter()
        found = gc.collect()
        log.info("gc.full_collection", seconds=round(time.perf_counter() - started, 3), found=found)


async def serve(config: config_module.Config) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    server = HandlerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # What exists now (the recovered queue, up to millions of jobs, and the code) lives as long
    # as the process: keep it out of the collector's full passes, whose pause would grow with
    # the queue. (Here, not in HandlerServer.start: tests run many handlers in one process.)
    gc.freeze()
    young_collections_only()
    collector = asyncio.create_task(full_collections(), name="gc-full")
    print(f"image-handler listening on {server.address}", file=sys.stderr, flush=True)
    await stop.wait()
    collector.cancel()
    structlog.get_logger("imagehandler").info("handler.stopping", grace_period=config.grace_period)
    await server.stop(config.grace_period)


def loop_factory(config: config_module.Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--event-loop`` asks for (None: asyncio's own)."""
    if config.event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise HandlerError(
            Catalogue.SYSTEM_ERROR,
            "--event-loop uvloop needs the uvloop package: pip install uvloop "
            "(or pip install 'image-handler[uvloop]'), or use --event-loop asyncio",
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def migrate(config: config_module.Config) -> None:
    """Bring the PostgreSQL schema up to date (what ``serve`` does at start), then stop."""
    repository = open_postgres(config)
    applied = await repository.migrate()  # type: ignore[attr-defined]  # a PostgresRepository
    done = ", ".join(applied) if applied else "nothing to apply"
    print(f"image-handler migrate: schema {config.database_schema}: {done}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="image-handler", description="The image handler: a queue of scan jobs for scanners."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the handler")
    config_module.add_arguments(serve_parser)
    migrate_parser = commands.add_parser(
        "migrate", help="apply the PostgreSQL schema migrations (--database-url) and stop"
    )
    config_module.add_arguments(migrate_parser)
    add_token_arguments(
        commands.add_parser("token", help="make a bearer token and its --token-file line")
    )
    args = parser.parse_args(argv)
    if args.command == "token":
        return token_main(args)
    config = config_module.from_namespace(args)
    try:
        zone = logs.resolve_timezone(config.timezone)
        logs.configure(config.log_format, config.log_level, zone)
        if args.command == "migrate":
            if not config.database_url:
                raise HandlerError(
                    Catalogue.SCANNER_CONFIG_INVALID,
                    "migrate needs --database-url (or IMAGE_HANDLER_DATABASE_URL)",
                )
            asyncio.run(migrate(config))
            return 0
        config.check()
        with asyncio.Runner(loop_factory=loop_factory(config)) as runner:
            runner.run(serve(config))
    except HandlerError as error:
        print(f"image-handler: {error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
