"""The scan databases the project ships, and their manifest.

``manifest.json`` names each database's file and format. The files beside it are the
vulnerability database (``vulnerabilities.db``: compiled by :mod:`scanner_client.vulndb` from
the real feeds in the repository's ``vulndata/``; its version, release date and sources are
inside it) and the malware database (``malware.yar``, YARA rules, with its version and release
date (RFC 3339) in the manifest). A scanner may be pointed at another directory with the same
layout (``image-scanner --db-dir DIR``), which ``image-scanner db update`` keeps current;
:func:`read_manifest` reads and checks the manifest, and the builtin engine's loader
(:mod:`scanner_client.engines.builtin.databases`) validates the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
FORMATS = {"vulnerabilities": "vulndb-sqlite", "malware": "yara"}
# Databases whose version and release date are inside the file, not in the manifest.
SELF_DESCRIBED = frozenset({"vulnerabilities"})


class DatabaseError(ValueError):
    """A database directory, manifest or file that cannot be used; the message says why."""


@dataclass(frozen=True)
class DatabaseEntry:
    name: str
    path: Path
    format: str
    version: str
    released_at: str


def check_release_date(name: str, value: object) -> str:
    """``value`` if it is an RFC 3339 date or a date-time with an offset, else DatabaseError."""
    if not isinstance(value, str) or not value:
        raise DatabaseError(f"database {name!r} has no released_at")
    try:
        if len(value) == 10:
            date.fromisoformat(value)
            return value
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DatabaseError(
            f"database {name!r} released_at {value!r} is not an RFC 3339 date"
        ) from None
    if parsed.tzinfo is None:
        raise DatabaseError(f"database {name!r} released_at {value!r} has no time zone offset")
    return value


def read_manifest(directory: Path | None = None) -> dict[str, DatabaseEntry]:
    """The databases of ``directory`` (default: the packaged ones), by name."""
    root = DEFAULT_DIR if directory is None else Path(directory)
    path = root / MANIFEST
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatabaseError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DatabaseError(f"{path}: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("databases"), dict):
        raise DatabaseError(f"{path}: expected an object with a 'databases' object")
    entries: dict[str, DatabaseEntry] = {}
    for name, expected_format in FORMATS.items():
        raw = document["databases"].get(name)
        if not isinstance(raw, dict):
            raise DatabaseError(f"{path}: database {name!r} is missing")
        file = raw.get("file")
        version = raw.get("version")
        if not isinstance(file, str) or not file or "/" in file or file.startswith("."):
            raise DatabaseError(f"{path}: database {name!r} needs a plain file name in 'file'")
        if name in SELF_DESCRIBED:
            version, released_at = "", ""
        elif not isinstance(version, str) or not version:
            raise DatabaseError(f"{path}: database {name!r} needs a 'version'")
        else:
            released_at = check_release_date(name, raw.get("released_at"))
        if raw.get("format") != expected_format:
            raise DatabaseError(
                f"{path}: database {name!r} format must be {expected_format!r}, "
                f"got {raw.get('format')!r}"
            )
        entries[name] = DatabaseEntry(
            name=name,
            path=root / file,
            format=expected_format,
            version=version,
            released_at=released_at,
        )
    return entries
