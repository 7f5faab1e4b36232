"""Live update: build a new database file beside the one in use, verify it, swap it in.

``image-scanner db update --from PATH_OR_URL --db-dir DIR`` (and a scanner's periodic update,
which runs that same command) builds into a temporary file in ``DIR``, verifies it (SQLite's
integrity check, the content checksum, the manifest's counts), and renames it over the
database file: a scanner that has the old file open keeps reading it until its next job, and
no reader ever sees half a file. Anything that fails leaves the database in ``DIR`` as it was.

A ``DIR`` without a manifest is first filled with the packaged databases, so that a scanner
can start from an empty volume and update it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from scanner_client.db import DEFAULT_DIR, MANIFEST, DatabaseError, read_manifest
from scanner_client.vulndb import build as builder
from scanner_client.vulndb.store import VulnStore

LOCK: str = ".update.lock"


@dataclass
class UpdateOutcome:
    path: Path
    changed: bool
    version: str
    previous_version: str
    report: builder.BuildReport


def seed(directory: Path) -> bool:
    """Fill an empty (or missing) ``directory`` with the packaged databases; True when it did.
    A directory that has a manifest is left alone."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        return False
    directory.mkdir(parents=True, exist_ok=True)
    # Each file copied under a temporary name and renamed (two seeds at once are harmless),
    # the manifest last: a directory with a manifest is complete.
    sources = [entry.path for entry in read_manifest(DEFAULT_DIR).values()]
    for source in [*sources, DEFAULT_DIR / MANIFEST]:
        partial = directory / f".{source.name}.{os.getpid()}.tmp"
        shutil.copyfile(source, partial)
        os.replace(partial, directory / source.name)
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One update at a time per directory (a second one waits)."""
    with open(directory / LOCK, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def update(
    directory: Path,
    origins: Sequence[str],
    *,
    proxy: str = "",
    snapshot_date: str = "",
) -> UpdateOutcome:
    """Build from ``origins`` and swap the result in; DatabaseError says why it did not."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        seed(directory)
        target = read_manifest(directory)["vulnerabilities"].path
        previous, previous_version = "", ""
        with contextlib.suppress(DatabaseError):
            current = VulnStore(target)
            previous, previous_version = current.content_sha256, current.version
            current.close()
        handle, name = tempfile.mkstemp(prefix=".vulnerabilities.", suffix=".new", dir=directory)
        os.close(handle)
        partial = Path(name)
        partial.unlink()
        try:
            report = builder.build(origins, partial, proxy=proxy, snapshot_date=snapshot_date)
            fresh = VulnStore(partial)
            try:
                problems = fresh.verify()
            finally:
                fresh.close()
            if problems:
                raise DatabaseError(f"the new database does not verify: {'; '.join(problems)}")
            if report.content_sha256 == previous:
                return UpdateOutcome(target, False, report.version, previous_version, report)
            os.replace(partial, target)
            builder.fsync_directory(directory)
        finally:
            partial.unlink(missing_ok=True)
    return UpdateOutcome(target, True, report.version, previous_version, report)
