"""The README's `make run`, as a user runs it: real processes, then ihctl and grpcurl, as make
run prints them and as the README's first session types them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import ROOT

BIN = Path(sys.executable).parent
# The tools' directory as make run prints it (relative to the checkout, where a user types).
MAKE_BIN = ".venv/bin"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class MakeRun:
    address: str
    process: subprocess.Popen[str]
    # What it printed up to its hints' last line.
    printed: list[str]

    def commands(self) -> list[str]:
        """The commands its hints tell a user to type (continuation lines joined)."""
        commands: list[str] = []
        joined = ""
        for line in self.printed:
            text = line.strip()
            if not joined and not text.startswith(f"{MAKE_BIN}/"):
                continue
            joined += text.removesuffix("\\").strip() + " "
            if not text.endswith("\\"):
                commands.append(joined.strip())
                joined = ""
        return commands


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[MakeRun]:
    # Not the default port: what it prints must follow LISTEN.
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
        yield MakeRun(address, process, seen)
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


def typed(command: str) -> subprocess.CompletedProcess[str]:
    """A printed command, run as a user pasting it into a shell would."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        # No IHCTL_HANDLER from the environment: the command alone must name the address.
        env={key: value for key, value in os.environ.items() if key != "IHCTL_HANDLER"},
    )


@pytest.mark.timeout(120)
def test_make_run_serves_jobs_to_its_local_scanner(make_run: MakeRun) -> None:
    address, process = make_run.address, make_run.process
    commands = make_run.commands()
    # Each printed command, as typed, reaches the handler make run started (not the default
    # 127.0.0.1:50051).
    for command in commands:
        assert address in command, command
    programs = [command.split()[0].rsplit("/", 1)[-1] for command in commands]
    assert programs == ["ihctl"] * 4 + ["grpcurl"] * 2 + ["image-scanner"]
    submit, watch, listing, scanners, grpcurl_list, grpcurl_submit, scanner = commands
    assert "imagehandler.v1.JobService" in typed(grpcurl_list).stdout.split()
    submitted = typed(submit)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    watched = typed(watch.replace("JOB_ID", job_id))
    assert watched.returncode == 0, watched.stdout + watched.stderr
    for step in ("PENDING -> IN_PROGRESS", "-> PROCESSING_RESULTS", "-> FINISHED"):
        assert step in watched.stdout
    assert "scanner=local-noop-1" in watched.stdout
    assert job_id in typed(listing).stdout
    assert "local-noop-1" in typed(scanners).stdout
    via_grpcurl = typed(grpcurl_submit)
    assert via_grpcurl.returncode == 0, via_grpcurl.stderr
    assert "JOB_STATUS_" in via_grpcurl.stdout
    another = subprocess.Popen(
        ["bash", "-c", f"exec {scanner}"], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    assert another.stderr is not None
    try:
        for line in another.stderr:  # ends if it exits; the test's timeout bounds it
            if '"registered"' in line:
                break
        else:
            pytest.fail(f"the printed scanner command exited {another.wait()} unregistered")
    finally:
        another.terminate()
        another.wait(timeout=30)
        another.stderr.close()
    # Ctrl-C stops make, the handler and the scanner: the whole process group goes away.
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) in (0, 130, -signal.SIGINT)
    assert group_ended(process.pid, deadline=30)
    probe = run(str(BIN / "grpcurl"), "-plaintext", "-max-time", "2", address, "list")
    assert probe.returncode != 0


def readme_session() -> tuple[list[str], str]:
    """The commands of the README's "A first session" (continuation lines joined), and the
    error message the README says the last one answers."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A first session") :]
    section = section[: section.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            commands.append(command.strip())
    quoted = re.search(r"`(HNDL-008: [^`]*)`", section)
    assert quoted is not None, "the README no longer quotes the error of its session"
    return commands, " ".join(quoted.group(1).split())


@pytest.mark.timeout(120)
def test_the_readme_first_session_works_as_typed(make_run: MakeRun) -> None:
    commands, error = readme_session()
    programs = [command.split()[0].rsplit("/", 1)[-1] for command in commands]
    assert programs == ["ihctl"] * 5 + ["grpcurl"] * 3
    # The README's handler is 127.0.0.1:50051; this one is on a free port. ihctl takes it from
    # IHCTL_HANDLER (as the README says), grpcurl names it.
    env = {**os.environ, "IHCTL_HANDLER": make_run.address}

    def typed_here(command: str) -> subprocess.CompletedProcess[str]:
        command = command.replace("127.0.0.1:50051", make_run.address)
        return subprocess.run(
            ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
        )

    submit, watch, listing, scanners, stats, grpcurl_list, grpcurl_submit, get_nope = commands
    submitted = typed_here(submit)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    watched = typed_here(watch.replace("JOB_ID", job_id))
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "-> FINISHED" in watched.stdout
    assert job_id in typed_here(listing).stdout
    assert "local-noop-1" in typed_here(scanners).stdout
    assert "finished:" in typed_here(stats).stdout
    assert "imagehandler.v1.JobService" in typed_here(grpcurl_list).stdout.split()
    via_grpcurl = typed_here(grpcurl_submit)
    assert via_grpcurl.returncode == 0, via_grpcurl.stderr
    assert "JOB_STATUS_" in via_grpcurl.stdout
    refused = typed_here(get_nope)
    assert refused.returncode != 0
    assert "Code: InvalidArgument" in refused.stderr
    assert error in " ".join(refused.stderr.split())
    assert '"reason":"HNDL-008"' in refused.stderr
