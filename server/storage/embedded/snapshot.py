"""Snapshots: the whole job table in one file, written atomically without stalling the loop.

A snapshot is fuzzy: jobs are serialized a chunk at a time while the handler goes on, each with
the journal position (lsn) of its last change, and the journal generation that begins at the
snapshot's start holds every later change. Replay skips records a job already has, so the file
plus the journals after it always rebuild the exact state.

File, version 2: ``IHSNAP2\n``, then frames: a SnapshotHeader; SnapshotRecords, each one job
(a StoredJob) or up to ``COLUMNS`` queued jobs in columns (JobColumns, see
:mod:`~server.storage.embedded.columns`); a SnapshotFooter. Version 1 (``IHSNAP1\n``, a
StoredJob per frame) is still read. Either is read as a stream, a frame at a time, and turned
into jobs as it is read: recovery never holds the file, nor its messages, all at once.
Written to a temporary file, fsynced, renamed, and the directory fsynced.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagehandler.storage.v1 import storage_pb2
from server.core.model import Job
from server.storage.disk import fsync_directory
from server.storage.embedded import codec
from server.storage.embedded.columns import ColumnsBuilder, ColumnsReader, fits
from server.storage.embedded.framing import (
    Damage,
    FrameStream,
    frame,
    open_frames,
    salvage_frames,
)

MAGIC_V1 = b"IHSNAP1\n"
MAGIC = MAGIC_V2 = b"IHSNAP2\n"
CHUNK = 1000  # jobs serialized between two yields to the event loop
# Queued jobs per columns frame: enough that a frame's own cost is nothing per job, few enough
# that --salvage, which drops a damaged frame whole, loses few jobs with it.
COLUMNS = 100
_NAME = re.compile(r"snapshot-(\d{8})\.snap")


def snapshot_path(directory: Path, generation: int) -> Path:
    return directory / f"snapshot-{generation:08d}.snap"


def snapshot_generations(directory: Path) -> list[int]:
    return sorted(
        int(match.group(1)) for p in directory.iterdir() if (match := _NAME.fullmatch(p.name))
    )


async def write_snapshot(
    directory: Path, header: storage_pb2.SnapshotHeader, jobs: Sequence[Job], *, version: int = 2
) -> tuple[Path, int]:
    """Write the snapshot for ``header.generation``; its path and size in bytes. (``version``
    1 writes the old format: only tests of reading it need that.)"""
    final = snapshot_path(directory, header.generation)
    temporary = final.with_suffix(".snap.tmp")
    try:
        return await _write(temporary, final, header, jobs, version)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _v1_frames(jobs: Sequence[Job]) -> list[bytes]:
    return [frame(codec.stored(job).SerializeToString()) for job in jobs]


def _v2_frames(jobs: Sequence[Job]) -> list[bytes]:
    """Runs of jobs that fit the columns as one frame each, any other job a frame of its own."""
    out: list[bytes] = []
    columns = ColumnsBuilder()

    def close_columns() -> None:
        nonlocal columns
        if len(columns):
            record = storage_pb2.SnapshotRecord()
            columns.fill(record.columns, delivered=True)
            out.append(frame(record.SerializeToString()))
            columns = ColumnsBuilder()

    for job in jobs:
        if fits(job):
            columns.add(job, job.lsn)
            if len(columns) == COLUMNS:
                close_columns()
        else:
            close_columns()
            record = storage_pb2.SnapshotRecord()
            codec.set_stored(record.job, job)
            out.append(frame(record.SerializeToString()))
    close_columns()
    return out


async def _write(
    temporary: Path,
    final: Path,
    header: storage_pb2.SnapshotHeader,
    jobs: Sequence[Job],
    version: int,
) -> tuple[Path, int]:
    directory = final.parent
    loop = asyncio.get_running_loop()
    encode = _v2_frames if version == 2 else _v1_frames
    # Buffered writes of a local file; the slow part, fsync, goes to a worker thread.
    with open(temporary, "wb") as out:  # noqa: ASYNC230
        out.write(MAGIC_V2 if version == 2 else MAGIC_V1)
        out.write(frame(header.SerializeToString()))
        for start in range(0, len(jobs), CHUNK):
            out.writelines(encode(jobs[start : start + CHUNK]))
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
    jobs: list[Job]
    damage: list[Damage]
    version: int


class SnapshotCorrupt(Exception):
    def __init__(self, damage: Damage) -> None:
        self.damage = damage
        super().__init__(damage.describe())


def read_snapshot(
    path: Path, *, salvage: bool = False, decoder: codec.Decoder | None = None
) -> LoadedSnapshot:
    """The snapshot's header and jobs (either version), read as a stream."""
    decoder = decoder or codec.Decoder()
    with open_frames(path) as handle:
        magic = handle.read(len(MAGIC_V2))
        if magic not in (MAGIC_V1, MAGIC_V2):
            raise SnapshotCorrupt(Damage(path, 0, "not a snapshot file (bad magic)", False))
        version = 1 if magic == MAGIC_V1 else 2
        damage: list[Damage] = []
        if salvage:
            # Rare and slow: the whole file, every readable frame.
            payloads, damage = salvage_frames(path, handle.read())
            frames: Iterator[bytes] = iter(payloads)
            stream = None
        else:
            stream = FrameStream(path, handle, len(magic))
            frames = iter(stream)
        header_payload = next(frames, None)
        if header_payload is None:
            raise SnapshotCorrupt(Damage(path, len(magic), "no header or footer", False))
        header = storage_pb2.SnapshotHeader.FromString(header_payload)
        jobs, footer = _read_jobs(frames, version, decoder)
        if stream is not None and stream.damage is not None:
            # A snapshot is renamed into place only when complete: any damage is corruption.
            raise SnapshotCorrupt(
                Damage(path, stream.damage.offset, stream.damage.reason, torn_tail=False)
            )
        if footer is None:
            raise SnapshotCorrupt(Damage(path, len(magic), "no header or footer", False))
        if footer.job_count != len(jobs) and not salvage:
            end = stream.good_end if stream is not None else 0
            raise SnapshotCorrupt(
                Damage(path, end, f"footer says {footer.job_count} jobs, read {len(jobs)}", False)
            )
    return LoadedSnapshot(header, jobs, damage, version)


def _read_jobs(
    frames: Iterator[bytes], version: int, decoder: codec.Decoder
) -> tuple[list[Job], storage_pb2.SnapshotFooter | None]:
    """The jobs up to the last frame, and the last frame as the footer (None: no frame)."""
    jobs: list[Job] = []
    previous = next(frames, None)
    if previous is None:
        return jobs, None
    decode = decoder.job
    columns = ColumnsReader(decoder)
    # Consecutive column frames, merged into one message (a copy in C) to be read with one
    # call: the call's own cost, paid per frame, would be a good part of a small frame's.
    gathered: storage_pb2.JobColumns | None = None

    def read_gathered() -> None:
        nonlocal gathered
        if gathered is not None:
            jobs.extend(columns.jobs(gathered))
            gathered = None

    for payload in frames:
        # The frame before this one was not the last: a job (or jobs).
        if version == 1:
            jobs.append(decode(storage_pb2.StoredJob.FromString(previous)))
        else:
            record = storage_pb2.SnapshotRecord.FromString(previous)
            if not record.HasField("columns"):
                read_gathered()
                jobs.append(decode(record.job))
            elif gathered is not None and _mergeable(gathered, record.columns):
                submitters = len(gathered.submitters)
                gathered.MergeFrom(record.columns)
                del gathered.submitters[submitters:]  # the same ones again
            else:
                read_gathered()
                gathered = record.columns
        previous = payload
    read_gathered()
    return jobs, storage_pb2.SnapshotFooter.FromString(previous)


_MERGED = 1000  # queued jobs read with one call at most


def _mergeable(gathered: storage_pb2.JobColumns, more: storage_pb2.JobColumns) -> bool:
    """Whether ``more`` can be appended to ``gathered`` column by column: the same submitters
    (the index column points into them) and every per-job column full in both (a snapshot
    writes its lsns and deliveries for every job)."""
    return (
        len(gathered.ids) < _MERGED
        and gathered.submitters == more.submitters
        and len(gathered.lsns) == len(gathered.delivered) == len(gathered.ids)
        and len(more.lsns) == len(more.delivered) == len(more.ids)
    )
