"""Deliveries to the receiving server: nothing owed is ever dropped, errors are not left
stale, verdict changes are forwarded, and a backlog never looks like a receiver failure.

A real HTTP receiver (``tests/receiver.py``) and a real handler; the receiver refuses what a
test tells it to.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf import duration_pb2

from imagehandler.ihctl import render
from imagehandler.v1 import common_pb2, job_service_pb2
from tests.conftest import MakeHandler
from tests.helpers import HIGH, LOW, RawScanner, image, scan_once, wait_for_status
from tests.receiver import ReceiverServer, received_keys

S = common_pb2
MEDIUM_FAIL = S.Vulnerability(id="CVE-2023-0464", package="libssl3", severity=S.SEVERITY_CRITICAL)


def keys_in_order(receiver: ReceiverServer, job_id: str) -> list[str]:
    with receiver.lock:
        return [key for key, _, _ in receiver.received if key.startswith(job_id)]


def body_of(receiver: ReceiverServer, key: str) -> dict[str, object]:
    with receiver.lock:
        return next(body for k, body, _ in receiver.received if k == key)


async def owed_until(handler: object, job_id: str, predicate: object) -> common_pb2.Job:
    """GetJob until ``predicate(job)`` holds (10 s deadline): the handler's own view."""
    async with asyncio.timeout(10):
        while True:
            reply = await handler.jobs.GetJob(  # type: ignore[attr-defined]
                job_service_pb2.GetJobRequest(job_id=job_id)
            )
            if predicate(reply.job):  # type: ignore[operator]
                return reply.job  # type: ignore[no-any-return]
            await asyncio.sleep(0.02)  # polling the handler's state, with a deadline


async def test_a_status_change_refused_for_a_while_is_delivered_without_a_restart(
    make_handler: MakeHandler, receiver: ReceiverServer, secret_file: Path
) -> None:
    """Issue 12 item 1: the refused change stays owed, visible, and goes through once the
    receiver takes it; every change arrives in order; the job ends FINISHED."""
    receiver.fail_status = '"to_status":"JOB_STATUS_IN_PROGRESS"'
    handler = await make_handler(
        receiver_url=receiver.url,
        receiver_secret_file=str(secret_file),
        delivery_attempts=1000,  # the result waits behind the change; no HNDL-001 here
        delivery_backoff=0.01,
        delivery_max_backoff=0.05,
    )
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[LOW])
        # The IN_PROGRESS change is refused again and again: owed, with the receiver's answer.
        job = await owed_until(handler, job_id, lambda j: "HTTP 503" in j.delivery_error)
        assert job.status == S.JOB_STATUS_PROCESSING_RESULTS
        assert job.deliveries_owed >= 2  # that change, the PROCESSING_RESULTS one, the result
        stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
        assert stats.deliveries_owed == 1
        assert keys_in_order(receiver, job_id) == [f"{job_id}:0"]
        receiver.fail_status = ""
        await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    await received_keys(receiver, {f"{job_id}:3"})
    assert keys_in_order(receiver, job_id) == [
        f"{job_id}:0", f"{job_id}:1", f"{job_id}:2", f"{job_id}:result:1", f"{job_id}:3",
    ]  # fmt: skip
    final = await owed_until(handler, job_id, lambda j: j.deliveries_owed == 0)
    assert final.delivery_error == ""


async def test_after_hndl_001_the_status_changes_still_arrive_and_redelivery_clears_the_error(
    make_handler: MakeHandler, receiver: ReceiverServer, secret_file: Path
) -> None:
    """Items 1 and 2: a receiver that is down gives HNDL-001 (the result is kept); once it is
    back every status change arrives by itself, RedeliverJob sends the result, and the
    FINISHED job (and its FINISHED event) carries no stale error."""
    receiver.always_fail = True
    handler = await make_handler(
        receiver_url=receiver.url,
        receiver_secret_file=str(secret_file),
        delivery_attempts=3,
        delivery_backoff=0.01,
        delivery_max_backoff=0.05,
    )
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[LOW])
        failed = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_ERROR)
    assert failed.error.code == "HNDL-001"
    receiver.always_fail = False
    # No restart and no RedeliverJob: the owed changes up to ERROR are delivered.
    await received_keys(receiver, {f"{job_id}:{n}" for n in range(4)})
    redelivered = await handler.jobs.RedeliverJob(
        job_service_pb2.RedeliverJobRequest(job_id=job_id)
    )
    assert redelivered.job.status == S.JOB_STATUS_PROCESSING_RESULTS
    done = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    assert not done.HasField("error")
    await received_keys(receiver, {f"{job_id}:result:1", f"{job_id}:5"})
    finished_event = body_of(receiver, f"{job_id}:5")
    assert finished_event["transition"]["to_status"] == "JOB_STATUS_FINISHED"  # type: ignore[index]
    assert "error" not in finished_event["job"]  # type: ignore[operator]
    assert keys_in_order(receiver, job_id).count(f"{job_id}:0") == 1
    # The history keeps the failure that was cleared.
    reply = await handler.jobs.GetJob(
        job_service_pb2.GetJobRequest(job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL)
    )
    assert any(t.error.code == "HNDL-001" for t in reply.job.history)


async def test_verdict_changes_are_delivered_with_their_own_keys(
    make_handler: MakeHandler, receiver: ReceiverServer, secret_file: Path
) -> None:
    """Item 3: accepting, revoking and expiry each reach the receiver with a new key."""
    handler = await make_handler(receiver_url=receiver.url, receiver_secret_file=str(secret_file))
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[HIGH, LOW])
        await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    await received_keys(receiver, {f"{job_id}:3"})
    accepted = await handler.jobs.AcceptRisk(
        job_service_pb2.AcceptRiskRequest(
            finding_id=HIGH.id, job_id=job_id, reason="not reachable in this image"
        )
    )
    await received_keys(receiver, {f"{job_id}:verdict:1"})
    change = body_of(receiver, f"{job_id}:verdict:1")["verdict_change"]
    assert change["verdict"] == "VERDICT_PASSED"  # type: ignore[index]
    assert change["summary"]["accepted"] == [HIGH.id]  # type: ignore[index]
    assert accepted.acceptance.id in change["cause"]  # type: ignore[index]
    await handler.jobs.RevokeRiskAcceptance(
        job_service_pb2.RevokeRiskAcceptanceRequest(id=accepted.acceptance.id)
    )
    await received_keys(receiver, {f"{job_id}:verdict:2"})
    change = body_of(receiver, f"{job_id}:verdict:2")["verdict_change"]
    assert change["verdict"] == "VERDICT_FAILED"  # type: ignore[index]
    # An acceptance that expires on its own is a change too.
    await handler.jobs.AcceptRisk(
        job_service_pb2.AcceptRiskRequest(
            finding_id=HIGH.id,
            job_id=job_id,
            reason="for a moment",
            duration=duration_pb2.Duration(nanos=300_000_000),
        )
    )
    keys = await received_keys(receiver, {f"{job_id}:verdict:3", f"{job_id}:verdict:4"})
    assert body_of(receiver, f"{job_id}:verdict:4")["verdict_change"]["verdict"] == (  # type: ignore[index]
        "VERDICT_FAILED"
    )
    assert len([k for k in keys if ":verdict:" in k]) == 4


async def test_accepting_one_of_two_failing_findings_changes_no_verdict(
    make_handler: MakeHandler,
) -> None:
    """Item 4: the answer counts verdicts that really changed, and an accepted finding moves
    from ``failing`` to ``accepted``."""
    handler = await make_handler()
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = await scan_once(handler, scanner, image(), vulnerabilities=[HIGH, MEDIUM_FAIL])
        await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    answer = await handler.jobs.AcceptRisk(
        job_service_pb2.AcceptRiskRequest(finding_id=HIGH.id, job_id=job_id, reason="mitigated")
    )
    assert (answer.verdicts_changed, answer.summaries_changed) == (0, 1)
    summary = (await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))).job.result
    assert summary.verdict == S.VERDICT_FAILED
    assert list(summary.failing) == [MEDIUM_FAIL.id]
    assert list(summary.accepted) == [HIGH.id]
    text = render.reevaluated(answer.verdicts_changed, answer.summaries_changed, "PASSED")
    assert (
        text == "no verdict changed; 1 more job with accepted findings updated (verdict unchanged)"
    )
    second = await handler.jobs.AcceptRisk(
        job_service_pb2.AcceptRiskRequest(
            finding_id=MEDIUM_FAIL.id, job_id=job_id, reason="mitigated"
        )
    )
    assert (second.verdicts_changed, second.summaries_changed) == (1, 0)
    summary = (await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))).job.result
    assert summary.verdict == S.VERDICT_PASSED
    assert list(summary.failing) == []
    assert sorted(summary.accepted) == sorted([HIGH.id, MEDIUM_FAIL.id])
    assert render.reevaluated(1, 0, "PASSED") == "1 job now PASSED"
