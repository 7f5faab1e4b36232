"""Job events: every transition, in order, numbered, for the handler's listeners and watchers.

Two ways to listen:

- **Subscriptions** are called synchronously inside the transition, so each sees the job exactly
  as the transition left it. They serve the handler itself and watchers of one job (whose
  events are few: one job's transitions).
- **Feeds** serve watchers of every job. Each event is encoded once into a shared, bounded log
  and each feed is only a cursor into it, so a watcher costs no memory of its own and a slow
  one costs nothing until it falls too far behind: then it is cut, with the last sequence it
  was sent, and can resume from there while the log still holds what followed. Publishing
  costs the same with one watcher or a thousand.

Sequence numbers start at the handler's start time in microseconds and go up by one per event,
so they keep increasing across restarts and a resume from an older life is refused, not
misread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.core.model import Job, JobStatus, Transition

Listener = Callable[[Job, Transition], None]
# What an entry of the log costs besides its payload (the Entry, the bytes object's header, the
# deque's slot), so the log's byte bound is close to the memory it really holds.
ENTRY_OVERHEAD = 160
# Builds what a feed sends for an event, and its size in bytes (the transport owns the format).
Encoder = Callable[[Job, Transition, int], tuple[object, int]]


@dataclass(eq=False)
class Subscription:
    listener: Listener
    job_id: str = ""
    statuses: frozenset[JobStatus] = frozenset()

    def wants(self, job: Job, transition: Transition) -> bool:
        if self.job_id and job.id != self.job_id:
            return False
        return not self.statuses or transition.to_status in self.statuses


class FellBehind(Exception):
    """A feed's next events are gone from the log, or it lags by more than it may."""

    def __init__(self, last_sent: int, detail: str) -> None:
        super().__init__(detail)
        self.last_sent = last_sent
        self.detail = detail


@dataclass(slots=True, frozen=True)
class Entry:
    seq: int
    to_status: JobStatus
    payload: object
    # Bytes of the log up to and including this entry (a running sum: a feed's lag is the
    # difference of two of them).
    total: int


@dataclass(eq=False)
class Feed:
    """A watcher's cursor into the log."""

    last_sent: int  # the newest sequence delivered to the watcher
    read_total: int = 0  # the log's running byte sum at the cursor
    cut: FellBehind | None = None
    # Called when the feed is cut, so its owner stops waiting (e.g. cancels its writer).
    on_cut: Callable[[], object] = lambda: None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class EventBus:
    def __init__(
        self,
        *,
        log_bytes: int = 64 * 1024 * 1024,
        lag_bytes: int = 16 * 1024 * 1024,
        resume_seconds: float = 60.0,
    ) -> None:
        self._all: list[Subscription] = []
        self._by_job: dict[str, list[Subscription]] = {}
        self.seq = time.time_ns() // 1000
        self.encode: Encoder | None = None
        self.log_bytes = log_bytes
        self.lag_bytes = lag_bytes
        self.resume_seconds = resume_seconds
        self._log: deque[Entry] = deque()
        self._total = 0  # running byte sum of everything ever logged
        self._first_base = 0  # the running sum before the log's first entry
        self._feeds: set[Feed] = set()
        self._recording = False
        self._stop_timer: asyncio.TimerHandle | None = None
        self._wake_scheduled = False

    def watched(self, job_id: str) -> bool:
        """A watcher hears this job's events now: one of every job (a feed, or the log kept
        for resumes) or one of this job. The handler's own subscriptions do not count."""
        return bool(self._feeds or self._recording or job_id in self._by_job)

    # ----- subscriptions ------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> None:
        if subscription.job_id:
            self._by_job.setdefault(subscription.job_id, []).append(subscription)
        else:
            self._all.append(subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription.job_id:
            subs = self._by_job.get(subscription.job_id, [])
            if subscription in subs:
                subs.remove(subscription)
            if not subs:
                self._by_job.pop(subscription.job_id, None)
        elif subscription in self._all:
            self._all.remove(subscription)

    def publish(self, job: Job, transition: Transition) -> None:
        self.seq += 1
        if self._all:
            for subscription in self._all:
                if subscription.wants(job, transition):
                    subscription.listener(job, transition)
        by_job = self._by_job.get(job.id)
        if by_job:
            for subscription in tuple(by_job):
                if subscription.wants(job, transition):
                    subscription.listener(job, transition)
        if self._recording and self.encode is not None:
            self._append(job, transition)

    # ----- feeds --------------------------------------------------------------------------

    def open_feed(self, after_sequence: int = 0) -> Feed:
        """A cursor at the newest event, or after ``after_sequence`` (FellBehind when the
        events after it are no longer kept)."""
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        self._recording = True
        feed = Feed(last_sent=self.seq, read_total=self._total)
        if after_sequence and after_sequence != self.seq:
            first = self._log[0].seq if self._log else self.seq + 1
            if not first - 1 <= after_sequence < self.seq:
                raise FellBehind(
                    after_sequence,
                    f"the events after sequence {after_sequence} are no longer kept (the "
                    f"oldest kept follows {first - 1}, the newest is {self.seq})",
                )
            feed.last_sent = after_sequence
            if after_sequence >= first:
                feed.read_total = self._log[after_sequence - first].total
            else:
                feed.read_total = self._first_base
        self._feeds.add(feed)
        return feed

    def close_feed(self, feed: Feed) -> None:
        self._feeds.discard(feed)
        if not self._feeds and self._stop_timer is None:
            loop = asyncio.get_running_loop()
            self._stop_timer = loop.call_later(self.resume_seconds, self._stop_recording)

    def read(self, feed: Feed, limit: int) -> list[Entry]:
        """Up to ``limit`` events after the feed's cursor; the cursor moves past them."""
        if feed.cut is not None:
            raise feed.cut
        if not self._log or feed.last_sent >= self.seq:
            return []
        first = self._log[0].seq
        if feed.last_sent + 1 < first:
            self._cut(feed)
            raise feed.cut  # type: ignore[misc]  # _cut set it
        start = feed.last_sent + 1 - first
        end = min(len(self._log), start + limit)
        out = [self._log[i] for i in range(start, end)]
        if out:
            feed.last_sent = out[-1].seq
            feed.read_total = out[-1].total
        return out

    def lag(self, feed: Feed) -> int:
        """Bytes of events the feed has not read."""
        return self._total - feed.read_total

    @property
    def feeds(self) -> int:
        return len(self._feeds)

    @property
    def logged_bytes(self) -> int:
        return self._total - self._first_base

    def _append(self, job: Job, transition: Transition) -> None:
        assert self.encode is not None
        payload, size = self.encode(job, transition, self.seq)
        self._total += size + ENTRY_OVERHEAD
        self._log.append(Entry(self.seq, transition.to_status, payload, self._total))
        while self._total - self._first_base > self.log_bytes and len(self._log) > 1:
            dropped = self._log.popleft()
            self._first_base = dropped.total
        if not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        """Once per loop turn with new events: wake the feeds, cut the ones too far behind."""
        self._wake_scheduled = False
        check = self.logged_bytes > self.lag_bytes
        first = self._log[0].seq if self._log else self.seq + 1
        for feed in tuple(self._feeds):
            if feed.cut is not None:
                continue
            if feed.last_sent + 1 < first or (check and self.lag(feed) > self.lag_bytes):
                self._cut(feed)
            else:
                feed.changed.set()

    def _cut(self, feed: Feed) -> None:
        feed.cut = FellBehind(
            feed.last_sent,
            f"the watcher fell more than {self.lag_bytes} bytes of events behind (it reads "
            f"too slowly); the last event sent was sequence {feed.last_sent}",
        )
        self._feeds.discard(feed)
        feed.changed.set()
        feed.on_cut()

    def _stop_recording(self) -> None:
        self._stop_timer = None
        if self._feeds:
            return
        self._recording = False
        self._log.clear()
        self._first_base = self._total
