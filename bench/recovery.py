"""Recovery, measured from outside: a handler with many queued jobs is stopped and started again.

A handler process (journal on, ``batch`` fsync, no scanner, so every job stays PENDING, and no
snapshot while it fills) takes ``SubmitJobs`` batches of 1,000 (4 calls in flight, as
:mod:`bench.memory`). Then, on the same data directory:

1. its RSS while running (VmRSS), then ``kill -9``;
2. a start, timed from the process's launch to the health service's SERVING: the recovery
   replays the journal (every job's creation record); its peak RSS (VmHWM: the kernel's
   high-water mark, no sampling) and its RSS once serving;
3. ``SIGTERM``, timed to the process's exit (the drain and the snapshot it writes at close);
4. a start again, now from that snapshot, timed and measured the same way.

    .venv/bin/python -m bench.recovery --jobs 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.common import Handler, free_port, queue_stats, rss_bytes
from bench.memory import fill
from imagehandler.v1 import job_service_pb2_grpc


@dataclass
class RecoveryResult:
    jobs: int
    fill_seconds: float
    running_rss_mib: float
    start_after_kill_seconds: float  # the journal replayed
    sigterm_seconds: float
    start_after_term_seconds: float  # the snapshot written at SIGTERM read
    peak_recovery_rss_mib: float  # the higher of both starts
    serving_rss_mib: float  # once serving after SIGTERM (the higher of both starts)
    peak_after_kill_mib: float
    peak_after_term_mib: float
    serving_after_kill_mib: float
    serving_after_term_mib: float


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


async def _pending(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        return int((await queue_stats(job_service_pb2_grpc.JobServiceStub(channel))).pending)


def _timed_start(handler: Handler) -> tuple[float, float, float]:
    """(seconds from launch to SERVING, peak RSS MiB, RSS MiB once serving)."""
    started = time.perf_counter()
    handler.start()  # returns at SERVING (polled every 50 ms)
    seconds = time.perf_counter() - started
    peak = _status_mib(handler.pid, "VmHWM")
    time.sleep(0.5)
    return seconds, peak, rss_bytes(handler.pid) / 2**20


def measure(workdir: Path, jobs: int = 1_000_000, verbose: bool = True) -> RecoveryResult:
    data = workdir / "recovery-data"
    handler = Handler(workdir, port=free_port(), name="recovery", data_dir=data)
    # The bench's usual --grace-period 0: SIGTERM times the close, not a drain's wait.
    try:
        handler.start()
        started = time.perf_counter()
        asyncio.run(fill(handler.address, 0, jobs))
        fill_seconds = time.perf_counter() - started
        time.sleep(0.5)
        running = rss_bytes(handler.pid) / 2**20
        if verbose:
            rate = jobs / fill_seconds
            print(f"  recovery: {jobs:,} jobs queued in {fill_seconds:.1f} s ({rate:,.0f} jobs/s);"
                  f" RSS {running:,.0f} MiB", flush=True)  # fmt: skip
        handler.stop()  # kill -9
        after_kill, peak_kill, serving_kill = _timed_start(handler)
        if (found := asyncio.run(_pending(handler.address))) != jobs:
            raise RuntimeError(f"{found:,} jobs pending after kill -9, {jobs:,} expected")
        if verbose:
            print(f"  recovery: kill -9, start to SERVING {after_kill:.2f} s (journal);"
                  f" peak RSS {peak_kill:,.0f} MiB, serving {serving_kill:,.0f} MiB",
                  flush=True)  # fmt: skip
        assert handler.process is not None
        stopping = time.perf_counter()
        handler.process.send_signal(signal.SIGTERM)
        handler.process.wait(timeout=600)
        sigterm = time.perf_counter() - stopping
        handler.stop()
        after_term, peak_term, serving_term = _timed_start(handler)
        if (found := asyncio.run(_pending(handler.address))) != jobs:
            raise RuntimeError(f"{found:,} jobs pending after SIGTERM, {jobs:,} expected")
        if verbose:
            print(f"  recovery: SIGTERM took {sigterm:.2f} s; start to SERVING {after_term:.2f} s"
                  f" (snapshot); peak RSS {peak_term:,.0f} MiB, serving {serving_term:,.0f} MiB",
                  flush=True)  # fmt: skip
    finally:
        handler.stop()
    return RecoveryResult(
        jobs=jobs,
        fill_seconds=fill_seconds,
        running_rss_mib=running,
        start_after_kill_seconds=after_kill,
        sigterm_seconds=sigterm,
        start_after_term_seconds=after_term,
        peak_recovery_rss_mib=max(peak_kill, peak_term),
        serving_rss_mib=max(serving_kill, serving_term),
        peak_after_kill_mib=peak_kill,
        peak_after_term_mib=peak_term,
        serving_after_kill_mib=serving_kill,
        serving_after_term_mib=serving_term,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ih-recovery-") as tmp:
        result = measure(Path(tmp), args.jobs)
    print(json.dumps(asdict(result), indent=1))


if __name__ == "__main__":
    main()
