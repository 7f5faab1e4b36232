"""Three handler processes on one PostgreSQL database, scanners spread across them: one queue.

Real processes, a real database (a schema and a login role of its own per test, dropped after).
Waits are on WatchJobs events or on a condition, each with a deadline; nothing here measures
time."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from imagehandler.v1 import (
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    scanner_service_pb2_grpc,
)
from tests.helpers import HIGH, RawScanner, image
from tests.paths import ROOT
from tests.postgres import DATABASE_URL, drop_schema, new_schema_name
from tests.receiver import ReceiverServer
from tests.system.test_crash import free_port

S = common_pb2
BIN = Path(sys.executable).parent
LEASE = 5.0
# Generous for a shared two-core machine: a scanner starved of CPU for a second is not gone.
HEARTBEAT = ("--heartbeat-interval", "0.5", "--heartbeat-timeout", "5")
LOG_LEVEL = os.environ.get("IMAGE_HANDLER_TEST_LOG_LEVEL", "warning")


@dataclass
class Replica:
    address: str
    process: subprocess.Popen[bytes]
    scanners: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stub(self) -> tuple[grpc.Channel, job_service_pb2_grpc.JobServiceStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, job_service_pb2_grpc.JobServiceStub(channel)


@dataclass
class Database:
    """A login role and a schema of its own: the test can cut the handlers off by name."""

    role: str
    schema: str
    url: str

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(DATABASE_URL, autocommit=True)

    def cut(self) -> None:
        """No new connection for the role, and its open ones ended (pg_terminate_backend)."""
        with self.admin() as conn:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(self.role)))
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (self.role,),
            )

    def restore(self) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(self.role)))


@pytest.fixture
def database() -> Iterator[Database]:
    role = f"ih_{secrets.token_hex(5)}"
    schema = new_schema_name()
    parts = urlsplit(DATABASE_URL)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urlunsplit((parts.scheme, f"{role}@{host}", parts.path, parts.query, ""))
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        ident = sql.Identifier(role)
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        conn.execute(
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(schema), ident)
        )
    yield Database(role, schema, url)
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
    drop_schema(schema)
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def wait_serving(address: str, process: subprocess.Popen[bytes], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            assert process.poll() is None, "the handler exited during start"
            with suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.02)  # polling a readiness condition, with the deadline above
    raise AssertionError(f"the handler at {address} did not become SERVING")


class Cluster:
    def __init__(self, database: Database, logs: Path) -> None:
        self.database = database
        self.replicas: list[Replica] = []
        # Each process's log, kept for a failure's reading (pytest keeps its tmp_path).
        self.logs = logs

    def start_replica(self, *extra: str) -> Replica:
        address = f"127.0.0.1:{free_port()}"
        log = (self.logs / f"replica-{len(self.replicas)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--listen", address,
             "--storage", "postgres", "--database-url", self.database.url,
             "--database-schema", self.database.schema, "--lease-seconds", str(LEASE),
             *HEARTBEAT, "--log-level", LOG_LEVEL, *extra],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
        log.close()  # the process has its own descriptor
        replica = Replica(address, process)
        self.replicas.append(replica)
        wait_serving(address, process)
        return replica

    def start_scanner(self, replica: Replica, name: str, *, delay: float, slots: int) -> None:
        replica.scanners.append(
            subprocess.Popen(
                [
                    str(BIN / "image-scanner"),
                    "--handler",
                    replica.address,
                    "--engine",
                    "noop",
                    "--slots",
                    str(slots),
                    "--delay",
                    str(delay),
                    "--scanner-id",
                    name,
                    "--backoff-initial",
                    "0.05",
                    "--backoff-max",
                    "0.3",
                    "--log-level",
                    "error",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def stop(self) -> None:
        for replica in self.replicas:
            for process in (*replica.scanners, replica.process):
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)


@pytest.fixture
def cluster(database: Database, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(database, tmp_path)
    yield cluster
    cluster.stop()


class Finished:
    """A WatchJobs stream on one replica, counting jobs that reached FINISHED (on any)."""

    def __init__(self, replica: Replica) -> None:
        self.channel, stub = replica.stub()
        self.stream = stub.WatchJobs(
            job_service_pb2.WatchJobsRequest(statuses=[S.JOB_STATUS_FINISHED])
        )
        self.finished: set[str] = set()
        self.changed = threading.Condition()
        # The stream is open once the handler answered its headers.
        self.stream.initial_metadata()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with suppress(grpc.RpcError):
            for event in self.stream:
                with self.changed:
                    self.finished.add(event.job.id)
                    self.changed.notify_all()

    def wait_for(self, ids: set[str], deadline: float, replica: Replica) -> None:
        with self.changed:
            done = self.changed.wait_for(lambda: ids <= self.finished, timeout=deadline)
        missing = sorted(ids - self.finished)
        assert done, f"{len(missing)} of {len(ids)} jobs never FINISHED: " + "; ".join(
            str(full(replica, job_id)).replace("\n", " ") for job_id in missing[:2]
        )

    def close(self) -> None:
        self.stream.cancel()  # type: ignore[no-untyped-call]
        self.channel.close()


def submit(replica: Replica, tags: list[str]) -> list[str]:
    channel, stub = replica.stub()
    with channel:
        reply = stub.SubmitJobs(
            job_service_pb2.SubmitJobsRequest(jobs=[image(tag=tag) for tag in tags]), timeout=10
        )
    return [result.job.id for result in reply.results]


def listing(replica: Replica) -> list[common_pb2.Job]:
    channel, stub = replica.stub()
    out: list[common_pb2.Job] = []
    token = ""
    with channel:
        while True:
            page = stub.ListJobs(
                job_service_pb2.ListJobsRequest(page_size=1000, page_token=token), timeout=10
            )
            out.extend(page.jobs)
            token = page.next_page_token
            if not token:
                return out


def full(replica: Replica, job_id: str) -> common_pb2.Job:
    channel, stub = replica.stub()
    with channel:
        return stub.GetJob(
            job_service_pb2.GetJobRequest(job_id=job_id, view=job_service_pb2.JOB_VIEW_FULL),
            timeout=10,
        ).job


def stats(replica: Replica) -> tuple[int, ...]:
    channel, stub = replica.stub()
    with channel:
        s = stub.GetQueueStats(job_service_pb2.GetQueueStatsRequest(), timeout=10)
    return (s.pending, s.in_progress, s.processing_results, s.finished, s.error, s.cancelled)


def runs_of(job: common_pb2.Job) -> list[common_pb2.JobTransition]:
    """The job's runs, checked to be one at a time: each assignment comes from PENDING, the
    next one only after the job went back to PENDING, and the runs count 1, 2, ..."""
    runs = [t for t in job.history if t.to_status == S.JOB_STATUS_IN_PROGRESS]
    assert all(t.from_status == S.JOB_STATUS_PENDING for t in runs), job.id
    assert [t.run for t in runs] == list(range(1, len(runs) + 1)), f"job {job.id}: {runs}"
    assert job.runs == len(runs)
    return runs


def test_three_replicas_share_one_queue_in_arrival_order(cluster: Cluster) -> None:
    replicas = [cluster.start_replica() for _ in range(3)]
    watcher = Finished(replicas[0])
    # The whole queue first, from every replica, so every job is committed before any claim:
    # then each replica's claims must come in arrival order.
    ids: list[str] = []
    for batch in range(12):
        ids += submit(replicas[batch % 3], [f"j{batch}-{n}" for n in range(25)])
    for number, replica in enumerate(replicas):
        for k in range(2):
            cluster.start_scanner(replica, f"r{number}-s{k}", delay=0.002, slots=3)
    watcher.wait_for(set(ids), 40, replicas[1])  # seen on replica 0, whoever ran them
    watcher.close()

    arrival = {job.id: n for n, job in enumerate(listing(replicas[0]))}
    by_replica: dict[str, list[tuple[float, int]]] = {}
    for n, job_id in enumerate(ids):
        job = full(replicas[n % 3], job_id)
        finished = [t for t in job.history if t.to_status == S.JOB_STATUS_FINISHED]
        assert len(finished) == 1, f"job {job_id} finished {len(finished)} times"
        runs = runs_of(job)  # never assigned to two scanners at once
        if len(runs) > 1:
            continue  # a retried run goes back to its place: only first claims show the order
        (run,) = runs
        claim_at = run.at.seconds + run.at.nanos / 1e9
        by_replica.setdefault(run.scanner_id.split("-")[0], []).append((claim_at, arrival[job_id]))
    assert sorted(by_replica) == ["r0", "r1", "r2"], "the work was not spread over the replicas"
    for name, claims in by_replica.items():
        order = [seq for _, seq in sorted(claims)]
        assert order == sorted(order), f"replica {name} claimed out of arrival order"

    # Listings and stats agree from every replica.
    views = [[(j.id, j.status) for j in listing(r)] for r in replicas]
    assert views[0] == views[1] == views[2]
    assert stats(replicas[0]) == stats(replicas[1]) == stats(replicas[2])
    assert stats(replicas[0])[3] == len(ids)


def test_a_killed_replica_runs_return_within_the_lease(cluster: Cluster) -> None:
    replicas = [cluster.start_replica() for _ in range(3)]
    watcher = Finished(replicas[0])
    for number, replica in enumerate(replicas):
        # Slow scans on the replica that will die, so it holds runs when it does.
        cluster.start_scanner(replica, f"r{number}-s0", delay=5.0 if number == 2 else 0.02,
                              slots=4)  # fmt: skip
    ids: list[str] = []
    for batch in range(6):
        ids += submit(replicas[batch % 3], [f"k{batch}-{n}" for n in range(20)])
    doomed = replicas[2]
    # Wait until the doomed replica's scanner holds runs (a condition, with a deadline).
    end = time.monotonic() + 30
    while time.monotonic() < end:
        held = [j for j in listing(replicas[0]) if j.status == S.JOB_STATUS_IN_PROGRESS
                and j.scanner_id == "r2-s0"]  # fmt: skip
        if held:
            break
        time.sleep(0.02)  # polling a condition, with the deadline above
    assert held, "the doomed replica never held a run"
    for process in (doomed.process, *doomed.scanners):
        process.kill()  # SIGKILL: no drain, no lease given back
        process.wait(timeout=30)
    watcher.wait_for(set(ids), 40, replicas[1])
    watcher.close()
    for job in held:
        again = full(replicas[0], job.id)
        assert again.status == S.JOB_STATUS_FINISHED
        runs_of(again)
        assert again.runs >= 2, "the run the dead replica held counts"
        returned = [t for t in again.history if t.to_status == S.JOB_STATUS_PENDING and t.run == 1]
        assert returned, f"job {job.id} was not returned to the queue"
        assert "stopped renewing its lease" in returned[0].error.detail
    everything = listing(replicas[0])
    assert {j.id for j in everything} >= set(ids), "an acknowledged job is gone"
    assert all(j.status == S.JOB_STATUS_FINISHED for j in everything)


def test_what_a_killed_replica_owed_the_receiver_is_delivered_by_another(
    cluster: Cluster, receiver: ReceiverServer, secret_file: Path
) -> None:
    """A replica dies (kill -9) while the receiving server refuses what it owes: once the
    receiver takes deliveries again, a surviving replica sends every change the dead one owed."""
    delivery = ("--receiver-url", receiver.url, "--receiver-secret-file", str(secret_file),
                "--delivery-backoff", "0.05", "--delivery-max-backoff", "0.2")  # fmt: skip
    doomed, survivor = cluster.start_replica(*delivery), cluster.start_replica(*delivery)
    receiver.always_fail = True
    # No scanner: each job owes its creation (PENDING), made on the doomed replica alone.
    ids = submit(doomed, [f"owed-{n}" for n in range(5)])
    end = time.monotonic() + 30
    while receiver.attempts < len(ids):  # the doomed replica tried (and was refused)
        assert time.monotonic() < end, "the doomed replica never tried to deliver"
        time.sleep(0.02)  # polling another process's effect, with the deadline above
    doomed.process.kill()  # SIGKILL: its outbox dies with what it owed
    doomed.process.wait(timeout=30)
    receiver.always_fail = False
    want = {f"{job_id}:0" for job_id in ids}
    end = time.monotonic() + 40
    while True:
        with receiver.lock:
            got = {key for key, _, signed in receiver.received if signed}
        if want <= got:
            break
        assert time.monotonic() < end, f"never delivered: {sorted(want - got)}"
        time.sleep(0.05)  # polling the receiver's record, with the deadline above
    assert survivor.process.poll() is None
    # The survivor acknowledged them in the database: nothing is owed any more.
    query = sql.SQL(
        "SELECT count(*) FROM {}.jobs WHERE id = ANY(%s) AND delivered < jsonb_array_length(history)"
    ).format(sql.Identifier(cluster.database.schema))
    end = time.monotonic() + 10
    with cluster.database.admin() as conn:
        while (row := conn.execute(query, (ids,)).fetchone()) and row[0]:
            assert time.monotonic() < end, f"{row[0]} deliveries still owed in the database"
            time.sleep(0.02)  # polling the acknowledgements, with the deadline above


def acceptance_ids(replica: Replica) -> set[str]:
    channel, stub = replica.stub()
    with channel:
        reply = stub.ListRiskAcceptances(job_service_pb2.ListRiskAcceptancesRequest(), timeout=10)
    return {a.id for a in reply.acceptances}


def until(condition: Callable[[], bool], what: str, deadline: float = 20) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.02)  # polling another process's state, with the deadline above


async def test_an_acceptance_made_on_one_replica_decides_verdicts_on_another(
    cluster: Cluster,
) -> None:
    first, second = cluster.start_replica(), cluster.start_replica()
    channel, stub = first.stub()
    with channel:
        accepted = stub.AcceptRisk(
            job_service_pb2.AcceptRiskRequest(
                finding_id=HIGH.id, scope=job_service_pb2.RISK_SCOPE_EVERYWHERE,
                reason="not reachable here",
            ),
            timeout=10,
        ).acceptance  # fmt: skip
    until(lambda: accepted.id in acceptance_ids(second), "the other replica never heard of it")
    # A result the second replica processes (its scanner, its submit) is decided with it.
    async with (
        grpc.aio.insecure_channel(second.address) as aio,
        RawScanner(scanner_service_pb2_grpc.ScannerServiceStub(aio), "s1") as scanner,
    ):
        await scanner.start()
        (job_id,) = submit(second, ["accepted-elsewhere"])
        (job,) = await scanner.assigned()
        await scanner.finish(job, vulnerabilities=[HIGH])
        until(lambda: full(second, job_id).status == S.JOB_STATUS_FINISHED, "never finished")
    result = full(second, job_id).result
    assert result.verdict == S.VERDICT_PASSED
    assert list(result.accepted) == [HIGH.id]
    # Revoked on the first replica: gone from the second without a restart.
    channel, stub = first.stub()
    with channel:
        stub.RevokeRiskAcceptance(
            job_service_pb2.RevokeRiskAcceptanceRequest(id=accepted.id), timeout=10
        )
    until(lambda: accepted.id not in acceptance_ids(second), "the revoke never reached it")


def test_cut_off_from_the_database_unavailable_then_recovers(
    cluster: Cluster, database: Database
) -> None:
    (replica,) = [cluster.start_replica()]
    (job_id,) = submit(replica, ["before"])
    database.cut()
    channel, stub = replica.stub()
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetJob(job_service_pb2.GetJobRequest(job_id=job_id), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "HNDL-007" in (refused.value.details() or "")
        assert "database is unreachable" in (refused.value.details() or "")
        database.restore()
        # It recovers by itself: no restart, the same process answers again.
        end = time.monotonic() + 60
        while True:
            try:
                reply = stub.GetJob(job_service_pb2.GetJobRequest(job_id=job_id), timeout=30)
                break
            except grpc.RpcError as error:
                code = error.code()
                assert code == grpc.StatusCode.UNAVAILABLE, code
                assert time.monotonic() < end, "the handler did not recover"
                time.sleep(0.05)  # polling recovery, with the deadline above
        assert reply.job.id == job_id
        assert replica.process.poll() is None
        assert submit(replica, ["after"])


MIGRATIONS = ROOT / "server" / "storage" / "postgres" / "migrations"


def test_migrate_as_documented_then_a_newer_schema_is_refused(database: Database) -> None:
    """docs/operating/postgres.md: `image-handler migrate`, then `serve` on a database a later
    release migrated further stops with HNDL-003 naming both versions."""
    command = [sys.executable, "-m", "server.cli", "migrate", "--database-url", database.url,
               "--database-schema", database.schema]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    applied = sorted(path.name for path in MIGRATIONS.glob("*.sql"))
    assert all(name in first.stderr for name in applied), first.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert "nothing to apply" in again.stderr
    with database.admin() as conn:
        conn.execute(
            sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (9999, 'x')").format(
                sql.Identifier(database.schema)
            )
        )
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--listen", "127.0.0.1:0",
         "--storage", "postgres", "--database-url", database.url,
         "--database-schema", database.schema],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "HNDL-003" in refused.stderr
    assert f"version 9999, newer than this handler's {len(applied)}" in refused.stderr
