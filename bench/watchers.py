"""Slow watchers must not cost memory or other clients' latency.

A handler process; ``watchers`` WatchJobs streams of every job that never read; two clients
sending SubmitJobs of 100 back to back; one more client, in a process of its own, submitting
single jobs one at a time and timing each. Prints the handler's peak RSS and CPU per job, the
single submits' p50/p99 and how many watchers were ended (each with the last sequence it was
sent, so it can resume).

    .venv/bin/python -m bench.watchers --watchers 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio

from bench.common import Handler, cpu_seconds, image_request, rss_bytes
from imagehandler.v1 import job_service_pb2, job_service_pb2_grpc
from server.transport.guard import STREAM_END


@dataclass
class Flood:
    peak_rss: int = 0
    start_rss: int = 0
    handler_cpu: float = 0.0
    submitted: int = 0
    latencies: list[float] = field(default_factory=list)
    watchers_ended: int = 0
    end_details: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    @property
    def cpu_per_job(self) -> float:
        return self.handler_cpu / max(1, self.submitted + len(self.latencies))


def probe(address: str, seconds: float, results: multiprocessing.Queue[list[float]]) -> None:
    """One client submitting single jobs one at a time for `seconds`, timing each."""

    async def run() -> list[float]:
        latencies: list[float] = []
        async with aio.insecure_channel(address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            ends = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < ends:
                i += 1
                started = time.perf_counter()
                await stub.SubmitJob(image_request(i, "probe"))
                latencies.append(time.perf_counter() - started)
        return latencies

    results.put(asyncio.run(run()))


async def flood(
    address: str, pid: int, *, watchers: int, seconds: float, batch: int = 100
) -> Flood:
    """Run the flood against a running handler and measure it."""
    out = Flood(start_rss=rss_bytes(pid))
    # One channel per watcher, as separate clients would have: streams that never read.
    channels = [aio.insecure_channel(address) for _ in range(watchers)]
    calls = []
    for channel in channels:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        call = stub.WatchJobs(job_service_pb2.WatchJobsRequest())
        await call.initial_metadata()  # subscribed
        calls.append(call)
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            out.peak_rss = max(out.peak_rss, rss_bytes(pid))
            await asyncio.sleep(0.1)  # a sampling period, not a wait for state

    async def bulk(n: int) -> None:
        async with aio.insecure_channel(address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            i = 0
            while not stop.is_set():
                requests = [image_request(n * 10_000_000 + i + k, "w") for k in range(batch)]
                i += batch
                await stub.SubmitJobs(job_service_pb2.SubmitJobsRequest(jobs=requests))
                out.submitted += batch

    cpu = cpu_seconds(pid)
    # The timed client is a process of its own, as a normal client is: in this process its
    # latencies would include the flood's own request building and the watchers' reads.
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[list[float]] = context.Queue()
    prober = context.Process(target=probe, args=(address, seconds, results))
    tasks = [asyncio.create_task(coro) for coro in (sample(), bulk(1), bulk(2))]
    prober.start()
    out.latencies = await asyncio.to_thread(results.get, True, seconds + 60)
    stop.set()
    await asyncio.gather(*tasks)
    await asyncio.to_thread(prober.join, 30)
    out.handler_cpu = cpu_seconds(pid) - cpu
    out.peak_rss = max(out.peak_rss, rss_bytes(pid))
    for call in calls:
        # Drain what the stream holds: a watcher that was ended finds its status at the end;
        # one still watching goes quiet and is cancelled.
        try:
            while await asyncio.wait_for(call.read(), 2) is not STREAM_END:
                pass
        except TimeoutError:
            call.cancel()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                out.watchers_ended += 1
                out.end_details.append(exc.details() or "")
    for channel in channels:
        await channel.close(None)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watchers")
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # The watchers all come from this one address and stand for as many clients.
        handler = Handler(Path(tmp), extra=("--max-streams-per-client", "0"))
        handler.start()
        try:
            result = asyncio.run(
                flood(handler.address, handler.pid, watchers=args.watchers, seconds=args.seconds)
            )
        finally:
            handler.stop()
    mib = 1024 * 1024
    print(f"watchers that never read       {args.watchers}")
    print(f"jobs submitted in {args.seconds:g} s         {result.submitted:,}")
    print(f"handler RSS start / peak       {result.start_rss / mib:,.0f} / "
          f"{result.peak_rss / mib:,.0f} MiB")  # fmt: skip
    print(f"handler CPU per job            {result.cpu_per_job * 1e6:.1f} us")
    print(f"single SubmitJob p50 / p99     {result.p(0.5) * 1000:.1f} / "
          f"{result.p(0.99) * 1000:.1f} ms ({len(result.latencies)} submits)")  # fmt: skip
    print(f"watchers ended (fell behind)   {result.watchers_ended}")
    if result.end_details:
        print(f"  e.g. {result.end_details[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
