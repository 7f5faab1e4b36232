"""The journal: every change, appended as a framed record before anyone hears of it.

Records are buffered within one event-loop turn and written with one ``write`` before the
handler answers a client or sends anything to a scanner or watcher, so a killed process (which
loses nothing the kernel already has) never loses an acknowledged job. Whether they also reach
the disk before the answer is the fsync policy:

- ``always``: fsync after every write, on the event loop. Safest, slowest.
- ``batch`` (default): answers wait for an fsync that runs in a worker thread; every answer
  waiting at that moment shares it (group commit). Survives power loss like ``always``.
- ``never``: no fsync except at snapshots and shutdown. A power loss (not a process crash) can
  lose the last seconds of acknowledged work.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imagehandler.errors import Catalogue, HandlerError, Reason
from server.storage.disk import fsync_directory
from server.storage.embedded.framing import frame


class FsyncPolicy(enum.StrEnum):
    ALWAYS = "always"
    BATCH = "batch"
    NEVER = "never"


def journal_path(directory: Path, generation: int) -> Path:
    return directory / f"journal-{generation:08d}.log"


class JournalError(HandlerError):
    """The journal could not be written: the change was not made durable."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(
            Catalogue.SYSTEM_ERROR,
            f"cannot write the journal {path}: {exc.strerror or exc}; nothing was acknowledged "
            "(free disk space or fix the data directory)",
            reason=Reason.UNAVAILABLE,
        )


class Journal:
    def __init__(
        self,
        directory: Path,
        generation: int,
        policy: FsyncPolicy,
        *,
        next_lsn: int,
        observe_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self.directory = directory
        self.policy = policy
        self.generation = generation
        self.path = journal_path(directory, generation)
        self._fd = self._open(self.path)
        self.size = os.fstat(self._fd).st_size
        self._buffer: list[bytes] = []
        self._buffer_lsns: list[int] = []
        self.last_lsn = next_lsn - 1  # the newest record appended
        self.written_lsn = self.last_lsn  # the newest record the kernel has
        self.synced_lsn = self.last_lsn  # the newest record on disk
        self._observe_fsync = observe_fsync
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sync_wanted = asyncio.Event()
        self._fd_lock = asyncio.Lock()
        self._flush_scheduled = False
        self._retired: list[int] = []  # earlier files' descriptors, closed once fsynced
        self._syncer: asyncio.Task[None] | None = None
        self.failed: JournalError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # fsyncs run on a thread of their own: in the loop's default executor they would
        # queue behind other work (result workers) while every answer waits on them.
        self._fsync_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-fsync")

    @staticmethod
    def _open(path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (asked once: ``asyncio.get_running_loop`` makes a system call)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def start(self) -> None:
        if self.policy is FsyncPolicy.BATCH:
            self._syncer = asyncio.create_task(self._sync_loop(), name="journal-fsync")

    def next_lsn(self) -> int:
        return self.last_lsn + 1

    def append(self, lsn: int, payload: bytes) -> None:
        """Queue a record; it is written at the end of this loop turn or at the next flush."""
        self._buffer.append(frame(payload))
        self._buffer_lsns.append(lsn)
        self.last_lsn = lsn
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._running_loop().call_soon(self._scheduled_flush)

    def mark(self) -> int:
        return len(self._buffer)

    def discard_since(self, mark: int) -> None:
        """Drop records appended after ``mark`` that are not written yet (a failed submit)."""
        del self._buffer[mark:]
        del self._buffer_lsns[mark:]
        self.last_lsn = self._buffer_lsns[-1] if self._buffer_lsns else self.written_lsn

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        # On failure the records stay buffered: the next flush tries again, callers see it.
        with contextlib.suppress(JournalError):
            self.flush()

    def flush(self) -> None:
        """Write everything buffered (raises JournalError; the buffer is kept for a retry)."""
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            # Cut what was half written so that the next write does not follow a torn record.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            self.failed = JournalError(self.path, exc)
            raise self.failed from exc
        self.failed = None
        self.size += len(data)
        self.written_lsn = self._buffer_lsns[-1]
        self._buffer.clear()
        self._buffer_lsns.clear()
        if self.policy is FsyncPolicy.ALWAYS:
            self._fsync_now()
        elif self.policy is FsyncPolicy.NEVER:
            self.synced_lsn = self.written_lsn
            self._wake()
        elif self._waiters:
            self._sync_wanted.set()

    def _fsync_now(self) -> None:
        started = time.perf_counter()
        os.fsync(self._fd)
        self._observe(time.perf_counter() - started)
        self.synced_lsn = self.written_lsn
        self._wake()

    def _observe(self, seconds: float) -> None:
        if self._observe_fsync is not None:
            self._observe_fsync(seconds)

    async def sync(self) -> None:
        """Return when every record appended so far is as durable as the policy makes it."""
        target = self.last_lsn
        self.flush()
        if self.synced_lsn >= target:
            return
        future = self._running_loop().create_future()
        self._waiters.append((target, future))
        self._sync_wanted.set()
        await future

    def _wake(self) -> None:
        if not self._waiters:
            return
        still = []
        for target, future in self._waiters:
            if target <= self.synced_lsn:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._waiters = still

    async def _sync_loop(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            try:
                await self._fsync_round()
            except OSError as exc:
                error = JournalError(self.path, exc)
                for _, future in self._waiters:
                    if not future.done():
                        future.set_exception(error)
                self._waiters = []

    async def _fsync_round(self) -> None:
        """fsync retired files and the current one; then everything written before is durable."""
        async with self._fd_lock:
            # Taken together: every record up to target is in one of these files.
            target, current, retired = self.written_lsn, self._fd, self._retired
            self._retired = []
            if target <= self.synced_lsn and not retired:
                self._wake()
                return
            loop = self._running_loop()
            started = time.perf_counter()
            for fd in retired:
                await loop.run_in_executor(self._fsync_thread, os.fsync, fd)
                os.close(fd)
            await loop.run_in_executor(self._fsync_thread, os.fsync, current)
            self._observe(time.perf_counter() - started)
            self.synced_lsn = max(self.synced_lsn, target)
            self._wake()

    async def rotate(self, generation: int) -> Path:
        """Go on in a new generation's file at once; return when the old one is on disk."""
        self.flush()
        # The switch is synchronous, so no record of this turn can land in the old file.
        old_path = self.path
        new_path = journal_path(self.directory, generation)
        new_fd = self._open(new_path)  # first: if it fails, nothing has changed
        self._retired.append(self._fd)
        self.generation, self.path, self._fd, self.size = generation, new_path, new_fd, 0
        fsync_directory(self.directory)
        await self._fsync_round()
        return old_path

    async def close(self) -> None:
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        self._fsync_thread.shutdown(wait=True)
        try:
            self.flush()
            for fd in self._retired:
                os.fsync(fd)
                os.close(fd)
            self._retired = []
            os.fsync(self._fd)
            self.synced_lsn = self.written_lsn
            self._wake()
        finally:
            os.close(self._fd)
