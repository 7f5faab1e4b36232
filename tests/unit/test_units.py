"""The pure parts, without gRPC: state machine, retry decision, queue order, validation."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime

import pytest

from imagehandler.errors import Catalogue, HandlerError, Reason
from server import validation
from server.core import state_machine
from server.core.ids import new_job_id
from server.core.model import ImageRef, Job, JobSpec, JobStatus, Lane, NodeRef, Policy, Trigger
from server.core.retry import RetryPolicy, RunFailure
from server.scheduling.queue import ALL_KINDS, JobQueue

NOW = datetime(2026, 11, 27, tzinfo=UTC)


def make_job(seq: int, lane: Lane = Lane.BULK, node: bool = False) -> Job:
    target = NodeRef("c", f"n{seq}") if node else ImageRef("docker.io", "library/alpine", f"v{seq}")
    spec = JobSpec(target, Trigger.MANUAL, (Policy.MALWARE,), 60.0, lane)
    return Job(id=f"job-{seq}", seq=seq, spec=spec, created_at=NOW)


class TestStateMachine:
    def test_legal_path_counts_runs_and_records_history(self) -> None:
        job = make_job(1)
        state_machine.record_creation(job, NOW)
        state_machine.move(job, JobStatus.IN_PROGRESS, at=NOW, reason="assigned", scanner_id="s1")
        state_machine.move(job, JobStatus.PENDING, at=NOW, reason="failed")
        state_machine.move(job, JobStatus.IN_PROGRESS, at=NOW, reason="assigned", scanner_id="s2")
        state_machine.move(job, JobStatus.PROCESSING_RESULTS, at=NOW, reason="result")
        state_machine.move(job, JobStatus.FINISHED, at=NOW, reason="stored")
        assert job.runs == 2
        assert job.finished_at == NOW
        assert [t.to_status for t in job.history] == [
            JobStatus.PENDING,
            JobStatus.IN_PROGRESS,
            JobStatus.PENDING,
            JobStatus.IN_PROGRESS,
            JobStatus.PROCESSING_RESULTS,
            JobStatus.FINISHED,
        ]
        assert job.history[3].scanner_id == "s2"

    @pytest.mark.parametrize(
        ("start", "to"),
        [
            (JobStatus.PENDING, JobStatus.FINISHED),
            (JobStatus.PENDING, JobStatus.ERROR),
            (JobStatus.FINISHED, JobStatus.PENDING),
            (JobStatus.ERROR, JobStatus.IN_PROGRESS),
            (JobStatus.CANCELLED, JobStatus.PENDING),
            (JobStatus.PROCESSING_RESULTS, JobStatus.CANCELLED),
        ],
    )
    def test_illegal_moves_are_refused_and_change_nothing(
        self, start: JobStatus, to: JobStatus
    ) -> None:
        job = make_job(1)
        job.status = start
        with pytest.raises(state_machine.IllegalTransition) as raised:
            state_machine.move(job, to, at=NOW, reason="x")
        assert raised.value.code == "HNDL-007"
        assert job.status is start
        assert job.history == []


class TestRetryPolicy:
    def test_retries_until_the_third_run(self) -> None:
        policy = RetryPolicy(max_runs=3)
        failure = RunFailure(Catalogue.SUBPROCESS_FAILED, "exit 1")
        assert [policy.decide(runs, failure).retry for runs in (1, 2, 3)] == [True, True, False]

    def test_bad_parameters_are_not_retried(self) -> None:
        decision = RetryPolicy().decide(1, RunFailure(Catalogue.SCAN_PARAMS_EMPTY, "no such tag"))
        assert not decision.retry
        assert "HNDL-005" in decision.reason

    def test_permanent_failures_are_not_retried(self) -> None:
        assert not RetryPolicy().decide(1, RunFailure(Catalogue.SUBPROCESS_FAILED, "x", True)).retry


class TestQueue:
    def test_fifo_and_a_returned_job_goes_back_to_its_place(self) -> None:
        queue = JobQueue()
        jobs = [make_job(n) for n in range(1, 5)]
        for job in jobs:
            queue.push(job)
        first = queue.pop_for(ALL_KINDS)
        assert first is jobs[0]
        queue.push(make_job(9))
        queue.push(first)  # its run failed
        assert [queue.pop_for(ALL_KINDS) for _ in range(3)] == [jobs[0], jobs[1], jobs[2]]
        assert queue.position(jobs[3]) == 1

    def test_kinds_filter(self) -> None:
        queue = JobQueue()
        image, node = make_job(1), make_job(2, node=True)
        queue.push(image)
        queue.push(node)
        assert queue.pop_for(frozenset({node.kind})) is node
        assert queue.pop_for(frozenset({node.kind})) is None
        assert len(queue) == 1

    def test_interactive_share_is_bounded(self) -> None:
        queue = JobQueue(interactive_share=0.5)
        for n in range(1, 11):
            queue.push(make_job(n, Lane.BULK))
            queue.push(make_job(100 + n, Lane.INTERACTIVE))
        lanes = [queue.pop_for(ALL_KINDS).spec.lane for _ in range(8)]  # type: ignore[union-attr]
        assert lanes[0] is Lane.INTERACTIVE
        assert lanes.count(Lane.INTERACTIVE) == 4

    def test_position_counts_only_the_lane(self) -> None:
        queue = JobQueue()
        bulk = [make_job(n) for n in (1, 3)]
        interactive = make_job(2, Lane.INTERACTIVE)
        for job in (*bulk, interactive):
            queue.push(job)
        assert [queue.position(j) for j in (*bulk, interactive)] == [1, 2, 1]


class TestValidation:
    @pytest.mark.parametrize(
        "url", ["http://proxy:3128", "https://user:pw@proxy.corp", "socks5://10.0.0.1:1080"]
    )
    def test_good_proxy_urls(self, url: str) -> None:
        validation.check_proxy_url("proxy_url", url)

    @pytest.mark.parametrize(
        "url", ["proxy:3128", "http://", "ftp://proxy", "http://proxy:notaport", "http://[::1"]
    )
    def test_bad_proxy_urls_are_hndl_011(self, url: str) -> None:
        with pytest.raises(HandlerError) as raised:
            validation.check_proxy_url("proxy_url", url)
        assert raised.value.code == "HNDL-011"

    @pytest.mark.parametrize(
        "value", ["2026-11-20", "2026-11-20T06:00:00Z", "2026-11-20T06:00:00+03:00"]
    )
    def test_release_dates(self, value: str) -> None:
        validation.parse_release_date("db", value)

    @pytest.mark.parametrize(
        ("value", "code"),
        [
            ("", "HNDL-012"),
            ("yesterday", "HNDL-013"),
            ("2026-13-01", "HNDL-013"),
            ("2026-11-20T06:00:00", "HNDL-013"),
        ],
    )
    def test_bad_release_dates(self, value: str, code: str) -> None:
        with pytest.raises(HandlerError) as raised:
            validation.parse_release_date("db", value)
        assert raised.value.code == code


def test_catalogue_codes_are_unique_and_formatted() -> None:
    codes = [member.code for member in Catalogue]
    assert len(codes) == len(set(codes))
    assert all(code.startswith("HNDL-0") and len(code) == 8 for code in codes)
    error = HandlerError(Catalogue.SCAN_TIME_OUT, "run 3 exceeded 60s")
    assert error.message == "HNDL-004: scan time out: run 3 exceeded 60s"
    with pytest.raises(ValueError, match="cannot be given for reason NOT_FOUND"):
        HandlerError(Catalogue.SCAN_TIME_OUT, reason=Reason.NOT_FOUND)


def test_job_ids_are_random_version_4_uuids() -> None:
    made = [new_job_id() for _ in range(3000)]  # several refills of the pool
    assert len(set(made)) == len(made)
    for text in made[:600]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_json_log_lines_take_what_orjson_refuses() -> None:
    """A path of non-UTF-8 bytes (a lone surrogate in Python) or a huge int in a log field
    must not make logging raise: the line falls back to the standard encoder."""
    from server.observability.logs import render_json_line

    assert json.loads(render_json_line({"event": "x", "n": 1, "at": "é"})) == {
        "event": "x",
        "n": 1,
        "at": "é",
    }
    odd = os.fsdecode(b"/data/\xff")
    line = render_json_line({"event": "handler.started", "data_dir": odd, "big": 1 << 70})
    parsed = json.loads(line)
    assert parsed["big"] == 1 << 70
    assert parsed["data_dir"] == odd
