"""The vulnerability database's figures: build time and size from the bundled feeds, load time
at scanner start, and matching throughput against the full database.

    .venv/bin/python -m bench.vulndb

The matching SBOM is 1,000 real package names drawn from the database itself (PyPI, npm and
Alpine v3.11 packages that have advisories, so every one is looked up and compared), each at a
version some record names as fixed; it is matched once in a fresh process state (cold: empty
caches, as a scanner's first scan) and then again (warm).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import ROOT

FEEDS = sorted((ROOT / "vulndata").glob("*.tar.gz"))
SBOM_SIZE = 1000


@dataclass
class VulnDbResult:
    build_seconds: float
    size_bytes: int
    advisories: int
    load_ms: float
    match_cold_ms: float
    match_warm_ms: float
    packages: int
    findings: int


_PROBE = r"""
import json, random, sys, time
t0 = time.perf_counter()
from scanner_client.engines.builtin.databases import load_databases
t1 = time.perf_counter()
loaded = load_databases()
t2 = time.perf_counter()
from scanner_client.engines.builtin.analyzers import Package
from scanner_client.vulndb import matcher
store = loaded.vulnerabilities
import sqlite3
rows = sqlite3.connect(str(store.path)).execute(
    "SELECT DISTINCT ecosystem, release, name, ranges FROM affected "
    "WHERE ecosystem IN ('PyPI', 'npm') OR (ecosystem = 'Alpine' AND release = 'v3.11') "
    "ORDER BY ecosystem, name"
).fetchall()
chosen = {}
for ecosystem, release, name, ranges in rows:
    fixed = [v for _, events in json.loads(ranges) for k, v in events if k == "fixed"]
    full = f"{ecosystem}:{release}" if release else ecosystem
    if (full, name) not in chosen:
        chosen[(full, name)] = fixed[0] if fixed else "1.0.0"
keys = sorted(chosen)
random.Random(14).shuffle(keys)
kinds = {"PyPI": "pypi", "npm": "npm", "Alpine:v3.11": "apk"}
packages = [
    Package(kinds[e], n, chosen[(e, n)], e, n, chosen[(e, n)], "bench")
    for e, n in keys[: int(sys.argv[1])]
]
t3 = time.perf_counter()
cold = matcher.match(store, packages)
t4 = time.perf_counter()
warm = min(
    (lambda s: (matcher.match(store, packages), time.perf_counter() - s)[1])(time.perf_counter())
    for _ in range(5)
)
print(json.dumps({
    "import_ms": (t1 - t0) * 1000, "load_ms": (t2 - t1) * 1000,
    "cold_ms": (t4 - t3) * 1000, "warm_ms": warm * 1000,
    "packages": len(packages), "findings": len(cold.findings),
    "advisories": store.count("advisories"),
}))
"""


def _probe(size: int) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-c", _PROBE, str(size)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure(workdir: Path, repeats: int = 3) -> VulnDbResult:
    from scanner_client.vulndb.build import build

    builds = []
    size = 0
    for index in range(repeats):
        out = workdir / f"vulndb-{index}.db"
        started = time.perf_counter()
        build([str(feed) for feed in FEEDS], out)
        builds.append(time.perf_counter() - started)
        size = out.stat().st_size
    probes = [_probe(SBOM_SIZE) for _ in range(repeats)]
    median = statistics.median
    return VulnDbResult(
        build_seconds=median(builds),
        size_bytes=size,
        advisories=int(probes[0]["advisories"]),
        load_ms=median(p["load_ms"] for p in probes),
        match_cold_ms=median(p["cold_ms"] for p in probes),
        match_warm_ms=median(p["warm_ms"] for p in probes),
        packages=int(probes[0]["packages"]),
        findings=int(probes[0]["findings"]),
    )


def main() -> None:
    random.seed(14)
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps(asdict(measure(Path(scratch))), indent=2))


if __name__ == "__main__":
    main()
