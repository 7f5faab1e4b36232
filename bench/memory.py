"""Memory: the handler's RSS per PENDING job at 100,000 and 1,000,000 queued jobs.

A handler process (journal on, ``batch`` fsync, log level warning, no scanner, so every job
stays PENDING) takes ``SubmitJobs`` batches of 1,000 from this process; its RSS (VmRSS) is
read after start and again at each size. The figure is the growth divided by the jobs:
what one more PENDING job costs, with the process's fixed start-up memory left out.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.common import Handler, free_port, image_request, queue_stats, rss_bytes
from imagehandler.v1 import job_service_pb2, job_service_pb2_grpc

BATCH = 1000
IN_FLIGHT = 4


@dataclass
class MemoryResult:
    pending: int
    rss_bytes: int
    rss_start_bytes: int
    bytes_per_job: float
    fill_seconds: float


async def fill(address: str, start: int, stop: int) -> None:
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        starts = list(range(stop - BATCH, start - 1, -BATCH))

        async def worker() -> None:
            while starts:
                first = starts.pop()
                request = job_service_pb2.SubmitJobsRequest(
                    jobs=[image_request(n, "m") for n in range(first, min(stop, first + BATCH))]
                )
                await stub.SubmitJobs(request, timeout=120)

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        stats = await queue_stats(stub)
        if stats.pending != stop:
            raise RuntimeError(f"{stats.pending} jobs pending, {stop} expected")


def measure(
    workdir: Path, sizes: tuple[int, ...] = (100_000, 1_000_000), verbose: bool = True
) -> list[MemoryResult]:
    results = []
    with Handler(workdir, port=free_port(), name="memory") as handler:
        time.sleep(0.5)
        start_rss = rss_bytes(handler.pid)
        queued = 0
        for size in sorted(sizes):
            started = time.perf_counter()
            asyncio.run(fill(handler.address, queued, size))
            seconds = time.perf_counter() - started
            queued = size
            time.sleep(0.5)
            rss = rss_bytes(handler.pid)
            result = MemoryResult(
                pending=size,
                rss_bytes=rss,
                rss_start_bytes=start_rss,
                bytes_per_job=(rss - start_rss) / size,
                fill_seconds=seconds,
            )
            results.append(result)
            if verbose:
                print(
                    f"  memory: {size:>9,} PENDING jobs: RSS {rss / 2**20:7.1f} MiB"
                    f" (start {start_rss / 2**20:.1f} MiB): {result.bytes_per_job:6.0f} B/job",
                    flush=True,
                )
    return results


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ih-memory-") as tmp:
        measure(Path(tmp), tuple(int(s) for s in args.sizes.split(",")))
