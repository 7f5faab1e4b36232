"""The image, built and run as the Helm chart runs it (marked ``container``).

The base comes from no registry: scripts/make-base-image.sh debootstraps Debian bookworm (minbase,
python3, python3-venv, ca-certificates) from the mirror apt uses and imports it into podman,
keeping the root filesystem under ~/.cache/image-handler-tests, so only the first run pays for
it. scripts/build-image.sh builds the wheels here and the image with no network (--network
none, pip --no-index). The handler container then runs as uid 10001 on a read-only root with
/tmp and /data as its only writable places and the host's network, answers its health checks,
takes a job that a scanner container (the same image, ``image-scanner``) finishes, and on
SIGTERM drains and exits 0, as do the scanners.

Needs root, podman, runc and debootstrap (``make test-tools`` installs them); skips with the
reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagehandler.v1 import common_pb2, job_service_pb2_grpc
from scanner_client.health import STREAM_SERVICE
from tests.helpers import image, wait_for_status
from tests.paths import ROOT

CONTAINERS_CONF = ROOT / "tests" / "container" / "containers.conf"
BASE = "localhost/image-handler-test-base:bookworm"
UID = 10001
DEADLINE = 60.0
SERVING = health_pb2.HealthCheckResponse.SERVING

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def run(
    command: Sequence[str], timeout: float = 120, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**podman_env(), **(extra_env or {})},
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built_image() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("the container test runs podman as root (with runc): run it as root")
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the container test needs {', '.join(missing)} (make test-tools)")
    run([str(ROOT / "scripts" / "make-base-image.sh"), BASE], timeout=600)
    # A tag of this run's own: other checkouts may build at the same time.
    tag = f"localhost/image-handler-test:{uuid.uuid4().hex[:12]}"
    run(
        [str(ROOT / "scripts" / "build-image.sh"), "--base", BASE, "--tag", tag],
        timeout=600,
        extra_env={"PIP": str(Path(sys.executable).with_name("pip"))},
    )
    try:
        yield tag
    finally:
        subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, env=podman_env())


class Container:
    """``podman run`` in the foreground, as the chart runs a pod: uid 10001, read-only root,
    /tmp a tmpfs, no capabilities, no privilege escalation, the host's network."""

    def __init__(self, name: str) -> None:
        self.name = f"ih-test-{name}-{uuid.uuid4().hex[:8]}"
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def start(self, image_tag: str, *args: str, options: Sequence[str] = ()) -> Container:
        self.process = await asyncio.create_subprocess_exec(
            "podman", "run", "--rm", "--name", self.name,
            "--user", f"{UID}:{UID}", "--read-only", "--tmpfs", "/tmp:rw,size=64m",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--network", "host",
            *options, image_tag, *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=podman_env(),
        )  # fmt: skip
        return self

    async def until(self, pattern: str) -> re.Match[str]:
        """Read the container's stderr until a line matches ``pattern``."""
        assert self.process is not None
        assert self.process.stderr is not None
        async with asyncio.timeout(DEADLINE):
            while True:
                raw = await self.process.stderr.readline()
                assert raw, f"{self.name} exited:\n" + "".join(self.lines[-30:])
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if found := re.search(pattern, line):
                    return found

    async def stop(self) -> int:
        """SIGTERM, as Kubernetes sends it; the container's exit code."""
        assert self.process is not None
        assert self.process.stderr is not None
        run(["podman", "kill", "--signal", "TERM", self.name])
        async with asyncio.timeout(DEADLINE):
            rest = await self.process.stderr.read()
            self.lines.extend(rest.decode(errors="replace").splitlines(keepends=True))
            return await self.process.wait()

    async def remove(self) -> None:
        if self.process is not None and self.process.returncode is None:
            await asyncio.create_subprocess_exec(
                "podman", "rm", "--force", self.name, env=podman_env(),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await self.process.wait()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]


@pytest.fixture
async def containers() -> AsyncIterator[list[Container]]:
    made: list[Container] = []
    yield made
    for container in made:
        await container.remove()


async def health(address: str, service: str) -> int:
    async with aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(response.status)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def test_the_image_runs_as_the_chart_expects(built_image: str) -> None:
    config = json.loads(run(["podman", "image", "inspect", built_image]).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["image-handler"]
    # The chart's scanner Deployment runs the same image with this command.
    version = run(["podman", "run", "--rm", "--entrypoint", "image-scanner", built_image,
                   "--version"]).stdout  # fmt: skip
    assert version.startswith("image-scanner ")


async def test_handler_and_scanner_containers_take_a_job_and_drain_on_sigterm(
    built_image: str, containers: list[Container], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    handler = Container("handler")
    containers.append(handler)
    await handler.start(
        built_image, "serve", "--listen", "127.0.0.1:0",
        options=["--volume", f"{data}:/data", "--env", "IMAGE_HANDLER_METRICS_LISTEN=127.0.0.1:0"],
    )  # fmt: skip
    metrics_port = int((await handler.until(r'"port":(\d+),"event":"metrics.listening"'))[1])
    address = (await handler.until(r"image-handler listening on (\S+)"))[1]
    await handler.until(r'"event":"handler.recovered"')
    assert await health(address, "") == SERVING
    assert await health(address, "imagehandler.v1.JobService") == SERVING

    scanner = Container("scanner")
    containers.append(scanner)
    await scanner.start(
        built_image, "--handler", address, "--scanner-id", "container-scanner",
        "--health-listen", "127.0.0.1:0", "--log-format", "json",
        options=["--entrypoint", "image-scanner"],
    )  # fmt: skip
    await scanner.until(r'"event":\s*"registered"')
    port = next(e["port"] for e in scanner.events() if e.get("event") == "health listening")
    assert await health(f"127.0.0.1:{port}", STREAM_SERVICE) == SERVING

    async with aio.insecure_channel(address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        submitted = await jobs.SubmitJob(image(tag="in-a-container"))
        done = await wait_for_status(jobs, submitted.job.id, common_pb2.JOB_STATUS_FINISHED)
        assert done.scanner_id == "container-scanner"
        assert done.result.verdict == common_pb2.VERDICT_PASSED
    metrics = await asyncio.to_thread(scrape, metrics_port)
    assert "imagehandler_ready 1.0" in metrics
    assert (
        'imagehandler_scanner_database_age_seconds{database="noop",scanner_id="container-scanner"}'
        in metrics
    )

    # SIGTERM: the scanner drains and exits 0; then the handler drains, snapshots, exits 0.
    assert await scanner.stop() == 0
    assert any(e.get("event") == "scanner drained" for e in scanner.events())
    assert await handler.stop() == 0
    stopped = [e for e in handler.events() if e.get("event") == "handler.stopped"]
    assert stopped
    assert stopped[0]["drained"] is True
    # The queue lives in the volume, written by uid 10001.
    written = [p for p in data.rglob("*") if p.is_file()]
    assert written
    assert {p.stat().st_uid for p in written} == {UID}
