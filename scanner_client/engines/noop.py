"""The no-op engine: scans nothing and says so.

It exists to run the handler end to end without a real scanner: after an optional delay it
returns an empty result (verdict PASSED, no findings) from a database named ``noop``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import date, timedelta

from imagehandler.v1 import common_pb2
from scanner_client.engine import Database, Engine, Job, ProgressReporter

_EPOCH_DATE = date(1970, 1, 1)
_SECONDS_PER_DAY = 86400


def _utc_day() -> int:
    """Days since 1970-01-01 in UTC (POSIX time has no leap seconds: every day is 86,400 s)."""
    return int(time.time() // _SECONDS_PER_DAY)


class NoopEngine(Engine):
    """Finds nothing in anything, after ``delay`` seconds."""

    name = "noop"

    def __init__(self, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, got {delay}")
        self.delay = delay
        # Today's result, serialized, and the UTC day it is for: the result only changes
        # with the date, and parsing it is cheaper than building it (and its database) anew
        # for every scan, which is what this engine is timed by.
        self._result_day = -1
        self._result = b""

    def databases(self) -> Sequence[Database]:
        return self._databases(_utc_day())

    @staticmethod
    def _databases(day: int) -> list[Database]:
        today = (_EPOCH_DATE + timedelta(days=day)).isoformat()
        return [Database(name="noop", version="0", released_at=today)]

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        progress.report("analyse", 0, "no-op engine: nothing is analysed")
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        progress.report("report", 100)
        day = _utc_day()
        if day != self._result_day:
            self._result = common_pb2.ScanResult(
                verdict=common_pb2.VERDICT_PASSED,
                databases=[database.to_proto() for database in self._databases(day)],
            ).SerializeToString()
            self._result_day = day
        # A new message every time: the client fills in the job's id and run.
        return common_pb2.ScanResult.FromString(self._result)
