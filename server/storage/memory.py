"""The job repository in memory: the tables, the indexes and the queue.

Every job lives here with its indexes (by id, by arrival, by object for deduplication, by
idempotency key) and, while PENDING, in the FIFO :class:`~server.scheduling.queue.JobQueue`.
Each change is also handed to a :class:`ChangeLog`: none here (nothing survives a restart), a
journal with snapshots in :class:`server.storage.embedded.EmbeddedRepository`. The operations
answer without suspending, so the event loop's one-turn batching (one dispatch pass, one
journal record of moves per turn) works as before.
"""

from __future__ import annotations

import asyncio
import heapq
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from itertools import compress, islice
from typing import Any, Protocol

from sortedcontainers import SortedDict

from imagehandler.v1 import common_pb2, job_service_pb2
from server import mapping
from server.core import state_machine
from server.core.ids import new_job_id
from server.core.model import Job, JobFailure, JobSpec, JobStatus, Lane, Transition
from server.scheduling.queue import JobQueue
from server.storage.repository import (
    INLINE_RESULT_BYTES,
    RESULT_RECEIVED,
    RESULTS_STORED,
    Claimed,
    Counts,
    Demand,
    Inserted,
    JobFilter,
    Lend,
    Moved,
    Recovered,
    queue_full,
)
from server.storage.result_files import MemoryResultFiles, ResultFiles


class ChangeLog(Protocol):
    """What the tables tell their durable copy, change by change (the embedded journal)."""

    def created(self, job: Job, message: common_pb2.Job | None = None) -> None: ...
    def moved(
        self,
        job: Job,
        transition: Transition,
        *,
        result: common_pb2.ScanResult | None = None,
        summary: common_pb2.ResultSummary | None = None,
    ) -> None: ...
    def pruned(self, job_ids: Sequence[str]) -> None: ...
    def delivered(self, job: Job) -> None: ...
    def risk_accepted(self, acceptance: job_service_pb2.RiskAcceptance) -> None: ...
    def risk_removed(self, acceptance_id: str) -> None: ...
    def verdict_changed(self, job: Job) -> None: ...
    def flush(self) -> None: ...
    def mark(self) -> int: ...
    def discard_since(self, mark: int) -> None: ...
    async def sync(self) -> None: ...


class NoLog:
    """Keeps nothing."""

    def created(self, job: Job, message: common_pb2.Job | None = None) -> None:
        pass

    def moved(
        self,
        job: Job,
        transition: Transition,
        *,
        result: common_pb2.ScanResult | None = None,
        summary: common_pb2.ResultSummary | None = None,
    ) -> None:
        pass

    def pruned(self, job_ids: Sequence[str]) -> None:
        pass

    def delivered(self, job: Job) -> None:
        pass

    def risk_accepted(self, acceptance: job_service_pb2.RiskAcceptance) -> None:
        pass

    def risk_removed(self, acceptance_id: str) -> None:
        pass

    def verdict_changed(self, job: Job) -> None:
        pass

    def flush(self) -> None:
        pass

    def mark(self) -> int:
        return 0

    def discard_since(self, mark: int) -> None:
        pass

    async def sync(self) -> None:
        pass


# Recovery's passes over every job, each a C call per job (see MemoryRepository.load).
_SEQ = operator.attrgetter("seq")
_ID = operator.attrgetter("id")
_STATUS = operator.attrgetter("status")
_KEY = operator.attrgetter("key")
_IDEMPOTENCY_KEY = operator.attrgetter("spec.idempotency_key")

_IN_PROGRESS = frozenset({JobStatus.IN_PROGRESS})


class MemoryRepository:
    """The job repository in memory. With ``log`` every change is also journaled."""

    shared = False  # its calls answer without waiting on I/O

    def __init__(
        self,
        *,
        interactive_share: float = 0.8,
        log: ChangeLog | None = None,
        result_files: ResultFiles | None = None,
    ) -> None:
        self.log: ChangeLog = log if log is not None else NoLog()
        self.result_files = result_files if result_files is not None else MemoryResultFiles()
        self.jobs: dict[str, Job] = {}
        self._by_seq: SortedDict[int, Job] = SortedDict()
        self._next_seq = 1
        self._active_by_key: dict[tuple[Any, ...], Job] = {}
        # The FINISHED job of each key that finished last (latest_finished).
        self._finished_by_key: dict[tuple[Any, ...], Job] = {}
        self._by_idempotency_key: dict[str, Job] = {}
        self._status_counts: Counter[JobStatus] = Counter()
        # Ended jobs (FINISHED, ERROR, CANCELLED) as a heap by finish time: retention takes
        # them from the top, so a sweep costs what it prunes, not a walk over every job.
        self._ended: list[tuple[datetime, int, Job]] = []
        self.queue = JobQueue(interactive_share)
        self._acceptances: dict[str, job_service_pb2.RiskAcceptance] = {}

    # ----- life cycle ------------------------------------------------------------------------

    async def open(self) -> Recovered:
        return Recovered()

    async def close(self) -> None:
        pass

    async def commit(self) -> None:
        await self.log.sync()

    def flush(self) -> None:
        self.log.flush()

    async def maintain(self) -> None:
        pass

    def claim_with_inserts(self, lend: Lend, hand: Callable[[list[Claimed]], None]) -> None:
        pass  # a claim here costs no round trip: dispatch claims after the insert

    def subscribe(
        self,
        *,
        work: Callable[[], None],
        moved: Callable[[Job, Transition], None],
        listened: Callable[[str], bool],
        held: Callable[[], Iterable[str]],
    ) -> None:
        pass  # only this process changes these tables

    async def expired(self, *, at: datetime) -> list[Job]:
        return []  # no other replica holds runs here

    def on_acceptances(self, changed: Callable[[], None]) -> None:
        pass  # only this process changes them

    async def orphaned_deliveries(self) -> list[str]:
        return []  # a restart owes again what this process owed (the handler's recovery)

    def load(
        self,
        jobs: dict[str, Job],
        next_seq: int,
        acceptances: dict[str, job_service_pb2.RiskAcceptance],
    ) -> Recovered:
        """Rebuild the tables and the queue from recovered jobs (the embedded store's
        recovery); what was under way is listed for the service to end."""
        self._next_seq = max(self._next_seq, next_seq)
        out = Recovered(jobs=len(jobs))
        # In bulk: a million recovered jobs go into each table with one call, not one each,
        # and each pass over them runs in C (map over an attrgetter, compress), not a Python
        # line per job.
        ordered = list(jobs.values())
        seqs = list(map(_SEQ, ordered))
        if all(map(operator.lt, seqs, islice(seqs, 1, None))):  # recovery gives them sorted
            # Into an empty table the dict is copied whole (its hash table cloned), not
            # inserted a job at a time.
            self.jobs.update(jobs)
        else:
            ordered.sort(key=_SEQ)
            seqs = list(map(_SEQ, ordered))
            self.jobs.update(zip(map(_ID, ordered), ordered, strict=True))
        statuses = list(map(_STATUS, ordered))
        self._by_seq.update(zip(seqs, ordered, strict=True))
        self._status_counts.update(statuses)
        idempotency_keys = list(map(_IDEMPOTENCY_KEY, ordered))
        if any(idempotency_keys):
            self._by_idempotency_key.update(
                compress(zip(idempotency_keys, ordered, strict=True), idempotency_keys)
            )
        active = frozenset(status for status in JobStatus if status.active)
        self._active_by_key.update(
            compress(
                zip(map(_KEY, ordered), ordered, strict=True), map(active.__contains__, statuses)
            )
        )
        self.queue.push_many(compress(ordered, map(JobStatus.PENDING.__eq__, statuses)))
        under_way = frozenset((JobStatus.IN_PROGRESS, JobStatus.PROCESSING_RESULTS))
        out.interrupted += compress(ordered, map(under_way.__contains__, statuses))
        for job in compress(ordered, map(JobStatus.FINISHED.__eq__, statuses)):
            self._finished(job)
        ended = frozenset(status for status in JobStatus if status.terminal)
        self._ended.extend(
            (job.finished_at, job.seq, job)
            for job in compress(ordered, map(ended.__contains__, statuses))
            if job.finished_at is not None  # no finish time to judge by: kept
        )
        heapq.heapify(self._ended)
        self._acceptances = dict(acceptances)
        return out

    # ----- jobs ------------------------------------------------------------------------------

    async def insert_many(
        self, specs: Sequence[JobSpec], *, at: datetime, queue_limit: int = 0
    ) -> list[Inserted]:
        # Decide duplicates first so the queue limit counts only jobs that would be new.
        keys = [spec.dedup_key() for spec in specs]
        existing = [self._existing(spec, key) for spec, key in zip(specs, keys, strict=True)]
        fresh = sum(1 for job in existing if job is None)
        if queue_limit and fresh and len(self.queue) + fresh > queue_limit:
            raise queue_full(queue_limit, len(self.queue), fresh)
        out: list[Inserted] = []
        created: list[Job] = []
        mark = self.log.mark()
        for spec, key, found in zip(specs, keys, existing, strict=True):
            if found is None:
                # A batch may repeat an object: the second copy is a duplicate of the first.
                found = self._existing(spec, key)
            if found is not None:
                out.append(Inserted(found, duplicate=True))
                continue
            job, message = self._create(spec, at)
            created.append(job)
            out.append(Inserted(job, duplicate=False, message=message))
        try:
            self.log.flush()
        except Exception:
            self.log.discard_since(mark)
            for job in created:
                self._forget(job)
                self.queue.remove(job)
            raise
        return out

    def _existing(self, spec: JobSpec, key: tuple[Any, ...]) -> Job | None:
        if spec.idempotency_key:
            job = self._by_idempotency_key.get(spec.idempotency_key)
            if job is not None:
                return job
        job = self._active_by_key.get(key)
        if job is not None and job.status.active:
            return job
        return None

    def _create(self, spec: JobSpec, at: datetime) -> tuple[Job, common_pb2.Job]:
        job = Job(id=new_job_id(), seq=self._next_seq, spec=spec, created_at=at)
        self._next_seq += 1
        self.jobs[job.id] = job
        self._by_seq[job.seq] = job
        self._active_by_key[job.key] = job
        if spec.idempotency_key:
            self._by_idempotency_key[spec.idempotency_key] = job
        self.queue.push(job)
        state_machine.record_creation(job, at)
        self._status_counts[JobStatus.PENDING] += 1
        # The reply's message, built once: the journal record copies it.
        message = mapping.job_to_proto(job, position=self.queue.position(job))
        self.log.created(job, message)
        return job, message

    def _forget(self, job: Job) -> None:
        """Remove a job from every index (a failed insert, or retention)."""
        self.jobs.pop(job.id, None)
        self._by_seq.pop(job.seq, None)
        self._status_counts[job.status] -= 1
        if self._active_by_key.get(job.key) is job:
            del self._active_by_key[job.key]
        if self._by_idempotency_key.get(job.spec.idempotency_key) is job:
            del self._by_idempotency_key[job.spec.idempotency_key]
        # Retention forgets a key's older FINISHED jobs with (or before) its newest one, so no
        # other job of the key is left to take its place.
        if self._finished_by_key.get(job.key) is job:
            del self._finished_by_key[job.key]

    def _finished(self, job: Job) -> None:
        current = self._finished_by_key.get(job.key)
        if (
            current is None
            or current.finished_at is None
            or (
                job.finished_at is not None
                and (job.finished_at, job.seq) >= (current.finished_at, current.seq)
            )
        ):
            self._finished_by_key[job.key] = job

    async def latest_finished(self, key: tuple[Any, ...]) -> Job | None:
        return self._finished_by_key.get(key)

    async def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    async def page(
        self, where: JobFilter, after_seq: int, size: int
    ) -> tuple[list[Job], int | None]:
        page: list[Job] = []
        by_seq = self._by_seq
        for seq in by_seq.irange(minimum=after_seq, inclusive=(False, True)):
            job = by_seq[seq]
            if not where.matches(job):
                continue
            if len(page) == size:
                return page, page[-1].seq
            page.append(job)
        return page, None

    async def counts(self) -> Counts:
        queue = self.queue
        return Counts(
            by_status=dict(self._status_counts),
            pending_by_lane={lane: queue.lane_size(lane) for lane in Lane},
            oldest_pending={
                lane: (job.created_at if (job := queue.oldest(lane)) else None) for lane in Lane
            },
        )

    def counts_now(self) -> Counts:
        """:meth:`counts` for readers that cannot await (metrics at scrape time)."""
        coroutine = self.counts()
        try:
            coroutine.send(None)
        except StopIteration as done:
            counts: Counts = done.value
            return counts
        raise RuntimeError("MemoryRepository.counts suspended")  # it never does

    async def positions(self, jobs: Sequence[Job]) -> list[int]:
        return [self.position_hint(job) for job in jobs]

    def position_hint(self, job: Job) -> int:
        return self.queue.position(job) if job.status is JobStatus.PENDING else 0

    def pending_hint(self) -> int | None:
        return len(self.queue)

    async def select(self, statuses: frozenset[JobStatus]) -> list[Job]:
        return [job for job in self._by_seq.values() if job.status in statuses]

    # ----- runs ------------------------------------------------------------------------------

    async def claim(self, demands: Sequence[Demand], *, at: datetime) -> list[Claimed]:
        """One job per demand per pass, in the demands' order, until the demands are full or
        nothing queued fits; a pass reads demands a few at a time (no more than there are
        jobs), so its cost follows the jobs handed out, not the number of demands."""
        out: list[Claimed] = []
        queue = self.queue
        room = [demand.slots for demand in demands]
        live = [i for i, slots in enumerate(room) if slots > 0]
        while queue and live:
            took: list[int] = []
            for index in live:
                if not queue:
                    break
                demand = demands[index]
                job = queue.pop_for(demand.kinds)
                if job is None:
                    continue
                out.append(Claimed(index, self._moved(job, JobStatus.IN_PROGRESS, at, "assigned",
                                                      scanner_id=demand.scanner_id)))  # fmt: skip
                room[index] -= 1
                took.append(index)
            if not took:
                break
            live = [i for i in took if room[i] > 0]
        return out

    async def move(
        self,
        job_id: str,
        to_status: JobStatus,
        *,
        expect: frozenset[JobStatus],
        run: int = 0,
        at: datetime,
        reason: str,
        scanner_id: str = "",
        error: JobFailure | None = None,
        result: Any = None,
        summary: Any = None,
    ) -> Moved | None:
        job = self.jobs.get(job_id)
        if job is None or job.status not in expect or (run and job.runs != run):
            return None
        if job.status is JobStatus.PENDING:
            self.queue.remove(job)
        moved = self._moved(
            job, to_status, at, reason, scanner_id=scanner_id, error=error, result=result,
            summary=summary,
        )  # fmt: skip
        if to_status is JobStatus.PENDING:
            self.queue.push(job)
        return moved

    async def settle(
        self,
        job_id: str,
        *,
        run: int,
        result: Any,
        received_at: datetime,
        summary: Any,
        stored_at: datetime,
    ) -> list[Moved]:
        received = await self.move(
            job_id, JobStatus.PROCESSING_RESULTS, expect=_IN_PROGRESS, run=run, at=received_at,
            reason=RESULT_RECEIVED, result=result,
        )  # fmt: skip
        if received is None:
            return []
        job = received.job
        received = Moved(job.copy(), received.transition)  # its event shows the job then
        stored = self._moved(job, JobStatus.FINISHED, stored_at, RESULTS_STORED, summary=summary)
        return [received, stored]

    def _moved(
        self,
        job: Job,
        to_status: JobStatus,
        at: datetime,
        reason: str,
        *,
        scanner_id: str = "",
        error: JobFailure | None = None,
        result: Any = None,
        summary: Any = None,
    ) -> Moved:
        """The one place the tables change a job's status."""
        from_status = job.status
        transition = state_machine.move(
            job, to_status, at=at, reason=reason, scanner_id=scanner_id, error=error
        )
        if result is not None:
            job.result = result
        if summary is not None:
            job.result_summary = summary
        # A result is journaled with its move while small; a large one is written apart.
        inline = result if result is not None and result.ByteSize() <= INLINE_RESULT_BYTES else None
        self.log.moved(job, transition, result=inline, summary=summary)
        self._status_counts[from_status] -= 1
        self._status_counts[to_status] += 1
        if not to_status.active and self._active_by_key.get(job.key) is job:
            del self._active_by_key[job.key]
        if to_status is JobStatus.FINISHED:
            self._finished(job)
        if to_status.terminal and job.finished_at is not None:
            heapq.heappush(self._ended, (job.finished_at, job.seq, job))
        return Moved(job, transition)

    # ----- results, deliveries, verdicts, acceptances ----------------------------------------

    def write_result(self, job_id: str, payload: bytes) -> None:
        self.result_files.write(job_id, payload)

    def read_result(self, job_id: str) -> bytes | None:
        return self.result_files.read(job_id)

    async def acknowledge(self, job: Job) -> None:
        self.log.delivered(job)

    async def verdict_changed(self, job: Job) -> None:
        self.log.verdict_changed(job)

    async def add_acceptance(self, record: job_service_pb2.RiskAcceptance) -> None:
        self._acceptances[record.id] = record
        self.log.risk_accepted(record)

    async def remove_acceptance(self, acceptance_id: str) -> None:
        if self._acceptances.pop(acceptance_id, None) is not None:
            self.log.risk_removed(acceptance_id)

    async def acceptances(self) -> list[job_service_pb2.RiskAcceptance]:
        return list(self._acceptances.values())

    async def prune(self, before: datetime) -> list[str]:
        old: list[Job] = []
        ended = self._ended
        while ended and ended[0][0] < before:
            job = heapq.heappop(ended)[2]
            if self.jobs.get(job.id) is job:  # not forgotten already
                old.append(job)
        if not old:
            return []
        ids = [job.id for job in old]
        self.log.pruned(ids)
        files = [job.id for job in old if job.result_in_file]
        for job in old:
            self._forget(job)
        if files:
            await asyncio.to_thread(self._delete_results, files)
        return ids

    def _delete_results(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.result_files.delete(job_id)

    def snapshot_state(
        self,
    ) -> tuple[list[Job], int, list[job_service_pb2.RiskAcceptance]]:
        """What a snapshot holds, taken in one loop turn."""
        return list(self.jobs.values()), self._next_seq, list(self._acceptances.values())
