"""A jobs table that grows under the store: its statistics follow, so the plans cached on the
store's connections (generic, made when the table was nearly empty) are made again; and the
plans of the claim and of the moves find their rows through the primary key whatever the table
holds, instead of a scan of every row per statement."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from server.core.model import ImageRef, JobSpec, Lane, Policy, Trigger
from server.storage.postgres import PostgresRepository
from server.storage.postgres.repository import (
    _CLAIM,
    _COUNTS,
    _POSITIONS,
    _WRITE_CHANGES,
    ANALYZE_FROM,
)
from tests.postgres import DATABASE_URL, schema


def spec(tag: str) -> JobSpec:
    target = ImageRef("docker.io", "library/app", tag)
    return JobSpec(target, Trigger.MANUAL, (Policy.VULNERABILITIES,), 600.0, Lane.BULK, "")


async def queue(store: PostgresRepository, prefix: str, count: int, batch: int) -> None:
    """``count`` new jobs, ``batch`` per insert."""
    at = datetime.now(UTC)
    for start in range(0, count, batch):
        await store.insert_many([spec(f"{prefix}{n}") for n in range(start, start + batch)], at=at)


async def analyzed(name: str, times: int) -> tuple[int, float]:
    """Until the jobs table was analyzed by hand (not by autovacuum) ``times`` times, with a
    deadline of 10 s: how many times, and the rows its statistics now hold."""
    end = time.monotonic() + 10
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT s.analyze_count, c.reltuples FROM pg_stat_user_tables AS s "
                "JOIN pg_class AS c ON c.oid = s.relid "
                "WHERE s.schemaname = %s AND s.relname = 'jobs'",
                (name,),
            )
            row = await cursor.fetchone()
            assert row is not None
            if row[0] >= times or time.monotonic() > end:
                return int(row[0]), float(row[1])
            await asyncio.sleep(0.02)  # polling a condition, with the deadline above


async def test_the_jobs_table_is_analyzed_each_time_the_rows_a_replica_inserted_double() -> None:
    with schema() as name:
        store = PostgresRepository(DATABASE_URL, schema=name)
        await store.open()
        try:
            await queue(store, "a", ANALYZE_FROM, 100)
            assert await analyzed(name, 1) == (1, ANALYZE_FROM)
            # Duplicates add no rows: the next analyze waits for as many new rows again.
            await store.insert_many([spec("a0"), spec("a1")], at=datetime.now(UTC))
            await queue(store, "b", ANALYZE_FROM, 100)
            assert await analyzed(name, 2) == (2, 2 * ANALYZE_FROM)
        finally:
            await store.close()


def generic_plan(
    conn: psycopg.Connection[tuple[object, ...]],
    query: str,
    params: Sequence[object] | Mapping[str, object],
) -> str:
    """The plan a store's connection caches for ``query`` (its connections force generic
    plans): the statement prepared with $n parameters, explained with these values."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1) or str(len(names))
        if name not in names or not match.group(1):
            names.append(name)
        return f"${names.index(name) + 1}"

    text = re.sub(r"%(?:\((\w+)\))?s", number, query)
    values = [params[n] for n in names] if isinstance(params, Mapping) else list(params)
    conn.execute(sql.SQL("PREPARE probe AS {}").format(sql.SQL(text)))
    arguments = sql.SQL(", ").join(sql.Literal(value) for value in values)
    execute = sql.SQL("EXPLAIN EXECUTE probe({})" if values else "EXPLAIN EXECUTE probe")
    rows = conn.execute(execute.format(arguments)).fetchall()
    conn.execute("DEALLOCATE probe")
    return "\n".join(str(row[0]) for row in rows)


async def backlog(name: str, count: int) -> None:
    """``count`` jobs queued in schema ``name`` by a store (closed since)."""
    store = PostgresRepository(DATABASE_URL, schema=name)
    await store.open()
    try:
        await queue(store, "a", count, 150)
    finally:
        await store.close()


def planning(name: str) -> psycopg.Connection[tuple[object, ...]]:
    """A connection to schema ``name`` that plans as the store's do (generic plans)."""
    options = f"-c search_path={name} -c plan_cache_mode=force_generic_plan"
    return psycopg.connect(DATABASE_URL, autocommit=True, options=options)


def claim_plan(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """The claim's cached plan, for one scanner of 8 slots."""
    return generic_plan(conn, _CLAIM, {
        "who": [0], "names": ["s1"], "room": [8], "passes": 8, "kinds": [1], "n": 8,
        "wi": 1.25, "wb": 5.0, "replica": "r", "deliverer": None, "lease": 15.0,
        "at": datetime.now(UTC), "micros": 0, "channel": "c", "work": "w",
    })  # fmt: skip


async def test_the_claim_and_the_moves_find_their_rows_by_key_on_a_table_with_a_backlog() -> None:
    with schema() as name:
        await backlog(name, 3000)
        with planning(name) as conn:
            conn.execute("ANALYZE jobs")
            claim = claim_plan(conn)
            moves = generic_plan(
                conn, _WRITE_CHANGES, ["r", None, 15.0, "[]", ["x"], "c", "r", "w", "r"]
            )
    # The queue's own CTEs read each lane's index; no statement reads the whole table.
    assert "Seq Scan on jobs" not in claim, claim
    assert "Seq Scan on jobs" not in moves, moves
    assert "jobs_pkey" in claim
    assert "jobs_pkey" in moves


async def test_the_queue_is_read_through_each_lane_index_after_statistics_of_a_burst() -> None:
    """A burst of submits is analyzed while its jobs still wait. Once most of them finished,
    the cached claim, queue counts and positions must still read each lane's queue, not walk
    the table in arrival order over every finished job (each took 7-10 ms of database time
    with 18,000 finished)."""
    with schema() as name:
        await backlog(name, 3000)
        with planning(name) as conn:
            conn.execute("ANALYZE jobs")  # every row PENDING in the statistics
            conn.execute(
                "UPDATE jobs SET status = 4 WHERE seq <= (SELECT min(seq) + 2700 FROM jobs)"
            )
            plans = {
                "claim": claim_plan(conn),
                "counts": generic_plan(conn, _COUNTS, []),
                "positions": generic_plan(conn, _POSITIONS, [[1, 2], [2800, 2900]]),
            }
    for statement, plan in plans.items():
        assert "jobs_pending_bulk" in plan, (statement, plan)
        assert "jobs_pending_interactive" in plan, (statement, plan)
        assert "jobs_seq_key" not in plan, (statement, plan)
        assert "jobs_status" not in plan, (statement, plan)
