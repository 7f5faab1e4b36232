"""Two PostgreSQL repositories on one schema, as two replicas see it: the races between a claim,
a rescue and a wake-up, each forced by hand instead of hoped for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from imagehandler.errors import HandlerError
from imagehandler.v1 import common_pb2
from server.core.model import (
    ImageRef,
    Job,
    JobSpec,
    JobStatus,
    Lane,
    ObjectKind,
    Policy,
    Transition,
    Trigger,
)
from server.storage.postgres import PostgresRepository, migrations
from server.storage.postgres.repository import NOTIFY_IDS
from server.storage.repository import Claimed, Demand, Inserted, JobFilter
from tests.postgres import DATABASE_URL, drop_schema, new_schema_name

ALL = frozenset(ObjectKind)


def spec(tag: str, lane: Lane = Lane.BULK) -> JobSpec:
    target = ImageRef("docker.io", "library/app", tag)
    return JobSpec(target, Trigger.MANUAL, (Policy.VULNERABILITIES,), 600.0, lane, "")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PostgresRepository, PostgresRepository]]:
    schema = new_schema_name()
    a = PostgresRepository(DATABASE_URL, schema=schema, interactive_share=0.5, replica="a")
    b = PostgresRepository(DATABASE_URL, schema=schema, interactive_share=0.5, replica="b")
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()
    drop_schema(schema)


def expire_every_lease(schema: str) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {}.jobs SET lease_until = now() - interval '1 second'").format(
                sql.Identifier(schema)
            )
        )


async def until_a_session(where: str, params: tuple[str, ...], never: str) -> None:
    """Until some session in pg_stat_activity matches ``where`` (a condition polled with a
    deadline of 10 s); ``never``: the failure's message."""
    end = time.monotonic() + 10
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        while time.monotonic() < end:
            cursor = await conn.execute(
                f"SELECT count(*) FROM pg_stat_activity WHERE {where}", params
            )
            row = await cursor.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.02)  # polling a condition, with the deadline above
    raise AssertionError(never)


async def listening(repository: PostgresRepository) -> None:
    """Until the repository's listening connection has run its LISTEN."""
    channel = f"%{repository._channel}_risk%"  # the last of its LISTENs
    await until_a_session(
        "query LIKE 'LISTEN%%' AND query LIKE %s", (channel,), "the repository never listened"
    )


async def test_a_replica_never_rescues_a_run_it_still_holds(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    a, b = pair
    (inserted,) = await a.insert_many([spec("held")], at=datetime.now(UTC))
    (claimed,) = await a.claim([Demand("s1", ALL, 1)], at=datetime.now(UTC))
    job_id = claimed.moved.job.id
    assert job_id == inserted.job.id
    a.subscribe(work=lambda: None, moved=lambda j, t: None, listened=lambda i: False,
                held=lambda: [job_id])  # fmt: skip
    # The holder's renewal came late (a stalled loop): its lease ran out while it holds the run.
    expire_every_lease(a.schema)
    assert await a.expired(at=datetime.now(UTC)) == [], "a replica rescued its own live run"
    rescued = await b.expired(at=datetime.now(UTC))
    assert [job.id for job in rescued] == [job_id], "another replica takes it over"


async def test_a_claim_that_locked_jobs_it_did_not_take_wakes_the_other_replicas(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    a, b = pair
    woken = asyncio.Event()
    b.subscribe(work=woken.set, moved=lambda j, t: None, listened=lambda i: False, held=list)
    await listening(b)
    # B's own inserts do not wake B: only A's claim can.
    await b.insert_many([spec("i", Lane.INTERACTIVE), spec("b", Lane.BULK)], at=datetime.now(UTC))
    woken.clear()
    # One slot: the claim locks the head of each lane and takes one of them. A claim of B's
    # running at that moment skipped the other and found nothing; it must look again.
    got = await a.claim([Demand("s1", ALL, 1)], at=datetime.now(UTC))
    assert len(got) == 1
    await asyncio.wait_for(woken.wait(), timeout=10)
    again = await b.claim([Demand("s2", ALL, 1)], at=datetime.now(UTC))
    assert len(again) == 1
    assert again[0].moved.job.id != got[0].moved.job.id


async def test_a_claim_after_one_that_found_nothing_finds_what_was_queued_since(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    a, b = pair
    woken = asyncio.Event()
    a.subscribe(work=woken.set, moved=lambda j, t: None, listened=lambda i: False, held=list)
    await listening(a)
    assert await a.claim([Demand("s1", ALL, 4)], at=datetime.now(UTC)) == []
    # Its own insert: the next claim looks again at once.
    (own,) = await a.insert_many([spec("own")], at=datetime.now(UTC))
    got = await a.claim([Demand("s1", ALL, 4)], at=datetime.now(UTC))
    assert [c.moved.job.id for c in got] == [own.job.id]
    # Another replica's insert: once its announcement is heard.
    woken.clear()
    (other,) = await b.insert_many([spec("other")], at=datetime.now(UTC))
    await asyncio.wait_for(woken.wait(), timeout=10)
    got = await a.claim([Demand("s1", ALL, 4)], at=datetime.now(UTC))
    assert [c.moved.job.id for c in got] == [other.job.id]


async def test_a_run_another_replica_moved_since_is_decided_on_a_fresh_read(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    a, b = pair
    await a.insert_many([spec("moved")], at=datetime.now(UTC))
    (claimed,) = await a.claim([Demand("s1", ALL, 1)], at=datetime.now(UTC))
    job_id = claimed.moved.job.id
    # B ends the run (as a rescuer would); A still remembers the row as its claim wrote it.
    back = await b.move(job_id, JobStatus.PENDING, expect=frozenset({JobStatus.IN_PROGRESS}),
                        run=1, at=datetime.now(UTC), reason="returned")  # fmt: skip
    assert back is not None
    late = await a.move(job_id, JobStatus.PROCESSING_RESULTS,
                        expect=frozenset({JobStatus.IN_PROGRESS}), run=1, at=datetime.now(UTC),
                        reason="result received")  # fmt: skip
    assert late is None, "a move decided on a row another replica changed"
    job = await a.get(job_id)
    assert job is not None
    assert job.status is JobStatus.PENDING
    assert [t.to_status for t in job.history] == [
        JobStatus.PENDING, JobStatus.IN_PROGRESS, JobStatus.PENDING,
    ]  # fmt: skip


def lend(repository: PostgresRepository, slots: int) -> list[list[str]]:
    """Lend each of the repository's insert batches one scanner's demand of ``slots``; the
    ids of what each loan came back with, one list per loan."""
    handed: list[list[str]] = []

    async def demands() -> list[Demand]:
        return [Demand("s1", ALL, slots)]

    repository.claim_with_inserts(
        demands,
        lambda claimed: handed.append([item.moved.job.id for item in claimed]),
    )
    return handed


async def test_an_insert_batch_claims_for_lent_scanners_in_its_own_commit(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """The oldest queued jobs go first, the batch's own included, and what was claimed is
    handed out before the insert returns: the job is ASSIGNED when its submit is answered."""
    a, b = pair
    (older,) = await b.insert_many([spec("older")], at=datetime.now(UTC))
    handed = lend(a, 3)
    (new,) = await a.insert_many([spec("new")], at=datetime.now(UTC))
    assert handed == [[older.job.id, new.job.id]]
    for job_id in (older.job.id, new.job.id):
        job = await b.get(job_id)
        assert job is not None
        assert job.status is JobStatus.IN_PROGRESS
        assert job.runs == 1
    # Nothing is left for another claim, and the claim took no slot twice.
    assert await b.claim([Demand("s2", ALL, 5)], at=datetime.now(UTC)) == []


async def test_a_lent_claim_stands_when_the_insert_collides_with_another_replica(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """Another replica queued the same object first: the claim in the insert's transaction
    still takes that job (it is queued, whoever queued it), and the submit answers it as a
    duplicate; the loan comes back exactly once."""
    a, b = pair
    (first,) = await b.insert_many([spec("same")], at=datetime.now(UTC))
    handed = lend(a, 1)
    (again,) = await a.insert_many([spec("same")], at=datetime.now(UTC))
    assert again.duplicate
    assert again.job.id == first.job.id
    assert handed == [[first.job.id]]
    job = await b.get(first.job.id)
    assert job is not None
    assert job.status is JobStatus.IN_PROGRESS


async def test_an_insert_and_its_claim_commit_together_or_not_at_all(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """The claim fails in the database (a trigger refuses it): the batch's insert is rolled
    back with it, so the failed submit queued nothing, the older job stays PENDING for a
    pass, and the loan comes back empty."""
    a, b = pair
    (queued,) = await b.insert_many([spec("queued")], at=datetime.now(UTC))
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'claims refused by the test'; END $$; "
                "CREATE TRIGGER refuse BEFORE UPDATE ON {schema}.jobs FOR EACH ROW "
                "WHEN (NEW.status = 2) EXECUTE FUNCTION {schema}.refuse()"
            ).format(schema=sql.Identifier(a.schema))
        )
    handed = lend(a, 2)
    with pytest.raises(HandlerError):
        await a.insert_many([spec("refused")], at=datetime.now(UTC))
    assert handed == [[]]
    page, _ = await b.page(JobFilter(), 0, 10)
    assert [(job.id, job.status) for job in page] == [(queued.job.id, JobStatus.PENDING)]


async def test_a_lent_claim_commits_with_its_insert_and_is_handed_out_before_the_answer(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """The insert and its claim are one commit that waits for the WAL flush
    (``synchronous_commit`` on, seen here by a trigger): what the claim took, the oldest
    queued job first, is handed out once it returns and before the submit is answered, and
    the answer needs no second commit."""
    a, b = pair
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {schema}.seen (setting text); "
                "CREATE FUNCTION {schema}.note() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN INSERT INTO seen VALUES (current_setting('synchronous_commit')); "
                "RETURN NULL; END $$; "
                "CREATE TRIGGER note AFTER INSERT ON {schema}.jobs FOR EACH ROW "
                "EXECUTE FUNCTION {schema}.note()"
            ).format(schema=sql.Identifier(a.schema))
        )
    (plain,) = await b.insert_many([spec("plain")], at=datetime.now(UTC))
    handed: list[str] = []
    answered_when_handed: list[bool] = []
    submit: asyncio.Task[list[Inserted]] | None = None

    def hand(claimed: list[Claimed]) -> None:
        handed.extend(item.moved.job.id for item in claimed)
        answered_when_handed.append(submit is not None and submit.done())

    async def demands() -> list[Demand]:
        return [Demand("s1", ALL, 2)]

    a.claim_with_inserts(demands, hand)
    submit = asyncio.create_task(a.insert_many([spec("fused")], at=datetime.now(UTC)))
    (inserted,) = await asyncio.wait_for(submit, 10)
    assert answered_when_handed == [False]
    assert handed == [plain.job.id, inserted.job.id]  # oldest first
    job = await b.get(inserted.job.id)
    assert job is not None
    assert job.status is JobStatus.IN_PROGRESS
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT setting FROM {}.seen").format(
            sql.Identifier(a.schema))).fetchall()  # fmt: skip
    assert [row[0] for row in rows] == ["on", "on"]


async def test_a_duplicate_is_answered_only_after_a_durable_commit(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """A submit answered as a duplicate names another replica's row, which that replica may
    have committed without waiting for the flush: the answer waits for a commit of its own
    that does wait (its alive row, held locked here)."""
    a, b = pair
    (first,) = await b.insert_many([spec("same")], at=datetime.now(UTC))
    async with await psycopg.AsyncConnection.connect(DATABASE_URL) as holder:
        await holder.execute(
            sql.SQL("SELECT 1 FROM {}.replicas WHERE id = 'a' FOR UPDATE").format(
                sql.Identifier(a.schema)
            )
        )
        submit = asyncio.create_task(a.insert_many([spec("same")], at=datetime.now(UTC)))
        await until_a_session(
            "wait_event_type = 'Lock' AND query LIKE 'INSERT INTO replicas%%'",
            (),
            "the duplicate's durable commit never waited for the held row",
        )
        assert not submit.done()
        await holder.rollback()
    (again,) = await asyncio.wait_for(submit, 10)
    assert again.duplicate
    assert again.job.id == first.job.id


def counted(schema: str) -> tuple[dict[JobStatus, int], dict[Lane, int]]:
    """The jobs counted from their rows: by status, and PENDING by lane."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT status, lane, count(*) FROM {}.jobs GROUP BY status, lane").format(
                sql.Identifier(schema)
            )
        ).fetchall()
    by_status: dict[JobStatus, int] = {}
    pending = dict.fromkeys(Lane, 0)
    for status, lane, n in rows:
        by_status[JobStatus(status)] = by_status.get(JobStatus(status), 0) + n
        if status == JobStatus.PENDING.value:
            pending[Lane(lane)] = n
    return by_status, pending


async def assert_counts_agree(schema: str, *repositories: PostgresRepository) -> None:
    by_status, pending = counted(schema)
    for repository in repositories:
        counts = await repository.counts()
        assert {s: n for s, n in counts.by_status.items() if n} == by_status
        assert counts.pending_by_lane == pending


async def test_the_counts_follow_every_write_and_a_recount_mends_a_drift(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """GetQueueStats' figures come from job_counts, not from reading the jobs: after inserts,
    a claim, moves, a cancel and a prune on two replicas they equal a count of the rows, from
    either replica, before and after a fold; a row that does not belong (a drift) is gone
    after a recount."""
    a, b = pair
    now = datetime.now(UTC)
    queued = await a.insert_many([spec(f"j{n}") for n in range(6)], at=now)
    (urgent,) = await b.insert_many([spec("urgent", Lane.INTERACTIVE)], at=now)
    claimed = await b.claim([Demand("s1", ALL, 3)], at=now)
    assert urgent.job.id in {item.moved.job.id for item in claimed}
    done = claimed[0].moved.job
    await b.move(done.id, JobStatus.PROCESSING_RESULTS, expect=frozenset({JobStatus.IN_PROGRESS}),
                 run=done.runs, at=now, reason="result received")  # fmt: skip
    await b.move(done.id, JobStatus.FINISHED, expect=frozenset({JobStatus.PROCESSING_RESULTS}),
                 at=now, reason="processed")  # fmt: skip
    await a.move(queued[-1].job.id, JobStatus.CANCELLED, expect=frozenset({JobStatus.PENDING}),
                 at=now, reason="cancelled by the test")  # fmt: skip
    await assert_counts_agree(a.schema, a, b)
    pruned = await a.prune(now + timedelta(seconds=1))
    assert set(pruned) == {done.id, queued[-1].job.id}  # FINISHED and CANCELLED
    await assert_counts_agree(a.schema, a, b)
    await b._fold_counts()
    await assert_counts_agree(a.schema, a, b)
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {}.job_counts VALUES (1, 1, 40)").format(sql.Identifier(a.schema))
        )
    assert (await a.counts()).pending_by_lane[Lane.BULK] == counted(a.schema)[1][Lane.BULK] + 40
    await a._fold_counts(recount=True)
    await assert_counts_agree(a.schema, a, b)


async def test_a_claim_of_a_job_this_replica_queued_makes_the_job_a_read_makes(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """The claiming replica builds the job from the spec it queued instead of decoding the
    row: what it hands out equals what another replica reads from the database."""
    a, b = pair
    labelled = replace(spec("mine"), labels={"team": "a"}, idempotency_key="k1", fresh=True)
    (mine,) = await a.insert_many([labelled], at=datetime.now(UTC))
    (theirs,) = await b.insert_many([spec("theirs")], at=datetime.now(UTC))
    claimed = await a.claim([Demand("s1", ALL, 2)], at=datetime.now(UTC))
    assert [item.moved.job.id for item in claimed] == [mine.job.id, theirs.job.id]
    for item in claimed:
        read = await b.get(item.moved.job.id)
        assert read is not None
        job = item.moved.job
        assert (job.spec, job.created_at, job.seq, job.status, job.runs, job.history) == (
            read.spec, read.created_at, read.seq, read.status, read.runs, read.history,
        )  # fmt: skip


async def test_a_fold_skips_its_turn_while_another_replica_folds_and_a_start_recounts(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """A fold never waits (it runs in the replica's maintenance, before the next lease
    renewal): while the counts' lock is held elsewhere it leaves the rows for the next one.
    A replica's first maintenance starts a recount in a task of its own, which waits for
    the lock and then mends a drift."""
    a, _ = pair
    await a.insert_many([spec(f"j{n}") for n in range(3)], at=datetime.now(UTC))
    table = sql.Identifier(a.schema, "job_counts")

    def rows() -> int:
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            found = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
        return int(found[0]) if found else 0

    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 1, 40)").format(table))
    before = rows()
    assert before == 2  # the insert's difference and the drift
    key = migrations.lock_key(a.schema) + 2
    async with await psycopg.AsyncConnection.connect(DATABASE_URL) as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        await asyncio.wait_for(a.maintain(), 10)  # returns: the fold skipped, the recount waits
        assert rows() == before
        assert a._recount is not None
        assert not a._recount.done()
        await holder.rollback()
    await asyncio.wait_for(a._recount, 10)
    await assert_counts_agree(a.schema, a)
    assert rows() == 1  # one status and lane


async def test_positions_count_the_queue_as_every_replica_left_it(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """A page's positions in one statement: per lane, from the jobs queued before the page
    and along the page's span; a job claimed or cancelled since it was read is 0."""
    a, b = pair
    now = datetime.now(UTC)
    bulk = [item.job for item in await a.insert_many([spec(f"b{n}") for n in range(6)], at=now)]
    (urgent,) = await b.insert_many([spec("u", Lane.INTERACTIVE)], at=now)
    assert await b.positions([*bulk, urgent.job]) == [1, 2, 3, 4, 5, 6, 1]
    await a.move(bulk[1].id, JobStatus.CANCELLED, expect=frozenset({JobStatus.PENDING}),
                 at=now, reason="cancelled by the test")  # fmt: skip
    # A later page (as ListJobs asks it): only what is still queued ahead counts.
    assert await b.positions(bulk[3:5]) == [3, 4]
    assert await b.positions([bulk[1], bulk[2], bulk[5]]) == [0, 2, 5]


async def test_a_settled_result_is_one_row_version_and_the_other_replica_hears_both_moves(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    a, b = pair
    heard: list[JobStatus] = []
    both = asyncio.Event()

    def moved(job: Job, transition: Transition) -> None:
        if transition.to_status in (JobStatus.PROCESSING_RESULTS, JobStatus.FINISHED):
            heard.append(transition.to_status)  # not the insert's or the claim's
        if len(heard) == 2:
            both.set()

    b.subscribe(work=lambda: None, moved=moved, listened=lambda i: True, held=list)
    await listening(b)
    (inserted,) = await a.insert_many([spec("settled")], at=datetime.now(UTC))
    (claimed,) = await a.claim([Demand("s1", ALL, 1)], at=datetime.now(UTC))
    job_id = inserted.job.id
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        query = sql.SQL("SELECT version FROM {}.jobs WHERE id = %s").format(
            sql.Identifier(a.schema)
        )
        before = await (await conn.execute(query, (job_id,))).fetchone()
        summary = common_pb2.ResultSummary(verdict=common_pb2.VERDICT_PASSED)
        moves = await a.settle(job_id, run=claimed.moved.job.runs,
                               result=common_pb2.ScanResult(job_id=job_id), summary=summary,
                               received_at=datetime.now(UTC), stored_at=datetime.now(UTC))  # fmt: skip
        assert len(moves) == 2
        after = await (await conn.execute(query, (job_id,))).fetchone()
    assert before is not None
    assert after is not None
    assert after[0] == before[0] + 1, "PROCESSING_RESULTS and FINISHED are one row version"
    async with asyncio.timeout(10):
        await both.wait()
    # B publishes both moves for its watchers, in order.
    assert heard == [JobStatus.PROCESSING_RESULTS, JobStatus.FINISHED]


async def test_what_a_replica_without_a_receiver_changed_is_owed_to_no_one() -> None:
    """A replica with no receiving server records no deliverer: once it and a delivering
    replica are gone, a replica that delivers adopts what the delivering one left owed, even
    after the other moved it, and nothing the other alone changed."""
    schema = new_schema_name()
    quiet = PostgresRepository(DATABASE_URL, schema=schema, replica="quiet", delivers=False)
    gone = PostgresRepository(DATABASE_URL, schema=schema, replica="gone")
    heir = PostgresRepository(DATABASE_URL, schema=schema, replica="heir")
    for repository in (quiet, gone, heir):
        await repository.open()
    try:
        (silent,) = await quiet.insert_many([spec("silent")], at=datetime.now(UTC))
        (owed,) = await gone.insert_many([spec("owed")], at=datetime.now(UTC))
        claimed = await quiet.claim([Demand("s1", ALL, 2)], at=datetime.now(UTC))
        assert {item.moved.job.id for item in claimed} == {silent.job.id, owed.job.id}
        await quiet.close()
        await gone.close()  # its replicas row goes: what it owed is an orphan now
        assert await heir.orphaned_deliveries() == [owed.job.id]
    finally:
        for repository in (quiet, gone, heir):
            await repository.close()  # a second close does nothing
        drop_schema(schema)


async def test_a_claim_of_many_jobs_takes_them_in_one_statement_and_announces_every_one(
    pair: tuple[PostgresRepository, PostgresRepository],
) -> None:
    """More jobs than one NOTIFY payload holds (NOTIFY_IDS) are claimed at once for many
    free slots; the other replica hears every assignment, for its watchers."""
    a, b = pair
    count = 2 * NOTIFY_IDS + 100
    heard: set[str] = set()
    everything = asyncio.Event()

    def moved(job: Job, transition: Transition) -> None:
        if transition.to_status is JobStatus.IN_PROGRESS:
            heard.add(job.id)
            if len(heard) == count:
                everything.set()

    b.subscribe(work=lambda: None, moved=moved, listened=lambda i: True, held=list)
    await listening(b)
    inserted = await a.insert_many([spec(f"many{n}") for n in range(count)], at=datetime.now(UTC))
    claimed = await a.claim(
        [Demand("s1", ALL, count), Demand("s2", ALL, count)], at=datetime.now(UTC)
    )
    assert sorted(c.moved.job.seq for c in claimed) == sorted(i.job.seq for i in inserted)
    # Rows one transaction wrote share its id: one claim statement wrote them all.
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        query = sql.SQL("SELECT count(DISTINCT xmin::text) FROM {}.jobs WHERE status = 2")
        row = await (await conn.execute(query.format(sql.Identifier(a.schema)))).fetchone()
    assert row == (1,)
    async with asyncio.timeout(10):
        await everything.wait()
    assert heard == {i.job.id for i in inserted}
