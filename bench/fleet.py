"""Scan once, match many: a fleet of images built on a few shared bases, scanned by the builtin
engine without the layer cache, with an empty cache (cold) and again with it filled (warm); the
rematch rate of the stored SBOMs against a full rescan; the cache's disk use per image.

    .venv/bin/python -m bench.fleet                         # 100 images on 3 bases
    .venv/bin/python -m bench.fleet --images 30 --base-mb 10 # quicker

The fleet: ``--bases`` base images, each an OS layer of about ``--base-mb`` compressed MB (files
of random and text content, a Debian 12 ``os-release`` and a dpkg database of ``--packages``
packages) and a runtime layer of a third of that; each of ``--images`` images is one base plus a
top layer of its own (about 0.5 MB: an application with npm and Python packages). The images are
pushed with ``skopeo`` into a local ``docker-registry`` that logs every request: the bytes pulled
are the sizes of the blobs it sent.

- **no cache**: ``BuiltinEngine.scan`` of ``--sample`` images (every policy), one at a time, the
  way one scanner slot works; the fleet's figure is the per-image median times the fleet.
- **cold**: an engine with an empty ``--layer-cache-dir`` scans the whole fleet (the bases' layers
  are read once, at the first image of each base).
- **warm**: a new engine on the same directory (as after a restart) scans the fleet again.
- **--stock**: the same on stock Debian roots (minbase, npm-python; debootstrap, as
  :mod:`bench.scan_speed` builds them), one layer each: the entry size of a real layer.
- **rematch**: each image's stored SBOM matched by ``BuiltinEngine.scan`` of an artifact job
  carrying it (what a scanner does for a rematch job: nothing pulled), per second, against the
  no-cache scan rate.

Needs docker-registry and skopeo (``make test-tools``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import statistics
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from imagehandler.v1 import common_pb2
from scanner_client.engine import Job, NullProgress
from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
from scanner_client.job_policy import ScannerPolicy
from tests.oci import Entry, Image, Layout, LocalRegistry, directory, file, layer, tools_missing

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
# Real Debian source packages first (the database has advisories for some), then made-up ones.
REAL = ("glibc", "openssl", "curl", "openssh", "zlib", "systemd", "perl", "python3.11", "tar")


@dataclass
class FleetResult:
    images: int
    bases: int
    base_mb: float
    packages: int
    no_cache_seconds_per_image: float  # median over the sample
    no_cache_fleet_seconds: float  # per image x images
    no_cache_mb_pulled: float  # the fleet's layers, every image pulling all of its own
    cold_seconds: float
    cold_mb_pulled: float
    warm_seconds: float
    warm_mb_pulled: float
    rematch_per_second: float
    rescan_per_second: float
    cache_mb: float

    @property
    def warm_speedup(self) -> float:
        return self.no_cache_fleet_seconds / self.warm_seconds

    @property
    def rematch_speedup(self) -> float:
        return self.rematch_per_second / self.rescan_per_second


def dpkg_status(count: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    for index in range(count):
        source = REAL[index] if index < len(REAL) else f"lib{seed}pkg{index}"
        version = f"{rng.randint(1, 9)}.{rng.randint(0, 30)}-{rng.randint(1, 5)}+deb12u1"
        out.append(
            f"Package: {source}-bin\nStatus: install ok installed\nArchitecture: amd64\n"
            f"Source: {source}\nVersion: {version}\n"
        )
    return "\n".join(out)


def filler(prefix: str, target_mb: float, seed: int) -> list[Entry]:
    """Files of about ``target_mb`` compressed MB: half random bytes, half text."""
    rng = random.Random(seed)
    entries: list[Entry] = []
    total = 0
    index = 0
    while total < target_mb * 1_000_000:
        size = rng.choice((2_000, 16_000, 64_000, 256_000))
        if index % 2:
            data = rng.randbytes(size)
            total += size
        else:
            data = (b"config value library module function " * (size // 36 + 1))[:size]
            total += size // 50
        entries.append(file(f"{prefix}/f{index}.bin", data, mode=0o644))
        index += 1
    return entries


def build(layout: Layout, args: argparse.Namespace) -> list[str]:
    bases = []
    for b in range(args.bases):
        system = layer(
            [
                directory("etc"),
                file("etc/os-release", OS_RELEASE),
                file("var/lib/dpkg/status", dpkg_status(args.packages, b)),
                *filler(f"usr/lib/base{b}", args.base_mb, b),
            ]
        )
        runtime = layer(filler(f"opt/runtime{b}", args.base_mb / 3, 100 + b))
        bases.append([system, runtime])
    names = []
    for i in range(args.images):
        top = layer(
            [
                file("app/package.json", json.dumps({"name": f"app{i}", "version": "1.0.0"})),
                file(
                    "app/node_modules/lodash/package.json",
                    json.dumps({"name": "lodash", "version": "4.17.15"}),
                ),
                *filler(f"app/data{i}", 0.5, 1000 + i),
            ]
        )
        name = f"app{i}"
        layout.add(name, Image([*bases[i % args.bases], top], user="1000"))
        names.append(name)
    return names


def pulled_bytes(registry: LocalRegistry, since: int) -> tuple[int, int]:
    """(bytes of the blobs the registry sent since log line ``since``, lines now)."""
    lines = (registry.workdir / "registry.log").read_text(errors="replace").splitlines()
    total = 0
    for line in lines[since:]:
        match = re.search(r'"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" 200 (\d+)', line)
        if match:
            total += int(match.group(1))
    return total, len(lines)


def engine(registry: LocalRegistry, cache: Path | None) -> BuiltinEngine:
    policy = ScannerPolicy.parse(
        allowed_registries=registry.address, allowed_networks="127.0.0.1/32"
    )
    return BuiltinEngine(BuiltinSettings(policy=policy, layer_cache_dir=cache))


async def scan_all(
    scanner: BuiltinEngine, registry: LocalRegistry, names: list[str]
) -> tuple[float, list[common_pb2.ScanResult]]:
    results = []
    started = time.perf_counter()
    for name in names:
        image = common_pb2.ImageObject(
            registry=registry.address, repository=f"fleet/{name}", tag=name
        )
        job = Job(job_id=name, run=1, object=common_pb2.ScanObject(image=image))
        results.append(await scanner.scan(job, NullProgress()))
    return time.perf_counter() - started, results


async def rematch_all(scanner: BuiltinEngine, sboms: list[bytes]) -> float:
    started = time.perf_counter()
    for index, sbom in enumerate(sboms):
        artifact = common_pb2.ArtifactObject(sbom=sbom, sbom_format="cyclonedx-json")
        job = Job(job_id=f"r{index}", run=1, object=common_pb2.ScanObject(artifact=artifact))
        await scanner.scan(job, NullProgress())
    return time.perf_counter() - started


def measure(work: Path, args: argparse.Namespace) -> FleetResult:
    registry = LocalRegistry(work / "registry", access_log=True)
    try:
        layout = Layout(work / "layout")
        print(f"  building and pushing {args.images} images on {args.bases} bases", flush=True)
        names = build(layout, args)
        for name in names:
            registry.push(layout.path, name, f"fleet/{name}")
        _, mark = pulled_bytes(registry, 0)

        plain = engine(registry, None)
        sample = names[: args.sample]
        times = []
        for name in sample:
            seconds, _ = asyncio.run(scan_all(plain, registry, [name]))
            times.append(seconds)
        sample_bytes, mark = pulled_bytes(registry, mark)
        per_image = statistics.median(times)
        print(f"  no cache: {per_image:.2f} s per image (median of {len(sample)})", flush=True)

        cache = work / "cache"
        cold_seconds, results = asyncio.run(scan_all(engine(registry, cache), registry, names))
        cold_bytes, mark = pulled_bytes(registry, mark)
        print(f"  cold: {cold_seconds:.1f} s, {cold_bytes / 1e6:.1f} MB pulled", flush=True)
        warm_engine = engine(registry, cache)
        warm_seconds, _ = asyncio.run(scan_all(warm_engine, registry, names))
        warm_bytes, mark = pulled_bytes(registry, mark)
        print(f"  warm: {warm_seconds:.1f} s, {warm_bytes / 1e6:.1f} MB pulled", flush=True)
        assert warm_engine.layer_cache is not None
        cache_bytes = warm_engine.layer_cache.usage()

        sboms = [bytes(result.sbom) for result in results]
        rematch_seconds = asyncio.run(rematch_all(warm_engine, sboms))
        print(f"  rematch: {len(sboms) / rematch_seconds:.0f} SBOMs/s", flush=True)
    finally:
        registry.stop()
    return FleetResult(
        images=args.images,
        bases=args.bases,
        base_mb=args.base_mb,
        packages=args.packages,
        no_cache_seconds_per_image=per_image,
        no_cache_fleet_seconds=per_image * len(names),
        no_cache_mb_pulled=sample_bytes / len(sample) * len(names) / 1e6,
        cold_seconds=cold_seconds,
        cold_mb_pulled=cold_bytes / 1e6,
        warm_seconds=warm_seconds,
        warm_mb_pulled=warm_bytes / 1e6,
        rematch_per_second=len(sboms) / rematch_seconds,
        rescan_per_second=1.0 / per_image,
        cache_mb=cache_bytes / 1e6,
    )


@dataclass
class StockResult:
    """A stock Debian root (debootstrap, as bench.scan_speed builds it) as one gzip layer."""

    image: str
    layer_mb: float
    files: int
    cold_seconds: float
    warm_seconds: float
    cache_kb: float  # the layer's cache entry


def measure_stock(
    work: Path, names: tuple[str, ...] = ("minbase", "npm-python")
) -> list[StockResult]:
    """The layer cache on real layers: a stock root's entry size, a cold and a warm scan."""
    from bench.scan_speed import stock_layer
    from tests.inventory_images import NPM_PYTHON

    includes = {"minbase": (), "npm-python": NPM_PYTHON}
    registry = LocalRegistry(work / "stock-registry")
    out = []
    try:
        layout = Layout(work / "stock-layout")
        for name in names:
            lay, tar = stock_layer(name, includes[name])
            layout.add(name, Image([lay]))
            registry.push(layout.path, name, f"fleet/{name}")
            cache = work / f"stock-cache-{name}"
            cold, results = asyncio.run(scan_all(engine(registry, cache), registry, [name]))
            warm_engine = engine(registry, cache)
            warm, again = asyncio.run(scan_all(warm_engine, registry, [name]))
            assert again[0].vulnerabilities == results[0].vulnerabilities
            assert warm_engine.layer_cache is not None
            with tarfile.open(tar) as archive:
                files = sum(1 for member in archive if member.isreg())
            out.append(
                StockResult(
                    image=name,
                    layer_mb=lay.path.stat().st_size / 1e6,
                    files=files,
                    cold_seconds=cold,
                    warm_seconds=warm,
                    cache_kb=warm_engine.layer_cache.usage() / 1e3,
                )
            )
            print(f"  {out[-1]}", flush=True)
    finally:
        registry.stop()
    return out


def missing() -> str:
    tools = tools_missing()
    return f"{', '.join(tools)} not installed (make test-tools)" if tools else ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--bases", type=int, default=3)
    p.add_argument("--base-mb", type=float, default=20.0, help="compressed MB of a base's OS layer")
    p.add_argument("--packages", type=int, default=300, help="dpkg packages of each base")
    p.add_argument("--sample", type=int, default=10, help="images scanned without the cache")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument(
        "--stock",
        action="store_true",
        help="also stock Debian roots as one layer each (debootstrap: needs root; cached a day)",
    )
    return p


def report(result: FleetResult) -> None:
    print(json.dumps({**asdict(result), "warm_speedup": round(result.warm_speedup, 2),
                      "rematch_speedup": round(result.rematch_speedup, 1)}, indent=1))  # fmt: skip


def main() -> int:
    args = parser().parse_args()
    problem = missing()
    if problem:
        print(problem)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        report(measure(work, args))
        if args.stock:
            for stock in measure_stock(work):
                print(json.dumps(asdict(stock)))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
