"""Result pipeline figures: results processed per second with 1, 10 and 50 result workers on
results of 10 and 5,000 findings, and how long other jobs wait for dispatch meanwhile.

    .venv/bin/python -m bench.results            # prints a table

Runs the job manager in-process with the journal on disk (fsync batch), scanners as in-process
sessions (no gRPC), so the figures are the pipeline's own: check, summarise, store, finish.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import image_spec
from imagehandler.errors import Catalogue
from imagehandler.v1 import common_pb2
from server.config import Config
from server.core.model import JobStatus, ObjectKind
from server.core.retry import RunFailure
from server.observability import logs
from server.service.events import Subscription
from server.service.handler import Handler
from server.service.sessions import AssignJobs, Database, ScannerMessage, ScannerProfile
from server.storage.embedded import EmbeddedRepository
from server.storage.embedded.journal import FsyncPolicy


def make_result(findings: int) -> common_pb2.ScanResult:
    return common_pb2.ScanResult(
        vulnerabilities=[
            common_pb2.Vulnerability(
                id=f"CVE-2024-{n:05d}",
                package=f"package-{n % 300}",
                installed_version="1.2.3",
                fixed_version="1.2.4",
                severity=common_pb2.SEVERITY_MEDIUM if n % 7 else common_pb2.SEVERITY_HIGH,
                path="/usr/lib/python3/dist-packages",
            )
            for n in range(findings)
        ]
    )


async def run(workers: int, findings: int, jobs: int, directory: Path) -> tuple[float, float]:
    """(results per second, median dispatch latency in ms of jobs submitted meanwhile)."""
    config = Config(data_dir=directory, result_workers=workers, max_batch=100_000)
    manager = Handler(config, EmbeddedRepository(directory, policy=FsyncPolicy.BATCH))
    await manager.open()
    assigned: dict[str, float] = {}
    assignment = asyncio.Event()

    def send(message: ScannerMessage) -> None:
        if isinstance(message, AssignJobs):
            for job in message.jobs:
                assigned[job.id] = time.perf_counter()
            assignment.set()

    def profile(name: str, slots: int) -> ScannerProfile:
        databases = (Database("db", "1", "2026-11-20"),)
        return ScannerProfile(name, "1", "bench", frozenset(ObjectKind), slots, databases)

    busy = manager.connect_scanner(profile("busy", jobs), send, lambda e: None)
    manager.scanner_ready(busy, jobs)
    done = asyncio.Event()
    finished = 0

    def on_event(job: object, transition: object) -> None:
        nonlocal finished
        if getattr(transition, "to_status", None) is JobStatus.FINISHED:
            finished += 1
            if finished == jobs:
                done.set()

    manager.events.subscribe(Subscription(on_event))
    await manager.submit_many([image_spec(f"r{n}") for n in range(jobs)])
    await asyncio.wait_for(assignment.wait(), timeout=60)  # the dispatch pass assigned them
    result = make_result(findings)
    started = time.perf_counter()
    for job_id in list(busy.held):
        await manager.result(busy, job_id, 0, result)
    # While the workers are busy: a second scanner, and jobs submitted one at a time.
    other = manager.connect_scanner(profile("other", 1), send, lambda e: None)
    manager.scanner_ready(other, 1)
    latencies = []
    for n in range(20):
        assignment.clear()
        submitted = time.perf_counter()
        (new,) = await manager.submit_many([image_spec(f"r{jobs + n}")])
        job = new.job
        await asyncio.wait_for(assignment.wait(), timeout=60)
        latencies.append((assigned[job.id] - submitted) * 1000)
        # Free the slot for the next one (a permanent failure: the job is done with).
        await manager.failure(other, job.id, RunFailure(Catalogue.SCAN_PARAMS_EMPTY, "bench"))
    await asyncio.wait_for(done.wait(), timeout=600)
    rate = jobs / (time.perf_counter() - started)
    await manager.stop()
    return rate, statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=0, help="results per run (default: scaled)")
    args = parser.parse_args()
    logs.configure("json", "error")
    print(f"{'workers':>7} {'findings':>8} {'results/s':>10} {'dispatch p50 while busy':>24}")
    for findings in (10, 5000):
        for workers in (1, 10, 50):
            jobs = args.jobs or (4000 if findings == 10 else 200)
            root = Path(tempfile.mkdtemp(prefix="ih-results-"))
            try:
                rate, latency = asyncio.run(run(workers, findings, jobs, root / "data"))
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(f"{workers:>7} {findings:>8} {rate:>10,.0f} {latency:>21.2f} ms", flush=True)


if __name__ == "__main__":
    main()
