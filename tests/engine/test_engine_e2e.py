"""The scanning engines end to end: real images built here, pushed with ``skopeo`` into a real
``docker-registry`` on 127.0.0.1, scanned by a ScannerClient (or an ``image-scanner``
subprocess) for a real handler, results read back with GetJobResult.

Every wait is on an event or a watched status, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2
from scanner_client import ClientConfig, Database, ScannerClient
from scanner_client.engine import Engine
from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
from scanner_client.engines.command import CommandEngine
from tests.conftest import TEST_SCANNER_FLAGS, TEST_SCANNER_POLICY, MakeHandler
from tests.helpers import remote_error
from tests.oci import (
    EICAR,
    Image,
    Layout,
    LocalRegistry,
    TokenService,
    directory,
    file,
    hardlink,
    layer,
    symlink,
    tools_missing,
)
from tests.paths import ROOT
from tests.vulnfeeds import DPKG_STATUS, debian_database

DEADLINE = 20.0
DONE = frozenset(
    {common_pb2.JOB_STATUS_FINISHED, common_pb2.JOB_STATUS_ERROR, common_pb2.JOB_STATUS_CANCELLED}
)

OS_RELEASE_DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
OS_RELEASE_ALPINE = 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.11.6\n'
# Alpine 3.11: openssl 1.1.1d-r2 is affected by CVE-2019-1551 in v3.11's secdb (fixed in -r3).
APK_INSTALLED = """\
C:Q1abc=
P:musl
V:1.1.24-r2
A:x86_64
o:musl

P:busybox
V:1.31.1-r9
A:x86_64
o:busybox

P:libcrypto1.1
V:1.1.1d-r2
A:x86_64
o:openssl

P:libssl1.1
V:1.1.1d-r2
A:x86_64
o:openssl
"""


def metadata(name: str, version: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: test\n"


def real_ssh_key() -> str:
    """A freshly made OpenSSH private key: what the secret rules must find."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def npm(name: str, version: str) -> str:
    return json.dumps({"name": name, "version": version, "license": "MIT"})


@dataclass(frozen=True)
class Pushed:
    repository: str
    tag: str
    layers: list[str]

    def object(self, registry: str, **image: Any) -> common_pb2.ScanObject:
        return common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry=registry, repository=self.repository, tag=self.tag, **image
            )
        )


@dataclass
class Images:
    registry: LocalRegistry
    layout: Path
    host_dir: Path
    pushed: dict[str, Pushed]


def _build(layout: Layout, host_dir: Path) -> dict[str, Image]:
    site = "usr/lib/python3/dist-packages"
    venv = "opt/venv/lib/python3.11/site-packages"
    debian = Image(
        [
            layer(
                [
                    directory("etc"),
                    file("etc/os-release", OS_RELEASE_DEBIAN),
                    file("var/lib/dpkg/status", DPKG_STATUS),
                ]
            ),
            layer(
                [
                    file(f"{site}/urllib3-2.0.5.dist-info/METADATA", metadata("urllib3", "2.0.5")),
                    file(
                        f"{site}/requests-2.19.0.dist-info/METADATA", metadata("requests", "2.19.0")
                    ),
                    file(
                        f"{venv}/requests-2.20.0.dist-info/METADATA", metadata("requests", "2.20.0")
                    ),
                    file("app/node_modules/lodash/package.json", npm("lodash", "4.17.15")),
                    file("app/node_modules/minimist/package.json", npm("minimist", "1.2.6")),
                    file("app/package.json", npm("app", "1.0.0")),
                ]
            ),
        ],
        user="1000",
    )
    alpine = Image(
        [
            layer(
                [
                    file("etc/os-release", OS_RELEASE_ALPINE),
                    file("etc/alpine-release", "3.20.3\n"),
                    file("lib/apk/db/installed", APK_INSTALLED),
                ]
            )
        ]
    )
    alpine_fixed = Image(
        [
            layer(
                [
                    file("etc/os-release", OS_RELEASE_ALPINE),
                    file("lib/apk/db/installed", APK_INSTALLED.replace("1.1.1d-r2", "1.1.1d-r3")),
                ]
            )
        ]
    )
    eicar = Image(
        [
            layer([file("etc/os-release", OS_RELEASE_DEBIAN), file("bin/sh", b"\x7fELF", 0o755)]),
            layer(
                [
                    file("opt/tools/eicar.com", EICAR),
                    file("root/.ssh/id_rsa", real_ssh_key()),
                    file(
                        "srv/app/config.ini",
                        "[aws]\nregion = eu-west-1\nkey = AKIA" + "Q3EGRJ5NZT7WXK2D\n",
                    ),
                    # Not secrets: AWS's documentation key, a PEM placeholder in a string
                    # literal (as npm's own sources have), a TLS library's PEM constants.
                    file("srv/docs/aws.md", "Example: `AKIAIOSFODNN7EXAMPLE`\n"),
                    file(
                        "usr/lib/node_modules/npm/lib/definitions.js",
                        'key="-----BEGIN PRIVATE KEY-----\\nXXXX\\nXXXX\\n-----END PRIVATE KEY-----"\n',
                    ),
                    file(
                        "usr/lib/libtls.so.1",
                        b"\x7fELF\x02\x01\x01" + b"\x00" * 64 + real_ssh_key().encode(),
                    ),
                ]
            ),
        ],
        env=["PATH=/usr/bin", "GITHUB_TOKEN=ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"],
    )
    whiteout = Image(
        [
            layer(
                [
                    file("tmp/eicar.com", EICAR),
                    file(
                        f"opt/app/{site}/urllib3-2.0.5.dist-info/METADATA",
                        metadata("urllib3", "2.0.5"),
                    ),
                    file("opt/app/old.txt", "old"),
                ]
            ),
            layer(
                [
                    file("tmp/.wh.eicar.com", ""),
                    file("opt/app/.wh..wh..opq", ""),
                    file(
                        f"opt/app/{site}/requests-2.30.0.dist-info/METADATA",
                        metadata("requests", "2.30.0"),
                    ),
                ]
            ),
        ]
    )
    hostile_status = host_dir / "status"
    hostile = Image(
        [
            layer(
                [
                    file("etc/os-release", OS_RELEASE_DEBIAN),
                    # Climbs out of the root: not written, reported.
                    file(
                        "../../../../../../../../" + str(host_dir / "escaped.txt").lstrip("/"), "x"
                    ),
                    # An absolute link to the host directory, then a file through it.
                    symlink("evil", str(host_dir)),
                    file("evil/through-absolute-link.txt", "x"),
                    # A relative link that climbs far up, then a file through it.
                    symlink("up", "../" * 20 + str(host_dir).lstrip("/")),
                    file("up/through-relative-link.txt", "x"),
                    # The dpkg database is a link to a host file that lists a vulnerable package.
                    directory("var/lib/dpkg"),
                    symlink("var/lib/dpkg/status", str(hostile_status)),
                    # A hard link to a host file.
                    hardlink("etc/passwd-copy", "../../../../etc/passwd"),
                ]
            ),
            # A later layer writes through the link the first one left.
            layer([file("evil/second-layer.txt", "x"), file("up/.wh.status", "")]),
        ]
    )
    images = {
        "debian": debian,
        "alpine": alpine,
        "alpine-fixed": alpine_fixed,
        "eicar": eicar,
        "whiteout": whiteout,
        "hostile": hostile,
    }
    for name, image in images.items():
        if name == "debian":
            # An index: the arm64 image differs, the scanner must pick linux/amd64.
            arm = Image([layer([file("etc/os-release", OS_RELEASE_DEBIAN)])], architecture="arm64")
            layout.add(name, arm, image)
        else:
            layout.add(name, image)
    return images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    missing = tools_missing()
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: run `make test` (it installs docker-registry "
            "and skopeo with apt-get) or `apt-get install docker-registry skopeo`"
        )
    work = tmp_path_factory.mktemp("registry")
    host_dir = tmp_path_factory.mktemp("host")
    (host_dir / "status").write_text(
        "Package: libc6\nStatus: install ok installed\nSource: glibc\nVersion: 2.36-9+deb12u1\n"
    )
    registry = LocalRegistry(work / "registry")
    try:
        layout = Layout(work / "layout")
        built = _build(layout, host_dir)
        pushed = {}
        for name, image in built.items():
            registry.push(layout.path, name, f"test/{name}", all_images=name == "debian")
            pushed[name] = Pushed(f"test/{name}", name, [lay.digest for lay in image.layers])
        yield Images(registry, layout.path, host_dir, pushed)
    finally:
        registry.stop()


def client_config(scanner_id: str, **overrides: Any) -> ClientConfig:
    values: dict[str, Any] = {"slots": 4, "backoff_initial": 0.01, "backoff_max": 0.1}
    return ClientConfig(scanner_id=scanner_id, **{**values, **overrides})


@contextlib.asynccontextmanager
async def running(client: ScannerClient) -> AsyncIterator[ScannerClient]:
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(DEADLINE):
            await client.registered.wait()
        yield client
    finally:
        async with asyncio.timeout(DEADLINE):
            await client.stop()
            await asyncio.gather(task, return_exceptions=True)


async def submit(handler: Any, obj: common_pb2.ScanObject, **fields: Any) -> str:
    response = await handler.jobs.SubmitJob(job_service_pb2.SubmitJobRequest(object=obj, **fields))
    return str(response.job.id)


async def until_status(
    handler: Any, job_id: str, statuses: frozenset[int] = DONE
) -> common_pb2.Job:
    call = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id))
    try:
        async with asyncio.timeout(DEADLINE):
            async for event in call:
                if event.job.status in statuses:
                    return event.job  # type: ignore[no-any-return]
    finally:
        call.cancel()
    raise AssertionError(f"the watch of {job_id} ended first")


async def scan(handler: Any, obj: common_pb2.ScanObject, **fields: Any) -> common_pb2.ScanResult:
    """Submit, wait for FINISHED, and read the full result."""
    job_id = await submit(handler, obj, **fields)
    job = await until_status(handler, job_id)
    assert job.status == common_pb2.JOB_STATUS_FINISHED, job.error
    response = await handler.jobs.GetJobResult(job_service_pb2.GetJobResultRequest(job_id=job_id))
    return response.result  # type: ignore[no-any-return]


def vulns(result: common_pb2.ScanResult) -> set[tuple[str, str, str, str]]:
    return {(v.id, v.package, v.installed_version, v.fixed_version) for v in result.vulnerabilities}


def builtin(**settings: Any) -> BuiltinEngine:
    settings.setdefault("policy", TEST_SCANNER_POLICY)
    return BuiltinEngine(BuiltinSettings(**settings))


# ---- findings -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A databases directory updated with a Debian feed (osv.dev's form) and the packaged
    feeds, as `image-scanner db update` makes it."""
    return debian_database(tmp_path_factory.mktemp("debian-db"))


async def test_vulnerable_packages_give_their_real_advisories(
    make_handler: MakeHandler, images: Images, debian_db: Path
) -> None:
    handler = await make_handler()
    registry = images.registry.address
    async with running(ScannerClient(handler.address, builtin(), client_config("vulns"))):
        debian, alpine, alpine_fixed = await asyncio.gather(
            scan(handler, images.pushed["debian"].object(registry)),
            scan(handler, images.pushed["alpine"].object(registry)),
            scan(handler, images.pushed["alpine-fixed"].object(registry)),
        )
    # The packaged database: PyPA, Node.js WG, Alpine secdb v3.3-v3.11.
    assert vulns(debian) == {
        # PYSEC-2018-28 with its aliases: one finding, the CVE as its id.
        ("CVE-2018-18074", "requests", "2.19.0", "2.20.0"),
        ("CVE-2023-32681", "requests", "2.19.0", "2.31.0"),
        ("CVE-2023-32681", "requests", "2.20.0", "2.31.0"),
        # 2.0.5 is in the second range (2.0.0 <= v < 2.0.6) of PYSEC-2023-192.
        ("CVE-2023-43804", "urllib3", "2.0.5", "2.0.6"),
        ("CVE-2023-45803", "urllib3", "2.0.5", "2.0.7"),
        ("NSWG-ECO-516", "lodash", "4.17.15", "4.17.19"),
    }
    by_id = {(v.id, v.installed_version): v for v in debian.vulnerabilities}
    assert by_id[("CVE-2018-18074", "2.19.0")].aliases == ["GHSA-x84v-xcm2-53pg", "PYSEC-2018-28"]
    # CVE-2023-43804 carries a CVSS 3.1 vector of 8.1: HIGH, so the image fails.
    assert by_id[("CVE-2023-43804", "2.0.5")].severity == common_pb2.SEVERITY_HIGH
    assert debian.verdict == common_pb2.VERDICT_FAILED
    layer0, layer1 = images.pushed["debian"].layers
    assert by_id[("CVE-2023-43804", "2.0.5")].layer_digest == layer1
    assert by_id[("CVE-2023-43804", "2.0.5")].path.endswith("urllib3-2.0.5.dist-info/METADATA")
    # No Debian data in the packaged database: said, not matched against anything else.
    assert [(n.id, n.subject, n.packages) for n in debian.notes] == [
        ("IH-VULNDB-001", "Debian:12", 3)
    ]
    # A non-root user: no root misconfiguration.
    assert "IH-IMG-001" not in {m.id for m in debian.misconfigurations}

    sbom = json.loads(debian.sbom)
    assert debian.sbom_format == "cyclonedx-json"
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["specVersion"] == "1.6"
    purls = {c.get("purl") for c in sbom["components"]}
    assert (
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u1?arch=amd64&distro=debian-12&upstream=glibc" in purls
    )
    assert "pkg:pypi/urllib3@2.0.5" in purls
    assert "pkg:npm/lodash@4.17.15" in purls
    assert not any("libssl1.1" in str(purl) for purl in purls)
    assert sbom["metadata"]["component"]["type"] == "container"

    # apk: Alpine 3.11 by v3.11's secdb, through the origin package; -r3 is fixed.
    assert vulns(alpine) == {
        ("CVE-2019-1551", "libcrypto1.1", "1.1.1d-r2", "1.1.1d-r3"),
        ("CVE-2019-1551", "libssl1.1", "1.1.1d-r2", "1.1.1d-r3"),
    }
    assert {v.layer_digest for v in alpine.vulnerabilities} == set(images.pushed["alpine"].layers)
    assert not alpine.notes
    assert vulns(alpine_fixed) == set()
    names = [d.name for d in alpine.databases]
    assert names[0] == "vulnerabilities"
    assert "vulnerabilities/alpine-secdb-06f6e96" in names
    assert names[-1] == "malware"

    # A database updated with Debian's feed: dpkg packages by their source package, in
    # Debian's version order; openssh at exactly its fixed version (with an epoch) gives none;
    # a removed package (deinstall ok config-files) is not installed.
    async with running(
        ScannerClient(handler.address, builtin(db_dir=debian_db), client_config("debian"))
    ):
        updated = await scan(handler, images.pushed["debian"].object(registry))
    debian_findings = {v for v in vulns(updated) if v[1] in ("libc6", "curl", "openssh-client")}
    assert debian_findings == {
        ("CVE-2023-4911", "libc6", "2.36-9+deb12u1", "2.36-9+deb12u3"),
        # deb12u3 < deb12u4: Debian's order, not the strings'.
        ("CVE-2023-38545", "curl", "7.88.1-10+deb12u3", "7.88.1-10+deb12u4"),
    }
    by_package = {v.package: v for v in updated.vulnerabilities}
    assert by_package["libc6"].aliases == ["DEBIAN-CVE-2023-4911"]
    assert by_package["libc6"].layer_digest == layer0
    assert by_package["libc6"].path == "/var/lib/dpkg/status"
    assert not updated.notes
    assert {d.name for d in updated.databases} >= {"vulnerabilities/Debian-all"}


async def test_a_layer_with_eicar_gives_malware_with_its_layer_digest(
    make_handler: MakeHandler, images: Images
) -> None:
    handler = await make_handler()
    pushed = images.pushed["eicar"]
    async with running(ScannerClient(handler.address, builtin(), client_config("eicar"))):
        job_id = await submit(handler, pushed.object(images.registry.address))
        job = await until_status(handler, job_id)
        result = (
            await handler.jobs.GetJobResult(job_service_pb2.GetJobResultRequest(job_id=job_id))
        ).result
    assert [(m.name, m.path, m.layer_digest) for m in result.malware] == [
        ("EICAR-Test-File", "/opt/tools/eicar.com", pushed.layers[1])
    ]
    assert result.malware[0].sha256 == (
        "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
    )
    assert {(s.rule_id, s.path, s.line) for s in result.secrets} == {
        ("private-key", "/root/.ssh/id_rsa", 1),
        ("aws-access-key-id", "/srv/app/config.ini", 3),
        ("github-token", "image config Env[1]", 1),
    }
    assert {m.id for m in result.misconfigurations} >= {"IH-IMG-001"}
    # The handler's summary: malware and secrets fail the verdict.
    assert job.result.verdict == common_pb2.VERDICT_FAILED
    assert job.result.malware == 1
    assert "EICAR-Test-File" in job.result.failing


async def test_policies_limit_what_is_looked_for(make_handler: MakeHandler, images: Images) -> None:
    handler = await make_handler()
    async with running(ScannerClient(handler.address, builtin(), client_config("policies"))):
        result = await scan(
            handler,
            images.pushed["eicar"].object(images.registry.address),
            policies=[common_pb2.POLICY_VULNERABILITIES],
        )
    assert not result.malware
    assert not result.secrets
    assert not result.misconfigurations


async def test_whiteouts_remove_files_from_the_result(
    make_handler: MakeHandler, images: Images
) -> None:
    handler = await make_handler()
    async with running(ScannerClient(handler.address, builtin(), client_config("whiteout"))):
        result = await scan(handler, images.pushed["whiteout"].object(images.registry.address))
    # tmp/eicar.com was whited out; the opaque directory dropped urllib3 of the lower layer
    # and kept requests of its own layer.
    assert not result.malware
    assert vulns(result) == {("CVE-2023-32681", "requests", "2.30.0", "2.31.0")}
    assert result.vulnerabilities[0].layer_digest == images.pushed["whiteout"].layers[1]
    names = {c["name"] for c in json.loads(result.sbom)["components"]}
    assert names == {"requests"}


async def test_a_hostile_layer_is_contained(make_handler: MakeHandler, images: Images) -> None:
    handler = await make_handler()
    host = images.host_dir
    before = sorted(os.listdir(host))
    async with running(ScannerClient(handler.address, builtin(), client_config("hostile"))):
        result = await scan(handler, images.pushed["hostile"].object(images.registry.address))
    # Nothing was written to, or removed from, the host directory the links point at.
    assert sorted(os.listdir(host)) == before == ["status"]
    assert not (Path("/") / "escaped.txt").exists()
    # The dpkg database link resolves inside the image, where there is no such file: the
    # host's vulnerable libc6 entry is not read.
    assert not result.vulnerabilities
    escaped = [m for m in result.misconfigurations if m.id == "IH-LAYER-001"]
    assert len(escaped) == 2, result.misconfigurations
    assert any("escaped.txt" in m.path for m in escaped)
    assert any("passwd-copy" in m.path for m in escaped)


# ---- registry access ------------------------------------------------------------------------


async def test_a_bad_proxy_url_is_hndl_011(make_handler: MakeHandler, images: Images) -> None:
    handler = await make_handler()
    obj = images.pushed["debian"].object(images.registry.address, proxy_url="http://proxy:99999")
    error = await remote_error(handler.jobs.SubmitJob(job_service_pb2.SubmitJobRequest(object=obj)))
    assert error.code == "HNDL-011"
    # The engine checks it too (a job from a handler that did not, or the scanner's own).
    with pytest.raises(ValueError, match="HNDL-011: proxy URL invalid"):
        builtin(proxy_url="ftp://proxy.example:21")
    from scanner_client.engine import Job, NullProgress, ScanFailure

    engine = builtin()
    for bad in ("http://proxy:99999", "ftp://proxy:1", "http://"):
        job = Job("j", 1, images.pushed["debian"].object("127.0.0.1:1", proxy_url=bad))
        with pytest.raises(ScanFailure) as info:
            await engine.scan(job, NullProgress())
        assert info.value.code == "HNDL-011"
        assert info.value.permanent


async def test_basic_auth_registry_with_credentials_ref(
    make_handler: MakeHandler, images: Images, tmp_path: Path
) -> None:
    secured = LocalRegistry(tmp_path / "secured", htpasswd=("scanner", "s3cret"))
    try:
        secured.push(images.layout, "alpine", "private/alpine")
        # The grant beside the secret: for this registry, for any caller (no tokens here).
        grant = {"registries": [secured.address], "allowed": ["*"]}
        credentials = tmp_path / "credentials.json"
        credentials.write_text(
            json.dumps({"team-pull": {"username": "scanner", "password": "s3cret", **grant}})
        )
        grants = tmp_path / "grants.json"
        grants.write_text(json.dumps({"team-pull": grant}))
        handler = await make_handler(credential_grants=str(grants))
        engine = builtin(credentials_file=credentials)
        obj = common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry=secured.address, repository="private/alpine", tag="alpine"
            )
        )
        async with running(ScannerClient(handler.address, engine, client_config("auth"))):
            obj.image.credentials_ref = "team-pull"
            result = await scan(handler, obj)
            assert "CVE-2019-1551" in {v.id for v in result.vulnerabilities}
            obj.image.credentials_ref = ""
            job = await until_status(handler, await submit(handler, obj))
    finally:
        secured.stop()
    assert job.status == common_pb2.JOB_STATUS_ERROR
    assert job.error.code == "HNDL-006"
    assert "needs credentials" in job.error.message
    assert job.runs == 1  # permanent: not retried


async def test_token_auth_registry(
    make_handler: MakeHandler, images: Images, tmp_path: Path
) -> None:
    (tmp_path / "token").mkdir()
    tokens = TokenService(tmp_path / "token", "robot", "t0ken-pass")
    secured = LocalRegistry(tmp_path / "secured", token=tokens)
    try:
        secured.push(images.layout, "alpine", "private/alpine")
        # For the registry and its token service (on another port, so named too).
        grant = {"registries": [secured.address, tokens.netloc], "allowed": ["*"]}
        credentials = tmp_path / "credentials.json"
        credentials.write_text(
            json.dumps({"robot": {"username": "robot", "password": "t0ken-pass", **grant}})
        )
        grants = tmp_path / "grants.json"
        grants.write_text(json.dumps({"robot": grant}))
        handler = await make_handler(credential_grants=str(grants))
        engine = builtin(credentials_file=credentials)
        obj = common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry=secured.address, repository="private/alpine", tag="alpine",
                credentials_ref="robot",
            )
        )  # fmt: skip
        tokens.requests.clear()
        async with running(ScannerClient(handler.address, engine, client_config("token"))):
            result = await scan(handler, obj)
            obj.image.credentials_ref = ""
            anonymous = await until_status(handler, await submit(handler, obj))
    finally:
        secured.stop()
        tokens.stop()
    assert "CVE-2019-1551" in {v.id for v in result.vulnerabilities}
    # The scanner asked the token service for a pull token, with its credentials, once.
    first = tokens.requests[0]
    assert (first["scope"], first["service"], first["authorization"]) == (
        "repository:private/alpine:pull",
        "test-registry",
        "Basic",
    )
    assert anonymous.status == common_pb2.JOB_STATUS_ERROR
    assert "refused the credentials" in anonymous.error.message


# ---- local images, nodes, artifacts ---------------------------------------------------------


async def test_layouts_archives_nodes_and_sboms(
    make_handler: MakeHandler, images: Images, tmp_path: Path, debian_db: Path
) -> None:
    archive = tmp_path / "eicar-docker.tar"
    copy = await asyncio.create_subprocess_exec(
        "skopeo", "--policy", str(images.registry.workdir / "policy.json"), "copy", "--quiet",
        f"oci:{images.layout}:eicar", f"docker-archive:{archive}:test/eicar:latest",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, stderr = await copy.communicate()
    assert copy.returncode == 0, stderr
    single = tmp_path / "single-layout"
    Layout(single).add(
        "alpine", Image(_build(Layout(tmp_path / "scratch"), tmp_path)["alpine"].layers)
    )
    node_root = tmp_path / "node"
    (node_root / "etc" / "ssh").mkdir(parents=True)
    (node_root / "etc" / "os-release").write_text(OS_RELEASE_DEBIAN)
    (node_root / "etc" / "ssh" / "sshd_config").write_text("PermitRootLogin yes\n")
    (node_root / "var" / "lib" / "dpkg").mkdir(parents=True)
    (node_root / "var" / "lib" / "dpkg" / "status").write_text(DPKG_STATUS)
    (node_root / "proc").mkdir()
    (node_root / "proc" / "eicar").write_bytes(EICAR)  # /proc is not the node's files
    sbom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "components": [
            {"type": "library", "name": "lodash", "version": "4.17.15", "purl": "pkg:npm/lodash@4.17.15"},
            {"type": "library", "name": "PyYAML", "version": "5.3.1", "purl": "pkg:pypi/pyyaml@5.3.1"},
            {"type": "library", "name": "busybox", "version": "1.29.3-r9",
             "purl": "pkg:apk/alpine/busybox@1.29.3-r9?distro=alpine-3.11.6"},
        ],
    }  # fmt: skip
    handler = await make_handler()
    engine = builtin(db_dir=debian_db)
    async with running(ScannerClient(handler.address, engine, client_config("local"))):
        from_archive, from_layout, node, from_sbom = await asyncio.gather(
            scan(
                handler,
                common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(archive))),
            ),
            scan(
                handler, common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(single)))
            ),
            scan(
                handler,
                common_pb2.ScanObject(
                    node=common_pb2.NodeObject(
                        cluster="c1", node_name="n1", root_path=str(node_root)
                    )
                ),
            ),
            scan(
                handler,
                common_pb2.ScanObject(
                    artifact=common_pb2.ArtifactObject(
                        pipeline="p", job="j", sbom=json.dumps(sbom).encode()
                    )
                ),
            ),
        )
    assert [m.name for m in from_archive.malware] == ["EICAR-Test-File"]
    # docker-archive layers are uncompressed tars: the digest is that of the tar (its diff id).
    assert from_archive.malware[0].layer_digest.startswith("sha256:")
    assert "CVE-2019-1551" in {v.id for v in from_layout.vulnerabilities}
    assert ("CVE-2023-4911", "libc6", "2.36-9+deb12u1", "2.36-9+deb12u3") in vulns(node)
    assert not node.malware
    assert {m.id for m in node.misconfigurations} == {"IH-NODE-001"}
    assert all(v.layer_digest == "" for v in node.vulnerabilities)
    assert vulns(from_sbom) == {
        ("NSWG-ECO-516", "lodash", "4.17.15", "4.17.19"),
        ("CVE-2020-14343", "pyyaml", "5.3.1", "5.4"),
        # CVE-2019-5747 was fixed twice in v3.11's secdb (1.29.3-r10, 1.30.1-r2): the higher.
        ("CVE-2018-20679", "busybox", "1.29.3-r9", "1.29.3-r10"),
        ("CVE-2019-5747", "busybox", "1.29.3-r9", "1.30.1-r2"),
    }


# ---- the command engine ---------------------------------------------------------------------

TRIVY_REPORT = {
    "SchemaVersion": 2,
    "ArtifactName": "alpine:3.20",
    "ArtifactType": "container_image",
    "Results": [
        {
            "Target": "alpine:3.20 (alpine 3.20.0)",
            "Class": "os-pkgs",
            "Type": "alpine",
            "Vulnerabilities": [
                {
                    "VulnerabilityID": "CVE-2024-6119",
                    "PkgName": "libcrypto3",
                    "InstalledVersion": "3.3.0-r2",
                    "FixedVersion": "3.3.2-r0",
                    "Severity": "HIGH",
                    "Title": "openssl: Possible denial of service in X.509 name checks",
                    "Layer": {"Digest": "sha256:" + "a" * 64, "DiffID": "sha256:" + "b" * 64},
                }
            ],
        },
        {
            "Target": "app/.env",
            "Class": "secret",
            "Secrets": [
                {
                    "RuleID": "aws-access-key-id",
                    "Category": "AWS",
                    "Severity": "CRITICAL",
                    "Title": "AWS Access Key ID",
                    "StartLine": 4,
                    "EndLine": 4,
                }
            ],
        },
        {
            "Target": "Dockerfile",
            "Class": "config",
            "Misconfigurations": [
                {
                    "ID": "DS002",
                    "Title": "Image user should not be 'root'",
                    "Severity": "HIGH",
                    "Status": "FAIL",
                },
                {
                    "ID": "DS026",
                    "Title": "No HEALTHCHECK defined",
                    "Severity": "LOW",
                    "Status": "PASS",
                },
            ],
        },
    ],
}
TRIVY_DB = [Database("trivy-db", "2", "2026-11-20T00:00:00Z")]


async def test_command_engine_parses_trivy_json(make_handler: MakeHandler, tmp_path: Path) -> None:
    report = tmp_path / "trivy.json"
    report.write_text(json.dumps(TRIVY_REPORT))
    engine = CommandEngine(f"cat {shlex.quote(str(report))}", databases=TRIVY_DB)
    handler = await make_handler()
    async with running(ScannerClient(handler.address, engine, client_config("trivy"))):
        result = await scan(handler, images_object("library/alpine", "3.20"))
    assert vulns(result) == {("CVE-2024-6119", "libcrypto3", "3.3.0-r2", "3.3.2-r0")}
    assert result.vulnerabilities[0].layer_digest == "sha256:" + "a" * 64
    assert [(s.rule_id, s.path, s.line) for s in result.secrets] == [
        ("aws-access-key-id", "app/.env", 4)
    ]
    assert [m.id for m in result.misconfigurations] == ["DS002"]
    assert [d.name for d in result.databases] == ["trivy-db"]


def images_object(repository: str, tag: str) -> common_pb2.ScanObject:
    return common_pb2.ScanObject(image=common_pb2.ImageObject(repository=repository, tag=tag))


async def test_a_failing_command_is_hndl_006_with_command_and_stderr(
    make_handler: MakeHandler,
) -> None:
    template = "sh -c 'echo scanning {image} >&2; echo FATAL database is locked >&2; exit 3'"
    engine = CommandEngine(template, databases=TRIVY_DB)
    handler = await make_handler()
    async with running(ScannerClient(handler.address, engine, client_config("failing"))):
        job = await until_status(handler, await submit(handler, images_object("team/app", "1.0")))
    assert job.status == common_pb2.JOB_STATUS_ERROR
    assert job.error.code == "HNDL-006"
    assert job.runs == 3  # a command failure may pass: retried, then ERROR
    assert "exited with 3" in job.error.message
    assert "sh -c" in job.error.message
    assert "FATAL database is locked" in job.error.message
    assert "scanning docker.io/team/app:1.0" in job.error.message


async def test_cancel_kills_the_command(make_handler: MakeHandler, tmp_path: Path) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    engine = CommandEngine(
        f"sh -c 'echo $$ > {shlex.quote(str(fifo))}; exec sleep 60'", databases=TRIVY_DB
    )
    handler = await make_handler()
    async with running(ScannerClient(handler.address, engine, client_config("cancel-cmd"))):
        job_id = await submit(handler, images_object("team/app", "2.0"))
        # The command writes its pid to the FIFO once it runs.
        pid = int(await readable(fifo))
        # A pidfd becomes readable when the process ends.
        pidfd = os.pidfd_open(pid)
        try:
            await handler.jobs.CancelJob(
                job_service_pb2.CancelJobRequest(job_id=job_id, reason="test")
            )
            job = await until_status(handler, job_id)
            assert job.status == common_pb2.JOB_STATUS_CANCELLED
            await fd_readable(pidfd)
        finally:
            os.close(pidfd)


async def fd_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        async with asyncio.timeout(DEADLINE):
            await ready.wait()
    finally:
        loop.remove_reader(fd)


async def readable(fifo: Path) -> str:
    """What the first writer of ``fifo`` writes (waits without blocking the loop)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await fd_readable(fd)
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


# ---- cancellation and a killed scanner ------------------------------------------------------


class StallingProxy:
    """An HTTP proxy on 127.0.0.1 that accepts and never answers: a pull through it hangs
    until the scanner gives up on it (cancel) or dies."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self.closed.set()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def stalling_proxy() -> AsyncIterator[StallingProxy]:
    proxy = StallingProxy()
    yield proxy
    await proxy.stop()


async def test_cancel_stops_a_running_scan(
    make_handler: MakeHandler, images: Images, stalling_proxy: StallingProxy
) -> None:
    proxy = await stalling_proxy.start()
    handler = await make_handler()
    client = ScannerClient(handler.address, builtin(), client_config("cancel"))
    async with running(client):
        obj = images.pushed["debian"].object(images.registry.address, proxy_url=proxy)
        job_id = await submit(handler, obj)
        async with asyncio.timeout(DEADLINE):
            await stalling_proxy.connected.wait()  # the pull is under way
        await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=job_id, reason="test"))
        job = await until_status(handler, job_id)
        assert job.status == common_pb2.JOB_STATUS_CANCELLED
        # The scan stopped its work: it dropped its connection.
        async with asyncio.timeout(DEADLINE):
            await stalling_proxy.closed.wait()
        async with asyncio.timeout(DEADLINE):
            await client.wait_for(lambda stats: stats.jobs_cancelled == 1)
    assert client.stats.jobs_done == 0


async def test_a_scanner_killed_mid_job_leaves_it_to_another(
    make_handler: MakeHandler, images: Images, stalling_proxy: StallingProxy, tmp_path: Path
) -> None:
    proxy = await stalling_proxy.start()
    handler = await make_handler()
    # Scanner A: an image-scanner process whose pulls go through the stalling proxy.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_SCANNER_")}
    first = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scanner_client.cli",
        "--handler", handler.address, "--engine", "builtin", "--scanner-id", "scanner-a",
        "--proxy-url", proxy, "--log-format", "json", "--log-level", "warning",
        "--scratch-dir", str(tmp_path),  # kill -9 leaves its scratch directory behind
        *TEST_SCANNER_FLAGS,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        job_id = await submit(handler, images.pushed["eicar"].object(images.registry.address))
        async with asyncio.timeout(DEADLINE):
            await stalling_proxy.connected.wait()  # A holds the job and is pulling
        first.send_signal(signal.SIGKILL)
        async with asyncio.timeout(DEADLINE):
            await first.wait()
        # Scanner B, without the proxy, takes the job back from the queue.
        async with running(ScannerClient(handler.address, builtin(), client_config("scanner-b"))):
            job = await until_status(handler, job_id)
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert job.status == common_pb2.JOB_STATUS_FINISHED, job.error
    assert job.scanner_id == "scanner-b"
    assert job.runs == 2
    full = await handler.jobs.GetJob(
        job_service_pb2.GetJobRequest(job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL)
    )
    history = full.job.history
    assignments = [
        t.scanner_id for t in history if t.to_status == common_pb2.JOB_STATUS_IN_PROGRESS
    ]
    assert assignments == ["scanner-a", "scanner-b"]
    assert job.result.malware == 1


def test_engines_are_registered() -> None:
    from scanner_client.engines import ENGINES, EngineSettings

    assert {"noop", "builtin", "command"} <= set(ENGINES)
    engine: Engine = ENGINES["command"](
        EngineSettings(command="trivy image {image}", command_databases=("trivy-db=2@2026-11-20",))
    )
    assert [d.released_at for d in engine.databases()] == ["2026-11-20"]
