"""Watchers of every job: numbered events, resuming, and a slow watcher that is ended with
what it needs to resume, never at the cost of the handler's memory or other clients."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc import aio

from bench.common import child_env, free_port, rss_bytes, wait_serving
from bench.watchers import flood
from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from tests.conftest import MakeHandler
from tests.helpers import image

S = common_pb2


async def submit(handler: object, count: int, prefix: str) -> None:
    jobs = [image(tag=f"{prefix}{n}") for n in range(count)]
    for start in range(0, count, 100):
        await handler.jobs.SubmitJobs(  # type: ignore[attr-defined]
            job_service_pb2.SubmitJobsRequest(jobs=jobs[start : start + 100])
        )


async def read(call: object, count: int) -> list[job_service_pb2.WatchJobsResponse]:
    out: list[job_service_pb2.WatchJobsResponse] = []
    async with asyncio.timeout(10):
        while len(out) < count:
            out.append(await call.read())  # type: ignore[attr-defined]
    return out


async def collect(call: object, into: list[int]) -> None:
    async with asyncio.timeout(20):
        async for event in call:  # type: ignore[attr-defined]
            into.append(event.sequence)


async def test_events_are_numbered_and_a_watch_resumes_exactly_after_a_sequence(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    first = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest())
    await first.initial_metadata()
    await submit(handler, 5, "a")
    events = await read(first, 5)
    sequences = [e.sequence for e in events]
    assert sequences == list(range(sequences[0], sequences[0] + 5))
    first.cancel()
    # Events made while nobody watched are kept for a resume.
    await submit(handler, 3, "b")
    resumed = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(after_sequence=sequences[1]))
    again = await read(resumed, 6)
    assert [e.sequence for e in again] == list(range(sequences[2], sequences[2] + 6))
    assert [e.job.id for e in again[:3]] == [e.job.id for e in events[2:]]
    assert {e.transition.to_status for e in again} == {S.JOB_STATUS_PENDING}
    resumed.cancel()


async def test_a_resume_from_events_no_longer_kept_is_refused_with_what_to_do(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    call = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(after_sequence=12345))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    details = refused.value.details() or ""
    assert details.startswith("HNDL-007: cannot resume after sequence 12345")
    assert "ListJobs" in details


async def test_a_watcher_that_does_not_read_is_ended_and_can_resume_where_it_stopped(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler(watch_lag_bytes=256 * 1024, watch_log_bytes=4 * 1024 * 1024)
    async with aio.insecure_channel(handler.address) as channel:
        slow = job_service_pb2_grpc.JobServiceStub(channel).WatchJobs(
            job_service_pb2.WatchJobsRequest()
        )
        await slow.initial_metadata()
        # It reads nothing while thousands of events happen; then it reads what it was sent.
        await submit(handler, 8000, "s")
        received: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await collect(slow, received)
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = ended.value.details() or ""
    assert details.startswith("HNDL-007: watcher ended")
    match = re.search(r"after_sequence=(\d+) to resume", details)
    assert match is not None
    last = int(match.group(1))
    # It got every event up to the one the error names, and perhaps the one then in flight.
    assert received == list(range(received[0], received[-1] + 1))
    assert received[-1] in (last, last + 1)
    assert len(received) < 8000
    resumed = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(after_sequence=last))
    (following,) = await read(resumed, 1)
    assert following.sequence == last + 1
    resumed.cancel()


def test_slow_watchers_keep_the_handlers_memory_bounded(tmp_path: Path) -> None:
    """Issue 12 item 6, with a real handler process: 200 watchers that never read while two
    clients flood SubmitJobs. Every watcher is ended (it can resume) and the handler's memory
    stays within the jobs' own cost plus the event log's bound. Submit latency under this
    load is a figure of ``python -m bench.watchers``, not asserted here."""
    port = free_port()
    log_bytes = 16 * 1024 * 1024
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(tmp_path / "data"), "--log-level", "error",
         "--watch-log-bytes", str(log_bytes), "--watch-lag-bytes", str(2 * 1024 * 1024),
         # 200 watchers from one address stand for 200 clients.
         "--max-streams-per-client", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
    )  # fmt: skip
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", process))
        result = asyncio.run(flood(f"127.0.0.1:{port}", process.pid, watchers=200, seconds=6))
        jobs = result.submitted + len(result.latencies)
        # The same handler without watchers holds about 1.3 KB per queued job; allow 2 KB,
        # the log's bound and 96 MiB for the 200 streams and the allocator.
        bound = result.start_rss + jobs * 2048 + log_bytes + 96 * 1024 * 1024
        assert result.peak_rss < bound, (result.peak_rss, bound, jobs)
        assert result.watchers_ended == 200
        assert all("after_sequence=" in d for d in result.end_details)
        assert rss_bytes(process.pid) < bound
    finally:
        process.kill()
        process.wait(timeout=30)
