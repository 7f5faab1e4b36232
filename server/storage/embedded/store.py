"""The journal and its snapshots: the embedded store's durable copy of the job tables.

:class:`JournalStore` is the :class:`~server.storage.memory.ChangeLog` the in-memory tables
write every change to (one frame per record; a loop turn's moves are one record), and the
recovery that reads it back at start: the newest snapshot, then the journals after it.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from imagehandler.storage.v1 import storage_pb2
from imagehandler.v1 import common_pb2, job_service_pb2
from server.core import state_machine
from server.core.model import Job, JobFailure, Transition
from server.storage.disk import fsync_directory
from server.storage.embedded import codec
from server.storage.embedded.columns import ColumnsBuilder, ColumnsReader, fits
from server.storage.embedded.framing import FrameStream, open_frames, salvage_frames
from server.storage.embedded.journal import FsyncPolicy, Journal, journal_path
from server.storage.embedded.snapshot import (
    SnapshotCorrupt,
    read_snapshot,
    snapshot_generations,
    snapshot_path,
    write_snapshot,
)
from server.storage.repository import StorageError

log = structlog.get_logger("imagehandler.storage")

_JOURNAL_NAME = re.compile(r"journal-(\d{8})\.log")
_ID = operator.attrgetter("id")
_SEQ = operator.attrgetter("seq")
_LSN = operator.attrgetter("lsn")


@dataclass
class JournalState:
    """What the data directory held."""

    jobs: dict[str, Job] = field(default_factory=dict)
    next_seq: int = 1
    snapshot_generation: int = 0
    journal_generations: list[int] = field(default_factory=list)
    records_replayed: int = 0
    torn_bytes_cut: int = 0
    lost: list[str] = field(default_factory=list)  # what salvage could not read
    seconds: float = 0.0
    acceptances: dict[str, job_service_pb2.RiskAcceptance] = field(default_factory=dict)


def _replay_move(
    job: Job,
    t: Transition,
    lsn: int,
    where: str,
    *,
    result: common_pb2.ScanResult | None,
    summary: common_pb2.ResultSummary | None,
    in_file: bool,
) -> None:
    """Apply one journaled move (either record form) to a recovered job."""
    try:
        state_machine.move(
            job, t.to_status, at=t.at, reason=t.reason, scanner_id=t.scanner_id, error=t.error
        )
    except state_machine.IllegalTransition as exc:
        raise StorageError(f"{where} cannot be applied ({exc.detail})") from None
    if result is not None:
        job.result = result
    if summary is not None:
        job.result_summary = summary
    job.result_in_file = job.result_in_file or in_file
    job.lsn = lsn


@dataclass(slots=True)
class _PendingMoves:
    """A JobsMoved record being gathered: plain lists (appending to a protobuf repeated field
    from Python costs several times more), turned into the record once."""

    first_lsn: int
    job_ids: list[str] = field(default_factory=list)
    to_statuses: list[int] = field(default_factory=list)
    at_unix_micros: list[int] = field(default_factory=list)
    scanner_ids: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    errors: list[tuple[int, JobFailure]] = field(default_factory=list)
    results: list[tuple[int, common_pb2.ScanResult]] = field(default_factory=list)
    summaries: list[tuple[int, common_pb2.ResultSummary]] = field(default_factory=list)
    result_in_file_of: list[int] = field(default_factory=list)

    def record(self) -> storage_pb2.JournalRecord:
        record = storage_pb2.JournalRecord(lsn=self.first_lsn)
        moves = record.moves
        moves.job_ids.extend(self.job_ids)
        moves.to_statuses.extend(self.to_statuses)  # type: ignore[arg-type]  # same numbers
        moves.at_unix_micros.extend(self.at_unix_micros)
        moves.scanner_ids.extend(self.scanner_ids)
        moves.reasons.extend(self.reasons)
        for index, error in self.errors:
            moves.error_of.append(index)
            moves.errors.add(code=error.code, message=error.message, detail=error.detail)
        for index, result in self.results:
            moves.result_of.append(index)
            moves.results.append(result)
        for index, summary in self.summaries:
            moves.summary_of.append(index)
            moves.summaries.append(summary)
        moves.result_in_file_of.extend(self.result_in_file_of)
        return record


@dataclass(slots=True)
class _PendingCreates:
    """A loop turn's new jobs that fit the columns: one JobColumns record, written as
    :class:`_PendingMoves` is."""

    first_lsn: int
    columns: ColumnsBuilder = field(default_factory=ColumnsBuilder)


class JournalStore:
    """Journal plus periodic snapshots in one data directory, which it locks."""

    def __init__(
        self,
        directory: Path,
        policy: FsyncPolicy = FsyncPolicy.BATCH,
        *,
        snapshot_bytes: int = 64 * 1024 * 1024,
        salvage: bool = False,
        observe_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self.directory = directory
        self.policy = policy
        self.snapshot_bytes = snapshot_bytes
        self.salvage = salvage
        self._observe_fsync = observe_fsync
        self._lock_fd = -1
        self.journal: Journal | None = None
        self._snapshotting = False
        self.last_snapshot: tuple[Path, int, float] | None = None  # path, bytes, seconds
        # This turn's moves, not yet a journal record (see JobsMoved), or its new jobs that fit
        # the columns (a JobColumns record; at most one of the two is gathered at a time).
        # Written before any other record, at every flush, mark and sync, and at the end of
        # the loop turn.
        self._moves: _PendingMoves | None = None
        self._creates: _PendingCreates | None = None
        # Recovery's: values jobs share are made once (see codec.Decoder).
        self._decoder = codec.Decoder()
        self._columns = ColumnsReader(self._decoder)

    # ----- start: lock, recover, open ----------------------------------------------------

    def open_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
            self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise StorageError(
                f"cannot use the data directory {self.directory}: {exc.strerror or exc} "
                "(it must be a writable directory; set --data-dir)"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(
                f"the data directory {self.directory} is in use by another image-handler"
            ) from None

    def recover(self) -> JournalState:
        """Load the newest snapshot and replay the journals after it (runs before serving).

        The cyclic garbage collector is off meanwhile: recovery makes millions of objects
        that all live on, and each collection would walk all of them again for nothing. The
        caller freezes them once the tables are built (:func:`gc.freeze`)."""
        started = time.perf_counter()
        state = JournalState()
        collecting = gc.isenabled()
        gc.disable()
        try:
            snapshots = snapshot_generations(self.directory)
            if snapshots:
                self._load_snapshot(snapshots[-1], state)
            journals = [g for g in self._journal_generations() if g >= state.snapshot_generation]
            state.journal_generations = journals
            for index, generation in enumerate(journals):
                self._replay(generation, state, last=index == len(journals) - 1)
        finally:
            if collecting:
                gc.enable()
        state.seconds = time.perf_counter() - started
        return state

    def start(self, state: JournalState) -> None:
        """Open a fresh journal generation after everything recovered."""
        generation = max([state.snapshot_generation, *state.journal_generations, 0]) + 1
        next_lsn = 1 + max(map(_LSN, state.jobs.values()), default=0)
        next_lsn = max(next_lsn, self._replayed_lsn + 1)
        self.journal = Journal(
            self.directory,
            generation,
            self.policy,
            next_lsn=next_lsn,
            observe_fsync=self._observe_fsync,
        )
        fsync_directory(self.directory)
        self.journal.start()

    _replayed_lsn = 0

    def _journal_generations(self) -> list[int]:
        return sorted(
            int(m.group(1))
            for p in self.directory.iterdir()
            if (m := _JOURNAL_NAME.fullmatch(p.name))
        )

    def _load_snapshot(self, generation: int, state: JournalState) -> None:
        path = snapshot_path(self.directory, generation)
        try:
            loaded = read_snapshot(path, salvage=self.salvage, decoder=self._decoder)
        except SnapshotCorrupt as exc:
            raise StorageError(
                f"snapshot {exc.damage.describe()}; the handler will not start on a damaged "
                "snapshot. Restore the data directory from a backup, or start with --salvage to "
                "keep what is readable"
            ) from None
        state.lost += [d.describe() for d in loaded.damage]
        state.snapshot_generation = loaded.header.generation
        state.next_seq = max(state.next_seq, loaded.header.next_seq)
        state.acceptances = {a.id: a for a in loaded.header.acceptances}
        self._replayed_lsn = max(self._replayed_lsn, loaded.header.lsn)
        # A C pass each (map over an attrgetter), not a Python line per job.
        state.jobs.update(zip(map(_ID, loaded.jobs), loaded.jobs, strict=True))
        if loaded.jobs:
            state.next_seq = max(state.next_seq, max(map(_SEQ, loaded.jobs)) + 1)

    def _replay(self, generation: int, state: JournalState, *, last: bool) -> None:
        path = journal_path(self.directory, generation)
        if self.salvage:
            payloads, damages = salvage_frames(path, path.read_bytes())
            state.lost += [d.describe() for d in damages if not d.torn_tail]
            self._apply_all(payloads, state, path)
            return
        # Read as a stream: a frame at a time, each record applied as it is read. A damaged
        # record is judged once everything before it is applied (a corrupt one stops the
        # start, so what was applied does not matter then).
        with open_frames(path) as handle:
            stream = FrameStream(path, handle)
            self._apply_all(stream, state, path)
            damage = stream.damage
        if damage is None:
            return
        if not (damage.torn_tail and last):
            raise StorageError(
                f"journal {damage.describe()}; the handler will not start on a "
                "damaged journal. Restore the data directory from a backup, or start "
                "with --salvage to keep what is readable and list what was lost"
            )
        # A write cut by a crash: nothing after it was acknowledged. Cut it off.
        size = path.stat().st_size
        state.torn_bytes_cut += size - stream.good_end
        with open(path, "r+b") as handle:
            handle.truncate(stream.good_end)
            handle.flush()
            os.fsync(handle.fileno())
        log.warning(
            "journal.torn_tail_cut",
            path=str(path),
            offset=stream.good_end,
            bytes=size - stream.good_end,
        )

    def _apply_all(self, payloads: Iterable[bytes], state: JournalState, path: Path) -> None:
        parse = storage_pb2.JournalRecord.FromString
        for payload in payloads:
            record = parse(payload)
            count = self._apply(record, state, path)
            state.records_replayed += 1
            self._replayed_lsn = max(self._replayed_lsn, record.lsn + count - 1)

    def _apply(self, record: storage_pb2.JournalRecord, state: JournalState, path: Path) -> int:
        """Apply one record; how many lsns it holds."""
        change = record.WhichOneof("change")
        if change == "created_many":
            return self._apply_created_many(record.lsn, record.created_many, state)
        if change == "moves":
            self._apply_moves(record.lsn, record.moves, state, path)
            return len(record.moves.job_ids)
        if change == "created":
            stored = record.created.job
            if stored.job.id not in state.jobs:
                new_job = self._decoder.job(stored)
                new_job.lsn = record.lsn
                state.jobs[new_job.id] = new_job
            state.next_seq = max(state.next_seq, stored.seq + 1)
        elif change == "moved":
            moved = record.moved
            job = state.jobs.get(moved.job_id)
            if job is None or job.lsn >= record.lsn:
                return 1  # pruned later, or already in the snapshot
            t = codec.transition(moved.transition)
            _replay_move(
                job,
                t,
                record.lsn,
                f"journal {path}: record {record.lsn}",
                result=moved.result if moved.HasField("result") else None,
                summary=moved.summary if moved.HasField("summary") else None,
                in_file=moved.result_in_file,
            )
        elif change == "pruned":
            for job_id in record.pruned.job_ids:
                state.jobs.pop(job_id, None)
        elif change == "delivered":
            found = state.jobs.get(record.delivered.job_id)
            if found is not None:
                found.delivered = max(found.delivered, record.delivered.delivered)
                found.verdict_delivered = max(
                    found.verdict_delivered, record.delivered.verdict_delivered
                )
        elif change == "risk_accepted":
            state.acceptances[record.risk_accepted.id] = record.risk_accepted
        elif change == "risk_removed":
            state.acceptances.pop(record.risk_removed, None)
        elif change == "verdict_changed":
            changed = record.verdict_changed
            found = state.jobs.get(changed.job_id)
            # A snapshot may hold the job with a newer change already (version 0: an older
            # journal without versions, applied in order).
            if found is not None and (
                not changed.verdict_version or changed.verdict_version > found.verdict_version
            ):
                found.result_summary = changed.summary
                found.verdict_version = changed.verdict_version
        return 1

    def _apply_created_many(
        self, first_lsn: int, columns: storage_pb2.JobColumns, state: JournalState
    ) -> int:
        jobs = state.jobs
        created = self._columns.jobs(columns, first_lsn)
        ids = list(map(_ID, created))
        if jobs.keys().isdisjoint(ids):  # nearly always: all of them in one call
            jobs.update(zip(ids, created, strict=True))
        else:
            for job in created:
                if job.id not in jobs:  # else: in the snapshot already
                    jobs[job.id] = job
        if created:
            state.next_seq = max(state.next_seq, max(columns.seqs) + 1)
        return len(created)

    @staticmethod
    def _apply_moves(
        first_lsn: int, moves: storage_pb2.JobsMoved, state: JournalState, path: Path
    ) -> None:
        errors = dict(zip(moves.error_of, moves.errors, strict=True))
        results = dict(zip(moves.result_of, moves.results, strict=True))
        summaries = dict(zip(moves.summary_of, moves.summaries, strict=True))
        in_file = set(moves.result_in_file_of)
        for index, (job_id, to_status, at_micros, scanner_id, reason) in enumerate(
            zip(
                moves.job_ids,
                moves.to_statuses,
                moves.at_unix_micros,
                moves.scanner_ids,
                moves.reasons,
                strict=True,
            )
        ):
            lsn = first_lsn + index
            job = state.jobs.get(job_id)
            if job is None or job.lsn >= lsn:
                continue  # pruned later, or already in the snapshot
            error = errors.get(index)
            transition = Transition(
                None,
                codec.STATUS[to_status],
                codec.from_unix_micros(at_micros),
                scanner_id,
                0,
                reason,
                codec.failure(error) if error is not None else None,
            )
            _replay_move(
                job,
                transition,
                lsn,
                f"journal {path}: record {first_lsn} move {index}",
                result=results.get(index),
                summary=summaries.get(index),
                in_file=index in in_file,
            )

    # ----- appending -----------------------------------------------------------------------

    def _append(self, record: storage_pb2.JournalRecord) -> int:
        self._write_moves()  # the turn's moves (or new jobs) came first
        journal = self._open_journal()
        lsn = journal.next_lsn()
        record.lsn = lsn
        journal.append(lsn, record.SerializeToString())
        return lsn

    def _open_journal(self) -> Journal:
        if self.journal is None:
            raise RuntimeError("JournalStore.start() was not called")
        return self.journal

    def created(self, job: Job, message: common_pb2.Job | None = None) -> None:
        if fits(job):
            creates = self._creates
            if creates is None:
                self._write_moves()  # the turn's moves came first
                creates = self._creates = _PendingCreates(self._open_journal().next_lsn())
                asyncio.get_running_loop().call_soon(self._write_moves)  # at the end of the turn
            job.lsn = creates.first_lsn + len(creates.columns)
            creates.columns.add(job)
            return
        record = storage_pb2.JournalRecord()
        stored = record.created.job  # filled in place: no nested copies
        if message is None:
            codec.set_stored(stored, job)
        else:
            codec.set_stored_from(stored, job, message)
        job.lsn = self._append(record)

    def moved(
        self,
        job: Job,
        transition: Transition,
        *,
        result: common_pb2.ScanResult | None = None,
        summary: common_pb2.ResultSummary | None = None,
    ) -> None:
        moves = self._moves
        if moves is None:
            self._write_moves()  # the turn's new jobs came first
            moves = self._moves = _PendingMoves(self._open_journal().next_lsn())
            asyncio.get_running_loop().call_soon(self._write_moves)  # at the end of the turn
        index = len(moves.job_ids)
        moves.job_ids.append(job.id)
        moves.to_statuses.append(transition.to_status)
        moves.at_unix_micros.append(codec.unix_micros(transition.at))
        moves.scanner_ids.append(transition.scanner_id)
        moves.reasons.append(transition.reason)
        if transition.error is not None:
            moves.errors.append((index, transition.error))
        if result is not None:
            moves.results.append((index, result))
        if summary is not None:
            moves.summaries.append((index, summary))
        if job.result_in_file:
            moves.result_in_file_of.append(index)
        job.lsn = moves.first_lsn + index

    def _write_moves(self) -> None:
        """Append this turn's moves, or its new jobs, as one record (with the LSNs they were
        given)."""
        creates = self._creates
        if creates is not None:
            self._creates = None
            record = storage_pb2.JournalRecord(lsn=creates.first_lsn)
            creates.columns.fill(record.created_many)
            last_lsn = creates.first_lsn + len(creates.columns) - 1
            self._open_journal().append(last_lsn, record.SerializeToString())
        moves = self._moves
        if moves is None:
            return
        self._moves = None
        last_lsn = moves.first_lsn + len(moves.job_ids) - 1
        self._open_journal().append(last_lsn, moves.record().SerializeToString())

    def pruned(self, job_ids: Sequence[str]) -> None:
        self._append(storage_pb2.JournalRecord(pruned=storage_pb2.JobsPruned(job_ids=job_ids)))

    def delivered(self, job: Job) -> None:
        record = storage_pb2.JobDelivered(
            job_id=job.id, delivered=job.delivered, verdict_delivered=job.verdict_delivered
        )
        self._append(storage_pb2.JournalRecord(delivered=record))

    def risk_accepted(self, acceptance: job_service_pb2.RiskAcceptance) -> None:
        self._append(storage_pb2.JournalRecord(risk_accepted=acceptance))

    def risk_removed(self, acceptance_id: str) -> None:
        self._append(storage_pb2.JournalRecord(risk_removed=acceptance_id))

    def verdict_changed(self, job: Job) -> None:
        record = storage_pb2.VerdictChanged(
            job_id=job.id, summary=job.result_summary, verdict_version=job.verdict_version
        )
        self._append(storage_pb2.JournalRecord(verdict_changed=record))

    def flush(self) -> None:
        self._write_moves()
        self._open_journal().flush()

    def mark(self) -> int:
        self._write_moves()  # moves before the mark stay when what follows is discarded
        return self._open_journal().mark()

    def discard_since(self, mark: int) -> None:
        # Gathered after the mark (mark() wrote what came before): a failed submit's new jobs.
        self._moves = None
        self._creates = None
        self._open_journal().discard_since(mark)

    async def sync(self) -> None:
        self._write_moves()
        await self._open_journal().sync()

    # ----- snapshots -----------------------------------------------------------------------

    def wants_snapshot(self) -> bool:
        journal = self.journal
        return (
            journal is not None and not self._snapshotting and journal.size >= self.snapshot_bytes
        )

    async def snapshot(
        self,
        jobs: Sequence[Job],
        next_seq: int,
        acceptances: Sequence[job_service_pb2.RiskAcceptance] = (),
    ) -> None:
        """Start a new journal generation, write the snapshot that ends where it starts, then
        drop the files the snapshot replaces."""
        journal = self._open_journal()
        if self._snapshotting:
            return
        self._snapshotting = True
        started = time.perf_counter()
        try:
            self._write_moves()  # into the old generation, which the snapshot covers
            generation = journal.generation + 1
            lsn = journal.last_lsn
            await journal.rotate(generation)
            header = storage_pb2.SnapshotHeader(
                generation=generation, lsn=lsn, next_seq=next_seq, acceptances=acceptances
            )
            path, size = await write_snapshot(self.directory, header, jobs)
            replaced = [
                *(snapshot_path(self.directory, g) for g in snapshot_generations(self.directory)
                  if g < generation),
                *(journal_path(self.directory, g) for g in self._journal_generations()
                  if g < generation),
            ]  # fmt: skip
            # In a thread: freeing a large file's blocks stalled the loop (47 ms for a 70 MB
            # journal here, and it grows with the file).
            await asyncio.to_thread(_remove_files, replaced)
            seconds = time.perf_counter() - started
            self.last_snapshot = (path, size, seconds)
            log.info(
                "snapshot.written",
                path=str(path),
                jobs=len(jobs),
                bytes=size,
                seconds=round(seconds, 3),
            )
        finally:
            self._snapshotting = False

    async def close(self) -> None:
        if self.journal is not None:
            self._write_moves()
            await self.journal.close()
            self.journal = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _remove_files(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_directory(paths[0].parent)
