"""Scan once, match many, end to end: a real handler with a receiving server, a builtin scanner
on a database directory that is updated while it runs, and an image in a real
``docker-registry`` that logs every request.

- A submit of a scanned digest finishes at once with the stored result (``reused_from``), with
  no registry traffic; ``fresh`` scans again.
- A database update makes the handler rematch the stored SBOM: no registry traffic, and the
  receiving server gets the rematch's result with exactly the change (the new advisories).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2
from scanner_client import ScannerClient
from scanner_client.db import DEFAULT_DIR
from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
from scanner_client.vulndb import update as vulndb_update
from tests.conftest import TEST_SCANNER_POLICY, MakeHandler
from tests.engine.test_engine_e2e import client_config, running, submit, until_status
from tests.oci import Image, Layout, LocalRegistry, directory, file, layer, tools_missing
from tests.receiver import ReceiverServer
from tests.vulnfeeds import DEBIAN_FIXES, DPKG_STATUS, debian_record, debian_zip

DEADLINE = 30.0
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


@dataclass
class Pushed:
    registry: LocalRegistry
    digest: str

    def image(self) -> common_pb2.ScanObject:
        return common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry=self.registry.address, repository="rematch/deb", digest=self.digest
            )
        )

    def requests(self) -> int:
        """Requests the registry has answered so far (its access log)."""
        log = (self.registry.workdir / "registry.log").read_text(errors="replace")
        return sum(1 for line in log.splitlines() if '"GET /v2/' in line or '"HEAD /v2/' in line)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    missing = tools_missing()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: `apt-get install docker-registry skopeo`")
    work = tmp_path_factory.mktemp("rematch")
    registry = LocalRegistry(work / "registry", access_log=True)
    try:
        layout = Layout(work / "layout")
        image = Image(
            [
                layer(
                    [
                        directory("etc"),
                        file("etc/os-release", OS_RELEASE),
                        file("var/lib/dpkg/status", DPKG_STATUS),
                    ]
                )
            ],
            user="1000",
        )
        layout.add("deb", image)
        yield Pushed(registry, registry.push(layout.path, "deb", "rematch/deb"))
    finally:
        registry.stop()


async def job(handler: Any, job_id: str) -> common_pb2.Job:
    response = await handler.jobs.GetJob(
        job_service_pb2.GetJobRequest(job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL)
    )
    return response.job  # type: ignore[no-any-return]


async def finished(handler: Any, job_id: str) -> common_pb2.Job:
    done = await until_status(handler, job_id)
    assert done.status == common_pb2.JOB_STATUS_FINISHED, done.error
    return await job(handler, job_id)


async def rematch_delivered(receiver: ReceiverServer) -> dict[str, Any]:
    """The first result the receiving server took with a findings change (deadline)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            for _, body, _ in receiver.results():
                if "findings_change" in body:
                    return body
            await asyncio.sleep(0.02)  # the receiver is another thread's record: poll it


def vulnerability_ids(result: common_pb2.ScanResult) -> set[str]:
    return {v.id for v in result.vulnerabilities}


async def test_reuse_by_digest_and_rematch_on_a_database_update(
    make_handler: MakeHandler,
    receiver: ReceiverServer,
    secret_file: Path,
    pushed: Pushed,
    tmp_path: Path,
) -> None:
    handler = await make_handler(
        receiver_url=receiver.url,
        receiver_secret_file=str(secret_file),
        reuse_window=3600.0,
    )
    db_dir = tmp_path / "db"
    shutil.copytree(DEFAULT_DIR, db_dir, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    engine = BuiltinEngine(
        BuiltinSettings(db_dir=db_dir, policy=TEST_SCANNER_POLICY, db_poll_interval=0.05)
    )
    async with running(ScannerClient(handler.address, engine, client_config("rematcher"))):
        first = await finished(handler, await submit(handler, pushed.image()))
        # The packaged database has no Debian advisories.
        assert not vulnerability_ids(first.full_result)
        assert first.full_result.sbom

        # The same digest and policies again: the stored result, unscanned.
        before = pushed.requests()
        answer = await handler.jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(object=pushed.image())
        )
        assert answer.job.reused_from == first.id
        assert answer.job.status != common_pb2.JOB_STATUS_PENDING
        reused = await finished(handler, answer.job.id)
        assert reused.reused_from == first.id
        assert reused.runs == 0
        assert reused.full_result.sbom == first.full_result.sbom
        assert pushed.requests() == before
        # A fresh scan asks the registry again.
        fresh = await finished(handler, await submit(handler, pushed.image(), fresh=True))
        assert not fresh.reused_from
        assert fresh.runs == 1
        assert pushed.requests() > before

        # The scanner's database is updated (as `image-scanner db update` does): the handler
        # rematches the latest stored SBOM, and the registry hears nothing.
        before = pushed.requests()
        # High advisories: the verdict changes.
        records = [
            {**debian_record(*fix), "database_specific": {"severity": "HIGH"}}
            for fix in DEBIAN_FIXES
        ]
        feed = debian_zip(tmp_path / "Debian" / "all.zip", records)
        await asyncio.to_thread(vulndb_update.update, db_dir, [str(feed)])
        delivered = await rematch_delivered(receiver)
        assert pushed.requests() == before
        rematch = await finished(handler, delivered["job"]["id"])
        assert rematch.trigger == common_pb2.TRIGGER_REMATCH
        assert rematch.lane == common_pb2.LANE_BULK
        assert rematch.rematch_of == fresh.id

        # Exactly the change a full rescan with the new database shows.
        rescan = await finished(handler, await submit(handler, pushed.image(), fresh=True))
        expected = vulnerability_ids(rescan.full_result)
        assert expected == {"CVE-2023-4911", "CVE-2023-38545"}
        assert vulnerability_ids(rematch.full_result) == expected
        change = delivered["findings_change"]
        assert sorted(change["new_ids"]) == sorted(expected)
        assert change["new"] == len(expected)
        assert change.get("fixed", 0) == 0
        assert change.get("unchanged", 0) == 0
        assert change["previous_job_id"] == fresh.id
        assert change["object"]["image"]["digest"] == pushed.digest
        assert change["verdict_changed"] is True
        assert change["verdict"] == "VERDICT_FAILED"
        assert change.get("previous_verdict", "VERDICT_PASSED") == "VERDICT_PASSED"
        assert delivered["verdict_change"]["verdict"] == "VERDICT_FAILED"
        assert fresh.id in delivered["verdict_change"]["cause"]

        # Asked again: everything is matched against the newest database already.
        response = await handler.jobs.RematchJobs(job_service_pb2.RematchJobsRequest())
        assert (response.queued, response.skipped) == (0, 1)
