"""Result processing: the step between a scanner's result and a FINISHED job.

A result moves its job to PROCESSING_RESULTS and waits in arrival order for one of the result
workers (the seed's ``scanWorkers``). A worker checks the result, summarises it under the
verdict policy and keeps a large one apart (the repository's ``write_result``), in a worker
thread so the event loop keeps dispatching; then the job is FINISHED, or waits for the
receiving server when one is configured. The backlog is bounded by back-pressure: dispatch
assigns nothing new while it is at its limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from imagehandler.errors import Catalogue, HandlerError
from imagehandler.v1 import common_pb2
from server.config import Config
from server.core.model import Job, JobFailure, JobStatus, Transition
from server.core.verdicts import Acceptances, VerdictPolicy
from server.service.events import Subscription
from server.service.sessions import RejectMessage, ScannerRegistry
from server.service.summaries import summarize
from server.service.transitions import Transitions
from server.storage.repository import INLINE_RESULT_BYTES, RESULTS_STORED, JobRepository

log = structlog.get_logger("imagehandler.results")

MAX_FINDINGS = 1_000_000
# A worker takes up to this many waiting results at once (one thread hop for all of them).
RESULT_BATCH = 64
# Results up to this size are checked and summarised on the loop (no thread hop).
INLINE_PROCESS_BYTES = 16 * 1024
# The enums' numbers, once (``Verdict.values()`` builds a new list at every call).
_VERDICTS = frozenset(common_pb2.Verdict.values())
_SEVERITIES = frozenset(common_pb2.Severity.values())


@dataclass(frozen=True)
class Processed:
    summary: common_pb2.ResultSummary
    in_file: bool  # the full result was written to the results folder


def check_result(result: common_pb2.ScanResult) -> None:
    """HNDL-005 saying what is wrong with a result that cannot be right."""

    def bad(detail: str) -> HandlerError:
        return HandlerError(Catalogue.SCAN_PARAMS_EMPTY, f"malformed result: {detail}")

    if result.verdict not in _VERDICTS:
        raise bad(f"verdict {result.verdict} is unknown")
    if not (result.vulnerabilities or result.malware or result.secrets):
        return  # nothing found: nothing more to check
    severities = _SEVERITIES
    total = len(result.vulnerabilities) + len(result.malware) + len(result.secrets)
    if total > MAX_FINDINGS:
        raise bad(f"{total} findings; at most {MAX_FINDINGS} are accepted")
    for index, vulnerability in enumerate(result.vulnerabilities):
        if not vulnerability.id:
            raise bad(f"vulnerabilities[{index}] has no id")
        if vulnerability.severity not in severities:
            raise bad(f"vulnerabilities[{index}] severity {vulnerability.severity} is unknown")
    for index, malware in enumerate(result.malware):
        if not (malware.name or malware.sha256):
            raise bad(f"malware[{index}] has neither name nor sha256")
    for index, secret in enumerate(result.secrets):
        if not secret.rule_id:
            raise bad(f"secrets[{index}] has no rule_id")


class ResultStore(Protocol):
    """Where large results are kept apart from their job (the repository; thread-safe)."""

    def write_result(self, job_id: str, payload: bytes) -> None: ...
    def read_result(self, job_id: str) -> bytes | None: ...


def process(
    job_id: str,
    result: common_pb2.ScanResult | None,
    policy: VerdictPolicy,
    accepted: set[str],
    files: ResultStore,
) -> Processed:
    """The worker's part, run in a thread: check, summarise, store a large result.
    ``result`` None: it is already in its file (a restart), read it from there."""
    if result is None:
        payload = files.read_result(job_id)
        if payload is None:
            raise HandlerError(Catalogue.SYSTEM_ERROR, f"the stored result of {job_id} is gone")
        summary = summarize(common_pb2.ScanResult.FromString(payload), policy, accepted)
        return Processed(summary, in_file=True)
    check_result(result)
    summary = summarize(result, policy, accepted)
    in_file = result.ByteSize() > INLINE_RESULT_BYTES
    if in_file:
        files.write_result(job_id, result.SerializeToString())
    return Processed(summary, in_file)


PROCESSING = frozenset({JobStatus.PROCESSING_RESULTS})

Prepare = Callable[[Job], tuple[common_pb2.ScanResult | None, set[str]]]
Finish = Callable[[Job, "Processed | HandlerError"], Awaitable[None]]


class ResultPipeline:
    """A pool of result workers fed in arrival order."""

    def __init__(
        self,
        workers: int,
        policy: VerdictPolicy,
        files: ResultStore,
        prepare: Prepare,
        finish: Finish,
        *,
        together: bool = False,
    ) -> None:
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        # A store that waits on a network: a batch's completions are awaited together.
        self._together = together
        self._workers = workers
        self.policy = policy
        self.files = files
        self._prepare = prepare
        self._finish = finish
        self._tasks: list[asyncio.Task[None]] = []
        # Jobs waiting for or inside a worker, with the loop time each arrived.
        self.in_pipeline: dict[str, Job] = {}
        self._arrived: dict[str, float] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"result-worker-{n}")
            for n in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def submit(self, job: Job) -> None:
        self.in_pipeline[job.id] = job
        self._arrived[job.id] = time.monotonic()
        self._queue.put_nowait(job)

    @property
    def backlog(self) -> int:
        return len(self.in_pipeline)

    def oldest_age(self) -> float:
        return time.monotonic() - min(self._arrived.values()) if self._arrived else 0.0

    async def _work(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < RESULT_BATCH and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            # None: the job's outcome comes from _process_many (every one of them does).
            outcomes: list[Processed | HandlerError | None] = []
            work: list[tuple[int, Job, common_pb2.ScanResult | None, set[str]]] = []
            for job in jobs:
                try:
                    result, accepted = self._prepare(job)
                except HandlerError as error:
                    outcomes.append(error)
                    continue
                outcomes.append(None)
                work.append((len(outcomes) - 1, job, result, accepted))
            small = all(
                result is not None and result.ByteSize() <= INLINE_PROCESS_BYTES
                for _, _, result, _ in work
            )
            # A thread hop costs more than checking and summarising a small result.
            done = (
                self._process_many(work)
                if small
                else await asyncio.to_thread(self._process_many, work)
            )
            for index, processed in done:
                outcomes[index] = processed
            together = []
            for job, outcome in zip(jobs, outcomes, strict=True):
                if outcome is None:  # cannot happen: _process_many answers every one
                    outcome = HandlerError(Catalogue.SYSTEM_ERROR, "result processing failed")
                self.in_pipeline.pop(job.id, None)
                self._arrived.pop(job.id, None)
                if self._together:
                    together.append(self._finish_or_retry(job, outcome))
                else:
                    await self._finish_or_retry(job, outcome)
            if together:
                # A shared database: the batch's completions in one batch of moves.
                await asyncio.gather(*together)

    async def _finish_or_retry(self, job: Job, outcome: Processed | HandlerError) -> None:
        try:
            await self._finish(job, outcome)
        except HandlerError as error:
            # The store refused (a shared database went away): the job is still in
            # PROCESSING_RESULTS with its result; process it again shortly.
            log.warning("result.finish_failed", job_id=job.id, error=error.message)
            asyncio.get_running_loop().call_later(RETRY_FINISH, self.submit, job)

    def _process_many(
        self, work: list[tuple[int, Job, common_pb2.ScanResult | None, set[str]]]
    ) -> list[tuple[int, Processed | HandlerError]]:
        out: list[tuple[int, Processed | HandlerError]] = []
        for index, job, result, accepted in work:
            outcome: Processed | HandlerError
            try:
                outcome = process(job.id, result, self.policy, accepted, self.files)
            except HandlerError as error:
                outcome = error
            except Exception:  # a worker must survive any one bad result
                log.exception("result.worker_failed", job_id=job.id)
                outcome = HandlerError(Catalogue.SYSTEM_ERROR, "result processing failed")
            out.append((index, outcome))
        return out


# Seconds before a result whose completion the store refused is processed again.
RETRY_FINISH = 1.0


class Completion:
    """From a result's arrival to FINISHED (or to the receiving server): the result workers,
    and the jobs in PROCESSING_RESULTS by scanner for ListScanners."""

    def __init__(
        self,
        config: Config,
        repository: JobRepository,
        transitions: Transitions,
        registry: ScannerRegistry,
        policy: VerdictPolicy,
        acceptances: Acceptances,
        *,
        request_dispatch: Callable[[], None],
    ) -> None:
        self._repository = repository
        self._transitions = transitions
        self._registry = registry
        self._acceptances = acceptances
        self._request_dispatch = request_dispatch
        self.pipeline = ResultPipeline(
            config.result_workers,
            policy,
            repository,
            self._prepare,
            self._finish,
            together=repository.shared,
        )
        # The job's processed result waits for the receiving server (the delivery book's
        # owe), when one is configured.
        self.deliver: Callable[[Job], None] | None = None
        # Jobs in PROCESSING_RESULTS: with a result worker, or waiting on delivery.
        self.processing: dict[str, Job] = {}
        transitions.events.subscribe(Subscription(self._track))

    def _track(self, job: Job, transition: Transition) -> None:
        if transition.to_status is JobStatus.PROCESSING_RESULTS:
            self.processing[job.id] = job
        elif transition.from_status is JobStatus.PROCESSING_RESULTS:
            self.processing.pop(job.id, None)

    def start(self) -> None:
        self.pipeline.start()

    async def stop(self) -> None:
        await self.pipeline.stop()

    def submit(self, job: Job) -> None:
        self.pipeline.submit(job)

    @property
    def backlog(self) -> int:
        return self.pipeline.backlog

    def processing_by_scanner(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for job in self.processing.values():
            out.setdefault(job.scanner_id, []).append(job.id)
        return out

    def _prepare(self, job: Job) -> tuple[common_pb2.ScanResult | None, set[str]]:
        """On the loop, for a worker: the result (None: read it from where it was kept) and
        the findings accepted for this job."""
        return job.result, self._accepted(job)

    def _accepted(self, job: Job) -> set[str]:
        acceptances = self._acceptances
        return acceptances.accepted_for(job, datetime.now(UTC)) if acceptances.by_id else set()

    def process_now(
        self, job: Job, result: common_pb2.ScanResult
    ) -> common_pb2.ResultSummary | None:
        """The summary of a small result, processed as it arrives when no other result waits
        for a worker (so results still finish in arrival order) and no receiving server
        waits for it: the job can go to FINISHED in the same write as PROCESSING_RESULTS.
        None: the result goes the long way (a worker, then FINISHED or ERROR), as a large,
        rejected or delivered one does."""
        if (
            self.deliver is not None
            or self.pipeline.backlog
            or result.ByteSize() > INLINE_PROCESS_BYTES
        ):
            return None
        try:
            processed = process(
                job.id, result, self.pipeline.policy, self._accepted(job), self._repository
            )
        except Exception:  # the long way rejects it, or logs what failed
            return None
        return processed.summary

    async def _finish(self, job: Job, outcome: Processed | HandlerError) -> None:
        self._request_dispatch()  # the backlog shrank: held-back assignments may go
        if job.status is not JobStatus.PROCESSING_RESULTS:
            return
        if isinstance(outcome, HandlerError):
            await self._transitions.move(
                job.id,
                JobStatus.ERROR,
                expect=PROCESSING,
                reason="result rejected",
                error=JobFailure(outcome.code, outcome.message, outcome.detail),
            )
            session = self._registry.live(job.scanner_id)
            if session is not None:
                session.send(RejectMessage(outcome, job.id))
            return
        job.result_summary = outcome.summary
        if outcome.in_file:
            job.result_in_file = True
            job.result = None  # kept apart now: keep RAM for the queue
        if self.deliver is not None:
            self.deliver(job)
            return
        await self._transitions.move(
            job.id,
            JobStatus.FINISHED,
            expect=PROCESSING,
            reason=RESULTS_STORED,
            summary=outcome.summary,
        )

    async def load_result(self, job: Job) -> common_pb2.ScanResult | None:
        if job.result is not None:
            result: common_pb2.ScanResult = job.result
            return result
        if not job.result_in_file:
            return None
        payload = await asyncio.to_thread(self._repository.read_result, job.id)
        return common_pb2.ScanResult.FromString(payload) if payload is not None else None
