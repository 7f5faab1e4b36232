"""The vulnerability database without a handler: importers on the real feeds and on the other
forms they are published in, the compiled file, matching semantics, build / verify / update.
"""

from __future__ import annotations

import http.server
import json
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagehandler.v1 import common_pb2
from scanner_client.cli import db_main
from scanner_client.db import DEFAULT_DIR, DatabaseError
from scanner_client.engines.builtin.analyzers import Package
from scanner_client.engines.builtin.databases import load_databases
from scanner_client.vulndb import build, matcher
from scanner_client.vulndb.store import VulnStore
from tests.vulnfeeds import ALPINE, NODEJS, PYPA, debian_zip

PACKAGED = DEFAULT_DIR / "vulnerabilities.db"


@pytest.fixture(scope="module")
def packaged() -> VulnStore:
    return load_databases().vulnerabilities


def pkg(kind: str, name: str, version: str, ecosystem: str, source: str = "", **kw: Any) -> Package:
    return Package(kind, name, version, ecosystem, source or name, version, "p", **kw)


def found(store: VulnStore, *packages: Package) -> set[tuple[str, str, str]]:
    return {(f.id, f.package.name, f.fixed) for f in matcher.match(store, packages).findings}


# ---- the packaged database ------------------------------------------------------------------


def test_the_packaged_database_is_a_fresh_build_of_vulndata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like check-protos: the committed file must equal a build from the committed feeds
    (``make vulndb``), row for row."""
    committed = VulnStore(PACKAGED)
    origins = [source.origin for source in committed.sources]
    assert sorted(origins) == sorted(
        f"vulndata/{path.name}" for path in PYPA.parent.glob("*.tar.gz")
    ), "vulndata/ changed: run make vulndb and commit the database"
    monkeypatch.chdir(PYPA.parent.parent)
    fresh = build.build(origins, tmp_path / "fresh.db")
    assert fresh.content_sha256 == committed.content_sha256, (
        "scanner_client/db/vulnerabilities.db is stale: run make vulndb and commit it"
    )
    assert committed.verify() == []


def test_the_packaged_database_reports_its_real_snapshot_dates(packaged: VulnStore) -> None:
    dates = {s.name: s.snapshot_date for s in packaged.sources}
    assert dates == {
        "pypa-advisory-database-3ccb612": "2024-10-10T00:00:00Z",
        "alpine-secdb-06f6e96": "2020-06-08T00:00:00Z",
        "nodejs-security-wg-npm-f1288d0": "2026-04-08T00:00:00Z",
    }
    # The release date is the newest source's snapshot, never the build time.
    assert packaged.released_at == "2026-04-08T00:00:00Z"
    assert packaged.version.startswith("2026.04.08-")
    licences = {s.name: s.licence for s in packaged.sources}
    assert licences["pypa-advisory-database-3ccb612"] == "Attribution 4.0 International"
    assert licences["nodejs-security-wg-npm-f1288d0"] == "The MIT License (MIT)"
    versions = [(d.name, d.released_at) for d in load_databases().versions()]
    assert versions[0] == ("vulnerabilities", "2026-04-08T00:00:00Z")
    assert ("vulnerabilities/alpine-secdb-06f6e96", "2020-06-08T00:00:00Z") in versions
    assert versions[-1][0] == "malware"


# ---- matching on real records ---------------------------------------------------------------


def test_real_records_affected_and_fixed(packaged: VulnStore) -> None:
    requests_vulnerable = matcher.match(packaged, [pkg("pypi", "requests", "2.19.0", "PyPI")])
    by_id = {f.id: f for f in requests_vulnerable.findings}
    # PYSEC-2018-28 and its aliases are one finding, with the CVE as its id.
    assert by_id["CVE-2018-18074"].aliases == ("GHSA-x84v-xcm2-53pg", "PYSEC-2018-28")
    assert by_id["CVE-2018-18074"].fixed == "2.20.0"
    assert "CVE-2018-18074" not in {
        f.id for f in matcher.match(packaged, [pkg("pypi", "Requests", "2.20.0", "PyPI")]).findings
    }
    # Alpine v3.11 main: openssl fixed CVE-2019-1551 in 1.1.1d-r3 (by the origin package).
    assert found(packaged, pkg("apk", "libssl1.1", "1.1.1d-r2", "Alpine:v3.11", "openssl")) == {
        ("CVE-2019-1551", "libssl1.1", "1.1.1d-r3")
    }
    assert not found(packaged, pkg("apk", "libssl1.1", "1.1.1d-r3", "Alpine:v3.11", "openssl"))
    # v3.10's own data says otherwise for the same version: each release by its data.
    assert not found(packaged, pkg("apk", "libssl1.1", "1.1.1d-r2", "Alpine:v3.10", "openssl"))
    # npm: record 516 (>=4.17.15 <4.17.19), fixed from its patched_versions.
    lodash = matcher.match(packaged, [pkg("npm", "lodash", "4.17.15", "npm")]).findings
    assert [(f.id, f.fixed, f.severity) for f in lodash] == [
        ("NSWG-ECO-516", "4.17.19", common_pb2.SEVERITY_HIGH)
    ]
    assert not found(packaged, pkg("npm", "lodash", "4.17.19", "npm"))
    # A CVSS vector in the record gives the severity (CVE-2023-43804: 8.1, HIGH).
    urllib3 = matcher.match(packaged, [pkg("pypi", "urllib3", "1.26.5", "PyPI")]).findings
    assert {(f.id, f.severity) for f in urllib3} >= {("CVE-2023-43804", common_pb2.SEVERITY_HIGH)}


def test_no_data_for_a_release_is_said_not_guessed(packaged: VulnStore) -> None:
    report = matcher.match(
        packaged,
        [
            pkg("apk", "busybox", "1.36.1-r2", "Alpine:v3.20"),
            pkg("apk", "libssl3", "3.3.0-r2", "Alpine:v3.20", "openssl"),
            pkg("deb", "libc6", "2.36-9", "Debian:12", "glibc"),
            pkg("apk", "musl", "1.1.24-r2", "Alpine"),
            pkg("apk", "libssl1.1", "1.1.1d-r2", "Alpine:v3.11", "openssl"),
        ],
    )
    assert [f.id for f in report.findings] == ["CVE-2019-1551"]
    notes = {note.subject: note for note in report.notes}
    assert set(notes) == {"Alpine:v3.20", "Debian:12", "Alpine"}
    assert notes["Alpine:v3.20"].packages == 2
    assert notes["Alpine:v3.20"].id == "IH-VULNDB-001"
    assert "No vulnerability data for Alpine:v3.20" in notes["Alpine:v3.20"].text
    assert "v3.3, v3.4" in notes["Alpine:v3.20"].text  # releases in version order
    assert "release is unknown" in notes["Alpine"].text


def test_language_packages_owned_by_os_packages_are_left_to_the_distribution(
    packaged: VulnStore,
) -> None:
    owned = pkg("pypi", "requests", "2.19.0", "PyPI", os_owned=True)
    report = matcher.match(packaged, [owned])
    assert report.findings == []
    assert report.notes == []


# ---- OSV semantics --------------------------------------------------------------------------


def osv(advisory_id: str, *affected: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "id": advisory_id,
        "modified": "2024-01-01T00:00:00Z",
        "affected": list(affected),
        **fields,
    }


def affected(ecosystem: str, name: str, *ranges: Any, versions: Any = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"package": {"ecosystem": ecosystem, "name": name}}
    entry["ranges"] = [{"type": kind, "events": events} for kind, events in ranges]
    if versions is not None:
        entry["versions"] = versions
    return entry


def build_from(tmp_path: Path, records: list[dict[str, Any]], name: str = "feed") -> VulnStore:
    folder = tmp_path / name
    folder.mkdir()
    for index, record in enumerate(records):
        (folder / f"{index}.json").write_text(json.dumps(record))
    report = build.build([str(folder)], tmp_path / f"{name}.db", snapshot_date="2024-01-02")
    return VulnStore(report.path)


def test_osv_ranges_last_affected_versions_limit_and_withdrawn(tmp_path: Path) -> None:
    store = build_from(
        tmp_path,
        [
            # Events out of order: evaluated in version order, as the OSV schema says.
            osv(
                "PYSEC-1",
                affected(
                    "PyPI",
                    "Demo_Pkg",
                    (
                        "ECOSYSTEM",
                        [
                            {"fixed": "1.5"},
                            {"introduced": "2.0"},
                            {"introduced": "1.0"},
                            {"last_affected": "2.4"},
                        ],
                    ),
                    versions=["0.9"],
                ),
                aliases=["CVE-2000-1"],
            ),
            osv(
                "GHSA-aaaa",
                affected(
                    "PyPI", "demo-pkg", ("ECOSYSTEM", [{"introduced": "0"}, {"fixed": "1.2"}])
                ),
                aliases=["CVE-2000-1"],
                database_specific={"severity": "CRITICAL"},
            ),
            osv(
                "GO-1",
                affected(
                    "Go",
                    "example.com/mod",
                    ("SEMVER", [{"introduced": "0"}, {"fixed": "1.4.0"}, {"limit": "9.0.0"}]),
                ),
            ),
            osv(
                "PYSEC-2",
                affected("PyPI", "demo-pkg", ("ECOSYSTEM", [{"introduced": "0"}])),
                withdrawn="2024-01-01T00:00:00Z",
            ),
        ],
    )
    outcome = {
        version: sorted(
            (f.id, f.aliases, f.fixed)
            for f in matcher.match(store, [pkg("pypi", "demo.pkg", version, "PyPI")]).findings
        )
        for version in ("0.8", "0.9", "1.0", "1.4", "1.5", "2.0", "2.4", "2.5")
    }
    merged = ("CVE-2000-1", ("GHSA-aaaa", "PYSEC-1"))
    ghsa, pysec = ("CVE-2000-1", ("GHSA-aaaa",)), ("CVE-2000-1", ("PYSEC-1",))
    assert outcome == {
        "0.8": [(*ghsa, "1.2")],  # GHSA-aaaa only; its alias, the CVE, is the id
        "0.9": [(*merged, "1.2")],  # listed in PYSEC-1's versions, in GHSA-aaaa's range
        "1.0": [(*merged, "1.5")],  # both: the highest fix is the one that fixes both
        "1.4": [(*pysec, "1.5")],
        "1.5": [],
        "2.0": [(*pysec, "")],
        "2.4": [(*pysec, "")],  # last_affected is affected
        "2.5": [],
    }
    # Severity of a merged finding: the highest (GHSA-aaaa's CRITICAL).
    (one,) = matcher.match(store, [pkg("pypi", "demo-pkg", "0.9", "PyPI")]).findings
    assert one.severity == common_pb2.SEVERITY_CRITICAL
    golang = {
        v: found(store, pkg("golang", "example.com/mod", v, "Go"))
        for v in ("v1.3.9", "1.4.0", "v9.1.0")
    }
    assert golang == {
        "v1.3.9": {("GO-1", "example.com/mod", "1.4.0")},
        "1.4.0": set(),
        "v9.1.0": set(),
    }
    assert [s.left_out for s in store.sources] == [1]


def test_alpine_secdb_zero_means_never_affected(tmp_path: Path) -> None:
    folder = tmp_path / "secdb"
    folder.mkdir()
    (folder / "main.json").write_text(
        json.dumps(
            {
                "distroversion": "v3.19",
                "reponame": "main",
                "packages": [
                    {"pkg": {"name": "zlib", "secfixes": {"0": ["CVE-2023-45853"]}}},
                    {"pkg": {"name": "curl", "secfixes": {"8.5.0-r0": ["CVE-2023-46218"]}}},
                ],
            }
        )
    )
    (folder / "osv.json").write_text(
        json.dumps(
            osv(
                "CVE-2023-45853",
                affected("Alpine:v3.19", "zlib", ("ECOSYSTEM", [{"introduced": "0"}])),
            )
        )
    )
    store = VulnStore(
        build.build([str(folder)], tmp_path / "s.db", snapshot_date="2024-01-01").path
    )
    assert not found(store, pkg("apk", "zlib", "1.3-r2", "Alpine:v3.19"))
    assert found(store, pkg("apk", "curl", "8.4.0-r0", "Alpine:v3.19")) == {
        ("CVE-2023-46218", "curl", "8.5.0-r0")
    }


# ---- importers and sources ------------------------------------------------------------------


def test_every_form_of_every_feed_is_read(tmp_path: Path) -> None:
    """OSV JSON in a zip (osv.dev), OSV YAML in a tar (PyPA), secdb YAML (the archive) and the
    JSON Alpine serves today, Node.js WG files and its index."""
    zipped = debian_zip(tmp_path / "Debian" / "all.zip")
    secdb_json = tmp_path / "v3.11-main.json"
    secdb_json.write_text(
        json.dumps(
            {
                "apkurl": "{{urlprefix}}/{{distroversion}}/{{reponame}}/{{arch}}/{{pkg.name}}-{{pkg.ver}}.apk",
                "archs": ["x86_64"],
                "reponame": "main",
                "urlprefix": "https://dl-cdn.alpinelinux.org/alpine",
                "distroversion": "v3.11",
                "packages": [
                    {"pkg": {"name": "openssl", "secfixes": {"1.1.1d-r3": ["CVE-2019-1551"]}}}
                ],
            }
        )
    )
    report = build.build([str(zipped), str(PYPA), str(ALPINE), str(NODEJS)], tmp_path / "all.db")
    by_name = {s.info.name: s for s in report.sources}
    assert set(by_name) == {
        "Debian-all",
        "pypa-advisory-database-3ccb612",
        "alpine-secdb-06f6e96",
        "nodejs-security-wg-npm-f1288d0",
    }
    assert by_name["Debian-all"].info.format == "osv"
    assert by_name["Debian-all"].info.records == 3
    assert by_name["Debian-all"].info.snapshot_date == "2024-07-10T12:00:00Z"
    # The index repeats the 467 files: each advisory once.
    assert by_name["nodejs-security-wg-npm-f1288d0"].info.records == 467
    # A plain file carries no trustworthy date, nor do secdb records: the date is given.
    with pytest.raises(DatabaseError, match="--snapshot-date"):
        build.build([str(secdb_json)], tmp_path / "json.db")
    dated = build.build([str(secdb_json)], tmp_path / "json.db", snapshot_date="2026-11-30")
    assert (dated.sources[0].info.format, dated.sources[0].info.snapshot_date) == (
        "alpine-secdb",
        "2026-11-30",
    )
    store = VulnStore(dated.path)
    assert found(store, pkg("apk", "libcrypto1.1", "1.1.1d-r1", "Alpine:v3.11", "openssl")) == {
        ("CVE-2019-1551", "libcrypto1.1", "1.1.1d-r3")
    }


def test_malformed_records_are_reported_with_file_and_reason(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = osv(
        "PYSEC-9", affected("PyPI", "x", ("ECOSYSTEM", [{"introduced": "0"}, {"fixed": "2"}]))
    )
    (folder / "good.json").write_text(json.dumps(good))
    (folder / "broken.json").write_text("{")
    (folder / "bad-version.yaml").write_text(
        "id: PYSEC-10\naffected:\n- package: {name: y, ecosystem: PyPI}\n"
        "  ranges:\n  - type: ECOSYSTEM\n    events: [{introduced: '0'}, {fixed: not-a-version}]\n"
    )
    (folder / "unknown.json").write_text(json.dumps({"hello": "world"}))
    (folder / "README.md").write_text("not a record")
    (folder / "x.json").touch()
    report = build.build([str(folder)], tmp_path / "m.db", snapshot_date="2024-05-01")
    problems = [(p.file, p.reason) for p in report.sources[0].problems]
    assert problems == [
        (
            "bad-version.yaml",
            "PYSEC-10: 'not-a-version' is not a valid PyPI version (this range skipped)",
        ),
        ("bad-version.yaml", "PYSEC-10: y has no usable version range nor versions"),
        (
            "broken.json",
            "does not parse: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        ("unknown.json", "not an OSV record, an Alpine secdb file or a Node.js WG advisory"),
        ("x.json", "does not parse: Expecting value: line 1 column 1 (char 0)"),
    ]
    assert report.advisories == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "f.json").write_text("{"), "yielded no advisory"),
        (
            lambda d: (d / "f.json").write_text(
                json.dumps(
                    {
                        **osv("X-1", affected("PyPI", "x", ("ECOSYSTEM", [{"introduced": "0"}]))),
                        "modified": "",
                    }
                )
            ),
            "say when it was taken",
        ),
    ],
)
def test_an_import_that_yields_nothing_or_no_date_fails(
    tmp_path: Path, make: Any, message: str
) -> None:
    folder = tmp_path / "feed"
    folder.mkdir()
    make(folder)
    (folder / "x.json").touch()
    with pytest.raises(DatabaseError, match=message):
        build.build([str(folder)], tmp_path / "out.db")
    assert not (tmp_path / "out.db").exists()


def test_corrupt_and_truncated_feeds_are_refused(tmp_path: Path) -> None:
    truncated = tmp_path / "pypa.tar.gz"
    truncated.write_bytes(PYPA.read_bytes()[: PYPA.stat().st_size // 2])
    with pytest.raises(DatabaseError, match="not a readable tar archive"):
        build.build([str(truncated)], tmp_path / "t.db")
    corrupt = tmp_path / "all.zip"
    corrupt.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(DatabaseError, match="not a readable zip archive"):
        build.build([str(corrupt)], tmp_path / "z.db")
    with pytest.raises(DatabaseError, match="no such file"):
        build.build([str(tmp_path / "missing")], tmp_path / "m.db")


# ---- the compiled file ----------------------------------------------------------------------


def test_verify_catches_a_changed_or_truncated_file(tmp_path: Path) -> None:
    copy = tmp_path / "v.db"
    shutil.copyfile(PACKAGED, copy)
    with sqlite3.connect(copy) as connection:
        connection.execute("UPDATE affected SET ranges = '[]' WHERE rowid = 1")
    changed = VulnStore(copy)
    assert any("content checksum" in problem for problem in changed.verify())
    truncated = tmp_path / "short.db"
    truncated.write_bytes(PACKAGED.read_bytes()[:1_000_000])
    with pytest.raises(DatabaseError, match="truncated or damaged"):
        VulnStore(truncated)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DatabaseError, match="not a readable database"):
        VulnStore(garbage)


# ---- update ---------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """An http server on 127.0.0.1 (port 0) serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_update_swaps_in_a_new_database_and_keeps_the_old_on_failure(
    tmp_path: Path, served: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "db"
    debian_zip(tmp_path / "www" / "Debian" / "all.zip")
    url = f"{served}/Debian/all.zip"
    assert db_main(["update", "--from", url, "--db-dir", str(target)], env={}) == 0
    out = capsys.readouterr().out
    assert "updated" in out
    store = VulnStore(target / "vulnerabilities.db")
    (source,) = store.sources
    assert (source.name, source.origin, source.records) == ("Debian-all", url, 3)
    assert found(store, pkg("deb", "libc6", "2.36-9+deb12u1", "Debian:12", "glibc")) == {
        ("CVE-2023-4911", "libc6", "2.36-9+deb12u3")
    }
    # The packaged malware rules came along (the directory was seeded).
    assert (target / "malware.yar").read_bytes() == (DEFAULT_DIR / "malware.yar").read_bytes()
    version = store.version

    # The same data again: nothing to swap.
    assert db_main(["update", "--from", url, "--db-dir", str(target)], env={}) == 0
    assert "already up to date" in capsys.readouterr().out

    # A truncated download, a 404, an unreachable proxy: exit 1, why, and the old database.
    (tmp_path / "www" / "short.zip").write_bytes(
        (tmp_path / "www" / "Debian" / "all.zip").read_bytes()[:200]
    )
    for argv, reason in (
        (["--from", f"{served}/short.zip"], "not a readable zip archive"),
        (["--from", f"{served}/missing.zip"], "answered HTTP 404"),
        (["--from", url, "--proxy-url", "http://127.0.0.1:9"], "cannot fetch"),
    ):
        assert db_main(["update", *argv, "--db-dir", str(target)], env={}) == 1
        err = capsys.readouterr().err
        assert reason in err
        assert f"is unchanged (version {version}" in err
        assert VulnStore(target / "vulnerabilities.db").version == version
    assert [p.name for p in target.iterdir() if p.name.startswith(".vulnerabilities.")] == []


def test_db_cli_info_verify_and_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert db_main(["info"], env={}) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("vulnerabilities  version 2026.04.08-")
    assert "source alpine-secdb-06f6e96: alpine-secdb, snapshot 2020-06-08T00:00:00Z" in out
    assert "production scanners should update" in out
    assert any(line.startswith("malware") for line in lines)
    assert db_main(["info", "--json"], env={}) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["sources"][0]["records"] > 0
    assert db_main(["verify"], env={}) == 0
    assert ": ok (version" in capsys.readouterr().out
    out_file = tmp_path / "b.db"
    assert (
        db_main(
            ["build", "--from", str(debian_zip(tmp_path / "d.zip")), "--out", str(out_file)], env={}
        )
        == 0
    )
    assert "3 advisories" in capsys.readouterr().out
    out_file.write_bytes(out_file.read_bytes()[:-4096])
    assert db_main(["verify", "--file", str(out_file)], env={}) == 1
    assert "truncated or damaged" in (err := capsys.readouterr().err) or "malformed" in err
