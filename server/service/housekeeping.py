"""Housekeeping: the store's upkeep (snapshots, leases), the rescue of runs a dead replica
left, retention, and the drain at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog

from server.config import Config
from server.core.model import Job, Transition
from server.service.events import EventBus, Subscription
from server.service.jobs import JobBook
from server.storage.repository import JobRepository

log = structlog.get_logger("imagehandler")


class Housekeeping:
    def __init__(
        self,
        config: Config,
        repository: JobRepository,
        jobs: JobBook,
        events: EventBus,
    ) -> None:
        self.config = config
        self._repository = repository
        self._jobs = jobs
        self._events = events
        self._task: asyncio.Task[None] | None = None
        # Ends the runs a dead replica left (set by the handler).
        self.rescue: Callable[[list[Job]], Awaitable[None]] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while True:
            try:
                await self._repository.maintain()
                expired = await self._repository.expired(at=datetime.now(UTC))
                if expired and self.rescue is not None:
                    await self.rescue(expired)
                if loop.time() >= next_prune:
                    await self._jobs.prune(datetime.now(UTC))
                    next_prune = loop.time() + self.config.prune_interval
            except Exception:  # upkeep must go on; what failed is logged
                log.exception("housekeeping.failed")
            await asyncio.sleep(0.5)  # a pacing tick for these checks, not a wait for state

    async def drain(self, grace: float, busy: Callable[[], bool]) -> bool:
        """Wait up to ``grace`` seconds until ``busy()`` is false, checking at every status
        change. True when it finished in time."""
        changed = asyncio.Event()

        def listener(job: Job, transition: Transition) -> None:
            changed.set()

        subscription = Subscription(listener)
        self._events.subscribe(subscription)
        try:
            async with asyncio.timeout(grace):
                while busy():
                    changed.clear()
                    await changed.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._events.unsubscribe(subscription)
