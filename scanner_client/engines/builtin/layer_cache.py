"""The layer cache: what the builtin engine learned from a layer, kept on disk so that a layer
seen before is neither downloaded nor unpacked again (``--layer-cache-dir``,
``--layer-cache-size``).

An entry is a :class:`~scanner_client.engines.builtin.layers.LayerRecord`: the layer's entries
in tar order (names, types, sizes, modes, links; whiteouts and opaque markers are entries too),
with the facts of the files the analyser read (packages, malware and secret hits) and the bytes
of the package databases it keeps. An image is composed by replaying its layers' records in
order through the same :class:`~scanner_client.engines.builtin.layers.ImageTree` code that
reads blobs, so whiteouts, opaque directories, links and limits apply exactly as unpacking
would.

**Keys.** An entry is keyed by the layer's digest *and the digests of the layers below it* (the
OCI chain): where a file lands and whether it is read depend on the tree below (a parent that is
a symbolic link, as Debian's merged ``/lib -> usr/lib``; a hard link to a lower file). Images
built on the same base share the base's entries. The key also holds the analysis profile: the
engine's analysis version, what is read (the malware and secret namespaces, the match size
limit) and, when malware or secrets are matched, the rules' versions: new rules rescan.

**On disk.** ``DIR/entries/XX/KEY`` holds a header (magic, the body's length and SHA-256) and a
zlib-compressed JSON body. An entry is written to a temporary file in ``DIR/tmp`` and renamed
into place: readers see a whole entry or none, and entries are immutable (the same key always
has the same content), so several slots and several scanners may share a directory. A read
that finds a short, damaged or unreadable entry deletes it and reports a miss: the layer is
downloaded and read again. Use refreshes the entry's modification time; when the entries pass
``--layer-cache-size``, the least recently used are deleted (under an advisory lock, so that two
evictions do not race).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from scanner_client.engines.builtin import catalog
from scanner_client.engines.builtin.analyzers import Package
from scanner_client.engines.builtin.files import FileFacts
from scanner_client.engines.builtin.layers import (
    ENTRY_DIR,
    ENTRY_FILE,
    ENTRY_HARDLINK,
    ENTRY_OTHER,
    ENTRY_SYMLINK,
    Entry,
    LayerRecord,
)
from scanner_client.engines.builtin.malware import Hit

log = structlog.get_logger("scanner_client.layer_cache")

# Bump when what the analysers find in a file changes: older entries are then not used.
ANALYSIS_VERSION: Final = 1
MAGIC: Final = b"IHLAYER1"
_HEADER = struct.Struct(">8sQ32s")  # magic, body length, SHA-256 of the body
_TYPES: Final = frozenset({ENTRY_DIR, ENTRY_FILE, ENTRY_SYMLINK, ENTRY_HARDLINK, ENTRY_OTHER})
_PACKAGE_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Package))
DEFAULT_SIZE: Final = 2 << 30


class CorruptEntry(ValueError):
    """An entry that cannot be read back as it was written."""


def chain_ids(digests: Sequence[str]) -> list[str]:
    """For each layer, a digest of it and every layer below it (the OCI chain)."""
    found: list[str] = []
    chain = ""
    for digest in digests:
        chain = (
            digest
            if not chain
            else "sha256:" + hashlib.sha256(f"{chain} {digest}".encode()).hexdigest()
        )
        found.append(chain)
    return found


def profile(namespaces: frozenset[str], rules_version: str, max_match_bytes: int) -> str:
    """What the analyser reads and finds, as part of the key."""
    return json.dumps(
        [
            ANALYSIS_VERSION,
            _PACKAGE_FIELDS,
            catalog.MAX_CATALOG_BYTES,
            catalog.MIN_GO_BINARY,
            sorted(namespaces),
            rules_version if namespaces else "",
            max_match_bytes if namespaces else 0,
        ]
    )


class LayerCache:
    """Layer records on disk under ``root``, at most about ``max_bytes`` of them."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_SIZE) -> None:
        if max_bytes <= 0:
            raise ValueError(f"--layer-cache-size must be positive, got {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self.entries = root / "entries"
        self.tmp = root / "tmp"
        try:
            self.entries.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.tmp, delete=True)  # noqa: SIM115
            probe.close()
        except OSError as exc:
            raise ValueError(
                f"--layer-cache-dir {root} cannot be used: {exc.strerror or exc}"
            ) from None
        self._lock_path = root / "lock"
        # Since start: lookups answered, lookups missed, damaged entries deleted.
        self.hits = 0
        self.misses = 0
        self.damaged = 0
        # Bytes written since the last eviction pass (a pass lists the directory).
        self._written = max_bytes  # the first write checks the size

    def key(self, chain: str, profile: str) -> str:
        return hashlib.sha256(f"{chain}\n{profile}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.entries / key[:2] / key

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    # ---- reading ----------------------------------------------------------------------------

    def get(self, key: str) -> LayerRecord | None:
        """The record under ``key``; None when there is none, or when it was damaged (then it
        is deleted, and logged)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:
            log.warning("layer cache entry unreadable", key=key, error=str(exc))
            self.misses += 1
            return None
        try:
            record = decode(raw)
        except CorruptEntry as exc:
            log.warning(
                "layer cache entry damaged: deleted, the layer is read again",
                key=key,
                problem=str(exc),
            )
            self.damaged += 1
            self.misses += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be evicted
        self.hits += 1
        return record

    def drop(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.path(key).unlink()

    # ---- writing ----------------------------------------------------------------------------

    def put(self, key: str, record: LayerRecord) -> int:
        """Keep ``record`` under ``key`` (atomically); its size on disk. A failure to write is
        logged and the scan goes on: the cache only saves work."""
        payload = encode(record)
        if len(payload) > self.max_bytes:
            return 0
        path = self.path(key)
        temp = ""
        try:
            path.parent.mkdir(exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.tmp, prefix=key[:16])
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
            os.replace(temp, path)
        except OSError as exc:
            log.warning("layer cache entry not written", key=key, error=str(exc))
            if temp:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            return 0
        self._written += len(payload)
        if self._written >= self.max_bytes // 16:
            self._written = 0
            self.evict()
        return len(payload)

    def usage(self) -> int:
        """Bytes the entries take."""
        return sum(size for _, size, _ in self._listing())

    def _listing(self) -> list[tuple[float, int, Path]]:
        found = []
        for shard in self.entries.iterdir():
            with contextlib.suppress(OSError):
                for entry in shard.iterdir():
                    with contextlib.suppress(OSError):
                        info = entry.stat()
                        found.append((info.st_mtime, info.st_size, entry))
        return found

    def evict(self) -> list[Path]:
        """Delete the least recently used entries until the rest fit ``max_bytes``."""
        removed = []
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            listing = sorted(self._listing())
            total = sum(size for _, size, _ in listing)
            for _mtime, size, path in listing:
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
                total -= size
            # Temporary files a killed writer left (older than an hour).
            hour_ago = time.time() - 3600
            for stale in self.tmp.iterdir():
                with contextlib.suppress(OSError):
                    if stale.stat().st_mtime < hour_ago:
                        stale.unlink()
        return removed


# ---- the format ---------------------------------------------------------------------------


def encode(record: LayerRecord) -> bytes:
    entries = []
    for entry in record.entries:
        row: list[Any] = [entry.type, entry.name, entry.size, entry.mode, entry.linkname]
        if entry.read:
            row.append(_facts_to_json(entry.facts))
            row.append(base64.b64encode(entry.data).decode() if entry.data is not None else None)
        entries.append(row)
    body = zlib.compress(json.dumps({"v": ANALYSIS_VERSION, "entries": entries}).encode(), 3)
    return _HEADER.pack(MAGIC, len(body), hashlib.sha256(body).digest()) + body


def decode(raw: bytes) -> LayerRecord:
    if len(raw) < _HEADER.size:
        raise CorruptEntry(f"{len(raw)} bytes: shorter than the header")
    magic, length, digest = _HEADER.unpack_from(raw)
    body = raw[_HEADER.size :]
    if magic != MAGIC:
        raise CorruptEntry("not a layer cache entry")
    if len(body) != length:
        raise CorruptEntry(f"the body has {len(body)} of {length} bytes (truncated)")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptEntry("the body does not match its checksum")
    try:
        document = json.loads(zlib.decompress(body))
        if document.get("v") != ANALYSIS_VERSION:
            raise CorruptEntry(f"analysis version {document.get('v')!r}")
        entries = [_entry(row) for row in document["entries"]]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, zlib.error) as exc:
        raise CorruptEntry(f"the body cannot be read: {exc}") from None
    return LayerRecord(entries)


def _entry(row: list[Any]) -> Entry:
    kind, name, size, mode, linkname = row[:5]
    if kind not in _TYPES or not isinstance(name, str) or not isinstance(linkname, str):
        raise ValueError(f"entry {row[:5]!r:.200}")
    if not isinstance(size, int) or not isinstance(mode, int):
        raise ValueError(f"entry {row[:5]!r:.200}")
    entry = Entry(kind, name, size=size, mode=mode, linkname=linkname)
    if len(row) > 5:
        entry.read = True
        entry.facts = _facts_from_json(row[5])
        entry.data = base64.b64decode(row[6], validate=True) if row[6] is not None else None
    return entry


def _facts_to_json(facts: Any) -> Any:
    if not isinstance(facts, FileFacts):
        return None
    return {
        "p": [[getattr(p, name) for name in _PACKAGE_FIELDS] for p in facts.packages],
        "m": [[_hit_to_json(hit), digest] for hit, digest in facts.malware],
        "s": [[_hit_to_json(hit), line] for hit, line in facts.secrets],
    }


def _facts_from_json(value: Any) -> FileFacts | None:
    if value is None:
        return None
    return FileFacts(
        packages=[Package(**dict(zip(_PACKAGE_FIELDS, row, strict=True))) for row in value["p"]],
        malware=[(_hit_from_json(hit), str(digest)) for hit, digest in value["m"]],
        secrets=[(_hit_from_json(hit), int(line)) for hit, line in value["s"]],
    )


def _hit_to_json(hit: Hit) -> list[Any]:
    instances = [[offset, base64.b64encode(data).decode()] for offset, data in hit.instances]
    return [hit.namespace, hit.rule, hit.meta, hit.offset, instances]


def _hit_from_json(value: list[Any]) -> Hit:
    namespace, rule, meta, offset, instances = value
    return Hit(
        str(namespace),
        str(rule),
        dict(meta),
        int(offset),
        tuple((int(o), base64.b64decode(d, validate=True)) for o, d in instances),
    )
