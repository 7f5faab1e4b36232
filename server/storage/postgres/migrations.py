"""Schema migrations: numbered SQL files beside this module (``NNNN_name.sql``), applied in
order, each in one transaction with its row in ``schema_migrations``, under a session advisory
lock so replicas starting together apply each file once. ``image-handler migrate`` runs the
same code ahead of a rollout."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

from imagehandler.errors import Catalogue, HandlerError, Reason

_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


def migrations() -> list[Migration]:
    """The migrations this code knows, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest() -> int:
    return migrations()[-1].version


def lock_key(schema: str) -> int:
    """The advisory lock of one schema's migrations (a stable 32-bit number)."""
    return zlib.crc32(f"image-handler migrations {schema}".encode())


def too_new(schema: str, found: int, known: int) -> HandlerError:
    return HandlerError(
        Catalogue.SCANNER_CONFIG_INVALID,
        f"the database schema {schema!r} is at version {found}, newer than this handler's "
        f"{known}: run a handler release that knows version {found} (or a newer one)",
        reason=Reason.FAILED_PRECONDITION,
    )


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str) -> list[str]:
    """Bring ``schema`` up to :func:`latest` on ``conn`` (autocommit); the files applied.
    Raises HNDL-003 when the database is newer than the code."""
    known = migrations()
    ident = sql.Identifier(schema)
    await conn.execute("SELECT pg_advisory_lock(%s)", (lock_key(schema),))
    try:
        cursor = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await cursor.fetchone() is None:  # (creating needs CREATE on the database)
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        await conn.execute(sql.SQL("SET search_path TO {}").format(ident))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        row = await cursor.fetchone()
        current = int(row[0]) if row is not None else 0  # type: ignore[call-overload]
        if current > known[-1].version:
            raise too_new(schema, current, known[-1].version)
        applied = []
        for migration in known:
            if migration.version <= current:
                continue
            async with conn.transaction():
                await conn.execute(migration.text.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            applied.append(migration.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(schema),))
