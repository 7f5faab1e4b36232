"""Issue 12 item 5, with real processes: a handler with a receiving server that always answers
200, two noop scanners, 30 SubmitJobs of 50; kill -9 the handler under load and restart it on
the same data directory. Every acknowledged job must end FINISHED (never HNDL-001: the receiver
never failed) and every one of its status changes and its result must reach the receiver.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc import aio

from bench.common import child_env, free_port, wait_serving
from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from tests.helpers import image
from tests.receiver import ReceiverServer

S = common_pb2
BIN = Path(sys.executable).parent
BATCHES, BATCH = 30, 50


def start_handler(
    address: str, data: Path, receiver: ReceiverServer, secret: Path
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--listen", address, "--data-dir", str(data),
         "--receiver-url", receiver.url, "--receiver-secret-file", str(secret),
         "--heartbeat-interval", "0.2", "--heartbeat-timeout", "1", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
    )  # fmt: skip
    asyncio.run(wait_serving(address, process))
    return process


@pytest.fixture
def scanners() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def start_scanner(address: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "image-scanner"), "--handler", address, "--engine", "noop", "--slots", "4",
         "--delay", "0.05", "--scanner-id", name, "--backoff-initial", "0.05",
         "--backoff-max", "0.3", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
    )  # fmt: skip


async def submit_all(address: str) -> list[str]:
    async with aio.insecure_channel(address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        ids: list[str] = []
        for batch in range(BATCHES):
            requests = [image(tag=f"crash-{batch}-{n}") for n in range(BATCH)]
            reply = await jobs.SubmitJobs(job_service_pb2.SubmitJobsRequest(jobs=requests))
            ids.extend(result.job.id for result in reply.results)
        return ids


async def every_job(address: str) -> list[common_pb2.Job]:
    async with aio.insecure_channel(address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        out: list[common_pb2.Job] = []
        token = ""
        while True:
            page = await jobs.ListJobs(
                job_service_pb2.ListJobsRequest(page_size=1000, page_token=token)
            )
            out.extend(page.jobs)
            token = page.next_page_token
            if not token:
                return out


def wait_until(condition: object, what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
        time.sleep(0.05)  # polling another process's state, with a deadline


@pytest.mark.timeout(240)
def test_kill_9_under_load_ends_with_every_job_finished_and_delivered(
    tmp_path: Path,
    receiver: ReceiverServer,
    secret_file: Path,
    scanners: list[subprocess.Popen[bytes]],
) -> None:
    address = f"127.0.0.1:{free_port()}"
    data = tmp_path / "data"
    handler = start_handler(address, data, receiver, secret_file)
    try:
        scanners.extend(start_scanner(address, f"crash-s{n}") for n in (1, 2))
        ids = asyncio.run(submit_all(address))
        assert len(set(ids)) == BATCHES * BATCH
        # Kill under load: part of the results delivered, many deliveries still owed.
        wait_until(lambda: len(receiver.results()) >= 150, "150 results delivered", 60)
        handler.send_signal(signal.SIGKILL)
        handler.wait(timeout=30)
        delivered_before = len(receiver.results())
        handler = start_handler(address, data, receiver, secret_file)

        def all_finished() -> bool:
            jobs = asyncio.run(every_job(address))
            assert not [j for j in jobs if j.status == S.JOB_STATUS_ERROR], [
                (j.id, j.error.message) for j in jobs if j.status == S.JOB_STATUS_ERROR
            ][:3]
            return sum(j.status == S.JOB_STATUS_FINISHED for j in jobs) == len(ids)

        wait_until(all_finished, "every job FINISHED", 150)
        # Nothing acknowledged was lost; each job with its whole history.
        jobs = {job.id: job for job in asyncio.run(full_jobs(address, ids))}
        assert set(jobs) == set(ids)
        owed = {
            f"{job_id}:{n}" for job_id, job in jobs.items() for n in range(len(job.history))
        } | {f"{job_id}:result:{job.runs}" for job_id, job in jobs.items()}

        def everything_delivered() -> bool:
            with receiver.lock:
                keys = {key for key, _, _ in receiver.received}
            return owed <= keys

        wait_until(everything_delivered, "every status change and result delivered", 60)
        assert delivered_before < len(ids), "the kill came after everything was delivered"
        with receiver.lock:
            assert all(signed for _, _, signed in receiver.received)
        assert receiver.attempts >= len(receiver.received)
    finally:
        handler.send_signal(signal.SIGKILL)
        handler.wait(timeout=30)


async def full_jobs(address: str, ids: list[str]) -> list[common_pb2.Job]:
    """Each job with its history (GetJob's full view)."""
    async with aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        out = []
        for job_id in ids:
            request = job_service_pb2.GetJobRequest(
                job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL
            )
            out.append((await stub.GetJob(request)).job)
        return out
