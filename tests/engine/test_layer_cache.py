"""The builtin engine's layer cache: a family of images sharing base layers, pushed with
``skopeo`` into a real ``docker-registry`` that logs every request, scanned twice (the second
time by a new engine on the same cache directory, as after a restart). Blob fetches are counted
at the registry; the composed findings are compared with a scan without the cache, including
whiteouts that delete a lower layer's package database and an opaque directory; a damaged
entry is dropped and its layer read again; the least recently used entries are evicted."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagehandler.v1 import common_pb2
from scanner_client.engine import Job, NullProgress, Policy
from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
from scanner_client.engines.builtin.common import CancelToken
from scanner_client.engines.builtin.layer_cache import LayerCache, chain_ids, decode, encode
from scanner_client.engines.builtin.layers import ENTRY_FILE, READ, RETAIN, ImageTree, LayerRecord
from scanner_client.engines.builtin.layers import Entry as Recorded
from tests.conftest import TEST_SCANNER_POLICY
from tests.oci import (
    EICAR,
    Entry,
    Image,
    Layout,
    LocalRegistry,
    directory,
    file,
    hardlink,
    layer,
    symlink,
    tools_missing,
)
from tests.vulnfeeds import DPKG_STATUS, debian_database

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
SITE = "usr/lib/python3/dist-packages"
# The upper layer's dpkg database: openssh-client at the version that fixes its advisories.
DPKG_STATUS_UPPER = """\
Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc
Version: 2.36-9+deb12u1

Package: openssh-client
Status: install ok installed
Architecture: amd64
Source: openssh
Version: 1:9.2p1-2+deb12u99
"""


def metadata(name: str, version: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: test\n"


def npm(name: str, version: str) -> str:
    return json.dumps({"name": name, "version": version})


BASE = layer(
    [
        directory("etc"),
        file("etc/os-release", OS_RELEASE),
        directory("usr/lib"),
        # Debian's merged /usr: what upper layers write under lib/ lands in usr/lib/.
        symlink("lib", "usr/lib"),
        file("var/lib/dpkg/status", DPKG_STATUS),
        file(f"{SITE}/urllib3-2.0.5.dist-info/METADATA", metadata("urllib3", "2.0.5")),
    ]
)
MIDDLE = layer(
    [
        file("app/node_modules/lodash/package.json", npm("lodash", "4.17.15")),
        file(
            "lib/python3/dist-packages/requests-2.19.0.dist-info/METADATA",
            metadata("requests", "2.19.0"),
        ),
        file("app/README", "shared"),
    ]
)
TOPS: dict[str, list[Entry]] = {
    # Malware in the top layer, and a hard link to a lower layer's package metadata.
    "app1": [
        file("app/package.json", npm("app1", "1.0.0")),
        file("app/eicar.com", EICAR),
        hardlink("app/lodash.json", "app/node_modules/lodash/package.json"),
    ],
    # Whiteouts: the lower dpkg database and a Python distribution are deleted.
    "app2": [
        file("var/lib/dpkg/.wh.status"),
        file(f"{SITE}/.wh.urllib3-2.0.5.dist-info"),
        file("app/package.json", npm("app2", "1.0.0")),
    ],
    # An opaque node_modules and a dpkg database replaced by a newer one.
    "app3": [
        file("app/node_modules/.wh..wh..opq"),
        file("app/node_modules/minimist/package.json", npm("minimist", "1.2.6")),
        file("var/lib/dpkg/status", DPKG_STATUS_UPPER),
    ],
    # Pushed after the first pass: only its own layer is new.
    "app4": [file("app/package.json", npm("app4", "1.0.0"))],
}


@dataclass
class Family:
    registry: LocalRegistry
    layers: dict[str, list[str]]  # image -> its layer digests
    db_dir: Path


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Family]:
    missing = tools_missing()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: `apt-get install docker-registry skopeo`")
    work = tmp_path_factory.mktemp("family")
    registry = LocalRegistry(work / "registry", access_log=True)
    try:
        layout = Layout(work / "layout")
        found = {}
        for name, top in TOPS.items():
            image = Image([BASE, MIDDLE, layer(top)], user="1000")
            layout.add(name, image)
            registry.push(layout.path, name, f"family/{name}")
            found[name] = [lay.digest for lay in image.layers]
        yield Family(registry, found, debian_database(work / "db"))
    finally:
        registry.stop()


def engine(family: Family, cache: Path | None, size: int = 1 << 30) -> BuiltinEngine:
    return BuiltinEngine(
        BuiltinSettings(
            db_dir=family.db_dir,
            policy=TEST_SCANNER_POLICY,
            layer_cache_dir=cache,
            layer_cache_size=size,
        )
    )


async def scan(family: Family, scanner: BuiltinEngine, name: str) -> common_pb2.ScanResult:
    image = common_pb2.ImageObject(
        registry=family.registry.address, repository=f"family/{name}", tag=name
    )
    job = Job(job_id=f"job-{name}", run=1, object=common_pb2.ScanObject(image=image))
    return await scanner.scan(job, NullProgress())


def findings(result: common_pb2.ScanResult) -> dict[str, Any]:
    """What a user reads in a result, without the SBOM's serial number and time."""
    document = json.loads(result.sbom)
    return {
        "vulnerabilities": [
            (v.id, v.package, v.installed_version, v.path, v.layer_digest)
            for v in result.vulnerabilities
        ],
        "malware": [(m.name, m.path, m.layer_digest) for m in result.malware],
        "secrets": [(s.rule_id, s.path) for s in result.secrets],
        "misconfigurations": [m.id for m in result.misconfigurations],
        "components": sorted(json.dumps(c, sort_keys=True) for c in document.get("components", [])),
        "verdict": result.verdict,
    }


def layer_fetches(family: Family, since: int) -> list[str]:
    every = {digest for digests in family.layers.values() for digest in digests}
    return [d for d in family.registry.blob_fetches()[since:] if d in every]


async def test_second_scan_fetches_only_new_layers_and_finds_the_same(
    family: Family, tmp_path: Path
) -> None:
    plain = engine(family, None)
    expected = {name: findings(await scan(family, plain, name)) for name in TOPS}
    # What the whiteouts and the opaque directory must have done, read without the cache.
    packages = {name: found["components"] for name, found in expected.items()}
    assert any('"openssh-client"' in c for c in packages["app1"])
    assert not any('"openssh-client"' in c for c in packages["app2"])
    assert not any('"urllib3"' in c for c in packages["app2"])
    assert not any('"lodash"' in c for c in packages["app3"])
    assert any("deb12u99" in c for c in packages["app3"])
    assert expected["app1"]["malware"]

    cache = tmp_path / "cache"
    first = engine(family, cache)
    mark = len(family.registry.blob_fetches())
    for name in ("app1", "app2", "app3"):
        assert findings(await scan(family, first, name)) == expected[name]
    # Cold: every distinct layer once (app2 and app3 already share app1's base and middle).
    distinct = {d for name in ("app1", "app2", "app3") for d in family.layers[name]}
    assert sorted(layer_fetches(family, mark)) == sorted(distinct)

    # A new engine on the same directory (a restart): no layer of a scanned image is fetched,
    # and a new image of the family fetches only its own top layer.
    second = engine(family, cache)
    mark = len(family.registry.blob_fetches())
    for name in TOPS:
        assert findings(await scan(family, second, name)) == expected[name], name
    assert layer_fetches(family, mark) == [family.layers["app4"][-1]]
    assert second.layer_cache is not None
    assert second.layer_cache.damaged == 0


async def test_a_truncated_entry_is_dropped_and_its_layer_read_again(
    family: Family, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    expected = findings(await scan(family, engine(family, cache), "app3"))
    entries = sorted((cache / "entries").rglob("*"))
    entries = [path for path in entries if path.is_file()]
    assert len(entries) == 3
    for path in entries:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    again = engine(family, cache)
    mark = len(family.registry.blob_fetches())
    assert findings(await scan(family, again, "app3")) == expected
    assert sorted(layer_fetches(family, mark)) == sorted(family.layers["app3"])
    assert again.layer_cache is not None
    assert again.layer_cache.damaged == 3
    # Written again, whole: the next scan reads nothing from the registry.
    mark = len(family.registry.blob_fetches())
    assert findings(await scan(family, engine(family, cache), "app3")) == expected
    assert layer_fetches(family, mark) == []


async def test_new_rules_or_other_policies_read_the_layers_again(
    family: Family, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    scanner = engine(family, cache)
    await scan(family, scanner, "app1")
    packages_only = scanner._cache_profile(frozenset({Policy.VULNERABILITIES}))
    everything = scanner._cache_profile(frozenset(Policy))
    assert packages_only != everything
    # The malware rules' version is part of the key when malware is matched.
    rules = scanner.db.entries["malware"]
    scanner.db.entries["malware"] = type(rules)(**{**vars(rules), "version": "newer"})
    assert scanner._cache_profile(frozenset(Policy)) != everything
    assert scanner._cache_profile(frozenset({Policy.VULNERABILITIES})) == packages_only


# ---- the record, the format and the eviction, without a registry ----------------------------


class KeepAll:
    def wants(self, rel: str, size: int, mode: int) -> int:
        return READ | RETAIN

    def analyse(self, rel: str, data: bytes) -> None:
        return None


def snapshot(tree: ImageTree) -> list[tuple[str, str, str, bytes | None, str]]:
    return sorted(
        (rel, node.kind, node.layer, node.data, node.target) for rel, node in tree.nodes.items()
    )


def test_a_replayed_record_builds_the_same_tree(tmp_path: Path) -> None:
    layers = [
        [
            file("a/gone.txt", "1"),
            file("dir/lower.txt", "1"),
            file("dir/sub/lower.txt", "1"),
            symlink("lib", "usr/lib"),
            directory("usr/lib"),
            file("../escape", "x"),
        ],
        [
            file("a/.wh.gone.txt"),
            file("dir/.wh..wh..opq"),
            file("dir/upper.txt", "2"),
            file("lib/landed.so", "3"),
            hardlink("dir/linked", "dir/upper.txt"),
        ],
    ]
    blobs = []
    for index, entries in enumerate(layers):
        blob = tmp_path / f"layer-{index}"
        blob.write_bytes(layer(entries).blob)
        blobs.append(blob)
    read = ImageTree()
    records = []
    for index, blob in enumerate(blobs):
        record = LayerRecord()
        read.apply(blob, f"l{index}", CancelToken(), KeepAll(), record=record)
        records.append(decode(encode(record)))
    replayed = ImageTree()
    for index, record in enumerate(records):
        replayed.replay(record, f"l{index}", CancelToken(), KeepAll())
    assert snapshot(replayed) == snapshot(read)
    assert replayed.skipped == read.skipped
    assert "usr/lib/landed.so" in replayed.nodes
    assert "a/gone.txt" not in replayed.nodes
    assert "dir/lower.txt" not in replayed.nodes


def test_chain_ids_depend_on_every_layer_below() -> None:
    assert chain_ids(["a", "b"])[0] == chain_ids(["a", "c"])[0]
    assert chain_ids(["a", "b"])[1] != chain_ids(["x", "b"])[1]


def test_least_recently_used_entries_are_evicted(tmp_path: Path) -> None:
    record = LayerRecord(
        [
            Recorded(ENTRY_FILE, f"f{i}", size=128, read=True, data=os.urandom(64).hex().encode())
            for i in range(40)
        ]
    )
    size = len(encode(record))
    cache = LayerCache(tmp_path / "cache", max_bytes=3 * size + size // 2)
    for key in ("a" * 64, "b" * 64, "c" * 64):
        cache.put(key, record)
    # "a" used last: "b" is the least recently used when "d" arrives.
    os.utime(cache.path("b" * 64), (1, 1))
    os.utime(cache.path("c" * 64), (2, 2))
    assert cache.get("a" * 64) is not None
    cache.put("d" * 64, record)
    cache.evict()
    assert not cache.contains("b" * 64)
    assert all(cache.contains(k * 64) for k in "acd")
    assert cache.usage() <= cache.max_bytes
