"""The job repository's contract: the same tests against every backend (as River's driver
suite and dramatiq's per-broker fixtures do). A backend that passes them can stand behind the
handler; durability is checked only where a backend promises it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagehandler.errors import HandlerError, Reason
from imagehandler.v1 import common_pb2, job_service_pb2
from server.core.model import (
    ArtifactRef,
    ImageRef,
    JobFailure,
    JobSpec,
    JobStatus,
    Lane,
    NodeRef,
    ObjectKind,
    Policy,
    Trigger,
)
from server.storage.embedded import EmbeddedRepository
from server.storage.embedded.journal import FsyncPolicy
from server.storage.memory import MemoryRepository
from server.storage.postgres import PostgresRepository
from server.storage.repository import Demand, JobFilter, JobRepository
from tests.postgres import DATABASE_URL, drop_schema, new_schema_name

S = JobStatus
ALL = frozenset(ObjectKind)


@dataclass
class Backend:
    name: str
    durable: bool
    make: Callable[[], Awaitable[JobRepository]]


@pytest.fixture(params=["memory", "embedded", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    opened: list[JobRepository] = []
    schema = new_schema_name()  # each test its own (PostgreSQL), dropped after

    async def make() -> JobRepository:
        repository: JobRepository
        if request.param == "memory":
            repository = MemoryRepository(interactive_share=0.5)
        elif request.param == "postgres":
            repository = PostgresRepository(DATABASE_URL, schema=schema, interactive_share=0.5)
        else:
            repository = EmbeddedRepository(
                tmp_path / "data", policy=FsyncPolicy.NEVER, interactive_share=0.5
            )
        await repository.open()
        opened.append(repository)
        return repository

    yield Backend(request.param, request.param in ("embedded", "postgres"), make)
    for repository in opened:
        await repository.close()
    if request.param == "postgres":
        drop_schema(schema)


@pytest.fixture
async def repo(backend: Backend) -> JobRepository:
    return await backend.make()


def now() -> datetime:
    return datetime.now(UTC)


def spec(tag: str, *, lane: Lane = Lane.BULK, key: str = "", node: bool = False) -> JobSpec:
    target = NodeRef("c1", tag, "/host") if node else ImageRef("docker.io", "library/app", tag)
    return JobSpec(target, Trigger.MANUAL, (Policy.VULNERABILITIES,), 600.0, lane, key)


async def insert(repo: JobRepository, *specs: JobSpec) -> list[str]:
    return [item.job.id for item in await repo.insert_many(list(specs), at=now())]


def demand(scanner: str, slots: int = 1, kinds: frozenset[ObjectKind] = ALL) -> Demand:
    return Demand(scanner, kinds, slots)


# ----- inserting ---------------------------------------------------------------------------


async def test_new_jobs_are_pending_in_arrival_order_with_their_creation(
    repo: JobRepository,
) -> None:
    inserted = await repo.insert_many([spec("a"), spec("b")], at=now())
    assert [i.duplicate for i in inserted] == [False, False]
    first, second = (i.job for i in inserted)
    assert first.seq < second.seq
    assert first.status is S.PENDING
    assert [(t.from_status, t.to_status) for t in first.history] == [(None, S.PENDING)]
    assert inserted[0].message is None or inserted[0].message.id == first.id
    assert await repo.positions([first, second]) == [1, 2]
    fetched = await repo.get(first.id)
    assert fetched is not None
    assert fetched.spec == first.spec


async def test_duplicates_return_the_existing_job(repo: JobRepository) -> None:
    (first,) = await repo.insert_many([spec("a", key="k1")], at=now())
    again = await repo.insert_many(
        [spec("other", key="k1"), spec("a"), spec("z"), spec("z")], at=now()
    )
    assert [(i.duplicate, i.job.id) for i in again[:2]] == [(True, first.job.id)] * 2
    assert not again[2].duplicate
    assert again[3].duplicate
    assert again[3].job.id == again[2].job.id  # a batch repeating an object


async def test_the_same_object_is_new_again_once_its_job_ended(repo: JobRepository) -> None:
    (job_id,) = await insert(repo, spec("a"))
    (claimed,) = await repo.claim([demand("s1")], at=now())
    assert claimed.moved.job.id == job_id
    await repo.move(job_id, S.ERROR, expect=frozenset({S.IN_PROGRESS}), at=now(), reason="x")
    (again,) = await repo.insert_many([spec("a")], at=now())
    assert not again.duplicate
    assert again.job.id != job_id


async def test_past_the_queue_limit_nothing_is_queued(repo: JobRepository) -> None:
    await insert(repo, spec("a"), spec("b"))
    with pytest.raises(HandlerError) as refused:
        await repo.insert_many([spec("c"), spec("d")], at=now(), queue_limit=3)
    assert refused.value.reason is Reason.EXHAUSTED
    assert "queue full (limit 3)" in refused.value.detail
    assert (await repo.counts()).pending == 2
    # Duplicates do not count against the limit.
    assert (await repo.insert_many([spec("a")], at=now(), queue_limit=2))[0].duplicate


# ----- claiming ----------------------------------------------------------------------------


async def test_claims_are_fifo_one_per_scanner_per_pass_within_their_slots(
    repo: JobRepository,
) -> None:
    ids = await insert(repo, *(spec(f"j{n}") for n in range(5)))
    claimed = await repo.claim([demand("s1", 2), demand("s2", 2)], at=now())
    assert [(c.demand, c.moved.job.id) for c in claimed] == [
        (0, ids[0]), (1, ids[1]), (0, ids[2]), (1, ids[3]),
    ]  # fmt: skip
    for c in claimed:
        job = c.moved.job
        assert job.status is S.IN_PROGRESS
        assert job.runs == 1
        assert job.scanner_id == ("s1", "s2")[c.demand]
        assert c.moved.transition.to_status is S.IN_PROGRESS
    assert await repo.claim([demand("s3", 0)], at=now()) == []
    (last,) = await repo.claim([demand("s3", 5)], at=now())
    assert last.moved.job.id == ids[4]
    assert await repo.claim([demand("s3", 5)], at=now()) == []


async def test_a_claim_takes_only_kinds_the_scanner_scans(repo: JobRepository) -> None:
    image_id, node_id = await insert(repo, spec("img"), spec("n1", node=True))
    claimed = await repo.claim([demand("nodes", 5, frozenset({ObjectKind.NODE}))], at=now())
    assert [c.moved.job.id for c in claimed] == [node_id]
    claimed = await repo.claim([demand("images", 5, frozenset({ObjectKind.IMAGE}))], at=now())
    assert [c.moved.job.id for c in claimed] == [image_id]


async def test_the_interactive_lane_gets_its_bounded_share(repo: JobRepository) -> None:
    bulk = await insert(repo, *(spec(f"b{n}") for n in range(6)))
    interactive = await insert(repo, *(spec(f"i{n}", lane=Lane.INTERACTIVE) for n in range(6)))
    claimed = await repo.claim([demand("s1", 6)], at=now())
    taken = [c.moved.job.id for c in claimed]
    # A share of 0.5: half each while both lanes wait, each lane in its own order.
    assert [j for j in taken if j in interactive] == interactive[:3]
    assert [j for j in taken if j in bulk] == bulk[:3]


# ----- moving ------------------------------------------------------------------------------


async def test_a_move_from_the_wrong_status_or_run_changes_nothing(repo: JobRepository) -> None:
    (job_id,) = await insert(repo, spec("a"))
    assert await repo.move(job_id, S.ERROR, expect=frozenset({S.IN_PROGRESS}), at=now(),
                           reason="no") is None  # fmt: skip
    await repo.claim([demand("s1")], at=now())
    assert await repo.move(job_id, S.PENDING, expect=frozenset({S.IN_PROGRESS}), run=2,
                           at=now(), reason="stale run") is None  # fmt: skip
    job = await repo.get(job_id)
    assert job is not None
    assert (job.status, job.runs) == (S.IN_PROGRESS, 1)
    assert (
        await repo.move("no-such-job", S.ERROR, expect=frozenset(S), at=now(), reason="x") is None
    )


async def test_a_retried_job_goes_back_to_its_place_ahead_of_later_arrivals(
    repo: JobRepository,
) -> None:
    (first,) = await insert(repo, spec("a"))
    await repo.claim([demand("s1")], at=now())
    later = await insert(repo, spec("b"), spec("c"))
    failure = JobFailure("HNDL-004", "HNDL-004: scan time out", "too slow")
    moved = await repo.move(first, S.PENDING, expect=frozenset({S.IN_PROGRESS}), run=1,
                            at=now(), reason="retry", error=failure)  # fmt: skip
    assert moved is not None
    assert moved.job.error == failure
    assert moved.transition.error == failure
    assert await repo.positions([moved.job]) == [1]
    claimed = await repo.claim([demand("s1", 3)], at=now())
    assert [c.moved.job.id for c in claimed] == [first, *later]
    assert claimed[0].moved.job.runs == 2


async def test_a_cancelled_pending_job_leaves_the_queue(repo: JobRepository) -> None:
    a, b = await insert(repo, spec("a"), spec("b"))
    moved = await repo.move(a, S.CANCELLED, expect=frozenset({S.PENDING}), at=now(),
                            reason="client")  # fmt: skip
    assert moved is not None
    assert moved.job.finished_at is not None
    (claimed,) = await repo.claim([demand("s1", 5)], at=now())
    assert claimed.moved.job.id == b
    assert (await repo.counts()).by_status.get(S.CANCELLED) == 1


async def test_a_result_and_its_summary_are_kept_with_their_moves(repo: JobRepository) -> None:
    (job_id,) = await insert(repo, spec("a"))
    await repo.claim([demand("s1")], at=now())
    result = common_pb2.ScanResult(job_id=job_id, verdict=common_pb2.VERDICT_PASSED)
    moved = await repo.move(job_id, S.PROCESSING_RESULTS, expect=frozenset({S.IN_PROGRESS}),
                            at=now(), reason="result", result=result)  # fmt: skip
    assert moved is not None
    assert moved.job.result == result
    summary = common_pb2.ResultSummary(verdict=common_pb2.VERDICT_PASSED)
    done = await repo.move(job_id, S.FINISHED, expect=frozenset({S.PROCESSING_RESULTS}),
                           at=now(), reason="stored", summary=summary)  # fmt: skip
    assert done is not None
    assert done.job.result_summary == summary
    assert done.job.status is S.FINISHED


async def test_a_result_settled_on_arrival_takes_both_moves_in_one_write(
    backend: Backend,
) -> None:
    repo = await backend.make()
    (job_id,) = await insert(repo, spec("a"))
    (claimed,) = await repo.claim([demand("s1")], at=now())
    run = claimed.moved.job.runs
    result = common_pb2.ScanResult(job_id=job_id, verdict=common_pb2.VERDICT_PASSED)
    summary = common_pb2.ResultSummary(verdict=common_pb2.VERDICT_PASSED)
    received_at = now()
    assert await repo.settle(job_id, run=run + 1, result=result, received_at=received_at,
                             summary=summary, stored_at=now()) == []  # fmt: skip
    moves = await repo.settle(job_id, run=run, result=result, received_at=received_at,
                              summary=summary, stored_at=now())  # fmt: skip
    assert [(m.transition.from_status, m.transition.to_status) for m in moves] == [
        (S.IN_PROGRESS, S.PROCESSING_RESULTS),
        (S.PROCESSING_RESULTS, S.FINISHED),
    ]
    # The first move's job is the job as that move left it (its event shows it so).
    assert moves[0].job.status is S.PROCESSING_RESULTS
    assert moves[0].job.finished_at is None
    assert moves[0].transition.at == received_at
    assert moves[1].job.status is S.FINISHED
    # Nothing is left to settle twice.
    assert await repo.settle(job_id, run=run, result=result, received_at=now(),
                             summary=summary, stored_at=now()) == []  # fmt: skip
    await repo.commit()
    if backend.durable:
        await repo.close()
        repo = await backend.make()
    job = await repo.get(job_id)
    assert job is not None
    assert job.status is S.FINISHED
    assert [t.to_status for t in job.history][-2:] == [S.PROCESSING_RESULTS, S.FINISHED]
    assert (job.result, job.result_summary) == (result, summary)
    assert (await repo.counts()).by_status.get(S.FINISHED) == 1
    assert await repo.latest_finished(job.key) is not None


# ----- reading -----------------------------------------------------------------------------


async def finish(repo: JobRepository, job_id: str, scanner: str = "s1") -> None:
    (claimed,) = await repo.claim([demand(scanner)], at=now())
    assert claimed.moved.job.id == job_id
    result = common_pb2.ScanResult(job_id=job_id, sbom=b'{"bomFormat":"CycloneDX"}')
    await repo.move(job_id, S.PROCESSING_RESULTS, expect=frozenset({S.IN_PROGRESS}), at=now(),
                    reason="result", result=result)  # fmt: skip
    await repo.move(job_id, S.FINISHED, expect=frozenset({S.PROCESSING_RESULTS}), at=now(),
                    reason="stored", summary=common_pb2.ResultSummary())  # fmt: skip


async def test_the_latest_finished_job_of_an_object_and_its_result(backend: Backend) -> None:
    repo = await backend.make()
    digest = ImageRef("r.example", "team/app", "", "sha256:" + "b" * 64)
    same = JobSpec(digest, Trigger.MANUAL, (Policy.VULNERABILITIES,), 60.0, Lane.BULK)
    other_policies = JobSpec(digest, Trigger.MANUAL, tuple(Policy), 60.0, Lane.BULK)
    assert await repo.latest_finished(same.dedup_key()) is None
    (first,) = await insert(repo, same)
    await finish(repo, first)
    (second,) = await insert(repo, same)
    # A scan under way does not hide the last good one.
    latest = await repo.latest_finished(same.dedup_key())
    assert latest is not None
    assert latest.id == first
    await finish(repo, second)
    (failed,) = await insert(repo, same)
    await repo.move(failed, S.CANCELLED, expect=frozenset({S.PENDING}), at=now(), reason="x")
    await insert(repo, other_policies)
    latest = await repo.latest_finished(same.dedup_key())
    assert latest is not None
    assert latest.id == second
    assert latest.result is not None
    assert latest.result.sbom == b'{"bomFormat":"CycloneDX"}'
    if backend.durable:
        await repo.commit()
        await repo.close()
        repo = await backend.make()
        again = await repo.latest_finished(same.dedup_key())
        assert again is not None
        assert again.id == second
    assert await repo.latest_finished(other_policies.dedup_key()) is None
    # Kept as long as results are: retention forgets it with its job.
    await repo.prune(now() + timedelta(days=1))
    assert await repo.latest_finished(same.dedup_key()) is None


async def test_pages_counts_and_selections(repo: JobRepository) -> None:
    ids = await insert(repo, *(spec(f"j{n}") for n in range(5)), spec("n", node=True))
    await repo.claim([demand("s1")], at=now())
    page, cursor = await repo.page(JobFilter(), 0, 4)
    assert [j.id for j in page] == ids[:4]
    assert cursor is not None
    rest, end = await repo.page(JobFilter(), cursor, 4)
    assert [j.id for j in rest] == ids[4:]
    assert end is None
    pending, _ = await repo.page(JobFilter(statuses=frozenset({S.PENDING})), 0, 100)
    assert [j.id for j in pending] == ids[1:]
    nodes, _ = await repo.page(JobFilter(kinds=frozenset({ObjectKind.NODE})), 0, 100)
    assert [j.id for j in nodes] == ids[5:]
    counts = await repo.counts()
    assert counts.by_status.get(S.PENDING) == 5
    assert counts.by_status.get(S.IN_PROGRESS) == 1
    assert counts.pending_by_lane[Lane.BULK] == 5
    assert counts.oldest_pending[Lane.INTERACTIVE] is None
    assert [j.id for j in await repo.select(frozenset({S.IN_PROGRESS}))] == ids[:1]


async def test_results_kept_apart_read_back(repo: JobRepository) -> None:
    (job_id,) = await insert(repo, spec("a"))
    repo.write_result(job_id, b"payload")
    assert repo.read_result(job_id) == b"payload"
    assert repo.read_result("other") is None


async def test_old_ended_jobs_are_pruned(repo: JobRepository) -> None:
    a, b = await insert(repo, spec("a"), spec("b"))
    await repo.move(a, S.CANCELLED, expect=frozenset({S.PENDING}), at=now(), reason="x")
    assert await repo.prune(now() - timedelta(days=1)) == []
    assert await repo.prune(now() + timedelta(days=1)) == [a]
    assert await repo.get(a) is None
    assert await repo.get(b) is not None


async def test_retention_prunes_by_finish_time_also_after_a_reopen(backend: Backend) -> None:
    """Jobs ended three days and one day ago, and one still queued: a cutoff between the two
    prunes only the older; after a restart (where the store keeps jobs) the other is pruned
    when its time comes."""
    repo = await backend.make()
    old, recent, waiting = await insert(repo, spec("old"), spec("recent"), spec("waiting"))
    await repo.move(recent, S.CANCELLED, expect=frozenset({S.PENDING}),
                    at=now() - timedelta(days=1), reason="x")  # fmt: skip
    await repo.move(old, S.CANCELLED, expect=frozenset({S.PENDING}),
                    at=now() - timedelta(days=3), reason="x")  # fmt: skip
    assert await repo.prune(now() - timedelta(days=2)) == [old]
    if backend.durable:
        await repo.commit()
        await repo.close()
        repo = await backend.make()
    assert await repo.prune(now() - timedelta(days=2)) == []
    assert await repo.prune(now()) == [recent]
    assert await repo.get(waiting) is not None


# ----- durability --------------------------------------------------------------------------


async def test_what_was_committed_survives_a_reopen(backend: Backend) -> None:
    if not backend.durable:
        pytest.skip(f"the {backend.name} store keeps nothing across a restart, by design")
    repo = await backend.make()
    running, waiting = await insert(repo, spec("a"), spec("b", key="k"))
    await repo.claim([demand("s1")], at=now())
    job = await repo.get(running)
    assert job is not None
    job.delivered = 2
    await repo.acknowledge(job)
    record = job_service_pb2.RiskAcceptance(id="acc-1", finding_id="CVE-1", reason="fine")
    await repo.add_acceptance(record)
    await repo.commit()
    await repo.close()
    again = await backend.make()
    restored = await again.get(running)
    assert restored is not None
    assert (restored.status, restored.runs, restored.delivered) == (S.IN_PROGRESS, 1, 2)
    # The run a restart cut short is handed back for the service to end.
    recovered_waiting = await again.get(waiting)
    assert recovered_waiting is not None
    assert recovered_waiting.status is S.PENDING
    assert (await again.insert_many([spec("x", key="k")], at=now()))[0].job.id == waiting
    assert [a.id for a in await again.acceptances()] == ["acc-1"]
    (claimed,) = await again.claim([demand("s2", 5)], at=now())
    assert claimed.moved.job.id == waiting


async def test_every_kind_of_object_round_trips(backend: Backend) -> None:
    repo = await backend.make()
    sbom = b'{"bomFormat":"CycloneDX"}'
    artifact = ArtifactRef(pipeline="p", job="j", sbom=sbom, sbom_format="cyclonedx-json",
                           sbom_sha256=hashlib.sha256(sbom).hexdigest())  # fmt: skip
    image = ImageRef("r.example:5000", "team/app", "1.0", "sha256:" + "a" * 64, "ref", "")
    specs = [
        JobSpec(artifact, Trigger.CICD, (Policy.VULNERABILITIES,), 60.0, Lane.BULK),
        JobSpec(image, Trigger.REGISTRY_EVENT, tuple(Policy), 90.0, Lane.INTERACTIVE, "key",
                {"team": "a"}),
        spec("n1", node=True),
    ]  # fmt: skip
    ids = await insert(repo, *specs)
    if backend.durable:
        await repo.close()
        repo = await backend.make()
    for job_id, expected in zip(ids, specs, strict=True):
        found = await repo.get(job_id)
        assert found is not None
        assert found.spec == expected
