"""Pickup latency: a submit → its assignment arriving at a scanner, at 10 %, 50 % and 90 % of
the maximum single-mode rate (first submit to last FINISHED), measured on the same handler and
scanners just before.

Method. This process submits single ``SubmitJob`` calls open-loop (call i starts at
t0 + i / rate, whether or not earlier ones have answered) and notes, per job id, the
``time.monotonic_ns()`` just before the call and when its answer arrived. The scanners are
:mod:`bench.stamp_scanner` processes (the real ScannerClient and noop engine) that stamp each
assignment with ``time.monotonic_ns()`` as it is read. CLOCK_MONOTONIC is shared by every
process on one Linux machine, so after the run the stamps are joined on job id:

- **submit → assignment** (the figure checked against the target): from the moment the
  submitter starts the call to the moment the scanner reads the assignment. It contains the
  whole submit path, so it is never less than the figure the issue names.
- **ack → assignment**: from the submit's answer to the assignment. The handler pushes the
  assignment as soon as the job is in the journal's kernel buffer, while the answer waits for
  the group fsync, so the assignment often arrives *before* the answer: this figure is then
  negative, and its percentiles are shown as they are.

Dispatch is never a poll: a submit schedules a dispatch pass with ``loop.call_soon``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import e2e
from bench.common import (
    Handler,
    Scanners,
    free_port,
    image_request,
    percentile,
    queue_stats,
    wait_scanners,
)
from imagehandler.v1 import job_service_pb2_grpc


@dataclass
class PickupResult:
    load: float  # share of the maximum rate
    target_rate: float
    achieved_rate: float
    jobs: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    assigned_before_ack: float  # share of jobs
    # Submits the handler's transport refused: more calls in flight than one HTTP/2 connection
    # takes (the rate is above what this setup sustains, so calls pile up).
    refused: int = 0
    refused_code: str = ""


async def open_loop(
    address: str, rate: float, count: int, tag: str
) -> tuple[dict[str, tuple[int, int]], float, list[grpc.aio.AioRpcError]]:
    """Submit ``count`` jobs at ``rate`` per second; per job id (sent, acked) in ns, the rate
    achieved, and the calls that failed."""
    out: dict[str, tuple[int, int]] = {}
    requests = [image_request(n, tag) for n in range(count)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        await queue_stats(stub)  # the channel is connected before the clock starts

        async def one(n: int) -> None:
            sent = time.monotonic_ns()
            reply = await stub.SubmitJob(requests[n], timeout=60)
            out[reply.job.id] = (sent, time.monotonic_ns())

        tasks = []
        started = time.monotonic()
        for n in range(count):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - started
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    refused = [o for o in failed if isinstance(o, grpc.aio.AioRpcError)]
    if len(refused) < len(failed):  # anything but a refused call is the bench's own failure
        raise next(o for o in failed if not isinstance(o, grpc.aio.AioRpcError))
    return out, count / elapsed, refused


async def wait_finished(address: str, total: int, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        while (await queue_stats(stub)).finished < total:
            if time.monotonic() > deadline:
                raise RuntimeError("pickup jobs did not finish")
            await asyncio.sleep(0.05)


def read_stamps(paths: list[Path]) -> dict[str, int]:
    stamps: dict[str, int] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            job_id, _, at = line.partition(" ")
            stamps.setdefault(job_id, int(at))  # the first assignment of a job
    return stamps


def measure(
    workdir: Path,
    max_rate: float,
    loads: tuple[float, ...] = (0.1, 0.5, 0.9),
    scanners: int = 8,
    slots: int = 128,
    seconds: float = 4.0,
    min_jobs: int = 1000,
    verbose: bool = True,
    storage: str = "journal",
    extra: tuple[str, ...] = (),
) -> list[PickupResult]:
    """``max_rate`` 0: measured first on this setup. ``storage`` and ``extra`` start the
    handler on another store (bench.postgres_side)."""
    handler = Handler(workdir, port=free_port(), name="pickup", storage=storage, extra=extra)
    fleet = Scanners(handler.address, scanners, slots, workdir, stamps=True)
    Level = tuple[float, float, dict[str, tuple[int, int]], list[grpc.aio.AioRpcError]]
    submitted: list[Level] = []
    handler.start()
    try:
        fleet.start()
        asyncio.run(wait_scanners(handler.address, scanners))
        total = 0
        if max_rate <= 0:
            # 100 %: this setup's own maximum, measured just before the levels as the e2e
            # part measures it (single mode, 32 calls in flight, first submit to last
            # FINISHED), so no drift of the machine between parts of a bench moves the levels.
            # Not the submits' rate alone: the runs and results of the last submits come
            # after it, so it is more than the setup sustains.
            count = max(min_jobs, 2000)
            took, _, _ = asyncio.run(e2e.run_once(handler.address, count, "single", "pkmax-"))
            total += count
            max_rate = count / took
            if verbose:
                print(f"  100 % = {max_rate:,.0f} single jobs/s (32 in flight on this "
                      "setup, first submit to last FINISHED, just before)", flush=True)  # fmt: skip
        for index, load in enumerate(loads):
            rate = max(1.0, load * max_rate)
            count = max(min_jobs, int(rate * seconds))
            times, achieved, refused = asyncio.run(
                open_loop(handler.address, rate, count, f"pk{index}-")
            )
            total += len(times)
            asyncio.run(wait_finished(handler.address, total))
            submitted.append((load, achieved, times, refused))
        fleet.drain()
    finally:
        fleet.stop()
        handler.stop()
    stamps = read_stamps([fleet.stamp_path(n) for n in range(scanners)])
    results = []
    for load, achieved, times, refused in submitted:
        from_sent = []
        from_ack = []
        for job_id, (sent, acked) in times.items():
            at = stamps.get(job_id)
            if at is None:
                continue
            from_sent.append((at - sent) / 1e6)
            from_ack.append((at - acked) / 1e6)
        if len(from_sent) < len(times):
            raise RuntimeError(f"{len(times) - len(from_sent)} jobs have no assignment stamp")
        result = PickupResult(
            load=load,
            target_rate=load * max_rate,
            achieved_rate=achieved,
            jobs=len(from_sent),
            p50_ms=percentile(from_sent, 50),
            p99_ms=percentile(from_sent, 99),
            max_ms=max(from_sent),
            ack_p50_ms=percentile(from_ack, 50),
            ack_p99_ms=percentile(from_ack, 99),
            ack_max_ms=max(from_ack),
            assigned_before_ack=sum(1 for v in from_ack if v < 0) / len(from_ack),
            refused=len(refused),
            refused_code=refused[0].code().name if refused else "",
        )
        results.append(result)
        if verbose:
            print(
                f"  pickup at {load:4.0%} ({achieved:6,.0f} submits/s, {result.jobs} jobs):"
                f" submit->assignment p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                f"  max {result.max_ms:7.2f} ms; ack->assignment p50 {result.ack_p50_ms:6.2f}"
                f" p99 {result.ack_p99_ms:6.2f} max {result.ack_max_ms:6.2f} ms"
                f" ({result.assigned_before_ack:.0%} assigned before the ack)"
                + (
                    f"; {result.refused} submits refused ({result.refused_code}): the rate is"
                    " above what this setup sustains"
                    if result.refused
                    else ""
                ),
                flush=True,
            )
    return results


def main() -> None:
    import argparse
    import json
    import tempfile
    from dataclasses import asdict

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-rate", type=float, default=0.0,
                        help="100 %% (submits/s); 0: measured first on the same setup")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ih-pickup-") as tmp:
        results = measure(Path(tmp), args.max_rate, seconds=args.seconds)
    print(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
