"""Runs and retries: a run counts at assignment; three runs without a result is ERROR with the
last failure's code; a run ends by failure report, disconnect, heartbeat silence or timeout."""

from __future__ import annotations

from google.protobuf import duration_pb2

from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from tests.conftest import Handler, MakeHandler
from tests.helpers import RawScanner, image, wait_for_status

S = common_pb2


async def get(handler: Handler, job_id: str) -> common_pb2.Job:
    response = await handler.jobs.GetJob(
        job_service_pb2.GetJobRequest(job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL)
    )
    return response.job


async def test_three_failure_reports_make_error_with_the_last_code(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        codes = ["HNDL-006", "HNDL-007", "HNDL-006"]
        for run, code in enumerate(codes, start=1):
            (job,) = await scanner.assigned()
            assert (job.job_id, job.run) == (job_id, run)
            await scanner.fail(job, code=code, detail=f"trivy exited 1 on run {run}")
        final = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert final.runs == 3
    assert final.error.code == "HNDL-006"
    assert final.error.message == "HNDL-006: trivy exited 1 on run 3"
    history = (await get(handler, job_id)).history
    assert [(t.from_status, t.to_status, t.run) for t in history] == [
        (S.JOB_STATUS_UNSPECIFIED, S.JOB_STATUS_PENDING, 0),
        (S.JOB_STATUS_PENDING, S.JOB_STATUS_IN_PROGRESS, 1),
        (S.JOB_STATUS_IN_PROGRESS, S.JOB_STATUS_PENDING, 1),
        (S.JOB_STATUS_PENDING, S.JOB_STATUS_IN_PROGRESS, 2),
        (S.JOB_STATUS_IN_PROGRESS, S.JOB_STATUS_PENDING, 2),
        (S.JOB_STATUS_PENDING, S.JOB_STATUS_IN_PROGRESS, 3),
        (S.JOB_STATUS_IN_PROGRESS, S.JOB_STATUS_ERROR, 3),
    ]
    assert all(t.scanner_id == "s1" for t in history[1:])


async def test_disconnects_count_as_runs(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    for run in (1, 2, 3):
        async with RawScanner(handler.scanners, f"s{run}") as scanner:
            await scanner.start()
            (job,) = await scanner.assigned()
            assert job.run == run
        # Leaving the block cancels the stream: the run ends without a result.
        if run < 3:
            await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_PENDING)
    final = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert final.runs == 3
    assert final.error.code == "HNDL-007"
    assert "disconnected" in final.error.detail


async def test_silent_scanner_loses_its_job_and_the_run_counts(make_handler: MakeHandler) -> None:
    handler = await make_handler(heartbeat_timeout=0.6)
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    silent = RawScanner(handler.scanners, "silent", heartbeat_every=None)
    await silent.start()
    (job,) = await silent.assigned()
    back = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_PENDING)
    assert back.runs == 1
    assert back.error.code == "HNDL-004"
    assert "silent" in back.error.detail
    await silent.close()
    async with RawScanner(handler.scanners, "alive") as alive:
        await alive.start()
        (job,) = await alive.assigned()
        assert (job.job_id, job.run) == (job_id, 2)
        await alive.finish(job)
        done = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    assert done.runs == 2


async def test_max_run_time_times_out_with_hndl_004(make_handler: MakeHandler) -> None:
    handler = await make_handler(max_runs=2)
    request = image(max_run_time=duration_pb2.Duration(nanos=300_000_000))
    job_id = (await handler.jobs.SubmitJob(request)).job.id
    async with RawScanner(handler.scanners, "slow") as scanner:
        await scanner.start()
        for run in (1, 2):
            (job,) = await scanner.assigned()
            assert job.run == run
            cancel = await scanner.expect("cancel")
            assert cancel.job_id == job_id
            scanner.held.remove(job.job_id)
        final = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert final.error.code == "HNDL-004"
    assert final.error.message.startswith("HNDL-004: scan time out: run 2 exceeded")


async def test_result_wait_without_progress_times_out(make_handler: MakeHandler) -> None:
    handler = await make_handler(result_wait=0.4, max_runs=1)
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "quiet") as scanner:
        await scanner.start()
        (_job,) = await scanner.assigned()
        scanner.held.clear()  # the scanner's heartbeats no longer name the job
        await scanner.expect("cancel")
        final = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert final.error.code == "HNDL-004"
    assert "no progress or heartbeat" in final.error.detail


async def test_progress_keeps_a_run_alive_past_the_result_wait(make_handler: MakeHandler) -> None:
    handler = await make_handler(result_wait=0.5, heartbeat_interval=0.2)
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "busy", heartbeat_every=None) as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        # Eight handler heartbeats (0.2 s apart) span three times the result wait; progress
        # after each one keeps the run alive, so nothing but heartbeats may arrive.
        for percent in range(8):
            await scanner.send(
                progress=scanner_service_pb2.Progress(
                    job_id=job_id, stage="analyse", percent=percent
                )
            )
            message = await scanner.call.read()
            assert message.WhichOneof("message") == "heartbeat", message
        await scanner.finish(job)
        done = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    assert done.runs == 1


async def test_hndl_005_failure_is_error_at_once(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        await scanner.fail(job, code="HNDL-005", detail="manifest unknown")
        final = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert final.runs == 1
    assert final.error.message == "HNDL-005: scan params empty: manifest unknown"


async def test_permanent_failure_is_error_at_once(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        await scanner.fail(job, code="HNDL-006", detail="unsupported format", permanent=True)
        final = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert final.runs == 1


async def test_failed_job_returns_to_its_place_ahead_of_later_arrivals(handler: Handler) -> None:
    first = (await handler.jobs.SubmitJob(image(tag="first"))).job.id
    second = (await handler.jobs.SubmitJob(image(tag="second"))).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        assert job.job_id == first
        third = (await handler.jobs.SubmitJob(image(tag="third"))).job.id
        await scanner.fail(job)
        order = []
        for _ in range(3):
            (job,) = await scanner.assigned()
            order.append(job.job_id)
            await scanner.finish(job)
    assert order == [first, second, third]
