"""Durability on the embedded default: journal, snapshots, recovery, damage, retention, drain."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from server.app import HandlerServer
from server.core.model import ImageRef, JobSpec, Lane, Policy, Trigger
from server.storage.embedded import EmbeddedRepository
from server.storage.embedded.framing import HEADER
from server.storage.embedded.journal import FsyncPolicy
from server.storage.repository import StorageError
from tests.conftest import TEST_CONFIG, Handler, MakeHandler
from tests.helpers import RawScanner, image, remote_error, wait_for_status

S = common_pb2


async def get(handler: Handler, job_id: str) -> common_pb2.Job:
    reply = await handler.jobs.GetJob(
        job_service_pb2.GetJobRequest(job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL)
    )
    return reply.job


async def restart(handler: Handler, make_handler: MakeHandler, **overrides: object) -> Handler:
    """Stop without draining and start a new handler on the same data directory."""
    await handler.server.stop(0)
    return await make_handler(data_dir=handler.config.data_dir, **overrides)


async def test_a_restart_keeps_every_job_its_status_order_and_runs(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    finished = (await handler.jobs.SubmitJob(image(tag="finished"))).job.id
    running = (await handler.jobs.SubmitJob(image(tag="running"))).job.id
    waiting = [(await handler.jobs.SubmitJob(image(tag=f"w{n}"))).job.id for n in range(3)]
    cancelled = (await handler.jobs.SubmitJob(image(tag="cancelled"))).job.id
    await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=cancelled))
    async with RawScanner(handler.scanners, "s1", slots=2) as scanner:
        await scanner.start()
        first, second = await scanner.assigned(2)
        assert (first.job_id, second.job_id) == (finished, running)
        await scanner.finish(
            first, vulnerabilities=[S.Vulnerability(id="CVE-2024-1", severity=S.SEVERITY_CRITICAL)]
        )
        await wait_for_status(handler.jobs, finished, S.JOB_STATUS_FINISHED)
        handler = await restart(handler, make_handler)

    done = await get(handler, finished)
    assert done.status == S.JOB_STATUS_FINISHED
    assert done.result.critical == 1
    assert [v.id for v in done.full_result.vulnerabilities] == ["CVE-2024-1"]
    assert (await get(handler, cancelled)).status == S.JOB_STATUS_CANCELLED
    # The run under way when the handler stopped counts, and the job is back at its place.
    back = await get(handler, running)
    assert back.status == S.JOB_STATUS_PENDING
    assert back.runs == 1
    assert back.error.code == "HNDL-007"
    assert "shutting down" in back.error.detail  # the stop ended the run (a crash: test_crash)
    assert back.queue_position == 1
    listed = await handler.jobs.ListJobs(
        job_service_pb2.ListJobsRequest(statuses=[S.JOB_STATUS_PENDING])
    )
    assert [j.id for j in listed.jobs] == [running, *waiting]
    assert [t.to_status for t in back.history][-1] == S.JOB_STATUS_PENDING
    # New jobs go after the old ones, and dedup still knows the recovered ones.
    again = await handler.jobs.SubmitJob(image(tag="w0"))
    assert again.duplicate
    assert again.job.id == waiting[0]
    async with RawScanner(handler.scanners, "s2") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        assert (job.job_id, job.run) == (running, 2)


async def test_snapshots_compact_the_journal_and_recovery_uses_both(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler(snapshot_journal_mb=0.002)  # a snapshot every ~2 KB
    ids = [(await handler.jobs.SubmitJob(image(tag=f"v{n}"))).job.id for n in range(60)]
    await handler.server.repository.snapshot()  # type: ignore[attr-defined]  # embedded
    for n in range(60, 70):  # these are only in the journal after the snapshot
        ids.append((await handler.jobs.SubmitJob(image(tag=f"v{n}"))).job.id)
    data_dir = handler.config.data_dir
    snapshots = sorted(p.name for p in data_dir.glob("snapshot-*.snap"))
    journals = sorted(p.name for p in data_dir.glob("journal-*.log"))
    assert len(snapshots) == 1
    assert len(journals) == 1  # the journals before the snapshot were dropped
    handler = await restart(handler, make_handler)
    listed = await handler.jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=1000))
    assert [j.id for j in listed.jobs] == ids
    assert [j.queue_position for j in listed.jobs] == list(range(1, 71))


async def test_a_torn_journal_tail_is_cut_and_nothing_acknowledged_is_lost(
    make_handler: MakeHandler, tmp_path: Path
) -> None:
    handler = await make_handler()
    ids = [(await handler.jobs.SubmitJob(image(tag=f"v{n}"))).job.id for n in range(5)]
    data_dir = crash_image(handler, tmp_path)
    journal = max(data_dir.glob("journal-*.log"))
    whole = journal.read_bytes()
    assert whole  # the acknowledged submits are in the journal, not only in memory
    # A crash in the middle of a write: a header that promises more than was written.
    journal.write_bytes(whole + b"\x40\x00\x00\x00\x12\x34\x56\x78\x01partial")
    recovered = await make_handler(data_dir=data_dir)
    listed = await recovered.jobs.ListJobs(job_service_pb2.ListJobsRequest())
    assert [j.id for j in listed.jobs] == ids
    assert journal.read_bytes() == whole


def crash_image(handler: Handler, into: Path) -> Path:
    """The data directory as a kill -9 would leave it: copied while the handler runs."""
    target = into / "crashed"
    shutil.copytree(handler.config.data_dir, target)
    return target


def middle_body_offset(data: bytes) -> int:
    """An offset inside the body of the journal's middle record."""
    starts = []
    offset = 0
    while offset < len(data):
        length: int = HEADER.unpack_from(data, offset)[0]
        starts.append((offset, length))
        offset += HEADER.size + length
    start, length = starts[len(starts) // 2]
    return start + HEADER.size + length // 2


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def test_a_damaged_journal_stops_the_start_unless_salvaged(
    make_handler: MakeHandler, tmp_path: Path
) -> None:
    handler = await make_handler()
    ids = [(await handler.jobs.SubmitJob(image(tag=f"v{n}"))).job.id for n in range(6)]
    data_dir = crash_image(handler, tmp_path)
    journal = max(data_dir.glob("journal-*.log"))
    # Inside the body of a record in the middle (not its header: a flipped length reads as
    # another kind of damage, and the test would depend on where the record boundaries fall).
    flip_byte(journal, middle_body_offset(journal.read_bytes()))
    with pytest.raises(StorageError) as raised:
        await make_handler(data_dir=data_dir)
    message = raised.value.message
    assert message.startswith(f"HNDL-007: journal {journal} at byte ")
    assert "corrupt record (checksum mismatch)" in message
    assert "--salvage" in message
    salvaged = await make_handler(data_dir=data_dir, salvage=True)
    listed = await salvaged.jobs.ListJobs(job_service_pb2.ListJobsRequest())
    kept = [j.id for j in listed.jobs]
    assert 0 < len(kept) < len(ids)
    assert all(job_id in ids for job_id in kept)


async def test_a_damaged_snapshot_stops_the_start_unless_salvaged(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    # Queued jobs are stored a hundred to a frame (columns): 100, 100 and 50 here.
    for n in range(250):
        await handler.jobs.SubmitJob(image(tag=f"v{n}"))
    data_dir = handler.config.data_dir
    await handler.server.stop(0)  # stopping writes a snapshot
    snapshot = max(data_dir.glob("snapshot-*.snap"))
    flip_byte(snapshot, snapshot.stat().st_size // 2)  # in the second frame
    with pytest.raises(StorageError) as raised:
        await make_handler(data_dir=data_dir)
    assert f"snapshot {snapshot} at byte" in raised.value.message
    salvaged = await make_handler(data_dir=data_dir, salvage=True)
    stats = await salvaged.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
    assert stats.pending == 150  # the damaged frame's jobs were lost, and only those


def test_an_unusable_data_directory_is_a_clear_error_at_start(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StorageError) as raised:
        HandlerServer(
            TEST_CONFIG.__class__(**{**TEST_CONFIG.__dict__, "data_dir": not_a_dir / "d"})
        )
    assert "cannot use the data directory" in raised.value.message
    assert "Not a directory" in raised.value.message


async def test_one_data_directory_serves_one_handler(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    with pytest.raises(StorageError) as raised:
        await make_handler(data_dir=handler.config.data_dir)
    assert "is in use by another image-handler" in raised.value.message


async def test_retention_prunes_old_finished_jobs_for_good(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    old = (await handler.jobs.SubmitJob(image(tag="old"))).job.id
    kept = (await handler.jobs.SubmitJob(image(tag="pending"))).job.id
    await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=old))
    jobs = handler.server.handler.jobs
    assert await jobs.prune(now_utc() + timedelta(days=89)) == 0
    assert await jobs.prune(now_utc() + timedelta(days=91)) == 1
    error = await remote_error(handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=old)))
    assert error.code == "HNDL-008"
    handler = await restart(handler, make_handler)
    error = await remote_error(handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=old)))
    assert error.code == "HNDL-008"
    assert (await get(handler, kept)).status == S.JOB_STATUS_PENDING


async def test_graceful_stop_lets_the_running_job_finish(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        stopping = asyncio.create_task(handler.server.stop(10))
        assert await scanner.expect("drain") is not None
        error = await remote_error(handler.jobs.SubmitJob(image(tag="late")))
        assert error.code == "HNDL-007"
        assert "shutting down" in error.message
        await scanner.finish(job)
        await stopping
    handler = await make_handler(data_dir=handler.config.data_dir)
    assert (await get(handler, job_id)).status == S.JOB_STATUS_FINISHED


FULL_DISK = Path("/tmp") / f"ih-full-{uuid.uuid4().hex[:8]}"


async def test_a_full_disk_fails_submits_cleanly_and_loses_nothing_acknowledged(
    make_handler: MakeHandler,
) -> None:
    FULL_DISK.mkdir()
    mounted = await asyncio.to_thread(
        subprocess.run,
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(FULL_DISK)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        FULL_DISK.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        handler = await make_handler(data_dir=FULL_DISK / "data", snapshot_journal_mb=1024)
        acknowledged: list[str] = []
        refusal = None
        for n in range(5000):
            big = image(tag=f"v{n}", labels={"pad": "x" * 200})
            try:
                acknowledged.append((await handler.jobs.SubmitJob(big)).job.id)
            except Exception as exc:
                refusal = exc
                break
        assert refusal is not None, "the disk never filled"
        after = image(tag="after", labels={"pad": "x" * 200})
        error = await remote_error(handler.jobs.SubmitJob(after))
        assert error.code == "HNDL-007"
        assert "No space left on device" in error.message
        stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
        assert stats.pending == len(acknowledged)  # the refused submits queued nothing
        await handler.server.stop(0)
        # Make room (as an operator would) and restart: every acknowledged job is there.
        await asyncio.to_thread(
            subprocess.run, ["mount", "-o", "remount,size=8m", str(FULL_DISK)], check=True
        )
        recovered = await make_handler(
            data_dir=FULL_DISK / "data", storage="journal", snapshot_journal_mb=1024
        )
        listed = await recovered.jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=1000))
        ids = [j.id for j in listed.jobs]
        while listed.next_page_token:
            listed = await recovered.jobs.ListJobs(
                job_service_pb2.ListJobsRequest(page_size=1000, page_token=listed.next_page_token)
            )
            ids += [j.id for j in listed.jobs]
        assert ids == acknowledged
        await recovered.server.stop(0)
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(FULL_DISK)], check=False)
        FULL_DISK.rmdir()


def test_sigterm_lets_the_running_job_finish_then_exits_0(tmp_path: Path) -> None:
    """Real processes: a handler, a scanner whose scans take 1.5 s, SIGTERM mid-scan."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    serve = [sys.executable, "-m", "server.cli", "serve", "--listen", address,
             "--data-dir", str(tmp_path / "data"), "--log-format", "json"]  # fmt: skip
    handler = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
    scanner = subprocess.Popen(
        [str(Path(sys.executable).parent / "image-scanner"), "--handler", address,
         "--engine", "noop", "--delay", "1.5", "--slots", "1", "--backoff-max", "0.5"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert handler.stderr is not None
    try:
        for line in handler.stderr:  # bounded by the test timeout
            if line.startswith("image-handler listening on"):
                break
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            jobs = job_service_pb2_grpc.JobServiceStub(channel)
            job_id = jobs.SubmitJob(image(), wait_for_ready=True, timeout=30).job.id
            watch = jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id), timeout=30)
            for event in watch:
                if event.job.status == S.JOB_STATUS_IN_PROGRESS:
                    break
            handler.send_signal(signal.SIGTERM)
            assert handler.wait(timeout=30) == 0
        events = [json.loads(line) for line in handler.stderr.read().splitlines()]
        stopped = next(e for e in events if e["event"] == "handler.stopped")
        assert stopped["drained"] is True
    finally:
        for process in (scanner, handler):
            if process.poll() is None:
                process.kill()
                process.wait()
        handler.stderr.close()
    # The job finished during the grace period, and the journal says so.
    restarted = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
    assert restarted.stderr is not None
    try:
        for line in restarted.stderr:
            if line.startswith("image-handler listening on"):
                break
        with grpc.insecure_channel(address) as channel:
            jobs = job_service_pb2_grpc.JobServiceStub(channel)
            request = job_service_pb2.GetJobRequest(job_id=job_id)
            job = jobs.GetJob(request, wait_for_ready=True, timeout=30).job
        assert job.status == S.JOB_STATUS_FINISHED
        assert job.runs == 1
    finally:
        restarted.kill()
        restarted.wait()
        restarted.stderr.close()


async def fill_data_dir(directory: Path, count: int) -> None:
    """A data directory holding ``count`` PENDING jobs (journal only, no snapshot)."""
    repository = EmbeddedRepository(directory, policy=FsyncPolicy.NEVER)
    await repository.open()
    for start in range(0, count, 5000):
        await repository.insert_many(
            [
                JobSpec(
                    ImageRef("docker.io", "library/app", f"v{n}"),
                    Trigger.SCHEDULED,
                    (Policy.MALWARE,),
                    600.0,
                    Lane.BULK,
                )
                for n in range(start, min(count, start + 5000))
            ],
            at=now_utc(),
        )
    await repository.store.close()  # no snapshot: the journal alone


def test_readiness_is_not_serving_until_recovery_ends(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    asyncio.run(fill_data_dir(data_dir, 40_000))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    handler = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--listen", address,
         "--data-dir", str(data_dir), "--log-format", "json"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert handler.stderr is not None
    try:
        for line in handler.stderr:  # the port is open (and logged) before recovery starts
            if '"handler.started"' in line:
                break
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            jobs = job_service_pb2_grpc.JobServiceStub(channel)
            first = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert first == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as raised:
                jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest(), timeout=10)
            error: Any = raised.value  # also a grpc.Call
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "recovering" in error.details()
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
            for reply in watch:  # ends when it goes SERVING (bounded by the timeout)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            stats = jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest(), timeout=10)
            assert stats.pending == 40_000
    finally:
        handler.kill()
        handler.wait()
        handler.stderr.close()


async def test_a_read_only_data_directory_is_a_clear_error_at_start(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    mounted = await asyncio.to_thread(
        subprocess.run, ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)],
        capture_output=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(StorageError) as raised:
            HandlerServer(replace(TEST_CONFIG, data_dir=target))
        assert f"cannot use the data directory {target}: Read-only file system" in (
            raised.value.message
        )
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(target)], check=False)


def now_utc() -> datetime:
    return datetime.now(UTC)
