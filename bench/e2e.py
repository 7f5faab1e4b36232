"""End-to-end throughput: jobs per second from the first submit to the last FINISHED.

The handler runs in its own process (journal on, ``batch`` fsync, log level ``warning`` and no
metrics endpoint unless asked otherwise: ``--metrics`` runs it with ``--metrics-listen``, as the
Helm chart does, so its per-transition counters and histograms are paid for). The scanners are
``image-scanner`` processes with the noop engine; this process submits, either ``SubmitJobs``
batches of 100 (4 calls in flight), single ``SubmitJob`` calls (32 in flight), or one
``SubmitJobStream`` with a job per message (512 unacknowledged at most). The end is
seen by polling ``GetQueueStats`` every 20 ms (so the figure can only be pessimistic, by at
most one poll). The handler is restarted with a fresh data directory for every run; the
scanners stay and reconnect.

    .venv/bin/python -m bench.e2e --scanners 8 --jobs 20000 --mode batched
    .venv/bin/python -m bench.e2e --scanners 8 --jobs 20000 --mode batched --metrics
    .venv/bin/python -m bench.e2e --scanners 8 --jobs 20000 --mode both --fsync never
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import grpc

from bench.common import (
    Handler,
    Scanners,
    cpu_seconds,
    free_port,
    image_request,
    queue_stats,
    wait_scanners,
)
from imagehandler.v1 import job_service_pb2, job_service_pb2_grpc

BATCH = 100
BATCH_IN_FLIGHT = 4
SINGLE_IN_FLIGHT = 32
# Jobs a SubmitJobStream keeps unacknowledged (below the handler's bound of 1,024).
STREAM_IN_FLIGHT = 512
POLL = 0.02


@dataclass
class E2EResult:
    mode: str
    scanners: int
    slots: int
    jobs: int
    seconds: float
    jobs_per_second: float
    submit_seconds: float
    handler_cpu_us_per_job: float
    scanners_cpu_us_per_job: float
    # This process: the submits and the GetQueueStats polls (the load generator's share).
    submitter_cpu_us_per_job: float
    errors: int
    log_level: str
    event_loop: str = "asyncio"
    metrics: bool = False
    fsync: str = "batch"  # the handler's --fsync


class Variant(NamedTuple):
    """How one set of runs submits and how its handler is started."""

    mode: str  # batched, single or stream (SubmitJobStream)
    log_level: str = "warning"
    event_loop: str = "asyncio"
    metrics: bool = False  # with --metrics-listen (the chart's default)
    # The handler's --fsync: ``never`` is the fair peer of a Redis without persistence.
    fsync: str = "batch"

    def handler_args(self) -> tuple[str, ...]:
        args: tuple[str, ...] = ()
        if self.event_loop != "asyncio":
            args += ("--event-loop", self.event_loop)
        if self.metrics:
            args += ("--metrics-listen", "127.0.0.1:0")
        return args


def supports_uvloop() -> bool:
    """Whether the handler in this tree has ``--event-loop`` (and uvloop is installed)."""
    import importlib.util

    from server.config import Config

    return hasattr(Config(), "event_loop") and importlib.util.find_spec("uvloop") is not None


def default_slots(scanners: int) -> int:
    """Slots per scanner: enough jobs in flight that the scanners never wait on a round trip
    (about 1,024 in all), at least 16 each."""
    return max(16, 1024 // scanners)


async def submit_all(address: str, jobs: int, mode: str, tag: str) -> float:
    """Submit ``jobs`` jobs; the seconds the submits took."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        started = time.perf_counter()
        if mode == "batched":
            batches = [
                job_service_pb2.SubmitJobsRequest(
                    jobs=[image_request(n, tag) for n in range(start, min(jobs, start + BATCH))]
                )
                for start in range(0, jobs, BATCH)
            ]
            started = time.perf_counter()
            queue = list(reversed(batches))

            async def batch_worker() -> None:
                while queue:
                    await stub.SubmitJobs(queue.pop(), timeout=60)

            await asyncio.gather(*(batch_worker() for _ in range(BATCH_IN_FLIGHT)))
        elif mode == "stream":
            messages = [
                job_service_pb2.SubmitJobStreamRequest(job=image_request(n, tag))
                for n in range(jobs)
            ]
            started = time.perf_counter()
            await stream_all(stub, messages)
        else:
            requests = [image_request(n, tag) for n in range(jobs)]
            started = time.perf_counter()
            pending = list(reversed(requests))

            async def single_worker() -> None:
                while pending:
                    await stub.SubmitJob(pending.pop(), timeout=60)

            await asyncio.gather(*(single_worker() for _ in range(SINGLE_IN_FLIGHT)))
        return time.perf_counter() - started


async def stream_all(
    stub: job_service_pb2_grpc.JobServiceStub,
    requests: list[job_service_pb2.SubmitJobStreamRequest],
) -> None:
    """Every request on one SubmitJobStream, at most STREAM_IN_FLIGHT unacknowledged."""
    window = asyncio.Semaphore(STREAM_IN_FLIGHT)
    call = cast(
        "grpc.aio.StreamStreamCall[Any, job_service_pb2.SubmitJobStreamResponse]",
        stub.SubmitJobStream(None, timeout=120),  # type: ignore[arg-type]  # call.write()
    )

    async def write() -> None:
        for request in requests:
            await window.acquire()
            await call.write(request)
        await call.done_writing()

    writer = asyncio.create_task(write())
    for _ in requests:
        ack = await call.read()
        if not isinstance(ack, job_service_pb2.SubmitJobStreamResponse):
            raise RuntimeError("the SubmitJobStream ended before every job was acknowledged")
        if ack.HasField("error"):
            raise RuntimeError(f"job {ack.index} refused: {ack.error.message}")
        window.release()
    await writer


async def run_once(address: str, jobs: int, mode: str, tag: str) -> tuple[float, float, int]:
    """(seconds first submit → last FINISHED, seconds of submitting, jobs in ERROR)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        before = await queue_stats(stub)
        base = before.finished + before.error
        started = time.perf_counter()
        submitting = asyncio.create_task(submit_all(address, jobs, mode, tag))
        while True:
            await asyncio.sleep(POLL)
            stats = await queue_stats(stub)
            if stats.finished + stats.error - base >= jobs:
                ended = time.perf_counter()
                break
            if submitting.done() and submitting.exception() is not None:
                raise submitting.exception()  # type: ignore[misc]
        submit_seconds = await submitting
        # The submit task measured from its own start (after building the requests).
        return ended - started, submit_seconds, stats.error - before.error


def measure(
    workdir: Path,
    scanners: int,
    plan: list[Variant],
    jobs: int,
    repeats: int,
    slots: int = 0,
    verbose: bool = True,
) -> list[E2EResult]:
    """Runs each variant of ``plan`` ``repeats`` times with one set of scanners, a fresh
    handler each time."""
    slots = slots or default_slots(scanners)
    results: list[E2EResult] = []
    handler = Handler(workdir, name=f"e2e-{scanners}", port=free_port())
    fleet = Scanners(handler.address, scanners, slots, workdir)
    try:
        fleet.start()
        run = 0
        for variant in plan:
            mode, level, loop = variant.mode, variant.log_level, variant.event_loop
            for _ in range(repeats):
                run += 1
                handler.log_level = level
                handler.extra = variant.handler_args()
                handler.fsync = variant.fsync
                handler.start()
                try:
                    asyncio.run(wait_scanners(handler.address, scanners))
                    handler_cpu = cpu_seconds(handler.pid)
                    fleet_cpu = sum(cpu_seconds(pid) for pid in fleet.pids())
                    own_cpu = time.process_time()
                    seconds, submit_seconds, errors = asyncio.run(
                        run_once(handler.address, jobs, mode, f"r{run}-")
                    )
                    handler_cpu = cpu_seconds(handler.pid) - handler_cpu
                    fleet_cpu = sum(cpu_seconds(pid) for pid in fleet.pids()) - fleet_cpu
                    own_cpu = time.process_time() - own_cpu
                finally:
                    handler.stop()
                result = E2EResult(
                    mode=mode,
                    scanners=scanners,
                    slots=slots,
                    jobs=jobs,
                    seconds=seconds,
                    jobs_per_second=jobs / seconds,
                    submit_seconds=submit_seconds,
                    handler_cpu_us_per_job=handler_cpu / jobs * 1e6,
                    scanners_cpu_us_per_job=fleet_cpu / jobs * 1e6,
                    submitter_cpu_us_per_job=own_cpu / jobs * 1e6,
                    errors=errors,
                    log_level=level,
                    event_loop=loop,
                    metrics=variant.metrics,
                    fsync=variant.fsync,
                )
                results.append(result)
                if verbose:
                    print(
                        f"  e2e {mode:7} {scanners:2} scanners x {slots} slots, log {level:7}"
                        f" {loop:7} fsync {variant.fsync:5}"
                        f"{' metrics' if variant.metrics else ''}:"
                        f" {result.jobs_per_second:8,.0f} jobs/s ({jobs:,} jobs in"
                        f" {seconds:.2f} s; submits took {submit_seconds:.2f} s; handler"
                        f" {result.handler_cpu_us_per_job:.0f} us CPU/job, scanners"
                        f" {result.scanners_cpu_us_per_job:.0f} us/job, submitter"
                        f" {result.submitter_cpu_us_per_job:.0f} us/job)"
                        + (f"  ** {errors} jobs in ERROR **" if errors else ""),
                        flush=True,
                    )
    finally:
        fleet.stop()
        handler.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scanners", type=int, default=8)
    parser.add_argument("--slots", type=int, default=0, help="per scanner (default: see code)")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--mode", choices=("batched", "single", "stream", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--event-loop", default="asyncio", choices=("asyncio", "uvloop"))
    parser.add_argument(
        "--metrics", action="store_true", help="the handler with --metrics-listen, as deployed"
    )
    parser.add_argument("--fsync", default="batch", choices=("always", "batch", "never"))
    args = parser.parse_args()
    modes = ["batched", "single"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="ih-e2e-") as tmp:
        results = measure(
            Path(tmp),
            args.scanners,
            [
                Variant(mode, args.log_level, args.event_loop, args.metrics, args.fsync)
                for mode in modes
            ],
            args.jobs,
            args.repeats,
            args.slots,
        )
    print(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
