"""The scanner client's per-job shortcuts: deadlines armed only for scans that outlive their
first step, one Results message for the results of one loop turn, the outbox's event
shortcuts, the noop engine's cached result, and the optional uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from imagehandler.v1 import common_pb2, scanner_service_pb2
from scanner_client import protocol
from scanner_client.cli import loop_factory, parse_args
from scanner_client.client import (
    ClientConfig,
    Registration,
    ScannerClient,
    _RunningJob,
    _Session,
)
from scanner_client.engine import Database, Engine, Job, ProgressReporter
from scanner_client.engines.noop import NoopEngine
from scanner_client.outbox import Outbox
from server import config as handler_config
from server.cli import loop_factory as handler_loop_factory


class _Engine(Engine):
    """``done``: returns at once; ``yield-then-hang``: one await that returns, then hangs."""

    name = "test"

    def databases(self) -> Sequence[Database]:
        return [Database("db", "1", "2026-01-01")]

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        if job.labels.get("mode") == "yield-then-hang":
            await asyncio.sleep(0)
            await asyncio.Event().wait()
        return common_pb2.ScanResult(verdict=common_pb2.VERDICT_PASSED)


def _session(client: ScannerClient) -> _Session:
    return _Session(
        call=None,  # type: ignore[arg-type]
        outbox=Outbox(),
        registration=Registration("s", 5.0, 15.0),
        databases=(),
        log=structlog.get_logger("test").bind(),
        registered_at=0.0,
    )


def _assignment(*jobs: tuple[str, float, str]) -> scanner_service_pb2.ConnectResponse:
    """(job id, seconds to the deadline, mode) for each job."""
    response = scanner_service_pb2.ConnectResponse()
    for job_id, seconds, mode in jobs:
        assigned = response.assignment.jobs.add(job_id=job_id, run=1)
        assigned.object.image.repository = "library/app"
        assigned.deadline.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
        assigned.labels["mode"] = mode
    return response


def _timer_set(running: _RunningJob) -> bool:
    """The run's deadline is armed (its asyncio.Timeout has a time)."""
    return running.timeout is not None and running.timeout.when() is not None


def _expired(running: _RunningJob) -> bool:
    return running.timeout is not None and running.timeout.expired()


async def _sent(outbox: Outbox) -> list[scanner_service_pb2.ConnectRequest]:
    sent = []
    while len(outbox):
        sent.append(await outbox.get())
        outbox.written()
    return sent


async def test_scans_done_in_their_first_step_never_arm_a_timer_and_share_one_message() -> None:
    client = ScannerClient("127.0.0.1:1", _Engine(), ClientConfig(scanner_id="t", slots=8))
    session = _session(client)
    client._dispatch(session, _assignment(*((f"j{n}", 60.0, "done") for n in range(5))))
    running = list(session.jobs.values())
    await asyncio.wait({r.task for r in running})
    await asyncio.sleep(0)  # the arming pass
    assert all(r.armed and not _timer_set(r) and not _expired(r) for r in running)
    assert not session.jobs
    sent = await _sent(session.outbox)
    assert [r.WhichOneof("message") for r in sent] == ["result"]
    assert [(r.job_id, r.run) for r in sent[0].result.results] == [(f"j{n}", 1) for n in range(5)]
    assert client.stats.jobs_assigned == 5


async def test_a_scan_that_waits_gets_its_deadline_after_its_first_step() -> None:
    client = ScannerClient("127.0.0.1:1", _Engine(), ClientConfig(scanner_id="t", slots=8))
    session = _session(client)
    client._dispatch(session, _assignment(("late", 0.2, "yield-then-hang"), ("ok", 0.2, "done")))
    late = session.jobs["late"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert _timer_set(late)  # armed: the scan is still going
    async with asyncio.timeout(5):
        await late.task
    assert _expired(late)
    assert not late.task.cancelled()
    sent = await _sent(session.outbox)
    kinds = [r.WhichOneof("message") for r in sent]
    assert kinds == ["result", "failure"]
    assert sent[1].failure.job_id == "late"
    assert sent[1].failure.code == "HNDL-004"
    assert "deadline" in sent[1].failure.detail


async def test_a_deadline_already_past_fails_a_waiting_scan_and_spares_a_finished_one() -> None:
    client = ScannerClient("127.0.0.1:1", _Engine(), ClientConfig(scanner_id="t", slots=8))
    session = _session(client)
    client._dispatch(session, _assignment(("late", -1.0, "yield-then-hang"), ("ok", -1.0, "done")))
    tasks = {r.task for r in session.jobs.values()}
    async with asyncio.timeout(5):
        await asyncio.wait(tasks)
    sent = await _sent(session.outbox)
    assert [r.WhichOneof("message") for r in sent] == ["result", "failure"]
    assert sent[0].result.results[0].job_id == "ok"
    assert sent[1].failure.code == "HNDL-004"


async def test_a_handler_cancel_is_not_taken_for_the_deadline() -> None:
    client = ScannerClient("127.0.0.1:1", _Engine(), ClientConfig(scanner_id="t", slots=8))
    session = _session(client)
    client._dispatch(session, _assignment(("j1", 60.0, "yield-then-hang")))
    running = session.jobs["j1"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    client._dispatch(
        session,
        scanner_service_pb2.ConnectResponse(
            cancel=scanner_service_pb2.Cancel(job_id="j1", reason="r")
        ),
    )
    await asyncio.wait({running.task})
    assert running.task.cancelled()
    assert not _expired(running)
    assert await _sent(session.outbox) == []
    assert client.stats.jobs_cancelled == 1


async def test_wait_for_hears_of_changes_made_while_it_waits() -> None:
    client = ScannerClient("127.0.0.1:1", _Engine(), ClientConfig(scanner_id="t", slots=8))
    client._notify()  # nobody waits: nothing to do
    waiter = asyncio.create_task(client.wait_for(lambda stats: stats.jobs_assigned == 2))
    await asyncio.sleep(0)
    assert client._watchers == 1
    client.stats.jobs_assigned = 2
    client._notify()
    async with asyncio.timeout(5):
        await waiter
    assert client._watchers == 0


async def test_outbox_wakes_a_waiting_writer_and_goes_idle_again() -> None:
    outbox = Outbox()
    getter = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    outbox.progress("j1", "pull", -5)
    request = await getter
    assert request.progress.percent == 0
    assert not outbox._idle.is_set()
    outbox.progress("j2", "pull", 5)  # the writer is busy: it finds this one by itself
    outbox.written()
    assert (await outbox.get()).progress.job_id == "j2"
    outbox.written()
    await asyncio.wait_for(outbox.wait_idle(), 1)
    outbox.result(common_pb2.ScanResult(job_id="j3"))
    assert not outbox._idle.is_set()
    assert [r.job_id for r in (await outbox.get()).result.results] == ["j3"]


def test_policy_lists_are_converted_once_and_deadlines_shared() -> None:
    deadline = datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)
    first = scanner_service_pb2.AssignedJob(
        job_id="a", policies=[common_pb2.POLICY_MALWARE, common_pb2.POLICY_SECRETS]
    )
    first.deadline.FromDatetime(deadline)
    second = scanner_service_pb2.AssignedJob()
    second.CopyFrom(first)
    one, epoch = protocol.assigned_job(first)
    two, _ = protocol.assigned_job(second)
    assert one.deadline == deadline
    assert one.deadline is two.deadline
    assert epoch == pytest.approx(deadline.timestamp())
    assert one.policies == two.policies
    assert one.policies is two.policies
    assert one.labels == {}
    assert one.object == first.object


async def test_noop_results_are_new_messages_with_todays_database() -> None:
    engine = NoopEngine()
    job = Job(job_id="j", run=1, object=common_pb2.ScanObject())
    first = await engine.scan(job, _Progress())
    second = await engine.scan(job, _Progress())
    assert first is not second
    first.job_id = "changed"
    assert second.job_id == ""
    today = datetime.now(UTC).date().isoformat()
    assert [(d.name, d.version, d.released_at) for d in second.databases] == [("noop", "0", today)]
    assert second.verdict == common_pb2.VERDICT_PASSED
    assert engine.databases() == [Database("noop", "0", today)]


class _Progress:
    def __init__(self) -> None:
        self.reports: list[Any] = []

    def report(self, stage: str, percent: int, message: str = "") -> None:
        self.reports.append((stage, percent))


def test_event_loop_flag_defaults_to_asyncio() -> None:
    assert parse_args([], env={}).event_loop == "asyncio"
    assert loop_factory("asyncio") is None
    with pytest.raises(SystemExit):
        parse_args(["--event-loop", "tokio"], env={})


def assert_makes_uvloop_loops(factory: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
    assert factory is not None
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_event_loop_uvloop_makes_uvloop_loops() -> None:  # uvloop is in the dev extra
    settings = parse_args([], env={"IMAGE_SCANNER_EVENT_LOOP": "uvloop"})
    assert_makes_uvloop_loops(loop_factory(settings.event_loop))


def test_the_handler_event_loop_flag_makes_uvloop_loops() -> None:
    assert handler_loop_factory(handler_config.parse([], environ={})) is None
    config = handler_config.parse(["--event-loop", "uvloop"], environ={})
    assert_makes_uvloop_loops(handler_loop_factory(config))
