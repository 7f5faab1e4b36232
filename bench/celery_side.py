"""Celery 5 with a Redis broker, side by side: the same number of no-op jobs, timed like ours
from the first submit to the last stored result.

The bench starts its own ``redis-server`` on a free 127.0.0.1 port with persistence off
(``--save "" --appendonly no``): database 0 is the broker, database 1 the result backend, so
the number of keys in database 1 is the number of stored results (polled every 20 ms, like our
``GetQueueStats`` poll). A worker (``celery worker``, prefork or threads, concurrency as many
as our scanners) runs :func:`bench.celery_app.noop`. Two ways of submitting, both Celery's own:

- ``apply_async``: one call (one broker message) per job, from one thread, as an application
  would; compared with our single ``SubmitJob`` calls.
- ``chunks`` of 100: ``noop.chunks(..., 100).apply_async()``, a group of ``starmap`` tasks
  each running 100 calls in the worker and storing one result; compared with our
  ``SubmitJobs`` batches of 100.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, child_env, free_port

POLL = 0.02
CHUNK = 100


@dataclass
class CeleryResult:
    mode: str  # apply_async or chunks
    pool: str  # prefork or threads
    concurrency: int
    jobs: int
    seconds: float
    jobs_per_second: float
    submit_seconds: float


def missing() -> str:
    """What this part needs and is not installed ("" when nothing)."""
    import importlib.util

    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    if importlib.util.find_spec("celery") is None or importlib.util.find_spec("redis") is None:
        return "celery and redis are not installed (pip install -e '.[bench]')"
    return ""


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class Worker:
    def __init__(self, redis: RedisServer, pool: str, concurrency: int, workdir: Path) -> None:
        self.redis = redis
        self.pool = pool
        self.concurrency = concurrency
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return child_env(
            BENCH_CELERY_BROKER=self.redis.url(0), BENCH_CELERY_BACKEND=self.redis.url(1)
        )

    def start(self, app: Any) -> None:
        log = open(self.workdir / f"celery-{self.pool}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
             "-P", self.pool, "-c", str(self.concurrency), "-l", "warning",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"bench-{self.pool}@localhost"],
            stdout=log, stderr=log, env=self.env(), cwd=ROOT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the celery worker did not start (see {self.workdir})")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _run(app: Any, broker: Any, results: Any, mode: str, jobs: int) -> tuple[float, float]:
    from bench.celery_app import noop

    results.flushdb()
    expected = jobs if mode == "apply_async" else -(-jobs // CHUNK)
    started = time.perf_counter()
    if mode == "apply_async":
        for _ in range(jobs):
            noop.apply_async()
    else:
        noop.chunks([()] * jobs, CHUNK).apply_async()
    submitted = time.perf_counter() - started
    while results.dbsize() < expected:
        time.sleep(POLL)
    seconds = time.perf_counter() - started
    left = broker.llen("celery")
    if left or results.dbsize() != expected:
        raise RuntimeError(f"celery {mode}: {left} messages left, {results.dbsize()} results")
    return seconds, submitted


def measure(
    workdir: Path,
    jobs: int,
    concurrency: int,
    plan: list[tuple[str, str]],
    repeats: int = 1,
    verbose: bool = True,
) -> list[CeleryResult]:
    """``plan``: (pool, mode) pairs, each run ``repeats`` times."""
    import os

    import redis

    server = RedisServer(workdir)
    server.start()
    out: list[CeleryResult] = []
    try:
        os.environ["BENCH_CELERY_BROKER"] = server.url(0)
        os.environ["BENCH_CELERY_BACKEND"] = server.url(1)
        from bench.celery_app import app

        app.conf.broker_url = server.url(0)
        app.conf.result_backend = server.url(1)
        broker = redis.Redis(port=server.port, db=0)
        results = redis.Redis(port=server.port, db=1)
        for pool in dict.fromkeys(p for p, _ in plan):
            worker = Worker(server, pool, concurrency, workdir)
            worker.start(app)
            try:
                for mode in [m for p, m in plan if p == pool]:
                    for _ in range(repeats):
                        seconds, submitted = _run(app, broker, results, mode, jobs)
                        result = CeleryResult(
                            mode, pool, concurrency, jobs, seconds, jobs / seconds, submitted
                        )
                        out.append(result)
                        if verbose:
                            print(
                                f"  celery {mode:11} {pool:7} -c {concurrency}:"
                                f" {result.jobs_per_second:8,.0f} jobs/s ({jobs:,} jobs in"
                                f" {seconds:.2f} s; submits took {submitted:.2f} s)",
                                flush=True,
                            )
            finally:
                worker.stop()
    finally:
        server.stop()
    return out


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ih-celery-") as tmp:
        measure(
            Path(tmp),
            args.jobs,
            args.concurrency,
            [("prefork", "apply_async"), ("prefork", "chunks"), ("threads", "chunks")],
            args.repeats,
        )
