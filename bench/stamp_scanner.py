"""``image-scanner`` that also notes when each assignment arrived, for the pickup bench.

It is the real CLI and :class:`ScannerClient` with the noop engine; the one addition is a
``time.monotonic()`` stamp taken as each ``assignment`` message is read, before its jobs start.
CLOCK_MONOTONIC is one clock for every process on a Linux machine, so the bench compares these
stamps with the submitter's. On exit (SIGTERM drains) the stamps go to ``--stamps`` as lines of
``job_id monotonic_ns``.

    python -m bench.stamp_scanner --stamps FILE [image-scanner flags]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from imagehandler.v1 import scanner_service_pb2
from scanner_client import cli
from scanner_client.client import ClientConfig, ScannerClient
from scanner_client.engines import ENGINES, EngineSettings
from scanner_client.logs import configure_logging


class StampingClient(ScannerClient):
    stamps: list[tuple[str, int]]

    def _dispatch(self, session: object, response: scanner_service_pb2.ConnectResponse) -> None:
        if response.WhichOneof("message") == "assignment":
            now = time.monotonic_ns()
            self.stamps.extend((job.job_id, now) for job in response.assignment.jobs)
        super()._dispatch(session, response)  # type: ignore[arg-type]


def main() -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--stamps", type=Path, required=True)
    known, rest = own.parse_known_args()
    settings = cli.parse_args(rest)
    configure_logging(settings.log_format, settings.log_level)
    engine = ENGINES[settings.engine](EngineSettings(delay=settings.delay))
    client = StampingClient(
        settings.handler,
        engine,
        ClientConfig(
            scanner_id=settings.scanner_id,
            slots=settings.slots,
            kinds=settings.kinds,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
        ),
    )
    client.stamps = []
    try:
        asyncio.run(cli.serve(client))
    finally:
        with open(known.stamps, "w") as out:
            out.writelines(f"{job_id} {at}\n" for job_id, at in client.stamps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
