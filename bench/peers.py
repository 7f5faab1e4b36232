"""The peers that track every job as the handler does, run beside it in the same `make bench`:
BullMQ (Redis, every job a hash, Lua scripts) and graphile-worker (PostgreSQL, durable).

Both are Node.js packages pinned in ``bench/package.json`` (with its lock file) and installed
by ``make bench`` with ``npm ci``. Each run is one ``node bench/peers/<peer>.mjs`` process that
submits the same no-op jobs in the same shapes as :mod:`bench.e2e` (batches of 100 with 4 calls
in flight, or single adds with 32 in flight) to its own queue, with ``workers`` workers, and
prints one JSON line timed from the first add to the last completion.

- BullMQ runs on a ``redis-server`` this module starts (persistence off, as Redis without
  persistence is what the issue's figures compare), so our ``--fsync never`` is its fair peer.
- graphile-worker runs on the machine's PostgreSQL (``BENCH_DATABASE_URL``, default
  ``postgres://postgres@127.0.0.1:5432/test``) in a schema of its own, dropped afterwards.

    .venv/bin/python -m bench.peers --peer bullmq --mode batched --jobs 20000 --workers 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.celery_side import RedisServer
from bench.common import ROOT

BENCH = ROOT / "bench"
PEERS = ("bullmq", "graphile-worker")
SCRIPTS = {"bullmq": "bullmq.mjs", "graphile-worker": "graphile.mjs"}
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/test"


@dataclass
class PeerResult:
    peer: str
    mode: str  # batched or single
    jobs: int
    workers: int
    seconds: float
    submit_seconds: float
    jobs_per_second: float


def database_url() -> str:
    return os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)


def missing(peer: str) -> str:
    """What this peer needs and is not installed ("" when nothing)."""
    if shutil.which("node") is None:
        return "node is not installed (Node.js 20 or newer)"
    if not (BENCH / "node_modules" / peer).is_dir():
        return "the peers are not installed (cd bench && npm ci; `make bench` does it)"
    if peer == "bullmq":
        # The Redis it runs on is started and checked as Celery's is (bench.celery_side).
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (apt-get install redis-server)"
        if importlib.util.find_spec("redis") is None:
            return "the redis package is not installed (pip install -e '.[bench]'; make bench does)"
    return ""


def run_once(
    peer: str, mode: str, jobs: int, workers: int, *, redis_port: int = 0, timeout: float = 600
) -> PeerResult:
    args = ["node", str(BENCH / "peers" / SCRIPTS[peer]), "--mode", mode, "--jobs", str(jobs),
            "--workers", str(workers)]  # fmt: skip
    if peer == "bullmq":
        args += ["--redis-port", str(redis_port)]
    else:
        args += ["--database-url", database_url()]
    done = subprocess.run(args, cwd=BENCH, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{peer} {mode} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    fields = json.loads(lines[-1])
    return PeerResult(
        peer=peer, mode=mode, jobs=jobs, workers=workers, seconds=fields["seconds"],
        submit_seconds=fields["submit_seconds"], jobs_per_second=fields["jobs_per_second"],
    )  # fmt: skip


def measure(
    workdir: Path, peers: tuple[str, ...], modes: tuple[str, ...], jobs: int, workers: int,
    repeats: int, before: Callable[[str], None] | None = None,
    report: Callable[[PeerResult], None] | None = None,
) -> list[PeerResult]:  # fmt: skip
    """Every peer in every mode, `repeats` times each, on a Redis started for the purpose.
    Round by round (each mode once, every peer in turn), and ``before(mode)`` first: our own
    run of the same shape, so each round's ratio compares runs minutes apart at most, not
    parts of a bench that the machine's drift set apart. ``report(result)`` as each run ends."""
    results: list[PeerResult] = []
    redis = RedisServer(workdir) if "bullmq" in peers else None
    if redis is not None:
        redis.start()
    try:
        for _ in range(repeats):
            for mode in modes:
                if before is not None:
                    before(mode)
                for peer in peers:
                    port = redis.port if redis is not None else 0
                    results.append(run_once(peer, mode, jobs, workers, redis_port=port))
                    if report is not None:
                        report(results[-1])
    finally:
        if redis is not None:
            redis.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", choices=(*PEERS, "all"), default="all")
    parser.add_argument("--mode", choices=("batched", "single", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    peers = PEERS if args.peer == "all" else (args.peer,)
    for peer in peers:
        if reason := missing(peer):
            raise SystemExit(f"{peer}: {reason}")
    modes = ("batched", "single") if args.mode == "both" else (args.mode,)
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    for result in measure(workdir, peers, modes, args.jobs, args.workers, args.repeats):
        print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
