"""The no-op engine: scans nothing and says so.

It exists to run the handler end to end without a real scanner: after an optional delay it
returns an empty result (verdict PASSED, no findings) from a database named ``noop``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from imagehandler.v1 import common_pb2
from scanner_client.engine import Database, Engine, Job, ProgressReporter


class NoopEngine(Engine):
    """Finds nothing in anything, after ``delay`` seconds."""

    name = "noop"

    def __init__(self, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, got {delay}")
        self.delay = delay

    def databases(self) -> Sequence[Database]:
        today = datetime.now(UTC).date().isoformat()
        return [Database(name="noop", version="0", released_at=today)]

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        progress.report("analyse", 0, "no-op engine: nothing is analysed")
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        progress.report("report", 100)
        return common_pb2.ScanResult(
            verdict=common_pb2.VERDICT_PASSED,
            databases=[database.to_proto() for database in self.databases()],
        )
