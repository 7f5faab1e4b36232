"""The handler on PostgreSQL with 1, 2 and 3 replicas, against the embedded store and against
graphile-worker on the same database, with the same jobs and workers (scanners).

Each PostgreSQL run gets a fresh schema; the scanners are spread over the replicas; the
submits go to the first replica and its ``GetQueueStats`` (the same figures from every replica)
sees the end. The embedded figure is :mod:`bench.e2e`'s run with the same counts. One
replica and graphile-worker, the target's pair, run side by side in three rounds per mode, and
their ratio is the median of the rounds' ratios: this machine's speed drifts by a third over
minutes, which one run of each would carry into the ratio.

    .venv/bin/python -m bench.postgres_side --jobs 5000 --workers 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import e2e, peers, pickup
from bench.common import DiskSync, Handler, Scanners, disk_sync, free_port, wait_scanners

MODES = ("batched", "single")


@dataclass
class SideResult:
    store: str  # postgres-1, postgres-2, postgres-3, embedded, graphile-worker
    mode: str
    jobs: int
    workers: int
    jobs_per_second: float
    errors: int = 0
    round: int = 0  # which round of measure() (one replica and graphile-worker run in each)


def run_postgres(workdir: Path, replicas: int, mode: str, jobs: int, workers: int) -> SideResult:
    schema = f"bench_{secrets.token_hex(4)}"
    url = peers.database_url()
    handlers = [
        Handler(workdir, name=f"pg{replicas}-{n}", port=free_port(), storage="postgres",
                extra=("--database-url", url, "--database-schema", schema))
        for n in range(replicas)
    ]  # fmt: skip
    fleets: list[Scanners] = []
    try:
        for handler in handlers:
            handler.start()
        slots = e2e.default_slots(workers)
        for n, handler in enumerate(handlers):
            count = workers // replicas + (1 if n < workers % replicas else 0)
            fleet = Scanners(handler.address, count, slots, workdir)
            fleet.start()
            fleets.append(fleet)
            asyncio.run(wait_scanners(handler.address, count))
        seconds, _, errors = asyncio.run(e2e.run_once(handlers[0].address, jobs, mode, "pg-"))
    finally:
        for fleet in fleets:
            fleet.stop()
        for handler in handlers:
            handler.stop()
        drop(schema)
    return SideResult(f"postgres-{replicas}", mode, jobs, workers, jobs / seconds, errors)


def drop(schema: str) -> None:
    with psycopg.connect(peers.database_url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def measure_pickup(workdir: Path, max_rate: float) -> tuple[pickup.PickupResult, DiskSync]:
    """Pickup latency on one PostgreSQL replica at half its measured single-submit rate. A
    pickup waits for the commit that queues the job (and claims it): the disk's fdatasync
    tail, measured just before, is printed beside it."""
    disk = disk_sync(workdir)
    print(f"  the disk's fdatasync ({disk.syncs} at 100/s): p50 {disk.p50_ms:.2f} ms, "
          f"p99 {disk.p99_ms:.2f} ms, max {disk.max_ms:.1f} ms", flush=True)  # fmt: skip
    schema = f"bench_{secrets.token_hex(4)}"
    try:
        (result,) = pickup.measure(
            workdir, max_rate, loads=(0.5,), seconds=4.0, min_jobs=500, storage="postgres",
            extra=("--database-url", peers.database_url(), "--database-schema", schema),
        )  # fmt: skip
    finally:
        drop(schema)
    return result, disk


def measure(workdir: Path, jobs: int, workers: int, replicas: tuple[int, ...] = (1, 2, 3),
            modes: tuple[str, ...] = MODES, verbose: bool = True,
            rounds: int = 3) -> list[SideResult]:  # fmt: skip
    """Per mode, in rounds: one replica on PostgreSQL, then graphile-worker, side by side (the
    target's pair, so its ratio is a median of ratios of runs seconds apart); the first round
    also runs 2 and 3 replicas and the embedded store."""
    out: list[SideResult] = []

    def note(result: SideResult) -> None:
        out.append(result)
        if verbose:
            print(f"  {result.store:15} {result.mode:7}: {result.jobs_per_second:8,.0f} jobs/s",
                  flush=True)  # fmt: skip

    graphile = peers.missing("graphile-worker")
    if graphile:
        print(f"  graphile-worker skipped: {graphile}")
    for mode in modes:
        for turn in range(rounds):
            for count in replicas if turn == 0 else replicas[:1]:
                result = run_postgres(workdir, count, mode, jobs, workers)
                result.round = turn
                note(result)
            if not graphile:
                peer = peers.run_once("graphile-worker", mode, jobs, workers)
                note(SideResult("graphile-worker", mode, jobs, workers, peer.jobs_per_second,
                                round=turn))  # fmt: skip
            if turn == 0:
                (embedded,) = e2e.measure(workdir, workers, [e2e.Variant(mode)], jobs, 1,
                                          verbose=False)  # fmt: skip
                note(SideResult("embedded", mode, jobs, workers, embedded.jobs_per_second))
    return out


def ratio(results: list[dict[str, Any]], mode: str) -> float:
    """One replica on PostgreSQL over graphile-worker: the median of the rounds' ratios."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if r["mode"] == mode and r["store"] in ("postgres-1", "graphile-worker"):
            pair = by_round.setdefault(int(r.get("round", 0)), {})
            pair[str(r["store"])] = float(r["jobs_per_second"])
    ratios = [
        pair["postgres-1"] / pair["graphile-worker"]
        for pair in by_round.values()
        if pair.get("postgres-1") and pair.get("graphile-worker")
    ]
    return statistics.median(ratios) if ratios else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--pickup", action="store_true", help="also pickup p99 at 50 %% load")
    args = parser.parse_args()
    modes = MODES if args.mode == "both" else (args.mode,)
    counts = tuple(int(n) for n in args.replicas.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp), args.jobs, args.workers, counts, modes)
        rows = [asdict(r) for r in results]
        out: dict[str, object] = {"throughput": rows}
        for mode in modes:
            print(f"  postgres x1 / graphile-worker, {mode}: {ratio(rows, mode):.2f} x "
                  "(median of the rounds)")  # fmt: skip
        single = [
            r.jobs_per_second for r in results if r.store == "postgres-1" and r.mode == "single"
        ]
        single = [statistics.median(single)] if single else []
        if args.pickup and single:
            picked, disk = measure_pickup(Path(tmp), single[0])
            out["pickup"] = asdict(picked)
            out["disk_sync"] = asdict(disk)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
