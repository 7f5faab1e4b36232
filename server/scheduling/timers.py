"""Many deadlines, few loop timers: deadlines are kept in buckets of ``resolution`` seconds and
the loop holds one timer per bucket, not one per deadline.

Every assigned job has a deadline (its run time or the result wait) that is almost always
cancelled by its result a moment later. One ``loop.call_at`` per job costs a heap push, a
``TimerHandle`` and a cancelled entry the loop must sweep; a bucket costs a dict entry. A
deadline fires at the end of its bucket: never early, at most ``resolution`` late.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_RESOLUTION = 0.05


class BucketTimers(Generic[T]):
    def __init__(
        self,
        loop: Callable[[], asyncio.AbstractEventLoop],
        fire: Callable[[T], None],
        resolution: float = DEFAULT_RESOLUTION,
    ) -> None:
        self._loop = loop
        self._fire = fire
        self._resolution = resolution
        self._buckets: dict[int, dict[str, T]] = {}
        self._handles: dict[int, asyncio.TimerHandle] = {}
        self._bucket_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._bucket_of)

    def __contains__(self, key: str) -> bool:
        return key in self._bucket_of

    def arm(self, key: str, item: T, when: float) -> None:
        """Call ``fire(item)`` at loop time ``when`` (or up to one resolution later), replacing
        any deadline ``key`` had."""
        self.cancel(key)
        bucket = math.ceil(when / self._resolution)
        items = self._buckets.get(bucket)
        if items is None:
            items = self._buckets[bucket] = {}
            self._handles[bucket] = self._loop().call_at(
                bucket * self._resolution, self._expire, bucket
            )
        items[key] = item
        self._bucket_of[key] = bucket

    def cancel(self, key: str) -> None:
        bucket = self._bucket_of.pop(key, None)
        if bucket is None:
            return
        items = self._buckets[bucket]
        del items[key]
        if not items:  # the last one: the loop timer has nothing left to do
            del self._buckets[bucket]
            self._handles.pop(bucket).cancel()

    def clear(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._buckets.clear()
        self._handles.clear()
        self._bucket_of.clear()

    def _expire(self, bucket: int) -> None:
        self._handles.pop(bucket, None)
        items = self._buckets.pop(bucket, {})
        for key in items:
            del self._bucket_of[key]
        for key, item in items.items():
            if key not in self._bucket_of:  # not armed again by an earlier fire() of this bucket
                self._fire(item)
