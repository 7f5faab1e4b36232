"""Loading the builtin engine's databases (see :mod:`scanner_client.db`), and keeping the
vulnerability database current while the scanner runs.

:class:`DatabaseKeeper` holds the databases in use. Between jobs (at the start of each scan,
and every ``poll_interval`` seconds while idle) it checks whether the vulnerability database
file was replaced (``image-scanner db update`` renames a new file over it); a new file is
opened and checked before it is used, and one that fails keeps the old database in use and is
logged with the reason. With ``update_from`` it also runs ``image-scanner db update`` every
``update_interval`` seconds, in a subprocess (the build is CPU work that must not hold the
scanner's event loop or its memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import structlog

from scanner_client.db import DatabaseEntry, DatabaseError, read_manifest
from scanner_client.engine import Database
from scanner_client.engines.builtin.malware import Signatures
from scanner_client.vulndb import update as vulndb_update
from scanner_client.vulndb.store import VulnStore

log = structlog.get_logger("scanner_client.databases")

VULNERABILITIES: Final = "vulnerabilities"
# How long one periodic update may take before it is given up.
UPDATE_TIMEOUT: Final = 3600.0

FileIdentity = tuple[int, int, int]


def file_identity(path: Path) -> FileIdentity | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


@dataclass(frozen=True)
class LoadedDatabases:
    entries: dict[str, DatabaseEntry]
    vulnerabilities: VulnStore
    signatures: Signatures
    # The vulnerability database file as it was when loaded.
    identity: FileIdentity | None = None

    def versions(self) -> list[Database]:
        """What the handler is told: the vulnerability database (its release date is its
        newest source's snapshot date), each of its sources with its own snapshot date, and
        the malware rules."""
        store = self.vulnerabilities
        found = [Database(VULNERABILITIES, store.version, store.released_at)]
        found += [
            Database(f"{VULNERABILITIES}/{s.name}", s.sha256[:12], s.snapshot_date)
            for s in store.sources
        ]
        found += [
            Database(entry.name, entry.version, entry.released_at)
            for entry in self.entries.values()
            if entry.name != VULNERABILITIES
        ]
        return found

    def describe(self) -> list[dict[str, object]]:
        """What ``image-scanner db info --json`` prints."""
        store = self.vulnerabilities
        rows: list[dict[str, object]] = [
            {
                "name": VULNERABILITIES,
                "version": store.version,
                "released_at": store.released_at,
                "format": self.entries[VULNERABILITIES].format,
                "path": str(store.path),
                "entries": f"{store.count('advisories')} advisories",
                "content_sha256": store.content_sha256,
                "sources": [
                    {
                        "name": s.name,
                        "format": s.format,
                        "origin": s.origin,
                        "snapshot_date": s.snapshot_date,
                        "records": s.records,
                        "sha256": s.sha256,
                        "licence": s.licence,
                        "problems": s.problems,
                        "left_out": s.left_out,
                    }
                    for s in store.sources
                ],
            }
        ]
        for entry in self.entries.values():
            if entry.name == VULNERABILITIES:
                continue
            rows.append(
                {
                    "name": entry.name,
                    "version": entry.version,
                    "released_at": entry.released_at,
                    "format": entry.format,
                    "path": str(entry.path),
                    "entries": f"{self.signatures.malware_rules} rules",
                }
            )
        return rows


def load_vulnerabilities(path: Path) -> tuple[VulnStore, FileIdentity | None]:
    identity = file_identity(path)
    return VulnStore(path), identity


def load_databases(directory: Path | None = None) -> LoadedDatabases:
    """Read the manifest and load every database; DatabaseError says what is wrong."""
    entries = read_manifest(directory)
    store, identity = load_vulnerabilities(entries[VULNERABILITIES].path)
    return LoadedDatabases(
        entries=entries,
        vulnerabilities=store,
        signatures=Signatures.load(entries["malware"].path),
        identity=identity,
    )


class DatabaseKeeper:
    """The databases in use, refreshed between jobs and (optionally) updated periodically."""

    def __init__(
        self,
        directory: Path | None,
        *,
        update_from: Sequence[str] = (),
        update_interval: float = 0.0,
        proxy_url: str = "",
        poll_interval: float = 5.0,
    ) -> None:
        if update_from and directory is None:
            raise ValueError("--db-update-url needs --db-dir (a writable directory)")
        if update_from and update_interval <= 0:
            raise ValueError("--db-update-url needs a positive --db-update-interval")
        if update_from and directory is not None:
            vulndb_update.seed(directory)
        self.directory = directory
        self.update_from = tuple(update_from)
        self.update_interval = update_interval
        self.proxy_url = proxy_url
        self.poll_interval = poll_interval
        self.current = load_databases(directory)
        # Called (on the event loop) after a new database was taken into use.
        self.on_change: Callable[[], None] | None = None
        self._lock = asyncio.Lock()
        # A replaced file that failed to load: not tried again until it changes.
        self._refused: FileIdentity | None = None
        self.updates_failed = 0

    @property
    def path(self) -> Path:
        return self.current.entries[VULNERABILITIES].path

    async def refresh(self) -> bool:
        """Take a replaced vulnerability database file into use; True when it did."""
        identity = file_identity(self.path)
        if identity is None or identity in (self.current.identity, self._refused):
            return False
        async with self._lock:
            identity = file_identity(self.path)
            if identity is None or identity in (self.current.identity, self._refused):
                return False
            try:
                store, loaded_identity = await asyncio.to_thread(load_vulnerabilities, self.path)
            except DatabaseError as exc:
                self._refused = identity
                log.error(
                    "vulnerability database not taken into use; the old one stays",
                    path=str(self.path),
                    error=str(exc),
                    version=self.current.vulnerabilities.version,
                )
                return False
            old = self.current.vulnerabilities
            if store.content_sha256 == old.content_sha256:
                self.current = replace(self.current, identity=loaded_identity)
                return False
            self.current = replace(self.current, vulnerabilities=store, identity=loaded_identity)
            log.info(
                "vulnerability database updated",
                version=store.version,
                released_at=store.released_at,
                previous=old.version,
            )
        if self.on_change is not None:
            self.on_change()
        return True

    async def run(self) -> None:
        """Poll for a replaced file and run the periodic update, until cancelled."""
        if self.directory is None:
            return
        loop = asyncio.get_running_loop()
        next_update = loop.time() if self.update_from else None
        while True:
            if next_update is not None and loop.time() >= next_update:
                await self.update_now()
                next_update = loop.time() + self.update_interval
            await self.refresh()
            wait = self.poll_interval
            if next_update is not None:
                wait = max(0.0, min(wait, next_update - loop.time()))
            await asyncio.sleep(wait)

    async def update_now(self) -> bool:
        """Run ``image-scanner db update`` in a subprocess; True when it succeeded."""
        assert self.directory is not None
        command = [sys.executable, "-m", "scanner_client.cli", "db", "update"]
        command += ["--db-dir", str(self.directory)]
        for origin in self.update_from:
            command += ["--from", origin]
        if self.proxy_url:
            command += ["--proxy-url", self.proxy_url]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(UPDATE_TIMEOUT):
                out, err = await process.communicate()
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            out, err = b"", f"gave up after {UPDATE_TIMEOUT:g}s".encode()
        if process.returncode != 0:
            self.updates_failed += 1
            log.warning(
                "vulnerability database update failed; the old one stays",
                sources=list(self.update_from),
                error=err.decode("utf-8", "replace").strip()[-2000:],
            )
            return False
        log.info("vulnerability database update ran", output=out.decode().strip()[-500:])
        await self.refresh()
        return True
