"""The security flags as an operator uses them: real processes (image-handler serve with TLS
and a token file, ihctl, image-scanner, grpcurl), and what the handler's log shows."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import Authority

BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin)


def wait_for_line(path: Path, text: str, process: subprocess.Popen[str], limit: float = 30) -> None:
    """Poll the process's log file until ``text`` shows (it writes lines as it goes)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if text in path.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}):\n{path.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"{text!r} did not show within {limit}s:\n{path.read_text()}")


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


def events(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.fixture
def handler_process(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        stop(process)


@pytest.mark.timeout(120)
def test_tls_and_tokens_with_the_real_commands(
    tmp_path: Path, handler_process: list[subprocess.Popen[str]]
) -> None:
    ca = Authority()
    cert, key = ca.server().write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)

    # image-handler token: the token on stdout's first line, the file line on the second.
    tokens: dict[str, str] = {}
    lines = []
    for name, roles in (("ci", "submit,read"), ("ops", "admin"), ("scanners", "scanner")):
        made = run(str(BIN / "image-handler"), "token", name, roles)
        assert made.returncode == 0, made.stderr
        token, line = made.stdout.splitlines()
        assert token not in line
        tokens[name] = token
        lines.append(line)
    token_file = tmp_path / "tokens"
    token_file.write_text("\n".join(lines) + "\n")
    scanner_token = tmp_path / "scanner-token"
    scanner_token.write_text(tokens["scanners"] + "\n")

    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "handler.log"
    with log.open("w") as sink:
        handler = subprocess.Popen(
            [
                str(BIN / "image-handler"),
                "serve",
                "--listen",
                address,
                "--data-dir",
                str(tmp_path / "data"),
                "--storage",
                "memory",
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--token-file",
                str(token_file),
                "--log-format",
                "json",
                "--log-level",
                "debug",
            ],
            stdout=sink,
            stderr=sink,
            text=True,
        )
    handler_process.append(handler)
    wait_for_line(log, "image-handler listening on", handler)

    ihctl = [str(BIN / "ihctl"), "--handler", address, "--tls-ca", str(ca_file)]
    submitted = run(
        *ihctl, "--token", tokens["ci"], "submit", "image", "--repository", "library/alpine", "-q"
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    anonymous = run(*ihctl, "stats")
    assert anonymous.returncode == 1
    assert "HNDL-007" in anonymous.stderr
    assert "needs a token" in anonymous.stderr
    denied = run(*ihctl, "--token", tokens["ci"], "cancel", job_id)
    assert denied.returncode == 1
    assert "may not call JobService/CancelJob; that needs the role admin" in denied.stderr
    plaintext = run(str(BIN / "ihctl"), "--handler", address, "--token", tokens["ci"], "stats")
    assert plaintext.returncode == 1

    scanner_log = tmp_path / "scanner.log"
    with scanner_log.open("w") as sink:
        scanner = subprocess.Popen(
            [
                str(BIN / "image-scanner"),
                "--handler",
                address,
                "--tls-ca",
                str(ca_file),
                "--token-file",
                str(scanner_token),
                "--engine",
                "noop",
                "--log-format",
                "json",
            ],
            stdout=sink,
            stderr=sink,
            text=True,
        )
    handler_process.insert(0, scanner)
    watched = run(*ihctl, "--token", tokens["ci"], "watch", job_id)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "FINISHED" in watched.stdout

    if GRPCURL:
        listed = run(GRPCURL, "-cacert", str(ca_file), address, "list")
        assert listed.returncode == 0, listed.stderr
        assert "imagehandler.v1.JobService" in listed.stdout
        stats = run(
            GRPCURL,
            "-cacert",
            str(ca_file),
            "-H",
            f"authorization: Bearer {tokens['ops']}",
            address,
            "imagehandler.v1.JobService/GetQueueStats",
        )
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["finished"] == "1"  # int64 in the JSON mapping

    assert stop(scanner) == 0
    assert stop(handler) == 0
    text = log.read_text()
    for token in tokens.values():
        assert token not in text
        assert token not in scanner_log.read_text()
    names = {event["event"] for event in events(log)}
    assert {"rpc.unauthenticated", "rpc.permission_denied", "scanner.connected"} <= names
    assert "handler.plaintext" not in names


@pytest.mark.timeout(60)
def test_plaintext_on_a_non_loopback_address_warns(
    tmp_path: Path, handler_process: list[subprocess.Popen[str]]
) -> None:
    log = tmp_path / "handler.log"
    with log.open("w") as sink:
        handler = subprocess.Popen(
            [
                str(BIN / "image-handler"),
                "serve",
                "--listen",
                f"0.0.0.0:{free_port()}",
                "--data-dir",
                str(tmp_path / "data"),
                "--storage",
                "memory",
                "--log-format",
                "json",
            ],
            stdout=sink,
            stderr=sink,
            text=True,
        )
    handler_process.append(handler)
    wait_for_line(log, "handler.plaintext", handler)
    warning = next(e for e in events(log) if e["event"] == "handler.plaintext")
    assert warning["level"] == "warning"
    assert "--tls-cert" in str(warning["detail"])
    assert stop(handler) == 0
