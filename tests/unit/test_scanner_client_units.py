"""Unit tests of the scanner client's parts that need no handler: backoff, the no-op engine, the
outbox, the wire conversions, and the CLI's flags and environment."""

from __future__ import annotations

import io
import json
import os
import random
import socket
from datetime import UTC, datetime

import grpc
import pytest
import structlog
from google.protobuf import duration_pb2, timestamp_pb2

from imagehandler.rpc import RemoteError
from imagehandler.v1 import common_pb2, scanner_service_pb2
from scanner_client import (
    ENGINES,
    Database,
    EngineSettings,
    Job,
    Kind,
    NoopEngine,
    NullProgress,
    Policy,
    ScanFailure,
    protocol,
)
from scanner_client.backoff import Backoff, ceiling, full_jitter
from scanner_client.cli import DEFAULT_HANDLER, build_client, parse_args
from scanner_client.errors import ScannerRejected
from scanner_client.logs import configure_logging, resolve_format
from scanner_client.outbox import Outbox

# ---- backoff ------------------------------------------------------------------------------


def test_ceiling_doubles_from_initial_up_to_the_maximum() -> None:
    assert [ceiling(n, 0.1, 30.0) for n in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert ceiling(9, 0.1, 30.0) == 30.0  # 0.1 * 512 = 51.2, capped
    assert ceiling(10_000, 0.1, 30.0) == 30.0  # no overflow
    assert ceiling(3, 1.0, 100.0, multiplier=3.0) == 27.0


def test_full_jitter_is_uniform_between_zero_and_the_ceiling() -> None:
    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    assert full_jitter(2, 0.1, 30.0, uniform=uniform) == pytest.approx(0.4)
    [(low, high)] = bounds
    assert low == 0.0
    assert high == pytest.approx(0.4)


def test_backoff_delays_stay_within_bounds_and_are_jittered() -> None:
    backoff = Backoff(initial=0.1, maximum=30.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(20)]
    for attempt, delay in enumerate(delays):
        assert 0.0 <= delay <= ceiling(attempt, 0.1, 30.0)
    # Full jitter: not the ceilings themselves, and not all alike.
    assert len({round(delay, 9) for delay in delays}) == len(delays)
    assert any(delay < ceiling(n, 0.1, 30.0) / 2 for n, delay in enumerate(delays))
    assert max(delays[10:]) > 1.0  # the window has grown


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(initial=0.1, maximum=30.0, rng=random.Random(1))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() <= 0.1


def test_different_scanners_do_not_retry_in_lockstep() -> None:
    first = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(50)]
    assert len({round(delay, 9) for delay in first}) == 50


@pytest.mark.parametrize(
    ("initial", "maximum", "multiplier"), [(0.0, 1.0, 2.0), (1.0, 0.5, 2.0), (0.1, 1.0, 0.5)]
)
def test_backoff_refuses_nonsense(initial: float, maximum: float, multiplier: float) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        Backoff(initial, maximum, multiplier)


# ---- engines ------------------------------------------------------------------------------


class RecordingProgress:
    def __init__(self) -> None:
        self.reports: list[tuple[str, int]] = []

    def report(self, stage: str, percent: int, message: str = "") -> None:
        self.reports.append((stage, percent))


def job(kind: str = "image") -> Job:
    scan_object = common_pb2.ScanObject()
    if kind == "image":
        scan_object.image.repository = "library/alpine"
    else:
        scan_object.node.node_name = "n1"
    return Job(job_id="j1", run=1, object=scan_object)


async def test_noop_engine_returns_an_empty_passing_result() -> None:
    progress = RecordingProgress()
    result = await NoopEngine().scan(job(), progress)
    assert result.verdict == common_pb2.VERDICT_PASSED
    assert not result.vulnerabilities
    assert not result.malware
    assert not result.misconfigurations
    assert not result.secrets
    assert not result.sbom
    assert progress.reports == [("analyse", 0), ("report", 100)]
    assert [d.name for d in result.databases] == ["noop"]


async def test_noop_engine_scans_every_kind_after_its_delay() -> None:
    engine = NoopEngine(delay=0.01)
    assert engine.kinds == frozenset()
    result = await engine.scan(job("node"), NullProgress())
    assert result.verdict == common_pb2.VERDICT_PASSED


def test_noop_engine_reports_todays_noop_database() -> None:
    today = datetime.now(UTC).date().isoformat()
    assert list(NoopEngine().databases()) == [Database("noop", "0", today)]


def test_noop_engine_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="negative"):
        NoopEngine(delay=-1)


def test_engine_registry_builds_the_noop_engine() -> None:
    engine = ENGINES["noop"](EngineSettings(delay=0.5))
    assert isinstance(engine, NoopEngine)
    assert engine.delay == 0.5
    assert engine.name == "noop"


def test_scan_failure_defaults_to_hndl_006_and_checks_its_code() -> None:
    failure = ScanFailure("trivy exited 1")
    assert (failure.code, failure.detail, failure.permanent) == (
        "HNDL-006",
        "trivy exited 1",
        False,
    )
    assert str(failure) == "HNDL-006: trivy exited 1"
    assert ScanFailure("bad", code="HNDL-005", permanent=True).permanent
    with pytest.raises(ValueError, match="HNDL-006"):
        ScanFailure("x", code="E42")


def test_scanner_rejected_reads_job_errors_and_remote_errors() -> None:
    from_message = ScannerRejected.from_job_error(
        common_pb2.JobError(code="HNDL-012", message="HNDL-012: text: detail", detail="detail")
    )
    assert (from_message.code, str(from_message)) == ("HNDL-012", "HNDL-012: text: detail")
    # A JobError without a message still prints the code and the detail.
    assert str(
        ScannerRejected.from_job_error(common_pb2.JobError(code="HNDL-013", detail="d"))
    ) == ("HNDL-013: d")
    remote = RemoteError(
        "HNDL-011", "HNDL-011: proxy URL invalid", grpc.StatusCode.INVALID_ARGUMENT
    )
    assert ScannerRejected.from_remote(remote).message == "HNDL-011: proxy URL invalid"


# ---- wire conversions ---------------------------------------------------------------------


def test_assigned_job_becomes_an_engine_job() -> None:
    deadline = timestamp_pb2.Timestamp(seconds=1_800_000_000)
    assigned = scanner_service_pb2.AssignedJob(
        job_id="j1",
        object=common_pb2.ScanObject(node=common_pb2.NodeObject(node_name="n1")),
        policies=[common_pb2.POLICY_MALWARE, common_pb2.POLICY_UNSPECIFIED],
        run=3,
        deadline=deadline,
        labels={"team": "a"},
    )
    converted = protocol.job_from_assignment(assigned)
    assert converted.job_id == "j1"
    assert converted.run == 3
    assert converted.kind is Kind.NODE
    assert converted.policies == (Policy.MALWARE,)
    assert converted.deadline == datetime.fromtimestamp(1_800_000_000, UTC)
    assert converted.labels == {"team": "a"}
    no_deadline = protocol.job_from_assignment(scanner_service_pb2.AssignedJob(job_id="j2"))
    assert no_deadline.deadline is None
    assert no_deadline.kind is None


def test_register_request_carries_the_profile() -> None:
    request = protocol.register_request(
        scanner_id="s1",
        version="1.2",
        engine="noop",
        kinds={Kind.NODE, Kind.IMAGE},
        slots=4,
        databases=[Database("db", "7", "2026-11-20")],
        proxy_url="http://proxy:3128",
        policies=[Policy.SECRETS],
    ).register
    assert (request.scanner_id, request.version, request.engine, request.slots) == (
        "s1",
        "1.2",
        "noop",
        4,
    )
    assert list(request.kinds) == [common_pb2.OBJECT_KIND_IMAGE, common_pb2.OBJECT_KIND_NODE]
    assert request.databases[0].released_at == "2026-11-20"
    assert request.config.proxy_url == "http://proxy:3128"
    assert list(request.config.policies) == [common_pb2.POLICY_SECRETS]


def test_duration_seconds_fall_back_when_unset() -> None:
    assert protocol.seconds(duration_pb2.Duration(seconds=2, nanos=500_000_000), 9.0) == 2.5
    assert protocol.seconds(duration_pb2.Duration(), 9.0) == 9.0


# ---- outbox -------------------------------------------------------------------------------


def result(job_id: str) -> common_pb2.ScanResult:
    return common_pb2.ScanResult(job_id=job_id, verdict=common_pb2.VERDICT_PASSED)


async def drain_outbox(outbox: Outbox) -> list[scanner_service_pb2.ConnectRequest]:
    sent = []
    while len(outbox):
        sent.append(await outbox.get())
        outbox.written()
    return sent


async def test_outbox_merges_waiting_results_into_one_message() -> None:
    outbox = Outbox()
    outbox.put(protocol.ready(2))
    for n in range(5):
        outbox.result(result(f"j{n}"))
    sent = await drain_outbox(outbox)
    assert [r.WhichOneof("message") for r in sent] == ["ready", "result"]
    assert [r.job_id for r in sent[1].result.results] == [f"j{n}" for n in range(5)]


async def test_outbox_splits_batches_at_the_limit() -> None:
    outbox = Outbox(max_batch=2)
    for n in range(5):
        outbox.result(result(f"j{n}"))
    sent = await drain_outbox(outbox)
    assert [len(r.result.results) for r in sent] == [2, 2, 1]


async def test_outbox_keeps_the_latest_progress_and_drops_it_once_the_job_ends() -> None:
    outbox = Outbox()
    outbox.progress("j1", "pull", 10)
    outbox.progress("j1", "analyse", 150)
    outbox.progress("j2", "pull", 5)
    outbox.result(result("j2"))
    sent = await drain_outbox(outbox)
    assert [r.WhichOneof("message") for r in sent] == ["progress", "result"]
    assert (sent[0].progress.job_id, sent[0].progress.stage, sent[0].progress.percent) == (
        "j1",
        "analyse",
        100,
    )


async def test_outbox_does_not_add_to_a_batch_being_written() -> None:
    outbox = Outbox()
    outbox.result(result("j1"))
    first = await outbox.get()
    outbox.result(result("j2"))
    outbox.written()
    second = await outbox.get()
    outbox.written()
    assert [r.job_id for r in first.result.results] == ["j1"]
    assert [r.job_id for r in second.result.results] == ["j2"]


async def test_outbox_is_idle_once_everything_is_written() -> None:
    outbox = Outbox()
    outbox.failure(protocol.failure("j1", "HNDL-006", "boom"))
    request = await outbox.get()
    assert request.failure.code == "HNDL-006"
    assert not outbox._idle.is_set()
    outbox.written()
    await outbox.wait_idle()


# ---- CLI ----------------------------------------------------------------------------------


def test_cli_defaults() -> None:
    settings = parse_args([], env={})
    assert settings.handler == DEFAULT_HANDLER == "127.0.0.1:50051"
    assert settings.engine == "noop"
    assert settings.slots == 1
    assert settings.scanner_id == f"{socket.gethostname()}-{os.getpid()}"
    assert settings.kinds is None
    assert settings.policies == ()
    assert settings.delay == 0.0
    assert settings.proxy_url == ""
    assert settings.log_format == "auto"
    assert (settings.backoff_initial, settings.backoff_max) == (0.1, 30.0)


def test_cli_flags() -> None:
    settings = parse_args(
        [
            "--handler",
            "handler.svc:6000",
            "--engine",
            "noop",
            "--slots",
            "8",
            "--scanner-id",
            "scanner-a",
            "--kinds",
            "image, node",
            "--policies",
            "vulnerabilities,secrets",
            "--delay",
            "0.25",
            "--proxy-url",
            "http://proxy:3128",
            "--log-format",
            "json",
            "--backoff-initial",
            "0.5",
            "--backoff-max",
            "10",
        ],
        env={},
    )
    assert settings.handler == "handler.svc:6000"
    assert settings.slots == 8
    assert settings.scanner_id == "scanner-a"
    assert settings.kinds == frozenset({Kind.IMAGE, Kind.NODE})
    assert settings.policies == (Policy.VULNERABILITIES, Policy.SECRETS)
    assert settings.delay == 0.25
    assert settings.proxy_url == "http://proxy:3128"
    assert settings.log_format == "json"
    assert (settings.backoff_initial, settings.backoff_max) == (0.5, 10.0)


def test_cli_reads_the_environment_and_flags_win() -> None:
    env = {
        "IMAGE_SCANNER_HANDLER": "10.0.0.1:50051",
        "IMAGE_SCANNER_SLOTS": "4",
        "IMAGE_SCANNER_SCANNER_ID": "pod-7",
        "IMAGE_SCANNER_KINDS": "artifact",
        "IMAGE_SCANNER_DELAY": "1.5",
        "IMAGE_SCANNER_PROXY_URL": "socks5://proxy:1080",
        "IMAGE_SCANNER_LOG_FORMAT": "console",
        "IMAGE_SCANNER_ENGINE": "noop",
        "IMAGE_SCANNER_BACKOFF_MAX": "5",
    }
    settings = parse_args([], env=env)
    assert settings.handler == "10.0.0.1:50051"
    assert settings.slots == 4
    assert settings.scanner_id == "pod-7"
    assert settings.kinds == frozenset({Kind.ARTIFACT})
    assert settings.delay == 1.5
    assert settings.proxy_url == "socks5://proxy:1080"
    assert settings.log_format == "console"
    assert settings.backoff_max == 5.0
    assert parse_args(["--slots", "2"], env=env).slots == 2


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--slots", "0"], {}),
        ([], {"IMAGE_SCANNER_SLOTS": "many"}),
        (["--handler", "no-port"], {}),
        ([], {"IMAGE_SCANNER_HANDLER": "host:99999"}),
        (["--engine", "trivy"], {}),
        (["--kinds", "vm"], {}),
        (["--policies", "everything"], {}),
        (["--delay", "-1"], {}),
        ([], {"IMAGE_SCANNER_LOG_FORMAT": "xml"}),
        (["--backoff-initial", "5", "--backoff-max", "1"], {}),
    ],
)
def test_cli_refuses_bad_values(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, env=env)
    assert exit_info.value.code == 2
    assert "image-scanner: error:" in capsys.readouterr().err


def test_cli_builds_a_client_from_its_settings() -> None:
    settings = parse_args(
        ["--slots", "3", "--delay", "0.2", "--kinds", "image", "--scanner-id", "s"], env={}
    )
    client = build_client(settings)
    assert client.handler == DEFAULT_HANDLER
    assert isinstance(client.engine, NoopEngine)
    assert client.engine.delay == 0.2
    assert client.config.slots == 3
    assert client.kinds == frozenset({Kind.IMAGE})
    assert client.config.scanner_id == "s"


# ---- logging ------------------------------------------------------------------------------


def test_log_format_auto_follows_the_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", Terminal()) == "console"
    assert resolve_format("console", io.StringIO()) == "console"
    with pytest.raises(ValueError, match="xml"):
        resolve_format("xml", io.StringIO())


def test_json_logs_are_one_object_a_line() -> None:
    saved = structlog.get_config()
    stream = io.StringIO()
    try:
        configure_logging("json", "info", stream=stream)
        structlog.get_logger("t").bind(scanner_id="s1").info("registered", job_id="j1", run=2)
        structlog.get_logger("t").debug("hidden")
    finally:
        structlog.configure(**saved)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "registered"
    assert (event["scanner_id"], event["job_id"], event["run"]) == ("s1", "j1", 2)
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")
