"""The README's `make run`, as a user runs it: real processes, then ihctl and grpcurl."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        ["make", "-s", "run", f"LISTEN={address}", f"DATA_DIR={tmp_path}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal would give it
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # ends if make exits; the test's timeout bounds it
        seen.append(line)
        if "Ctrl-C stops" in line:
            break
    else:
        pytest.fail("make run ended early:\n" + "".join(seen))
    try:
        yield address, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=30)
        process.stdout.close()


def group_ended(pgid: int, deadline: float) -> bool:
    """Poll until no process of the group is left, or the deadline passes."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_make_run_serves_jobs_to_its_local_scanner(
    make_run: tuple[str, subprocess.Popen[str]],
) -> None:
    address, process = make_run
    listed = run(str(BIN / "grpcurl"), "-plaintext", address, "list")
    assert "imagehandler.v1.JobService" in listed.stdout.split()
    submitted = run(
        str(BIN / "ihctl"), "--handler", address,
        "submit", "image", "--repository", "library/alpine", "--tag", "3.20",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    watched = run(str(BIN / "ihctl"), "--handler", address, "watch", job_id)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    for step in ("PENDING -> IN_PROGRESS", "-> PROCESSING_RESULTS", "-> FINISHED"):
        assert step in watched.stdout
    assert "scanner=local-noop-1" in watched.stdout
    # Ctrl-C stops make, the handler and the scanner: the whole process group goes away.
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) in (0, 130, -signal.SIGINT)
    assert group_ended(process.pid, deadline=30)
    probe = run(str(BIN / "grpcurl"), "-plaintext", "-max-time", "2", address, "list")
    assert probe.returncode != 0
