"""Unit tests of ihctl: argument parsing, requests, rendering, error lines, exit codes.

No handler is needed: these are the pure parts. tests/integration/test_ihctl.py runs the commands against a
real handler.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from imagehandler.ihctl import args as cli_args
from imagehandler.ihctl import names, render
from imagehandler.rpc import RemoteError
from imagehandler.v1 import (
    common_pb2,
    job_service_pb2,
    scanner_service_pb2,
)
from server.security.tokens import TOKEN_PREFIX, new_token

DIGEST = "sha256:" + "ab" * 32
NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def ts(seconds_before_now: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((NOW.timestamp() - seconds_before_now) * 1e9))
    return stamp


def parse(*argv: str, environ: dict[str, str] | None = None) -> argparse.Namespace:
    return cli_args.build_parser(environ or {}).parse_args(list(argv))


# ---------------------------------------------------------------------------------------------
# Enum words


def test_enum_words_come_from_the_descriptors() -> None:
    assert names.JOB_STATUS.words == [
        "pending",
        "in-progress",
        "processing-results",
        "finished",
        "error",
        "cancelled",
    ]
    assert names.TRIGGER.words == [
        "manual",
        "rescan",
        "scheduled",
        "registry-event",
        "cicd",
        "node-agent",
        "policy-change",
        "rematch",
    ]
    assert names.LANE.words == ["bulk", "interactive"]
    assert names.POLICY.words == ["vulnerabilities", "malware", "misconfigurations", "secrets"]


def test_enum_words_parse_and_show() -> None:
    assert names.JOB_STATUS.parse("IN_PROGRESS") == common_pb2.JOB_STATUS_IN_PROGRESS
    assert names.JOB_STATUS.parse("in-progress") == common_pb2.JOB_STATUS_IN_PROGRESS
    assert names.JOB_STATUS.label(common_pb2.JOB_STATUS_PROCESSING_RESULTS) == (
        "PROCESSING_RESULTS"
    )
    assert names.TRIGGER.word(common_pb2.TRIGGER_REGISTRY_EVENT) == "registry-event"
    assert names.JOB_STATUS.label(0) == "-"
    assert names.JOB_STATUS.label(99) == "99"  # a value from a newer handler
    with pytest.raises(KeyError):
        names.JOB_STATUS.parse("unspecified")


# ---------------------------------------------------------------------------------------------
# Arguments -> requests


def test_submit_image_builds_the_full_request() -> None:
    args = parse(
        "submit",
        "image",
        "--repository",
        "library/alpine",
        "--registry",
        "registry.example:5000",
        "--tag",
        "3.20",
        "--digest",
        DIGEST,
        "--credentials-ref",
        "pull-secret",
        "--proxy-url",
        "http://proxy:3128",
        "--trigger",
        "registry-event",
        "--policy",
        "vulnerabilities",
        "--policy",
        "SECRETS",
        "--max-run-time",
        "5m",
        "--idempotency-key",
        "k-1",
        "--label",
        "team=sec",
        "--label",
        "ticket=A=1",
        "--lane",
        "interactive",
    )
    expected = job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry="registry.example:5000",
                repository="library/alpine",
                tag="3.20",
                digest=DIGEST,
                credentials_ref="pull-secret",
                proxy_url="http://proxy:3128",
            )
        ),
        trigger=common_pb2.TRIGGER_REGISTRY_EVENT,
        policies=[common_pb2.POLICY_VULNERABILITIES, common_pb2.POLICY_SECRETS],
        max_run_time=duration_pb2.Duration(seconds=300),
        idempotency_key="k-1",
        labels={"team": "sec", "ticket": "A=1"},
        lane=common_pb2.LANE_INTERACTIVE,
    )
    assert cli_args.submit_request(args) == expected


def test_submit_minimal_image_leaves_defaults_to_the_handler() -> None:
    request = cli_args.submit_request(parse("submit", "image", "--repository", "library/alpine"))
    assert request == job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(image=common_pb2.ImageObject(repository="library/alpine"))
    )
    assert not request.HasField("max_run_time")


def test_submit_node_and_artifact(tmp_path: Path) -> None:
    node = cli_args.submit_request(
        parse("submit", "node", "--node-name", "n1", "--cluster", "prod", "--root-path", "/host")
    )
    assert node.object.node == common_pb2.NodeObject(
        cluster="prod", node_name="n1", root_path="/host"
    )

    sbom = tmp_path / "bom.json"
    sbom.write_bytes(b'{"bomFormat": "CycloneDX"}')
    artifact = cli_args.submit_request(
        parse(
            "submit",
            "artifact",
            "--pipeline",
            "p",
            "--job",
            "j",
            "--path",
            "dist/app.tar",
            "--sbom-file",
            str(sbom),
            "--trigger",
            "cicd",
            "--max-run-time",
            "1.5",
        )
    )
    assert artifact.object.artifact == common_pb2.ArtifactObject(
        pipeline="p", job="j", path="dist/app.tar", sbom=b'{"bomFormat": "CycloneDX"}'
    )
    assert artifact.trigger == common_pb2.TRIGGER_CICD
    assert artifact.max_run_time == duration_pb2.Duration(seconds=1, nanos=500_000_000)


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "image", "--repository", "r", "--digest", "sha256:short"],
        ["submit", "image", "--repository", "r", "--label", "novalue"],
        ["submit", "image", "--repository", "r", "--policy", "everything"],
        ["submit", "image", "--repository", "r", "--max-run-time", "0"],
        ["submit", "image", "--repository", "r", "--max-run-time", "5 parsecs"],
        ["submit", "image"],
        ["submit", "node"],
        ["submit", "node", "--node-name", "n1"],
        ["submit", "artifact", "--sbom-file", "/nonexistent/bom.json"],
        ["list", "--status", "done"],
        ["list", "--limit", "0"],
        ["get"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert "usage: ihctl" in capsys.readouterr().err


def test_duration_words() -> None:
    assert cli_args.parse_duration("90") == 90
    assert cli_args.parse_duration("1m30s") == 90
    assert cli_args.parse_duration("1h") == 3600
    assert cli_args.parse_duration("500ms") == 0.5


def test_global_options_and_environment() -> None:
    args = parse("list")
    assert (args.handler, args.json, args.timeout) == ("127.0.0.1:50051", False, 10.0)
    assert parse("list", environ={"IHCTL_HANDLER": "h:1"}).handler == "h:1"
    args = parse("--handler", "a:1", "list", "--json", "--timeout", "3")
    assert (args.handler, args.json, args.timeout) == ("a:1", True, 3.0)
    args = parse("--json", "--handler", "a:1", "stats")
    assert (args.handler, args.json) == ("a:1", True)


def test_list_and_watch_filters() -> None:
    request = cli_args.list_request(
        parse("list", "--status", "pending", "--status", "in_progress", "--kind", "node")
    )
    assert list(request.statuses) == [
        common_pb2.JOB_STATUS_PENDING,
        common_pb2.JOB_STATUS_IN_PROGRESS,
    ]
    assert list(request.kinds) == [common_pb2.OBJECT_KIND_NODE]
    assert list(request.triggers) == []
    watch = cli_args.watch_request(parse("watch", "j1", "--status", "error"))
    assert watch == job_service_pb2.WatchJobsRequest(
        job_id="j1", statuses=[common_pb2.JOB_STATUS_ERROR]
    )
    assert cli_args.watch_request(parse("watch")).job_id == ""


# ---------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (3, "3s"),
        (3.9, "3s"),
        (60, "1m"),
        (130, "2m10s"),
        (3600, "1h"),
        (3725, "1h2m"),
        (90000, "1d1h"),
        (-5, "-5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert render.format_duration(seconds) == text


def test_format_timestamp() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=1795780800, nanos=123_456_789)
    assert render.format_timestamp(stamp) == "2026-11-27T12:00:00Z"
    assert render.format_timestamp(stamp, millis=True) == "2026-11-27T12:00:00.123Z"
    assert render.format_timestamp(timestamp_pb2.Timestamp()) == "-"
    assert render.format_age(ts(130), NOW) == "2m10s"


def test_object_refs() -> None:
    image = common_pb2.ImageObject(repository="library/alpine", tag="3.20")
    assert render.image_ref(image) == "docker.io/library/alpine:3.20"
    assert render.image_ref(common_pb2.ImageObject(repository="x")) == "docker.io/x:latest"
    pinned = common_pb2.ImageObject(registry="r:5000", repository="app", digest=DIGEST)
    assert render.image_ref(pinned) == f"r:5000/app@{DIGEST}"
    assert render.image_ref(pinned, shorten=True) == "r:5000/app@sha256:abababababab"
    node = common_pb2.ScanObject(node=common_pb2.NodeObject(node_name="n1"))
    assert render.object_ref(node) == "n1"
    node.node.cluster = "prod"
    assert render.object_ref(node) == "prod/n1"
    artifact = common_pb2.ArtifactObject(pipeline="p", job="j", url="https://x/a.tar")
    assert render.artifact_ref(artifact) == "p/j https://x/a.tar"
    assert render.object_ref(common_pb2.ScanObject()) == "-"


def error_job() -> common_pb2.Job:
    return common_pb2.Job(
        id="job-1",
        kind=common_pb2.OBJECT_KIND_IMAGE,
        object=common_pb2.ScanObject(
            image=common_pb2.ImageObject(repository="library/alpine", tag="3.20")
        ),
        status=common_pb2.JOB_STATUS_ERROR,
        trigger=common_pb2.TRIGGER_MANUAL,
        lane=common_pb2.LANE_BULK,
        policies=[common_pb2.POLICY_VULNERABILITIES, common_pb2.POLICY_MALWARE],
        runs=3,
        scanner_id="s1",
        error=common_pb2.JobError(
            code="HNDL-004",
            message="HNDL-004: scan time out: no result within 5m",
            detail="no result within 5m",
        ),
        created_at=ts(130),
        updated_at=ts(3),
        labels={"team": "sec"},
    )


def test_job_view() -> None:
    view = render.job_view(error_job(), NOW)
    lines = view.splitlines()
    assert lines[0].split() == ["id:", "job-1"]
    pairs = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}
    assert pairs["object"] == "docker.io/library/alpine:3.20"
    assert pairs["status"] == "ERROR"
    assert pairs["error"] == "HNDL-004: scan time out: no result within 5m"
    assert pairs["policies"] == "vulnerabilities, malware"
    assert pairs["runs"] == "3"
    assert pairs["created"].endswith("(2m10s ago)")
    assert pairs["started"] == "-"
    assert pairs["labels"] == "team=sec"
    assert "queue position" not in pairs


def test_job_view_of_a_finished_job_shows_the_result() -> None:
    job = common_pb2.Job(
        id="j",
        status=common_pb2.JOB_STATUS_FINISHED,
        result=common_pb2.ResultSummary(
            verdict=common_pb2.VERDICT_FAILED,
            vulnerabilities_total=3,
            critical=1,
            high=2,
            secrets=1,
            databases=[
                common_pb2.DatabaseVersion(
                    name="vulnerabilities", version="v2", released_at="2026-11-20"
                )
            ],
        ),
    )
    view = render.job_view(job, NOW)
    assert (
        "FAILED: vulnerabilities 3 (1 critical, 2 high), malware 0, misconfigurations 0, "
        "secrets 1" in view
    )
    assert "vulnerabilities v2 (released 2026-11-20)" in view
    assert "default" in view  # no policies: the handler's default


def test_job_error_text_without_message_uses_the_catalogue() -> None:
    error = common_pb2.JobError(code="HNDL-005", detail="no object")
    assert render.job_error_text(error) == "HNDL-005: scan params empty: no object"
    assert render.job_error_text(common_pb2.JobError()) == ""


def test_jobs_table() -> None:
    pending = common_pb2.Job(
        id="job-2",
        object=common_pb2.ScanObject(node=common_pb2.NodeObject(node_name="worker-1")),
        status=common_pb2.JOB_STATUS_PENDING,
        queue_position=4,
        created_at=ts(3),
    )
    text = render.jobs_table([error_job(), pending], NOW)
    lines = text.splitlines()
    assert lines[0].split() == render.JOB_TABLE_HEADERS
    assert lines[1].split() == [
        "job-1",
        "image",
        "docker.io/library/alpine:3.20",
        "ERROR",
        "3",
        "s1",
        "-",
        "2m10s",
    ]
    assert lines[2].split() == ["job-2", "node", "worker-1", "PENDING", "0", "-", "4", "3s"]
    # columns line up
    assert lines[1].index("ERROR") == lines[0].index("STATUS") == lines[2].index("PENDING")
    assert all(line == line.rstrip() for line in lines)


def test_history_table_and_watch_lines() -> None:
    transition = common_pb2.JobTransition(
        from_status=common_pb2.JOB_STATUS_PENDING,
        to_status=common_pb2.JOB_STATUS_IN_PROGRESS,
        at=timestamp_pb2.Timestamp(seconds=1795780800, nanos=5_000_000),
        scanner_id="s1",
        run=1,
        reason="assigned",
    )
    submitted = common_pb2.JobTransition(
        to_status=common_pb2.JOB_STATUS_PENDING, at=ts(10), reason="submitted"
    )
    table = render.history_table([submitted, transition]).splitlines()
    assert table[0].split() == ["TIME", "TRANSITION", "SCANNER", "RUN", "REASON", "ERROR"]
    assert "- -> PENDING" in table[1]
    assert "PENDING -> IN_PROGRESS" in table[2]

    job = common_pb2.Job(
        id="job-1",
        status=common_pb2.JOB_STATUS_IN_PROGRESS,
        object=common_pb2.ScanObject(node=common_pb2.NodeObject(node_name="n1")),
    )
    event = job_service_pb2.WatchJobsResponse(job=job, transition=transition)
    assert render.watch_line(event, with_job=False) == (
        '2026-11-27T12:00:00.005Z  PENDING -> IN_PROGRESS  scanner=s1 run=1 reason="assigned"'
    )
    assert render.watch_line(event, with_job=True).startswith(
        "2026-11-27T12:00:00.005Z  job-1  PENDING -> IN_PROGRESS  object=n1 scanner=s1"
    )
    job.status = common_pb2.JOB_STATUS_PENDING
    job.queue_position = 2
    job.updated_at.CopyFrom(transition.at)
    first = job_service_pb2.WatchJobsResponse(job=job)
    assert render.watch_line(first, with_job=False) == (
        "2026-11-27T12:00:00.005Z  PENDING  id=job-1 object=n1 position=2 runs=0"
    )


def test_scanners_table_and_stats() -> None:
    scanner = scanner_service_pb2.ScannerInfo(
        scanner_id="s1",
        version="1.2.0",
        engine="noop",
        kinds=[common_pb2.OBJECT_KIND_IMAGE, common_pb2.OBJECT_KIND_NODE],
        slots=4,
        status=common_pb2.SCANNER_STATUS_FREE,
        connected=True,
        job_ids=["a", "b"],
        processing_job_ids=["c"],
        last_seen_at=ts(2),
    )
    lines = render.scanners_table([scanner], NOW).splitlines()
    assert lines[0].split("  ")[0] == "ID"
    assert "LAST SEEN" in lines[0]
    assert lines[1].split() == [
        "s1",
        "FREE",
        "4",
        "2",
        "1",
        "1.2.0",
        "noop",
        "image,node",
        "2s",
        "ago",
    ]

    stats = job_service_pb2.GetQueueStatsResponse(
        pending=5,
        in_progress=2,
        finished=10,
        lanes=[
            job_service_pb2.LaneStats(
                lane=common_pb2.LANE_BULK,
                pending=4,
                oldest_pending_age=duration_pb2.Duration(seconds=130),
            ),
            job_service_pb2.LaneStats(lane=common_pb2.LANE_INTERACTIVE, pending=1),
        ],
        scanners_connected=3,
        scanners_free=2,
        scanners_busy=1,
        free_slots=5,
    )
    view = render.stats_view(stats, NOW)
    assert "bulk:" in view
    assert "4 (oldest 2m10s)" in view
    assert "3 connected, 2 free, 1 busy" in view
    assert "queue limit:" in view
    assert "none" in view


def test_json_keeps_proto_names_and_every_field() -> None:
    response = job_service_pb2.SubmitJobResponse(job=error_job(), duplicate=False)
    data = json.loads(render.to_json(response))
    assert data["duplicate"] is False
    assert data["job"]["status"] == "JOB_STATUS_ERROR"
    assert data["job"]["queue_position"] == 0  # int64 as a number, present though zero
    assert data["job"]["scanner_id"] == "s1"
    assert "\n" not in render.to_json(response, compact=True)


# ---------------------------------------------------------------------------------------------
# Error lines


def test_remote_error_text() -> None:
    hndl = RemoteError(
        "HNDL-008", "HNDL-008: job id empty: unknown job x", grpc.StatusCode.NOT_FOUND
    )
    assert render.remote_error_text(hndl, "h:1") == "HNDL-008: job id empty: unknown job x"
    down = RemoteError(
        "", "UNAVAILABLE: failed to connect to all addresses", grpc.StatusCode.UNAVAILABLE
    )
    assert render.remote_error_text(down, "127.0.0.1:50051") == (
        "ihctl: cannot reach the handler at 127.0.0.1:50051 (UNAVAILABLE): "
        "failed to connect to all addresses"
    )
    slow = RemoteError(
        "", "DEADLINE_EXCEEDED: Deadline Exceeded", grpc.StatusCode.DEADLINE_EXCEEDED
    )
    assert "(DEADLINE_EXCEEDED)" in render.remote_error_text(slow, "h:1")
    other = RemoteError("", "UNIMPLEMENTED: ", grpc.StatusCode.UNIMPLEMENTED)
    assert render.remote_error_text(other, "h:1") == (
        "ihctl: the call to the handler at h:1 failed (UNIMPLEMENTED)"
    )


def test_every_generated_token_passes_as_an_option_value() -> None:
    # base64url can start with "-"; without the ihk_ prefix one token in 64 made
    # `ihctl --token TOKEN ...` fail with "expected one argument".
    parser = cli_args.build_parser({})
    for _ in range(500):
        token = new_token()
        assert token.startswith(TOKEN_PREFIX)
        parsed = parser.parse_args(["--token", token, "stats"])
        assert parsed.token == token


def test_findings_show_what_the_scan_could_not_judge() -> None:
    result = common_pb2.ScanResult(
        vulnerabilities=[
            common_pb2.Vulnerability(
                id="CVE-2018-18074", package="requests", installed_version="2.19.0",
                fixed_version="2.20.0", aliases=["PYSEC-2018-28"],
            )
        ],
        notes=[common_pb2.ScanNote(id="IH-VULNDB-001", subject="Debian:12", packages=3,
                                   text="No vulnerability data for Debian:12 in this database")],
    )  # fmt: skip
    text = render.findings(result)
    assert "CVE-2018-18074" in text
    assert text.endswith(
        "note IH-VULNDB-001 Debian:12: No vulnerability data for Debian:12 in this database"
    )
