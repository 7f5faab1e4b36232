"""The job repository on PostgreSQL: the database is the truth, shared by every replica.

Every verb is its own committed statement or transaction (``commit`` has nothing left to do).
A claim is one statement: the PENDING jobs of each lane in arrival order, ``FOR UPDATE SKIP
LOCKED``, interleaved at the interactive share, handed to the Free scanners' slots and marked
IN_PROGRESS with the run counted, the replica and its lease. A move reads the row, lets the
state machine decide, and writes it back only if nobody wrote it meanwhile (its ``version``,
which every write of a column a job is read from changes): the compare-and-set that keeps a
replica that was cut off from overwriting a rescuer. The runs this replica claimed or moved
last are remembered as written, so their next move skips the read and the compare-and-set
alone checks it. Inserts go in one multi-row statement per batch; unique indexes deduplicate
across replicas.

Other replicas hear of changes by NOTIFY: ``<channel>_work`` when a job is queued or queued
again (they dispatch), ``<channel>_moves`` with the job ids and history lengths of every move
(they publish the transitions to their own watchers). A dedicated connection listens, and
reconnects by itself; the fallback poll in :meth:`maintain` covers a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson
import psycopg
import psycopg_pool
import structlog
from psycopg import sql
from psycopg.types.json import set_json_loads

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.storage.v1 import storage_pb2
from imagehandler.v1 import common_pb2, job_service_pb2
from server import mapping
from server.core import state_machine
from server.core.ids import new_job_id
from server.core.model import Job, JobFailure, JobSpec, JobStatus, Lane, ObjectKind, Transition
from server.storage.embedded import codec
from server.storage.postgres import migrations
from server.storage.repository import (
    INLINE_RESULT_BYTES,
    RESULT_RECEIVED,
    RESULTS_STORED,
    Claimed,
    Counts,
    Demand,
    Inserted,
    JobFilter,
    Lend,
    Moved,
    Recovered,
    StorageError,
    queue_full,
)

log = structlog.get_logger("imagehandler.storage")

S = JobStatus
STATUS = {m.value: m for m in JobStatus}
_HELD = (S.IN_PROGRESS.value, S.PROCESSING_RESULTS.value)
_IN_PROGRESS = frozenset({S.IN_PROGRESS})
_PROCESSING = frozenset({S.PROCESSING_RESULTS})
# The most job ids one NOTIFY names (its payload must stay under PostgreSQL's 8000 bytes): inserts
# and moves write at most this many rows per statement, and a claim announces its rows in
# pieces of this many, one NOTIFY each.
NOTIFY_IDS = 150
# A claim statement hands out at most this many jobs: a burst of submits with many Free slots
# is claimed in one statement and one commit rather than a round trip per NOTIFY_IDS.
CLAIM_MAX = 1_000
# Batches of moves in flight at once (see PostgresRepository.__init__).
MOVE_BATCHES = 2
# The table is analyzed again (its statistics, and so every cached plan on it) each time this
# replica has inserted as many rows as it held when last analyzed, from this many on.
ANALYZE_FROM = 1_000
_PAYLOAD_BYTES = 7000
# The fallback poll for work a lost notification did not announce: one claim query a second
# per replica bounds such a stall.
POLL_SECONDS = 1.0
# Specs of jobs this replica queued, kept for their claim (see PostgresRepository.__init__).
QUEUED_SPECS = 16_384
# How often a replica recounts job_counts from the jobs (a read of the whole table).
RECOUNT_SECONDS = 3600.0

COLUMNS = (
    "id, seq, spec, status, runs, scanner_id, error, updated_at, started_at, finished_at, "
    "history, result, summary, result_in_file, delivered, verdict_version, verdict_delivered, "
    "version"
)
_J_COLUMNS = ", ".join(f"j.{c.strip()}" for c in COLUMNS.split(","))

Row = tuple[Any, ...]
OnWork = Callable[[], None]
OnMoved = Callable[[Job, Transition], None]


def _failure(value: Any) -> JobFailure | None:
    return JobFailure(value[0], value[1], value[2]) if value else None


def _failure_json(error: JobFailure | None) -> list[str] | None:
    return [error.code, error.message, error.detail] if error is not None else None


def _transition_json(t: Transition) -> list[Any]:
    return [
        t.from_status.value if t.from_status is not None else 0,
        t.to_status.value,
        codec.unix_micros(t.at),
        t.scanner_id,
        t.run,
        t.reason,
        _failure_json(t.error),
    ]


def _transition(value: list[Any]) -> Transition:
    return Transition(
        STATUS[value[0]] if value[0] else None,
        STATUS[value[1]],
        codec.from_unix_micros(value[2]),
        value[3],
        value[4],
        value[5],
        _failure(value[6]),
    )


def _job(row: Row, queued: tuple[JobSpec, datetime] | None = None) -> tuple[Job, int]:
    """A job from its row (COLUMNS), and the row's version; ``queued``: the job's spec and
    creation time when known, so the stored spec need not be decoded."""
    if queued is None:
        job = codec.job(storage_pb2.StoredJob.FromString(row[2]))
    else:
        job = Job(id=row[0], seq=row[1], spec=queued[0], created_at=queued[1])
    job.seq = row[1]
    job.status = STATUS[row[3]]
    job.runs = row[4]
    job.scanner_id = row[5]
    job.error = _failure(row[6])
    job.updated_at, job.started_at, job.finished_at = row[7], row[8], row[9]
    job.history = [_transition(t) for t in row[10]]
    job.result = common_pb2.ScanResult.FromString(row[11]) if row[11] is not None else None
    job.result_summary = (
        common_pb2.ResultSummary.FromString(row[12]) if row[12] is not None else None
    )
    job.result_in_file = row[13]
    job.delivered, job.verdict_version, job.verdict_delivered = row[14], row[15], row[16]
    return job, row[17]


def dedup_key(spec: JobSpec) -> str:
    """The text form of ``spec.dedup_key()`` the unique index compares."""
    return key_text(spec.dedup_key())


def key_text(key: tuple[Any, ...]) -> str:
    """An object-and-policies key (``JobSpec.dedup_key()``, ``Job.key``) as the column holds it."""
    return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()


def passes_for(rooms: Iterable[int], n: int) -> int:
    """How many passes over the demands (one slot each per pass, while it has room) hand out
    ``n`` slots: the claim numbers no slot past them, so it sorts about ``n`` rows, not
    every free slot of every scanner."""
    ordered = sorted(rooms)
    covered = 0
    done = 0  # passes fully counted
    for index, room in enumerate(ordered):
        left = len(ordered) - index  # demands with room for pass done + 1
        more = (room - done) * left
        if covered + more >= n:
            return done + -(-(n - covered) // left)
        covered += more
        done = room
    return done


async def _lend_nothing() -> Sequence[Demand]:
    return ()


def _failed(waiters: Iterable[asyncio.Future[Any]], exc: BaseException) -> None:
    """A batch's write did not finish: its waiters are cancelled with it (the store is
    closing) or get its error."""
    for waiter in waiters:
        if waiter.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            waiter.cancel()
        else:
            waiter.set_exception(exc)


def unavailable(exc: BaseException) -> HandlerError:
    return HandlerError(
        Catalogue.SYSTEM_ERROR,
        f"the database is unreachable ({str(exc).strip() or type(exc).__name__}); retry "
        "shortly: the handler reconnects by itself",
        reason=Reason.UNAVAILABLE,
    )


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Database failures as HNDL errors: a lost or refused connection is UNAVAILABLE."""
    try:
        yield
    except HandlerError:
        raise
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout, OSError) as exc:
        raise unavailable(exc) from None
    except psycopg.Error as exc:
        raise StorageError(f"the database refused a query: {exc}") from None


class PostgresRepository:
    """The shared queue. ``schema`` isolates one handler installation (and each test)."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        schema: str = "imagehandler",
        interactive_share: float = 0.8,
        lease_seconds: float = 15.0,
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        replica: str = "",
        delivers: bool = True,
    ) -> None:
        self.url = url
        self.schema = schema
        self.interactive_share = interactive_share
        self.lease_seconds = lease_seconds
        self.replica = replica or secrets.token_hex(8)
        # What each write records as the job's deliverer: this replica when it has a
        # receiving server, else NULL (a new job) or whoever it was (a change). A change made
        # with no receiver anywhere is owed to no one, and keeps its row out of jobs_owing:
        # three index entries a job fewer when no receiver is configured.
        self._deliverer = self.replica if delivers else None
        self.connect_timeout = connect_timeout
        self._channel = f"ih_{hashlib.blake2b(schema.encode(), digest_size=6).hexdigest()}"
        kwargs: dict[str, Any] = {
            "autocommit": True,
            # Generic plans for the prepared statements (psycopg prepares a query from its
            # fifth run): every statement here has one shape whatever its parameters, and the
            # claim's custom plan cost more to make than to run.
            "options": f"-c search_path={schema} -c timezone=UTC "
            "-c plan_cache_mode=force_generic_plan",
            "connect_timeout": max(1, int(connect_timeout)),
        }
        self._kwargs = kwargs
        self.pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Row]] = (
            psycopg_pool.AsyncConnectionPool(
                url,
                kwargs=kwargs,
                min_size=1,
                max_size=pool_size,
                open=False,
                timeout=connect_timeout,
                configure=self._configure,
                name=f"image-handler-{self.replica}",
            )
        )
        # Large results are read and written from the result workers' threads.
        self.sync_pool: psycopg_pool.ConnectionPool[psycopg.Connection[Row]] = (
            psycopg_pool.ConnectionPool(
                url, kwargs=kwargs, min_size=0, max_size=2, open=False, timeout=connect_timeout
            )
        )
        self._on_work: OnWork = lambda: None
        self._on_moved: OnMoved = lambda job, transition: None
        self._listened: Callable[[str], bool] = lambda job_id: False
        self._held: Callable[[], Iterable[str]] = tuple
        self._on_acceptances: Callable[[], None] = lambda: None
        self._lend: Lend = _lend_nothing
        self._hand: Callable[[list[Claimed]], None] = lambda claimed: None
        self._listener: asyncio.Task[None] | None = None
        self._next_renewal = 0.0
        self._next_rescue = 0.0
        self._next_poll = 0.0
        self._next_recount = 0.0
        self._recount: asyncio.Task[None] | None = None
        # Plans are cached generic, made on a statement's fifth run on a connection: on a young
        # table, a plan that scans every row is the cheap one, and stays cached as the table
        # grows until its statistics change. Autovacuum analyzes within a minute or so; this
        # replica does it sooner, each time its own inserts doubled the rows (geometric: a
        # handful of analyzes over the table's life, each reading a bounded sample).
        self._rows_analyzed = 0  # the rows when last analyzed (or counted at open)
        self._rows_added = 0  # the rows this replica inserted since
        self._analyze: asyncio.Task[None] | None = None
        self._next_adoption = 0.0
        # Counts what may have queued jobs (own inserts and moves back to PENDING, other
        # replicas' announcements, the fallback poll); ``_drained[kinds]`` is the count at the
        # start of a claim that found nothing more of those kinds. While they are equal a
        # claim of those kinds cannot find anything: dispatch passes asked by results and
        # Free scanners then cost no statement.
        self._queued = 0
        self._drained: dict[frozenset[ObjectKind], int] = {}
        # The runs this replica claimed or moved last, as their rows are now (a private copy,
        # and the row's version): a move of one of them writes at once, its compare-and-set
        # on that version standing in for the read. A hint only: any miss reads.
        self._known: dict[str, tuple[Job, int]] = {}
        # The specs of the jobs this replica queued last (at most QUEUED_SPECS, oldest out
        # first): a claim of one of them builds the job from it instead of decoding the
        # stored spec, the largest cost of a claim on a queue that keeps up.
        self._queued_specs: dict[str, tuple[JobSpec, datetime]] = {}
        self._opened = False
        # The moves, and the inserts, asked while the previous batch of their kind was
        # written go together in the next one (see _GroupCommit).
        self._move_tasks: set[asyncio.Task[None]] = set()
        # Two batches of moves at a time: while one waits for its commit the handler builds
        # the next, and the database runs both on two cores. Each writes its rows in id
        # order, so two batches that share rows lock them in the same order.
        self._moves = _GroupCommit(
            self._run_moves, "postgres-moves", self._move_tasks, depth=MOVE_BATCHES
        )
        self._inserts = _GroupCommit(self._run_inserts, "postgres-inserts", self._move_tasks)
        self._durable = _GroupCommit(self._run_durable, "postgres-durable", self._move_tasks)

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Row]) -> None:
        set_json_loads(orjson.loads, conn)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[Row]]:
        with _errors():
            async with self.pool.connection() as conn:
                yield conn

    # ----- life cycle ------------------------------------------------------------------------

    async def open(self) -> Recovered:
        """Connect, bring the schema up to date under the advisory lock, start listening."""
        started = time.perf_counter()
        with _errors():
            await self.migrate()
            await self.pool.open(wait=True, timeout=self.connect_timeout)
            self.sync_pool.open(wait=False)
        self._opened = True
        await self._alive()
        self._listener = asyncio.create_task(self._listen(), name="postgres-listen")
        async with self._conn() as conn:
            cursor = await conn.execute("SELECT count(*) FROM jobs")
            row = await cursor.fetchone()
        self._rows_analyzed = int(row[0]) if row else 0
        # Runs a previous life of this replica held are rescued by lease expiry like any
        # other replica's: this one cannot tell them apart.
        return Recovered(jobs=self._rows_analyzed, seconds=time.perf_counter() - started)

    async def migrate(self) -> list[str]:
        """Apply the migrations this code knows (``image-handler migrate`` calls it alone)."""
        with _errors():
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
            )
            try:
                applied = await migrations.migrate(conn, self.schema)
            finally:
                await conn.close()
        if applied:
            log.info("database.migrated", schema=self.schema, applied=applied)
        return applied

    async def close(self) -> None:
        for task in (self._recount, self._analyze):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        while self._move_tasks:  # a batch that ends starts the next one
            await asyncio.gather(*self._move_tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._opened:
            # What this replica's outbox still owed is adopted by the others at once.
            with contextlib.suppress(HandlerError):
                async with self._conn() as conn:
                    await conn.execute("DELETE FROM replicas WHERE id = %s", (self.replica,))
            await self.pool.close()
            await asyncio.to_thread(self.sync_pool.close)
            self._opened = False

    async def commit(self) -> None:
        """Every verb committed before it returned."""

    def flush(self) -> None:
        """Nothing waits to be written."""

    async def maintain(self) -> None:
        """Renew the leases of the runs this replica's service holds (every third of a lease:
        runs on live scanner streams and results being processed), and poll for work a lost
        notification did not announce."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._next_renewal:
            self._next_renewal = now + self.lease_seconds / 3
            await self._alive()
            held = list(self._held())
            holding = set(held)
            # list(): a snapshot in one step, as write_result forgets rows from a worker thread
            for job_id in list(self._known):
                if job_id not in holding:
                    self._known.pop(job_id, None)  # runs another replica took over, or ended
            if held:
                # In id order, skipping rows a move holds now (it renews them itself): no
                # deadlock with this replica's own move batches.
                async with self._conn() as conn:
                    await conn.execute(
                        "UPDATE jobs SET lease_until = now() + %s * interval '1 second' "
                        "WHERE id IN (SELECT id FROM jobs WHERE id = ANY(%s) AND status IN (2, 3) "
                        "AND replica = %s ORDER BY id FOR UPDATE SKIP LOCKED)",
                        (self.lease_seconds, held, self.replica),
                    )
        if now >= self._next_poll:
            self._next_poll = now + min(POLL_SECONDS, self.lease_seconds / 3)
            self._work()
            await self._fold_counts()
        if now >= self._next_recount and (self._recount is None or self._recount.done()):
            # A read of every job: in a task of its own, so renewals never wait for it.
            self._next_recount = now + RECOUNT_SECONDS
            self._recount = asyncio.create_task(self._recount_counts(), name="postgres-recount")

    async def _fold_counts(self, *, recount: bool = False) -> None:
        """Fold job_counts into one row per status and lane, or (``recount``) replace it with
        a count of the jobs, which mends any drift (a replica of an older version writing
        meanwhile). Either is one statement, whose deletes and count see one snapshot, under
        a lock that keeps folds and recounts of every replica apart (a second one waiting on
        the first's rows would add back what it deleted). A fold skips its turn while
        another holds the lock; a recount waits for it."""
        if recount:
            statement = (
                "WITH gone AS (DELETE FROM job_counts) INSERT INTO job_counts (status, lane, n) "
                "SELECT status, lane, count(*) FROM jobs GROUP BY status, lane"
            )
        else:
            statement = (
                "WITH gone AS (DELETE FROM job_counts RETURNING status, lane, n) "
                "INSERT INTO job_counts (status, lane, n) SELECT status, lane, sum(n) "
                "FROM gone GROUP BY status, lane HAVING sum(n) <> 0"
            )
        key = migrations.lock_key(self.schema) + 2
        async with self._conn() as conn, conn.transaction():
            if recount:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            else:
                cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,))
                row = await cursor.fetchone()
                if row is None or not row[0]:
                    return
            await conn.execute(statement)

    async def _recount_counts(self) -> None:
        started = time.perf_counter()
        try:
            await self._fold_counts(recount=True)
        except HandlerError as error:  # the next hour's recount tries again
            log.warning("database.recount_failed", error=error.message)
            return
        log.info("database.recounted", seconds=round(time.perf_counter() - started, 3))

    async def _alive(self) -> None:
        """This replica is alive for another lease: the deliveries it owes stay its own."""
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO replicas (id, alive_until) VALUES "
                "(%s, now() + %s * interval '1 second') "
                "ON CONFLICT (id) DO UPDATE SET alive_until = EXCLUDED.alive_until",
                (self.replica, self.lease_seconds),
            )

    async def orphaned_deliveries(self) -> list[str]:
        """Jobs whose deliveries lag their changes and whose deliverer is dead (past its
        lease, or gone), now owed by this replica (at most one replica adopts each; checked
        every third of a lease). Old rows of dead replicas go at the same time."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_adoption:
            return []
        self._next_adoption = loop.time() + self.lease_seconds / 3
        async with self._conn() as conn:
            cursor = await conn.execute(
                "WITH x AS (SELECT id FROM jobs AS j "
                "WHERE deliverer IS NOT NULL AND (delivered < jsonb_array_length(history) "
                "OR verdict_delivered < verdict_version) "
                "AND deliverer <> %(me)s AND NOT EXISTS (SELECT 1 FROM replicas "
                "AS r WHERE r.id = j.deliverer AND r.alive_until >= now()) "
                "ORDER BY seq LIMIT 1000 FOR UPDATE SKIP LOCKED) "
                "UPDATE jobs AS j SET deliverer = %(me)s FROM x WHERE j.id = x.id RETURNING j.id",
                {"me": self.replica},
            )
            rows = await cursor.fetchall()
            await conn.execute(
                "DELETE FROM replicas WHERE alive_until < now() - %s * interval '1 second'",
                (self.lease_seconds * 10,),
            )
        if rows:
            log.warning("deliveries.adopted", jobs=len(rows), replica=self.replica)
        return [row[0] for row in rows]

    def claim_with_inserts(self, lend: Lend, hand: Callable[[list[Claimed]], None]) -> None:
        """A batch of single inserts claims for the lent demands in its own transaction (see
        :meth:`_run_inserts`)."""
        self._lend = lend
        self._hand = hand

    # ----- other replicas --------------------------------------------------------------------

    def subscribe(
        self,
        *,
        work: OnWork,
        moved: OnMoved,
        listened: Callable[[str], bool],
        held: Callable[[], Iterable[str]],
    ) -> None:
        """``work()`` when another replica queued a job or gave one back; ``moved(job, t)``
        for each of their moves of a job that ``listened(job_id)``; ``held()``: the runs this
        replica holds (their leases are renewed)."""
        self._on_work = work
        self._on_moved = moved
        self._listened = listened
        self._held = held
        if self._listener is not None:
            # The listener may have started (and announced itself to the no-op callback)
            # before these callbacks: whatever it heard meanwhile, look for work now.
            self._work()

    def _work(self) -> None:
        """Jobs may be queued that this replica did not queue itself: claim again."""
        self._queued += 1
        self._on_work()

    def on_acceptances(self, changed: Callable[[], None]) -> None:
        """``changed()`` when another replica added or removed a risk acceptance (NOTIFY in the
        same statement), and after the listener (re)connected: what it missed meanwhile."""
        self._on_acceptances = changed
        if self._listener is not None:
            changed()

    async def expired(self, *, at: datetime) -> list[Job]:
        """Runs whose replica stopped renewing its lease, now held by this one (at most one
        replica takes each): the service ends them as a restart's interrupted runs. This
        replica's own only when its service no longer holds them (a move that failed)."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_rescue:
            return []
        self._next_rescue = loop.time() + self.lease_seconds / 3
        # Never a run this replica's service still holds, even when its renewal came late (a
        # stalled loop): rescuing it here would queue it again while its scanner runs it, and
        # nobody would tell that scanner (a replica does not hear its own moves). Another
        # replica may take it over; this one then hears the move and cancels the run.
        held = list(self._held())
        async with self._conn() as conn:
            cursor = await conn.execute(
                "WITH x AS (SELECT id FROM jobs WHERE status IN (2, 3) AND lease_until < now() "
                "AND NOT (replica IS NOT DISTINCT FROM %s AND id = ANY(%s)) "
                "ORDER BY lease_until LIMIT 1000 FOR UPDATE SKIP LOCKED) "
                "UPDATE jobs AS j SET replica = %s, lease_until = now() + %s * interval "
                "'1 second', version = j.version + 1 FROM x WHERE j.id = x.id "
                f"RETURNING {_J_COLUMNS}",
                (self.replica, held, self.replica, self.lease_seconds),
            )
            rows = await cursor.fetchall()
        jobs = [_job(row)[0] for row in rows]
        if jobs:
            log.warning("runs.rescued", jobs=len(jobs), replica=self.replica)
        return jobs

    async def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnect after any failure (and ask for a
        dispatch then: notifications sent meanwhile are lost)."""
        backoff = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, **self._kwargs)
                try:
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self._channel + "_work"))
                    )
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self._channel + "_moves"))
                    )
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self._channel + "_risk"))
                    )
                    backoff = 0.1
                    self._work()
                    self._on_acceptances()
                    async for notice in conn.notifies():
                        if notice.channel.endswith("_work"):
                            if notice.payload != self.replica:  # its own asked already
                                self._work()
                        elif notice.channel.endswith("_risk"):
                            if notice.payload != self.replica:  # its own are in its memory
                                self._on_acceptances()
                        else:
                            await self._heard_moves(notice.payload)
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("database.listen_lost", error=str(exc).strip(), retry_in=backoff)
                await asyncio.sleep(backoff)  # a reconnect backoff, not a wait for state
                backoff = min(backoff * 2, 5.0)

    async def _heard_moves(self, payload: str) -> None:
        replica, _, items = payload.partition(" ")
        if replica == self.replica or not items:
            return
        # job id -> (first, last) history entries to publish, counted from 1: an item is
        # ``id:length`` or ``id:length:added`` (a write that added more than one entry).
        wanted: dict[str, tuple[int, int]] = {}
        listened = self._listened
        for item in items.split(","):
            job_id, _, rest = item.partition(":")
            if listened(job_id):
                length, _, added = rest.partition(":")
                last = int(length)
                first = last - int(added or 1) + 1
                if job_id in wanted:
                    first, last = min(first, wanted[job_id][0]), max(last, wanted[job_id][1])
                wanted[job_id] = (first, last)
        if not wanted:
            return
        try:
            async with self._conn() as conn:
                cursor = await conn.execute(
                    f"SELECT {COLUMNS} FROM jobs WHERE id = ANY(%s)", (list(wanted),)
                )
                rows = await cursor.fetchall()
        except HandlerError as error:
            log.warning("database.moves_unread", error=error.message)
            return
        for row in rows:
            job, _ = _job(row)
            first, last = wanted[job.id]
            if 0 < last <= len(job.history):
                for transition in job.history[max(first, 1) - 1 : last]:
                    self._on_moved(job, transition)

    def _moves_payload(self, jobs: Sequence[tuple[str, int]]) -> list[str]:
        """``<replica> id:length,...`` in pieces under the NOTIFY payload limit."""
        out: list[str] = []
        items: list[str] = []
        size = 0
        for job_id, length in jobs:
            item = f"{job_id}:{length}"
            if items and size + len(item) > _PAYLOAD_BYTES:
                out.append(f"{self.replica} {','.join(items)}")
                items, size = [], 0
            items.append(item)
            size += len(item) + 1
        if items:
            out.append(f"{self.replica} {','.join(items)}")
        return out

    # ----- jobs ------------------------------------------------------------------------------

    async def insert_many(
        self, specs: Sequence[JobSpec], *, at: datetime, queue_limit: int = 0
    ) -> list[Inserted]:
        """Without a queue limit: one read of what exists, then one statement per batch of
        new jobs (insert, arrival numbers, notifications). A unique index that refuses a row
        means another replica queued that object meanwhile: decide again; rows this call
        inserted stay its own."""
        if not specs:
            return []
        if queue_limit:
            return await self._insert_many(specs, [at] * len(specs), queue_limit)
        # Without a limit, the inserts asked while the previous batch was written (single
        # submits from many clients) go together, as moves do.
        loop = asyncio.get_running_loop()
        request = _InsertRequest(list(specs), at, loop.create_future())
        self._inserts.add(request)
        return await request.done

    async def _run_inserts(self, batch: list[_InsertRequest]) -> None:
        """The batch's rows and, for the Free scanners dispatch lends, a claim in the same
        transaction: a new job is on its way to a scanner with the insert's one commit, not
        after a second round trip that a dispatch pass would start once the insert returned.
        What the claim took is handed out before the submits are answered."""
        specs = [spec for request in batch for spec in request.specs]
        ats = [request.at for request in batch for _ in request.specs]
        demands = await self._lend()
        claimed: list[Claimed] = []
        try:
            inserted = await self._insert_many(specs, ats, 0, demands, claimed)
        except asyncio.CancelledError as exc:
            _failed((request.done for request in batch), exc)
            raise
        except Exception as exc:
            _failed((request.done for request in batch), exc)
            return
        finally:
            if demands:
                self._hand(claimed)
        answers: list[tuple[asyncio.Future[list[Inserted]], list[Inserted]]] = []
        start = 0
        for request in batch:
            answers.append((request.done, inserted[start : start + len(request.specs)]))
            start += len(request.specs)
        # The insert (and its claim) committed after the WAL flush. An answered duplicate is
        # another replica's row, which a replica of an earlier version may have committed
        # without waiting for the flush (see _insert_claiming): such answers wait for a
        # durable commit in their own group commit.
        if any(item.duplicate for item in inserted):
            for answer in answers:
                self._durable.add(answer)
            return
        for done, value in answers:
            if not done.done():
                done.set_result(value)

    async def _run_durable(
        self, batch: list[tuple[asyncio.Future[list[Inserted]], list[Inserted]]]
    ) -> None:
        """Answer submits once a commit that waits for the WAL flush returned: PostgreSQL
        writes the WAL in order, so that flush carries every asynchronous commit before it.
        The write is this replica's alive row, renewed as :meth:`_alive` does."""
        try:
            await self._alive()
        except asyncio.CancelledError as exc:
            _failed((done for done, _ in batch), exc)
            raise
        except Exception as exc:
            _failed((done for done, _ in batch), exc)
            return
        for done, value in batch:
            if not done.done():
                done.set_result(value)

    async def _insert_many(
        self,
        specs: Sequence[JobSpec],
        ats: list[datetime],
        queue_limit: int,
        demands: Sequence[Demand] = (),
        claimed: list[Claimed] | None = None,
    ) -> list[Inserted]:
        inserted = await self._insert_rows(specs, ats, queue_limit, demands, claimed)
        self._grew(sum(not item.duplicate for item in inserted))
        return inserted

    def _grew(self, rows: int) -> None:
        """Count the rows this replica inserted; analyze the table once they reach the rows
        it had when last analyzed."""
        self._rows_added += rows
        if self._rows_added < max(ANALYZE_FROM, self._rows_analyzed):
            return
        if self._analyze is not None and not self._analyze.done():
            return
        self._rows_analyzed += self._rows_added
        self._rows_added = 0
        self._analyze = asyncio.create_task(self._analyze_jobs(), name="postgres-analyze")

    async def _analyze_jobs(self) -> None:
        started = time.perf_counter()
        try:
            async with self._conn() as conn:
                await conn.execute("ANALYZE jobs")
        except HandlerError as error:  # autovacuum analyzes in any case
            log.warning("database.analyze_failed", error=error.message)
            return
        log.info(
            "database.analyzed",
            rows=self._rows_analyzed,
            seconds=round(time.perf_counter() - started, 3),
        )

    async def _insert_rows(
        self,
        specs: Sequence[JobSpec],
        ats: list[datetime],
        queue_limit: int,
        demands: Sequence[Demand],
        claimed: list[Claimed] | None,
    ) -> list[Inserted]:
        keys = [dedup_key(spec) for spec in specs]
        mine: set[str] = set()
        for attempt in range(10):
            try:
                async with self._conn() as conn:
                    if not queue_limit:
                        # First as if every job were new (one statement, the usual case); a
                        # unique index that refuses one sends us round again, reading first.
                        # The claim for lent demands goes with the first round only.
                        if attempt == 0 and demands and claimed is not None:
                            return await self._insert_claiming(
                                conn, specs, keys, ats, mine, demands, claimed
                            )
                        return await self._insert(
                            conn, specs, keys, ats, 0, mine, optimistic=attempt == 0
                        )
                    async with conn.transaction():
                        return await self._insert(conn, specs, keys, ats, queue_limit, mine)
            except _CollidedError:
                continue
        raise StorageError("inserts kept colliding with other replicas' inserts; retry")

    async def _insert_claiming(
        self,
        conn: psycopg.AsyncConnection[Row],
        specs: Sequence[JobSpec],
        keys: list[str],
        ats: list[datetime],
        mine: set[str],
        demands: Sequence[Demand],
        claimed: list[Claimed],
    ) -> list[Inserted]:
        """The optimistic insert and a claim for ``demands`` in one pipeline: the statements
        up to its one Sync are one implicit transaction (one round trip, one commit; an error
        in the database rolls back both). Nothing is read before the Sync, so the whole is one
        wait on the network. What the claim took is handed out only once that commit
        returned. A collision (another replica queued one of the objects) leaves the claim
        standing: it took only queued jobs, whoever queued them; the retry reads and decides.
        (Should this process fail between the two statements, the Sync still commits what
        was sent, as two autocommitted statements would have.)

        The commit waits for the WAL flush, so the submits are answered as soon as it
        returns: one round trip each for the assignment and the answer. (An asynchronous
        commit would let the assignment leave before the flush, but then the answer needs a
        second, durable commit; ADR 0002 says what that cost.)"""
        plan, fresh = self._plan(specs, keys, [])
        at = datetime.now(UTC)
        async with conn.pipeline():
            sent = [
                await self._send_rows(conn, specs, keys, fresh[start : start + NOTIFY_IDS], ats)
                for start in range(0, len(fresh), NOTIFY_IDS)
            ]
            self._queued += 1
            queued = self._queued  # the insert's own count included: nothing is missed
            groups = []
            # Dispatch lends its Free scanners only when its last pass emptied the queue: the
            # claim asks for about this batch's jobs (a few more may be other replicas'), not
            # for every free slot (its statement's work grows with what it asks).
            wanted = min(max(len(fresh), NOTIFY_IDS), CLAIM_MAX)
            for kinds, room in self._groups(demands).items():
                if self._drained.get(kinds) == queued:
                    continue
                n = min(sum(room.values()), wanted)
                params = self._claim_params(demands, room, kinds, n, at)
                groups.append((kinds, n, await conn.execute(_claim_statement(n), params)))
        # Committed (leaving the pipeline is its Sync): now the claims are real. A group
        # that got all it asked for may have more waiting: the pass after the insert asks.
        created: list[Job] = []
        for jobs, cursor in sent:
            created += await self._rows_inserted(jobs, cursor)
        for kinds, n, cursor in groups:
            got = self._claimed(await cursor.fetchall())
            if len(got) < n:
                self._drained[kinds] = queued
            claimed.extend(got)
        return self._outcome(plan, fresh, created, mine)

    async def _insert(
        self,
        conn: psycopg.AsyncConnection[Row],
        specs: Sequence[JobSpec],
        keys: list[str],
        ats: list[datetime],
        queue_limit: int,
        mine: set[str],
        *,
        optimistic: bool = False,
    ) -> list[Inserted]:
        rows: list[Row] = []
        if not optimistic:
            idem = [spec.idempotency_key for spec in specs if spec.idempotency_key]
            cursor = await conn.execute(
                f"SELECT {COLUMNS}, dedup_key, idempotency_key FROM jobs "
                "WHERE (idempotency_key <> '' AND idempotency_key = ANY(%s)) "
                "OR (status IN (1, 2) AND dedup_key = ANY(%s))",
                (idem, keys),
            )
            rows = await cursor.fetchall()
        plan, fresh = self._plan(specs, keys, rows)
        if queue_limit and fresh:
            # One replica at a time decides against the limit.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (migrations.lock_key(self.schema) + 1,)
            )
            cursor = await conn.execute(
                "SELECT coalesce(sum(n), 0) FROM job_counts WHERE status = 1"
            )
            counted = await cursor.fetchone()
            pending = int(counted[0]) if counted else 0
            if pending + len(fresh) > queue_limit:
                raise queue_full(queue_limit, pending, len(fresh))
        created: list[Job] = []
        for start in range(0, len(fresh), NOTIFY_IDS):
            jobs, cursor = await self._send_rows(
                conn, specs, keys, fresh[start : start + NOTIFY_IDS], ats
            )
            created += await self._rows_inserted(jobs, cursor)
            self._queued += 1
        return self._outcome(plan, fresh, created, mine)

    @staticmethod
    def _plan(
        specs: Sequence[JobSpec], keys: list[str], rows: list[Row]
    ) -> tuple[list[Job | int], list[int]]:
        """Per spec an existing job (``rows``: those with its idempotency key or an active
        one of its object) or the index of a new one in ``fresh``; ``fresh``: the specs to
        insert, a batch's repeats of one object or key folded into the first."""
        by_idem: dict[str, Job] = {}
        by_key: dict[str, Job] = {}
        for row in rows:
            job, _ = _job(row[:-2])
            if row[-1]:
                by_idem[row[-1]] = job
            if job.status.active:
                by_key[row[-2]] = job
        plan: list[Job | int] = []
        fresh: list[int] = []
        batch_idem: dict[str, int] = {}
        batch_key: dict[str, int] = {}
        for index, (spec, key) in enumerate(zip(specs, keys, strict=True)):
            found: Job | None = by_idem.get(spec.idempotency_key) if spec.idempotency_key else None
            if found is None and spec.idempotency_key in batch_idem:
                plan.append(batch_idem[spec.idempotency_key])
                continue
            if found is None:
                found = by_key.get(key)
            if found is not None:
                plan.append(found)
                continue
            if key in batch_key:  # a batch repeating an object
                plan.append(batch_key[key])
                continue
            slot = len(fresh)
            fresh.append(index)
            batch_key[key] = slot
            if spec.idempotency_key:
                batch_idem[spec.idempotency_key] = slot
            plan.append(slot)
        return plan, fresh

    @staticmethod
    def _outcome(
        plan: list[Job | int], fresh: list[int], created: list[Job], mine: set[str]
    ) -> list[Inserted]:
        """The submit's answer per spec; a unique index that refused a row (another replica
        queued that object first) raises :class:`_CollidedError` to decide again."""
        mine.update(job.id for job in created)
        if len(created) != len(fresh):
            raise _CollidedError
        out: list[Inserted] = []
        seen: set[str] = set()
        for item in plan:
            job = created[item] if isinstance(item, int) else item
            out.append(Inserted(job, duplicate=job.id not in mine or job.id in seen))
            seen.add(job.id)
        return out

    async def _send_rows(
        self,
        conn: psycopg.AsyncConnection[Row],
        specs: Sequence[JobSpec],
        keys: list[str],
        fresh: list[int],
        ats: list[datetime],
    ) -> tuple[list[Job], psycopg.AsyncCursor[Row]]:
        """One statement: the rows, their arrival numbers, and the notifications (its result
        is read by :meth:`_rows_inserted`, in a pipeline after the Sync)."""
        jobs: list[Job] = []
        documents: list[dict[str, Any]] = []
        for index in fresh:
            spec, at = specs[index], ats[index]
            job = Job(id=new_job_id(), seq=0, spec=spec, created_at=at)
            self._remember_spec(job.id, spec, at)
            state_machine.record_creation(job, at)
            stored = storage_pb2.StoredJob()
            mapping.set_job(stored.job, job, position=0)
            mapping.set_submitter(stored.submitter, spec.submitter)
            documents.append({
                "id": job.id, "lane": spec.lane.value, "kind": job.kind.value,
                "trigger": spec.trigger.value, "dedup_key": keys[index],
                "idempotency_key": spec.idempotency_key,
                "spec": stored.SerializeToString().hex(), "created_at": at,
                "history": [_transition_json(t) for t in job.history],
            })  # fmt: skip
            jobs.append(job)
        # The rows as one JSON document: psycopg dumps an array parameter element by element
        # in Python, a cost per row and column that the database's own parser does not have.
        cursor = await conn.execute(
            "WITH ins AS (INSERT INTO jobs (id, seq, lane, kind, trigger, dedup_key, "
            "idempotency_key, spec, created_at, updated_at, history, status, deliverer) "
            "SELECT u.id, nextval('jobs_arrival'), u.lane, u.kind, u.trigger, u.dedup_key, "
            "u.idempotency_key, decode(u.spec, 'hex'), u.created_at, u.created_at, u.history, "
            "1, %s FROM jsonb_to_recordset(%s::jsonb) AS u(id text, lane smallint, "
            "kind smallint, trigger smallint, dedup_key text, idempotency_key text, spec text, "
            "created_at timestamptz, history jsonb) "
            "ON CONFLICT DO NOTHING RETURNING id, seq, lane), "
            "counted AS (INSERT INTO job_counts (status, lane, n) "
            "SELECT 1, lane, count(*) FROM ins GROUP BY lane) "
            "SELECT ins.id, ins.seq, "
            "(SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM ins LIMIT 1) AS any_row), "
            "(SELECT pg_notify(%s, %s || ' ' || string_agg(id || ':1', ',')) FROM ins) FROM ins",
            (
                self._deliverer,
                orjson.dumps(documents).decode(),
                self._channel + "_work",
                self.replica,
                self._channel + "_moves",
                self.replica,
            ),
        )
        return jobs, cursor

    @staticmethod
    async def _rows_inserted(jobs: list[Job], cursor: psycopg.AsyncCursor[Row]) -> list[Job]:
        """The jobs whose rows went in (the others collided), with their arrival numbers."""
        seqs = {row[0]: int(row[1]) for row in await cursor.fetchall()}
        inserted = []
        for job in jobs:
            seq = seqs.get(job.id)
            if seq is not None:
                job.seq = seq
                inserted.append(job)
        return inserted

    async def get(self, job_id: str) -> Job | None:
        async with self._conn() as conn:
            cursor = await conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = %s", (job_id,))
            row = await cursor.fetchone()
        return _job(row)[0] if row is not None else None

    async def page(
        self, where: JobFilter, after_seq: int, size: int
    ) -> tuple[list[Job], int | None]:
        conditions = [sql.SQL("seq > %(after)s")]
        params: dict[str, Any] = {"after": after_seq, "size": size + 1}
        if where.statuses:
            conditions.append(sql.SQL("status = ANY(%(statuses)s)"))
            params["statuses"] = [s.value for s in where.statuses]
        if where.kinds:
            conditions.append(sql.SQL("kind = ANY(%(kinds)s)"))
            params["kinds"] = [k.value for k in where.kinds]
        if where.triggers:
            conditions.append(sql.SQL("trigger = ANY(%(triggers)s)"))
            params["triggers"] = [t.value for t in where.triggers]
        query = sql.SQL("SELECT {} FROM jobs WHERE {} ORDER BY seq LIMIT %(size)s").format(
            sql.SQL(COLUMNS), sql.SQL(" AND ").join(conditions)
        )
        async with self._conn() as conn:
            cursor = await conn.execute(query, params)
            rows = await cursor.fetchall()
        page = [_job(row)[0] for row in rows[:size]]
        return page, (page[-1].seq if len(rows) > size else None)

    async def counts(self) -> Counts:
        async with self._conn() as conn:
            cursor = await conn.execute(_COUNTS)
            rows = await cursor.fetchall()
        by_status: dict[JobStatus, int] = {}
        lanes: dict[Lane, tuple[int, datetime | None]] = {}
        for lane, status, n, oldest in rows:
            if lane:
                lanes[Lane(lane)] = (int(n), oldest)
            else:
                by_status[STATUS[status]] = int(n)
        return Counts(
            by_status=by_status,
            pending_by_lane={lane: lanes.get(lane, (0, None))[0] for lane in Lane},
            oldest_pending={lane: lanes.get(lane, (0, None))[1] for lane in Lane},
        )

    async def positions(self, jobs: Sequence[Job]) -> list[int]:
        """One statement for a page: per lane, the PENDING jobs before the page's first one
        are counted once, then the page's jobs are numbered along the PENDING jobs of its
        span, so a page costs the depth of its first job and its span, not each job's
        depth."""
        asked = [job for job in jobs if job.status is JobStatus.PENDING]
        if not asked:
            return [0] * len(jobs)
        async with self._conn() as conn:
            cursor = await conn.execute(
                _POSITIONS, ([job.spec.lane.value for job in asked], [job.seq for job in asked])
            )
            found = {int(seq): int(n) for seq, n in await cursor.fetchall()}
        # A job claimed since it was read is no longer in the queue: 0, as for any other.
        return [found.get(job.seq, 0) if job.status is JobStatus.PENDING else 0 for job in jobs]

    def position_hint(self, job: Job) -> int:
        return 0  # only a query can tell, and other replicas change it

    def pending_hint(self) -> int | None:
        return None  # other replicas insert and claim too

    async def select(self, statuses: frozenset[JobStatus]) -> list[Job]:
        async with self._conn() as conn:
            cursor = await conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE status = ANY(%s) ORDER BY seq",
                ([s.value for s in statuses],),
            )
            rows = await cursor.fetchall()
        return [_job(row)[0] for row in rows]

    async def latest_finished(self, key: tuple[Any, ...]) -> Job | None:
        # The job that finished last, as the memory store keeps it: a later finish wins, and of
        # two at the same instant the later arrival.
        async with self._conn() as conn:
            cursor = await conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE status = 4 AND dedup_key = %s "
                "ORDER BY finished_at DESC, seq DESC LIMIT 1",
                (key_text(key),),
            )
            row = await cursor.fetchone()
        return _job(row)[0] if row is not None else None

    # ----- runs ------------------------------------------------------------------------------

    @staticmethod
    def _groups(demands: Sequence[Demand]) -> dict[frozenset[ObjectKind], dict[int, int]]:
        """Demands that scan the same kinds (usually all of them): their free slots by index."""
        groups: dict[frozenset[ObjectKind], dict[int, int]] = {}
        for index, demand in enumerate(demands):
            if demand.slots > 0:
                groups.setdefault(demand.kinds, {})[index] = demand.slots
        return groups

    async def claim(self, demands: Sequence[Demand], *, at: datetime) -> list[Claimed]:
        """Demands that scan the same kinds share one statement (usually all of them)."""
        out: list[Claimed] = []
        for kinds, room in self._groups(demands).items():
            queued = self._queued
            if self._drained.get(kinds) == queued:
                continue
            while room:
                n = min(sum(room.values()), CLAIM_MAX)
                params = self._claim_params(demands, room, kinds, n, at)
                async with self._conn() as conn:
                    cursor = await conn.execute(_claim_statement(n), params)
                    got = self._claimed(await cursor.fetchall())
                out.extend(got)
                for item in got:
                    room[item.demand] -= 1
                    if not room[item.demand]:
                        del room[item.demand]
                if len(got) < n:
                    # Nothing more of these kinds was queued (or another claim holds it and
                    # will announce what it leaves).
                    self._drained[kinds] = queued
                    break
        return out

    def _claim_params(
        self,
        demands: Sequence[Demand],
        room: dict[int, int],
        kinds: frozenset[ObjectKind],
        n: int,
        at: datetime,
    ) -> dict[str, Any]:
        share = self.interactive_share
        return {
            "who": list(room),
            "names": [demands[index].scanner_id for index in room],
            "room": list(room.values()),
            "passes": passes_for(room.values(), n),
            "kinds": [k.value for k in kinds],
            "n": n,
            # Each lane's k-th job ranks at k / its share: the lanes interleave at the share.
            "wi": 1.0 / share,
            "wb": 1.0 / (1.0 - share) if share < 1 else 1e12,
            "replica": self.replica,
            "deliverer": self._deliverer,
            "lease": self.lease_seconds,
            "at": at,
            "micros": codec.unix_micros(at),
            "channel": self._channel + "_moves",
            "work": self._channel + "_work",
        }

    def _remember_spec(self, job_id: str, spec: JobSpec, at: datetime) -> None:
        specs = self._queued_specs
        specs[job_id] = (replace(spec, fresh=False) if spec.fresh else spec, at)  # as stored
        if len(specs) > QUEUED_SPECS:
            del specs[next(iter(specs))]

    def _claimed(self, rows: list[Row]) -> list[Claimed]:
        out: list[Claimed] = []
        specs = self._queued_specs
        for row in sorted(rows, key=lambda r: r[0]):
            job, version = _job(row[2:-2], specs.pop(row[2], None))
            self._known[job.id] = (job.copy(), version)
            out.append(Claimed(row[1], Moved(job, job.history[-1])))
        return out

    async def move(
        self,
        job_id: str,
        to_status: JobStatus,
        *,
        expect: frozenset[JobStatus],
        run: int = 0,
        at: datetime,
        reason: str,
        scanner_id: str = "",
        error: JobFailure | None = None,
        result: Any = None,
        summary: Any = None,
    ) -> Moved | None:
        """Every move asked while the previous batch of moves was written goes in one
        statement (one commit, one NOTIFY); see :meth:`_apply_moves`."""
        loop = asyncio.get_running_loop()
        request = _MoveRequest(
            job_id, to_status, expect, run, at, reason, scanner_id, error, result, summary,
            loop.create_future(),
        )  # fmt: skip
        self._moves.add(request)
        return await request.done

    async def settle(
        self,
        job_id: str,
        *,
        run: int,
        result: Any,
        received_at: datetime,
        summary: Any,
        stored_at: datetime,
    ) -> list[Moved]:
        """Both moves in the same batch of moves: one change of the row, one version."""
        loop = asyncio.get_running_loop()
        received = _MoveRequest(
            job_id, S.PROCESSING_RESULTS, _IN_PROGRESS, run, received_at, RESULT_RECEIVED, "",
            None, result, None, loop.create_future(),
        )  # fmt: skip
        stored = _MoveRequest(
            job_id, S.FINISHED, _PROCESSING, run, stored_at, RESULTS_STORED, "", None, None,
            summary, loop.create_future(), follows=True,
        )  # fmt: skip
        self._moves.add(received)
        self._moves.add(stored)
        # One batch settles both futures in the same loop turn (no gather: a task per job).
        try:
            first = await received.done
        finally:
            if stored.done.done() and not stored.done.cancelled():
                stored.done.exception()  # retrieved, so an error is not reported twice
        second = await stored.done
        return [moved for moved in (first, second) if moved is not None]

    async def _run_moves(self, batch: list[_MoveRequest]) -> None:
        try:
            for attempt in range(3):
                try:
                    outcomes = await self._apply_moves(batch)
                    break
                except HandlerError as exc:
                    rolled_back = isinstance(
                        exc.__context__,
                        psycopg.errors.TransactionRollbackError,  # type: ignore[attr-defined]
                    )
                    if not rolled_back or attempt == 2:
                        raise
                    # A deadlock or serialization failure rolled everything back: again.
                    log.info("database.moves_retried", error=str(exc.__context__).strip())
        except asyncio.CancelledError as exc:
            _failed((request.done for request in batch), exc)
            raise
        except Exception as exc:
            _failed((request.done for request in batch), exc)
            return
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.done.done():
                continue
            if isinstance(outcome, Exception):
                request.done.set_exception(outcome)
            else:
                request.done.set_result(outcome)

    async def _apply_moves(self, batch: list[_MoveRequest]) -> list[Moved | HandlerError | None]:
        """Read the rows, let the state machine decide each move in the order asked, write
        back every changed row whose version is still the one read (one statement, committed
        with its notifications). A run this replica claimed or moved last is not read: its
        row as written then stands in, the version checking it. Moves of a job another
        replica wrote meanwhile are decided again on a fresh read."""
        outcomes: list[Moved | HandlerError | None] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(20):
            jobs = self._remembered(batch, todo) if attempt == 0 else {}
            ids = sorted({batch[i].job_id for i in todo} - jobs.keys())
            async with self._conn() as conn:
                if ids:
                    cursor = await conn.execute(
                        f"SELECT {COLUMNS} FROM jobs WHERE id = ANY(%s)", (ids,)
                    )
                    jobs.update((row[0], _job(row)) for row in await cursor.fetchall())
                changed: dict[str, _Change] = {}
                for i in todo:
                    r = batch[i]
                    found = jobs.get(r.job_id)
                    if found is None:
                        outcomes[i] = None
                        continue
                    job, version = found
                    if job.status not in r.expect or (r.run and job.runs != r.run):
                        outcomes[i] = None
                        continue
                    try:
                        transition = state_machine.move(
                            job, r.to_status, at=r.at, reason=r.reason,
                            scanner_id=r.scanner_id, error=r.error,
                        )  # fmt: skip
                    except HandlerError as exc:
                        outcomes[i] = exc
                        continue
                    change = changed.get(job.id)
                    if change is None:
                        was = transition.from_status or job.status
                        change = changed[job.id] = _Change(job, version, job.result, was.value)
                    change.added.append(_transition_json(transition))
                    if r.result is not None:
                        job.result = r.result
                        if r.result.ByteSize() <= INLINE_RESULT_BYTES:
                            change.result = r.result.SerializeToString()
                    if r.summary is not None:
                        job.result_summary = r.summary
                        change.summary = r.summary.SerializeToString()
                    follower = i + 1 < len(batch) and batch[i + 1].follows
                    # settle()'s first move: its event shows the job as that move left it.
                    outcomes[i] = Moved(job.copy() if follower else job, transition)
                changes = sorted(changed.values(), key=lambda change: change.job.id)
                written: set[str] = set()
                for start in range(0, len(changes), NOTIFY_IDS):
                    written |= await self._write_changes(conn, changes[start : start + NOTIFY_IDS])
            self._remember(changes, written)
            todo = [
                i for i in todo if batch[i].job_id in changed and batch[i].job_id not in written
            ]
            if not todo:
                return outcomes
        raise StorageError("jobs kept changing under their moves; retry")

    def _remembered(self, batch: list[_MoveRequest], todo: list[int]) -> dict[str, tuple[Job, int]]:
        """The remembered rows of jobs with one move in ``todo`` that the state machine makes
        from that row, taken out of memory (the move changes them; a write puts them back): a
        move it refuses, or that finds another status, is decided on a fresh read instead."""
        asked: dict[str, int] = {}
        for i in todo:
            if not batch[i].follows:
                asked[batch[i].job_id] = asked.get(batch[i].job_id, 0) + 1
        out: dict[str, tuple[Job, int]] = {}
        for i in todo:
            r = batch[i]
            known = self._known.get(r.job_id)
            if known is None or r.follows or asked[r.job_id] > 1:
                continue
            job = known[0]
            if (
                job.status in r.expect
                and not (r.run and job.runs != r.run)
                and state_machine.can_move(job, r.to_status)
            ):
                out[r.job_id] = known
                self._known.pop(r.job_id, None)
        return out

    def _remember(self, changes: list[_Change], written: set[str]) -> None:
        """Rows written that this replica still holds are remembered as written (a copy: the
        job itself goes to the mover); the others (or a write that lost its compare-and-set)
        are forgotten."""
        for change in changes:
            job = change.job
            if job.id not in written or job.status.value not in _HELD:
                self._known.pop(job.id, None)
                continue
            row = job.copy()
            if change.result is None:
                row.result = change.stored_result  # what a read finds: not a large result
            self._known[job.id] = (row, change.version + 1)

    async def _write_changes(
        self, conn: psycopg.AsyncConnection[Row], changes: list[_Change]
    ) -> set[str]:
        """The rows still at the version read; the ids written (one JSON document, as the
        inserts)."""
        documents: list[dict[str, Any]] = []
        for change in changes:
            job = change.job
            documents.append({
                "id": job.id, "version": change.version, "status": job.status.value,
                "runs": job.runs, "scanner_id": job.scanner_id, "error": _failure_json(job.error),
                "updated_at": job.updated_at, "started_at": job.started_at,
                "finished_at": job.finished_at, "added": change.added,
                "result": change.result.hex() if change.result is not None else None,
                "summary": change.summary.hex() if change.summary is not None else None,
                "held": job.status.value in _HELD, "was": change.was,
            })  # fmt: skip
        cursor = await conn.execute(
            _WRITE_CHANGES,
            (self.replica, self._deliverer, self.lease_seconds, orjson.dumps(documents).decode(),
             [change.job.id for change in changes], self._channel + "_moves", self.replica,
             self._channel + "_work", self.replica),
        )  # fmt: skip
        rows = await cursor.fetchall()
        if any(row[1] == S.PENDING.value for row in rows):
            self._queued += 1  # a run to do again
        return {row[0] for row in rows}

    # ----- results, deliveries, verdicts, acceptances ----------------------------------------

    def write_result(self, job_id: str, payload: bytes) -> None:
        with _errors(), self.sync_pool.connection() as conn:
            conn.execute(
                "WITH r AS (INSERT INTO results (job_id, payload) VALUES (%s, %s) "
                "ON CONFLICT (job_id) DO UPDATE SET payload = EXCLUDED.payload) "
                "UPDATE jobs SET result_in_file = true, result = NULL, version = version + 1 "
                "WHERE id = %s",
                (job_id, payload, job_id),
            )
        self._known.pop(job_id, None)

    def read_result(self, job_id: str) -> bytes | None:
        with _errors(), self.sync_pool.connection() as conn:
            row = conn.execute(
                "SELECT payload FROM results WHERE job_id = %s", (job_id,)
            ).fetchone()
        return bytes(row[0]) if row is not None else None

    async def acknowledge(self, job: Job) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE jobs SET delivered = greatest(delivered, %s), "
                "verdict_delivered = greatest(verdict_delivered, %s), version = version + 1 "
                "WHERE id = %s",
                (job.delivered, job.verdict_delivered, job.id),
            )
        self._known.pop(job.id, None)

    async def verdict_changed(self, job: Job) -> None:
        summary = job.result_summary.SerializeToString() if job.result_summary is not None else None
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE jobs SET summary = coalesce(%s, summary), "
                "deliverer = coalesce(%s, deliverer), "
                "verdict_version = greatest(verdict_version, %s), version = version + 1 "
                "WHERE id = %s",
                (summary, self._deliverer, job.verdict_version, job.id),
            )
        self._known.pop(job.id, None)

    async def add_acceptance(self, record: job_service_pb2.RiskAcceptance) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "WITH a AS (INSERT INTO acceptances (id, body) VALUES (%s, %s) "
                "ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body) SELECT pg_notify(%s, %s)",
                (record.id, record.SerializeToString(), self._channel + "_risk", self.replica),
            )

    async def remove_acceptance(self, acceptance_id: str) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "WITH a AS (DELETE FROM acceptances WHERE id = %s RETURNING 1) "
                "SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM a LIMIT 1) AS removed",
                (acceptance_id, self._channel + "_risk", self.replica),
            )

    async def acceptances(self) -> list[job_service_pb2.RiskAcceptance]:
        async with self._conn() as conn:
            cursor = await conn.execute("SELECT body FROM acceptances ORDER BY n")
            rows = await cursor.fetchall()
        return [job_service_pb2.RiskAcceptance.FromString(row[0]) for row in rows]

    async def prune(self, before: datetime) -> list[str]:
        async with self._conn() as conn:
            cursor = await conn.execute(
                "WITH gone AS (DELETE FROM jobs WHERE status IN (4, 5, 6) AND finished_at < %s "
                "RETURNING id, status, lane), "
                "counted AS (INSERT INTO job_counts (status, lane, n) "
                "SELECT status, lane, -count(*) FROM gone GROUP BY status, lane) "
                "SELECT id FROM gone",
                (before,),
            )
            rows = await cursor.fetchall()
        return [row[0] for row in rows]


R = TypeVar("R")


class _GroupCommit(Generic[R]):
    """Requests handed together to one task: those of one loop turn and, while a batch is
    being written, every request made meanwhile (a group commit: under load a batch carries
    what arrived during one round trip instead of a statement and a commit each, and single
    submits, which gRPC delivers one per loop turn, group too). ``depth`` batches at a time
    (one unless asked); the tasks are kept in ``tasks`` so closing the store can wait for
    them."""

    def __init__(
        self,
        run: Callable[[list[R]], Coroutine[Any, Any, None]],
        name: str,
        tasks: set[asyncio.Task[None]],
        *,
        depth: int = 1,
    ) -> None:
        self._run = run
        self._name = name
        self._tasks = tasks
        self._depth = depth  # batches written at once
        self._pending: list[R] = []
        self._writing = 0

    def add(self, request: R) -> None:
        self._pending.append(request)
        if len(self._pending) == 1 and self._writing < self._depth:  # nothing scheduled yet
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        if self._writing >= self._depth or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._writing += 1
        task = asyncio.create_task(self._run(batch), name=self._name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._writing -= 1
        self._start()  # what arrived while this batch was written


@dataclass(slots=True)
class _MoveRequest:
    job_id: str
    to_status: JobStatus
    expect: frozenset[JobStatus]
    run: int
    at: datetime
    reason: str
    scanner_id: str
    error: JobFailure | None
    result: Any
    summary: Any
    done: asyncio.Future[Moved | None]
    follows: bool = False  # the second of settle()'s moves: decided on the first one's row


@dataclass(slots=True)
class _InsertRequest:
    specs: list[JobSpec]
    at: datetime
    done: asyncio.Future[list[Inserted]]


@dataclass(slots=True)
class _Change:
    """One job's moves in a batch: what its row gets."""

    job: Job
    version: int  # the row's version when read: the write's compare-and-set
    stored_result: Any  # the job's result column when read
    was: int  # the status when read, for job_counts
    added: list[list[Any]] = field(default_factory=list)  # history entries, as stored
    result: bytes | None = None
    summary: bytes | None = None


class _CollidedError(Exception):
    """Another replica inserted one of the batch's objects first (a unique index refused)."""


# Every changed row of a batch of moves at the version read (the compare-and-set), with the
# job counts and the notifications. The ids come again as an array: the rows are found through
# the primary key, as many as there are ids, whatever the JSON function's fixed estimate of 100
# rows would weigh against a scan of a table of a few thousand.
_WRITE_CHANGES = (
    "WITH w AS (UPDATE jobs AS j SET status = u.status, runs = u.runs, "
    "scanner_id = u.scanner_id, error = u.error, updated_at = u.updated_at, "
    "started_at = u.started_at, finished_at = u.finished_at, "
    "history = j.history || u.added, "
    "result = CASE WHEN u.result IS NULL THEN j.result ELSE decode(u.result, 'hex') END, "
    "summary = coalesce(decode(u.summary, 'hex'), j.summary), "
    "replica = CASE WHEN u.held THEN %s END, deliverer = coalesce(%s, j.deliverer), "
    "lease_until = CASE WHEN u.held THEN now() + %s * interval '1 second' END, "
    "version = j.version + 1 "
    "FROM jsonb_to_recordset(%s::jsonb) AS u(id text, version int, status smallint, "
    "runs int, scanner_id text, error jsonb, updated_at timestamptz, "
    "started_at timestamptz, finished_at timestamptz, added jsonb, result text, "
    "summary text, held bool, was smallint) "
    "WHERE j.id = ANY(%s::text[]) AND j.id = u.id AND j.version = u.version "
    "RETURNING j.id, j.status, j.lane, u.was, jsonb_array_length(j.history) AS n, "
    "jsonb_array_length(u.added) AS k), "
    "counted AS (INSERT INTO job_counts (status, lane, n) "
    "SELECT d.status, w.lane, sum(d.n) FROM w, "
    "LATERAL (VALUES (w.status, 1), (w.was, -1)) AS d(status, n) "
    "GROUP BY d.status, w.lane HAVING sum(d.n) <> 0) "
    "SELECT w.id, w.status, "
    "(SELECT pg_notify(%s, %s || ' ' || string_agg(id || ':' || n || ':' || k, ',')) "
    "FROM w), "
    "(SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM w WHERE status = 1 LIMIT 1) AS q) "
    "FROM w"
)

# The statements that read a lane's queue name the lane as a constant, one part per lane, so
# that each reads its lane's own partial index (jobs_pending_bulk, jobs_pending_interactive)
# whatever the table's statistics say (migration 0006 says why).
_COUNTS = (
    # One round trip (clients poll this, as the bench does) that reads no job but each lane's
    # oldest PENDING one (the head of its index): the numbers are the sums of job_counts,
    # which every write keeps.
    "SELECT 0, status, sum(n)::bigint, NULL::timestamptz FROM job_counts GROUP BY status"
    + "".join(
        f" UNION ALL SELECT {lane.value}, 1, (SELECT coalesce(sum(n), 0)::bigint "
        f"FROM job_counts WHERE status = 1 AND lane = {lane.value}), (SELECT created_at "
        f"FROM jobs WHERE status = 1 AND lane = {lane.value} ORDER BY seq LIMIT 1)"
        for lane in Lane
    )
)
_POSITIONS = (
    # Per lane: the PENDING jobs before the page's first one of the lane are counted once,
    # then the page's jobs are numbered along the PENDING jobs of their span.
    "WITH p AS MATERIALIZED "
    "(SELECT * FROM unnest(%s::smallint[], %s::bigint[]) AS p(lane, seq)) "
    + " UNION ALL ".join(
        f"SELECT s.seq, a.ahead + s.k FROM (SELECT min(seq) AS first, max(seq) AS last "
        f"FROM p WHERE lane = {lane.value}) AS b "
        f"CROSS JOIN LATERAL (SELECT count(*) AS ahead FROM jobs WHERE status = 1 "
        f"AND lane = {lane.value} AND seq < b.first) AS a "
        f"CROSS JOIN LATERAL (SELECT seq, row_number() OVER (ORDER BY seq) AS k FROM jobs "
        f"WHERE status = 1 AND lane = {lane.value} AND seq BETWEEN b.first AND b.last) AS s "
        f"JOIN p ON p.lane = {lane.value} AND p.seq = s.seq"
        for lane in Lane
    )
)

# The claim announces the rows it took (one NOTIFY) or, above NOTIFY_IDS rows, in pieces
# (one NOTIFY each: a payload must stay under 8000 bytes). Two statements, so that the claims
# of a few jobs (single submits) do not pay for the numbering of pieces.
_ANNOUNCE_ONE = """SELECT pg_notify(%(channel)s, %(replica)s || ' ' ||
        string_agg(id || ':' || jsonb_array_length(history), ','))
    FROM claimed"""
_ANNOUNCE_PIECES = f"""SELECT count(pg_notify(%(channel)s, %(replica)s || ' ' || items)) FROM (
        SELECT string_agg(id || ':' || jsonb_array_length(history), ',') AS items
        FROM (SELECT id, history, (row_number() OVER () - 1) / {NOTIFY_IDS} AS piece
            FROM claimed) AS numbered
        GROUP BY piece
    ) AS pieces"""
_CLAIM_TEMPLATE = f"""
WITH slots AS (
    -- The demands' slots one per demand per pass, in the demands' order: the first n.
    SELECT d.who, d.name, row_number() OVER (ORDER BY pass, d.nth) AS k
    FROM unnest(%(who)s::int[], %(names)s::text[], %(room)s::int[])
        WITH ORDINALITY AS d(who, name, room, nth),
        generate_series(1, least(d.room, %(passes)s)) AS pass
    ORDER BY pass, d.nth LIMIT %(n)s
),
interactive AS (
    SELECT id, seq FROM jobs
    WHERE status = 1 AND lane = 2 AND kind = ANY(%(kinds)s::smallint[])
    ORDER BY seq LIMIT %(n)s FOR UPDATE SKIP LOCKED
),
bulk AS (
    SELECT id, seq FROM jobs
    WHERE status = 1 AND lane = 1 AND kind = ANY(%(kinds)s::smallint[])
    ORDER BY seq LIMIT %(n)s FOR UPDATE SKIP LOCKED
),
ranked AS (
    SELECT id, lane, row_number() OVER (ORDER BY rank, lane DESC, seq) AS k FROM (
        SELECT id, seq, 2 AS lane, (row_number() OVER (ORDER BY seq) - 1) * %(wi)s AS rank
        FROM interactive
        UNION ALL
        SELECT id, seq, 1 AS lane, (row_number() OVER (ORDER BY seq) - 1) * %(wb)s AS rank
        FROM bulk
    ) AS both_lanes
),
picked AS (
    SELECT ranked.id, ranked.lane, slots.who, slots.name, slots.k
    FROM ranked JOIN slots ON slots.k = ranked.k
),
claimed AS (
    UPDATE jobs AS j SET
        status = 2, runs = j.runs + 1, scanner_id = picked.name, replica = %(replica)s,
        deliverer = coalesce(%(deliverer)s, j.deliverer),
        lease_until = now() + %(lease)s * interval '1 second',
        started_at = %(at)s, updated_at = %(at)s, version = j.version + 1,
        history = j.history || jsonb_build_array(jsonb_build_array(
            1, 2, %(micros)s::bigint, picked.name, j.runs + 1, 'assigned', NULL))
    -- The ids again as an array: the rows are found through the primary key, as many as
    -- were picked, however many the generic plan guesses the CTEs above give (an unknown
    -- LIMIT is a tenth of their input: thousands on a backlog, then a hash of every row).
    FROM picked WHERE j.id = picked.id AND j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING picked.k, picked.who, {_J_COLUMNS}
),
counted AS (
    INSERT INTO job_counts (status, lane, n)
    SELECT d.status, picked.lane, d.sign * count(*)
    FROM claimed JOIN picked USING (k), (VALUES (1, -1), (2, 1)) AS d(status, sign)
    GROUP BY d.status, picked.lane, d.sign
)
SELECT claimed.*, (
    {{announce}}
), (
    -- Rows this statement locked but did not take (each lane locks up to n, n are taken)
    -- were skipped by every claim running at the same moment, which may then have found
    -- nothing: no insert or move will announce them again, so wake the other replicas.
    SELECT pg_notify(%(work)s, %(replica)s)
    WHERE (SELECT count(*) FROM interactive) + (SELECT count(*) FROM bulk)
        > (SELECT count(*) FROM picked)
) FROM claimed
"""
_CLAIM = _CLAIM_TEMPLATE.format(announce=_ANNOUNCE_ONE)  # at most NOTIFY_IDS rows
_CLAIM_MANY = _CLAIM_TEMPLATE.format(announce=_ANNOUNCE_PIECES)


def _claim_statement(n: int) -> str:
    """The claim for at most ``n`` jobs."""
    return _CLAIM if n <= NOTIFY_IDS else _CLAIM_MANY
