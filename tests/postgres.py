"""The machine's PostgreSQL for the tests: each test gets a schema of its own, dropped after."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

DATABASE_URL = os.environ.get(
    "IMAGE_HANDLER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def new_schema_name() -> str:
    return f"t_{secrets.token_hex(6)}"


def drop_schema(name: str) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@contextmanager
def schema() -> Iterator[str]:
    """A schema name no other test uses; the schema (made by the handler) is dropped after."""
    name = new_schema_name()
    try:
        yield name
    finally:
        drop_schema(name)
