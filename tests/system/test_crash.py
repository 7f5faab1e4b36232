"""Crash safety with real processes: kill -9 the handler at random moments while jobs are
submitted and scanned, restart it, and check that nothing acknowledged was lost.

CI runs 20 rounds; ``make test-slow`` runs 100 (the slow marker).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from tests.helpers import image

S = common_pb2
BIN = Path(sys.executable).parent
# The order a job moves in; only IN_PROGRESS -> PENDING may go back (a run that ended).
RANK = {
    S.JOB_STATUS_PENDING: 0,
    S.JOB_STATUS_IN_PROGRESS: 1,
    S.JOB_STATUS_PROCESSING_RESULTS: 2,
    S.JOB_STATUS_FINISHED: 3,
    S.JOB_STATUS_ERROR: 3,
    S.JOB_STATUS_CANCELLED: 3,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    address: str
    data_dir: Path
    handler: subprocess.Popen[bytes] | None = None
    scanner: subprocess.Popen[bytes] | None = None
    acknowledged: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start_handler(self) -> None:
        self.handler = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--listen", self.address,
             "--data-dir", str(self.data_dir), "--heartbeat-interval", "0.2",
             "--heartbeat-timeout", "1", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.handler.poll() is None, "the handler exited during start"
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.02)  # polling a readiness condition, with the deadline above
        raise AssertionError("the handler did not become SERVING within 30 s")

    def kill_handler(self) -> None:
        assert self.handler is not None
        self.handler.send_signal(signal.SIGKILL)
        self.handler.wait(timeout=30)

    def start_scanner(self) -> None:
        self.scanner = subprocess.Popen(
            [str(BIN / "image-scanner"), "--handler", self.address, "--engine", "noop",
             "--slots", "4", "--delay", "0.005", "--scanner-id", "crash-scanner",
             "--backoff-initial", "0.05", "--backoff-max", "0.3", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(f"127.0.0.1:{free_port()}", tmp_path / "data")
    cluster.start_handler()
    cluster.start_scanner()
    yield cluster
    for process in (cluster.scanner, cluster.handler):
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def submit_until(cluster: Cluster, stop: threading.Event, rng: random.Random) -> None:
    """Submit single jobs and small batches until told to stop; keep what was acknowledged."""
    with grpc.insecure_channel(cluster.address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if rng.random() < 0.5:
                    reply = jobs.SubmitJob(
                        image(tag=f"t{os.getpid()}-{time.monotonic_ns()}-{n}"), timeout=2
                    )
                    ids = [reply.job.id]
                else:
                    batch = [image(tag=f"b{time.monotonic_ns()}-{n}-{k}") for k in range(5)]
                    reply_many = jobs.SubmitJobs(
                        job_service_pb2.SubmitJobsRequest(jobs=batch), timeout=2
                    )
                    ids = [r.job.id for r in reply_many.results]
            except grpc.RpcError:
                continue  # not acknowledged: the handler is down or going down
            with cluster.lock:
                cluster.acknowledged.extend(ids)


def pages(address: str) -> list[list[common_pb2.Job]]:
    """Every job, page by page (each page is one consistent view of the handler)."""
    with grpc.insecure_channel(address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        out: list[list[common_pb2.Job]] = []
        token = ""
        while True:
            page = jobs.ListJobs(
                job_service_pb2.ListJobsRequest(page_size=1000, page_token=token), timeout=10
            )
            out.append(list(page.jobs))
            token = page.next_page_token
            if not token:
                return out


def all_jobs(address: str) -> list[common_pb2.Job]:
    return [job for page in pages(address) for job in page]


def check_invariants(
    cluster: Cluster, before: dict[str, common_pb2.Job], listing: list[list[common_pb2.Job]]
) -> None:
    jobs = [job for page in listing for job in page]
    ids = [job.id for job in jobs]
    assert len(ids) == len(set(ids)), "a job is listed twice"
    present = set(ids)
    with cluster.lock:
        acknowledged = list(cluster.acknowledged)
    lost = [job_id for job_id in acknowledged if job_id not in present]
    assert not lost, f"{len(lost)} acknowledged jobs are gone, e.g. {lost[:3]}"
    for job in jobs:
        old = before.get(job.id)
        if old is None:
            continue
        assert job.runs >= old.runs, f"job {job.id}: runs went from {old.runs} to {job.runs}"
        went_back = RANK[job.status] < RANK[old.status]
        allowed = old.status == S.JOB_STATUS_IN_PROGRESS and job.status == S.JOB_STATUS_PENDING
        assert not went_back or allowed, (
            f"job {job.id} went back from {S.JobStatus.Name(old.status)} "
            f"to {S.JobStatus.Name(job.status)}"
        )
    # FIFO: ListJobs is in arrival order, so within one page (one moment) the PENDING jobs'
    # queue positions must rise strictly, and the first page's must start at 1.
    for number, page in enumerate(listing):
        positions = [job.queue_position for job in page if job.status == S.JOB_STATUS_PENDING]
        assert positions == sorted(set(positions)), f"FIFO order broken: {positions[:20]}"
        if number == 0 and positions:
            assert positions[0] == 1


def crash_rounds(cluster: Cluster, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    before: dict[str, common_pb2.Job] = {}
    for _ in range(rounds):
        stop = threading.Event()
        submitter = threading.Thread(target=submit_until, args=(cluster, stop, rng), daemon=True)
        submitter.start()
        # Observe while work goes on, then kill at a random moment.
        time.sleep(rng.uniform(0.05, 0.4))  # the random moment of the crash (not a wait)
        with contextlib.suppress(grpc.RpcError):
            before = {job.id: job for job in all_jobs(cluster.address)}
        time.sleep(rng.uniform(0.0, 0.1))
        cluster.kill_handler()
        stop.set()
        submitter.join(timeout=30)
        cluster.start_handler()
        check_invariants(cluster, before, pages(cluster.address))
    assert len(cluster.acknowledged) > rounds, "too little was submitted to prove anything"
    finished = [j for j in all_jobs(cluster.address) if j.status == S.JOB_STATUS_FINISHED]
    assert finished, "the scanner finished nothing: the test did not exercise scanning"


@pytest.mark.timeout(300)
def test_kill_9_at_random_moments_loses_nothing_acknowledged(cluster: Cluster) -> None:
    crash_rounds(cluster, rounds=20, seed=20261127)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_9_many_rounds(cluster: Cluster) -> None:
    crash_rounds(cluster, rounds=100, seed=int(time.time()))
