"""Snapshots: the whole job table in one file, written atomically without stalling the loop.

A snapshot is fuzzy: jobs are serialized a chunk at a time while the handler goes on, each with
the journal position (lsn) of its last change, and the journal generation that begins at the
snapshot's start holds every later change. Replay skips records a job already has, so the file
plus the journals after it always rebuild the exact state.

File: ``IHSNAP1\\n``, then frames: a SnapshotHeader, one StoredJob per job, a SnapshotFooter.
Written to a temporary file, fsynced, renamed, and the directory fsynced.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagehandler.storage.v1 import storage_pb2
from server.core.model import Job
from server.storage.embedded import codec
from server.storage.embedded.framing import Damage, frame, read_frames, salvage_frames
from server.storage.embedded.journal import fsync_directory

MAGIC = b"IHSNAP1\n"
CHUNK = 250  # jobs serialized between two yields to the event loop (about 5 ms)
_NAME = re.compile(r"snapshot-(\d{8})\.snap")


def snapshot_path(directory: Path, generation: int) -> Path:
    return directory / f"snapshot-{generation:08d}.snap"


def snapshot_generations(directory: Path) -> list[int]:
    return sorted(
        int(match.group(1)) for p in directory.iterdir() if (match := _NAME.fullmatch(p.name))
    )


async def write_snapshot(
    directory: Path, header: storage_pb2.SnapshotHeader, jobs: Sequence[Job]
) -> tuple[Path, int]:
    """Write the snapshot for ``header.generation``; its path and size in bytes."""
    final = snapshot_path(directory, header.generation)
    temporary = final.with_suffix(".snap.tmp")
    try:
        return await _write(temporary, final, header, jobs)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


async def _write(
    temporary: Path, final: Path, header: storage_pb2.SnapshotHeader, jobs: Sequence[Job]
) -> tuple[Path, int]:
    directory = final.parent
    loop = asyncio.get_running_loop()
    # Buffered writes of a local file; the slow part, fsync, goes to a worker thread.
    with open(temporary, "wb") as out:  # noqa: ASYNC230
        out.write(MAGIC)
        out.write(frame(header.SerializeToString()))
        for index, job in enumerate(jobs):
            out.write(frame(codec.stored(job).SerializeToString()))
            if index % CHUNK == CHUNK - 1:
                await asyncio.sleep(0)  # let dispatch and RPCs run between chunks
        out.write(frame(storage_pb2.SnapshotFooter(job_count=len(jobs)).SerializeToString()))
        out.flush()
        await loop.run_in_executor(None, os.fsync, out.fileno())
        size = out.tell()
    os.replace(temporary, final)
    fsync_directory(directory)
    return final, size


@dataclass
class LoadedSnapshot:
    header: storage_pb2.SnapshotHeader
    jobs: list[storage_pb2.StoredJob]
    damage: list[Damage]


class SnapshotCorrupt(Exception):
    def __init__(self, damage: Damage) -> None:
        self.damage = damage
        super().__init__(damage.describe())


def read_snapshot(path: Path, *, salvage: bool = False) -> LoadedSnapshot:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise SnapshotCorrupt(Damage(path, 0, "not a snapshot file (bad magic)", False))
    damage: list[Damage] = []
    if salvage:
        payloads, damage = salvage_frames(path, data[len(MAGIC) :])
    else:
        frames = read_frames(path, data, len(MAGIC))
        if frames.damage is not None:
            # A snapshot is renamed into place only when complete: any damage is corruption.
            raise SnapshotCorrupt(
                Damage(path, frames.damage.offset, frames.damage.reason, torn_tail=False)
            )
        payloads = frames.payloads
    if len(payloads) < 2:
        raise SnapshotCorrupt(Damage(path, len(MAGIC), "no header or footer", False))
    header = storage_pb2.SnapshotHeader.FromString(payloads[0])
    footer = storage_pb2.SnapshotFooter.FromString(payloads[-1])
    jobs = [storage_pb2.StoredJob.FromString(p) for p in payloads[1:-1]]
    if footer.job_count != len(jobs) and not salvage:
        raise SnapshotCorrupt(
            Damage(path, len(data), f"footer says {footer.job_count} jobs, read {len(jobs)}", False)
        )
    return LoadedSnapshot(header, jobs, damage)
