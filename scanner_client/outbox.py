"""What the scanner has to say to the handler, in order, waiting for the stream.

One gRPC message costs far more than its bytes, so the outbox merges what it can while the
stream is busy or within one event-loop moment: results that arrive while a ``Results`` message
is still waiting join it (up to a count and a size), and a job's newer progress replaces its
older progress that was not sent yet. A job's pending progress is dropped once its result or
failure is queued, so no message about a job ever follows its end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagehandler.v1 import common_pb2, scanner_service_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

MAX_BATCH_RESULTS = 500
# Well below gRPC's default 4 MiB message limit.
MAX_BATCH_BYTES = 1 << 20


@dataclass(eq=False, slots=True)
class _Item:
    # None for a progress report still waiting: its message is built when it is sent (most
    # are replaced or dropped before that).
    request: scanner_service_pb2.ConnectRequest | None
    dropped: bool = False
    size: int = 0
    # A waiting progress report: (job_id, stage, percent, message).
    progress: tuple[str, str, int, str] | None = None
    # A Results message's list and its length, kept here: reaching them through the message
    # costs more than the append itself.
    results: RepeatedCompositeFieldContainer[common_pb2.ScanResult] | None = None
    count: int = 0

    def message(self) -> scanner_service_pb2.ConnectRequest:
        if self.request is None:
            assert self.progress is not None
            job_id, stage, percent, text = self.progress
            self.request = scanner_service_pb2.ConnectRequest(
                progress=scanner_service_pb2.Progress(
                    job_id=job_id, stage=stage, percent=percent, message=text
                )
            )
        return self.request


class Outbox:
    def __init__(
        self, max_batch: int = MAX_BATCH_RESULTS, max_batch_bytes: int = MAX_BATCH_BYTES
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._items: deque[_Item] = deque()
        # The newest Results message still waiting: later results join it.
        self._open_batch: _Item | None = None
        # Each job's progress message still waiting.
        self._progress: dict[str, _Item] = {}
        self._nonempty = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # True while _idle is set or get() waits for _nonempty: only then must _append touch
        # the events (it runs a few times per job).
        self._wake = True
        self._in_flight = 0

    def __len__(self) -> int:
        return sum(1 for item in self._items if not item.dropped)

    def put(self, request: scanner_service_pb2.ConnectRequest) -> None:
        self._append(_Item(request))

    def progress(self, job_id: str, stage: str, percent: int, message: str = "") -> None:
        if percent < 0:
            percent = 0
        elif percent > 100:
            percent = 100
        item = self._progress.get(job_id)
        if item is not None:
            item.progress = (job_id, stage, percent, message)
            return
        item = _Item(None, progress=(job_id, stage, percent, message))
        self._progress[job_id] = item
        self._append(item)

    def result(self, result: common_pb2.ScanResult) -> None:
        self.forget(result.job_id)
        size = result.ByteSize()
        batch = self._open_batch
        if (
            batch is not None
            and batch.results is not None
            and batch.count < self._max_batch
            and batch.size + size <= self._max_batch_bytes
        ):
            batch.results.append(result)
            batch.count += 1
            batch.size += size
            return
        # Filled in place: nesting constructors copies each level once more.
        request = scanner_service_pb2.ConnectRequest()
        results = request.result.results
        results.append(result)
        batch = _Item(request, size=size, results=results, count=1)
        self._open_batch = batch
        self._append(batch)

    def failure(self, failure: scanner_service_pb2.Failure) -> None:
        self.forget(failure.job_id)
        self.put(scanner_service_pb2.ConnectRequest(failure=failure))

    def forget(self, job_id: str) -> None:
        """Drop the job's progress that was not sent yet."""
        item = self._progress.pop(job_id, None)
        if item is not None:
            item.dropped = True

    async def get(self) -> scanner_service_pb2.ConnectRequest:
        """The next message to write; call :meth:`written` once it is written."""
        while True:
            while not self._items:
                self._nonempty.clear()
                self._wake = True
                await self._nonempty.wait()
            item = self._items.popleft()
            if item is self._open_batch:
                self._open_batch = None
            if item.dropped:
                self._settle()
                continue
            if item.progress is not None:
                self._progress.pop(item.progress[0], None)
            self._in_flight += 1
            return item.message()

    def written(self) -> None:
        self._in_flight -= 1
        self._settle()

    async def wait_idle(self) -> None:
        """Until everything queued so far has been written."""
        await self._idle.wait()

    def _append(self, item: _Item) -> None:
        self._items.append(item)
        if self._wake:
            self._wake = False
            self._idle.clear()
            self._nonempty.set()

    def _settle(self) -> None:
        if not self._items and self._in_flight == 0:
            self._idle.set()
            self._wake = True
