"""The handler: the service layer's one façade, and the place its parts are put together.

The transport and the metrics see only this class. Each verb checks the handler is ready
(recovery ended) and hands the work to the part that owns it: the job book, the run
supervisor, the scanner sessions, dispatch, result completion, deliveries, risk acceptance,
housekeeping. ``commit()`` is the durability barrier a servicer awaits before it acknowledges
a change; ``flush()`` hands changes to the store before anyone is told of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import common_pb2, job_service_pb2
from server.config import Config
from server.core.model import Job, JobSpec, JobStatus, Lane, Transition
from server.core.retry import RunFailure
from server.core.verdicts import Scope, Severity, VerdictPolicy
from server.scheduling.dispatcher import FreeRing
from server.service.background import Background
from server.service.delivery import DeliveryBook, Receiver
from server.service.dispatch import Dispatch
from server.service.events import EventBus
from server.service.housekeeping import Housekeeping
from server.service.jobs import JobBook, Submitted
from server.service.rematch import DatabaseWatch, Queued, Rematch, RematchFilter, Reuse
from server.service.results import Completion
from server.service.risk import Reevaluated, RiskBook
from server.service.runs import RunSupervisor, failure_of
from server.service.sessions import (
    CancelRun,
    Database,
    ScannerMessage,
    ScannerProfile,
    ScannerSession,
    ScannerSessions,
)
from server.service.transitions import Transitions
from server.storage.repository import JobFilter, JobRepository, Recovered

log = structlog.get_logger("imagehandler")


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
    result_backlog_age: float
    deliveries_owed: int
    deliveries_oldest_age: float


class Handler:
    def __init__(
        self,
        config: Config,
        repository: JobRepository,
        *,
        receiver: Receiver | None = None,
        on_delivery_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.repository = repository
        # The store waits on a network: moves that can go together are awaited together.
        self.shared_store = repository.shared
        self.started_at = datetime.now(UTC)
        # False until recovery has rebuilt the queue: until then every call is refused.
        self.ready = False
        self.accepting_submits = True
        self.events = EventBus(
            log_bytes=config.watch_log_bytes,
            lag_bytes=config.watch_lag_bytes,
            resume_seconds=config.watch_resume_seconds,
        )
        self.policy = VerdictPolicy(
            fail_severity=Severity[config.fail_severity.upper()],
            fail_on_malware=config.fail_on_malware,
            fail_on_secrets=config.fail_on_secrets,
        )
        self._background = Background()
        self.transitions = Transitions(repository, self.events)
        ring: FreeRing[ScannerSession] = FreeRing()
        self.sessions = ScannerSessions(config, ring, self._request_dispatch)
        self.risk = RiskBook(repository, background=self._background)
        self.completion = Completion(
            config,
            repository,
            self.transitions,
            self.sessions.registry,
            self.policy,
            self.risk.acceptances,
            request_dispatch=self._request_dispatch,
        )
        self.dispatch = Dispatch(
            repository,
            self.transitions,
            ring,
            backlog=lambda: self.completion.backlog,
            backlog_limit=config.result_backlog_limit,
        )
        self.runs = RunSupervisor(
            config,
            repository,
            self.transitions,
            self.sessions.registry,
            refresh=ring.refresh,
            request_dispatch=self._request_dispatch,
            background=self._background,
        )
        self.sessions.runs = self.runs
        self.dispatch.assigned = self.runs.assigned
        self.runs.on_result = self.completion.submit
        self.runs.process_now = self.completion.process_now
        # Scan once, match many (rematch.py): the newest database the scanners reported,
        # results reused by digest, stored SBOMs matched again.
        self.databases = DatabaseWatch()
        self.reuse = Reuse(
            config, repository, self.transitions, self.databases, self.completion.load_result
        )
        self.reuse.on_result = self.completion.submit
        self.jobs = JobBook(
            config,
            repository,
            self.transitions,
            self.runs,
            request_dispatch=self._request_dispatch,
            reuse=self.reuse,
        )
        self.rematcher = Rematch(
            config,
            repository,
            self.databases,
            self.completion.load_result,
            self.jobs.submit_many,
        )
        if config.rematch_on_update:
            self.databases.on_newer = lambda database: self._background.spawn(self._rematch_all())
        self.delivery: DeliveryBook | None = None
        if receiver is not None:
            self.delivery = DeliveryBook(
                repository,
                self.transitions,
                receiver,
                senders=config.delivery_concurrency,
                attempts=config.delivery_attempts,
                backoff=config.delivery_backoff,
                max_backoff=config.delivery_max_backoff,
                on_failure=on_delivery_failure,
                load_result=self.completion.load_result,
                position=self.position_now,
                policy=self.policy,
            )
            self.completion.deliver = self.delivery.deliver_result
            self.risk.owe = self.delivery.owe
        self.housekeeping = Housekeeping(config, repository, self.jobs, self.events)
        self.housekeeping.rescue = self._rescue
        # The scanners' per-job verbs go straight to their owner: on the hot path, a facade
        # method that only awaits another costs a coroutine per call.
        self.result = self.runs.result
        self.failure = self.runs.failure
        self.heartbeat = self.runs.heartbeat
        self.progress = self.runs.progress

    def _request_dispatch(self) -> None:
        self.dispatch.request()

    # ----- life cycle ------------------------------------------------------------------------

    async def open(self) -> Recovered:
        """Start the workers, open the store, end the runs a restart cut short, re-send what
        was not delivered; then the handler is ready."""
        self.completion.start()
        self.dispatch.start()
        if self.delivery is not None:
            self.delivery.start()
        recovered = await self.repository.open()
        self.repository.subscribe(
            work=self._request_dispatch,
            moved=self._moved_elsewhere,
            listened=self._listened,
            held=self._held,
        )
        await self._restore(recovered)
        await self.risk.load()
        self.housekeeping.start()
        self.ready = True
        self._request_dispatch()
        return recovered

    async def _restore(self, recovered: Recovered) -> None:
        for job in recovered.interrupted:
            if job.status is JobStatus.PROCESSING_RESULTS:
                if job.result is not None or job.result_in_file:
                    self.completion.submit(job)  # its result was kept: process it again
                    continue
                # A large result was not yet kept apart when the handler stopped: run again.
                failure = RunFailure(
                    Catalogue.SYSTEM_ERROR,
                    f"the handler restarted before run {job.runs}'s result was stored",
                )
            else:
                failure = RunFailure(
                    Catalogue.SYSTEM_ERROR,
                    f"the handler restarted during run {job.runs} on scanner {job.scanner_id}",
                )
            await self._end_interrupted(job, failure)
        if self.delivery is not None and not self.shared_store:
            # A shared store: what live replicas owe stays theirs; what dead ones owed is
            # adopted by the delivery book (orphaned_deliveries).
            owing = frozenset(JobStatus)
            for job in await self.repository.select(owing):
                if job.delivered < len(job.history) or job.verdict_delivered < job.verdict_version:
                    self.delivery.owe(job)

    async def _rescue(self, jobs: list[Job]) -> None:
        """Runs another replica held until its lease ran out (it died or lost the database):
        they end as a restart's interrupted runs do, the run counting."""
        for job in jobs:
            log.warning(
                "job.rescued", job_id=job.id, status=job.status.name, run=job.runs,
                scanner_id=job.scanner_id,
            )  # fmt: skip
            if job.status is JobStatus.PROCESSING_RESULTS and (
                job.result is not None or job.result_in_file
            ):
                self.completion.submit(job)  # its result was kept: process it here
                continue
            failure = RunFailure(
                Catalogue.SYSTEM_ERROR,
                f"the replica holding run {job.runs} (scanner {job.scanner_id}) stopped "
                "renewing its lease",
            )
            await self._end_interrupted(job, failure)

    def _held(self) -> list[str]:
        """Runs on this replica's scanner streams, and results its workers process."""
        held = [job_id for s in self.sessions.registry.connected() for job_id in s.held]
        return held + list(self.completion.processing)

    def _listened(self, job_id: str) -> bool:
        return self.events.watched(job_id) or any(
            job_id in session.held for session in self.sessions.registry.connected()
        )

    def _moved_elsewhere(self, job: Job, transition: Transition) -> None:
        """Another replica moved a job: watchers here see it; a run held here that another
        replica ended (a cancel, a rescue) stops on its scanner."""
        self.events.publish(job, transition)
        session = self.runs.holder(job)
        if session is None or transition.to_status is JobStatus.IN_PROGRESS:
            return
        held = session.held.get(job.id)
        if held is not None and transition.run < held.runs:
            # News of an earlier run, heard after this replica claimed the job again (the
            # notification is read after the claim): the run held now goes on.
            return
        self.runs.release(job.id, session)
        session.send(CancelRun(job.id, transition.reason))

    async def _end_interrupted(self, job: Job, failure: RunFailure) -> None:
        if job.status is JobStatus.PROCESSING_RESULTS:
            # The only way back from PROCESSING_RESULTS: a crash lost the result; run again.
            decision = self.runs.retry.decide(job.runs, failure)
            await self.transitions.move(
                job.id,
                JobStatus.PENDING if decision.retry else JobStatus.ERROR,
                expect=frozenset({JobStatus.PROCESSING_RESULTS}),
                reason=decision.reason,
                error=failure_of(HandlerError(failure.kind, failure.detail)),
            )
            return
        await self.runs.end_interrupted(job, failure)

    async def drain(self, grace: float) -> bool:
        """Take no new work, let running runs and results finish for up to ``grace`` seconds.
        True when everything finished in time."""
        self.accepting_submits = False
        self.sessions.drain_all()
        return await self.housekeeping.drain(
            grace,
            lambda: bool(self.runs_in_progress() or self.completion.backlog),
        )

    def runs_in_progress(self) -> int:
        return sum(len(s.held) for s in self.sessions.registry.connected())

    def close_sessions(self, detail: str) -> None:
        self.sessions.close_all(detail)

    async def stop(self) -> None:
        """Stop every part; the store is closed last (a last snapshot, where it takes them)."""
        self.accepting_submits = False
        self.sessions.stop()
        self.runs.stop()
        self.risk.stop()
        await self.housekeeping.stop()
        await self.dispatch.stop()
        await self.completion.stop()
        await self._background.stop()
        if self.delivery is not None:
            await self.delivery.stop()
        await self.repository.close()

    # ----- durability ------------------------------------------------------------------------

    async def commit(self) -> None:
        """Return once every change so far is durable: await before acknowledging."""
        await self.repository.commit()

    def flush(self) -> None:
        """Hand changes to the store before telling a scanner or a watcher (a crash then
        replays them). A store that cannot take them says so in the log: the message still
        goes, as the journal's next write will fail the same way loudly."""
        try:
            self.repository.flush()
        except HandlerError as error:
            log.error("journal.flush_failed", error=error.message)

    def require_ready(self) -> None:
        if not self.ready:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                "the handler is recovering its queue from the data directory; retry shortly",
                reason=Reason.UNAVAILABLE,
            )

    # ----- jobs ------------------------------------------------------------------------------

    async def submit_many(self, specs: Sequence[JobSpec]) -> list[Submitted]:
        self.require_ready()
        if not self.accepting_submits:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                "the handler is shutting down and takes no new jobs; submit to another replica "
                "or retry after it restarts",
                reason=Reason.UNAVAILABLE,
            )
        return await self.jobs.submit_many(specs)

    async def get(self, job_id: str) -> Job:
        self.require_ready()
        return await self.jobs.get(job_id)

    async def page(
        self, where: JobFilter, after_seq: int, page_size: int
    ) -> tuple[list[Job], int | None]:
        self.require_ready()
        return await self.jobs.page(where, after_seq, page_size)

    async def cancel(self, job_id: str, reason: str = "") -> Job:
        self.require_ready()
        return await self.jobs.cancel(job_id, reason)

    def position(self, job: Job) -> int:
        """The job's place in its lane as far as the store knows it without asking (0 when
        not PENDING, or when only a query could tell)."""
        return self.repository.position_hint(job)

    async def positions(self, jobs: Sequence[Job]) -> list[int]:
        """Each job's place in its lane as the store has it now (asks a shared database)."""
        return await self.repository.positions(jobs)

    async def position_now(self, job: Job) -> int:
        """The job's place as the store has it now (asks a shared database)."""
        (position,) = await self.repository.positions([job])
        return position

    def owed(self, job: Job) -> int:
        return self.delivery.owed(job) if self.delivery is not None else 0

    def delivery_error(self, job: Job) -> str:
        return self.delivery.last_answer(job) if self.delivery is not None else ""

    async def load_result(self, job: Job) -> common_pb2.ScanResult | None:
        return await self.completion.load_result(job)

    async def redeliver(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if self.delivery is None:
            raise HandlerError(
                Catalogue.MDW_ADAPTER_SEND_STATUS,
                "no receiving server is configured (--receiver-url)",
            )
        return await self.delivery.redeliver(job)

    async def stats(self) -> QueueStats:
        self.require_ready()
        counts = await self.repository.counts()
        connected = self.sessions.registry.connected()
        outbox = self.delivery.outbox if self.delivery is not None else None
        return QueueStats(
            by_status=counts.by_status,
            pending_by_lane=counts.pending_by_lane,
            oldest_pending=counts.oldest_pending,
            scanners_connected=len(connected),
            scanners_free=sum(1 for s in connected if s.is_free),
            scanners_busy=sum(1 for s in connected if not s.is_free),
            free_slots=sum(s.free_slots for s in connected if s.is_free),
            started_at=self.started_at,
            queue_limit=self.config.queue_limit,
            result_backlog=self.completion.backlog,
            result_backlog_age=self.completion.pipeline.oldest_age(),
            deliveries_owed=outbox.owing if outbox is not None else 0,
            deliveries_oldest_age=outbox.oldest_age() if outbox is not None else 0.0,
        )

    # ----- risk acceptance -------------------------------------------------------------------

    async def accept_risk(
        self, finding_id: str, scope: Scope, job_id: str, reason: str, days: float
    ) -> tuple[job_service_pb2.RiskAcceptance, Reevaluated]:
        self.require_ready()
        job = await self.jobs.get(job_id) if job_id else None
        return await self.risk.accept(finding_id, scope, job, reason, days)

    async def revoke_acceptance(self, acceptance_id: str) -> Reevaluated:
        self.require_ready()
        return await self.risk.revoke(acceptance_id)

    def acceptance_records(self) -> list[job_service_pb2.RiskAcceptance]:
        return self.risk.records()

    # ----- scanners --------------------------------------------------------------------------

    def connect_scanner(
        self,
        profile: ScannerProfile,
        send: Callable[[ScannerMessage], None],
        close: Callable[[HandlerError], None],
    ) -> ScannerSession:
        self.require_ready()
        session = self.sessions.connect(profile, send, close)
        self.databases.seen(profile.databases)
        return session

    def touch(self, session: ScannerSession) -> None:
        self.sessions.touch(session)

    def scanner_ready(self, session: ScannerSession, free_slots: int) -> None:
        self.sessions.ready(session, free_slots)

    def drain_scanner(self, session: ScannerSession) -> None:
        self.sessions.drain(session)

    def databases_changed(self, session: ScannerSession, databases: tuple[Database, ...]) -> None:
        self.sessions.databases_changed(session, databases)
        self.databases.seen(databases, updated=True)

    # ----- rematches -------------------------------------------------------------------------

    async def rematch(self, where: RematchFilter) -> Queued:
        """Queue rematch jobs of the latest good scans ``where`` selects (RematchJobs)."""
        self.require_ready()
        return await self.rematcher.queue(where)

    async def _rematch_all(self) -> None:
        if not self.ready or not self.accepting_submits:
            return
        await self.rematcher.queue(RematchFilter())

    def disconnect(self, session: ScannerSession, failure: RunFailure) -> None:
        self.sessions.disconnect(session, failure)

    def scanners(self) -> list[ScannerSession]:
        """Connected scanners, then recently disconnected ones."""
        return self.sessions.registry.all()

    def connected_scanners(self) -> list[ScannerSession]:
        return self.sessions.registry.connected()

    def processing_by_scanner(self) -> dict[str, list[str]]:
        return self.completion.processing_by_scanner()
