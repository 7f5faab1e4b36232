"""Per-client limits: a submit rate (token bucket, counted in jobs) and concurrent streams.

A *client* is the token's name when the call carried a valid token, else the client
certificate's identity (mutual TLS), else the peer's IP address. Both structures are touched
only from the event loop, so they need no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from imagehandler.errors import Catalogue, HandlerError, Reason

# Past this many buckets, full ones (clients idle long enough to be back at burst) are dropped.
_PRUNE_AT = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class SubmitRateLimiter:
    """``rate`` jobs per second per client with bursts of up to ``burst`` jobs."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str, jobs: int) -> float:
        """Take ``jobs`` from the client's bucket: 0.0 when allowed, else the seconds after which
        the same request would be (``math.inf`` when it is larger than the burst)."""
        if jobs > self.burst:
            return math.inf
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= jobs:
            bucket.tokens -= jobs
            return 0.0
        return (jobs - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [
            key
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]


class StreamCounter:
    """Open streams per client, at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        count = self._open.get(client, 0)
        if count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def open(self, client: str) -> int:
        return self._open.get(client, 0)


def oversized_result(result: Message, limit: int) -> HandlerError | None:
    """HNDL-007 RESOURCE_EXHAUSTED for a scan result over ``--max-result-bytes``, else None.
    Running the scan again would bring the same result, so the run's failure is permanent."""
    size = result.ByteSize()
    if size <= limit:
        return None
    return HandlerError(
        Catalogue.SYSTEM_ERROR,
        f"the result is {size} bytes; the limit is {limit} bytes (--max-result-bytes)",
        reason=Reason.EXHAUSTED,
    )


__all__ = ["StreamCounter", "SubmitRateLimiter", "oversized_result"]
