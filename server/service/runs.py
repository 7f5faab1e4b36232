"""Runs: from assignment to the end of a run.

A run counts when its job is assigned (the repository's claim). It ends with a result, a
failure report, a scanner that disconnects or goes silent, or a timeout (HNDL-004: the job's max
run time, or ``--result-wait`` without progress or a heartbeat naming the job); then the retry
policy says run again (PENDING, at the job's own place in the queue) or ERROR. Run deadlines
sit in 50 ms buckets: one loop timer per bucket, not one per job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import structlog

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import common_pb2
from server.config import Config
from server.core.model import Job, JobFailure, JobStatus
from server.core.retry import RetryPolicy, RunFailure
from server.scheduling.timers import BucketTimers
from server.service.background import Background
from server.service.sessions import CancelRun, RejectMessage, ScannerRegistry, ScannerSession
from server.service.transitions import Transitions
from server.storage.repository import RESULT_RECEIVED, JobRepository, Moved

log = structlog.get_logger("imagehandler")

IN_PROGRESS = frozenset({JobStatus.IN_PROGRESS})


def failure_of(error: HandlerError) -> JobFailure:
    return JobFailure(error.code, error.message, error.detail)


class RunSupervisor:
    def __init__(
        self,
        config: Config,
        repository: JobRepository,
        transitions: Transitions,
        registry: ScannerRegistry,
        *,
        refresh: Callable[[ScannerSession], None],
        request_dispatch: Callable[[], None],
        background: Background,
    ) -> None:
        self.config = config
        self._repository = repository
        self._transitions = transitions
        self._registry = registry
        self._refresh = refresh
        self._request_dispatch = request_dispatch
        self._background = background
        self.retry = RetryPolicy(config.max_runs)
        self._timers: BucketTimers[Job] = BucketTimers(asyncio.get_running_loop, self._on_run_timer)
        # A result arrived: the result pipeline takes the job (set by the handler).
        self.on_result: Callable[[Job], None] = lambda job: None
        # A small result's summary when it can be processed as it arrives (Completion's
        # process_now); None: it goes to the result workers.
        self.process_now: Callable[[Job, common_pb2.ScanResult], common_pb2.ResultSummary | None]
        self.process_now = lambda job, result: None

    def stop(self) -> None:
        self._timers.clear()

    # ----- assignment ------------------------------------------------------------------------

    def assigned(self, session: ScannerSession, moves: list[Moved]) -> None:
        """Jobs the repository handed to ``session``: held, with their deadlines armed."""
        now = asyncio.get_running_loop().time()
        wait = self.config.result_wait
        for moved in moves:
            job = moved.job
            session.held[job.id] = job
            job.run_deadline = now + job.spec.max_run_time
            job.last_activity = now
            self._timers.arm(job.id, job, min(job.run_deadline, now + wait))
        self._refresh(session)
        if not session.connected:
            # The stream ended while the claim was made: these runs end now.
            gone = RunFailure(Catalogue.SYSTEM_ERROR, f"scanner {session.scanner_id} disconnected")
            self.end_runs_soon(session, gone)

    def holder(self, job: Job) -> ScannerSession | None:
        session = self._registry.live(job.scanner_id)
        return session if session is not None and job.id in session.held else None

    def release(self, job_id: str, session: ScannerSession | None) -> None:
        """The run is over on the scanner's side: free its slot and its timer."""
        if session is not None:
            session.held.pop(job_id, None)
            self._refresh(session)
        self._timers.cancel(job_id)

    # ----- what scanners say -----------------------------------------------------------------

    def heartbeat(self, session: ScannerSession, active_job_ids: Iterable[str]) -> None:
        now = asyncio.get_running_loop().time()
        for job_id in active_job_ids:
            job = session.held.get(job_id)
            if job is not None:
                job.last_activity = now

    def progress(self, session: ScannerSession, job_id: str, stage: str, percent: int) -> None:
        job = session.held.get(job_id)
        if job is None:
            self.reject(session, job_id, "progress")
            return
        job.last_activity = asyncio.get_running_loop().time()
        log.debug(
            "job.progress",
            job_id=job_id,
            scanner_id=session.scanner_id,
            run=job.runs,
            stage=stage,
            percent=percent,
        )

    async def result(
        self, session: ScannerSession, job_id: str, run: int, result: common_pb2.ScanResult
    ) -> None:
        job = session.held.get(job_id)
        if job is None or (run and run != job.runs):
            await self.reject_async(session, job_id, "result", run=run)
            return
        self.release(job_id, session)
        session.jobs_finished += 1
        received_at = datetime.now(UTC)
        summary = self.process_now(job, result)
        if summary is not None:
            moves = await self._transitions.settle(
                job_id, run=job.runs, result=result, received_at=received_at, summary=summary
            )
            if len(moves) == 1:  # received, not stored (cannot happen in one write): go on
                self.on_result(moves[0].job)
        else:
            moved = await self._transitions.move(
                job_id,
                JobStatus.PROCESSING_RESULTS,
                expect=IN_PROGRESS,
                run=job.runs,
                reason=RESULT_RECEIVED,
                result=result,
            )
            if moved is not None:
                self.on_result(moved.job)
        self._request_dispatch()

    async def failure(self, session: ScannerSession, job_id: str, failure: RunFailure) -> None:
        job = session.held.get(job_id)
        if job is None:
            await self.reject_async(session, job_id, "failure")
            return
        session.jobs_failed += 1
        await self.end_run(job, session, failure)

    async def reject_async(
        self, session: ScannerSession, job_id: str, what: str, run: int = 0
    ) -> None:
        self.reject(session, job_id, what, run, await self._repository.get(job_id))

    def reject(
        self,
        session: ScannerSession,
        job_id: str,
        what: str,
        run: int = 0,
        job: Job | None = None,
    ) -> None:
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

    # ----- the end of a run ------------------------------------------------------------------

    async def end_run(
        self, job: Job, session: ScannerSession | None, failure: RunFailure
    ) -> Moved | None:
        """The run ended without a result: run again or ERROR, as the retry policy says."""
        self.release(job.id, session)
        error = HandlerError(failure.kind, failure.detail)
        decision = self.retry.decide(job.runs, failure)
        moved = await self._transitions.move(
            job.id,
            JobStatus.PENDING if decision.retry else JobStatus.ERROR,
            expect=IN_PROGRESS,
            run=job.runs,
            reason=decision.reason,
            error=failure_of(error),
        )
        self._request_dispatch()
        return moved

    def end_runs_soon(self, session: ScannerSession, failure: RunFailure) -> None:
        """Every run ``session`` holds ends (its stream closed): from a synchronous caller."""
        held = list(session.held.values())
        for job in held:
            self.release(job.id, session)
        self._background.spawn(self._end_runs(held, failure))

    async def _end_runs(self, jobs: list[Job], failure: RunFailure) -> None:
        for job in jobs:
            await self.end_run(job, None, failure)

    async def end_interrupted(self, job: Job, failure: RunFailure) -> None:
        """A run the handler's restart cut short (recovery): it counts and ends."""
        await self.end_run(job, None, failure)

    async def cancel(self, job: Job, why: str) -> Moved | None:
        """A client cancels an IN_PROGRESS job: the scanner is told to stop."""
        session = self.holder(job)
        self.release(job.id, session)
        moved = await self._transitions.move(
            job.id,
            JobStatus.CANCELLED,
            expect=IN_PROGRESS,
            reason=why,
        )
        if moved is not None and session is not None:
            session.send(CancelRun(job.id, why))
        self._request_dispatch()
        return moved

    # ----- deadlines -------------------------------------------------------------------------

    def _on_run_timer(self, job: Job) -> None:
        if job.status is not JobStatus.IN_PROGRESS:
            return
        now = asyncio.get_running_loop().time()
        wait_due = job.last_activity + self.config.result_wait
        if now < job.run_deadline and now < wait_due:
            # The scanner showed life since the timer was set: wait on.
            self._timers.arm(job.id, job, min(job.run_deadline, wait_due))
            return
        if now >= job.run_deadline:
            detail = f"run {job.runs} exceeded the job's max run time of {job.spec.max_run_time:g}s"
        else:
            detail = (
                f"run {job.runs} sent no progress or heartbeat for {self.config.result_wait:g}s"
            )
        session = self.holder(job)
        if session is not None:
            session.send(CancelRun(job.id, detail))
        self._background.spawn(
            self._timed_out(job, session, RunFailure(Catalogue.SCAN_TIME_OUT, detail))
        )

    async def _timed_out(
        self, job: Job, session: ScannerSession | None, failure: RunFailure
    ) -> None:
        await self.end_run(job, session, failure)
