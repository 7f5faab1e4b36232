"""Live database updates through real processes: a real handler, an ``image-scanner``
subprocess with the builtin engine, ``image-scanner db update`` run beside it, and the
handler's view of the scanner's databases.

Every wait is on a message, a log line or a listed state, with a deadline.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from scanner_client.db import DEFAULT_DIR
from scanner_client.vulndb import update as vulndb_update
from scanner_client.vulndb.store import VulnStore
from tests.conftest import TEST_SCANNER_FLAGS, Handler, MakeHandler
from tests.engine.test_vulndb import served  # noqa: F401 (fixture)
from tests.helpers import RawScanner
from tests.integration.test_scanner_client_protocol import Child, Spawn, spawn  # noqa: F401 (fixture)
from tests.vulnfeeds import DPKG_STATUS, debian_zip

DEADLINE = 30.0
PACKAGED_VERSION = VulnStore(DEFAULT_DIR / "vulnerabilities.db").version


def dbv(name: str, version: str, released_at: str) -> common_pb2.DatabaseVersion:
    return common_pb2.DatabaseVersion(name=name, version=version, released_at=released_at)


async def listed(handler: Handler, scanner_id: str) -> scanner_service_pb2.ScannerInfo | None:
    response = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
    return next((s for s in response.scanners if s.scanner_id == scanner_id), None)


async def until_listed(
    handler: Handler,
    scanner_id: str,
    check: Callable[[scanner_service_pb2.ScannerInfo], bool],
) -> scanner_service_pb2.ScannerInfo:
    """Poll ListScanners (a state to read, not an event to watch) until ``check`` holds."""
    async with asyncio.timeout(DEADLINE):
        while True:
            info = await listed(handler, scanner_id)
            if info is not None and info.connected and check(info):
                return info
            await asyncio.sleep(0.05)


def vulnerability_version(info: scanner_service_pb2.ScannerInfo) -> str:
    return next(d.version for d in info.databases if d.name == "vulnerabilities")


async def test_the_handler_takes_new_database_versions_and_refuses_bad_ones(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    async with RawScanner(handler.scanners, "raw") as scanner:
        await scanner.start()
        await scanner.send(
            databases=scanner_service_pb2.DatabasesChanged(
                databases=[dbv("vulnerabilities", "2", "2026-11-30T00:00:00Z")]
            )
        )
        info = await until_listed(handler, "raw", lambda i: vulnerability_version(i) == "2")
        assert [(d.name, d.released_at) for d in info.databases] == [
            ("vulnerabilities", "2026-11-30T00:00:00Z")
        ]
        for databases, code in (
            ([dbv("vulnerabilities", "3", "last tuesday")], "HNDL-013"),
            ([dbv("vulnerabilities", "3", "")], "HNDL-012"),
            ([], "HNDL-012"),
        ):
            await scanner.send(databases=scanner_service_pb2.DatabasesChanged(databases=databases))
            rejected = await scanner.expect("rejected")
            assert rejected.error.code == code
            # The stream goes on and the handler keeps the last good list.
            now = await listed(handler, "raw")
            assert now is not None
            assert now.connected
            assert vulnerability_version(now) == "2"


@pytest.fixture
def root_with_bookworm_packages(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (root / "var" / "lib" / "dpkg").mkdir(parents=True)
    (root / "var" / "lib" / "dpkg" / "status").write_text(DPKG_STATUS)
    return root


async def scan_path(handler: Handler, path: Path) -> common_pb2.ScanResult:
    submitted = await handler.jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(
            object=common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(path))),
            policies=[common_pb2.POLICY_VULNERABILITIES],
        )
    )
    job_id = submitted.job.id
    async with asyncio.timeout(DEADLINE):
        async for event in handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id)):
            if event.job.status in (common_pb2.JOB_STATUS_FINISHED, common_pb2.JOB_STATUS_ERROR):
                assert event.job.status == common_pb2.JOB_STATUS_FINISHED, event.job.error
                break
    response = await handler.jobs.GetJobResult(job_service_pb2.GetJobResultRequest(job_id=job_id))
    return response.result


def used_version(result: common_pb2.ScanResult) -> str:
    return next(d.version for d in result.databases if d.name == "vulnerabilities")


async def db_update(spawn: Spawn, db_dir: Path, *origins: str) -> Child:  # noqa: F811
    argv = ["-m", "scanner_client.cli", "db", "update", "--db-dir", str(db_dir)]
    for origin in origins:
        argv += ["--from", origin]
    child = await spawn(*argv)
    await child.exited()
    return child


async def test_a_running_scanner_takes_an_update_between_jobs(
    make_handler: MakeHandler,
    spawn: Spawn,  # noqa: F811
    tmp_path: Path,
    root_with_bookworm_packages: Path,
) -> None:
    handler = await make_handler()
    db_dir = tmp_path / "db"
    vulndb_update.seed(db_dir)
    scanner = await spawn(
        "-m", "scanner_client.cli", "--handler", handler.address, "--engine", "builtin",
        "--db-dir", str(db_dir), "--scanner-id", "live", "--log-format", "json",
        *TEST_SCANNER_FLAGS,
    )  # fmt: skip
    await until_listed(handler, "live", lambda i: vulnerability_version(i) == PACKAGED_VERSION)

    before = await scan_path(handler, root_with_bookworm_packages)
    assert not before.vulnerabilities
    assert [(n.subject, n.packages) for n in before.notes] == [("Debian:12", 3)]
    assert used_version(before) == PACKAGED_VERSION

    feed = debian_zip(tmp_path / "Debian" / "all.zip")
    updated = await db_update(spawn, db_dir, str(feed))
    assert updated.process.returncode == 0, updated.stderr
    new_version = VulnStore(db_dir / "vulnerabilities.db").version
    assert new_version != PACKAGED_VERSION

    # The next job uses the new database, and the handler lists its version.
    after = await scan_path(handler, root_with_bookworm_packages)
    assert used_version(after) == new_version
    assert {(v.id, v.package, v.fixed_version) for v in after.vulnerabilities} == {
        ("CVE-2023-4911", "libc6", "2.36-9+deb12u3"),
        ("CVE-2023-38545", "curl", "7.88.1-10+deb12u4"),
    }
    assert not after.notes
    info = await until_listed(handler, "live", lambda i: vulnerability_version(i) == new_version)
    assert ("vulnerabilities/Debian-all", "2024-07-10T12:00:00Z") in [
        (d.name, d.released_at) for d in info.databases
    ]
    await scanner.event("vulnerability database updated", version=new_version)

    # A truncated feed: the update fails, says why, and changes nothing.
    truncated = tmp_path / "short.zip"
    truncated.write_bytes(feed.read_bytes()[:300])
    failed = await db_update(spawn, db_dir, str(truncated))
    assert failed.process.returncode == 1
    assert "not a readable zip archive" in failed.stderr
    assert f"is unchanged (version {new_version}" in failed.stderr
    assert used_version(await scan_path(handler, root_with_bookworm_packages)) == new_version

    # A damaged file put in place by hand (not by db update): refused, the old one stays.
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes((db_dir / "vulnerabilities.db").read_bytes()[:8192])
    os.replace(damaged, db_dir / "vulnerabilities.db")
    kept = await scan_path(handler, root_with_bookworm_packages)
    assert used_version(kept) == new_version
    assert {v.id for v in kept.vulnerabilities} == {"CVE-2023-4911", "CVE-2023-38545"}
    refused = await scanner.event("vulnerability database not taken into use; the old one stays")
    assert "truncated or damaged" in refused["error"]
    last = await listed(handler, "live")
    assert last is not None
    assert vulnerability_version(last) == new_version


async def test_periodic_update_from_a_url(
    make_handler: MakeHandler,
    spawn: Spawn,  # noqa: F811
    tmp_path: Path,
    served: str,  # noqa: F811
) -> None:
    handler = await make_handler()
    debian_zip(tmp_path / "www" / "Debian" / "all.zip")
    working = tmp_path / "volume"  # empty: seeded from the packaged databases first
    failing = tmp_path / "volume-2"
    scanners: list[Child] = []
    for scanner_id, directory, url in (
        ("periodic", working, f"{served}/Debian/all.zip"),
        ("periodic-404", failing, f"{served}/missing.zip"),
    ):
        scanners.append(
            await spawn(
                "-m",
                "scanner_client.cli",
                "--handler",
                handler.address,
                "--engine",
                "builtin",
                "--db-dir",
                str(directory),
                "--db-update-url",
                url,
                "--db-update-interval",
                "1h",
                "--scanner-id",
                scanner_id,
                "--log-format",
                "json",
            )
        )
    info = await until_listed(
        handler,
        "periodic",
        lambda i: "vulnerabilities/Debian-all" in {d.name for d in i.databases},
    )
    assert vulnerability_version(info) == VulnStore(working / "vulnerabilities.db").version
    assert (working / "malware.yar").exists()
    # The failing one says why and keeps serving with the database it has.
    event = await scanners[1].event("vulnerability database update failed; the old one stays")
    assert "answered HTTP 404" in event["error"]
    info404 = await until_listed(handler, "periodic-404", lambda i: True)
    assert vulnerability_version(info404) == PACKAGED_VERSION
