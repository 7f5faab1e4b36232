"""The one storage interface: the job repository, named for the queue's own operations.

The service layer asks the repository to insert jobs (deduplicated inside), claim PENDING jobs
for Free scanners, move a job from the status it expects (a compare-and-set that counts runs
through :func:`server.core.state_machine.move`), read, page and count jobs, keep results,
acknowledgements and risk acceptances, prune, and make all of it durable (``commit``). Every
backend implements it and passes one contract suite (``tests/contract/``):

- :class:`server.storage.memory.MemoryRepository` keeps everything in memory, honestly (a
  restart loses it);
- :class:`server.storage.embedded.EmbeddedRepository` is the same tables with a journal and
  snapshots in a data directory (the default);
- a shared database (PostgreSQL) implements the same verbs for several handler replicas.

Jobs a repository returns are the repository's view at that moment. A move that finds the job
no longer in the expected status (another move won) returns None and changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import common_pb2, job_service_pb2
from server.core.model import (
    Job,
    JobFailure,
    JobSpec,
    JobStatus,
    Lane,
    ObjectKind,
    Transition,
    Trigger,
)

# A result up to this size is kept with its job's move to PROCESSING_RESULTS; a larger one the
# result workers keep apart with ``write_result`` (a crash before that runs the job again).
INLINE_RESULT_BYTES = 64 * 1024
# The reasons of a result's two moves, as its history shows them (settle() writes both).
RESULT_RECEIVED = "result received"
RESULTS_STORED = "results stored"


class StorageError(HandlerError):
    """The store cannot do what was asked (a damaged file, a full disk, a lost database)."""

    def __init__(self, detail: str) -> None:
        super().__init__(Catalogue.SYSTEM_ERROR, detail)


# Named tuples, not frozen dataclasses: several are made for every job, and a frozen
# dataclass's __init__ costs several times as much.


class Inserted(NamedTuple):
    job: Job
    duplicate: bool  # the job existed already (same idempotency key, or the same object)
    # A new job as it was queued, already built as the reply shows it (the embedded store
    # builds it for its journal record anyway); None for a duplicate.
    message: common_pb2.Job | None = None


class Moved(NamedTuple):
    """A job after a move, and the move (the history entry it added)."""

    job: Job
    transition: Transition


class Demand(NamedTuple):
    """A Free scanner asking for work: which kinds it scans and how many jobs it can take."""

    scanner_id: str
    kinds: frozenset[ObjectKind]
    slots: int


# The Free scanners' demands lent to a batch of inserts (see claim_with_inserts).
Lend = Callable[[], Awaitable[Sequence[Demand]]]


class Claimed(NamedTuple):
    """One job handed to ``demands[demand]``, in the order the jobs were handed."""

    demand: int
    moved: Moved


@dataclass(frozen=True)
class JobFilter:
    statuses: frozenset[JobStatus] = frozenset()
    kinds: frozenset[ObjectKind] = frozenset()
    triggers: frozenset[Trigger] = frozenset()

    def matches(self, job: Job) -> bool:
        if self.statuses and job.status not in self.statuses:
            return False
        if self.kinds and job.kind not in self.kinds:
            return False
        return not self.triggers or job.spec.trigger in self.triggers


@dataclass(frozen=True)
class Counts:
    by_status: dict[JobStatus, int]
    pending_by_lane: dict[Lane, int]
    oldest_pending: dict[Lane, datetime | None]

    @property
    def pending(self) -> int:
        return sum(self.pending_by_lane.values())


@dataclass
class Recovered:
    """What a repository found when it opened: the service ends the runs a restart cut short
    and re-sends what was not delivered."""

    jobs: int = 0
    interrupted: list[Job] = field(default_factory=list)  # IN_PROGRESS or PROCESSING_RESULTS
    records_replayed: int = 0
    torn_bytes_cut: int = 0
    lost: list[str] = field(default_factory=list)  # what salvage could not read
    seconds: float = 0.0


class JobRepository(Protocol):
    # True when calls wait on a network (a shared database): the service then runs the moves
    # of one scanner message, or of one batch of results, together instead of one by one.
    shared: bool

    # ----- life cycle ------------------------------------------------------------------------

    async def open(self) -> Recovered:
        """Lock, recover or connect; nothing else may be called before it."""
        ...

    async def close(self) -> None:
        """Make everything durable (a last snapshot where the backend has them) and let go."""
        ...

    async def commit(self) -> None:
        """The durability barrier: return once every change made so far survives a crash
        (and, with the embedded store's fsync policies, a power loss)."""
        ...

    def flush(self) -> None:
        """Hand every change made so far to the store before anyone is told of it (a crash
        then replays it). Cheap; called before every message to a scanner or watcher."""
        ...

    async def maintain(self) -> None:
        """Periodic upkeep the backend needs (snapshots, leases); called about twice a second."""
        ...

    def claim_with_inserts(self, lend: Lend, hand: Callable[[list[Claimed]], None]) -> None:
        """A store whose claim is a round trip of its own may claim in the transaction of a
        batch of inserts (one commit, and no second round trip before a new job is on its
        way to a scanner): as the batch starts it awaits ``lend()`` for the Free scanners'
        demands (it may wait for a dispatch pass to end), and after it, once for every
        non-empty loan, ``hand(claimed)`` with what they took (nothing if the batch failed).
        A store that claims in memory ignores it."""
        ...

    # ----- other replicas (a store only this process changes calls nothing) ------------------

    def subscribe(
        self,
        *,
        work: Callable[[], None],
        moved: Callable[[Job, Transition], None],
        listened: Callable[[str], bool],
        held: Callable[[], Iterable[str]],
    ) -> None:
        """Be told of other replicas' changes: ``work()`` when they queue a job or give one
        back (dispatch), ``moved(job, transition)`` for each of their moves of a job that
        ``listened(job_id)`` (someone watches, or this replica runs it). ``held()``: the
        jobs whose runs this replica holds now (their leases are renewed)."""
        ...

    async def expired(self, *, at: datetime) -> list[Job]:
        """Runs (IN_PROGRESS, PROCESSING_RESULTS) whose replica stopped renewing its lease,
        now held by this one: the service ends them like a restart's interrupted runs."""
        ...

    def on_acceptances(self, changed: Callable[[], None]) -> None:
        """Call ``changed()`` when another replica added or removed a risk acceptance."""
        ...

    async def orphaned_deliveries(self) -> list[str]:
        """Ids of jobs whose deliveries a dead replica owed, now owed by this one (the
        delivery outbox sends them). Cheap to call often: the store paces its own checks."""
        ...

    # ----- jobs ------------------------------------------------------------------------------

    async def insert_many(
        self, specs: Sequence[JobSpec], *, at: datetime, queue_limit: int = 0
    ) -> list[Inserted]:
        """Queue new jobs, or return the job that already exists for a spec (the same
        idempotency key; the same object and policies while PENDING or IN_PROGRESS). Past
        ``queue_limit`` PENDING jobs (0: none) nothing is queued (HNDL-007 EXHAUSTED); a
        storage failure queues nothing either."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def page(
        self, where: JobFilter, after_seq: int, size: int
    ) -> tuple[list[Job], int | None]:
        """Jobs in arrival order after ``after_seq``; the cursor of the next page or None."""
        ...

    async def counts(self) -> Counts: ...

    async def positions(self, jobs: Sequence[Job]) -> list[int]:
        """Each job's 1-based place in its lane as the store has it now (0 for a job that is
        not PENDING), in one request however many jobs are asked."""
        ...

    def position_hint(self, job: Job) -> int:
        """:meth:`position` when the store knows it without I/O (for messages built inside a
        transition); 0 when only a query could tell."""
        ...

    def pending_hint(self) -> int | None:
        """How many jobs are PENDING, when the store knows it without I/O; None when only a
        query could tell (a shared store). Dispatch asks only as many Free scanners as there
        are jobs, so a pass costs what it hands out, not the number of idle scanners."""
        ...

    async def select(self, statuses: frozenset[JobStatus]) -> list[Job]:
        """Every job in these statuses, in arrival order."""
        ...

    async def latest_finished(self, key: tuple[Any, ...]) -> Job | None:
        """The FINISHED job of ``key`` (:meth:`JobSpec.dedup_key`: the object and the
        policies) that finished last (the later arrival on a tie), or None. Its result, and the
        SBOM in it, is read as any job's (``job.result``, or :meth:`read_result` when
        ``result_in_file``): this is the latest good scan of that object, kept as long as
        results are (:meth:`prune`). Reuse by digest and rematches ask for it. A SQL backend
        answers it from an index on (key, finished_at) over FINISHED jobs."""
        ...

    # ----- runs ------------------------------------------------------------------------------

    async def claim(self, demands: Sequence[Demand], *, at: datetime) -> list[Claimed]:
        """Hand PENDING jobs to Free scanners: FIFO per lane with the interactive lane's
        bounded share, one job per demand per pass in the demands' order until they are full
        or nothing fits. Each job moves to IN_PROGRESS (its run counts)."""
        ...

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
        """Move the job if it is in one of ``expect`` (and, when ``run`` is given, in that
        run); None otherwise. A move to PENDING puts the job back at its place in the queue.
        ``result`` (a ScanResult) is kept with a move to PROCESSING_RESULTS, ``summary`` (a
        ResultSummary) with a move to FINISHED or ERROR."""
        ...

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
        """A result processed as it arrived: the job, IN_PROGRESS in ``run``, moves to
        PROCESSING_RESULTS with ``result`` and on to FINISHED with ``summary`` in one write
        (both history entries; one row version instead of two on a database). The moves made,
        in order: both, or none when the job is not in that run any more."""
        ...

    # ----- results, deliveries, verdicts, acceptances ----------------------------------------

    def write_result(self, job_id: str, payload: bytes) -> None:
        """Keep a large result outside the job (thread-safe: a result worker's thread calls
        it)."""
        ...

    def read_result(self, job_id: str) -> bytes | None:
        """A result kept with :meth:`write_result` (thread-safe)."""
        ...

    async def acknowledge(self, job: Job) -> None:
        """The receiving server took the job's history up to ``job.delivered`` and its verdict
        changes up to ``job.verdict_delivered``."""
        ...

    async def verdict_changed(self, job: Job) -> None:
        """The job's summary and ``verdict_version`` changed (a risk acceptance)."""
        ...

    async def add_acceptance(self, record: job_service_pb2.RiskAcceptance) -> None: ...

    async def remove_acceptance(self, acceptance_id: str) -> None: ...

    async def acceptances(self) -> list[job_service_pb2.RiskAcceptance]: ...

    async def prune(self, before: datetime) -> list[str]:
        """Forget FINISHED, ERROR and CANCELLED jobs that ended before ``before``; their ids."""
        ...


def queue_full(limit: int, pending: int, fresh: int) -> HandlerError:
    return HandlerError(
        Catalogue.SYSTEM_ERROR,
        f"queue full (limit {limit}): {pending} pending, {fresh} more asked; retry later or "
        "raise --queue-limit",
        reason=Reason.EXHAUSTED,
    )
