"""Dispatch over real gRPC: FIFO, fairness, object kinds, lanes, push on arrival."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from tests.conftest import Handler, MakeHandler
from tests.helpers import RawScanner, image, node
from tests.postgres import DATABASE_URL, schema


async def submit_many(
    handler: Handler, requests: list[job_service_pb2.SubmitJobRequest]
) -> list[str]:
    response = await handler.jobs.SubmitJobs(job_service_pb2.SubmitJobsRequest(jobs=requests))
    return [r.job.id for r in response.results]


async def test_fifo_100_jobs_one_slot(handler: Handler) -> None:
    ids = [(await handler.jobs.SubmitJob(image(tag=f"v{n}"))).job.id for n in range(100)]
    order = []
    async with RawScanner(handler.scanners, "s1", slots=1) as scanner:
        await scanner.start()
        for _ in range(100):
            (job,) = await scanner.assigned()
            order.append(job.job_id)
            assert job.run == 1
            await scanner.finish(job)
    assert order == ids


async def test_job_is_pushed_to_a_waiting_scanner(handler: Handler) -> None:
    async with RawScanner(handler.scanners, "s1", slots=1) as scanner:
        await scanner.start()
        job_id = (await handler.jobs.SubmitJob(image())).job.id
        (job,) = await scanner.assigned()
        assert job.job_id == job_id
        assert job.object.image.repository == "library/alpine"
        assert job.deadline.seconds > 0


async def test_free_scanners_share_the_work_fairly(handler: Handler) -> None:
    scanners = [RawScanner(handler.scanners, f"s{n}", slots=10) for n in range(3)]
    for scanner in scanners:
        await scanner.start()
    try:
        await submit_many(handler, [image(tag=f"v{n}") for n in range(9)])
        counts: Counter[str] = Counter()
        for scanner in scanners:
            jobs = await scanner.assigned(3)
            counts[scanner.scanner_id] = len(jobs)
        assert counts == {"s0": 3, "s1": 3, "s2": 3}
        listed = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
        assert sorted(len(s.job_ids) for s in listed.scanners) == [3, 3, 3]
        assert all(s.status == common_pb2.SCANNER_STATUS_FREE for s in listed.scanners)
    finally:
        for scanner in scanners:
            await scanner.close()


async def test_jobs_go_only_to_scanners_of_their_kind(handler: Handler) -> None:
    async with (
        RawScanner(handler.scanners, "images", kinds=[common_pb2.OBJECT_KIND_IMAGE]) as images,
        RawScanner(handler.scanners, "nodes", kinds=[common_pb2.OBJECT_KIND_NODE]) as nodes,
    ):
        await images.start()
        await nodes.start()
        node_id = (await handler.jobs.SubmitJob(node("worker-1"))).job.id
        image_id = (await handler.jobs.SubmitJob(image())).job.id
        assert [j.job_id for j in await nodes.assigned()] == [node_id]
        assert [j.job_id for j in await images.assigned()] == [image_id]


async def test_busy_scanner_gets_no_more_than_its_slots(handler: Handler) -> None:
    async with RawScanner(handler.scanners, "s1", slots=2) as scanner:
        await scanner.start()
        ids = await submit_many(handler, [image(tag=f"v{n}") for n in range(3)])
        jobs = await scanner.assigned(2)
        assert [j.job_id for j in jobs] == ids[:2]
        listed = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
        assert listed.scanners[0].status == common_pb2.SCANNER_STATUS_BUSY
        third = await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=ids[2]))
        assert third.job.status == common_pb2.JOB_STATUS_PENDING
        assert third.job.queue_position == 1
        await scanner.finish(jobs[0])
        (job,) = await scanner.assigned()
        assert job.job_id == ids[2]


async def test_interactive_lane_is_served_first_with_a_bounded_share(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler(interactive_share=0.75)
    bulk = await submit_many(handler, [image(tag=f"bulk{n}") for n in range(8)])
    interactive = await submit_many(
        handler,
        [image(tag=f"int{n}", lane=common_pb2.LANE_INTERACTIVE) for n in range(8)],
    )
    got = []
    async with RawScanner(handler.scanners, "s1", slots=1) as scanner:
        await scanner.start()
        for _ in range(16):
            (job,) = await scanner.assigned()
            got.append(job.job_id)
            await scanner.finish(job)
    # FIFO within each lane.
    assert [j for j in got if j in bulk] == bulk
    assert [j for j in got if j in interactive] == interactive
    # Interactive first, three of every four while both lanes wait; bulk still moves.
    first_eight = got[:8]
    assert first_eight[0] in interactive
    assert sum(1 for j in first_eight if j in interactive) == 6
    assert sum(1 for j in first_eight if j in bulk) == 2


async def test_queue_positions_follow_arrival_order(handler: Handler) -> None:
    ids = await submit_many(handler, [image(tag=f"v{n}") for n in range(5)])
    listed = await handler.jobs.ListJobs(job_service_pb2.ListJobsRequest())
    assert [j.id for j in listed.jobs] == ids
    assert [j.queue_position for j in listed.jobs] == [1, 2, 3, 4, 5]


@pytest.fixture
def shared_schema() -> Iterator[str]:
    """A PostgreSQL schema of its own, dropped after the handlers using it have stopped (set
    up before ``make_handler``, so torn down after it)."""
    with schema() as name:
        yield name


async def test_queue_positions_on_a_shared_database_from_another_replica(
    shared_schema: str, make_handler: MakeHandler
) -> None:
    """On PostgreSQL a replica asks the database for positions (other replicas move the
    queue): GetJob and every page of ListJobs on a second replica show them, not 0."""
    shared = {"storage": "postgres", "database_url": DATABASE_URL, "database_schema": shared_schema}
    a = await make_handler(**shared)
    b = await make_handler(**shared)
    ids = await submit_many(a, [image(tag=f"p{n}") for n in range(5)])
    first = await b.jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=3))
    rest = await b.jobs.ListJobs(
        job_service_pb2.ListJobsRequest(page_size=3, page_token=first.next_page_token)
    )
    assert [j.id for j in [*first.jobs, *rest.jobs]] == ids
    assert [j.queue_position for j in [*first.jobs, *rest.jobs]] == [1, 2, 3, 4, 5]
    got = await b.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=ids[3]))
    assert got.job.queue_position == 4
    await a.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=ids[0]))
    got = await b.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=ids[3]))
    assert got.job.queue_position == 3
