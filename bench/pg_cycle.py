"""The PostgreSQL store's own cost per job, without gRPC, scanners or a handler: the database's
CPU (every ``postgres`` process) and this process's, for the store's cycle of a job as the
batched end-to-end run drives it: an insert of 100 jobs, one claim of the 100, a settle of each
(PROCESSING_RESULTS and FINISHED in one write), the settles of a batch at once.

``--single`` drives the single-submit path instead: each job is a batch of its own, whose
insert claims it in the same transaction for the Free scanners dispatch lends it (``--scanners``
of ``--slots`` each, as the pickup bench's), then its settle.

Before it measures, each statement runs a few times on a near-empty table, as in a handler
that starts on a new schema: the plans the connections cache then are the ones a young table
gets.

It measures one change to the schema or the statements with far less noise than the end to end
runs, where the scanners and the submitter share the cores: run it on two trees, alternating,
and compare the medians.

    .venv/bin/python -m bench.pg_cycle --jobs 30000 --rounds 5
    .venv/bin/python -m bench.pg_cycle --receiver   # as a replica with a receiving server
    .venv/bin/python -m bench.pg_cycle --single --jobs 3000 --scanners 8 --slots 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from bench import peers, postgres_side
from bench.common import cpu_seconds, image_spec, postgres_cpu
from imagehandler.v1 import common_pb2
from server.core.model import ObjectKind
from server.storage.postgres import PostgresRepository
from server.storage.repository import Claimed, Demand

BATCH = 100
ALL = frozenset(ObjectKind)


@dataclass
class CycleResult:
    jobs: int
    seconds: float
    database_us_per_job: float
    client_us_per_job: float


async def settle_all(
    store: PostgresRepository, claimed: list[Claimed], summary: common_pb2.ResultSummary
) -> None:
    """Each claimed run's result, as a scanner sends it back (both moves in one write)."""
    at = datetime.now(UTC)
    await asyncio.gather(*(
        store.settle(
            item.moved.job.id, run=item.moved.job.runs,
            result=common_pb2.ScanResult(job_id=item.moved.job.id),
            received_at=at, summary=summary, stored_at=at,
        )
        for item in claimed
    ))  # fmt: skip


async def young_plans(store: PostgresRepository, summary: common_pb2.ResultSummary) -> None:
    """Run each statement more than five times on a near-empty table first, as a handler's
    first dispatch passes and results do: psycopg prepares a statement from its fifth run, and
    the generic plan then made is the one the connection keeps until the table's statistics
    change. (Before any loan: the lent insert runs the same statements.)"""
    for n in range(8):
        await store.claim([Demand("s1", ALL, 100)], at=datetime.now(UTC))
        await store.insert_many([image_spec(f"young{n}")], at=datetime.now(UTC))
        claimed = await store.claim([Demand("s1", ALL, 100)], at=datetime.now(UTC))
        await settle_all(store, claimed, summary)


async def cycle(
    jobs: int, *, receiver: bool, single: bool = False, scanners: int = 8, slots: int = 128
) -> CycleResult:
    schema = f"bench_{secrets.token_hex(4)}"
    store = PostgresRepository(peers.database_url(), schema=schema, delivers=receiver)
    await store.open()
    summary = common_pb2.ResultSummary(verdict=common_pb2.VERDICT_PASSED)
    handed: list[Claimed] = []
    batch = 1 if single else BATCH
    try:
        await young_plans(store, summary)
        if single:
            free = [Demand(f"s{n}", ALL, slots) for n in range(scanners)]

            async def lend() -> list[Demand]:
                return free

            store.claim_with_inserts(lend, handed.extend)
        database, client, started = postgres_cpu(), cpu_seconds(os.getpid()), time.perf_counter()
        done = 0
        for start in range(0, jobs, batch):
            specs = [image_spec(f"c{n}") for n in range(start, min(jobs, start + batch))]
            await store.insert_many(specs, at=datetime.now(UTC))
            if single:
                claimed, handed[:] = handed[:], []
            else:
                claimed = await store.claim([Demand("s1", ALL, len(specs))], at=datetime.now(UTC))
            await settle_all(store, claimed, summary)
            done += len(claimed)
        seconds = time.perf_counter() - started
        database = postgres_cpu() - database
        client = cpu_seconds(os.getpid()) - client
    finally:
        await store.close()
        postgres_side.drop(schema)
    return CycleResult(done, seconds, database / done * 1e6, client / done * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--receiver", action="store_true", help="as a replica with a receiving server"
    )
    parser.add_argument("--single", action="store_true", help="one job per insert, lent claims")
    parser.add_argument("--scanners", type=int, default=8, help="with --single: Free scanners")
    parser.add_argument("--slots", type=int, default=128, help="with --single: free slots each")
    args = parser.parse_args()
    results = []
    for _ in range(args.rounds):
        result = asyncio.run(
            cycle(
                args.jobs,
                receiver=args.receiver,
                single=args.single,
                scanners=args.scanners,
                slots=args.slots,
            )
        )
        results.append(result)
        print(f"  {result.jobs} jobs: database {result.database_us_per_job:4.0f} us/job, "
              f"client {result.client_us_per_job:4.0f} us/job, "
              f"{result.jobs / result.seconds:6,.0f} jobs/s", flush=True)  # fmt: skip
    print(f"  median: database {statistics.median(r.database_us_per_job for r in results):.0f}"
          f" us/job, client {statistics.median(r.client_us_per_job for r in results):.0f}"
          " us/job")  # fmt: skip
    print(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
