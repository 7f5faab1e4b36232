"""The result pipeline: storage, verdicts, risk acceptance, and delivery to a receiving server
(a real HTTP server and a real gRPC ResultSinkService in the tests)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2

from imagehandler.v1 import (
    common_pb2,
    job_service_pb2,
    result_sink_pb2,
    result_sink_pb2_grpc,
    scanner_service_pb2,
)
from tests.conftest import Handler, MakeHandler
from tests.helpers import HIGH, LOW, RawScanner, image, remote_error, scan_once, wait_for_status
from tests.receiver import ReceiverServer

S = common_pb2


async def test_a_delivery_that_fails_twice_is_retried_and_received_once(
    make_handler: MakeHandler, receiver: ReceiverServer, secret_file: Path
) -> None:
    receiver.fail = 2
    handler = await make_handler(
        receiver_url=receiver.url, receiver_secret_file=str(secret_file), delivery_backoff=0.01
    )
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[HIGH])
        done = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    results = receiver.results()
    assert len(results) == 1  # delivered once, after the retries
    key, body, signed = results[0]
    assert signed
    assert key == f"{job_id}:result:1"
    assert body["result"]["vulnerabilities"][0]["id"] == "CVE-2024-6119"
    assert done.result.verdict == S.VERDICT_FAILED
    # Status changes went too, in order, each with its own key.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with receiver.lock:
            keys = [
                k for k, b, _ in receiver.received if "transition" in b and k.startswith(job_id)
            ]
        if len(keys) == 4:
            break
        await asyncio.sleep(0.01)  # polling the receiver's record, with a deadline
    # PENDING, IN_PROGRESS, PROCESSING_RESULTS, FINISHED: each once, in order.
    assert keys == [f"{job_id}:{n}" for n in range(4)]
    with receiver.lock:
        all_keys = [k for k, _, _ in receiver.received]
        assert len(all_keys) == len(set(all_keys))  # nothing was received twice
        assert receiver.attempts == len(all_keys) + 2  # the two failures were retried


async def test_a_receiver_that_keeps_failing_gives_hndl_001_and_redelivery_works(
    make_handler: MakeHandler, receiver: ReceiverServer, secret_file: Path
) -> None:
    receiver.always_fail = True
    handler = await make_handler(
        receiver_url=receiver.url,
        receiver_secret_file=str(secret_file),
        delivery_backoff=0.01,
        delivery_attempts=3,
    )
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[LOW])
        failed = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert failed.error.code == "HNDL-001"
    assert failed.error.message == (
        "HNDL-001: mdw adapter send status: HTTP 503: receiver is down for maintenance"
    )
    kept = await handler.jobs.GetJobResult(job_service_pb2.GetJobResultRequest(job_id=job_id))
    assert [v.id for v in kept.result.vulnerabilities] == ["CVE-2024-5535"]
    receiver.always_fail = False
    receiver.fail = 0
    await handler.jobs.RedeliverJob(job_service_pb2.RedeliverJobRequest(job_id=job_id))
    done = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    assert done.result.verdict == S.VERDICT_PASSED
    assert [k for k, _, _ in receiver.results()] == [f"{job_id}:result:1"]
    again = await remote_error(
        handler.jobs.RedeliverJob(job_service_pb2.RedeliverJobRequest(job_id=job_id))
    )
    assert again.code == "HNDL-008"


async def test_a_slow_result_stays_processing_while_other_jobs_dispatch(
    make_handler: MakeHandler, receiver: ReceiverServer, secret_file: Path
) -> None:
    handler = await make_handler(receiver_url=receiver.url, receiver_secret_file=str(secret_file))
    big = [S.Vulnerability(id=f"CVE-2024-{n:05d}", package=f"pkg{n}", severity=S.SEVERITY_MEDIUM)
           for n in range(5000)]  # fmt: skip
    receiver.gate.clear()  # the receiving server holds every answer until the test says
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        slow = await scan_once(handler, scanner, image(tag="big"), vulnerabilities=big)
        await wait_for_status(handler.jobs, slow, S.JOB_STATUS_PROCESSING_RESULTS)
        other = (await handler.jobs.SubmitJob(image(tag="other"))).job.id
        (job,) = await scanner.assigned()
        assert job.job_id == other  # dispatched while the big result is being processed
        listed = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
        assert slow in listed.scanners[0].processing_job_ids
        stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
        assert stats.processing_results == 1
        receiver.gate.set()
        await scanner.finish(job)
        done = await wait_for_status(handler.jobs, slow, S.JOB_STATUS_FINISHED)
    assert done.result.vulnerabilities_total == 5000
    assert done.result.medium == 5000


async def test_large_and_small_results_survive_a_restart(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    big = [
        S.Vulnerability(
            id=f"CVE-2023-{n:05d}", package=f"package-number-{n}", severity=S.SEVERITY_LOW
        )
        for n in range(3000)
    ]
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        large = await scan_once(handler, scanner, image(tag="large"), vulnerabilities=big)
        small = await scan_once(handler, scanner, image(tag="small"), vulnerabilities=[HIGH])
        await wait_for_status(handler.jobs, large, S.JOB_STATUS_FINISHED)
        await wait_for_status(handler.jobs, small, S.JOB_STATUS_FINISHED)
    data_dir = handler.config.data_dir
    assert list((data_dir / "results").rglob(f"{large}.pb"))  # the large one is in a file
    await handler.server.stop(0)
    handler = await make_handler(data_dir=data_dir)
    got = await handler.jobs.GetJobResult(job_service_pb2.GetJobResultRequest(job_id=large))
    assert len(got.result.vulnerabilities) == 3000
    assert got.summary.low == 3000
    full = await handler.jobs.GetJob(
        job_service_pb2.GetJobRequest(job_id=small, view=job_service_pb2.JOB_VIEW_FULL)
    )
    assert [v.id for v in full.job.full_result.vulnerabilities] == ["CVE-2024-6119"]


async def test_a_malformed_result_is_hndl_005_on_the_stream_and_others_go_on(
    handler: Handler,
) -> None:
    async with RawScanner(handler.scanners, "s1", slots=2) as scanner:
        await scanner.start()
        bad = (await handler.jobs.SubmitJob(image(tag="bad"))).job.id
        good = (await handler.jobs.SubmitJob(image(tag="good"))).job.id
        jobs = {j.job_id: j for j in await scanner.assigned(2)}
        await scanner.finish(jobs[bad], vulnerabilities=[S.Vulnerability(package="no-id")])
        await scanner.finish(jobs[good])
        rejected = await scanner.expect("rejected")
        assert rejected.job_id == bad
        assert rejected.error.message == (
            "HNDL-005: scan params empty: malformed result: vulnerabilities[0] has no id"
        )
        failed = await wait_for_status(handler.jobs, bad, S.JOB_STATUS_ERROR)
        await wait_for_status(handler.jobs, good, S.JOB_STATUS_FINISHED)
    assert failed.error.code == "HNDL-005"


async def get_summary(handler: Handler, job_id: str) -> common_pb2.ResultSummary:
    reply = await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))
    return reply.job.result


async def test_risk_acceptance_flips_a_verdict_and_its_expiry_flips_it_back(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        alpine = await scan_once(handler, scanner, image(tag="3.20"), vulnerabilities=[HIGH, LOW])
        other = await scan_once(handler, scanner, image(repository="library/nginx"),
                                vulnerabilities=[HIGH])  # fmt: skip
        await wait_for_status(handler.jobs, alpine, S.JOB_STATUS_FINISHED)
        await wait_for_status(handler.jobs, other, S.JOB_STATUS_FINISHED)
    summary = await get_summary(handler, alpine)
    assert summary.verdict == S.VERDICT_FAILED
    assert list(summary.failing) == ["CVE-2024-6119"]
    accepted = await handler.jobs.AcceptRisk(
        job_service_pb2.AcceptRiskRequest(
            finding_id="CVE-2024-6119",
            scope=job_service_pb2.RISK_SCOPE_REPOSITORY,
            job_id=alpine,
            reason="not reachable: no TLS in this image",
            duration=duration_pb2.Duration(nanos=600_000_000),
        )
    )
    assert accepted.verdicts_changed == 1  # alpine only: nginx is another repository
    assert accepted.acceptance.target == "docker.io/library/alpine"
    flipped = await get_summary(handler, alpine)
    assert flipped.verdict == S.VERDICT_PASSED
    assert list(flipped.accepted) == ["CVE-2024-6119"]
    assert (await get_summary(handler, other)).verdict == S.VERDICT_FAILED
    # The acceptance expires after 0.6 s and the verdict goes back.
    deadline = time.monotonic() + 10
    while (await get_summary(handler, alpine)).verdict != S.VERDICT_FAILED:
        assert time.monotonic() < deadline, "the acceptance did not expire"
        await asyncio.sleep(0.05)  # polling a condition, with a deadline
    listed = await handler.jobs.ListRiskAcceptances(job_service_pb2.ListRiskAcceptancesRequest())
    assert list(listed.acceptances) == []


async def test_acceptances_survive_a_restart_and_can_be_revoked(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[HIGH])
        await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    reply = await handler.jobs.AcceptRisk(
        job_service_pb2.AcceptRiskRequest(
            finding_id="CVE-2024-6119",
            scope=job_service_pb2.RISK_SCOPE_EVERYWHERE,
            reason="vendor says not exploitable",
        )
    )
    assert reply.acceptance.expires_at.ToDatetime() - reply.acceptance.created_at.ToDatetime() == (
        timedelta(days=30)
    )
    data_dir = handler.config.data_dir
    await handler.server.stop(0)
    handler = await make_handler(data_dir=data_dir)
    assert (await get_summary(handler, job_id)).verdict == S.VERDICT_PASSED
    revoked = await handler.jobs.RevokeRiskAcceptance(
        job_service_pb2.RevokeRiskAcceptanceRequest(id=reply.acceptance.id)
    )
    assert revoked.verdicts_changed == 1
    assert (await get_summary(handler, job_id)).verdict == S.VERDICT_FAILED
    missing = await remote_error(
        handler.jobs.AcceptRisk(job_service_pb2.AcceptRiskRequest(finding_id="CVE-1"))
    )
    assert missing.code == "HNDL-005"
    assert "reason is required" in missing.message


class Sink(result_sink_pb2_grpc.ResultSinkServiceServicer):
    def __init__(self) -> None:
        self.requests: list[result_sink_pb2.DeliverRequest] = []
        self.got_result = asyncio.Event()

    async def Deliver(self, request: result_sink_pb2.DeliverRequest, context: Any) -> Any:
        self.requests.append(request)
        if request.HasField("result"):
            self.got_result.set()
        return result_sink_pb2.DeliverResponse()


async def test_a_grpc_result_sink_receives_status_changes_and_the_result(
    make_handler: MakeHandler,
) -> None:
    sink = Sink()
    server = grpc.aio.server()
    result_sink_pb2_grpc.add_ResultSinkServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        handler = await make_handler(receiver_url=f"grpc://127.0.0.1:{port}")
        async with RawScanner(handler.scanners, "s1") as scanner:
            await scanner.start()
            job_id = await scan_once(handler, scanner, image(), vulnerabilities=[LOW])
            await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
        async with asyncio.timeout(10):
            await sink.got_result.wait()
        kinds = [
            ("result" if r.HasField("result") else r.transition.to_status) for r in sink.requests
        ]
        assert kinds[:4] == [
            S.JOB_STATUS_PENDING,
            S.JOB_STATUS_IN_PROGRESS,
            S.JOB_STATUS_PROCESSING_RESULTS,
            "result",
        ]
    finally:
        await server.stop(0)


async def test_a_pending_delivery_survives_a_restart(
    make_handler: MakeHandler, receiver: ReceiverServer, secret_file: Path
) -> None:
    config = {"receiver_url": receiver.url, "receiver_secret_file": str(secret_file)}
    handler = await make_handler(**config)
    receiver.gate.clear()  # nothing is acknowledged before the stop
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[LOW])
        await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_PROCESSING_RESULTS)
    data_dir = handler.config.data_dir
    await handler.server.stop(0)
    receiver.gate.set()
    handler = await make_handler(data_dir=data_dir, **config)
    done = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    assert done.runs == 1  # the result was kept: no second scan
    assert f"{job_id}:result:1" in {key for key, _, _ in receiver.results()}
