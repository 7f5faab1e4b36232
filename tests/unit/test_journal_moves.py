"""The moves of one event-loop turn are one journal record (JobsMoved), replayed move by move.

Real files in a temporary data directory: the store writes them, a second store recovers them.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path

from imagehandler.storage.v1 import storage_pb2
from imagehandler.v1 import common_pb2
from server.core import state_machine
from server.core.model import ImageRef, Job, JobFailure, JobSpec, JobStatus, Lane, Policy, Trigger
from server.storage.embedded.framing import read_frames
from server.storage.embedded.journal import FsyncPolicy, journal_path
from server.storage.embedded.snapshot import write_snapshot
from server.storage.embedded.store import JournalState, JournalStore

S = JobStatus


def now_utc() -> datetime:
    return datetime.now(UTC)


def new_job(job_id: str, seq: int) -> Job:
    spec = JobSpec(
        ImageRef("docker.io", "library/app", f"v{seq}"),
        Trigger.CICD,
        (Policy.VULNERABILITIES,),
        600.0,
        Lane.BULK,
    )
    job = Job(id=job_id, seq=seq, spec=spec, created_at=now_utc())
    state_machine.record_creation(job, job.created_at)
    return job


def history(job: Job) -> list[tuple[object, ...]]:
    return [
        (t.from_status, t.to_status, t.at, t.scanner_id, t.run, t.reason, t.error)
        for t in job.history
    ]


async def test_a_turns_moves_are_one_record_and_replay_exactly(tmp_path: Path) -> None:
    store = JournalStore(tmp_path, FsyncPolicy.NEVER)
    store.open_directory()
    store.start(JournalState())
    job, other = new_job("a", 1), new_job("b", 2)
    store.created(job)
    store.created(other)
    store.flush()
    at = now_utc()

    def move(
        target: Job,
        to: JobStatus,
        reason: str,
        *,
        scanner_id: str = "",
        error: JobFailure | None = None,
        result: common_pb2.ScanResult | None = None,
        summary: common_pb2.ResultSummary | None = None,
    ) -> None:
        transition = state_machine.move(
            target, to, at=at, reason=reason, scanner_id=scanner_id, error=error
        )
        store.moved(target, transition, result=result, summary=summary)

    # One turn: a run that fails, a second run with a result, and another job cancelled.
    move(job, S.IN_PROGRESS, "assigned", scanner_id="scanner-1")
    after_first_move = copy.deepcopy(job)  # what a snapshot taken now would hold
    failure = JobFailure("HNDL-006", "scan failed", "exit 2")
    move(job, S.PENDING, "run 1 failed", error=failure)
    move(job, S.IN_PROGRESS, "assigned", scanner_id="scanner-2")
    result = common_pb2.ScanResult(job_id="a", run=2, verdict=common_pb2.VERDICT_PASSED)
    move(job, S.PROCESSING_RESULTS, "result received", result=result)
    summary = common_pb2.ResultSummary(verdict=common_pb2.VERDICT_PASSED, critical=0)
    move(job, S.FINISHED, "results stored", summary=summary)
    move(other, S.CANCELLED, "cancelled by operator")
    await store.close()

    frames = read_frames(journal_path(tmp_path, 1), journal_path(tmp_path, 1).read_bytes())
    records = [storage_pb2.JournalRecord.FromString(p) for p in frames.payloads]
    # The two new jobs are one record in columns (JobColumns), the turn's moves another.
    assert [r.WhichOneof("change") for r in records] == ["created_many", "moves"]
    assert list(records[0].created_many.ids) == ["a", "b"]
    assert list(records[1].moves.job_ids) == ["a"] * 5 + ["b"]
    assert job.lsn == records[1].lsn + 4
    assert other.lsn == records[1].lsn + 5

    recovered = JournalStore(tmp_path, FsyncPolicy.NEVER).recover()
    for original in (job, other):
        back = recovered.jobs[original.id]
        assert back.status == original.status
        assert back.runs == original.runs
        assert back.error == original.error
        assert back.lsn == original.lsn
        assert history(back) == history(original)
    assert recovered.jobs["a"].result == result
    assert recovered.jobs["a"].result_summary == summary

    # A snapshot that copied job a between its first and second move: replay skips only the
    # first (already in the copy) and applies the rest, ending where the handler was.
    snapshot_dir = tmp_path / "snapshotted"
    snapshot_dir.mkdir()
    journal_path(tmp_path, 1).rename(journal_path(snapshot_dir, 1))
    header = storage_pb2.SnapshotHeader(generation=1, lsn=records[0].lsn + 1, next_seq=3)
    await write_snapshot(snapshot_dir, header, [after_first_move, new_job("b", 2)])
    again = JournalStore(snapshot_dir, FsyncPolicy.NEVER).recover()
    assert again.jobs["a"].status is S.FINISHED
    assert again.jobs["a"].runs == 2
    assert history(again.jobs["a"]) == history(job)
    assert again.jobs["b"].status is S.CANCELLED


async def test_moves_are_written_before_any_later_record_and_at_flush(tmp_path: Path) -> None:
    store = JournalStore(tmp_path, FsyncPolicy.NEVER)
    store.open_directory()
    store.start(JournalState())
    first = new_job("a", 1)
    store.created(first)
    transition = state_machine.move(
        first, S.IN_PROGRESS, at=now_utc() + timedelta(seconds=1), reason="assigned", scanner_id="s"
    )
    store.moved(first, transition)
    store.created(new_job("b", 2))  # a later record: the pending move goes first
    store.flush()
    data = journal_path(tmp_path, 1).read_bytes()
    changes = [
        storage_pb2.JournalRecord.FromString(p).WhichOneof("change")
        for p in read_frames(journal_path(tmp_path, 1), data).payloads
    ]
    assert changes == ["created_many", "moves", "created_many"]
    await store.close()
