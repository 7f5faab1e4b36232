"""The builtin and command engines' parts, without a handler: layer unpacking (whiteouts,
containment, limits, cancellation), version ranges, database validation, analysers, SBOMs,
registry helpers, Trivy parsing and command failures."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from imagehandler.v1 import common_pb2
from scanner_client.cli import db_main
from scanner_client.db import DEFAULT_DIR, DatabaseError, read_manifest
from scanner_client.engine import Job, NullProgress, ScanFailure
from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings, analyzers, sbom
from scanner_client.engines.builtin.analyzers import Package
from scanner_client.engines.builtin.common import Cancelled, CancelToken, Limits
from scanner_client.engines.builtin.databases import load_databases
from scanner_client.engines.builtin.files import FileAnalyser
from scanner_client.engines.builtin.layers import DIR, LINK, READ, RETAIN, ImageTree
from scanner_client.engines.builtin.registry import (
    Platform,
    check_proxy_url,
    choose_platform,
    parse_challenge,
)
from scanner_client.engines.builtin.rootfs import Rootfs
from scanner_client.engines.command import CommandEngine, parse_database, parse_output
from scanner_client.vulndb import importers, matcher
from scanner_client.vulndb.build import build as build_database
from scanner_client.vulndb.model import Imported
from scanner_client.vulndb.store import VulnStore
from tests.conftest import TEST_SCANNER_POLICY
from tests.oci import EICAR, Entry, Image, Layout, directory, file, hardlink, layer, symlink
from tests.oci import tar_bytes as make_tar
from tests.vulnfeeds import ALPINE, NODEJS, PYPA, debian_zip

# ---- layers ---------------------------------------------------------------------------------


class KeepAll:
    """A file handler that reads and keeps every file (so a test can see the whole tree)."""

    def wants(self, rel: str, size: int, mode: int) -> int:
        return READ | RETAIN

    def analyse(self, rel: str, data: bytes) -> None:
        return None


def apply(image: ImageTree, tmp_path: Path, entries: list[Entry], digest: str) -> None:
    blob = tmp_path / f"blob-{digest}"
    blob.write_bytes(layer(entries).blob)
    image.apply(blob, digest, CancelToken(), KeepAll())


def tree(image: ImageTree) -> dict[str, str]:
    """Everything in the image: files by content, links by target, directories as '/'."""
    found = {}
    for rel, node in sorted(image.nodes.items()):
        if node.kind == LINK:
            found[rel] = "-> " + node.target
        elif node.kind == DIR:
            found[rel] = "/"
        else:
            found[rel] = (node.data or b"").decode(errors="replace")
    return found


def origins(image: ImageTree) -> dict[str, str]:
    return {rel: node.layer for rel, node in image.files()}


def test_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    rootfs = ImageTree()
    apply(
        rootfs,
        tmp_path,
        [
            file("a/gone.txt", "1"),
            file("a/kept.txt", "1"),
            file("dir/lower.txt", "1"),
            file("dir/sub/lower.txt", "1"),
            file("whole/tree/x", "1"),
        ],
        "l1",
    )
    apply(
        rootfs,
        tmp_path,
        [
            file("a/.wh.gone.txt"),
            file("dir/sub/upper.txt", "2"),
            file("dir/.wh..wh..opq"),
            file("dir/upper.txt", "2"),
            file("whole/.wh.tree"),
            # A whiteout and a file of the same layer: the file stays (it is not lower).
            file("a/new.txt", "2"),
            file("a/.wh.new.txt"),
        ],
        "l2",
    )
    assert tree(rootfs) == {
        "a": "/",
        "a/kept.txt": "1",
        "a/new.txt": "2",
        "dir": "/",
        "dir/sub": "/",
        "dir/sub/upper.txt": "2",
        "dir/upper.txt": "2",
        "whole": "/",
    }
    assert origins(rootfs) == {
        "a/kept.txt": "l1",
        "a/new.txt": "l2",
        "dir/sub/upper.txt": "l2",
        "dir/upper.txt": "l2",
    }


def test_hostile_entries_stay_inside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host")
    rootfs = ImageTree()
    entries = [
        file("../../outside/escaped", "x"),
        file("a/../../outside/escaped2", "x"),
        symlink("abs", str(outside)),
        file("abs/via-abs", "x"),
        symlink("rel", "../" * 10 + str(outside).lstrip("/")),
        file("rel/via-rel", "x"),
        symlink("loop1", "loop2"),
        symlink("loop2", "loop1"),
        file("loop1/x", "x"),
        hardlink("hard", "../outside/secret"),
        hardlink("hard2", str(outside / "secret")),
        Entry("dev/null", kind="file", mode=0o644),
        file("suid", "x", mode=0o4755),
        # A link named like an existing file is replaced, never written through.
        file("target.txt", "inside"),
        symlink("target.txt", str(outside / "secret")),
        file("target.txt", "replaced"),
    ]
    apply(rootfs, tmp_path, entries, "bad")
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "host"
    inside = tree(rootfs)
    # The links resolve inside the root: the files went to root/<outside path>.
    assert inside[str(outside.relative_to("/") / "via-abs")] == "x"
    assert inside[str(outside.relative_to("/") / "via-rel")] == "x"
    assert inside["target.txt"] == "replaced"
    assert "hard" not in inside
    assert "hard2" not in inside  # the in-root path of the host file does not exist
    reasons = {skipped.path: skipped.reason for skipped in rootfs.skipped}
    assert "leaves the image root" in reasons["../../outside/escaped"]
    assert "leaves the image root" in reasons["a/../../outside/escaped2"]
    assert "leaves the root" in reasons["hard"]
    assert "link loop" in reasons["loop1/x"]
    # Reading back follows links inside the root too.
    assert rootfs.read("abs/via-abs") == b"x"
    assert rootfs.read("hard2") is None


def test_devices_and_fifos_are_not_created(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind in (
            ("dev/sda", tarfile.BLKTYPE),
            ("dev/tty", tarfile.CHRTYPE),
            ("fifo", tarfile.FIFOTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
    blob = tmp_path / "devices.tar"
    blob.write_bytes(buffer.getvalue())
    rootfs = ImageTree()
    rootfs.apply(blob, "dev", CancelToken(), KeepAll())
    assert tree(rootfs) == {}
    assert len(rootfs.skipped) == 3


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (Limits(max_file_bytes=1000), "past the limit of 1000 bytes"),
        (Limits(max_unpacked_bytes=3000), "the unpacked image is past the limit"),
        (Limits(max_entries=3), "more than 3 entries"),
    ],
)
def test_limits_end_the_scan_for_good(tmp_path: Path, limits: Limits, message: str) -> None:
    rootfs = ImageTree(limits)
    with pytest.raises(ScanFailure, match=message) as info:
        apply(rootfs, tmp_path, [file(f"f{n}", "x" * 1500) for n in range(4)], "big")
    assert info.value.permanent


def test_compressions(tmp_path: Path) -> None:
    raw = make_tar([file("a", "zstd")])
    (tmp_path / "zstd").write_bytes(zstandard.ZstdCompressor().compress(raw))
    part1, part2 = make_tar([file("b", "one")])[:1024], make_tar([file("b", "one")])[1024:]
    (tmp_path / "multi").write_bytes(gzip.compress(part1) + gzip.compress(part2))
    (tmp_path / "plain").write_bytes(make_tar([file("c", "plain")]))
    rootfs = ImageTree()
    for name in ("zstd", "multi", "plain"):
        rootfs.apply(tmp_path / name, name, CancelToken(), KeepAll())
    assert tree(rootfs) == {"a": "zstd", "b": "one", "c": "plain"}
    (tmp_path / "broken").write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(ScanFailure, match=r"cannot be decompressed|not a valid tar"):
        rootfs.apply(tmp_path / "broken", "broken", CancelToken(), KeepAll())


def test_a_cancelled_token_stops_unpacking(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(make_tar([file(f"f{n}", os.urandom(512 * 1024)) for n in range(8)]))
    rootfs = ImageTree()
    token = CancelToken()
    with pytest.raises(Cancelled):
        rootfs.apply(blob, "l", token, KeepAll(), progress=lambda position: token.cancel())
    assert len(rootfs.nodes) < 8


# ---- vulnerabilities ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vulndb(tmp_path_factory: pytest.TempPathFactory) -> VulnStore:
    """The packaged feeds plus a Debian feed in osv.dev's form (tests/vulnfeeds.py)."""
    work = tmp_path_factory.mktemp("vulndb")
    origins = [str(debian_zip(work / "Debian" / "all.zip")), str(PYPA), str(ALPINE), str(NODEJS)]
    return VulnStore(build_database(origins, work / "v.db").path)


def package(kind: str, name: str, version: str, ecosystem: str, source: str = "") -> Package:
    return Package(kind, name, version, ecosystem, source or name, version, "p")


@pytest.mark.parametrize(
    ("pkg", "expected"),
    [
        # Debian: revisions compare numerically; epochs outrank everything.
        (package("deb", "libc6", "2.36-9+deb12u1", "Debian:12", "glibc"), {"CVE-2023-4911"}),
        (package("deb", "libc6", "2.36-9+deb12u3", "Debian:12", "glibc"), set()),
        (package("deb", "libc6", "2.36-9+deb12u10", "Debian:12", "glibc"), set()),
        # Another release's data is not used (no Debian 11 data: a note, not a match).
        (package("deb", "libc6", "2.36-9+deb12u1", "Debian:11", "glibc"), set()),
        (package("deb", "libc6", "2.36-9+deb12u1", "Debian", "glibc"), set()),
        (
            package("deb", "openssh-server", "1:9.2p1-2+deb12u2", "Debian:12", "openssh"),
            {"CVE-2024-6387"},
        ),
        (package("deb", "openssh-server", "1:9.2p1-2+deb12u3", "Debian:12", "openssh"), set()),
        # Without the epoch 9.9p1 is below 1:9.2p1.
        (package("deb", "openssh-server", "9.9p1-1", "Debian:12", "openssh"), {"CVE-2024-6387"}),
        (package("deb", "curl", "7.88.1-10+deb12u3", "Debian:12"), {"CVE-2023-38545"}),
        # Alpine: -r9 < -r10 (numerically), v3.11's own data.
        (
            package("apk", "busybox", "1.29.3-r9", "Alpine:v3.11"),
            {"CVE-2018-20679", "CVE-2019-5747"},
        ),
        (package("apk", "busybox", "1.31.1-r10", "Alpine:v3.11"), set()),
        (package("apk", "libcrypto1.1", "1.1.1d-r2", "Alpine:v3.11", "openssl"), {"CVE-2019-1551"}),
        # PyPI: names normalised; pre-releases sort below their release.
        (package("pypi", "URLLib3", "1.26.16", "PyPI"), {"CVE-2023-43804", "CVE-2023-45803"}),
        (package("pypi", "urllib3", "1.26.18", "PyPI"), set()),
        (package("pypi", "urllib3", "2.0.0rc1", "PyPI"), set()),
        (package("pypi", "urllib3", "2.0.5", "PyPI"), {"CVE-2023-43804", "CVE-2023-45803"}),
        (package("pypi", "requests", "2.19.0", "PyPI"), {"CVE-2018-18074", "CVE-2023-32681"}),
        # npm: node-semver ranges.
        (package("npm", "lodash", "4.17.15", "npm"), {"NSWG-ECO-516"}),
        (package("npm", "lodash", "4.17.19", "npm"), set()),
        # A version the ecosystem cannot order matches nothing.
        (package("npm", "lodash", "not a version", "npm"), set()),
    ],
    ids=lambda value: (
        f"{value.name}@{value.version}@{value.ecosystem}" if isinstance(value, Package) else None
    ),
)
def test_version_ranges(vulndb: VulnStore, pkg: Package, expected: set[str]) -> None:
    assert {finding.id for finding in matcher.match(vulndb, [pkg]).findings} == expected


def record(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "CVE-2000-0001",
        "database_specific": {"severity": "LOW"},
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "demo"},
                "ranges": [
                    {
                        "type": "ECOSYSTEM",
                        "events": [{"introduced": "1.0"}, {"last_affected": "1.4"}],
                    }
                ],
                "versions": ["0.9"],
            }
        ],
    }
    return {**base, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"id": ""}, "'id' must be a non-empty string"),
        ({"affected": []}, "non-empty list"),
        ({"aliases": "CVE-1"}, "must be lists of strings"),
        (
            {
                "affected": [
                    {
                        "package": {"ecosystem": "PyPI", "name": "x"},
                        "ranges": [{"type": "ECOSYSTEM", "events": [{"fixed": "1.0"}]}],
                    }
                ]
            },
            "needs an 'introduced' event",
        ),
        (
            {
                "affected": [
                    {
                        "package": {"ecosystem": "Debian:12", "name": "x"},
                        "ranges": [
                            {
                                "type": "ECOSYSTEM",
                                "events": [{"introduced": "0"}, {"fixed": "not a version!"}],
                            }
                        ],
                    }
                ]
            },
            "'not a version!' is not a valid Debian version",
        ),
        (
            {
                "affected": [
                    {
                        "package": {"ecosystem": "PyPI", "name": "x"},
                        "ranges": [
                            {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"broken": "1"}]}
                        ],
                    }
                ]
            },
            "unknown event",
        ),
        ({"affected": [{"package": {"ecosystem": "PyPI"}}]}, "'name' must be a non-empty"),
    ],
)
def test_invalid_records_are_refused(overrides: dict[str, Any], message: str) -> None:
    imported = Imported()
    importers.import_document(record(**overrides), "r.json", imported, "s")
    assert not imported.advisories
    assert message in " ".join(problem.reason for problem in imported.problems)


def test_a_record_of_an_unsupported_ecosystem_is_counted_not_dropped_silently() -> None:
    imported = Imported()
    gentoo = record(affected=[{"package": {"ecosystem": "Gentoo", "name": "x"}, "versions": ["1"]}])
    importers.import_document(gentoo, "r.json", imported, "s")
    assert imported.left_out == {"ecosystem Gentoo has no version order here": 1}


def copy_db(tmp_path: Path) -> Path:
    target = tmp_path / "db"
    shutil.copytree(DEFAULT_DIR, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


def test_the_packaged_databases_are_valid_and_dated() -> None:
    loaded = load_databases()
    versions = [(d.name, d.released_at) for d in loaded.versions()]
    assert versions[0] == ("vulnerabilities", "2026-04-08T00:00:00Z")
    assert versions[-1] == ("malware", "2026-11-20T06:00:00Z")
    assert loaded.vulnerabilities.count("advisories") > 5000
    hits = loaded.signatures.match_data(EICAR, frozenset({"malware"}))
    assert [hit.meta["name"] for hit in hits] == ["EICAR-Test-File"]
    # The rules file is not itself the test file, and EICAR inside a larger file is not it.
    rules = (DEFAULT_DIR / "malware.yar").read_bytes()
    assert not loaded.signatures.match_data(rules, frozenset({"malware"}))
    assert not loaded.signatures.match_data(b"x" * 200 + EICAR, frozenset({"malware"}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "vulnerabilities.db").write_text("{"), "vulnerabilities.db"),
        (lambda d: (d / "vulnerabilities.db").unlink(), "vulnerabilities.db does not exist"),
        (lambda d: (d / "malware.yar").write_text("rule broken {"), "malware.yar"),
        (lambda d: (d / "malware.yar").write_text("rule x { condition: true }"), "no malware rule"),
        (lambda d: _manifest(d, released_at="yesterday"), "not an RFC 3339 date"),
        (lambda d: _manifest(d, released_at="2026-11-20T06:00:00"), "no time zone offset"),
        (lambda d: _manifest(d, released_at=""), "has no released_at"),
        (lambda d: _manifest(d, file="../etc/passwd"), "plain file name"),
        (lambda d: (d / "manifest.json").unlink(), "does not exist"),
    ],
)
def test_invalid_databases_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    directory = copy_db(tmp_path)
    change(directory)
    with pytest.raises(DatabaseError, match=message):
        load_databases(directory)
    with pytest.raises(ValueError, match=message):
        BuiltinEngine(BuiltinSettings(db_dir=directory))


def _manifest(directory: Path, **fields: str) -> None:
    path = directory / "manifest.json"
    document = json.loads(path.read_text())
    document["databases"]["malware"].update(fields)
    path.write_text(json.dumps(document))


def test_db_info_refuses_a_bad_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = copy_db(tmp_path)
    _manifest(broken, released_at="")
    assert db_main(["info"], env={"IMAGE_SCANNER_DB_DIR": str(broken)}) == 1
    assert "has no released_at" in capsys.readouterr().err
    assert read_manifest()["malware"].format == "yara"


# ---- analysers and SBOMs --------------------------------------------------------------------


def test_analysers() -> None:
    distro = analyzers.parse_os_release(b'# comment\nID="ubuntu"\nVERSION_ID="22.04"\n')
    assert distro is not None
    assert distro.ecosystem == "Ubuntu:22.04"
    status = b"Package: libssl3\nStatus: install ok installed\nSource: openssl (3.0.11-1~deb12u2)\nVersion: 3.0.11-1~deb12u2+b1\n"
    [pkg] = analyzers.parse_dpkg_status(status, "s", analyzers.Distro("debian", "12.4"))
    assert (pkg.source_name, pkg.source_version, pkg.ecosystem) == (
        "openssl",
        "3.0.11-1~deb12u2",
        "Debian:12",
    )
    assert analyzers.is_npm_manifest("app/node_modules/@types/node/package.json")
    assert analyzers.is_npm_manifest("node_modules/a/node_modules/b/package.json")
    # Every package.json names a package, as Syft reads images (an application's own too).
    assert analyzers.is_npm_manifest("app/package.json")
    assert not analyzers.is_npm_manifest("app/package.json.orig")
    assert analyzers.parse_npm_manifest(b"[]", "p") == []
    [py] = analyzers.parse_python_metadata(
        b"Metadata-Version: 2.1\nName: Jinja2\nVersion: 3.1.2\n", "m"
    )
    assert (py.source_name, py.purl) == ("jinja2", "pkg:pypi/jinja2@3.1.2")


def test_sbom_round_trip() -> None:
    packages = [
        package("npm", "@scope/thing", "1.0.0", "npm"),
        Package(
            "apk",
            "busybox",
            "1.36.1-r2",
            "Alpine:v3.20",
            "busybox",
            "1.36.1-r2",
            "lib/apk/db/installed",
            "sha256:x",
            "alpine-3.20.3",
        ),
    ]
    document = sbom.build("reg/app:1", "image", packages, analyzers.Distro("alpine", "3.20.3"))
    parsed = sbom.packages_from_cyclonedx(document)
    assert {(p.name, p.version, p.ecosystem) for p in parsed} == {
        ("@scope/thing", "1.0.0", "npm"),
        ("busybox", "1.36.1-r2", "Alpine:v3.20"),
    }
    with pytest.raises(ScanFailure) as info:
        sbom.packages_from_cyclonedx(b'{"spdxVersion": "SPDX-2.3"}')
    assert info.value.code == "HNDL-005"


# ---- registry helpers -----------------------------------------------------------------------


def test_challenges_platforms_and_proxies() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    index = {
        "manifests": [
            {
                "digest": "sha256:" + "1" * 64,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {"digest": "sha256:" + "2" * 64, "platform": {"os": "linux", "architecture": "amd64"}},
            {
                "digest": "sha256:" + "3" * 64,
                "platform": {"os": "unknown", "architecture": "unknown"},
            },
        ]
    }
    assert choose_platform(index, Platform.parse("linux/amd64"), "x") == "sha256:" + "2" * 64
    assert choose_platform(index, Platform.parse("linux/arm64/v8"), "x") == "sha256:" + "1" * 64
    with pytest.raises(ScanFailure, match="offers linux/amd64, linux/arm64/v8") as info:
        choose_platform(index, Platform.parse("linux/s390x"), "x")
    assert info.value.code == "HNDL-005"
    for good in ("", "http://proxy:3128", "socks5://10.0.0.1:1080", "https://user:pw@proxy"):
        check_proxy_url(good)
    for bad in ("proxy:3128", "http://", "http://proxy:0", "http://proxy:99999", "http://[::1"):
        with pytest.raises(ScanFailure, match="HNDL-011: proxy URL invalid"):
            check_proxy_url(bad)


# ---- the builtin engine outside a handler ---------------------------------------------------


def run_scan(engine: BuiltinEngine, obj: common_pb2.ScanObject) -> common_pb2.ScanResult:
    return asyncio.run(engine.scan(Job("j", 1, obj), NullProgress()))


def test_job_parameter_failures_are_permanent_hndl_005(tmp_path: Path) -> None:
    engine = BuiltinEngine(BuiltinSettings(policy=TEST_SCANNER_POLICY))
    cases = [
        common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry="127.0.0.1:1", repository="a", credentials_ref="nope"
            )
        ),
        common_pb2.ScanObject(
            node=common_pb2.NodeObject(node_name="n", root_path=str(tmp_path / "missing"))
        ),
        common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(tmp_path / "missing"))),
        common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(sbom=b"not json")),
        common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(url="ftp://host/file")),
    ]
    for obj in cases:
        with pytest.raises(ScanFailure) as info:
            run_scan(engine, obj)
        assert (info.value.code, info.value.permanent) == ("HNDL-005", True), obj


def test_a_node_job_without_root_path_is_refused_not_scanned_as_the_scanners_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def walk(self: Rootfs, *args: Any, **kwargs: Any) -> Iterator[tuple[str, os.stat_result]]:
        raise AssertionError(f"the engine walked {self.root} for a node job without a root")

    monkeypatch.setattr(Rootfs, "walk", walk)
    obj = common_pb2.ScanObject(node=common_pb2.NodeObject(cluster="c1", node_name="n1"))
    job = Job("j", 1, obj)
    for engine in (
        BuiltinEngine(BuiltinSettings(policy=TEST_SCANNER_POLICY)),
        CommandEngine("echo {root}", policy=TEST_SCANNER_POLICY),
    ):
        with pytest.raises(ScanFailure, match=r"node\.root_path is empty") as info:
            asyncio.run(engine.scan(job, NullProgress()))
        assert (info.value.code, info.value.permanent) == ("HNDL-005", True), engine.name


def test_an_unreachable_registry_is_a_transient_failure() -> None:
    obj = common_pb2.ScanObject(
        image=common_pb2.ImageObject(registry="127.0.0.1:1", repository="a/b", tag="1")
    )
    with pytest.raises(ScanFailure, match=r"cannot reach registry 127\.0\.0\.1:1") as info:
        run_scan(BuiltinEngine(BuiltinSettings(policy=TEST_SCANNER_POLICY)), obj)
    assert info.value.code == "HNDL-006"
    assert not info.value.permanent


def test_single_files_and_plain_archives(tmp_path: Path) -> None:
    sample = tmp_path / "download.com"
    sample.write_bytes(EICAR)
    result = run_scan(
        BuiltinEngine(BuiltinSettings(policy=TEST_SCANNER_POLICY)),
        common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(sample))),
    )
    assert [(m.name, m.path, m.layer_digest) for m in result.malware] == [
        ("EICAR-Test-File", str(sample), "")
    ]
    archive = tmp_path / "site.tar.gz"
    archive.write_bytes(
        layer(
            [
                directory("site"),
                # Node.js WG record 55: moment <2.11.2, CVE-2016-4055.
                file(
                    "site/node_modules/moment/package.json",
                    '{"name": "moment", "version": "2.11.1"}',
                ),
            ]
        ).blob
    )
    result = run_scan(
        BuiltinEngine(BuiltinSettings(policy=TEST_SCANNER_POLICY)),
        common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(archive))),
    )
    assert [
        (v.id, list(v.aliases), v.package, v.fixed_version) for v in result.vulnerabilities
    ] == [("CVE-2016-4055", ["NSWG-ECO-55"], "moment", "2.11.2")]


def test_cancelling_a_scan_stops_its_thread_and_removes_its_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path / "layout")
    layout.add("big", Image([layer([file(f"f{n}", "x") for n in range(50)])]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    started = threading.Event()
    release = threading.Event()
    walked: list[str] = []
    original = FileAnalyser.analyse

    def gated_analyse(self: FileAnalyser, rel: str, data: bytes) -> Any:
        started.set()
        assert release.wait(10)
        walked.append(rel)
        return original(self, rel, data)

    monkeypatch.setattr(FileAnalyser, "analyse", gated_analyse)
    engine = BuiltinEngine(BuiltinSettings(scratch_dir=scratch, policy=TEST_SCANNER_POLICY))
    job = Job(
        "j", 1, common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(layout.path)))
    )

    async def main() -> None:
        task = asyncio.create_task(engine.scan(job, NullProgress()))
        async with asyncio.timeout(10):
            await asyncio.to_thread(started.wait, 10)
        assert os.listdir(scratch)  # the scan's scratch directory exists
        task.cancel()
        await asyncio.sleep(0)  # let the cancellation reach the scan and set its token
        release.set()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task

    asyncio.run(main())
    assert os.listdir(scratch) == []
    assert len(walked) < 50  # the walk stopped early


# ---- the command engine ---------------------------------------------------------------------


def test_command_words_are_not_split_by_fields() -> None:
    engine = CommandEngine(
        "scan --image {image} --out {job_id}.json", databases=[parse_database("db=1@2026-11-20")]
    )
    job = Job(
        "id-1",
        1,
        common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry="r:5000", repository="a/b", tag="x;rm -rf /", digest="sha256:" + "0" * 64
            )
        ),
    )
    assert engine.argv(job) == [
        "scan",
        "--image",
        f"r:5000/a/b:x;rm -rf /@sha256:{'0' * 64}",
        "--out",
        "id-1.json",
    ]
    with pytest.raises(ValueError, match=r"placeholder \{nope\} is unknown"):
        CommandEngine("scan {nope}")
    with pytest.raises(ValueError, match="NAME=VERSION@RELEASED_AT"):
        parse_database("trivy-db")


def test_command_timeout_and_bad_output_are_hndl_006() -> None:
    job = Job(
        "j", 1, common_pb2.ScanObject(node=common_pb2.NodeObject(node_name="n", root_path="/h"))
    )
    slow = CommandEngine("sleep 30", timeout=0.2, policy=TEST_SCANNER_POLICY)
    with pytest.raises(ScanFailure, match=r"did not finish within 0\.2s and was killed") as info:
        asyncio.run(slow.scan(job, NullProgress()))
    assert info.value.code == "HNDL-006"
    garbage = CommandEngine("echo not json", policy=TEST_SCANNER_POLICY)
    with pytest.raises(ScanFailure, match="wrote no valid JSON"):
        asyncio.run(garbage.scan(job, NullProgress()))
    missing = CommandEngine("/nonexistent/scanner {root}", policy=TEST_SCANNER_POLICY)
    with pytest.raises(ScanFailure, match="cannot start") as info:
        asyncio.run(missing.scan(job, NullProgress()))
    assert info.value.permanent


def test_trivy_list_format_and_scanresult_json() -> None:
    old = [
        {
            "Target": "alpine (alpine 3.7.1)",
            "Vulnerabilities": [
                {
                    "VulnerabilityID": "CVE-2018-16840",
                    "PkgName": "curl",
                    "InstalledVersion": "7.61.0-r0",
                    "FixedVersion": "7.61.1-r1",
                    "Severity": "HIGH",
                }
            ],
        }
    ]
    result = parse_output(json.dumps(old).encode(), "trivy-json", "trivy")
    assert [(v.id, v.severity) for v in result.vulnerabilities] == [
        ("CVE-2018-16840", common_pb2.SEVERITY_HIGH)
    ]
    assert result.verdict == common_pb2.VERDICT_FAILED
    assert (
        parse_output(b'{"SchemaVersion": 2}', "trivy-json", "t").verdict
        == common_pb2.VERDICT_PASSED
    )
    ours = {"verdict": "VERDICT_PASSED", "secrets": [{"ruleId": "x", "path": "/p", "line": 2}]}
    parsed = parse_output(json.dumps(ours).encode(), "scanresult-json", "wrapper")
    assert parsed.secrets[0].line == 2
    with pytest.raises(ScanFailure, match="is not a ScanResult"):
        parse_output(b'{"nope": 1}', "scanresult-json", "wrapper")


# ---- the command line -----------------------------------------------------------------------


def test_engine_flags_and_environment(capsys: pytest.CaptureFixture[str]) -> None:
    from scanner_client.cli import main, parse_args

    settings = parse_args(
        [
            "--engine", "command", "--command", "trivy image {image}",
            "--command-databases", "trivy-db=2@2026-11-20, java-db=1@2026-11-19",
            "--command-timeout", "30",
        ],
        env={"IMAGE_SCANNER_INSECURE_REGISTRIES": "reg.local:5000,other:80", "IMAGE_SCANNER_PLATFORM": "linux/arm64"},
    )  # fmt: skip
    assert settings.command_databases == ("trivy-db=2@2026-11-20", "java-db=1@2026-11-19")
    assert settings.insecure_registries == ("reg.local:5000", "other:80")
    assert (settings.platform, settings.command_timeout) == ("linux/arm64", 30.0)
    assert main(["db", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["name"] == "malware"


def test_progress_goes_through_the_stages(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.add("x", Image([layer([file(f"f{n}", os.urandom(300_000)) for n in range(12)])]))
    seen: list[tuple[str, int]] = []

    class Recorder:
        def report(self, stage: str, percent: int, message: str = "") -> None:
            seen.append((stage, percent))

    job = Job(
        "j", 1, common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(layout.path)))
    )
    asyncio.run(BuiltinEngine(BuiltinSettings(policy=TEST_SCANNER_POLICY)).scan(job, Recorder()))
    stages = list(dict.fromkeys(stage for stage, _ in seen))
    assert stages == ["unpack", "analyse", "report"]
    percents = [percent for _, percent in seen]
    assert percents == sorted(percents)
    assert seen[-1] == ("report", 100)
