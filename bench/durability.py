"""Durability figures: submit throughput per fsync policy, snapshot size and time, the longest
event-loop stall while a snapshot is written, and recovery time.

    .venv/bin/python -m bench.durability                  # 100,000 and 1,000,000 jobs
    .venv/bin/python -m bench.durability --sizes 100000   # quicker

Submits run against a real handler process over gRPC (32 concurrent clients, single
SubmitJob calls, and SubmitJobs batches of 100); the rest runs the store in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench.common import free_port, image_spec, wait_serving
from imagehandler.v1 import job_service_pb2, job_service_pb2_grpc
from server.observability import logs
from server.storage.embedded import EmbeddedRepository
from server.storage.embedded.journal import FsyncPolicy
from server.storage.embedded.store import JournalStore
from tests.helpers import image


async def submit_rate(address: str, seconds: float, batch: int, clients: int = 32) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal done
        async with grpc.aio.insecure_channel(address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            k = 0
            while time.perf_counter() < end:
                k += 1
                if batch == 1:
                    await stub.SubmitJob(image(tag=f"c{n}-{k}"))
                else:
                    jobs = [image(tag=f"c{n}-{k}-{i}") for i in range(batch)]
                    await stub.SubmitJobs(job_service_pb2.SubmitJobsRequest(jobs=jobs))
                done += batch

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return done / (time.perf_counter() - started)


def bench_submits(root: Path, seconds: float) -> list[tuple[str, float, float]]:
    rows = []
    for policy in ("batch", "never", "always"):
        data = root / f"submits-{policy}"
        address = f"127.0.0.1:{free_port()}"
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--listen", address,
             "--data-dir", str(data), "--fsync", policy, "--log-level", "error"],
        )  # fmt: skip
        try:
            asyncio.run(wait_serving(address))
            single = asyncio.run(submit_rate(address, seconds, 1))
            batched = asyncio.run(submit_rate(address, seconds, 100))
        finally:
            process.terminate()
            process.wait(timeout=60)
        rows.append((policy, single, batched))
        print(f"  fsync {policy:6}  {single:9,.0f} jobs/s single   {batched:9,.0f} jobs/s batched",
              flush=True)  # fmt: skip
    return rows


async def fill_and_snapshot(directory: Path, count: int) -> dict[str, float]:
    repository = EmbeddedRepository(directory, policy=FsyncPolicy.NEVER)
    await repository.open()
    started = time.perf_counter()
    for start in range(0, count, 10_000):
        specs = [image_spec(f"v{n}") for n in range(start, min(count, start + 10_000))]
        await repository.insert_many(specs, at=datetime.now(UTC))
        await asyncio.sleep(0)
    fill_seconds = time.perf_counter() - started

    # The longest gap between ticks of a 1 ms ticker while the snapshot is written.
    longest = 0.0
    ticking = True

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while ticking:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    assert await repository.snapshot()
    snapshot_seconds = time.perf_counter() - started
    ticking = False
    await tick
    assert repository.store.last_snapshot is not None
    size = repository.store.last_snapshot[1]
    await repository.store.close()
    return {
        "fill_seconds": fill_seconds,
        "snapshot_seconds": snapshot_seconds,
        "snapshot_bytes": float(size),
        "longest_stall": longest,
    }


def bench_recovery(directory: Path) -> tuple[float, int]:
    store = JournalStore(directory, FsyncPolicy.NEVER)
    store.open_directory()
    started = time.perf_counter()
    state = store.recover()
    return time.perf_counter() - started, len(state.jobs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--seconds", type=float, default=5.0, help="per submit measurement")
    parser.add_argument("--skip-submits", action="store_true")
    args = parser.parse_args()
    logs.configure("json", "error")
    root = Path(tempfile.mkdtemp(prefix="ih-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        print(f"durability bench in {root} ({os.cpu_count()} cores)", flush=True)
        if not args.skip_submits:
            print("submits through gRPC (32 clients), journal on disk:", flush=True)
            bench_submits(root, args.seconds)
        for count in (int(s) for s in args.sizes.split(",")):
            directory = root / f"jobs-{count}"
            figures = asyncio.run(fill_and_snapshot(directory, count))
            recovery, recovered = bench_recovery(directory)
            assert recovered == count, (recovered, count)
            print(
                f"{count:>9,} jobs: snapshot {figures['snapshot_bytes'] / 1e6:7.1f} MB "
                f"in {figures['snapshot_seconds']:6.1f} s, longest loop stall "
                f"{figures['longest_stall'] * 1000:6.1f} ms; recovery {recovery:6.1f} s "
                f"({count / recovery:,.0f} jobs/s); filling took {figures['fill_seconds']:.1f} s",
                flush=True,
            )
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
