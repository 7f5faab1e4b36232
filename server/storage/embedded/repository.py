"""The embedded repository: the in-memory tables, journaled, with snapshots, in one data
directory that it locks."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from server.storage.embedded.journal import FsyncPolicy
from server.storage.embedded.store import JournalStore
from server.storage.memory import MemoryRepository
from server.storage.repository import Recovered
from server.storage.result_files import ResultFiles

log = structlog.get_logger("imagehandler.storage")


class EmbeddedRepository(MemoryRepository):
    def __init__(
        self,
        directory: Path,
        *,
        policy: FsyncPolicy = FsyncPolicy.BATCH,
        interactive_share: float = 0.8,
        snapshot_bytes: int = 64 * 1024 * 1024,
        snapshot_interval: float = 300.0,
        salvage: bool = False,
        observe_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self.store = JournalStore(
            directory,
            policy,
            snapshot_bytes=snapshot_bytes,
            salvage=salvage,
            observe_fsync=observe_fsync,
        )
        # Lock and check the directory now: a clear error before the handler binds its port.
        self.store.open_directory()
        super().__init__(
            interactive_share=interactive_share,
            log=self.store,
            result_files=ResultFiles(directory),
        )
        self.snapshot_interval = snapshot_interval
        self._next_snapshot = 0.0
        self._opened = False

    async def open(self) -> Recovered:
        """Load the newest snapshot and replay the journals after it (in a thread: the loop
        keeps answering health checks), rebuild the tables, open a new journal."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        # The cyclic collector stays off while recovery makes the objects of every job (it
        # would walk them all again and again for nothing: they live on), and what it made
        # is then frozen: no later collection walks it either.
        collecting = gc.isenabled()
        gc.disable()
        try:
            state = await loop.run_in_executor(None, self.store.recover)
            recovered = self.load(state.jobs, state.next_seq, state.acceptances)
        finally:
            gc.freeze()
            if collecting:
                gc.enable()
        self.store.start(state)
        self._opened = True
        self._next_snapshot = loop.time() + self.snapshot_interval
        recovered.records_replayed = state.records_replayed
        recovered.torn_bytes_cut = state.torn_bytes_cut
        recovered.lost = state.lost
        # The whole of it: reading the files and rebuilding the tables and the queue.
        recovered.seconds = time.perf_counter() - started
        return recovered

    async def maintain(self) -> None:
        """A snapshot every ``snapshot_interval`` seconds or ``snapshot_bytes`` of journal."""
        loop = asyncio.get_running_loop()
        if self.store.wants_snapshot() or loop.time() >= self._next_snapshot:
            await self.snapshot()
            self._next_snapshot = loop.time() + self.snapshot_interval

    async def snapshot(self) -> bool:
        """Write a snapshot; False (and logged) when it could not be written: the journal
        still holds everything, so this costs only a longer recovery."""
        try:
            # Taken in the same loop turn as the journal switch inside the store.
            await self.store.snapshot(*self.snapshot_state())
        except OSError as exc:
            log.error("snapshot.failed", error=str(exc))
            return False
        except Exception as exc:  # a HandlerError from the store says what went wrong
            log.error("snapshot.failed", error=str(exc))
            return False
        return True

    async def close(self) -> None:
        if self._opened:
            started = time.perf_counter()
            await self.snapshot()
            log.debug("snapshot.at_close", seconds=round(time.perf_counter() - started, 3))
        await self.store.close()
