"""The service layer without gRPC: a Handler on the in-memory repository, with scanner
sessions whose messages a test collects. What the transport adds (protobuf, streams) is tested
elsewhere; here is the logic of runs, retries, dispatch, results and cancels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pytest

from imagehandler.errors import Catalogue, HandlerError
from imagehandler.v1 import common_pb2
from server.config import Config
from server.core.model import ImageRef, Job, JobSpec, JobStatus, Lane, ObjectKind, Policy, Trigger
from server.core.retry import RunFailure
from server.service.events import Subscription
from server.service.handler import Handler
from server.service.sessions import (
    AssignJobs,
    CancelRun,
    Database,
    DrainScanner,
    RejectMessage,
    ScannerMessage,
    ScannerProfile,
    ScannerSession,
)
from server.storage.memory import MemoryRepository
from server.storage.repository import Claimed, Demand

S = JobStatus
CONFIG = Config(heartbeat_timeout=60.0, result_wait=60.0, max_runs=3)


@dataclass
class FakeScanner:
    """A scanner session's far end: what the handler sent it."""

    messages: list[ScannerMessage] = field(default_factory=list)
    closed: list[HandlerError] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, message: ScannerMessage) -> None:
        self.messages.append(message)
        self.arrived.set()

    def close(self, error: HandlerError) -> None:
        self.closed.append(error)

    async def assigned(self) -> list[Job]:
        """Jobs of the next assignment (waits for it, with a deadline)."""
        async with asyncio.timeout(5):
            while True:
                for index, message in enumerate(self.messages):
                    if isinstance(message, AssignJobs):
                        del self.messages[index]
                        return list(message.jobs)
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def handler() -> AsyncIterator[Handler]:
    handler = Handler(CONFIG, MemoryRepository())
    await handler.open()
    yield handler
    await handler.stop()


def spec(tag: str, lane: Lane = Lane.BULK) -> JobSpec:
    return JobSpec(
        ImageRef("docker.io", "library/app", tag), Trigger.MANUAL, (Policy.MALWARE,), 600.0, lane
    )


def connect(
    handler: Handler,
    name: str,
    slots: int = 1,
    kinds: frozenset[ObjectKind] = frozenset(ObjectKind),
) -> tuple[ScannerSession, FakeScanner]:
    far = FakeScanner()
    profile = ScannerProfile(name, "1", "test", kinds, slots, (Database("db", "1", "2026-11-20"),))
    session = handler.connect_scanner(profile, far.send, far.close)
    handler.scanner_ready(session, slots)
    return session, far


async def status_of(handler: Handler, job_id: str, want: JobStatus) -> Job:
    """The job once it is in ``want`` (events, with a deadline)."""
    reached = asyncio.Event()

    def listener(job: Job, transition: object) -> None:
        if job.id == job_id and job.status is want:
            reached.set()

    subscription = Subscription(listener, job_id)
    handler.events.subscribe(subscription)
    try:
        job = await handler.get(job_id)
        if job.status is not want:
            async with asyncio.timeout(5):
                await reached.wait()
        return await handler.get(job_id)
    finally:
        handler.events.unsubscribe(subscription)


async def test_a_job_goes_to_a_free_scanner_and_finishes_with_its_result(
    handler: Handler,
) -> None:
    session, far = connect(handler, "s1")
    (submitted,) = await handler.submit_many([spec("a")])
    (job,) = await far.assigned()
    assert job.id == submitted.job.id
    assert (job.status, job.runs, job.scanner_id) == (S.IN_PROGRESS, 1, "s1")
    assert not session.is_free  # its one slot is held
    await handler.result(session, job.id, 1, common_pb2.ScanResult(job_id=job.id))
    done = await status_of(handler, job.id, S.FINISHED)
    assert done.result_summary.verdict == common_pb2.VERDICT_PASSED
    assert [t.to_status for t in done.history] == [
        S.PENDING, S.IN_PROGRESS, S.PROCESSING_RESULTS, S.FINISHED,
    ]  # fmt: skip
    assert session.is_free


async def test_free_scanners_share_the_work_in_turn(handler: Handler) -> None:
    scanners = [connect(handler, f"s{n}", slots=2) for n in range(3)]
    submitted = await handler.submit_many([spec(f"j{n}") for n in range(4)])
    got = [[j.id for j in await far.assigned()] for _, far in scanners[:2]]
    got.append([j.id for j in await scanners[2][1].assigned()])
    ids = [s.job.id for s in submitted]
    # One job per scanner per pass, in ring order; the fourth goes round again.
    assert got == [[ids[0], ids[3]], [ids[1]], [ids[2]]]


class CountingRepository(MemoryRepository):
    """Counts the demands each claim is asked with (how many Free scanners a pass asks)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    async def claim(self, demands: Sequence[Demand], *, at: datetime) -> list[Claimed]:
        self.asked.append(len(demands))
        return await super().claim(demands, at=at)


async def test_a_pass_asks_as_many_free_scanners_as_there_are_jobs() -> None:
    """Dispatch cost follows the jobs handed out: with 200 idle scanners, one new job is
    offered to one scanner, not to all 200."""
    repository = CountingRepository()
    handler = Handler(CONFIG, repository)
    await handler.open()
    try:
        scanners = [connect(handler, f"s{n}") for n in range(200)]
        repository.asked.clear()
        (submitted,) = await handler.submit_many([spec("one")])
        (job,) = await scanners[0][1].assigned()
        assert job.id == submitted.job.id
        assert repository.asked == [1]
    finally:
        await handler.stop()


async def test_a_job_only_later_scanners_take_is_still_assigned() -> None:
    """The first scanners in the ring take only nodes; the image job goes to the first one
    further round that takes images, in a few claims rather than one per scanner."""
    repository = CountingRepository()
    handler = Handler(CONFIG, repository)
    await handler.open()
    try:
        for n in range(100):
            connect(handler, f"node{n}", kinds=frozenset({ObjectKind.NODE}))
        _, images = connect(handler, "images", kinds=frozenset({ObjectKind.IMAGE}))
        repository.asked.clear()
        (submitted,) = await handler.submit_many([spec("img")])
        (job,) = await images.assigned()
        assert job.id == submitted.job.id
        assert sum(repository.asked) <= 2 * 101
        assert len(repository.asked) <= 8
    finally:
        await handler.stop()


async def test_a_pass_waits_while_the_free_scanners_are_lent_to_an_insert(
    handler: Handler,
) -> None:
    """A store that claims in an insert's transaction borrows the Free scanners' demands:
    while they are lent, no pass claims for the same free slots (and no second loan is
    made); once the loan comes back, what is still queued is dispatched."""
    _, far = connect(handler, "s1", slots=2)
    lent = await handler.dispatch.lend()
    assert lent == [Demand("s1", frozenset(ObjectKind), 2)]
    assert await handler.dispatch.lend() == []  # one loan at a time
    (submitted,) = await handler.submit_many([spec("queued")])
    await handler.dispatch.once()  # the pass the submit asked for: it claims nothing now
    assert far.messages == []
    handler.dispatch.hand([])  # the insert's claim took nothing
    (job,) = await far.assigned()
    assert job.id == submitted.job.id


class GatedClaims(MemoryRepository):
    """Claims that wait for ``gate``: a pass held in its round trip, as on PostgreSQL."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.claiming = asyncio.Event()

    async def claim(self, demands: Sequence[Demand], *, at: datetime) -> list[Claimed]:
        self.claiming.set()
        await self.gate.wait()
        return await super().claim(demands, at=at)


async def test_a_loan_asked_while_a_pass_claims_waits_for_it_and_no_pass_cuts_in() -> None:
    """A batch of inserts that asks for the Free scanners while a pass is claiming gets them
    once that pass ends (instead of none, which would leave its jobs for another pass);
    a pass asked meanwhile waits for the loan to come back."""
    repository = GatedClaims()
    handler = Handler(CONFIG, repository)
    await handler.open()
    try:
        _, far = connect(handler, "s1", slots=2)
        (submitted,) = await handler.submit_many([spec("first")])  # asks for a pass
        async with asyncio.timeout(5):
            await repository.claiming.wait()
        loan = asyncio.create_task(handler.dispatch.lend())
        await asyncio.sleep(0)
        assert not loan.done()  # waiting for the pass
        repository.claiming.clear()
        handler.dispatch.request()  # a pass asked while the loan waits
        repository.gate.set()
        (first,) = await far.assigned()
        async with asyncio.timeout(5):
            lent = await loan
        assert lent == [Demand("s1", frozenset(ObjectKind), 1)]  # what the pass left free
        await asyncio.sleep(0)
        assert not repository.claiming.is_set()  # no pass while the loan is out
        (second,) = await handler.submit_many([spec("second")])
        handler.dispatch.hand([])  # the loan's claim took nothing: the skipped pass runs
        (job,) = await far.assigned()
        assert first.id == submitted.job.id
        assert job.id == second.job.id
    finally:
        await handler.stop()


async def test_a_loan_asked_while_a_pass_claims_a_backlog_goes_at_once() -> None:
    """When the last pass left no scanner Free, a pass claiming now would leave nothing to
    lend either: the batch of inserts is not held up behind it."""
    repository = GatedClaims()
    handler = Handler(CONFIG, repository)
    await handler.open()
    try:
        _, far1 = connect(handler, "s1", slots=1)
        repository.gate.set()
        await handler.submit_many([spec("one"), spec("two")])
        (first,) = await far1.assigned()  # the pass filled the only Free scanner
        repository.gate.clear()
        repository.claiming.clear()
        _, far2 = connect(handler, "s2", slots=1)  # Free: asks for a pass, which claims
        async with asyncio.timeout(5):
            await repository.claiming.wait()
        async with asyncio.timeout(5):
            assert await handler.dispatch.lend() == []
        repository.gate.set()
        (second,) = await far2.assigned()
        assert (first.spec.target, second.spec.target) == (spec("one").target, spec("two").target)
    finally:
        await handler.stop()


async def test_a_loan_cancelled_while_it_waits_leaves_no_job_behind() -> None:
    """A batch of inserts cancelled while it waits for a pass (its submits gone): a job
    queued meanwhile, whose pass was put off for that loan, is still dispatched."""
    repository = GatedClaims()
    handler = Handler(CONFIG, repository)
    await handler.open()
    try:
        _, far = connect(handler, "s1", slots=2)
        (first,) = await handler.submit_many([spec("first")])
        async with asyncio.timeout(5):
            await repository.claiming.wait()
        loan = asyncio.create_task(handler.dispatch.lend())
        await asyncio.sleep(0)
        (second,) = await handler.submit_many([spec("second")])  # asks for a pass
        repository.gate.set()
        loan.cancel()
        await asyncio.gather(loan, return_exceptions=True)
        got = {job.id for job in await far.assigned()}
        if len(got) < 2:  # one pass may have claimed both
            got |= {job.id for job in await far.assigned()}
        assert got == {first.job.id, second.job.id}
    finally:
        await handler.stop()


async def test_three_failed_runs_then_error_with_the_last_code(handler: Handler) -> None:
    session, far = connect(handler, "s1")
    (submitted,) = await handler.submit_many([spec("a")])
    for run in (1, 2, 3):
        (job,) = await far.assigned()
        assert job.runs == run
        await handler.failure(
            session, job.id, RunFailure(Catalogue.SUBPROCESS_FAILED, f"run {run} failed")
        )
    failed = await status_of(handler, submitted.job.id, S.ERROR)
    assert failed.error is not None
    assert failed.error.code == "HNDL-006"
    assert "run 3 failed" in failed.error.message


async def test_a_permanent_failure_is_error_at_once(handler: Handler) -> None:
    session, far = connect(handler, "s1")
    await handler.submit_many([spec("a")])
    (job,) = await far.assigned()
    await handler.failure(
        session, job.id, RunFailure(Catalogue.SCAN_PARAMS_EMPTY, "no such image", True)
    )
    failed = await status_of(handler, job.id, S.ERROR)
    assert failed.runs == 1


async def test_a_scanner_that_leaves_gives_its_jobs_back_and_the_run_counts(
    handler: Handler,
) -> None:
    session, far = connect(handler, "s1", slots=2)
    await handler.submit_many([spec("a"), spec("b")])
    held = await far.assigned()
    assert len(held) == 2
    handler.disconnect(session, RunFailure(Catalogue.SYSTEM_ERROR, "stream ended"))
    for job in held:
        back = await status_of(handler, job.id, S.PENDING)
        assert back.runs == 1
        assert back.error is not None
    _, far2 = connect(handler, "s2", slots=2)
    again = await far2.assigned()
    assert [j.id for j in again] == [j.id for j in held]  # their own places, in order
    assert all(j.runs == 2 for j in again)


async def test_cancelling_a_running_job_tells_its_scanner(handler: Handler) -> None:
    session, far = connect(handler, "s1")
    await handler.submit_many([spec("a")])
    (job,) = await far.assigned()
    cancelled = await handler.cancel(job.id, "not needed")
    assert cancelled.status is S.CANCELLED
    assert any(isinstance(m, CancelRun) and m.job_id == job.id for m in far.messages)
    with pytest.raises(HandlerError) as refused:
        await handler.cancel(job.id)
    assert refused.value.code == "HNDL-008"
    # A result for the cancelled run is refused on the stream.
    await handler.result(session, job.id, 1, common_pb2.ScanResult(job_id=job.id))
    assert any(isinstance(m, RejectMessage) and m.job_id == job.id for m in far.messages)


async def test_a_run_past_its_deadline_times_out(handler: Handler) -> None:
    _, far = connect(handler, "s1")
    quick = replace(spec("a"), max_run_time=0.1)
    (submitted,) = await handler.submit_many([quick])
    await far.assigned()
    back = await status_of(handler, submitted.job.id, S.PENDING)
    assert back.error is not None
    assert back.error.code == "HNDL-004"
    assert any(isinstance(m, CancelRun) for m in far.messages)


async def test_draining_takes_no_new_work_and_waits_for_running_jobs(handler: Handler) -> None:
    session, far = connect(handler, "s1")
    await handler.submit_many([spec("a")])
    (job,) = await far.assigned()
    drained = asyncio.create_task(handler.drain(5))
    await asyncio.sleep(0)  # let the drain start (it tells the scanner at once)
    assert any(isinstance(m, DrainScanner) for m in far.messages)
    with pytest.raises(HandlerError) as refused:
        await handler.submit_many([spec("b")])
    assert "shutting down" in refused.value.detail
    await handler.result(session, job.id, 1, common_pb2.ScanResult(job_id=job.id))
    assert await drained


async def test_nothing_is_answered_before_recovery_ends() -> None:
    handler = Handler(CONFIG, MemoryRepository())
    with pytest.raises(HandlerError) as refused:
        await handler.submit_many([spec("a")])
    assert "recovering" in refused.value.detail
    assert datetime.now(UTC) >= handler.started_at
