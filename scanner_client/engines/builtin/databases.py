"""Loading and validating the builtin engine's databases (see :mod:`scanner_client.db`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scanner_client.db import DatabaseEntry, read_manifest
from scanner_client.engine import Database
from scanner_client.engines.builtin.malware import Signatures
from scanner_client.engines.builtin.vulns import VulnerabilityDB


@dataclass(frozen=True)
class LoadedDatabases:
    entries: dict[str, DatabaseEntry]
    vulnerabilities: VulnerabilityDB
    signatures: Signatures

    def versions(self) -> list[Database]:
        return [
            Database(entry.name, entry.version, entry.released_at)
            for entry in self.entries.values()
        ]

    def describe(self) -> list[dict[str, object]]:
        """What ``image-scanner db info`` prints."""
        counts = {
            "vulnerabilities": f"{len(self.vulnerabilities)} advisories",
            "malware": f"{self.signatures.malware_rules} rules",
        }
        return [
            {
                "name": entry.name,
                "version": entry.version,
                "released_at": entry.released_at,
                "format": entry.format,
                "path": str(entry.path),
                "entries": counts[entry.name],
            }
            for entry in self.entries.values()
        ]


def load_databases(directory: Path | None = None) -> LoadedDatabases:
    """Read the manifest and load every database; DatabaseError says what is wrong."""
    entries = read_manifest(directory)
    return LoadedDatabases(
        entries=entries,
        vulnerabilities=VulnerabilityDB.load(entries["vulnerabilities"].path),
        signatures=Signatures.load(entries["malware"].path),
    )
