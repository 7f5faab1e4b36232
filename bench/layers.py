"""Layer analysis figures for the builtin engine.

    .venv/bin/python -m bench.layers                      # 200 MB layer, 1 GB image
    .venv/bin/python -m bench.layers --layer-mb 50 --image-mb 200   # quicker

1. **Throughput**: a gzip layer of about ``--layer-mb`` MB (compressed; a mix of text and
   random files, 1 KiB to 4 MiB, as images hold) is written once. The floor is the machine's
   own ``gzip -dc LAYER | tar -t > /dev/null`` on the same file; the builtin engine's figure
   is a full scan of a one-layer OCI layout holding it (the layer streamed with all the
   checks, packages, malware and secret rules over every file, SBOM). Both are timed best of
   ``--runs``; printed as MB/s (compressed bytes of the layer per second) and as the ratio
   engine / floor.
2. **Memory**: an image of about ``--image-mb`` MB (compressed, in 200 MB layers) is scanned
   by a child process; its peak RSS is the kernel's ``ru_maxrss`` for that child.

Data is generated under ``--work`` (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MB = 1_000_000
SIZES_KIB = (1, 4, 16, 64, 256, 1024, 4096)
SIZE_WEIGHTS = (30, 25, 20, 12, 8, 4, 1)
WORDS = (
    b"the quick brown fox jumps over lazy dog package version library config import "
    b"return value function class module error warning debug info static const"
).split()


def _text(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(WORDS, k=64)) + b"\n"
    return bytes(out[:size])


def write_layer(path: Path, target_mb: int, seed: int) -> tuple[int, int, int]:
    """A gzip layer of about ``target_mb`` compressed MB: (compressed, uncompressed, files)."""
    rng = random.Random(seed)
    raw_total = files = 0
    with open(path, "wb") as out:
        gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            directory = 0
            while out.tell() < target_mb * MB:
                if files % 200 == 0:
                    directory += 1
                # Mostly small files, a few large ones, as in real images.
                scale = rng.choices(SIZES_KIB, weights=SIZE_WEIGHTS)[0]
                size = int(scale * 1024 * rng.random()) + 1
                binary = rng.random() < 0.5
                data = os.urandom(size) if binary else _text(rng, size)
                name = f"usr/share/app{seed}/d{directory}/file{files}.{'bin' if binary else 'txt'}"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
                raw_total += size
                files += 1
        gz.close()
        return out.tell(), raw_total, files


def write_layout(layout: Path, layers: list[Path]) -> None:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    descriptors = []
    for layer in layers:
        digest = hashlib.sha256()
        with open(layer, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        target = blobs / digest.hexdigest()
        if not target.exists():
            os.link(layer, target)
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + digest.hexdigest(),
                "size": layer.stat().st_size,
            }
        )
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": descriptors,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def floor_seconds(layer: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        f"gzip -dc {layer} | tar -t > /dev/null", shell=True, check=True, executable="/bin/bash"
    )
    return time.perf_counter() - start


def scan_layout(layout: Path, scratch: Path) -> tuple[float, int]:
    """Seconds of a full builtin scan of the layout, and the number of findings."""
    from imagehandler.v1 import common_pb2
    from scanner_client.engine import Job, NullProgress
    from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
    from scanner_client.job_policy import ScannerPolicy

    # The layout is a local path: the job policy reads it only under an allowed root.
    policy = ScannerPolicy.parse(artifact_roots=str(layout.parent))
    engine = BuiltinEngine(BuiltinSettings(scratch_dir=scratch, policy=policy))
    job = Job(
        "bench",
        1,
        common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(layout))),
    )
    start = time.perf_counter()
    result = asyncio.run(engine.scan(job, NullProgress()))
    seconds = time.perf_counter() - start
    return seconds, len(result.malware) + len(result.secrets) + len(result.vulnerabilities)


def child_main(layout: Path, scratch: Path) -> None:
    seconds, _ = scan_layout(layout, scratch)
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer-mb", type=int, default=200)
    parser.add_argument("--image-mb", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child-scan", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_scan is not None:
        child_main(args.child_scan, args.scratch)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-layers-"))
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    try:
        layer = work / "layer.tar.gz"
        started = time.perf_counter()
        compressed, raw, files = write_layer(layer, args.layer_mb, seed=1)
        print(
            f"layer: {compressed / MB:.1f} MB gzip, {raw / MB:.1f} MB of {files} files "
            f"(written in {time.perf_counter() - started:.1f}s)"
        )
        layout = work / "one-layer"
        write_layout(layout, [layer])
        floor = min(floor_seconds(layer) for _ in range(args.runs))
        ours, findings = min(scan_layout(layout, scratch) for _ in range(args.runs))
        print(f"floor   gzip -dc | tar -t : {floor:6.2f}s  {compressed / MB / floor:7.1f} MB/s")
        print(
            f"builtin full layer scan   : {ours:6.2f}s  {compressed / MB / ours:7.1f} MB/s "
            f"({raw / MB / ours:.1f} MB/s uncompressed; {findings} findings)"
        )
        print(f"ratio builtin / floor     : {floor / ours:.2f}")

        layers = [layer]
        seed = 2
        while sum(p.stat().st_size for p in layers) < args.image_mb * MB:
            more = work / f"layer{seed}.tar.gz"
            remaining = args.image_mb * MB - sum(p.stat().st_size for p in layers)
            write_layer(more, min(200, max(1, remaining // MB)), seed=seed)
            layers.append(more)
            seed += 1
        image = work / "image"
        write_layout(image, layers)
        size = sum(p.stat().st_size for p in layers)
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.layers",
                "--child-scan",
                str(image),
                "--scratch",
                str(scratch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        seconds = json.loads(child.stdout.strip().splitlines()[-1])["seconds"]
        print(
            f"image: {size / MB:.0f} MB gzip in {len(layers)} layers: scanned in {seconds:.1f}s "
            f"({size / MB / seconds:.1f} MB/s), peak RSS {peak_kib / 1024:.0f} MiB"
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
