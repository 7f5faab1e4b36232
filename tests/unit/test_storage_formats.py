"""The embedded store's file formats: queued jobs in columns (journal and snapshot), the
version 2 snapshot read as a stream, and version 1 snapshots and per-job journal records still
read. Real files in a temporary directory; every job must come back exactly as it was stored.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagehandler.jobpolicy import Submitter
from imagehandler.storage.v1 import storage_pb2
from imagehandler.v1 import common_pb2
from server.core import state_machine
from server.core.model import (
    ImageRef,
    Job,
    JobFailure,
    JobSpec,
    JobStatus,
    Lane,
    NodeRef,
    Policy,
    Trigger,
)
from server.storage.embedded import codec
from server.storage.embedded.columns import ColumnsBuilder, ColumnsReader, fits, made
from server.storage.embedded.framing import frame, read_frames
from server.storage.embedded.journal import FsyncPolicy, journal_path
from server.storage.embedded.snapshot import (
    MAGIC_V1,
    MAGIC_V2,
    SnapshotCorrupt,
    read_snapshot,
    write_snapshot,
)
from server.storage.embedded.store import JournalState, JournalStore

S = JobStatus
AT = datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=UTC)


def queued(n: int, **spec: object) -> Job:
    fields: dict[str, object] = {
        "target": ImageRef("registry.example", "team/app", f"v{n}"),
        "trigger": Trigger.CICD,
        "policies": (Policy.VULNERABILITIES, Policy.SECRETS),
        "max_run_time": 600.5,
        "lane": Lane.BULK,
    }
    fields.update(spec)
    job = Job(id=f"job-{n:04d}", seq=n, spec=JobSpec(**fields), created_at=AT)  # type: ignore[arg-type]
    state_machine.record_creation(job, AT + timedelta(microseconds=n))
    job.created_at = job.updated_at = job.history[0].at
    job.lsn = 1000 + n
    return job


def variety() -> list[Job]:
    """Queued jobs of every column's values, and jobs that do not fit the columns."""
    jobs = [queued(n) for n in range(1, 251)]
    jobs.append(queued(251, idempotency_key="once", lane=Lane.INTERACTIVE))
    jobs.append(queued(252, submitter=Submitter("ci", frozenset({"submit", "read"}))))
    jobs.append(queued(253, target=ImageRef("", "lib/x", "", "sha256:" + "a" * 64, "cred", "")))
    delivered = queued(254)
    delivered.delivered = 1
    jobs.append(delivered)
    jobs.append(queued(255, labels={"team": "a"}))  # labels: a StoredJob
    jobs.append(queued(256, target=NodeRef("c1", "node-1", "/host")))  # not an image
    done = queued(257)
    state_machine.move(done, S.IN_PROGRESS, at=AT, reason="assigned", scanner_id="s-1")
    state_machine.move(done, S.PROCESSING_RESULTS, at=AT, reason="result received")
    state_machine.move(done, S.FINISHED, at=AT, reason="results stored")
    done.result = common_pb2.ScanResult(job_id=done.id, run=1, verdict=common_pb2.VERDICT_PASSED)
    done.result_summary = common_pb2.ResultSummary(verdict=common_pb2.VERDICT_PASSED)
    jobs.append(done)
    retried = queued(258)
    state_machine.move(retried, S.IN_PROGRESS, at=AT, reason="assigned", scanner_id="s-1")
    state_machine.move(
        retried, S.PENDING, at=AT, reason="run failed", error=JobFailure("HNDL-006", "failed")
    )
    jobs.append(retried)
    jobs.append(queued(259, policies=(Policy.SECRETS, Policy.VULNERABILITIES)))  # not ascending
    return jobs


def write_per_job_records(path: Path, jobs: list[Job]) -> None:
    """A journal as the version before columns wrote it: a JobCreated record per job."""
    with open(path, "wb") as out:
        for job in jobs:
            record = storage_pb2.JournalRecord(lsn=job.lsn)
            codec.set_stored(record.created.job, job)
            out.write(frame(record.SerializeToString()))


def same(a: Job, b: Job) -> bool:
    """Equal in everything stored (the stored form, byte for byte) and in the lsn."""
    left = codec.stored(a).SerializeToString(deterministic=True)
    right = codec.stored(b).SerializeToString(deterministic=True)
    return left == right and a.lsn == b.lsn and a.key == b.key and a.kind == b.kind


def test_only_the_queued_shape_fits_the_columns() -> None:
    jobs = variety()
    fitting = [j.seq for j in jobs if fits(j)]
    assert fitting == list(range(1, 255))


@pytest.mark.parametrize("version", [1, 2])
async def test_a_snapshot_of_either_version_reads_back_every_job(
    tmp_path: Path, version: int
) -> None:
    jobs = variety()
    header = storage_pb2.SnapshotHeader(generation=3, lsn=2000, next_seq=260)
    path, _size = await write_snapshot(tmp_path, header, jobs, version=version)
    assert path.read_bytes().startswith(MAGIC_V1 if version == 1 else MAGIC_V2)
    loaded = read_snapshot(path)
    assert loaded.version == version
    assert loaded.header == header
    assert [j.id for j in loaded.jobs] == [j.id for j in jobs]
    assert all(same(a, b) for a, b in zip(jobs, loaded.jobs, strict=True))


def slots_of(job: Job) -> dict[str, object]:
    """Every attribute of a job and of its spec and target, each with its type."""
    out: dict[str, object] = {}
    for prefix, obj in (("", job), ("spec.", job.spec), ("target.", job.spec.target)):
        for name in type(obj).__slots__:
            value = getattr(obj, name)
            out[prefix + name] = (type(value), value)
    out.pop("spec.target")
    out.pop("spec")
    return out


def test_jobs_read_from_columns_are_the_jobs_init_makes() -> None:
    """The columns make their objects without __init__ (made): every attribute, the dedup key
    and the kind __post_init__ computes included, must be what the constructors give."""
    jobs = [j for j in variety() if fits(j)]
    builder = ColumnsBuilder()
    for job in jobs:
        builder.add(job, job.lsn)
    message = storage_pb2.JobColumns()
    builder.fill(message, delivered=True)
    read = ColumnsReader(codec.Decoder()).jobs(message)
    for original, back in zip(jobs, read, strict=True):
        rebuilt = Job(
            id=original.id,
            seq=original.seq,
            spec=JobSpec(**{n: getattr(back.spec, n) for n in JobSpec.__slots__}),
            created_at=back.created_at,
            updated_at=back.updated_at,
            history=list(back.history),
            lsn=back.lsn,
            delivered=back.delivered,
        )
        assert slots_of(back) == slots_of(original) == slots_of(rebuilt)
        assert back.key == back.spec.dedup_key()
    with_digest = next(
        j for j in read if isinstance(j.spec.target, ImageRef) and j.spec.target.digest
    )
    assert with_digest.key == (
        "image",
        "sha256:" + "a" * 64,
        (Policy.VULNERABILITIES, Policy.SECRETS),
    )
    with pytest.raises(TypeError):
        made(ImageRef, 1, registry=["r"])  # no repository, which has no default
    with pytest.raises(ValueError, match="1 values for 2"):
        made(ImageRef, 2, registry=["r", "s"], repository=["x"])
    assert made(ImageRef, 1, registry=["r"], repository=["x"]) == [ImageRef("r", "x")]


async def test_version_2_keeps_queued_jobs_in_columns_a_hundred_to_a_frame(
    tmp_path: Path,
) -> None:
    header = storage_pb2.SnapshotHeader(generation=1, lsn=1, next_seq=260)
    path, _ = await write_snapshot(tmp_path, header, variety())
    frames = read_frames(path, path.read_bytes(), len(MAGIC_V2)).payloads[1:-1]
    records = [storage_pb2.SnapshotRecord.FromString(p) for p in frames]
    shapes = [
        len(r.columns.ids) if r.HasField("columns") else "job" for r in records
    ]  # fmt: skip
    assert shapes == [100, 100, 54, "job", "job", "job", "job", "job"]


async def test_a_snapshot_cut_short_is_corrupt(tmp_path: Path) -> None:
    header = storage_pb2.SnapshotHeader(generation=1, lsn=1, next_seq=260)
    path, size = await write_snapshot(tmp_path, header, variety())
    os.truncate(path, size - 10)
    with pytest.raises(SnapshotCorrupt):
        read_snapshot(path)


def came_from() -> list[Job]:
    """A job that finished with a stored result and a rematch of an SBOM: what each came from
    is part of the job (GetJob shows it; a rematch's findings change is told against it)."""
    digest = "sha256:" + "b" * 64
    return [
        queued(1, target=ImageRef("registry.example", "team/app", "", digest), reused_from="j-0"),
        queued(2, rematch_of="j-1"),
    ]


@pytest.mark.parametrize("version", [1, 2])
async def test_what_a_job_came_from_survives_the_snapshot_and_the_journal(
    tmp_path: Path, version: int
) -> None:
    jobs = came_from()
    origins = [(j.spec.reused_from, j.spec.rematch_of) for j in jobs]
    header = storage_pb2.SnapshotHeader(generation=1, lsn=2000, next_seq=3)
    path, _size = await write_snapshot(tmp_path, header, jobs, version=version)
    loaded = read_snapshot(path)
    assert [(j.spec.reused_from, j.spec.rematch_of) for j in loaded.jobs] == origins

    store = JournalStore(tmp_path / "journal", FsyncPolicy.NEVER)
    store.open_directory()
    store.start(store.recover())
    for job in came_from():
        job.lsn = 0
        store.created(job)
    store.flush()
    await store.close()
    again = JournalStore(tmp_path / "journal", FsyncPolicy.NEVER)
    again.open_directory()
    recovered = again.recover()
    assert [(j.spec.reused_from, j.spec.rematch_of) for j in recovered.jobs.values()] == origins


async def test_new_jobs_of_a_turn_are_one_record_and_old_per_job_records_still_replay(
    tmp_path: Path,
) -> None:
    # An old data directory: a version 1 snapshot, then a journal of per-job records.
    old = variety()
    in_snapshot, in_journal = old[:100], old[100:]
    header = storage_pb2.SnapshotHeader(generation=1, lsn=1000 + 100, next_seq=101)
    await write_snapshot(tmp_path, header, in_snapshot, version=1)
    write_per_job_records(journal_path(tmp_path, 1), in_journal)

    store = JournalStore(tmp_path, FsyncPolicy.NEVER)
    store.open_directory()
    state = store.recover()
    assert list(state.jobs) == [j.id for j in old]
    assert all(same(j, state.jobs[j.id]) for j in old)
    assert state.next_seq == 260

    # This version writes a turn's new queued jobs as one record in columns.
    store.start(state)
    fresh = [queued(n) for n in range(300, 310)]
    for job in fresh:
        job.lsn = 0
        store.created(job)
    store.flush()
    await store.close()
    data = journal_path(tmp_path, 2).read_bytes()
    records = [
        storage_pb2.JournalRecord.FromString(p)
        for p in read_frames(journal_path(tmp_path, 2), data).payloads
    ]
    assert [r.WhichOneof("change") for r in records] == ["created_many"]
    assert [j.lsn for j in fresh] == list(range(records[0].lsn, records[0].lsn + 10))

    again = JournalStore(tmp_path, FsyncPolicy.NEVER)
    again.open_directory()
    recovered = again.recover()
    assert len(recovered.jobs) == len(old) + len(fresh)
    assert all(same(j, recovered.jobs[j.id]) for j in [*old, *fresh])
    assert recovered.next_seq == 310


async def test_a_torn_tail_is_cut_while_reading_as_a_stream(tmp_path: Path) -> None:
    store = JournalStore(tmp_path, FsyncPolicy.NEVER)
    store.open_directory()
    store.start(JournalState())
    jobs = [queued(n) for n in range(1, 6)]
    for job in jobs:
        store.created(job)
        store.flush()  # a record each
    await store.close()
    path = journal_path(tmp_path, 1)
    whole = path.stat().st_size
    os.truncate(path, whole - 7)  # the last record cut by a crash
    again = JournalStore(tmp_path, FsyncPolicy.NEVER)
    again.open_directory()
    state = again.recover()
    assert sorted(state.jobs) == [j.id for j in jobs[:4]]
    assert state.torn_bytes_cut > 0
    assert path.stat().st_size == whole - 7 - state.torn_bytes_cut
