"""The rpm database: what RHEL, UBI, Fedora, CentOS, Rocky, Alma, Amazon Linux and openSUSE
images have installed.

Current releases keep it in SQLite (``rpmdb.sqlite``: one ``Packages`` table of header blobs);
each blob is an rpm *header*, the same structure as in an ``.rpm`` file without its lead and
magic:

- ``il`` and ``dl`` (big-endian 32-bit): the number of index entries and the data size;
- ``il`` index entries of 16 bytes: tag, type, offset into the data, count;
- ``dl`` bytes of data: strings are NUL-terminated, integers big-endian.

Only the tags a package record needs are read (name, epoch, version, release, arch, source
rpm, and the file list: dirnames, basenames, dirindexes). A blob that does not follow the
structure is skipped, and counted, never guessed at.
"""

from __future__ import annotations

import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# Where rpm keeps its database: /var/lib/rpm (RHEL, CentOS, UBI, Amazon Linux) or
# /usr/lib/sysimage/rpm (Fedora 36 and later, openSUSE; /var/lib/rpm is then a link).
RPMDB_PATHS: Final = (
    "var/lib/rpm/rpmdb.sqlite",
    "usr/lib/sysimage/rpm/rpmdb.sqlite",
    "usr/share/rpm/rpmdb.sqlite",
)

TAG_NAME: Final = 1000
TAG_VERSION: Final = 1001
TAG_RELEASE: Final = 1002
TAG_EPOCH: Final = 1003
TAG_ARCH: Final = 1022
TAG_OLDFILENAMES: Final = 1027
TAG_SOURCERPM: Final = 1044
TAG_DIRINDEXES: Final = 1116
TAG_BASENAMES: Final = 1117
TAG_DIRNAMES: Final = 1118

TYPE_INT32: Final = 4
TYPE_STRING: Final = 6
TYPE_STRING_ARRAY: Final = 8
TYPE_I18NSTRING: Final = 9
_WANTED: Final = frozenset(
    {
        TAG_NAME,
        TAG_VERSION,
        TAG_RELEASE,
        TAG_EPOCH,
        TAG_ARCH,
        TAG_OLDFILENAMES,
        TAG_SOURCERPM,
        TAG_DIRINDEXES,
        TAG_BASENAMES,
        TAG_DIRNAMES,
    }
)
# A header larger than this is not a package record (rpm's own limit is 256 MiB of data; real
# headers are kilobytes to a few MiB).
MAX_INDEX_ENTRIES: Final = 1 << 16
MAX_DATA_BYTES: Final = 64 << 20


class HeaderError(ValueError):
    """A header blob that does not follow rpm's structure."""


@dataclass(frozen=True)
class RpmPackage:
    name: str
    version: str
    release: str
    epoch: int | None
    arch: str
    source_rpm: str
    files: tuple[str, ...] = field(default=(), repr=False)

    @property
    def full_version(self) -> str:
        """``[epoch:]version-release``, as Syft and Grype name an rpm package's version."""
        version = f"{self.version}-{self.release}" if self.release else self.version
        return f"{self.epoch}:{version}" if self.epoch is not None else version

    @property
    def source_name(self) -> str:
        """The source package's name, from ``NAME-VERSION-RELEASE.src.rpm``."""
        if not self.source_rpm:
            return self.name
        stem = self.source_rpm.removesuffix(".rpm").rsplit(".", 1)[0]  # drop .src / .nosrc
        parts = stem.rsplit("-", 2)
        return parts[0] if len(parts) == 3 and parts[0] else self.name


def parse_header(blob: bytes) -> RpmPackage:
    """The package record of one header blob; HeaderError when it is not one."""
    if len(blob) < 8:
        raise HeaderError("shorter than a header's counts")
    index_count, data_size = struct.unpack_from(">II", blob, 0)
    if not 0 < index_count <= MAX_INDEX_ENTRIES or data_size > MAX_DATA_BYTES:
        raise HeaderError(f"implausible counts ({index_count} entries, {data_size} bytes)")
    data_start = 8 + 16 * index_count
    if data_start + data_size > len(blob):
        raise HeaderError("the data store runs past the blob")
    data = blob[data_start : data_start + data_size]
    values: dict[int, object] = {}
    for entry in range(index_count):
        tag, kind, offset, count = struct.unpack_from(">iIiI", blob, 8 + 16 * entry)
        if tag not in _WANTED:
            continue
        if offset < 0 or offset >= data_size:
            raise HeaderError(f"tag {tag} points outside the data store")
        values[tag] = _value(data, kind, offset, count, tag)
    name = _string(values.get(TAG_NAME))
    version = _string(values.get(TAG_VERSION))
    if not name or not version:
        raise HeaderError("no name or version")
    epoch_values = values.get(TAG_EPOCH)
    epoch = epoch_values[0] if isinstance(epoch_values, list) and epoch_values else None
    return RpmPackage(
        name=name,
        version=version,
        release=_string(values.get(TAG_RELEASE)),
        epoch=epoch if isinstance(epoch, int) else None,
        arch=_string(values.get(TAG_ARCH)),
        source_rpm=_string(values.get(TAG_SOURCERPM)),
        files=tuple(_files(values)),
    )


def _value(data: bytes, kind: int, offset: int, count: int, tag: int) -> object:
    if kind == TYPE_INT32:
        if offset + 4 * count > len(data):
            raise HeaderError(f"tag {tag}: integers run past the data store")
        return list(struct.unpack_from(f">{count}i", data, offset))
    if kind in (TYPE_STRING, TYPE_STRING_ARRAY, TYPE_I18NSTRING):
        strings = []
        position = offset
        for _ in range(1 if kind == TYPE_STRING else count):
            end = data.find(b"\x00", position)
            if end < 0:
                raise HeaderError(f"tag {tag}: a string runs past the data store")
            strings.append(data[position:end].decode("utf-8", "replace"))
            position = end + 1
        return strings[0] if kind == TYPE_STRING else strings
    raise HeaderError(f"tag {tag} has an unexpected type {kind}")


def _string(value: object) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ""


def _files(values: dict[int, object]) -> Iterator[str]:
    """The package's paths, relative to the root (dirnames[dirindexes[i]] + basenames[i])."""
    basenames = values.get(TAG_BASENAMES)
    dirnames = values.get(TAG_DIRNAMES)
    indexes = values.get(TAG_DIRINDEXES)
    if isinstance(basenames, list) and isinstance(dirnames, list) and isinstance(indexes, list):
        for base, index in zip(basenames, indexes, strict=False):
            if isinstance(index, int) and 0 <= index < len(dirnames):
                yield f"{dirnames[index]}{base}".lstrip("/")
        return
    old = values.get(TAG_OLDFILENAMES)
    if isinstance(old, list):
        yield from (str(name).lstrip("/") for name in old)


@dataclass
class RpmDatabase:
    packages: list[RpmPackage]
    # Blobs that were not package headers (a damaged or foreign database).
    unreadable: int = 0


def read_sqlite(database: bytes, wal: bytes | None = None) -> RpmDatabase:
    """The packages of an ``rpmdb.sqlite`` (and its write-ahead log, whose pages may not have
    been written back yet). The bytes are opened in a private temporary directory, never where
    they came from (a node's own database is not touched)."""
    with tempfile.TemporaryDirectory(prefix="rpmdb-") as scratch:
        path = Path(scratch) / "rpmdb.sqlite"
        path.write_bytes(database)
        if wal:
            (Path(scratch) / "rpmdb.sqlite-wal").write_bytes(wal)
        try:
            connection = sqlite3.connect(path)
        except sqlite3.Error as exc:
            raise HeaderError(f"not an SQLite database: {exc}") from None
        try:
            rows = connection.execute("SELECT blob FROM Packages ORDER BY hnum").fetchall()
        except sqlite3.Error as exc:
            raise HeaderError(f"no readable Packages table: {exc}") from None
        finally:
            connection.close()
            shutil.rmtree(scratch, ignore_errors=True)
    found = RpmDatabase([])
    for (blob,) in rows:
        if not isinstance(blob, bytes):
            found.unreadable += 1
            continue
        try:
            package = parse_header(blob)
        except (HeaderError, struct.error):
            found.unreadable += 1
            continue
        # Imported signing keys are headers too, not installed software.
        if package.name != "gpg-pubkey":
            found.packages.append(package)
    return found
