"""ScannerClient against the real handler (the ``handler`` fixture of tests/conftest.py).

Jobs are followed with WatchJobs, never polled; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2
from scanner_client import (
    ClientConfig,
    Database,
    Engine,
    Job,
    NoopEngine,
    ProgressReporter,
    ScanFailure,
    ScannerClient,
    ScannerRejected,
)

DEADLINE = 10.0
DONE = frozenset(
    {common_pb2.JOB_STATUS_FINISHED, common_pb2.JOB_STATUS_ERROR, common_pb2.JOB_STATUS_CANCELLED}
)


def alpine() -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(
            image=common_pb2.ImageObject(repository="library/alpine", tag="3.20")
        )
    )


def config(scanner_id: str, **overrides: Any) -> ClientConfig:
    values: dict[str, Any] = {"slots": 2, "backoff_initial": 0.01, "backoff_max": 0.1}
    return ClientConfig(scanner_id=scanner_id, **{**values, **overrides})


@asynccontextmanager
async def running(client: ScannerClient) -> AsyncIterator[asyncio.Task[None]]:
    """The client running; stopped (and its run() awaited) on the way out."""
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(DEADLINE):
            await client.registered.wait()
        yield task
    finally:
        async with asyncio.timeout(DEADLINE):
            await client.stop()
            await asyncio.gather(task, return_exceptions=True)


async def until_done(handler: Any, job_id: str) -> common_pb2.Job:
    """The job once it is FINISHED, ERROR or CANCELLED, from WatchJobs."""
    call = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id))
    try:
        async with asyncio.timeout(DEADLINE):
            async for event in call:
                job: common_pb2.Job = event.job
                if job.status in DONE:
                    return job
    finally:
        call.cancel()
    raise AssertionError(f"the watch of {job_id} ended before the job was done")


class GatedEngine(Engine):
    """Scans start, then wait for ``release`` (or fail with ``failure`` when it is set)."""

    name = "gated"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.failure: ScanFailure | None = None

    def databases(self) -> Sequence[Database]:
        return [Database("vulnerabilities", "1", "2026-11-20T06:00:00Z")]

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        self.started.set()
        progress.report("analyse", 50)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.failure is not None:
            raise self.failure
        return common_pb2.ScanResult(verdict=common_pb2.VERDICT_PASSED)


class UndatedEngine(NoopEngine):
    def databases(self) -> Sequence[Database]:
        return [Database("vulnerabilities", "1", released_at="")]


async def test_noop_scanner_registers_and_finishes_a_submitted_job(handler: Any) -> None:
    client = ScannerClient(handler.address, NoopEngine(), config("it-noop"))
    async with running(client):
        submitted = await handler.jobs.SubmitJob(alpine())
        job = await until_done(handler, submitted.job.id)
        assert job.status == common_pb2.JOB_STATUS_FINISHED, job.error
        assert job.scanner_id == "it-noop"
        assert job.result.verdict == common_pb2.VERDICT_PASSED
        assert job.result.vulnerabilities_total == 0
        async with asyncio.timeout(DEADLINE):
            await client.wait_for(lambda stats: stats.jobs_succeeded == 1)


async def test_many_jobs_finish_on_one_scanner(handler: Any) -> None:
    client = ScannerClient(handler.address, NoopEngine(), config("it-many", slots=8))
    async with running(client):
        requests = [
            job_service_pb2.SubmitJobRequest(
                object=common_pb2.ScanObject(
                    image=common_pb2.ImageObject(repository=f"team/app{n}", tag="1.0")
                )
            )
            for n in range(40)
        ]
        await handler.jobs.SubmitJobs(job_service_pb2.SubmitJobsRequest(jobs=requests))
        async with asyncio.timeout(DEADLINE):
            await client.wait_for(lambda stats: stats.jobs_succeeded == 40)
        # Batching: fewer Results messages than results.
        assert client.stats.results_messages < 40


async def test_database_without_release_date_is_rejected_for_good(handler: Any) -> None:
    client = ScannerClient(handler.address, UndatedEngine(), config("it-undated"))
    with pytest.raises(ScannerRejected) as info:
        async with asyncio.timeout(DEADLINE):
            await client.run()
    assert info.value.code == "HNDL-012"
    assert info.value.message.startswith("HNDL-012: last release date of databases is unknown")
    assert client.stats.connect_attempts == 1
    assert client.stats.registrations == 0


async def test_drain_finishes_the_running_job_then_returns(handler: Any) -> None:
    engine = GatedEngine()
    client = ScannerClient(handler.address, engine, config("it-drain"))
    async with running(client) as run:
        submitted = await handler.jobs.SubmitJob(alpine())
        async with asyncio.timeout(DEADLINE):
            await engine.started.wait()
        drain = asyncio.create_task(client.drain())
        async with asyncio.timeout(DEADLINE):
            await client.drain_sent.wait()
        assert not drain.done()
        engine.release.set()
        async with asyncio.timeout(DEADLINE):
            await drain
            await run
        assert not engine.cancelled.is_set()
        job = await until_done(handler, submitted.job.id)
        assert job.status == common_pb2.JOB_STATUS_FINISHED, job.error
        assert client.stats.connect_attempts == 1


async def test_cancelling_a_job_cancels_the_scan(handler: Any) -> None:
    engine = GatedEngine()
    client = ScannerClient(handler.address, engine, config("it-cancel"))
    async with running(client):
        submitted = await handler.jobs.SubmitJob(alpine())
        async with asyncio.timeout(DEADLINE):
            await engine.started.wait()
        await handler.jobs.CancelJob(
            job_service_pb2.CancelJobRequest(job_id=submitted.job.id, reason="test")
        )
        async with asyncio.timeout(DEADLINE):
            await engine.cancelled.wait()
        job = await until_done(handler, submitted.job.id)
        assert job.status == common_pb2.JOB_STATUS_CANCELLED
        assert client.stats.jobs_done == 0


async def test_a_permanent_scan_failure_ends_the_job_in_error(handler: Any) -> None:
    engine = GatedEngine()
    engine.failure = ScanFailure("image manifest is not a container image", permanent=True)
    engine.release.set()
    client = ScannerClient(handler.address, engine, config("it-failure"))
    async with running(client):
        submitted = await handler.jobs.SubmitJob(alpine())
        job = await until_done(handler, submitted.job.id)
        assert job.status == common_pb2.JOB_STATUS_ERROR
        assert job.error.code == "HNDL-006"
        assert "image manifest is not a container image" in job.error.message
