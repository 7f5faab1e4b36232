"""Scale: the cost of one dispatch with 1,000 vs 1,000,000 PENDING jobs, and with 10 vs 1,000
connected scanners.

Measured inside one process on the real job manager (journal store on disk, ``never`` fsync so
the disk does not set the pace, log level warning), with no gRPC in between: the figure is the
handler's own work to hand one job to one scanner (the dispatch pass: choose the scanner, take
the queue's head, move the job to IN_PROGRESS, journal record, log call, event, run timer, the
assignment queued for the scanner's stream). Each dispatch is timed alone by wrapping
``Dispatch.once`` (one dispatch pass); the median over thousands of dispatches is reported.

- **loaded**: every scanner busy (1 slot each); each step frees one slot (cancel) and queues
  one job, so the queue length stays where it was and each pass assigns exactly one job.
- **idle**: every scanner free and the queue empty; each step queues one job (assigned at once
  to the next scanner in the ring) and then cancels it.

Each case runs in a fresh interpreter so the 1,000,000-job heap does not slow the others.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, child_env


@dataclass
class DispatchCost:
    pending: int
    scanners: int
    mode: str
    dispatches: int
    median_us: float
    mean_us: float
    p99_us: float


def _spec(n: int) -> Any:
    from server.core.model import ImageRef, JobSpec, Lane, Policy, Trigger

    return JobSpec(
        ImageRef("docker.io", "library/app", f"s{n}"),
        Trigger.SCHEDULED,
        (Policy.VULNERABILITIES,),
        600.0,
        Lane.BULK,
    )


async def _case(pending: int, scanners: int, mode: str, steps: int, workdir: Path) -> DispatchCost:
    from server.config import Config
    from server.core.model import ObjectKind
    from server.observability import logs
    from server.service.handler import Handler
    from server.service.sessions import Database, ScannerProfile
    from server.storage.embedded import EmbeddedRepository
    from server.storage.embedded.journal import FsyncPolicy

    logs.configure("json", "warning")
    config = replace(
        Config(),
        data_dir=workdir,
        fsync="never",
        max_batch=10_000,
        heartbeat_timeout=1e6,
        result_wait=1e6,
    )
    manager = Handler(config, EmbeddedRepository(workdir, policy=FsyncPolicy.NEVER))
    await manager.open()
    counter = 0

    async def submit(count: int) -> None:
        nonlocal counter
        for start in range(0, count, 10_000):
            n = min(10_000, count - start)
            await manager.submit_many([_spec(counter + i) for i in range(n)])
            counter += n

    await submit(pending)
    await asyncio.sleep(0)
    today = datetime.now(UTC).date().isoformat()
    sessions = [
        manager.connect_scanner(
            ScannerProfile(
                scanner_id=f"scale-{n}",
                version="bench",
                engine="bench",
                kinds=frozenset(ObjectKind),
                slots=1,
                databases=(Database("noop", "0", today),),
            ),
            send=lambda message: None,
            close=lambda error: None,
        )
        for n in range(scanners)
    ]
    timings: list[int] = []
    assigned_per_pass: list[int] = []
    original: Callable[[], Awaitable[None]] = manager.dispatch.once

    async def timed() -> None:
        held = sum(len(s.held) for s in sessions) if len(timings) < 3 else 0
        started = time.perf_counter_ns()
        await original()
        timings.append(time.perf_counter_ns() - started)
        if len(timings) <= 3:
            assigned_per_pass.append(sum(len(s.held) for s in sessions) - held)

    async def one_pass() -> None:
        """Let the dispatch task run the pass it was asked for."""
        for _ in range(3):
            await asyncio.sleep(0)

    for session in sessions:
        manager.scanner_ready(session, 1)
    await one_pass()  # the first pass fills every slot (loaded) or finds no job (idle)
    if mode == "loaded":
        await submit(scanners)  # back to `pending` queued jobs
    await one_pass()
    manager.dispatch.once = timed  # type: ignore[method-assign]
    gc.collect()
    ring = 0
    for _ in range(steps):
        if mode == "loaded":
            session = sessions[ring % scanners]
            ring += 1
            (job_id,) = list(session.held)
            await manager.cancel(job_id)
            await submit(1)
            await one_pass()  # one pass: assigns exactly one job
        else:
            await submit(1)
            await one_pass()  # one pass: the job goes to the next Free scanner
            for session in sessions:
                if session.held:
                    (job_id,) = list(session.held)
                    await manager.cancel(job_id)
            await one_pass()  # (the cancel's pass finds no job; not counted below)
    if mode == "idle":
        # Every second pass followed a cancel and had nothing to assign: keep the others.
        timings = timings[0::2]
    await manager.stop()
    ordered = sorted(timings)
    return DispatchCost(
        pending=pending,
        scanners=scanners,
        mode=mode,
        dispatches=len(timings),
        median_us=statistics.median(timings) / 1000,
        mean_us=statistics.fmean(timings) / 1000,
        p99_us=ordered[int(len(ordered) * 0.99)] / 1000,
    )


def run_case(pending: int, scanners: int, mode: str, steps: int) -> DispatchCost:
    with tempfile.TemporaryDirectory(prefix="ih-scale-") as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--child", str(pending), str(scanners), mode,
             str(steps), tmp],
            check=True, capture_output=True, text=True, env=child_env(), cwd=ROOT,
        )  # fmt: skip
    return DispatchCost(**json.loads(out.stdout.strip().splitlines()[-1]))


def measure(
    big: int = 1_000_000, steps: int = 5000, verbose: bool = True
) -> dict[str, DispatchCost]:
    cases = {
        "pending_1k": (1000, 10, "loaded"),
        "pending_big": (big, 10, "loaded"),
        "scanners_10": (1000, 10, "loaded"),
        "scanners_1000": (1000, 1000, "loaded"),
        "idle_10": (0, 10, "idle"),
        "idle_1000": (0, 1000, "idle"),
    }
    out: dict[str, DispatchCost] = {}
    done: dict[tuple[int, int, str], DispatchCost] = {}
    for name, case in cases.items():
        if case not in done:
            done[case] = run_case(*case, steps)
            cost = done[case]
            if verbose:
                print(
                    f"  dispatch, {cost.pending:>9,} pending, {cost.scanners:4} scanners"
                    f" ({cost.mode}): median {cost.median_us:6.1f} us, mean"
                    f" {cost.mean_us:6.1f} us, p99 {cost.p99_us:6.1f} us",
                    flush=True,
                )
        out[name] = done[case]
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        pending, scanners, mode, steps, workdir = sys.argv[2:7]
        cost = asyncio.run(_case(int(pending), int(scanners), mode, int(steps), Path(workdir)))
        print(json.dumps(cost.__dict__))
        return
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=5000)
    args = parser.parse_args()
    measure(args.big, args.steps)


if __name__ == "__main__":
    main()
