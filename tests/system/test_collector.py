"""A handler whose queue grows at run time does not stop for the collector's full passes (each
scans every job in memory); the young generations still collect (a real handler process,
read through its metrics endpoint)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc

from imagehandler.v1 import job_service_pb2, job_service_pb2_grpc
from tests.helpers import image
from tests.system.test_crash import free_port
from tests.system.test_replicas import wait_serving

DEADLINE = 30.0
# Enough allocations for CPython's own rule to start several full passes (one each ten young
# passes of the middle generation, once old objects grew by a quarter).
JOBS = 20_000
BATCH = 1_000


def collections(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=DEADLINE) as reply:
        text = reply.read().decode()
    found = re.findall(r'^python_gc_collections_total\{generation="(\d)"\} (\S+)$', text, re.M)
    return {generation: float(value) for generation, value in found}


def test_a_growing_queue_runs_young_collections_but_no_full_pass(tmp_path: Path) -> None:
    address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    handler = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--listen", address,
         "--metrics-listen", metrics, "--data-dir", str(tmp_path / "data"),
         "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_serving(address, handler)
        before = collections(f"http://{metrics}/metrics")
        with grpc.insecure_channel(address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            for start in range(0, JOBS, BATCH):
                stub.SubmitJobs(
                    job_service_pb2.SubmitJobsRequest(
                        jobs=[image(f"gc-{n}") for n in range(start, start + BATCH)]
                    ),
                    timeout=DEADLINE,
                )
            stats = stub.GetQueueStats(job_service_pb2.GetQueueStatsRequest(), timeout=DEADLINE)
            assert stats.pending == JOBS
        after = collections(f"http://{metrics}/metrics")
        assert after["0"] - before["0"] > 100, (before, after)  # the young ones still run
        assert after["1"] > before["1"], (before, after)
        assert after["2"] == before["2"], (before, after)  # no full pass over the queue
    finally:
        handler.send_signal(signal.SIGKILL)
        handler.wait(timeout=DEADLINE)
