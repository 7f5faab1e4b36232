"""The rpm database: what RHEL, UBI, Fedora, CentOS, Rocky, Alma, Amazon Linux and openSUSE
images have installed.

Current releases keep it in SQLite (``rpmdb.sqlite``: one ``Packages`` table of header blobs);
older ones (RHEL and CentOS 7 and 8, UBI 8, Amazon Linux 2) in a Berkeley DB hash file named
``Packages`` whose values are the same blobs (:func:`read_berkeley` reads its pages directly,
as rpm's own read-only ``bdb_ro`` backend does). Each blob is an rpm *header*, the same
structure as in an ``.rpm`` file without its lead and magic:

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
BERKELEY_PATHS: Final = (
    "var/lib/rpm/Packages",
    "usr/lib/sysimage/rpm/Packages",
    "usr/share/rpm/Packages",
)

# Berkeley DB: the hash access method's magic and the page types its hash files hold.
BDB_HASH_MAGIC: Final = 0x00061561
BDB_PAGE_HASH_UNSORTED: Final = 2
BDB_PAGE_OVERFLOW: Final = 7
BDB_PAGE_HASH: Final = 13
BDB_ITEM_KEYDATA: Final = 1
BDB_ITEM_OFFPAGE: Final = 3
BDB_PAGE_HEADER: Final = 26

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

    def add(self, blob: object) -> None:
        """Take one stored value: a package header, else counted as unreadable."""
        if not isinstance(blob, bytes):
            self.unreadable += 1
            return
        try:
            package = parse_header(blob)
        except (HeaderError, struct.error):
            self.unreadable += 1
            return
        # Imported signing keys are headers too, not installed software.
        if package.name != "gpg-pubkey":
            self.packages.append(package)


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
        found.add(blob)
    return found


def read_berkeley(database: bytes) -> RpmDatabase:
    """The packages of a Berkeley DB ``Packages`` hash file: every value of every hash page
    (inline, or on a chain of overflow pages) that is a header blob. Keys are the header
    numbers and are not needed; the 4-byte value of key 0 (rpm's next instance number) is no
    header and is passed over."""
    if len(database) < 512:
        raise HeaderError("shorter than a Berkeley DB meta page")
    for order in ("<", ">"):
        if struct.unpack_from(order + "I", database, 12)[0] == BDB_HASH_MAGIC:
            break
    else:
        raise HeaderError("not a Berkeley DB hash file")
    page_size = struct.unpack_from(order + "I", database, 20)[0]
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        raise HeaderError(f"implausible page size {page_size}")
    pages = len(database) // page_size
    found = RpmDatabase([])
    for number in range(1, pages):
        page = memoryview(database)[number * page_size : (number + 1) * page_size]
        if page[25] not in (BDB_PAGE_HASH, BDB_PAGE_HASH_UNSORTED):
            continue
        if struct.unpack_from(order + "I", page, 8)[0] != number:
            continue  # a page never written (all zeros) or not this one
        entries = struct.unpack_from(order + "H", page, 20)[0]
        entries = min(entries, (page_size - BDB_PAGE_HEADER) // 2)
        offsets = struct.unpack_from(f"{order}{entries}H", page, BDB_PAGE_HEADER)
        for index in range(1, entries, 2):  # key, value, key, value...
            start = offsets[index]
            end = offsets[index - 1]
            if not BDB_PAGE_HEADER + 2 * entries <= start < end <= page_size:
                found.unreadable += 1
                continue
            value = _berkeley_value(database, order, page_size, page[start:end])
            if value is None or len(value) > 4:  # 4 bytes: key 0, rpm's instance counter
                found.add(value)
    return found


def _berkeley_value(database: bytes, order: str, page_size: int, item: memoryview) -> bytes | None:
    """The bytes of a hash item: inline, or gathered from its overflow pages."""
    if item[0] == BDB_ITEM_KEYDATA:
        return bytes(item[1:])
    if item[0] != BDB_ITEM_OFFPAGE or len(item) < 12:
        return None
    number, length = struct.unpack_from(order + "II", item, 4)
    if length > MAX_DATA_BYTES + (1 << 20):
        return None
    parts: list[bytes] = []
    remaining = length
    seen: set[int] = set()
    while remaining > 0:
        if number in seen or not 0 < number < len(database) // page_size:
            return None  # a loop, or a page outside the file
        seen.add(number)
        page = memoryview(database)[number * page_size : (number + 1) * page_size]
        if page[25] != BDB_PAGE_OVERFLOW:
            return None
        size = struct.unpack_from(order + "H", page, 22)[0]
        if size > page_size - BDB_PAGE_HEADER or size > remaining:
            return None
        parts.append(bytes(page[BDB_PAGE_HEADER : BDB_PAGE_HEADER + size]))
        remaining -= size
        number = struct.unpack_from(order + "I", page, 16)[0]
    return b"".join(parts)
