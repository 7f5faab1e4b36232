"""Job life: cancel, dedup and idempotency, watching, listing, stats, results."""

from __future__ import annotations

from typing import Any

from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from server.transport.guard import STREAM_END
from tests.conftest import Handler
from tests.helpers import RawScanner, Watcher, image, node, wait_for_status

S = common_pb2
DIGEST = "sha256:" + "0123456789abcdef" * 4


async def test_cancel_while_pending(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    cancelled = await handler.jobs.CancelJob(
        job_service_pb2.CancelJobRequest(job_id=job_id, reason="not needed")
    )
    assert cancelled.job.status == S.JOB_STATUS_CANCELLED
    # It is out of the queue: a scanner that connects now gets the next job, not this one.
    later = (await handler.jobs.SubmitJob(image(tag="later"))).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        assert job.job_id == later


async def test_cancel_while_running_tells_the_scanner(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=job_id))
        cancel = await scanner.expect("cancel")
        assert cancel.job_id == job_id
        # Its slot is free again: the next job comes at once.
        nxt = (await handler.jobs.SubmitJob(image(tag="next"))).job.id
        (job2,) = await scanner.assigned()
        assert job2.job_id == nxt
        # A late result for the cancelled run is refused on the stream, the job stays cancelled.
        await scanner.finish(job)
        rejected = await scanner.expect("rejected")
        assert rejected.error.code == "HNDL-008"
    final = await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))
    assert final.job.status == S.JOB_STATUS_CANCELLED


async def test_same_digest_while_active_returns_the_existing_job(handler: Handler) -> None:
    first = await handler.jobs.SubmitJob(image(tag="", **{}))
    by_digest = job_service_pb2.SubmitJobRequest(
        object=S.ScanObject(image=S.ImageObject(repository="library/alpine", digest=DIGEST))
    )
    a = await handler.jobs.SubmitJob(by_digest)
    # The same digest under another name is the same content.
    other_name = job_service_pb2.SubmitJobRequest(
        object=S.ScanObject(
            image=S.ImageObject(registry="ghcr.io", repository="acme/alpine", digest=DIGEST)
        )
    )
    b = await handler.jobs.SubmitJob(other_name)
    assert not a.duplicate
    assert b.duplicate
    assert b.job.id == a.job.id
    # Other policies are another scan.
    c = await handler.jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(object=by_digest.object, policies=[S.POLICY_SECRETS])
    )
    assert not c.duplicate
    # Without a digest: same registry, repository and tag. "alpine" is Docker Hub's library/alpine.
    d = await handler.jobs.SubmitJob(image(repository="alpine", tag="latest"))
    assert d.duplicate
    assert d.job.id == first.job.id
    # Once it is done, the same object queues a new job.
    await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=a.job.id))
    e = await handler.jobs.SubmitJob(by_digest)
    assert not e.duplicate
    assert e.job.id != a.job.id


async def test_idempotency_key_returns_the_first_job_even_when_done(handler: Handler) -> None:
    a = await handler.jobs.SubmitJob(image(idempotency_key="ci-run-42"))
    await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=a.job.id))
    b = await handler.jobs.SubmitJob(image(idempotency_key="ci-run-42"))
    assert b.duplicate
    assert b.job.id == a.job.id
    assert b.job.status == S.JOB_STATUS_CANCELLED


async def test_batch_dedups_within_itself(handler: Handler) -> None:
    response = await handler.jobs.SubmitJobs(
        job_service_pb2.SubmitJobsRequest(jobs=[image(tag="x"), image(tag="y"), image(tag="x")])
    )
    ids = [r.job.id for r in response.results]
    assert ids[0] == ids[2] != ids[1]
    assert [r.duplicate for r in response.results] == [False, False, True]


async def test_watch_sees_every_transition_in_order(handler: Handler) -> None:
    watcher = await Watcher(handler.jobs).subscribed()
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        await scanner.fail(job)
        (job,) = await scanner.assigned()
        await scanner.finish(job, verdict=S.VERDICT_PASSED)
        events = await watcher.until(job_id, S.JOB_STATUS_FINISHED)
    await watcher.close()
    moves = [
        (e.transition.from_status, e.transition.to_status, e.transition.run)
        for e in events
        if e.job.id == job_id
    ]
    assert moves == [
        (S.JOB_STATUS_UNSPECIFIED, S.JOB_STATUS_PENDING, 0),
        (S.JOB_STATUS_PENDING, S.JOB_STATUS_IN_PROGRESS, 1),
        (S.JOB_STATUS_IN_PROGRESS, S.JOB_STATUS_PENDING, 1),
        (S.JOB_STATUS_PENDING, S.JOB_STATUS_IN_PROGRESS, 2),
        (S.JOB_STATUS_IN_PROGRESS, S.JOB_STATUS_PROCESSING_RESULTS, 2),
        (S.JOB_STATUS_PROCESSING_RESULTS, S.JOB_STATUS_FINISHED, 2),
    ]
    # Each event carries the job as that transition left it.
    assert [e.job.status for e in events if e.job.id == job_id] == [m[1] for m in moves]


async def test_single_job_watch_starts_with_the_job_and_ends_when_done(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    call: Any = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id))
    first = await call.read()
    assert first.job.status == S.JOB_STATUS_PENDING
    assert not first.HasField("transition")
    await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=job_id))
    second = await call.read()
    assert second.transition.to_status == S.JOB_STATUS_CANCELLED
    assert await call.read() is STREAM_END


async def test_list_filters_and_pages(handler: Handler) -> None:
    ids = [(await handler.jobs.SubmitJob(image(tag=f"v{n}"))).job.id for n in range(5)]
    node_id = (await handler.jobs.SubmitJob(node("worker-1", trigger=S.TRIGGER_NODE_AGENT))).job.id
    await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=ids[1]))
    seen, token = [], ""
    while True:
        page = await handler.jobs.ListJobs(
            job_service_pb2.ListJobsRequest(page_size=2, page_token=token)
        )
        assert len(page.jobs) <= 2
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [*ids, node_id]
    pending = await handler.jobs.ListJobs(
        job_service_pb2.ListJobsRequest(statuses=[S.JOB_STATUS_PENDING])
    )
    assert [j.id for j in pending.jobs] == [ids[0], *ids[2:], node_id]
    nodes = await handler.jobs.ListJobs(job_service_pb2.ListJobsRequest(kinds=[S.OBJECT_KIND_NODE]))
    assert [j.id for j in nodes.jobs] == [node_id]
    by_trigger = await handler.jobs.ListJobs(
        job_service_pb2.ListJobsRequest(triggers=[S.TRIGGER_NODE_AGENT])
    )
    assert [j.id for j in by_trigger.jobs] == [node_id]


async def test_result_summary_and_stats(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
        assert (
            stats.pending,
            stats.in_progress,
            stats.scanners_connected,
            stats.scanners_busy,
        ) == (0, 1, 1, 1)
        await scanner.finish(
            job,
            vulnerabilities=[
                S.Vulnerability(id="CVE-2024-6119", package="libssl3", severity=S.SEVERITY_HIGH),
                S.Vulnerability(id="CVE-2024-5535", package="libssl3", severity=S.SEVERITY_LOW),
            ],
            databases=[S.DatabaseVersion(name="vulns", version="7", released_at="2026-11-20")],
        )
        done = await wait_for_status(handler.jobs, job_id, S.JOB_STATUS_FINISHED)
    assert done.result.verdict == S.VERDICT_FAILED  # a high vulnerability fails by default
    assert (done.result.vulnerabilities_total, done.result.high, done.result.low) == (2, 1, 1)
    full = await handler.jobs.GetJob(
        job_service_pb2.GetJobRequest(job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL)
    )
    assert [v.id for v in full.job.full_result.vulnerabilities] == [
        "CVE-2024-6119",
        "CVE-2024-5535",
    ]
    stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
    assert (stats.finished, stats.in_progress) == (1, 0)
    listed = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
    assert [(s.scanner_id, s.jobs_finished) for s in listed.scanners] == [("s1", 1)]


async def test_drain_finishes_running_work_and_takes_nothing_new(handler: Handler) -> None:
    first = (await handler.jobs.SubmitJob(image(tag="1"))).job.id
    async with RawScanner(handler.scanners, "s1", slots=2) as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        await scanner.send(drain=scanner_service_pb2.Drain())
        listed = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
        assert listed.scanners[0].status == S.SCANNER_STATUS_DRAINING
        second = (await handler.jobs.SubmitJob(image(tag="2"))).job.id
        await scanner.finish(job)
        await wait_for_status(handler.jobs, first, S.JOB_STATUS_FINISHED)
        still = await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=second))
        assert still.job.status == S.JOB_STATUS_PENDING
