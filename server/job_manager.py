"""The job manager: owns the jobs, the queue, the scanner sessions and the timers.

It runs on one asyncio loop and knows nothing of gRPC: the transport calls it with domain
objects and implements the callbacks through which it talks to scanners. Every status change
goes through :func:`server.core.state_machine.move` via :meth:`JobManager._move`, which also keeps
the indexes, publishes the event and logs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sortedcontainers import SortedDict

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import common_pb2, job_service_pb2, result_sink_pb2
from server import logs, mapping
from server.config import Config
from server.core import state_machine
from server.core.ids import new_job_id
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
from server.core.retry import RetryPolicy, RunFailure
from server.core.verdicts import (
    Acceptance,
    Acceptances,
    Change,
    Scope,
    Severity,
    VerdictPolicy,
    scope_target,
)
from server.delivery import Delivery, Kind, Outbox, Receiver
from server.events import EventBus, Subscription
from server.metrics import DELIVERIES_FAILED
from server.results import INLINE_RESULT_BYTES, Processed, ResultPipeline
from server.scanners import (
    AssignJobs,
    CancelRun,
    Database,
    DrainScanner,
    RejectMessage,
    ScannerMessage,
    ScannerProfile,
    ScannerRegistry,
    ScannerSession,
)
from server.scheduling.dispatcher import Dispatcher
from server.scheduling.queue import JobQueue
from server.scheduling.timers import BucketTimers
from server.service.summaries import apply_acceptances
from server.storage.result_files import MemoryResultFiles, ResultFiles
from server.storage.store import JobStore, MemoryStore, Recovered

log = structlog.get_logger("imagehandler")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def now_utc() -> datetime:
    return datetime.now(UTC)


def failure_of(error: HandlerError) -> JobFailure:
    return JobFailure(error.code, error.message, error.detail)


@dataclass(frozen=True, slots=True)
class Submitted:
    job: Job
    duplicate: bool  # the job existed already (same idempotency key or object)
    # A new job's reply message (built once, with its journal record); None for a duplicate.
    message: common_pb2.Job | None = None


@dataclass(frozen=True)
class Reevaluated:
    """FINISHED jobs whose verdict changed, and those whose accepted findings changed while
    their verdict stayed."""

    verdicts: int
    summaries: int


@dataclass(frozen=True)
class QueueStats:
    by_status: dict[JobStatus, int]
    pending_by_lane: dict[Lane, int]
    oldest_pending: dict[Lane, datetime | None]
    scanners_connected: int
    scanners_free: int
    scanners_busy: int
    free_slots: int
    started_at: datetime
    queue_limit: int
    result_backlog: int
    deliveries_owed: int
    deliveries_oldest_age: float


class JobManager:
    def __init__(
        self,
        config: Config,
        store: JobStore | None = None,
        *,
        result_files: ResultFiles | None = None,
        receiver: Receiver | None = None,
    ) -> None:
        self.config = config
        self.store: JobStore = store if store is not None else MemoryStore()
        # False until recovery has rebuilt the queue: until then every call is refused.
        self.recovered = False
        self.jobs: dict[str, Job] = {}
        self._by_seq: SortedDict[int, Job] = SortedDict()
        self._next_seq = 1
        self._active_by_key: dict[tuple[Any, ...], Job] = {}
        self._by_idempotency_key: dict[str, Job] = {}
        self.status_counts: Counter[JobStatus] = Counter()
        self.queue = JobQueue(config.interactive_share)
        self.scanners = ScannerRegistry()
        self.dispatcher = Dispatcher(self.queue)
        self.events = EventBus(
            log_bytes=config.watch_log_bytes,
            lag_bytes=config.watch_lag_bytes,
            resume_seconds=config.watch_resume_seconds,
        )
        self.retry = RetryPolicy(config.max_runs)
        self.policy = VerdictPolicy(
            fail_severity=Severity[config.fail_severity.upper()],
            fail_on_malware=config.fail_on_malware,
            fail_on_secrets=config.fail_on_secrets,
        )
        self.acceptances = Acceptances()
        self._acceptance_records: dict[str, job_service_pb2.RiskAcceptance] = {}
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        self.result_files = result_files if result_files is not None else MemoryResultFiles()
        self.results = ResultPipeline(
            config.result_workers,
            self.policy,
            self.result_files,
            self._prepare_result,
            self._finish_result,
        )
        # Jobs in PROCESSING_RESULTS (with a result worker, or waiting on delivery).
        self._processing: dict[str, Job] = {}
        self.deliverer: Outbox | None = None
        if receiver is not None:
            self.deliverer = Outbox(
                receiver,
                self,
                senders=config.delivery_concurrency,
                backoff=config.delivery_backoff,
                max_backoff=config.delivery_max_backoff,
                on_failure=DELIVERIES_FAILED.inc,
            )
        self._run_timers: BucketTimers[Job] = BucketTimers(lambda: self.loop, self._on_run_timer)
        self._watchdogs: dict[str, asyncio.TimerHandle] = {}
        self._dispatch_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepting_submits = True
        self.started_at = now_utc()

    # ----- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.results.start()
        if self.deliverer is not None:
            self.deliverer.start()

    def restore(self, state: Recovered) -> None:
        """Rebuild the queue from recovered jobs; runs that were under way count and end."""
        self._next_seq = max(self._next_seq, state.next_seq)
        interrupted: list[Job] = []
        for job in sorted(state.jobs.values(), key=lambda j: j.seq):
            self.jobs[job.id] = job
            self._by_seq[job.seq] = job
            self.status_counts[job.status] += 1
            if job.spec.idempotency_key:
                self._by_idempotency_key[job.spec.idempotency_key] = job
            if job.status.active:
                self._active_by_key[job.key] = job
            if job.status is JobStatus.PENDING:
                self.queue.push(job)
            elif job.status in (JobStatus.IN_PROGRESS, JobStatus.PROCESSING_RESULTS):
                interrupted.append(job)
            if job.status is JobStatus.PROCESSING_RESULTS:
                self._processing[job.id] = job
        for record in state.acceptances.values():
            self._add_acceptance(record)
        for job in interrupted:
            if job.status is JobStatus.PROCESSING_RESULTS:
                if job.result is not None or job.result_in_file:
                    self.results.submit(job)  # its result was stored: process it again
                    continue
                # A large result was not yet in its file when the handler stopped: run again.
                failure = RunFailure(
                    Catalogue.SYSTEM_ERROR,
                    f"the handler restarted before run {job.runs}'s result was stored",
                )
                self._end_run(job, None, failure)
                continue
            failure = RunFailure(
                Catalogue.SYSTEM_ERROR,
                f"the handler restarted during run {job.runs} on scanner {job.scanner_id}",
            )
            self._end_run(job, None, failure)
        if self.deliverer is not None:
            for job in self._by_seq.values():
                if job.delivered < len(job.history) or job.verdict_delivered < job.verdict_version:
                    self.deliverer.owe(job.id)
        self.expire_acceptances()
        self.recovered = True
        self.request_dispatch()

    # ----- housekeeping: snapshots, retention, graceful drain ------------------------

    async def housekeeping(self) -> None:
        """Snapshots by time and journal size; retention sweeps. Runs until cancelled."""
        loop = self.loop
        next_snapshot = loop.time() + self.config.snapshot_interval
        next_prune = loop.time()
        while True:
            now = loop.time()
            if self.store.wants_snapshot() or now >= next_snapshot:
                await self.snapshot()
                next_snapshot = loop.time() + self.config.snapshot_interval
            if now >= next_prune:
                self.prune(now_utc())
                next_prune = now + self.config.prune_interval
            await asyncio.sleep(0.5)  # a pacing tick for these checks, not a wait for state

    async def snapshot(self) -> bool:
        """Write a snapshot; False (and logged) when it could not be written: the journal
        still holds everything, so this costs only a longer recovery."""
        try:
            # The list is taken in the same loop turn as the journal switch inside the store.
            await self.store.snapshot(
                list(self.jobs.values()), self._next_seq, self.acceptance_records()
            )
        except (OSError, HandlerError) as exc:
            log.error("snapshot.failed", error=str(exc))
            return False
        return True

    def prune(self, now: datetime) -> int:
        """Forget FINISHED, ERROR and CANCELLED jobs older than the retention period."""
        cutoff = now - timedelta(days=self.config.retention_days)
        old = [
            job
            for job in self._by_seq.values()
            if job.status.terminal and job.finished_at is not None and job.finished_at < cutoff
        ]
        if not old:
            return 0
        self.store.pruned([job.id for job in old])
        for job in old:
            self._forget(job)
            if job.result_in_file:
                self.result_files.delete(job.id)
        log.info("jobs.pruned", count=len(old), older_than=cutoff.isoformat())
        return len(old)

    async def drain(self, grace: float) -> bool:
        """Take no new work, let running runs and results finish for up to ``grace`` seconds.
        True when everything finished in time."""
        self.accepting_submits = False
        for session in self.scanners.connected():
            if not session.draining:
                self.drain_scanner(session)
                session.send(DrainScanner())
        changed = asyncio.Event()
        listener = Subscription(lambda job, transition: changed.set())
        self.events.subscribe(listener)
        try:
            async with asyncio.timeout(grace):
                while self.status_counts[JobStatus.IN_PROGRESS] or self.results.backlog:
                    changed.clear()
                    await changed.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self.events.unsubscribe(listener)

    def _require_ready(self) -> None:
        if not self.recovered:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                "the handler is recovering its queue from the data directory; retry shortly",
                reason=Reason.UNAVAILABLE,
            )

    async def stop(self) -> None:
        self.accepting_submits = False
        for handle in self._watchdogs.values():
            handle.cancel()
        self._run_timers.clear()
        self._watchdogs.clear()
        for timer in self._expiry_timers.values():
            timer.cancel()
        self._expiry_timers.clear()
        await self.results.stop()
        if self.deliverer is not None:
            # What is owed is read from the jobs again after a restart (results: the job is
            # still PROCESSING_RESULTS; the rest: the journal knows what was acknowledged).
            await self.deliverer.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("JobManager.start() was not called")
        return self._loop

    # ----- submitting -------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Submitted:
        """Queue a job, or return the existing one for the same key or object."""
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[JobSpec]) -> list[Submitted]:
        """Queue jobs; they are written to the journal before this returns (await
        ``store.sync()`` before acknowledging). On a journal failure nothing is queued."""
        self._require_ready()
        if not self.accepting_submits:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                "the handler is shutting down and takes no new jobs; submit to another replica "
                "or retry after it restarts",
                reason=Reason.UNAVAILABLE,
            )
        if len(specs) > self.config.max_batch:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY,
                f"{len(specs)} jobs in one batch; at most {self.config.max_batch} are allowed",
            )
        # Decide duplicates first so the queue limit counts only jobs that would be new.
        keys = [spec.dedup_key() for spec in specs]
        existing = [self._existing(spec, key) for spec, key in zip(specs, keys, strict=True)]
        fresh = sum(1 for job in existing if job is None)
        limit = self.config.queue_limit
        if limit and fresh and len(self.queue) + fresh > limit:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"queue full (limit {limit}): {len(self.queue)} pending, {fresh} more asked; "
                "retry later or raise --queue-limit",
                reason=Reason.EXHAUSTED,
            )
        out: list[Submitted] = []
        created: list[tuple[Job, Transition]] = []
        mark = self.store.mark()
        for spec, key, found in zip(specs, keys, existing, strict=True):
            if found is None:
                # A batch may repeat an object: the second copy is a duplicate of the first.
                found = self._existing(spec, key)
            if found is not None:
                out.append(Submitted(found, duplicate=True))
            else:
                job, transition, message = self._create(spec)
                created.append((job, transition))
                out.append(Submitted(job, duplicate=False, message=message))
        try:
            self.store.flush()
        except HandlerError:
            self.store.discard_since(mark)
            for job, _ in created:
                self._forget(job)
                self.queue.remove(job)
            raise
        verbose = logs.enabled(logging.INFO)
        for job, transition in created:
            if verbose:  # the fields cost more than the check when no one reads them
                log.info(
                    "job.submitted",
                    job_id=job.id,
                    kind=job.kind.name,
                    object=job.spec.target.display(),
                    trigger=job.spec.trigger.name,
                    lane=job.spec.lane.name,
                    status=JobStatus.PENDING.name,
                )
            self.events.publish(job, transition)
            if self.deliverer is not None:
                self.deliverer.owe(job.id)
        self.request_dispatch()
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

    def _create(self, spec: JobSpec) -> tuple[Job, Transition, common_pb2.Job]:
        at = now_utc()
        job = Job(id=new_job_id(), seq=self._next_seq, spec=spec, created_at=at)
        self._next_seq += 1
        self.jobs[job.id] = job
        self._by_seq[job.seq] = job
        self._active_by_key[job.key] = job
        if spec.idempotency_key:
            self._by_idempotency_key[spec.idempotency_key] = job
        self.queue.push(job)
        transition = state_machine.record_creation(job, at)
        self.status_counts[JobStatus.PENDING] += 1
        # The reply's message, built once: the journal record copies it.
        message = mapping.job_to_proto(job, position=self.queue.position(job))
        self.store.created(job, message)
        return job, transition, message

    def _forget(self, job: Job) -> None:
        """Remove a job from every index (a failed submit, or retention)."""
        self.jobs.pop(job.id, None)
        self._by_seq.pop(job.seq, None)
        self.status_counts[job.status] -= 1
        if self._active_by_key.get(job.key) is job:
            del self._active_by_key[job.key]
        if self._by_idempotency_key.get(job.spec.idempotency_key) is job:
            del self._by_idempotency_key[job.spec.idempotency_key]

    # ----- reading ----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        self._require_ready()
        if not job_id:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID, "job_id is empty; pass the id SubmitJob returned"
            )
        try:
            uuid.UUID(job_id)
        except ValueError:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"{job_id[:80]!r} is not a job id (job ids are UUIDs as SubmitJob returns them)",
            ) from None
        job = self.jobs.get(job_id)
        if job is None:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"no job with id {job_id}",
                reason=Reason.NOT_FOUND,
            )
        return job

    def position(self, job: Job) -> int:
        return self.queue.position(job) if job.status is JobStatus.PENDING else 0

    def list_jobs(
        self,
        *,
        statuses: frozenset[JobStatus],
        kinds: frozenset[ObjectKind],
        triggers: frozenset[Trigger],
        after_seq: int,
        page_size: int,
    ) -> tuple[list[Job], int | None]:
        """A page of jobs in arrival order after ``after_seq``; the next cursor or None."""
        self._require_ready()
        size = page_size or DEFAULT_PAGE_SIZE
        if size < 0 or size > MAX_PAGE_SIZE:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY, f"page_size {page_size} must be 0..{MAX_PAGE_SIZE}"
            )
        page: list[Job] = []
        for seq in self._by_seq.irange(minimum=after_seq, inclusive=(False, True)):
            job = self._by_seq[seq]
            if statuses and job.status not in statuses:
                continue
            if kinds and job.kind not in kinds:
                continue
            if triggers and job.spec.trigger not in triggers:
                continue
            if len(page) == size:
                return page, page[-1].seq
            page.append(job)
        return page, None

    def stats(self) -> QueueStats:
        self._require_ready()
        connected = self.scanners.connected()
        return QueueStats(
            by_status=dict(self.status_counts),
            pending_by_lane={lane: self.queue.lane_size(lane) for lane in Lane},
            oldest_pending={
                lane: (job.created_at if (job := self.queue.oldest(lane)) else None)
                for lane in Lane
            },
            scanners_connected=len(connected),
            scanners_free=sum(1 for s in connected if s.is_free),
            scanners_busy=sum(1 for s in connected if not s.is_free),
            free_slots=sum(s.free_slots for s in connected if s.is_free),
            started_at=self.started_at,
            queue_limit=self.config.queue_limit,
            result_backlog=self.results.backlog,
            deliveries_owed=self.deliverer.owing if self.deliverer is not None else 0,
            deliveries_oldest_age=(
                self.deliverer.oldest_age() if self.deliverer is not None else 0.0
            ),
        )

    def processing_by_scanner(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for job in self._processing.values():
            out.setdefault(job.scanner_id, []).append(job.id)
        return out

    # ----- cancelling -------------------------------------------------------------------

    def cancel(self, job_id: str, reason: str = "") -> Job:
        job = self.get(job_id)
        why = reason or "cancelled by a client"
        if job.status is JobStatus.PENDING:
            self.queue.remove(job)
            self._move(job, JobStatus.CANCELLED, reason=why)
        elif job.status is JobStatus.IN_PROGRESS:
            session = self._holder(job)
            self._release(job, session)
            if session is not None:
                session.send(CancelRun(job.id, why))
            self._move(job, JobStatus.CANCELLED, reason=why)
            self.request_dispatch()
        else:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"job {job.id} is {job.status.name}; only PENDING or IN_PROGRESS jobs can be "
                "cancelled",
                reason=Reason.FAILED_PRECONDITION,
            )
        return job

    # ----- scanners ---------------------------------------------------------------------

    def connect_scanner(
        self,
        profile: ScannerProfile,
        send: Callable[[ScannerMessage], None],
        close: Callable[[HandlerError], None],
    ) -> ScannerSession:
        self._require_ready()
        if self.scanners.live(profile.scanner_id) is not None:
            # Refused, not replaced: a second stream must not take over a live scanner's jobs.
            # UNAVAILABLE so a scanner that reconnects before its old stream timed out retries.
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"scanner id {profile.scanner_id!r} is already connected; a scanner id may hold "
                f"one stream (retry after {self.config.heartbeat_timeout:g}s if the old one died)",
                reason=Reason.UNAVAILABLE,
                retry_after=self.config.heartbeat_timeout,
            )
        at = now_utc()
        session = ScannerSession(
            profile=profile,
            session_id=str(uuid.uuid4()),
            connected_at=at,
            send=send,
            close=close,
            last_seen_at=at,
            last_seen=self.loop.time(),
        )
        self.scanners.add(session)
        self._arm_watchdog(session)
        log.info(
            "scanner.connected",
            scanner_id=profile.scanner_id,
            session_id=session.session_id,
            slots=profile.slots,
            kinds=sorted(k.name for k in profile.kinds),
            engine=profile.engine,
            version=profile.version,
        )
        return session

    def touch(self, session: ScannerSession) -> None:
        """Any message from a scanner shows it is alive."""
        session.last_seen = self.loop.time()
        session.last_seen_at = now_utc()

    def ready(self, session: ScannerSession, free_slots: int) -> None:
        was_free = session.is_free
        session.accepting = free_slots > 0
        self.dispatcher.refresh(session)
        if session.is_free != was_free:
            log.info(
                "scanner.status",
                scanner_id=session.scanner_id,
                status=session.status.name,
                free_slots=session.free_slots,
            )
        self.request_dispatch()

    def drain_scanner(self, session: ScannerSession) -> None:
        session.draining = True
        self.dispatcher.refresh(session)
        log.info("scanner.draining", scanner_id=session.scanner_id, jobs=list(session.held))

    def databases_changed(self, session: ScannerSession, databases: tuple[Database, ...]) -> None:
        """A live database update on the scanner: ListScanners shows the new versions."""
        session.profile = dataclasses.replace(session.profile, databases=databases)
        log.info(
            "scanner.databases_changed",
            scanner_id=session.scanner_id,
            databases={d.name: f"{d.version}@{d.released_at}" for d in databases},
        )

    def heartbeat(self, session: ScannerSession, active_job_ids: Iterable[str]) -> None:
        now = self.loop.time()
        for job_id in active_job_ids:
            job = session.held.get(job_id)
            if job is not None:
                job.last_activity = now

    def progress(self, session: ScannerSession, job_id: str, stage: str, percent: int) -> None:
        job = session.held.get(job_id)
        if job is None:
            self._reject(session, job_id, "progress")
            return
        job.last_activity = self.loop.time()
        log.debug(
            "job.progress",
            job_id=job_id,
            scanner_id=session.scanner_id,
            run=job.runs,
            stage=stage,
            percent=percent,
        )

    def result(
        self, session: ScannerSession, job_id: str, run: int, result: common_pb2.ScanResult
    ) -> None:
        job = session.held.get(job_id)
        if job is None or (run and run != job.runs):
            self._reject(session, job_id, "result", run=run)
            return
        self._release(job, session)
        session.jobs_finished += 1
        job.result = result
        # A small result is journaled with the move; a large one is written to its own file
        # by a result worker (a crash before that runs the job again).
        inline = result if result.ByteSize() <= INLINE_RESULT_BYTES else None
        self._move(job, JobStatus.PROCESSING_RESULTS, reason="result received", result=inline)
        self.results.submit(job)
        self.request_dispatch()

    def failure(self, session: ScannerSession, job_id: str, failure: RunFailure) -> None:
        job = session.held.get(job_id)
        if job is None:
            self._reject(session, job_id, "failure")
            return
        session.jobs_failed += 1
        self._end_run(job, session, failure)

    def disconnect(self, session: ScannerSession, failure: RunFailure) -> None:
        """The stream ended: every run it held ends without a result. Idempotent."""
        if not session.connected:
            return
        session.connected = False
        self.dispatcher.refresh(session)
        self.scanners.remove(session)
        handle = self._watchdogs.pop(session.session_id, None)
        if handle is not None:
            handle.cancel()
        held = list(session.held.values())
        log.info(
            "scanner.disconnected",
            scanner_id=session.scanner_id,
            session_id=session.session_id,
            reason=failure.detail,
            jobs_returned=[job.id for job in held],
        )
        for job in held:
            self._end_run(job, session, failure)

    def close_sessions(self, detail: str) -> None:
        """End every scanner stream with UNAVAILABLE so scanners reconnect elsewhere at once."""
        error = HandlerError(Catalogue.SYSTEM_ERROR, detail, reason=Reason.UNAVAILABLE)
        for session in self.scanners.connected():
            self.disconnect(session, RunFailure(error.kind, detail))
            session.close(error)

    def _reject(self, session: ScannerSession, job_id: str, what: str, run: int = 0) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.scanner_id == session.scanner_id:
            detail = (
                f"{what} for job {job_id} run {run or '?'} is stale: the run is over "
                f"(job is {job.status.name}, run {job.runs})"
            )
        else:
            detail = (
                f"{what} for job {job_id or '(empty)'}, which is not assigned to scanner "
                f"{session.scanner_id} in this session"
            )
        error = HandlerError(Catalogue.JOB_ID_INVALID, detail, reason=Reason.FAILED_PRECONDITION)
        log.warning(
            "scanner.message_rejected",
            scanner_id=session.scanner_id,
            job_id=job_id,
            error=error.message,
        )
        session.send(RejectMessage(error, job_id))

    # ----- dispatch ---------------------------------------------------------------------

    def request_dispatch(self) -> None:
        """Dispatch soon, once: many submits or results in one loop turn share one pass."""
        if not self._dispatch_scheduled and self._loop is not None:
            self._dispatch_scheduled = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self.results.backlog >= self.config.result_backlog_limit:
            # Back-pressure: no new scans while result processing is this far behind;
            # every finished result asks for a dispatch again.
            return
        batches = self.dispatcher.dispatch(self._assign)
        for session, jobs in batches.items():
            session.send(AssignJobs(tuple(jobs)))

    def _assign(self, job: Job, session: ScannerSession) -> None:
        self._move(job, JobStatus.IN_PROGRESS, scanner_id=session.scanner_id, reason="assigned")
        session.held[job.id] = job
        now = self.loop.time()
        job.run_deadline = now + job.spec.max_run_time
        job.last_activity = now
        self._arm_run_timer(job, min(job.run_deadline, now + self.config.result_wait))

    def _holder(self, job: Job) -> ScannerSession | None:
        session = self.scanners.live(job.scanner_id)
        return session if session is not None and job.id in session.held else None

    def _release(self, job: Job, session: ScannerSession | None) -> None:
        """The run is over on the scanner's side: free its slot and its timer."""
        if session is not None:
            session.held.pop(job.id, None)
            self.dispatcher.refresh(session)
        self._run_timers.cancel(job.id)

    def _end_run(self, job: Job, session: ScannerSession | None, failure: RunFailure) -> None:
        self._release(job, session)
        error = HandlerError(failure.kind, failure.detail)
        decision = self.retry.decide(job.runs, failure)
        if decision.retry:
            self._move(job, JobStatus.PENDING, reason=decision.reason, error=failure_of(error))
            self.queue.push(job)
        else:
            self._move(job, JobStatus.ERROR, reason=decision.reason, error=failure_of(error))
        self.request_dispatch()

    # ----- timers -----------------------------------------------------------------------

    def _arm_run_timer(self, job: Job, when: float) -> None:
        self._run_timers.arm(job.id, job, when)

    def _on_run_timer(self, job: Job) -> None:
        if job.status is not JobStatus.IN_PROGRESS:
            return
        now = self.loop.time()
        wait_due = job.last_activity + self.config.result_wait
        if now < job.run_deadline and now < wait_due:
            # The scanner showed life since the timer was set: wait on.
            self._arm_run_timer(job, min(job.run_deadline, wait_due))
            return
        if now >= job.run_deadline:
            detail = f"run {job.runs} exceeded the job's max run time of {job.spec.max_run_time:g}s"
        else:
            detail = (
                f"run {job.runs} sent no progress or heartbeat for {self.config.result_wait:g}s"
            )
        session = self._holder(job)
        if session is not None:
            session.send(CancelRun(job.id, detail))
        self._end_run(job, session, RunFailure(Catalogue.SCAN_TIME_OUT, detail))

    def _arm_watchdog(self, session: ScannerSession) -> None:
        when = session.last_seen + self.config.heartbeat_timeout
        self._watchdogs[session.session_id] = self.loop.call_at(when, self._on_watchdog, session)

    def _on_watchdog(self, session: ScannerSession) -> None:
        self._watchdogs.pop(session.session_id, None)
        if not session.connected:
            return
        silent_for = self.loop.time() - session.last_seen
        if silent_for < self.config.heartbeat_timeout:
            self._arm_watchdog(session)
            return
        error = HandlerError(
            Catalogue.SCAN_TIME_OUT,
            f"scanner {session.scanner_id} sent nothing for {silent_for:.1f}s "
            f"(heartbeat timeout {self.config.heartbeat_timeout:g}s)",
        )
        self.disconnect(session, RunFailure(error.kind, error.detail))
        session.close(error)

    # ----- results ----------------------------------------------------------------------

    def _prepare_result(self, job: Job) -> tuple[common_pb2.ScanResult | None, set[str]]:
        """On the loop, for a worker: the result (None: read it from its file) and the
        findings accepted for this job."""
        acceptances = self.acceptances
        return job.result, acceptances.accepted_for(job, now_utc()) if acceptances.by_id else set()

    def _finish_result(self, job: Job, outcome: Processed | HandlerError) -> None:
        self.request_dispatch()  # the backlog shrank: held-back assignments may go
        if job.status is not JobStatus.PROCESSING_RESULTS:
            return
        if isinstance(outcome, HandlerError):
            self._move(job, JobStatus.ERROR, reason="result rejected", error=failure_of(outcome))
            session = self.scanners.live(job.scanner_id)
            if session is not None:
                session.send(RejectMessage(outcome, job.id))
            return
        job.result_summary = outcome.summary
        if outcome.in_file:
            job.result_in_file = True
            job.result = None  # on disk now: keep RAM for the queue
        if self.deliverer is None:
            self._move(job, JobStatus.FINISHED, reason="results stored", summary=outcome.summary)
        else:
            job.awaiting_delivery = True
            self.deliverer.owe(job.id)

    # ----- delivery to the receiving server: what a job owes, read from the job ------------

    def owed(self, job: Job) -> int:
        """Deliveries the job still owes the receiving server."""
        if self.deliverer is None:
            return 0
        owed = len(job.history) - job.delivered
        if job.awaiting_delivery:
            owed += 1
        if job.verdict_delivered < job.verdict_version:
            owed += 1
        return owed

    def delivery_error(self, job: Job) -> str:
        return self.deliverer.last_answer(job.id) if self.deliverer is not None else ""

    async def next_delivery(self, job_id: str) -> Delivery | None:
        """The job's next owed event, in order: its status changes, then its processed result,
        then a verdict change. The journal is written before anyone hears of a change."""
        job = self.jobs.get(job_id)
        if job is None:
            return None  # pruned
        self.store.flush()
        if job.delivered < len(job.history):
            request = result_sink_pb2.DeliverRequest(idempotency_key=f"{job.id}:{job.delivered}")
            mapping.set_job(request.job, job, position=self.position(job))
            mapping.set_transition(request.transition, job.history[job.delivered])
            return Delivery(job.id, Kind.STATUS, request, job.delivered + 1)
        if job.awaiting_delivery:
            result = await self.load_result(job)
            if result is None:
                self._result_undeliverable(job, "the stored result could not be read")
                return await self.next_delivery(job_id)
            request = result_sink_pb2.DeliverRequest(
                idempotency_key=f"{job.id}:result:{job.runs}", result=result
            )
            mapping.set_job(request.job, job, position=0)
            return Delivery(job.id, Kind.RESULT, request, job.runs)
        if job.verdict_delivered < job.verdict_version and job.status is JobStatus.FINISHED:
            request = result_sink_pb2.DeliverRequest(
                idempotency_key=f"{job.id}:verdict:{job.verdict_version}"
            )
            mapping.set_job(request.job, job, position=0)
            change = request.verdict_change
            change.verdict = job.result_summary.verdict
            change.summary.CopyFrom(job.result_summary)
            change.cause = job.verdict_cause
            return Delivery(job.id, Kind.VERDICT, request, job.verdict_version)
        return None

    def delivered(self, delivery: Delivery) -> None:
        job = self.jobs.get(delivery.job_id)
        if job is None:
            return
        if delivery.kind is Kind.STATUS:
            if delivery.mark > job.delivered:
                job.delivered = delivery.mark
                self.store.delivered(job)
        elif delivery.kind is Kind.VERDICT:
            if delivery.mark > job.verdict_delivered:
                job.verdict_delivered = delivery.mark
                self.store.delivered(job)
        elif job.awaiting_delivery and job.status is JobStatus.PROCESSING_RESULTS:
            job.awaiting_delivery = False
            self._move(
                job, JobStatus.FINISHED, reason="results delivered", summary=job.result_summary
            )

    def failed(self, delivery: Delivery, answer: str, failures: int) -> None:
        """A job whose result waits on a receiver that keeps refusing records HNDL-001 and
        keeps its result; its status changes go on being retried."""
        job = self.jobs.get(delivery.job_id)
        if job is None or not job.awaiting_delivery:
            return
        if failures >= self.config.delivery_attempts:
            self._result_undeliverable(job, answer)

    def _result_undeliverable(self, job: Job, answer: str) -> None:
        job.awaiting_delivery = False
        if job.status is not JobStatus.PROCESSING_RESULTS:
            return
        error = HandlerError(Catalogue.MDW_ADAPTER_SEND_STATUS, answer)
        self._move(
            job,
            JobStatus.ERROR,
            reason="delivery to the receiving server failed; the result is kept",
            error=failure_of(error),
            summary=job.result_summary,
        )

    def redeliver(self, job_id: str) -> Job:
        """Deliver a kept result again after HNDL-001."""
        job = self.get(job_id)
        if self.deliverer is None:
            raise HandlerError(
                Catalogue.MDW_ADAPTER_SEND_STATUS,
                "no receiving server is configured (--receiver-url)",
                reason=Reason.UNAVAILABLE,
            )
        failed_delivery = (
            job.status is JobStatus.ERROR
            and job.error is not None
            and job.error.code == Catalogue.MDW_ADAPTER_SEND_STATUS.code
        )
        if not failed_delivery or job.result_summary is None:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"job {job.id} is {job.status.name} and has no undelivered result; only a job "
                "whose delivery failed (HNDL-001) can be redelivered",
                reason=Reason.FAILED_PRECONDITION,
            )
        self._move(job, JobStatus.PROCESSING_RESULTS, reason="redelivery requested")
        job.awaiting_delivery = True
        self.deliverer.owe(job.id)
        return job

    async def load_result(self, job: Job) -> common_pb2.ScanResult | None:
        if job.result is not None:
            result: common_pb2.ScanResult = job.result
            return result
        if not job.result_in_file:
            return None
        payload = await asyncio.to_thread(self.result_files.read, job.id)
        return common_pb2.ScanResult.FromString(payload) if payload is not None else None

    # ----- risk acceptance --------------------------------------------------------------

    def accept_risk(
        self, finding_id: str, scope: Scope, job_id: str, reason: str, days: float
    ) -> tuple[job_service_pb2.RiskAcceptance, Reevaluated]:
        self._require_ready()
        job = self.get(job_id) if job_id else None
        if scope is not Scope.EVERYWHERE and job is None:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY,
                f"scope {scope.name} needs job_id: the job whose object or repository it covers",
            )
        if scope is Scope.REPOSITORY and job is not None and job.kind is not ObjectKind.IMAGE:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY, "scope REPOSITORY applies to image jobs only"
            )
        _, text = scope_target(scope, job)
        at = now_utc()
        record = job_service_pb2.RiskAcceptance(
            id=str(uuid.uuid4()),
            finding_id=finding_id,
            scope=job_service_pb2.RiskScope.ValueType(scope),
            job_id=job_id,
            reason=reason,
            target=text,
            created_at=mapping.timestamp(at),
            expires_at=mapping.timestamp(at + timedelta(days=days)),
        )
        self._add_acceptance(record)
        self.store.risk_accepted(record)
        log.info("risk.accepted", acceptance_id=record.id, finding=finding_id, scope=scope.name,
                 target=text, days=days)  # fmt: skip
        return record, self._reevaluate(f"risk acceptance {record.id} added")

    def revoke_acceptance(self, acceptance_id: str) -> Reevaluated:
        self._require_ready()
        if self.acceptances.remove(acceptance_id) is None:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY, f"no risk acceptance with id {acceptance_id!r}"
            )
        self._acceptance_records.pop(acceptance_id, None)
        timer = self._expiry_timers.pop(acceptance_id, None)
        if timer is not None:
            timer.cancel()
        self.store.risk_removed(acceptance_id)
        return self._reevaluate(f"risk acceptance {acceptance_id} revoked")

    def acceptance_records(self) -> list[job_service_pb2.RiskAcceptance]:
        return list(self._acceptance_records.values())

    def _add_acceptance(self, record: job_service_pb2.RiskAcceptance) -> None:
        job = self.jobs.get(record.job_id) if record.job_id else None
        scope = Scope(record.scope)
        target, text = scope_target(scope, job)
        if scope is not Scope.EVERYWHERE and job is None:
            target = ("(pruned job)",)  # its job is gone: it can match nothing new
        acceptance = Acceptance(
            id=record.id,
            finding_id=record.finding_id,
            scope=scope,
            target=target,
            target_text=record.target or text,
            reason=record.reason,
            created_at=record.created_at.ToDatetime(tzinfo=UTC),
            expires_at=record.expires_at.ToDatetime(tzinfo=UTC),
            job_id=record.job_id,
        )
        self.acceptances.add(acceptance)
        self._acceptance_records[record.id] = record
        if self._loop is not None:
            delay = max(0.0, (acceptance.expires_at - now_utc()).total_seconds())
            self._expiry_timers[record.id] = self._loop.call_later(delay, self.expire_acceptances)

    def expire_acceptances(self) -> Reevaluated:
        """Drop acceptances past their expiry; re-evaluate verdicts when any went."""
        expired = self.acceptances.expired(now_utc())
        for acceptance in expired:
            self.acceptances.remove(acceptance.id)
            self._acceptance_records.pop(acceptance.id, None)
            self._expiry_timers.pop(acceptance.id, None)
            self.store.risk_removed(acceptance.id)
            log.info("risk.expired", acceptance_id=acceptance.id, finding=acceptance.finding_id)
        if not expired:
            return Reevaluated(0, 0)
        ids = ", ".join(a.id for a in expired)
        return self._reevaluate(f"risk acceptance {ids} expired")

    def _reevaluate(self, cause: str) -> Reevaluated:
        """Re-decide the summaries of FINISHED jobs with findings the policy fails; every
        change is journaled and owed to the receiving server."""
        now = now_utc()
        verdicts = summaries = 0
        for job in self._by_seq.values():
            summary = job.result_summary
            if job.status is not JobStatus.FINISHED or summary is None:
                continue
            if not (summary.failing or summary.accepted):
                continue
            change = apply_acceptances(summary, self.acceptances.accepted_for(job, now))
            if change is Change.NONE:
                continue
            if change is Change.VERDICT:
                verdicts += 1
            else:
                summaries += 1
            job.verdict_version += 1
            job.verdict_cause = cause
            self.store.verdict_changed(job)
            if self.deliverer is not None:
                self.deliverer.owe(job.id)
        if verdicts or summaries:
            log.info("verdicts.reevaluated", verdicts=verdicts, summaries=summaries, cause=cause)
        return Reevaluated(verdicts, summaries)

    # ----- the one place statuses change ------------------------------------------------

    def _move(
        self,
        job: Job,
        to_status: JobStatus,
        *,
        reason: str,
        scanner_id: str = "",
        error: JobFailure | None = None,
        result: Any = None,
        summary: Any = None,
    ) -> None:
        from_status = job.status
        transition = state_machine.move(
            job, to_status, at=now_utc(), reason=reason, scanner_id=scanner_id, error=error
        )
        if to_status is JobStatus.PROCESSING_RESULTS:
            self._processing[job.id] = job
        elif from_status is JobStatus.PROCESSING_RESULTS:
            self._processing.pop(job.id, None)
        self.store.moved(job, transition, result=result, summary=summary)
        self.status_counts[from_status] -= 1
        self.status_counts[to_status] += 1
        if not to_status.active and self._active_by_key.get(job.key) is job:
            del self._active_by_key[job.key]
        if logs.enabled(logging.INFO):  # the fields cost more than the check
            log.info(
                "job.transition",
                job_id=job.id,
                scanner_id=transition.scanner_id,
                run=job.runs,
                from_status=from_status.name,
                status=to_status.name,
                reason=reason,
                error=error.message if error else None,
            )
        self.events.publish(job, transition)
        if self.deliverer is not None:
            self.deliverer.owe(job.id)
