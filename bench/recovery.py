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

Each start is also given as the handler's CPU seconds (user + system) from its launch to SERVING:
on a shared machine the wall time waits on other processes, the CPU time does not.

    .venv/bin/python -m bench.recovery --jobs 1000000
    .venv/bin/python -m bench.recovery --jobs 1000000 --keep /tmp/filled

``--keep DIR`` copies the data directory as each start found it (``DIR/journal``: after
``kill -9``; ``DIR/snapshot``: after SIGTERM), to profile a start without filling again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.common import Handler, cpu_seconds, free_port, queue_stats, rss_bytes
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
    start_after_kill_cpu_seconds: float  # the handler's user + system CPU, launch to SERVING
    start_after_term_cpu_seconds: float
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


@dataclass
class Start:
    seconds: float  # launch to SERVING, wall clock
    cpu_seconds: float  # the handler's user + system CPU time until then
    peak_mib: float
    serving_mib: float


def _timed_start(handler: Handler, jobs: int, after: str, keep: Path | None) -> Start:
    """A start of the handler, timed to SERVING, that must find ``jobs`` pending (``after``
    names what stopped it); ``keep``: copy its data directory first."""
    if keep is not None:
        assert handler.data_dir is not None
        shutil.copytree(handler.data_dir, keep)
    started = time.perf_counter()
    handler.start()  # returns at SERVING (polled every 50 ms)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(handler.pid)
    peak = _status_mib(handler.pid, "VmHWM")
    time.sleep(0.5)
    start = Start(seconds, cpu, peak, rss_bytes(handler.pid) / 2**20)
    if (found := asyncio.run(_pending(handler.address))) != jobs:
        raise RuntimeError(f"{found:,} jobs pending after {after}, {jobs:,} expected")
    return start


def measure(
    workdir: Path, jobs: int = 1_000_000, verbose: bool = True, keep: Path | None = None
) -> RecoveryResult:
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
        kill = _timed_start(handler, jobs, "kill -9", keep / "journal" if keep else None)
        if verbose:
            print(f"  recovery: kill -9, start to SERVING {kill.seconds:.2f} s"
                  f" ({kill.cpu_seconds:.2f} s CPU) (journal);"
                  f" peak RSS {kill.peak_mib:,.0f} MiB, serving {kill.serving_mib:,.0f} MiB",
                  flush=True)  # fmt: skip
        assert handler.process is not None
        stopping = time.perf_counter()
        handler.process.send_signal(signal.SIGTERM)
        handler.process.wait(timeout=600)
        sigterm = time.perf_counter() - stopping
        handler.stop()
        term = _timed_start(handler, jobs, "SIGTERM", keep / "snapshot" if keep else None)
        if verbose:
            print(f"  recovery: SIGTERM took {sigterm:.2f} s; start to SERVING {term.seconds:.2f} s"
                  f" ({term.cpu_seconds:.2f} s CPU) (snapshot);"
                  f" peak RSS {term.peak_mib:,.0f} MiB, serving {term.serving_mib:,.0f} MiB",
                  flush=True)  # fmt: skip
    finally:
        handler.stop()
    return RecoveryResult(
        jobs=jobs,
        fill_seconds=fill_seconds,
        running_rss_mib=running,
        start_after_kill_seconds=kill.seconds,
        sigterm_seconds=sigterm,
        start_after_term_seconds=term.seconds,
        start_after_kill_cpu_seconds=kill.cpu_seconds,
        start_after_term_cpu_seconds=term.cpu_seconds,
        peak_recovery_rss_mib=max(kill.peak_mib, term.peak_mib),
        serving_rss_mib=max(kill.serving_mib, term.serving_mib),
        peak_after_kill_mib=kill.peak_mib,
        peak_after_term_mib=term.peak_mib,
        serving_after_kill_mib=kill.serving_mib,
        serving_after_term_mib=term.serving_mib,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument(
        "--keep", type=Path, help="copy the data directory before each start here (must not exist)"
    )
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} exists")
    with tempfile.TemporaryDirectory(prefix="ih-recovery-") as tmp:
        result = measure(Path(tmp), args.jobs, keep=args.keep)
    print(json.dumps(asdict(result), indent=1))


if __name__ == "__main__":
    main()
