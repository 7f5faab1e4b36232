"""``make bench``: every figure of the benchmark issue in one table, each with its target and
PASS / FAIL, also written as JSON (``bench/results/latest.json``) so runs can be compared.

    .venv/bin/python -m bench.run            # the full run (about 20 minutes, more when shared)
    .venv/bin/python -m bench.run --quick    # smaller counts, about 4 minutes
    .venv/bin/python -m bench.run --only e2e,pickup

Everything runs on this machine, the handler and its load in separate processes. What each
part measures and how is in its module: :mod:`bench.e2e`, :mod:`bench.pickup`,
:mod:`bench.peers` (BullMQ, graphile-worker), :mod:`bench.memory`, :mod:`bench.recovery`,
:mod:`bench.scale`, :mod:`bench.celery_side`, :mod:`bench.grpc_ceiling`, :mod:`bench.vulndb`,
:mod:`bench.fleet`, :mod:`bench.postgres_side`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    celery_side,
    e2e,
    fleet,
    grpc_ceiling,
    memory,
    peers,
    pickup,
    recovery,
    scale,
    scan_speed,
    vulndb,
)
from bench.common import ROOT, median

PARTS = (
    "e2e", "peers", "pickup", "memory", "recovery", "scale", "celery", "echo", "vulndb", "scan",
    "fleet", "postgres",
)  # fmt: skip
LATEST = ROOT / "bench" / "results" / "latest.json"


@dataclass
class Row:
    figure: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None  # None: shown for reference, no target

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "FAIL")


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit == "x":
        return f"{value:.2f} x"
    if unit in ("ms", "us", "s"):
        return f"{value:,.2f} {unit}"
    return f"{value:,.0f} {unit}"


@dataclass
class Settings:
    quick: bool
    jobs: int
    repeats: int
    scanner_counts: tuple[int, ...]
    pickup_seconds: float
    pickup_min_jobs: int
    memory_sizes: tuple[int, ...]
    scale_big: int
    scale_steps: int
    celery_plan: list[tuple[str, str]]
    echo_scale: float
    recovery_jobs: int


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(
            quick=True,
            jobs=5000,
            repeats=1,
            scanner_counts=(1, 8, 64),
            pickup_seconds=2.0,
            pickup_min_jobs=500,
            memory_sizes=(100_000,),
            scale_big=100_000,
            scale_steps=2000,
            celery_plan=[("prefork", "apply_async"), ("prefork", "chunks")],
            echo_scale=0.5,
            recovery_jobs=100_000,
        )
    return Settings(
        quick=False,
        jobs=20_000,
        repeats=3,  # medians of 3: on a shared VM an occasional run lands slow
        scanner_counts=(1, 8, 64),
        pickup_seconds=4.0,
        pickup_min_jobs=1000,
        memory_sizes=(100_000, 1_000_000),
        scale_big=1_000_000,
        scale_steps=5000,
        celery_plan=[("prefork", "apply_async"), ("prefork", "chunks"), ("threads", "chunks")],
        echo_scale=1.0,
        recovery_jobs=1_000_000,
    )


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this process and its waited-for
    children) so far: their growth during the run is what other processes took."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    machine = (user + nice + system + irq + softirq + steal) / ticks
    own = os.times()
    return machine, own.user + own.system + own.children_user + own.children_system


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def speed_index() -> float:
    """Fixed pure-Python work per second on one core, now (best of five). This shared
    machine's speed changes with what else its host runs, also within one run: each section
    records it, so a ratio between two sections can be read with that in mind."""

    def work() -> int:
        table = {}
        for n in range(20_000):
            table[n] = n * 2
        return sum(table.values())

    return 1.0 / min(timeit.repeat(work, number=5, repeat=5))


def run(parts: tuple[str, ...], s: Settings, workdir: Path, out: dict[str, Any]) -> None:
    # Each part's machine speed, relative to the first part's.
    speeds: dict[str, float] = out["meta"].setdefault("speed", {})
    first_speed = 0.0

    def section(part: str, title: str) -> None:
        nonlocal first_speed
        speed = speed_index()
        first_speed = first_speed or speed
        speeds[part] = round(speed / first_speed, 3)
        print(f"\n== {title} == (machine speed {speeds[part]:.2f} of the first part's)", flush=True)

    if "e2e" in parts:
        section("e2e", f"end-to-end throughput, {s.jobs:,} jobs, {s.repeats} run(s) each")
        results: list[e2e.E2EResult] = []
        uvloop = e2e.supports_uvloop()
        for count in s.scanner_counts:
            plan = [e2e.Variant("batched"), e2e.Variant("single")]
            if count == 8:
                # Beside the peers: --fsync never is the fair peer of Redis without persistence.
                plan.append(e2e.Variant("batched", fsync="never"))
                plan.append(e2e.Variant("single", fsync="never"))
                plan.append(e2e.Variant("stream"))  # SubmitJobStream: one job per message
                plan.append(e2e.Variant("batched", "info"))  # what per-transition logging costs
                plan.append(e2e.Variant("batched", metrics=True))  # and metrics, as deployed
                if uvloop:  # the handler's --event-loop uvloop
                    plan += [
                        e2e.Variant("batched", event_loop="uvloop"),
                        e2e.Variant("single", event_loop="uvloop"),
                    ]
            results += e2e.measure(workdir, count, plan, s.jobs, s.repeats)
        out["e2e"] = [asdict(r) for r in results]
    # The peers right after our end-to-end runs, in the same shapes: the ratios compare them.
    if "peers" in parts:
        section("peers", f"BullMQ and graphile-worker, {s.jobs:,} no-op jobs, 8 workers")
        out["peers"] = run_peers(workdir, s)
    # Celery right after our end-to-end runs: the ratios compare the two, and the machine's
    # speed drifts over a run.
    if "celery" in parts:
        section("celery", f"Celery 5 + Redis, {s.jobs:,} no-op jobs, 8 workers")
        missing = celery_side.missing()
        if missing:
            print(f"  skipped: {missing}", flush=True)
        else:
            out["celery"] = [
                asdict(r) for r in celery_side.measure(workdir, s.jobs, 8, s.celery_plan, s.repeats)
            ]
    if "pickup" in parts:
        section("pickup", "pickup latency (100 % = the single-mode maximum, 8 scanners)")
        out["pickup"] = [
            asdict(r)
            for r in pickup.measure(
                workdir, 0.0, seconds=s.pickup_seconds, min_jobs=s.pickup_min_jobs
            )
        ]
        first = out["pickup"][0]
        out["pickup_max_rate"] = first["target_rate"] / first["load"]
    if "memory" in parts:
        section("memory", "memory per PENDING job")
        out["memory"] = [asdict(r) for r in memory.measure(workdir, s.memory_sizes)]
    if "recovery" in parts:
        section("recovery", f"restart with {s.recovery_jobs:,} queued jobs")
        out["recovery"] = asdict(recovery.measure(workdir, s.recovery_jobs))
    if "scale" in parts:
        section("scale", "dispatch cost")
        out["scale"] = {
            name: asdict(cost) for name, cost in scale.measure(s.scale_big, s.scale_steps).items()
        }
    if "echo" in parts:
        section("echo", "raw grpc.aio echo")
        out["echo"] = {k: asdict(v) for k, v in grpc_ceiling.measure(s.echo_scale).items()}
    if "vulndb" in parts:
        section("vulndb", "vulnerability database: build, load, matching")
        out["vulndb"] = asdict(vulndb.measure(workdir, 1 if s.quick else 3))
    if "scan" in parts:
        section("scan", "image scan time, builtin engine (every policy) and Syft side by side")
        missing = scan_speed.missing()
        if missing:
            print(f"  skipped: {missing}", flush=True)
        else:
            runs = 3 if s.quick else 5
            out["scan"] = [asdict(r) for r in scan_speed.measure(workdir / "scan", runs)]
    if "fleet" in parts:
        section("fleet", "a fleet on shared bases: layer cache cold and warm, rematch of SBOMs")
        missing = fleet.missing()
        if missing:
            print(f"  skipped: {missing}", flush=True)
        else:
            sizes = ["--images", "30", "--base-mb", "10"] if s.quick else []
            fleet_args = fleet.parser().parse_args(sizes)
            (workdir / "fleet").mkdir()
            out["fleet"] = asdict(fleet.measure(workdir / "fleet", fleet_args))
    if "postgres" in parts:  # bench/postgres_side.py: replicas on PostgreSQL, side by side
        from bench import postgres_side

        section("postgres", f"PostgreSQL store, 1-3 replicas, {s.jobs:,} jobs, 8 scanners")
        out["postgres"] = [asdict(r) for r in postgres_side.measure(workdir, s.jobs, 8)]
        one = [r["jobs_per_second"] for r in out["postgres"]
               if r["store"] == "postgres-1" and r["mode"] == "single"]  # fmt: skip
        if one:
            rate = median(one)
            picked, disk = postgres_side.measure_pickup(workdir, rate)
            out["postgres_pickup"] = asdict(picked)
            out["disk_sync"] = asdict(disk)


def run_peers(workdir: Path, s: Settings) -> list[dict[str, Any]]:
    """Each installed peer in both modes, with the jobs, workers and repeats of our e2e runs."""
    installed: list[str] = []
    for peer in peers.PEERS:
        if reason := peers.missing(peer):
            print(f"  {peer} skipped: {reason}", flush=True)
        else:
            installed.append(peer)
    found: list[dict[str, Any]] = []

    def ours(mode: str) -> None:
        """Our run of the round's shape (8 scanners, fsync batch) right before the peers'."""
        (result,) = e2e.measure(workdir, 8, [e2e.Variant(mode)], s.jobs, 1, verbose=False)
        print(f"  {'ours':15} {mode:7}: {result.jobs_per_second:8,.0f} jobs/s"
              f" ({result.jobs:,} jobs in {result.seconds:.2f} s)", flush=True)  # fmt: skip
        found.append({"peer": "ours", "mode": mode, "jobs_per_second": result.jobs_per_second})

    def report(result: peers.PeerResult) -> None:
        print(f"  {result.peer:15} {result.mode:7}: {result.jobs_per_second:8,.0f} jobs/s"
              f" ({result.jobs:,} jobs in {result.seconds:.2f} s)", flush=True)  # fmt: skip
        found.append(asdict(result))

    peers.measure(workdir, tuple(installed), ("batched", "single"), s.jobs, 8,
                  max(s.repeats, 3), before=ours, report=report)  # fmt: skip
    return found


def single_floor_rows(out: dict[str, Any], handler_cpu: float) -> list[Row]:
    """What gRPC alone costs on the single path, from the echo's CPU per message in this run.

    Per single job the handler's one loop takes a unary call and sends and reads one message
    on a scanner stream; a scanner reads one and writes one; the submitter makes the call.
    At the echo's cost for each (nothing else done) this is the most a design with one call
    and one message each way per job can reach here: on one loop, and on the machine's cores.
    """
    echo = out["echo"]
    unary, stream = echo["unary_1"], echo["stream_1"]
    server_unary = unary.get("server_cpu_us_per_message", float("nan"))
    caller_unary = unary.get("client_cpu_us_per_message", float("nan"))
    message = stream.get("server_cpu_us_per_message", float("nan"))  # one read, one write
    echo_rate = unary["items_per_second"]
    loop_floor = server_unary + message
    cpus = out.get("meta", {}).get("cpus") or os.cpu_count() or 1
    machine = cpus * 1e6 / (caller_unary + loop_floor + message)
    rows = [
        Row("  echo server CPU per unary call", server_unary, "us"),
        Row("  echo caller CPU per unary call", caller_unary, "us"),
        Row("  echo server CPU per stream message read and written back", message, "us"),
        Row(
            "single path, gRPC alone: handler loop per job (unary + a message each way)",
            loop_floor,
            "us",
        ),
        Row("  most single jobs/s one loop allows at that floor", 1e6 / loop_floor, "jobs/s"),
        Row("  the same / unary echo", 1e6 / loop_floor / echo_rate, "x"),
        Row(
            f"  most single jobs/s {cpus} cores allow at the floors (submitter, handler, scanner)",
            machine,
            "jobs/s",
        ),
        Row("  the same / unary echo", machine / echo_rate, "x"),
    ]
    if handler_cpu == handler_cpu:
        rows.append(Row("  handler CPU per single job above the loop's floor",
                        handler_cpu - loop_floor, "us"))  # fmt: skip
    return rows


def peer_rows(out: dict[str, Any], ours: Callable[[str, str], float]) -> list[Row]:
    """The peers' rates and ours over theirs; ``ours(mode, fsync)`` is our median, 8 scanners."""
    table: list[Row] = []

    def rate(peer: str, mode: str) -> float:
        runs = [r["jobs_per_second"] for r in out.get("peers", [])
                if r["peer"] == peer and r["mode"] == mode]  # fmt: skip
        return median(runs) if runs else float("nan")

    # Round by round (bench.peers.measure): our run, then each peer's, in one mode.
    rounds: list[dict[str, Any]] = []
    for r in out.get("peers", []):
        if r["peer"] == "ours":
            rounds.append({"mode": r["mode"], "ours": r["jobs_per_second"]})
        elif rounds and rounds[-1]["mode"] == r["mode"]:
            rounds[-1][r["peer"]] = r["jobs_per_second"]

    def over(peer: str, mode: str) -> float:
        """Ours over the peer: the median of the rounds' ratios, each from runs side by side
        (the parts of a bench are minutes apart, and the machine's speed drifts between
        them); from the parts' medians in a results file without rounds."""
        ratios = [r["ours"] / r[peer] for r in rounds if r["mode"] == mode and r.get(peer)]
        if ratios:
            return median(ratios)
        return ours(mode, "batch") / rate(peer, mode) if "e2e" in out else float("nan")

    bull_bulk, bull_add = rate("bullmq", "batched"), rate("bullmq", "single")
    pg_bulk, pg_add = rate("graphile-worker", "batched"), rate("graphile-worker", "single")
    table.append(Row("BullMQ addBulk (100/call), 8 workers", bull_bulk, "jobs/s"))
    table.append(Row("BullMQ add (single, 32 in flight), 8 workers", bull_add, "jobs/s"))
    table.append(Row("graphile-worker addJobs (100/call), 8 workers", pg_bulk, "jobs/s"))
    table.append(Row("graphile-worker addJob (single), 8 workers", pg_add, "jobs/s"))
    for mode, label in (("batched", "SubmitJobs (100/batch)"), ("single", "SubmitJob")):
        runs = [r["ours"] for r in rounds if r["mode"] == mode]
        if runs:
            table.append(Row(f"  ours {label}, 8 scanners, in those rounds", median(runs),
                             "jobs/s"))  # fmt: skip
    if "e2e" not in out and not rounds:
        return table
    ratio = over("bullmq", "batched")
    table.append(Row("ours batched, fsync batch / BullMQ addBulk", ratio, "x",
                     ">= 1.00", ratio >= 1.0 if ratio == ratio else False))  # fmt: skip
    if "e2e" not in out:
        ratio = over("graphile-worker", "single")
        table.append(Row("ours single, fsync batch / graphile-worker addJob", ratio, "x",
                         ">= 2.00", ratio >= 2.0 if ratio == ratio else False))  # fmt: skip
        return table
    table.append(Row("  ours batched, fsync never / BullMQ addBulk",
                     ours("batched", "never") / bull_bulk, "x"))  # fmt: skip
    table.append(Row("ours single, fsync batch / BullMQ add", over("bullmq", "single"), "x"))
    table.append(Row("  ours SubmitJobStream, fsync batch / BullMQ add",
                     ours("stream", "batch") / bull_add, "x"))  # fmt: skip
    table.append(Row("  ours single, fsync never / BullMQ add",
                     ours("single", "never") / bull_add, "x"))  # fmt: skip
    ratio = over("graphile-worker", "single")
    table.append(Row("ours single, fsync batch / graphile-worker addJob", ratio, "x",
                     ">= 2.00", ratio >= 2.0 if ratio == ratio else False))  # fmt: skip
    table.append(Row("ours batched, fsync batch / graphile-worker addJobs",
                     over("graphile-worker", "batched"), "x"))  # fmt: skip
    return table


def recovery_rows(out: dict[str, Any]) -> list[Row]:
    r = out.get("recovery")
    if not r:
        return []
    jobs = f"{r['jobs']:,}"
    peak = r["peak_recovery_rss_mib"] / r["running_rss_mib"]
    limit = 10.0 * r["jobs"] / 1_000_000  # the target is 10 s for a million
    return [
        Row(f"recovery: RSS while running, {jobs} queued", r["running_rss_mib"], "MiB"),
        Row("  SIGTERM to exit", r["sigterm_seconds"], "s"),
        Row(
            f"  start to SERVING after SIGTERM, {jobs} jobs",
            r["start_after_term_seconds"],
            "s",
            f"<= {limit:g}",
            r["start_after_term_seconds"] <= limit,
        ),
        Row(
            f"  start to SERVING after kill -9, {jobs} jobs",
            r["start_after_kill_seconds"],
            "s",
            f"<= {limit:g}",
            r["start_after_kill_seconds"] <= limit,
        ),
        Row("  peak RSS during recovery / running RSS", peak, "x", "<= 1.50", peak <= 1.5),
        Row("  RSS once serving / running RSS", r["serving_rss_mib"] / r["running_rss_mib"], "x"),
    ]


def rows(out: dict[str, Any]) -> list[Row]:
    table: list[Row] = []

    def e2e_runs(
        mode: str,
        scanners: int,
        level: str,
        loop: str,
        metrics: bool = False,
        fsync: str = "batch",
    ) -> list[dict[str, Any]]:
        return [
            r
            for r in out.get("e2e", [])
            if r["mode"] == mode
            and r["scanners"] == scanners
            and r["log_level"] == level
            and r.get("event_loop", "asyncio") == loop
            and r.get("metrics", False) == metrics
            and r.get("fsync", "batch") == fsync
        ]

    def e2e_rate(
        mode: str,
        scanners: int,
        level: str = "warning",
        loop: str = "asyncio",
        metrics: bool = False,
        fsync: str = "batch",
    ) -> float:
        runs = [r["jobs_per_second"] for r in e2e_runs(mode, scanners, level, loop, metrics, fsync)]
        return median(runs) if runs else float("nan")

    def e2e_cpu(mode: str, scanners: int, who: str = "handler") -> float:
        runs = [
            r.get(f"{who}_cpu_us_per_job", float("nan"))
            for r in e2e_runs(mode, scanners, "warning", "asyncio")
        ]
        return median(runs) if runs else float("nan")

    def celery_rate(mode: str, pool: str) -> float:
        runs = [
            r["jobs_per_second"]
            for r in out.get("celery", [])
            if r["mode"] == mode and r["pool"] == pool
        ]
        return median(runs) if runs else float("nan")

    nan = float("nan")
    if "e2e" in out:
        batched8 = e2e_rate("batched", 8)
        single8 = e2e_rate("single", 8)
        # Targets are ratios to the peers in the same run (peer_rows), not absolute rates.
        table.append(Row("e2e SubmitJobs (100/batch), 8 scanners", batched8, "jobs/s"))
        table.append(Row("e2e SubmitJob (single), 8 scanners", single8, "jobs/s"))
        table.append(Row("e2e SubmitJobs, 8 scanners, fsync never",
                         e2e_rate("batched", 8, fsync="never"), "jobs/s"))  # fmt: skip
        table.append(Row("e2e SubmitJob, 8 scanners, fsync never",
                         e2e_rate("single", 8, fsync="never"), "jobs/s"))  # fmt: skip
        table.append(Row("e2e SubmitJobStream (one stream, 512 in flight), 8 scanners",
                         e2e_rate("stream", 8), "jobs/s"))  # fmt: skip
        for count in sorted({r["scanners"] for r in out["e2e"]}):
            if count == 8:
                continue
            table.append(Row(f"e2e SubmitJobs, {count} scanner(s)", e2e_rate("batched", count),
                             "jobs/s"))  # fmt: skip
            table.append(Row(f"e2e SubmitJob, {count} scanner(s)", e2e_rate("single", count),
                             "jobs/s"))  # fmt: skip
        info = e2e_rate("batched", 8, "info")
        table.append(Row("e2e SubmitJobs, 8 scanners, log level info", info, "jobs/s"))
        table.append(Row("  cost of info logging (warning / info)", batched8 / info, "x"))
        with_metrics = e2e_rate("batched", 8, metrics=True)
        table.append(Row("e2e SubmitJobs, 8 scanners, metrics on", with_metrics, "jobs/s"))
        table.append(Row("  cost of metrics (off / on)", batched8 / with_metrics, "x"))
        cpus = out.get("meta", {}).get("cpus") or os.cpu_count() or 1
        for mode in ("batched", "single", "stream"):
            handler, scanners, submitter = (
                e2e_cpu(mode, 8, who) for who in ("handler", "scanners", "submitter")
            )
            table.append(Row(f"  handler CPU per job, {mode}, 8 scanners", handler, "us"))
            table.append(Row(f"  scanners' CPU per job, {mode}", scanners, "us"))
            table.append(Row(f"  submitter's CPU per job, {mode}", submitter, "us"))
            # All three share the machine: this many jobs/s would use every core.
            table.append(Row(f"  {cpus} cores / CPU per job of all three, {mode}",
                             cpus * 1e6 / (handler + scanners + submitter), "jobs/s"))  # fmt: skip
        table.append(Row("e2e SubmitJobs, 8 scanners, --event-loop uvloop",
                         e2e_rate("batched", 8, loop="uvloop"), "jobs/s"))  # fmt: skip
        table.append(Row("e2e SubmitJob, 8 scanners, --event-loop uvloop",
                         e2e_rate("single", 8, loop="uvloop"), "jobs/s"))  # fmt: skip
    if "peers" in out:
        table += peer_rows(out, lambda mode, fsync: e2e_rate(mode, 8, fsync=fsync))
    if "celery" in out:
        # The Python reference, without a target: chunks track nothing per job.
        chunks = celery_rate("chunks", "prefork")
        apply = celery_rate("apply_async", "prefork")
        table.append(Row("Celery chunks of 100, prefork -c 8", chunks, "jobs/s"))
        if any(r["pool"] == "threads" for r in out["celery"]):
            table.append(Row("Celery chunks of 100, threads -c 8",
                             celery_rate("chunks", "threads"), "jobs/s"))  # fmt: skip
        table.append(Row("Celery apply_async, prefork -c 8", apply, "jobs/s"))
        if "e2e" in out:
            table.append(Row("ours batched / Celery chunks (prefork)",
                             e2e_rate("batched", 8) / chunks, "x"))  # fmt: skip
            table.append(Row("ours single / Celery apply_async",
                             e2e_rate("single", 8) / apply, "x"))  # fmt: skip
    if "echo" in out:
        echo = out["echo"]
        table.append(Row("grpc.aio echo, 1 item/message, one stream",
                         echo["stream_1"]["items_per_second"], "items/s"))  # fmt: skip
        table.append(Row("grpc.aio echo, 100 items/message, one stream",
                         echo["stream_100"]["items_per_second"], "items/s"))  # fmt: skip
        table.append(Row("grpc.aio echo, unary, 32 in flight",
                         echo["unary_1"]["items_per_second"], "calls/s"))  # fmt: skip
        if "e2e" in out:
            table.append(Row("ours batched / echo 100 items/message",
                             e2e_rate("batched", 8) / echo["stream_100"]["items_per_second"],
                             "x"))  # fmt: skip
            ratio = e2e_rate("single", 8) / echo["unary_1"]["items_per_second"]
            table.append(Row("ours single, fsync batch / unary echo (32 in flight)", ratio, "x",
                             ">= 0.50", ratio >= 0.5 if ratio == ratio else False))  # fmt: skip
        table += single_floor_rows(out, e2e_cpu("single", 8) if "e2e" in out else nan)
    for r in out.get("scan", []):
        speed = scan_speed.ScanSpeed(**r)
        table.append(Row(f"scan {r['image']} ({r['packages']} packages), builtin, median",
                         r["builtin_seconds"], "s"))  # fmt: skip
        table.append(Row("  syft registry: on the same image, median", r["syft_seconds"], "s"))
        table.append(Row(f"  builtin speed / Syft's, {r['image']}", speed.ratio, "x",
                         ">= 1.00", speed.ratio >= 1.0))  # fmt: skip
        table.append(Row(f"  builtin slowest / fastest of {r['runs']} runs", r["builtin_spread"],
                         "x"))  # fmt: skip
    if "fleet" in out:
        f = fleet.FleetResult(**out["fleet"])
        title = f"{f.images} images on {f.bases} bases"
        table.append(Row(f"fleet {title}, no layer cache (per image x fleet)",
                         f.no_cache_fleet_seconds, "s"))  # fmt: skip
        table.append(Row("  layer cache cold", f.cold_seconds, "s"))
        table.append(Row("  layer cache warm", f.warm_seconds, "s"))
        table.append(Row("  no cache / warm", f.warm_speedup, "x", ">= 5.00",
                         f.warm_speedup >= 5.0))  # fmt: skip
        table.append(Row("  MB pulled: no cache", f.no_cache_mb_pulled, "MB"))
        table.append(Row("  MB pulled: cold", f.cold_mb_pulled, "MB"))
        table.append(Row("  MB pulled: warm", f.warm_mb_pulled, "MB"))
        table.append(Row("  layer cache disk per image", f.cache_mb * 1000 / f.images, "kB"))
        table.append(Row(f"rematch of stored SBOMs ({f.packages} packages), one scanner",
                         f.rematch_per_second, "images/s", ">= 200",
                         f.rematch_per_second >= 200))  # fmt: skip
        table.append(Row("  full rescan, no cache, one scanner", f.rescan_per_second,
                         "images/s"))  # fmt: skip
    for p in out.get("pickup", []):
        load = f"{p['load']:.0%}"
        limit = {0.5: 5.0, 0.9: 20.0}.get(p["load"])
        refused = p.get("refused", 0)
        if limit is not None:
            met = p["p99_ms"] <= limit and not refused
            table.append(Row(f"pickup p99 at {load} load (submit->assignment)", p["p99_ms"],
                             "ms", f"<= {limit:g}", met))  # fmt: skip
        else:
            table.append(Row(f"pickup p99 at {load} load (submit->assignment)", p["p99_ms"],
                             "ms"))  # fmt: skip
        table.append(Row(f"  p50 at {load} ({p['achieved_rate']:,.0f} submits/s)", p["p50_ms"],
                         "ms"))  # fmt: skip
        table.append(Row(f"  max at {load}", p["max_ms"], "ms"))
        table.append(Row("  ack->assignment p99", p["ack_p99_ms"], "ms"))
        if refused:
            table.append(Row(f"  submits refused at {load} ({p['refused_code']}: too many calls"
                             " in flight)", refused, "calls"))  # fmt: skip
    for m in out.get("memory", []):
        table.append(Row(f"RSS per PENDING job at {m['pending']:,}", m["bytes_per_job"], "B",
                         "<= 1,500", m["bytes_per_job"] <= 1500))  # fmt: skip
    table += recovery_rows(out)
    if "scale" in out:
        sc = out["scale"]
        pending = sc["pending_big"]["median_us"] / sc["pending_1k"]["median_us"]
        loaded = sc["scanners_1000"]["median_us"] / sc["scanners_10"]["median_us"]
        idle = sc["idle_1000"]["median_us"] / sc["idle_10"]["median_us"]
        table.append(Row("dispatch cost, 1k pending", sc["pending_1k"]["median_us"], "us"))
        big = sc["pending_big"]["pending"]
        table.append(Row(f"dispatch cost ratio {big:,} / 1,000 pending", pending, "x",
                         "<= 1.20", pending <= 1.2))  # fmt: skip
        table.append(Row("dispatch cost ratio 1,000 / 10 scanners (busy)", loaded, "x",
                         "<= 1.50", loaded <= 1.5))  # fmt: skip
        table.append(Row("dispatch cost ratio 1,000 / 10 scanners (idle)", idle, "x",
                         "<= 1.50", idle <= 1.5))  # fmt: skip
    if "vulndb" in out:
        v = out["vulndb"]
        table.append(Row(f"vulndb build from the bundled feeds ({v['advisories']:,} advisories)",
                         v["build_seconds"] * 1000, "ms"))  # fmt: skip
        table.append(Row("  database file size", v["size_bytes"] / 1024, "KiB"))
        table.append(Row("  load at scanner start (all databases)", v["load_ms"], "ms"))
        table.append(Row(f"vulndb match {v['packages']:,} packages, first scan (cold)",
                         v["match_cold_ms"], "ms", "< 100", v["match_cold_ms"] < 100))  # fmt: skip
        table.append(Row(f"  match {v['packages']:,} packages, later scans (warm)",
                         v["match_warm_ms"], "ms"))  # fmt: skip
    if out.get("postgres"):
        from bench.postgres_side import ratio

        sides = out["postgres"]
        for mode in dict.fromkeys(r["mode"] for r in sides):
            for store in dict.fromkeys(r["store"] for r in sides if r["mode"] == mode):
                runs = [r["jobs_per_second"] for r in sides
                        if r["store"] == store and r["mode"] == mode]  # fmt: skip
                table.append(Row(f"{store} {mode}", median(runs), "jobs/s"))
            # The target's pair ran side by side in rounds: the median of their ratios.
            x = ratio(sides, mode)
            table.append(Row(f"postgres-1 / graphile-worker, {mode}", x, "x", ">= 2.00",
                             x >= 2.0 if x == x else False))  # fmt: skip
    if "postgres_pickup" in out:
        p99 = out["postgres_pickup"]["p99_ms"]
        table.append(Row("postgres-1 pickup p99 at 50 % load", p99, "ms", "<= 10", p99 <= 10))
        table.append(Row("  p50 at 50 %", out["postgres_pickup"]["p50_ms"], "ms"))
    if "disk_sync" in out:  # what a commit waits for on this machine (bench.common.disk_sync)
        table.append(Row("  the disk's fdatasync p99", out["disk_sync"]["p99_ms"], "ms"))
        table.append(Row("  the disk's fdatasync max", out["disk_sync"]["max_ms"], "ms"))
    speeds = out.get("meta", {}).get("speed", {})
    if len(speeds) > 1:
        # Past ~1.15 x, a ratio between two parts (ours / Celery) is off by as much.
        slowest = min(speeds, key=speeds.__getitem__)
        fastest = max(speeds, key=speeds.__getitem__)
        table.append(Row(f"machine speed, fastest ({fastest}) / slowest ({slowest}) part",
                         speeds[fastest] / speeds[slowest], "x"))  # fmt: skip
    return [r for r in table if not (r.value != r.value and r.passed is None)] or [
        Row("nothing measured", nan, "")
    ]


def print_table(table: list[Row]) -> None:
    width = max(len(r.figure) for r in table)
    print(f"\n{'figure':<{width}}  {'value':>16}  {'target':>10}  result")
    print("-" * (width + 40))
    for r in table:
        print(f"{r.figure:<{width}}  {fmt(r.value, r.unit):>16}  {r.target:>10}  {r.verdict}")
    checked = [r for r in table if r.passed is not None]
    passed = sum(1 for r in checked if r.passed)
    print(f"\n{passed} of {len(checked)} targets met")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts, one run each")
    parser.add_argument("--only", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    parser.add_argument("--output", type=Path, default=LATEST)
    args = parser.parse_args()
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {', '.join(sorted(unknown))}; choose from {','.join(PARTS)}")
    s = settings(args.quick)
    started = time.perf_counter()
    out: dict[str, Any] = {
        "meta": {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "revision": git_revision(),
            "source": str(ROOT),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "quick": s.quick,
            "jobs": s.jobs,
            "repeats": s.repeats,
        }
    }
    load = os.getloadavg()
    out["meta"]["load_before"] = load
    if load[0] > 0.5:
        print(f"warning: the machine is busy (load average {load[0]:.2f}): other processes "
              "take CPU from the bench and the figures will be low", flush=True)  # fmt: skip
    print(f"bench: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{'quick' if s.quick else 'full'} run of {', '.join(parts)} ({out['meta']['revision']})",
          flush=True)  # fmt: skip
    machine_before, own_before = busy_seconds()
    with tempfile.TemporaryDirectory(prefix="ih-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        run(parts, s, Path(tmp), out)
    machine_after, own_after = busy_seconds()
    wall = time.perf_counter() - started
    foreign = max(0.0, (machine_after - machine_before) - (own_after - own_before))
    out["meta"]["other_cpu_seconds"] = round(foreign, 1)
    errors = sum(r["errors"] for r in out.get("e2e", []))
    if errors:
        print(f"\nwarning: {errors} end-to-end jobs ended in ERROR: the figures are not valid")
    table = rows(out)
    out["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    out["meta"]["load_after"] = os.getloadavg()
    out["table"] = [
        {"figure": r.figure, "value": r.value, "unit": r.unit, "target": r.target,
         "result": r.verdict}
        for r in table
    ]  # fmt: skip
    print_table(table)
    share = foreign / (wall * (os.cpu_count() or 1))
    print(f"other processes used {foreign:.0f} CPU-seconds during the run "
          f"({share:.0%} of the machine){': figures are low' if share > 0.05 else ''}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwritten to {args.output} in {out['meta']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
