"""ihctl against a real handler (on a background loop, see conftest): what an operator types."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest

from imagehandler.ihctl import main
from scanner_client import ClientConfig, NoopEngine, ScannerClient
from tests.conftest import BackgroundHandler

Capture = pytest.CaptureFixture[str]


def ihctl(handler: BackgroundHandler, *argv: str) -> int:
    return main(["--handler", handler.server.address, *argv])


def unique_tag() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def submit(handler: BackgroundHandler, capsys: Capture, *extra: str) -> str:
    argv = ["submit", "image", "--repository", "library/alpine", "--tag", unique_tag(), "-q"]
    assert ihctl(handler, *argv, *extra) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture
def noop_scanner(background_handler: BackgroundHandler) -> Iterator[ScannerClient]:
    """A real noop scanner, connected to the background handler."""
    client = ScannerClient(
        background_handler.server.address,
        NoopEngine(delay=0.05),
        ClientConfig(scanner_id=f"noop-{uuid.uuid4().hex[:6]}", slots=2),
    )
    running = asyncio.run_coroutine_threadsafe(client.run(), background_handler.loop)
    asyncio.run_coroutine_threadsafe(
        asyncio.wait_for(client.registered.wait(), 10), background_handler.loop
    ).result(timeout=15)
    yield client
    asyncio.run_coroutine_threadsafe(client.stop(), background_handler.loop).result(timeout=15)
    running.result(timeout=15)


def test_submit_get_and_duplicate(background_handler: BackgroundHandler, capsys: Capture) -> None:
    tag = unique_tag()
    argv = ["submit", "image", "--repository", "library/alpine", "--tag", tag]
    assert ihctl(background_handler, *argv, "--policy", "malware", "--label", "team=sec") == 0
    first = capsys.readouterr().out.splitlines()
    job_id = first[0]
    assert uuid.UUID(job_id)
    assert first[1].startswith("status: PENDING")
    assert ihctl(background_handler, *argv, "--policy", "malware") == 0
    again = capsys.readouterr().out.splitlines()
    assert again[0] == job_id
    assert "duplicate of an existing job" in again
    assert ihctl(background_handler, "--json", "get", job_id) == 0
    job = json.loads(capsys.readouterr().out)["job"]
    assert job["object"]["image"]["tag"] == tag
    assert job["labels"] == {"team": "sec"}
    assert job["policies"] == ["POLICY_MALWARE"]


def test_an_hndl_error_goes_to_stderr_with_exit_1(
    background_handler: BackgroundHandler, capsys: Capture
) -> None:
    assert ihctl(background_handler, "get", "nope") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("HNDL-008: job id empty: 'nope' is not a job id")
    unknown = str(uuid.uuid4())
    assert ihctl(background_handler, "cancel", unknown) == 1
    assert capsys.readouterr().err.strip() == f"HNDL-008: job id empty: no job with id {unknown}"
    bad_proxy = ["submit", "image", "--repository", "alpine", "--proxy-url", "proxy:3128"]
    assert ihctl(background_handler, *bad_proxy) == 1
    assert capsys.readouterr().err.startswith("HNDL-011: proxy URL invalid: image.proxy_url")


def test_unreachable_handler_is_said_plainly(capsys: Capture) -> None:
    assert main(["--handler", "127.0.0.1:1", "--timeout", "2", "stats"]) == 1
    assert "cannot reach the handler at 127.0.0.1:1" in capsys.readouterr().err


def test_list_get_history_cancel_and_stats(
    background_handler: BackgroundHandler, capsys: Capture
) -> None:
    ids = [submit(background_handler, capsys) for _ in range(3)]
    assert ihctl(background_handler, "list", "--status", "pending", "--all") == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["ID", "KIND", "OBJECT", "STATUS"]
    assert all(job_id in table for job_id in ids)
    assert ihctl(background_handler, "cancel", ids[1], "--reason", "not needed") == 0
    assert capsys.readouterr().out.split() == [ids[1], "CANCELLED"]
    assert ihctl(background_handler, "get", ids[1], "--history") == 0
    view = capsys.readouterr().out
    assert "PENDING -> CANCELLED" in view
    assert "not needed" in view
    assert ihctl(background_handler, "--json", "stats") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["cancelled"] >= 1
    assert stats["pending"] >= 2


def test_watch_a_cancelled_job_exits_1(
    background_handler: BackgroundHandler, capsys: Capture
) -> None:
    job_id = submit(background_handler, capsys)
    assert ihctl(background_handler, "cancel", job_id) == 0
    capsys.readouterr()
    assert ihctl(background_handler, "watch", job_id) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "CANCELLED" in lines[0]
    assert any("PENDING -> CANCELLED" in line for line in lines[1:])


def test_watch_follows_a_job_to_finished(
    background_handler: BackgroundHandler, noop_scanner: ScannerClient, capsys: Capture
) -> None:
    job_id = submit(background_handler, capsys, "--lane", "interactive")
    assert ihctl(background_handler, "watch", job_id) == 0
    out = capsys.readouterr().out
    for step in (
        "PENDING -> IN_PROGRESS",
        "IN_PROGRESS -> PROCESSING_RESULTS",
        "PROCESSING_RESULTS -> FINISHED",
    ):
        assert step in out, out
    assert ihctl(background_handler, "scanners") == 0
    assert noop_scanner.config.scanner_id in capsys.readouterr().out


def test_result_risks_and_redeliver(
    background_handler: BackgroundHandler, noop_scanner: ScannerClient, capsys: Capture
) -> None:
    job_id = submit(background_handler, capsys, "--lane", "interactive")
    assert ihctl(background_handler, "watch", job_id) == 0
    capsys.readouterr()
    assert ihctl(background_handler, "get", job_id, "--result") == 0
    assert capsys.readouterr().out.rstrip().endswith("no findings")
    argv = ["accept-risk", "CVE-2024-6119", "--scope", "everywhere", "--reason", "not reachable"]
    assert ihctl(background_handler, *argv) == 0
    acceptance_id = capsys.readouterr().out.splitlines()[0]
    assert ihctl(background_handler, "risks") == 0
    table = capsys.readouterr().out
    assert acceptance_id in table
    assert "CVE-2024-6119" in table
    assert "everywhere" in table
    assert ihctl(background_handler, "revoke-risk", acceptance_id) == 0
    assert "revoked" in capsys.readouterr().out
    assert ihctl(background_handler, "accept-risk", "CVE-1", "--reason", "x") == 1
    assert "HNDL-005: scan params empty: scope OBJECT needs job_id" in capsys.readouterr().err
    assert ihctl(background_handler, "redeliver", job_id) == 1
    assert capsys.readouterr().err.startswith(
        "HNDL-001: mdw adapter send status: no receiving server is configured"
    )


def test_rematch_counts_what_it_queued_and_skipped(
    background_handler: BackgroundHandler, noop_scanner: ScannerClient, capsys: Capture
) -> None:
    registry = f"r-{uuid.uuid4().hex[:8]}.example"
    argv = ["submit", "image", "--registry", registry, "--repository", "app", "--tag", "1", "-q"]
    assert ihctl(background_handler, *argv, "--fresh") == 0
    job_id = capsys.readouterr().out.strip()
    assert ihctl(background_handler, "watch", job_id) == 0
    capsys.readouterr()
    # The no-op engine's result carries no SBOM: nothing to match again.
    assert ihctl(background_handler, "rematch", "--kind", "image", "--registry", registry) == 0
    assert capsys.readouterr().out.strip() == "0 rematch jobs queued, 1 skipped"
    assert ihctl(background_handler, "--json", "rematch", "--registry", "none.example") == 0
    assert json.loads(capsys.readouterr().out) == {"queued": 0, "skipped": 0}
