"""A handler process started on a data directory an earlier version wrote (a version 1
snapshot, then a journal of one record per new job) serves every job in it; what it writes
itself (new jobs in columns, a version 2 snapshot at SIGTERM) survives a SIGTERM and a kill -9.
"""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from pathlib import Path

import grpc

from imagehandler.storage.v1 import storage_pb2
from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from server.core import state_machine
from server.core.model import ImageRef, Job, JobSpec, Lane, Policy, Trigger
from server.storage.embedded import codec
from server.storage.embedded.framing import frame
from server.storage.embedded.journal import journal_path
from server.storage.embedded.snapshot import MAGIC_V2, write_snapshot
from tests.helpers import image
from tests.system.test_crash import Cluster, free_port, pages


def old_job(n: int) -> Job:
    at = datetime(2026, 11, 1, 9, 0, n, tzinfo=UTC)
    spec = JobSpec(
        ImageRef("registry.example", "team/app", f"old-{n}"),
        Trigger.MANUAL,
        (Policy.VULNERABILITIES,),
        600.0,
        Lane.BULK,
        labels={"team": "a"} if n % 7 == 0 else {},
    )
    job = Job(id=f"old-{n:03d}", seq=n, spec=spec, created_at=at)
    state_machine.record_creation(job, at)
    job.lsn = n
    return job


async def write_old_directory(data_dir: Path) -> list[Job]:
    """What the version before columns wrote: snapshot IHSNAP1, then per-job records."""
    jobs = [old_job(n) for n in range(1, 31)]
    header = storage_pb2.SnapshotHeader(generation=1, lsn=20, next_seq=21)
    await write_snapshot(data_dir, header, jobs[:20], version=1)
    journal_path(data_dir, 1).write_bytes(
        b"".join(frame(per_job_record(job).SerializeToString()) for job in jobs[20:])
    )
    return jobs


def per_job_record(job: Job) -> storage_pb2.JournalRecord:
    record = storage_pb2.JournalRecord(lsn=job.lsn)
    codec.set_stored(record.created.job, job)
    return record


def listed(address: str) -> dict[str, common_pb2.Job]:
    return {job.id: job for page in pages(address) for job in page}


def submit(address: str, tags: list[str]) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        reply = stub.SubmitJobs(
            job_service_pb2.SubmitJobsRequest(jobs=[image(tag=t) for t in tags]), timeout=10
        )
        return [r.job.id for r in reply.results]


async def test_a_handler_serves_an_old_data_directory_and_writes_the_new_format(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    old = await write_old_directory(data_dir)
    cluster = Cluster(f"127.0.0.1:{free_port()}", data_dir)
    try:
        cluster.start_handler()
        jobs = listed(cluster.address)
        assert sorted(jobs) == sorted(j.id for j in old)
        assert all(j.status == common_pb2.JOB_STATUS_PENDING for j in jobs.values())
        assert dict(jobs["old-007"].labels) == {"team": "a"}
        assert jobs["old-025"].object.image.tag == "old-25"

        new = submit(cluster.address, [f"new-{n}" for n in range(5)])
        assert cluster.handler is not None
        cluster.handler.send_signal(signal.SIGTERM)
        assert cluster.handler.wait(timeout=60) == 0
        snapshot = max(data_dir.glob("snapshot-*.snap"))
        assert snapshot.read_bytes().startswith(MAGIC_V2)

        cluster.start_handler()
        newer = submit(cluster.address, [f"newer-{n}" for n in range(5)])
        cluster.kill_handler()  # these five are only in the journal, in columns
        cluster.start_handler()
        jobs = listed(cluster.address)
        assert sorted(jobs) == sorted([*(j.id for j in old), *new, *newer])
        assert all(j.status == common_pb2.JOB_STATUS_PENDING for j in jobs.values())
        assert [jobs[i].object.image.tag for i in newer] == [f"newer-{n}" for n in range(5)]
    finally:
        if cluster.handler is not None and cluster.handler.poll() is None:
            cluster.handler.kill()
            cluster.handler.wait(timeout=30)
