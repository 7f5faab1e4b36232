"""Building a database: read each source, import its records, merge, write one SQLite file.

A source's **snapshot date** is, in this order: the date given with ``--snapshot-date``; the
newest member time of its archive (or the HTTP ``Last-Modified`` of its download); the newest
date its records carry. A source that says none of these is refused (give the date). The
database's release date, reported to the handler, is the newest snapshot date of its sources;
each source's own date is reported beside it. Never the build time.

The same advisory id from two sources is kept once (the copy modified last); a withdrawn
record removes older copies of its id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from scanner_client.db import DatabaseError
from scanner_client.vulndb import importers, sources, store
from scanner_client.vulndb.model import Advisory, Imported, Problem
from scanner_client.vulndb.store import SourceInfo


@dataclass
class SourceReport:
    info: SourceInfo
    problems: list[Problem]
    left_out: dict[str, int]
    other_files: int


@dataclass
class BuildReport:
    path: Path
    content_sha256: str
    version: str
    released_at: str
    advisories: int
    duplicates: int
    sources: list[SourceReport] = field(default_factory=list)


def rfc3339(value: datetime | str) -> str:
    """A date-time as ``YYYY-MM-DDTHH:MM:SSZ``; a date stays a date."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 10:
            date.fromisoformat(text)
            return text
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_source(
    origin: str, workdir: Path, *, proxy: str = "", snapshot_date: str = ""
) -> tuple[sources.Source, Imported, str]:
    """Fetch (when a URL) and import one source: (source, what it yielded, snapshot date)."""
    source = (
        sources.fetch(origin, workdir, proxy) if sources.is_url(origin) else sources.local(origin)
    )
    imported = Imported()
    importers.import_members(source.members(), imported, source.name)
    imported.licence = source.licence
    if not imported.advisories:
        detail = "; ".join(str(p) for p in imported.problems[:3])
        left = ", ".join(f"{n} {why}" for why, n in sorted(imported.left_out.items()))
        raise DatabaseError(
            f"{origin}: the import yielded no advisory"
            + (f" ({len(imported.problems)} records refused: {detail})" if detail else "")
            + (f" (left out: {left})" if left else "")
        )
    if snapshot_date:
        when = rfc3339(snapshot_date)
    elif source.snapshot_time is not None:
        when = rfc3339(source.snapshot_time)
    elif imported.newest_record:
        when = rfc3339(imported.newest_record)
    else:
        raise DatabaseError(
            f"{origin}: neither the source nor its records say when it was taken; give "
            "--snapshot-date YYYY-MM-DD"
        )
    return source, imported, when


def merge(imports: Sequence[Imported]) -> tuple[list[Advisory], int]:
    """One advisory per id (the last modified); withdrawn ids removed. (advisories,
    duplicates dropped)."""
    chosen: dict[tuple[str, str], Advisory] = {}
    duplicates = 0
    withdrawn: dict[str, str] = {}
    for imported in imports:
        for advisory_id, when in imported.withdrawn.items():
            withdrawn[advisory_id] = max(when, withdrawn.get(advisory_id, ""))
        for advisory in imported.advisories:
            key = (advisory.kind, advisory.id)
            previous = chosen.get(key)
            if previous is not None:
                duplicates += 1
                if advisory.modified <= previous.modified:
                    continue
            chosen[key] = advisory
    kept = [a for a in chosen.values() if not (a.id in withdrawn and withdrawn[a.id] >= a.modified)]
    return kept, duplicates


def build(
    origins: Sequence[str],
    out: Path,
    *,
    proxy: str = "",
    snapshot_date: str = "",
) -> BuildReport:
    """Build a database from ``origins`` into ``out`` (replaced atomically when it exists)."""
    if not origins:
        raise DatabaseError("give at least one source (--from PATH_OR_URL)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vulndb-build-", dir=out.parent) as scratch:
        read = [
            read_source(origin, Path(scratch), proxy=proxy, snapshot_date=snapshot_date)
            for origin in origins
        ]
        names: dict[str, int] = {}
        for source, imported, _ in read:
            count = names.get(source.name, 0)
            names[source.name] = count + 1
            if count:
                source.name = f"{source.name}-{count + 1}"
                imported.advisories = [_with_source(a, source.name) for a in imported.advisories]
        advisories, duplicates = merge([imported for _, imported, _ in read])
        per_source: dict[str, int] = {}
        for advisory in advisories:
            per_source[advisory.source] = per_source.get(advisory.source, 0) + 1
        reports = [
            SourceReport(
                info=SourceInfo(
                    name=source.name,
                    format=",".join(sorted(imported.formats)),
                    origin=source.origin,
                    snapshot_date=when,
                    records=per_source.get(source.name, 0),
                    sha256=source.sha256,
                    licence=imported.licence,
                    problems=len(imported.problems),
                    left_out=sum(imported.left_out.values()),
                ),
                problems=imported.problems,
                left_out=imported.left_out,
                other_files=imported.other_files,
            )
            for source, imported, when in read
        ]
        released_at = max(report.info.snapshot_date for report in reports)
        partial = Path(scratch) / "vulnerabilities.db"
        digest = store.write(partial, [r.info for r in reports], advisories, released_at)
        os.replace(partial, out)
    fsync_directory(out.parent)
    opened = store.VulnStore(out)
    try:
        version = opened.version
    finally:
        opened.close()
    return BuildReport(
        path=out,
        content_sha256=digest,
        version=version,
        released_at=released_at,
        advisories=len(advisories),
        duplicates=duplicates,
        sources=reports,
    )


def _with_source(advisory: Advisory, name: str) -> Advisory:
    return dataclasses.replace(advisory, source=name)


def fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
