"""A scanner whose own environment is broken stops instead of burning every job's runs.

At start, ``image-scanner --engine builtin`` checks its scratch directory and exits 2 with a
message naming the flag. While running, an engine raises ``ScannerBroken``: the client hands the
job back (a retryable failure), drains, and exits 3 once its running jobs end; a healthy scanner
then scans the jobs. The handler runs in the test's loop; the scanners run as real
``image-scanner`` processes where the test is about the command.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2
from scanner_client import (
    ClientConfig,
    Database,
    Engine,
    Job,
    NoopEngine,
    NullProgress,
    ProgressReporter,
    ScannerBroken,
    ScannerClient,
)
from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
from scanner_client.engines.command import CommandEngine
from tests.conftest import TEST_SCANNER_POLICY, Handler, MakeHandler
from tests.helpers import Watcher
from tests.integration.test_scanner_client_protocol import (
    WAIT,
    Child,
    Spawn,
    get_job,
    scanners,
    spawn,
)
from tests.paths import ROOT

__all__ = ["spawn"]  # the fixture, imported for this module's tests

FINISHED = common_pb2.JOB_STATUS_FINISHED
ERROR = common_pb2.JOB_STATUS_ERROR
IN_PROGRESS = common_pb2.JOB_STATUS_IN_PROGRESS


def scanner_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scanner_client.cli", "--engine", "builtin",
         "--handler", "127.0.0.1:1", "--log-format", "json", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("scratch", "extra", "names"),
    [
        ("file/sub", (), "cannot be created: Not a directory"),
        ("file", (), "is not a directory"),
        ("roomy", ("--min-free-scratch", "100000000"), "less than --min-free-scratch 100000000"),
    ],
)
def test_a_scratch_dir_scans_cannot_use_stops_the_scanner_at_start(
    tmp_path: Path, scratch: str, extra: tuple[str, ...], names: str
) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    directory = tmp_path / scratch
    done = scanner_command("--scratch-dir", str(directory), *extra)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"image-scanner: --scratch-dir {directory} ")
    assert names in done.stderr


def test_the_command_engine_without_a_temporary_directory_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    job = Job("j", 1, sbom_job(0).object)
    with pytest.raises(ScannerBroken, match=r"cannot make a scan directory in .*/gone"):
        asyncio.run(CommandEngine("true").scan(job, NullProgress()))


def test_a_missing_scratch_dir_is_created(tmp_path: Path) -> None:
    scratch = tmp_path / "not" / "yet"
    engine = BuiltinEngine(BuiltinSettings(scratch_dir=scratch, policy=TEST_SCANNER_POLICY))
    assert engine.scratch_root == scratch
    assert scratch.is_dir()


class BreakingEngine(Engine):
    """Every scan finds the scanner broken (after all ``slots`` scans have started)."""

    name = "breaking"

    def __init__(self, together: int) -> None:
        self.together = together
        self.started = 0
        self.all_started = asyncio.Event()

    def databases(self) -> Sequence[Database]:
        return NoopEngine().databases()

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        self.started += 1
        if self.started >= self.together:
            self.all_started.set()
        await self.all_started.wait()
        raise ScannerBroken("--scratch-dir /scratch does not exist (test)")


def sbom_job(n: int) -> job_service_pb2.SubmitJobRequest:
    sbom = {"bomFormat": "CycloneDX", "specVersion": "1.5", "components": []}
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(
            artifact=common_pb2.ArtifactObject(
                pipeline="p", job=f"j{n}", sbom=json.dumps(sbom).encode()
            )
        )
    )


async def finish_all(
    handler: Handler, watcher: Watcher, job_ids: set[str]
) -> dict[str, common_pb2.Job]:
    """Each job once it is done, with its history: waited for on a watch of every job opened
    before they were submitted, then read in full."""
    done: set[str] = set()
    async with asyncio.timeout(WAIT):
        while done != job_ids:
            job = (await watcher.next()).job
            if job.id in job_ids and job.status in (FINISHED, ERROR):
                done.add(job.id)
    return {job_id: await get_job(handler.jobs, job_id) for job_id in job_ids}


def runs_on(job: common_pb2.Job, scanner_id: str) -> int:
    return sum(1 for t in job.history if t.to_status == IN_PROGRESS and t.scanner_id == scanner_id)


async def test_a_broken_engine_hands_its_jobs_back_and_the_client_exits_with_why(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    slots = 2
    watcher = await Watcher(handler.jobs).subscribed()
    try:
        ids = {(await handler.jobs.SubmitJob(sbom_job(n))).job.id for n in range(5)}
        engine = BreakingEngine(together=slots)
        broken = ScannerClient(
            handler.address, engine, ClientConfig(scanner_id="broken", slots=slots)
        )
        with pytest.raises(ScannerBroken, match="does not exist"):
            async with asyncio.timeout(WAIT):
                await broken.run()
        # It took its slots' worth of jobs once, handed them back, and took nothing more.
        assert engine.started == slots
        assert broken.stats.jobs_failed == slots
        listed = (await scanners(handler.scanners))["broken"]
        assert not listed.connected
        assert listed.jobs_failed == slots
        healthy = ScannerClient(handler.address, NoopEngine(), ClientConfig(scanner_id="healthy"))
        task = asyncio.create_task(healthy.run())
        try:
            done = await finish_all(handler, watcher, ids)
        finally:
            await healthy.stop()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await watcher.close()
    assert {job.status for job in done.values()} == {FINISHED}
    assert sum(runs_on(job, "broken") for job in done.values()) == slots
    handed_back = [job for job in done.values() if runs_on(job, "broken")]
    for job in handed_back:
        assert job.runs == 2
        failure = next(t for t in job.history if t.scanner_id == "broken" and t.error.code)
        assert failure.error.code == "HNDL-007"
        assert "scanner broken cannot work, the job goes back to the queue" in (
            failure.error.message
        )


async def test_a_scanner_whose_scratch_dir_vanishes_stops_and_its_job_is_scanned_elsewhere(
    make_handler: MakeHandler, spawn: Spawn, tmp_path: Path
) -> None:
    """Real ``image-scanner --engine builtin`` processes: the first one's scratch directory is
    removed while it waits for work; it takes one job, hands it back, and exits 3 saying why;
    a healthy one scans everything, and no job ends ERROR."""
    handler = await make_handler()
    scratch = tmp_path / "scratch"

    async def scanner(scanner_id: str, directory: Path) -> Child:
        child = await spawn(
            "-m", "scanner_client.cli", "--engine", "builtin", "--slots", "1",
            "--scratch-dir", str(directory), "--handler", handler.address,
            "--scanner-id", scanner_id, "--log-format", "json",
        )  # fmt: skip
        await child.event("registered")
        return child

    first = await scanner("fragile", scratch)
    shutil.rmtree(scratch)
    watcher = await Watcher(handler.jobs).subscribed()
    try:
        ids = {(await handler.jobs.SubmitJob(sbom_job(n))).job.id for n in range(3)}
        assert await first.exited() == 3, first.stderr
        last = first.lines[-1]
        assert last.startswith(f"image-scanner: the scanner cannot work: --scratch-dir {scratch}")
        assert "does not exist" in last
        await scanner("healthy", tmp_path / "healthy")
        done = await finish_all(handler, watcher, ids)
    finally:
        await watcher.close()
    assert {job.status for job in done.values()} == {FINISHED}
    assert sum(runs_on(job, "fragile") for job in done.values()) == 1
    assert all(job.scanner_id == "healthy" for job in done.values())
