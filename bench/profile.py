"""Profile the handler under the end-to-end load with py-spy (a sampling profiler that attaches
to the running handler process, so the handler runs unchanged).

    .venv/bin/python -m bench.profile --mode batched --scanners 8 --jobs 60000
    .venv/bin/python -m bench.profile --mode single --jobs 10000
    .venv/bin/python -m bench.profile --mode batched --metrics   # as the Helm chart runs it
    .venv/bin/python -m bench.profile --mode single --jobs 5000 --storage postgres

Prints the top functions by own time (where the CPU is) and by total time (what is expensive
including what it calls), and keeps the collapsed stacks (``--out``, flamegraph input). By
default only the thread holding the GIL is sampled (``py-spy --gil``): the handler's Python
work runs on one core at a time, so that is where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from bench import peers, postgres_side
from bench.common import (
    ROOT,
    Handler,
    Scanners,
    cpu_seconds,
    free_port,
    postgres_cpu,
    wait_scanners,
)
from bench.e2e import Variant, default_slots, run_once


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def summarize(collapsed: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = [_short(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{samples} samples"]
    lines.append(f"\ntop {top} by own time:")
    for frame, count in own.most_common(top):
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    lines.append(f"\ntop {top} by total time (including callees):")
    for frame, count in total.most_common(top + 10)[:top]:
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)" grouped per function
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else where
    return f"{name} ({short})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("batched", "single"), default="batched")
    parser.add_argument("--scanners", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=60_000)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--storage",
        choices=("journal", "postgres"),
        default="journal",
        help="postgres: a fresh schema in BENCH_DATABASE_URL; also prints the database's "
        "commits per job",
    )
    parser.add_argument(
        "--metrics", action="store_true", help="the handler with --metrics-listen, as deployed"
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--out", type=Path, help="default: bench/results/profile-TARGET-MODE.collapsed"
    )
    parser.add_argument("--native", action="store_true", help="include C frames (slower)")
    parser.add_argument(
        "--target",
        choices=("handler", "scanner"),
        default="handler",
        help="the process to profile (scanner: the first of the scanners)",
    )
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread, also those waiting for the GIL (default: only the thread "
        "holding the GIL, i.e. where the interpreter's one core goes)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ih-profile-") as tmp:
        workdir = Path(tmp)
        handler = Handler(workdir, log_level=args.log_level, port=free_port(), name="profile")
        handler.extra = Variant(args.mode, metrics=args.metrics).handler_args()
        schema = ""
        if args.storage == "postgres":
            schema = f"bench_{secrets.token_hex(4)}"
            handler.storage = "postgres"
            handler.extra = (*handler.extra, "--database-url", peers.database_url(),
                             "--database-schema", schema)  # fmt: skip
        fleet = Scanners(handler.address, args.scanners, default_slots(args.scanners), workdir)
        fleet.start()
        try:
            handler.start()
            asyncio.run(wait_scanners(handler.address, args.scanners))
            raw = workdir / "profile.txt"
            pid = handler.pid if args.target == "handler" else fleet.pids()[0]
            command = [py_spy(), "record", "--pid", str(pid), "--format", "raw",
                       "--rate", str(args.rate), "--output", str(raw)]  # fmt: skip
            # Sampling without pausing the process, unless C frames are wanted (py-spy pauses
            # the process for each native sample).
            command.append("--native" if args.native else "--nonblocking")
            if not args.all_threads:
                command.append("--gil")
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # let py-spy attach
            commits = _commits() if schema else 0
            cpu, database_cpu = cpu_seconds(handler.pid), postgres_cpu()
            seconds, _, errors = asyncio.run(run_once(handler.address, args.jobs, args.mode, "p-"))
            cpu, database_cpu = cpu_seconds(handler.pid) - cpu, postgres_cpu() - database_cpu
            commits = _commits() - commits if schema else 0
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            _, err = spy.communicate(timeout=60)
            print(
                f"{args.mode}: {args.jobs / seconds:,.0f} jobs/s under the profiler "
                f"({errors} errors); handler {1e6 * cpu / args.jobs:,.0f} us CPU per job"
            )
            if schema:
                # Every connection's commits, the bench's GetQueueStats polls included.
                print(
                    f"database: {commits / args.jobs:.2f} commits per job, postgres processes "
                    f"{1e6 * database_cpu / args.jobs:,.0f} us CPU per job"
                )
            if not raw.exists():
                raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')}")
            if args.out is None:
                name = f"profile-{args.target}-{args.mode}.collapsed"
                args.out = ROOT / "bench" / "results" / name
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, args.out)
            print(summarize(raw, args.top))
            print(f"\ncollapsed stacks: {args.out}")
        finally:
            fleet.stop()
            handler.stop()
            if schema:
                postgres_side.drop(schema)


def _commits() -> int:
    """Transactions committed in the bench's database so far (all connections)."""
    with psycopg.connect(peers.database_url(), autocommit=True) as conn:
        # The statistics a backend reports are cached for its transaction: a fresh read.
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


if __name__ == "__main__":
    main()
