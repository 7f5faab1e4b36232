"""The compiled vulnerability database: one SQLite file per build.

Tables: ``meta`` (format, schema, version, release date, content checksum), ``sources`` (per
feed: origin, format, snapshot date, record count, checksum, licence, problems), ``advisories``
(id, aliases, title, severity), ``affected`` (ecosystem, release, package name, ranges and
versions as JSON; indexed by ecosystem and name) and ``coverage`` (which ecosystem and release
each source has data for, so that "no data for this release" can be told apart from "no known
vulnerability").

The file is never changed in place: a build writes a new file and an update swaps it in with a
rename, so readers open it ``immutable`` (no locks, no journal). ``content_sha256`` is a
checksum of every row in a fixed order (not of the file's bytes, which depend on the SQLite
library that wrote them): :meth:`VulnStore.verify` recomputes it, and two builds of the same
feeds have the same one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from scanner_client.db import DatabaseError
from scanner_client.vulndb.model import Advisory
from scanner_client.vulndb.versions import Event, Range

FORMAT: Final = "image-handler-vulndb"
SCHEMA_VERSION: Final = 1
# Enough to map the whole database file (a few MiB); SQLite maps only what the file holds.
MMAP_BYTES: Final = 256 << 20
PAGE_SIZE: Final = 4096

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources (
    name TEXT PRIMARY KEY, format TEXT NOT NULL, origin TEXT NOT NULL,
    snapshot_date TEXT NOT NULL, records INTEGER NOT NULL, sha256 TEXT NOT NULL,
    licence TEXT NOT NULL, problems INTEGER NOT NULL, left_out INTEGER NOT NULL
);
CREATE TABLE advisories (
    rowid INTEGER PRIMARY KEY, id TEXT NOT NULL, kind TEXT NOT NULL, aliases TEXT NOT NULL,
    title TEXT NOT NULL, severity INTEGER NOT NULL, modified TEXT NOT NULL, source TEXT NOT NULL,
    UNIQUE (kind, id)
);
CREATE TABLE affected (
    advisory INTEGER NOT NULL, ecosystem TEXT NOT NULL, release TEXT NOT NULL,
    name TEXT NOT NULL, repository TEXT NOT NULL, not_affected INTEGER NOT NULL,
    ranges TEXT NOT NULL, versions TEXT NOT NULL, fixed_hint TEXT NOT NULL
);
CREATE INDEX affected_package ON affected (ecosystem, name);
CREATE TABLE coverage (
    ecosystem TEXT NOT NULL, release TEXT NOT NULL, source TEXT NOT NULL,
    packages INTEGER NOT NULL, PRIMARY KEY (ecosystem, release, source)
);
"""
# Rows in the order the content checksum reads them.
_CONTENT: Final = (
    ("sources", "SELECT * FROM sources ORDER BY name"),
    ("advisories", "SELECT * FROM advisories ORDER BY rowid"),
    ("affected", "SELECT * FROM affected ORDER BY advisory, rowid"),
    ("coverage", "SELECT * FROM coverage ORDER BY ecosystem, release, source"),
)
_TABLES: Final = ("meta", "sources", "advisories", "affected", "coverage")


@dataclass(frozen=True)
class SourceInfo:
    """One feed of a build, as the manifest says it."""

    name: str
    format: str
    origin: str
    snapshot_date: str  # RFC 3339
    records: int
    sha256: str
    licence: str
    problems: int
    left_out: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """An advisory's entry for one package, as read back for matching. Lists stay JSON text
    until needed: most entries of a package are ruled out by their ranges alone."""

    advisory_id: str
    aliases_json: str
    title: str
    severity: int
    release: str
    repository: str
    not_affected: bool
    ranges: tuple[Range, ...]
    # Whether the version asked about is in the entry's ``versions`` list.
    listed: bool
    fixed_hint: str

    @property
    def aliases(self) -> tuple[str, ...]:
        return _aliases(self.aliases_json)


@functools.lru_cache(maxsize=16384)
def _aliases(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _ranges_json(ranges: Sequence[Range]) -> str:
    return json.dumps(
        [[r.type, [[e.kind, e.value] for e in r.events]] for r in ranges], separators=(",", ":")
    )


# Event(*pair) without a Python-level call per event.
_event = functools.partial(tuple.__new__, Event)


@functools.lru_cache(maxsize=65536)
def _ranges(text: str) -> tuple[Range, ...]:
    return tuple(Range(kind, tuple(map(_event, events))) for kind, events in json.loads(text))


def write(
    path: Path, sources: Sequence[SourceInfo], advisories: Sequence[Advisory], released_at: str
) -> str:
    """Write a new database file at ``path`` (which must not exist); return its content
    checksum. Rows are written in a fixed order, so the same input gives the same content."""
    if path.exists():
        raise DatabaseError(f"{path} already exists")
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        connection.execute("PRAGMA journal_mode = OFF")
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("BEGIN")
        for statement in _SCHEMA.strip().split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.executemany(
            "INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s.name,
                    s.format,
                    s.origin,
                    s.snapshot_date,
                    s.records,
                    s.sha256,
                    s.licence,
                    s.problems,
                    s.left_out,
                )
                for s in sorted(sources, key=lambda s: s.name)
            ],
        )
        coverage: dict[tuple[str, str, str], set[str]] = {}
        ordered = sorted(advisories, key=lambda a: (a.id, a.kind))
        for rowid, advisory in enumerate(ordered, start=1):
            connection.execute(
                "INSERT INTO advisories VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rowid,
                    advisory.id,
                    advisory.kind,
                    json.dumps(list(advisory.aliases)),
                    advisory.title,
                    int(advisory.severity),
                    advisory.modified,
                    advisory.source,
                ),
            )
            for entry in advisory.affected:
                connection.execute(
                    "INSERT INTO affected VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rowid,
                        entry.ecosystem,
                        entry.release,
                        entry.name,
                        entry.repository,
                        int(entry.not_affected),
                        _ranges_json(entry.ranges),
                        json.dumps(list(entry.versions), separators=(",", ":")),
                        entry.fixed_hint,
                    ),
                )
                key = (entry.ecosystem, entry.release, advisory.source)
                coverage.setdefault(key, set()).add(entry.name)
        connection.executemany(
            "INSERT INTO coverage VALUES (?, ?, ?, ?)",
            [(e, r, s, len(names)) for (e, r, s), names in sorted(coverage.items())],
        )
        digest = content_digest(connection)
        newest = max((s.snapshot_date for s in sources), default=released_at)
        meta = {
            "format": FORMAT,
            "schema": str(SCHEMA_VERSION),
            "content_sha256": digest,
            "released_at": released_at,
            "version": f"{newest[:10].replace('-', '.')}-{digest[:8]}",
            "advisories": str(len(advisories)),
        }
        connection.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        connection.execute("COMMIT")
        connection.execute("VACUUM")
    except BaseException:
        connection.close()
        path.unlink(missing_ok=True)
        raise
    connection.close()
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return digest


def content_digest(connection: sqlite3.Connection) -> str:
    digest = hashlib.sha256()
    for table, query in _CONTENT:
        digest.update(f"\0{table}\0".encode())
        for row in connection.execute(query):
            digest.update(json.dumps(row, separators=(",", ":")).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def _uri(path: Path) -> str:
    return f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"


class VulnStore:
    """A compiled database opened read-only. Safe to share between threads: each thread gets
    its own connection to the same file (which is never written once built)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DatabaseError(f"{self.path} does not exist")
        self._local = threading.local()
        self._cache: dict[tuple[str, str, str, str], tuple[Candidate, ...]] = {}
        self._cache_lock = threading.Lock()
        self._check_file_size()
        connection = self._connection()
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            missing = [t for t in _TABLES if t not in tables]
            if missing:
                raise DatabaseError(f"{self.path}: not a vulnerability database ({missing[0]})")
            self.meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            self.sources = [
                SourceInfo(*row)
                for row in connection.execute("SELECT * FROM sources ORDER BY name")
            ]
            self.coverage = frozenset(
                (row[0], row[1])
                for row in connection.execute("SELECT ecosystem, release FROM coverage")
            )
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"{self.path}: not a readable database: {exc}") from None
        if self.meta.get("format") != FORMAT:
            raise DatabaseError(f"{self.path}: format {self.meta.get('format')!r} is not {FORMAT}")
        if self.meta.get("schema") != str(SCHEMA_VERSION):
            raise DatabaseError(
                f"{self.path}: schema {self.meta.get('schema')!r}; this scanner reads "
                f"{SCHEMA_VERSION} (build the database with this version's image-scanner)"
            )
        for key in ("version", "released_at", "content_sha256"):
            if not self.meta.get(key):
                raise DatabaseError(f"{self.path}: meta has no {key}")
        if not self.sources:
            raise DatabaseError(f"{self.path}: lists no source")

    def _check_file_size(self) -> None:
        """A truncated file: SQLite itself would only notice when a query reads a missing
        page. The header says how many pages the file has (offsets 16, 24, 28, 92)."""
        with open(self.path, "rb") as handle:
            header = handle.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            raise DatabaseError(f"{self.path}: not a readable database (no SQLite header)")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        valid = header[24:28] == header[92:96]
        actual = self.path.stat().st_size
        if valid and pages * page_size != actual:
            raise DatabaseError(
                f"{self.path}: truncated or damaged ({actual} bytes; its header says "
                f"{pages * page_size})"
            )

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            try:
                connection = sqlite3.connect(_uri(self.path), uri=True, check_same_thread=False)
            except sqlite3.Error as exc:
                raise DatabaseError(f"{self.path}: cannot open: {exc}") from None
            # The file mapped rather than read a page at a time: a first scan looks up every
            # package once, and each lookup's pages would otherwise be a read() and a copy.
            # Safe because a database file is never rewritten in place, only replaced by a
            # rename, which leaves a mapping of the old file intact.
            connection.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
            self._local.connection = connection
        return connection

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @property
    def released_at(self) -> str:
        return str(self.meta["released_at"])

    @property
    def content_sha256(self) -> str:
        return str(self.meta["content_sha256"])

    def count(self, table: str) -> int:
        if table not in _TABLES:
            raise ValueError(table)
        row = self._connection().execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0])

    def candidates(
        self, ecosystem: str, name: str, release: str, version: str
    ) -> tuple[Candidate, ...]:
        """The advisory entries for ``name`` in ``ecosystem`` that apply to ``release`` (its
        own, and those written for every release, ``""``), each saying whether it lists
        ``version``. The lists stay in the file: in their JSON every element is a quoted
        string and a raw quote only delimits one, so the quoted version occurs in the text
        exactly when it is an element (long lists are never copied out)."""
        key = (ecosystem, name, release, version)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rows = self._connection().execute(
            "SELECT a.id, a.aliases, a.title, a.severity, f.release, f.repository, "
            "f.not_affected, f.ranges, instr(f.versions, ?) > 0, f.fixed_hint "
            "FROM affected f JOIN advisories a ON a.rowid = f.advisory "
            "WHERE f.ecosystem = ? AND f.name = ? AND f.release IN (?, '')",
            (json.dumps(version), ecosystem, name, release),
        )
        found = tuple(
            Candidate(a, b, c, d, e, f, bool(g), _ranges(h), bool(i), j)
            for a, b, c, d, e, f, g, h, i, j in rows
        )
        with self._cache_lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = found
        return found

    def advisories(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        for advisory_id, aliases in self._connection().execute(
            "SELECT id, aliases FROM advisories ORDER BY rowid"
        ):
            yield advisory_id, tuple(json.loads(aliases))

    def verify(self) -> list[str]:
        """Everything wrong with the file: SQLite's integrity check, the content checksum,
        the record counts of the manifest. Empty when it is sound."""
        problems: list[str] = []
        connection = self._connection()
        try:
            for (line,) in connection.execute("PRAGMA integrity_check"):
                if line != "ok":
                    problems.append(f"integrity: {line}")
            if problems:
                return problems
            actual = content_digest(connection)
            if actual != self.content_sha256:
                problems.append(
                    f"content checksum {actual[:16]}… differs from the recorded "
                    f"{self.content_sha256[:16]}… (the file was changed after it was built)"
                )
            per_source = dict(
                connection.execute("SELECT source, count(*) FROM advisories GROUP BY source")
            )
            for source in self.sources:
                if per_source.get(source.name, 0) != source.records:
                    problems.append(
                        f"source {source.name}: manifest says {source.records} records, "
                        f"the database holds {per_source.get(source.name, 0)}"
                    )
            if self.count("advisories") == 0:
                problems.append("the database holds no advisory")
        except sqlite3.DatabaseError as exc:
            problems.append(f"not a readable database: {exc}")
        return problems

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
