"""A young jobs table that grows under the store: its statistics follow, so the plans cached on
the store's connections (generic, made when the table was nearly empty) are made again."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import psycopg

from server.core.model import ImageRef, JobSpec, Lane, Policy, Trigger
from server.storage.postgres import PostgresRepository
from server.storage.postgres.repository import ANALYZE_FROM
from tests.postgres import DATABASE_URL, drop_schema, new_schema_name


def spec(tag: str) -> JobSpec:
    target = ImageRef("docker.io", "library/app", tag)
    return JobSpec(target, Trigger.MANUAL, (Policy.VULNERABILITIES,), 600.0, Lane.BULK, "")


async def analyzed(schema: str, times: int) -> tuple[int, float]:
    """Until the jobs table was analyzed by hand (not by autovacuum) ``times`` times, with a
    deadline of 10 s: how many times, and the rows its statistics now hold."""
    end = time.monotonic() + 10
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT s.analyze_count, c.reltuples FROM pg_stat_user_tables AS s "
                "JOIN pg_class AS c ON c.oid = s.relid "
                "WHERE s.schemaname = %s AND s.relname = 'jobs'",
                (schema,),
            )
            row = await cursor.fetchone()
            assert row is not None
            if row[0] >= times or time.monotonic() > end:
                return int(row[0]), float(row[1])
            await asyncio.sleep(0.02)  # polling a condition, with the deadline above


async def test_the_jobs_table_is_analyzed_each_time_the_rows_a_replica_inserted_double() -> None:
    schema = new_schema_name()
    store = PostgresRepository(DATABASE_URL, schema=schema)
    await store.open()
    try:
        at = datetime.now(UTC)
        for start in range(0, ANALYZE_FROM, 100):
            await store.insert_many([spec(f"a{n}") for n in range(start, start + 100)], at=at)
        assert await analyzed(schema, 1) == (1, ANALYZE_FROM)
        # Duplicates add no rows: the next analyze waits for as many new rows again.
        await store.insert_many([spec("a0"), spec("a1")], at=at)
        for start in range(0, ANALYZE_FROM, 100):
            await store.insert_many([spec(f"b{n}") for n in range(start, start + 100)], at=at)
        assert await analyzed(schema, 2) == (2, 2 * ANALYZE_FROM)
    finally:
        await store.close()
        drop_schema(schema)
