"""Forwarding to the receiving server (the seed's "mdw adapter").

What a job owes the receiving server is read from the job itself, never kept only here: its
status changes past ``job.delivered`` (acknowledgements are journaled), its processed result
while it waits in PROCESSING_RESULTS, and a verdict change past ``job.verdict_delivered``. The
:class:`Outbox` only remembers which jobs owe something and sends, in order per job, with a
fixed number of senders so that a backlog (after a restart, or a receiver that was down) never
opens more connections than the receiver's pool holds. Nothing owed is ever dropped: a failed
delivery is retried with backoff until it is acknowledged; when a job's result cannot be
delivered within ``--delivery-attempts`` the job manager records HNDL-001 on the job and keeps
the result for ``RedeliverJob``, while the job's status changes go on being retried.

Only what the receiving server answered (or a connection that could not be made) counts as a
failed attempt. A wait inside this process (for a pooled connection) is not the receiver's
fault and is retried without counting.

The receivers (webhook, gRPC) are in :mod:`server.adapters.receivers`.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import common_pb2, result_sink_pb2
from server import mapping
from server.core.model import Job, JobFailure, JobStatus, Trigger
from server.core.verdicts import VerdictPolicy
from server.service.rematch import set_findings_change
from server.service.transitions import Transitions
from server.storage.repository import JobRepository

log = structlog.get_logger("imagehandler.delivery")

# Rematches of rematches followed back to the scan they started from.
MAX_REMATCH_CHAIN = 1000
# A delivery that waited inside this process is tried again after this long, uncounted.
DEFERRED_RETRY_SECONDS = 0.05
# How often a replica on a shared store asks for deliveries a dead replica owed.
ADOPT_TICK = 0.5


class DeliveryFailed(Exception):
    """The receiving server did not take the delivery; the text says what it answered."""


class DeliveryDeferred(Exception):
    """The delivery could not start for a reason local to this process; it is not the
    receiver's failure and costs no attempt."""


class Receiver(Protocol):
    async def send(self, request: result_sink_pb2.DeliverRequest) -> None: ...
    async def close(self) -> None: ...


class Kind(enum.Enum):
    STATUS = "status"
    RESULT = "result"
    VERDICT = "verdict"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event, built when it is sent."""

    job_id: str
    kind: Kind
    request: result_sink_pb2.DeliverRequest
    # What its acknowledgement completes: the history length (STATUS), the run (RESULT) or
    # the verdict version (VERDICT).
    mark: int


class Owed(Protocol):
    """The job manager's side: what a job owes, and what happened to it."""

    async def next_delivery(self, job_id: str) -> Delivery | None:
        """The job's next owed event (journaled before it is returned), or None."""

    async def delivered(self, delivery: Delivery) -> None: ...

    async def failed(self, delivery: Delivery, answer: str, failures: int) -> None:
        """The receiver refused it; ``failures`` in a row for this job, this one included."""


class _State(enum.Enum):
    READY = 1
    SENDING = 2
    WAITING = 3


@dataclass(slots=True)
class _Tracked:
    since: float  # loop time the job began to owe
    state: _State = _State.READY
    failures: int = 0
    last_answer: str = ""


class Outbox:
    """Jobs that owe deliveries, sent in order per job by a fixed pool of senders."""

    def __init__(
        self,
        receiver: Receiver,
        owed: Owed,
        *,
        senders: int,
        backoff: float,
        max_backoff: float = 30.0,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.receiver = receiver
        self._owed = owed
        self._senders = senders
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._on_failure = on_failure
        self._tracked: dict[str, _Tracked] = {}
        self._ready: deque[str] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Failures in a row across all jobs: while the receiver fails everything, every sender
        # waits, so a long backlog does not hammer a receiver that is down.
        self._streak = 0
        self._paused_until = 0.0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._send_forever(), name=f"delivery-sender-{n}")
            for n in range(self._senders)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self.receiver.close()

    def owe(self, job_id: str) -> None:
        """The job has something (more) to deliver. A job already tracked is looked at again
        after its current send or wait, so one call per change is enough and cheap."""
        if job_id in self._tracked:
            return
        self._tracked[job_id] = _Tracked(since=asyncio.get_running_loop().time())
        self._make_ready(job_id)

    @property
    def owing(self) -> int:
        """Jobs that owe at least one delivery."""
        return len(self._tracked)

    def oldest_age(self) -> float:
        if not self._tracked:
            return 0.0
        now = asyncio.get_running_loop().time()
        return now - min(t.since for t in self._tracked.values())

    def last_answer(self, job_id: str) -> str:
        tracked = self._tracked.get(job_id)
        return tracked.last_answer if tracked is not None else ""

    def _make_ready(self, job_id: str) -> None:
        self._timers.pop(job_id, None)
        tracked = self._tracked.get(job_id)
        if tracked is None:
            return
        tracked.state = _State.READY
        self._ready.append(job_id)
        self._wake.set()

    async def _take(self) -> str:
        while not self._ready:
            self._wake.clear()
            await self._wake.wait()
        return self._ready.popleft()

    async def _send_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job_id = await self._take()
            tracked = self._tracked.get(job_id)
            if tracked is None or tracked.state is not _State.READY:
                continue
            tracked.state = _State.SENDING
            pause = self._paused_until - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                delivery = await self._owed.next_delivery(job_id)
            except Exception:  # a sender must survive any one job
                log.exception("delivery.build_failed", job_id=job_id)
                self._retry_later(job_id, tracked, self.max_backoff)
                continue
            if delivery is None:
                del self._tracked[job_id]  # nothing more is owed
                continue
            try:
                await self.receiver.send(delivery.request)
            except DeliveryDeferred:
                self._retry_later(job_id, tracked, DEFERRED_RETRY_SECONDS)
                continue
            except DeliveryFailed as exc:
                await self._failed(job_id, tracked, delivery, str(exc) or "no answer")
                continue
            self._streak = 0
            tracked.failures = 0
            tracked.last_answer = ""
            await self._owed.delivered(delivery)
            # To the back of the line: a job with many owed events does not hold a sender.
            self._make_ready(job_id)

    async def _failed(
        self, job_id: str, tracked: _Tracked, delivery: Delivery, answer: str
    ) -> None:
        tracked.failures += 1
        tracked.last_answer = answer
        self._streak += 1
        self._on_failure()
        log.warning(
            "delivery.failed",
            job_id=job_id,
            key=delivery.request.idempotency_key,
            attempt=tracked.failures,
            answer=answer,
        )
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + self._delay(self._streak))
        await self._owed.failed(delivery, answer, tracked.failures)
        self._retry_later(job_id, tracked, self._delay(tracked.failures))

    def _delay(self, failures: int) -> float:
        """Exponential backoff with equal jitter: at least half the step, at most the cap."""
        step = min(self.max_backoff, self.backoff * 2.0 ** min(failures - 1, 30))
        return step / 2 + random.uniform(0, step / 2)

    def _retry_later(self, job_id: str, tracked: _Tracked, delay: float) -> None:
        tracked.state = _State.WAITING
        loop = asyncio.get_running_loop()
        self._timers[job_id] = loop.call_later(delay, self._make_ready, job_id)


PROCESSING = frozenset({JobStatus.PROCESSING_RESULTS})


class DeliveryBook:
    """What each job owes the receiving server, read from the job itself, in order: its
    status changes, then its processed result, then a verdict change."""

    def __init__(
        self,
        repository: JobRepository,
        transitions: Transitions,
        receiver: Receiver,
        *,
        senders: int,
        attempts: int,
        backoff: float,
        max_backoff: float,
        on_failure: Callable[[], None],
        load_result: Callable[[Job], Awaitable[common_pb2.ScanResult | None]],
        position: Callable[[Job], Awaitable[int]],
        policy: VerdictPolicy | None = None,
    ) -> None:
        self._repository = repository
        self._policy = policy or VerdictPolicy()
        self._transitions = transitions
        self._attempts = attempts
        self._load_result = load_result
        self._position = position
        self.outbox = Outbox(
            receiver,
            self,
            senders=senders,
            backoff=backoff,
            max_backoff=max_backoff,
            on_failure=on_failure,
        )
        transitions.owe = self.outbox.owe
        self._adopting: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.outbox.start()
        if self._repository.shared:
            self._adopting = asyncio.create_task(self._adopt(), name="delivery-adopt")

    async def stop(self) -> None:
        # What is owed is read from the jobs again after a restart (results: the job is still
        # PROCESSING_RESULTS; the rest: the store knows what was acknowledged).
        if self._adopting is not None:
            self._adopting.cancel()
            await asyncio.gather(self._adopting, return_exceptions=True)
            self._adopting = None
        await self.outbox.close()

    async def _adopt(self) -> None:
        """On a shared store, the deliveries a dead replica owed (it died mid-send, or with a
        receiver refusing) become this replica's: at start, and whenever the store finds
        more."""
        while True:
            try:
                for job_id in await self._repository.orphaned_deliveries():
                    self.outbox.owe(job_id)
            except Exception:  # the store is away: the next check takes them
                log.warning("delivery.adopt_failed", exc_info=True)
            await asyncio.sleep(ADOPT_TICK)  # a pacing tick; the store paces its queries

    def owe(self, job: Job) -> None:
        self.outbox.owe(job.id)

    def deliver_result(self, job: Job) -> None:
        """The job's processed result waits in PROCESSING_RESULTS for the receiving server."""
        job.awaiting_delivery = True
        self.outbox.owe(job.id)

    def owed(self, job: Job) -> int:
        """Deliveries the job still owes the receiving server."""
        owed = len(job.history) - job.delivered
        if job.awaiting_delivery:
            owed += 1
        if job.verdict_delivered < job.verdict_version:
            owed += 1
        return owed

    def last_answer(self, job: Job) -> str:
        return self.outbox.last_answer(job.id)

    async def next_delivery(self, job_id: str) -> Delivery | None:
        """The job's next owed event. The store has it before anyone hears of it."""
        job = await self._repository.get(job_id)
        if job is None:
            return None  # pruned
        self._repository.flush()
        if job.delivered < len(job.history):
            request = result_sink_pb2.DeliverRequest(idempotency_key=f"{job.id}:{job.delivered}")
            mapping.set_job(request.job, job, position=await self._position(job))
            mapping.set_transition(request.transition, job.history[job.delivered])
            return Delivery(job.id, Kind.STATUS, request, job.delivered + 1)
        if job.awaiting_delivery:
            result = await self._load_result(job)
            if result is None:
                await self._undeliverable(job, "the stored result could not be read")
                return await self.next_delivery(job_id)
            request = result_sink_pb2.DeliverRequest(
                idempotency_key=f"{job.id}:result:{job.runs}", result=result
            )
            mapping.set_job(request.job, job, position=0)
            if job.spec.trigger is Trigger.REMATCH:
                found = request.findings_change
                await self._findings_change(job, result, found)
                if found.verdict_changed and job.result_summary is not None:
                    # The object's verdict changed: said as a verdict change too, for the
                    # receivers that follow verdicts alone.
                    request.verdict_change.verdict = found.verdict
                    request.verdict_change.summary.CopyFrom(job.result_summary)
                    request.verdict_change.cause = (
                        f"rematch of job {found.previous_job_id} against vulnerability "
                        f"database {found.database}"
                    )
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

    async def _findings_change(
        self,
        job: Job,
        result: common_pb2.ScanResult,
        change: result_sink_pb2.FindingsChange,
    ) -> None:
        """A rematch's change since the scan it names (rematch_of), and the object scanned
        (the first scan of the chain of rematches)."""
        previous = await self._repository.get(job.spec.rematch_of)
        before = await self._load_result(previous) if previous is not None else None
        set_findings_change(change, previous, before, result, self._policy)
        origin = previous
        for _ in range(MAX_REMATCH_CHAIN):
            if origin is None or origin.spec.trigger is not Trigger.REMATCH:
                break
            origin = await self._repository.get(origin.spec.rematch_of)
        if origin is not None and origin.spec.trigger is not Trigger.REMATCH:
            mapping.set_object(change.object, origin.spec.target)

    async def delivered(self, delivery: Delivery) -> None:
        job = await self._repository.get(delivery.job_id)
        if job is None:
            return
        if delivery.kind is Kind.STATUS:
            if delivery.mark > job.delivered:
                job.delivered = delivery.mark
                await self._repository.acknowledge(job)
        elif delivery.kind is Kind.VERDICT:
            if delivery.mark > job.verdict_delivered:
                job.verdict_delivered = delivery.mark
                await self._repository.acknowledge(job)
        elif job.awaiting_delivery and job.status is JobStatus.PROCESSING_RESULTS:
            job.awaiting_delivery = False
            await self._transitions.move(
                job.id,
                JobStatus.FINISHED,
                expect=PROCESSING,
                reason="results delivered",
                summary=job.result_summary,
            )

    async def failed(self, delivery: Delivery, answer: str, failures: int) -> None:
        """A job whose result waits on a receiver that keeps refusing records HNDL-001 and
        keeps its result; its status changes go on being retried."""
        job = await self._repository.get(delivery.job_id)
        if job is None or not job.awaiting_delivery:
            return
        if failures >= self._attempts:
            await self._undeliverable(job, answer)

    async def _undeliverable(self, job: Job, answer: str) -> None:
        job.awaiting_delivery = False
        if job.status is not JobStatus.PROCESSING_RESULTS:
            return
        error = HandlerError(Catalogue.MDW_ADAPTER_SEND_STATUS, answer)
        await self._transitions.move(
            job.id,
            JobStatus.ERROR,
            expect=PROCESSING,
            reason="delivery to the receiving server failed; the result is kept",
            error=JobFailure(error.code, error.message, error.detail),
            summary=job.result_summary,
        )

    async def redeliver(self, job: Job) -> Job:
        """Deliver a kept result again after HNDL-001."""
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
        moved = await self._transitions.move(
            job.id,
            JobStatus.PROCESSING_RESULTS,
            expect=frozenset({JobStatus.ERROR}),
            reason="redelivery requested",
        )
        if moved is None:
            return job
        self.deliver_result(moved.job)
        return moved.job
