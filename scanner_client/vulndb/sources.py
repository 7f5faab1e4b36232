"""Where feeds come from: a file, a directory, a zip or tar archive of record files, or an
http(s) URL of any of those (fetched through the scanner's proxy).

A source is read once, member by member, and reports its checksum (SHA-256 of the file or
archive; for a directory, of its files' names and contents) and its snapshot time: the newest
modification time of an archive's members (``git archive`` and osv.dev's exports set it to the
time of the snapshot), or an HTTP ``Last-Modified``. Directories and plain files carry no
trustworthy date (a checkout's files are as new as the checkout): their records' own dates
are used instead (see :mod:`scanner_client.vulndb.build`).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Final

import httpx

from scanner_client.db import DatabaseError

RECORD_SUFFIXES: Final = (".json", ".yaml", ".yml")
LICENCE_NAMES: Final = frozenset({"LICENSE", "LICENSE.md", "LICENSE.txt", "COPYING", "LICENCE"})
# One record file, and one whole download: feeds are large (osv.dev's Debian export is
# hundreds of MB unpacked) but not unbounded.
MAX_MEMBER_BYTES: Final = 64 * 1024 * 1024
MAX_DOWNLOAD_BYTES: Final = 4 * 1024 * 1024 * 1024
_GENERIC_NAMES: Final = frozenset({"all", "index", "main", "community", "vulns", "npm"})


@dataclass
class Member:
    """One file of a source: its path inside the source and its bytes."""

    path: str
    data: bytes


@dataclass
class Source:
    """A local file or directory to read (a URL is fetched into one first)."""

    name: str
    origin: str
    path: Path
    # Set by a download: the server's Last-Modified.
    last_modified: datetime | None = None
    sha256: str = ""
    # The newest member modification time of an archive.
    archive_time: datetime | None = None
    licence: str = ""
    skipped: list[str] = field(default_factory=list)

    def members(self) -> Iterator[Member]:
        """Every record file (json, yaml) of the source; sets sha256, archive_time and
        licence as it goes (read them after the iteration ends)."""
        path = self.path
        if path.is_dir():
            yield from self._directory(path)
            return
        if not path.is_file():
            raise DatabaseError(f"{self.origin}: no such file or directory")
        kind = archive_kind(path)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        self.sha256 = digest.hexdigest()
        if kind == "zip":
            yield from self._zip(path)
        elif kind == "tar":
            yield from self._tar(path)
        else:
            if path.stat().st_size > MAX_MEMBER_BYTES:
                raise DatabaseError(f"{self.origin}: larger than {MAX_MEMBER_BYTES} bytes")
            yield Member(path.name, path.read_bytes())

    def _keep(self, name: str, size: int, data: IO[bytes] | None = None) -> bool:
        base = name.rsplit("/", 1)[-1]
        if base in LICENCE_NAMES and data is not None and not self.licence:
            self.licence = licence_name(data.read(4096))
        if not base.endswith(RECORD_SUFFIXES) or base.startswith("."):
            return False
        if size > MAX_MEMBER_BYTES:
            raise DatabaseError(f"{self.origin}: {name} is larger than {MAX_MEMBER_BYTES} bytes")
        return True

    def _directory(self, root: Path) -> Iterator[Member]:
        digest = hashlib.sha256()
        for directory, subdirectories, files in os.walk(root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            for name in sorted(files):
                full = Path(directory, name)
                rel = full.relative_to(root).as_posix()
                data = full.read_bytes()
                digest.update(f"{rel}\0{len(data)}\0".encode())
                digest.update(data)
                if self._keep(rel, len(data), io.BytesIO(data)):
                    yield Member(rel, data)
        self.sha256 = digest.hexdigest()

    def _zip(self, path: Path) -> Iterator[Member]:
        try:
            with zipfile.ZipFile(path) as archive:
                for info in sorted(archive.infolist(), key=lambda i: i.filename):
                    if info.is_dir():
                        continue
                    self._saw_time(datetime(*info.date_time, tzinfo=UTC))
                    with archive.open(info) as handle:
                        if self._keep(info.filename, info.file_size, handle):
                            yield Member(info.filename, archive.read(info))
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise DatabaseError(f"{self.origin}: not a readable zip archive: {exc}") from None

    def _tar(self, path: Path) -> Iterator[Member]:
        try:
            with tarfile.open(path, "r:*") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    self._saw_time(datetime.fromtimestamp(info.mtime, UTC))
                    handle = archive.extractfile(info)
                    if handle is not None and self._keep(info.name, info.size, handle):
                        handle = archive.extractfile(info)
                        assert handle is not None
                        yield Member(info.name, handle.read())
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DatabaseError(f"{self.origin}: not a readable tar archive: {exc}") from None

    def _saw_time(self, when: datetime) -> None:
        if self.archive_time is None or when > self.archive_time:
            self.archive_time = when

    @property
    def snapshot_time(self) -> datetime | None:
        """When the snapshot was taken, where the source itself says so."""
        return self.archive_time or self.last_modified


def archive_kind(path: Path) -> str:
    """ "zip", "tar" (plain or compressed) or "file"."""
    with open(path, "rb") as handle:
        head = handle.read(262)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if head[257:262] == b"ustar":
        return "tar"
    return "file"


def licence_name(head: bytes) -> str:
    """The first non-empty line of a licence file, as its name ("MIT License", ...)."""
    for line in head.decode("utf-8", "replace").splitlines():
        text = line.strip().strip("#").strip()
        if text:
            return text[:120]
    return ""


def source_name(origin: str) -> str:
    """A short name for the manifest: the file name without extensions, with its parent
    directory's name when the file name says nothing (osv.dev's ``PyPI/all.zip``)."""
    parts = [part for part in origin.rstrip("/").split("?")[0].split("/") if part]
    if not parts:
        return "source"
    base = parts[-1]
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip", ".json", ".yaml"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base in _GENERIC_NAMES and len(parts) >= 2:
        base = f"{parts[-2]}-{base}"
    return base or "source"


def is_url(origin: str) -> bool:
    return origin.startswith(("http://", "https://"))


def fetch(origin: str, directory: Path, proxy: str = "", timeout: float = 120.0) -> Source:
    """Download ``origin`` into ``directory``; DatabaseError says why it failed."""
    target = directory / f"download-{hashlib.sha256(origin.encode()).hexdigest()[:12]}"
    written = 0
    try:
        with (
            httpx.Client(
                proxy=proxy or None, follow_redirects=True, trust_env=False, timeout=timeout
            ) as client,
            client.stream("GET", origin) as response,
        ):
            if response.status_code != 200:
                raise DatabaseError(f"{origin} answered HTTP {response.status_code}")
            last_modified = _http_date(response.headers.get("last-modified", ""))
            with open(target, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    written += len(chunk)
                    if written > MAX_DOWNLOAD_BYTES:
                        raise DatabaseError(f"{origin} is larger than {MAX_DOWNLOAD_BYTES} bytes")
                    out.write(chunk)
    except httpx.HTTPError as exc:
        raise DatabaseError(f"cannot fetch {origin}: {exc}") from None
    return Source(source_name(origin), origin, target, last_modified=last_modified)


def _http_date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).astimezone(UTC)
    except (TypeError, ValueError):
        return None


def local(origin: str) -> Source:
    path = Path(origin)
    if not path.exists():
        raise DatabaseError(f"{origin}: no such file or directory")
    return Source(source_name(str(path.resolve())), origin, path)
