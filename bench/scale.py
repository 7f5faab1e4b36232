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

Each case runs in an interpreter of its own so the 1,000,000-job heap does not slow the
others; all are set up first and then timed in rounds, a block of dispatches of each in turn,
so the machine's drift over minutes touches every case alike.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from bench.common import ROOT, child_env, image_spec


@dataclass
class DispatchCost:
    pending: int
    scanners: int
    mode: str
    dispatches: int
    median_us: float
    mean_us: float
    p99_us: float


async def _case(pending: int, scanners: int, mode: str, workdir: Path) -> None:
    """Set the case up, say ``ready``, then for each line ``N`` on stdin time N dispatches
    and print their timings (ns) as one JSON line; an empty line ends it."""
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
            await manager.submit_many([image_spec(f"s{counter + i}") for i in range(n)])
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
    original: Callable[[], Awaitable[None]] = manager.dispatch.once

    async def timed() -> None:
        started = time.perf_counter_ns()
        await original()
        timings.append(time.perf_counter_ns() - started)

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
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        timings.clear()
        for _ in range(int(line)):
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
        # Idle: every second pass followed a cancel and had nothing to assign.
        print(json.dumps(timings[0::2] if mode == "idle" else timings), flush=True)
    await manager.stop()


class _Child:
    """One case in an interpreter of its own (the 1,000,000-job heap slows no other case),
    set up once and then asked for blocks of dispatches."""

    def __init__(self, case: tuple[int, int, str], workdir: str) -> None:
        self.case = case
        pending, scanners, mode = case
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "--child", str(pending), str(scanners), mode,
             workdir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
        )  # fmt: skip
        self.timings: list[int] = []
        self._expect("ready")

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the scale case {self.case} exited ({self.process.wait()})")
        return line.strip()

    def _expect(self, word: str) -> None:
        while self._line() != word:
            pass  # anything the handler printed before

    def block(self, steps: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        self.timings += json.loads(self._line())

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.write("\n")
                self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cost(self) -> DispatchCost:
        pending, scanners, mode = self.case
        ordered = sorted(self.timings)
        return DispatchCost(
            pending=pending,
            scanners=scanners,
            mode=mode,
            dispatches=len(ordered),
            median_us=statistics.median(ordered) / 1000,
            mean_us=statistics.fmean(ordered) / 1000,
            p99_us=ordered[int(len(ordered) * 0.99)] / 1000,
        )


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
    # Every case set up first, then timed in rounds, a block of each in turn: the machine's
    # speed drifts over minutes, and cases timed one after the other would carry that drift
    # into their ratios.
    rounds = 10
    children: dict[tuple[int, int, str], _Child] = {}
    with tempfile.TemporaryDirectory(prefix="ih-scale-") as tmp:
        try:
            for index, case in enumerate(dict.fromkeys(cases.values())):
                children[case] = _Child(case, str(Path(tmp) / str(index)))
            for _ in range(rounds):
                for child in children.values():
                    child.block(max(1, steps // rounds))
        finally:
            for child in children.values():
                child.close()
    out: dict[str, DispatchCost] = {}
    for case, child in children.items():
        cost = child.cost()
        if verbose:
            print(
                f"  dispatch, {cost.pending:>9,} pending, {cost.scanners:4} scanners"
                f" ({cost.mode}): median {cost.median_us:6.1f} us, mean"
                f" {cost.mean_us:6.1f} us, p99 {cost.p99_us:6.1f} us",
                flush=True,
            )
        for name, named in cases.items():
            if named == case:
                out[name] = cost
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        pending, scanners, mode, workdir = sys.argv[2:6]
        Path(workdir).mkdir()
        asyncio.run(_case(int(pending), int(scanners), mode, Path(workdir)))
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
