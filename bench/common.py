"""What the benchmarks share: starting the handler and scanners as processes, submitting jobs,
waiting for them to finish, reading a process's memory.

Every process runs from the source tree this package sits in (``PYTHONPATH`` is set to it), so
the same bench can measure another checkout: ``cd /other/tree && python -m bench.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from imagehandler.v1 import (
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from server.core.model import ImageRef, JobSpec, Lane, Policy, Trigger

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def postgres_cpu() -> float:
    """CPU seconds of every ``postgres`` process on this machine (its backends and writers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            if stat.read_text().split(" (", 1)[1].startswith("postgres)"):
                total += cpu_seconds(int(stat.parent.name))
    return total


def image_spec(tag: str) -> JobSpec:
    """A distinct image's spec, for the benches that call the service or a store directly."""
    return JobSpec(
        ImageRef("docker.io", "library/app", tag),
        Trigger.SCHEDULED,
        (Policy.VULNERABILITIES,),
        600.0,
        Lane.BULK,
    )


def image_request(n: int, prefix: str = "b") -> job_service_pb2.SubmitJobRequest:
    """A distinct image (no deduplication between bench jobs)."""
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(
            image=common_pb2.ImageObject(repository="library/app", tag=f"{prefix}{n}")
        ),
        policies=[common_pb2.POLICY_VULNERABILITIES],
    )


@dataclass
class Handler:
    """``image-handler serve`` in its own process."""

    workdir: Path
    log_level: str = "warning"
    fsync: str = "batch"
    storage: str = "journal"
    extra: Sequence[str] = ()
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    name: str = "handler"
    # A data directory to keep between starts (a restart bench); by default a fresh one each time.
    data_dir: Path | None = None
    _log: object = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        data = self.data_dir or self.workdir / f"{self.name}-data-{self.port}-{time.monotonic_ns()}"
        log_path = self.workdir / f"{self.name}-{self.port}.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve",
             "--listen", self.address, "--data-dir", str(data),
             "--log-level", self.log_level, "--log-format", "json",
             "--storage", self.storage, "--fsync", self.fsync,
             # No snapshot in the middle of a measurement; nothing is pruned.
             "--snapshot-journal-mb", "100000", "--snapshot-interval", "100000",
             "--grace-period", "0", *self.extra],
            stdout=subprocess.DEVNULL, stderr=self._log, env=child_env(), cwd=ROOT,
        )  # fmt: skip
        asyncio.run(wait_serving(self.address, self.process))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def __enter__(self) -> Handler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_serving(
    address: str, process: subprocess.Popen[bytes] | None = None, limit: float = 120.0
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + limit
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the handler exited with {process.returncode} during start")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the handler on {address} did not start in {limit:g}s")


@dataclass
class Scanners:
    """N scanner processes: ``image-scanner`` (the real CLI and ScannerClient) with the noop
    engine, or ``bench.stamp_scanner`` which also records when each assignment arrived."""

    address: str
    count: int
    slots: int
    workdir: Path
    stamps: bool = False
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[object] = field(default_factory=list)

    def start(self) -> None:
        module = "bench.stamp_scanner" if self.stamps else "scanner_client.cli"
        for n in range(self.count):
            log = open(self.workdir / f"scanner-{n}.log", "ab")  # noqa: SIM115
            self._logs.append(log)
            args = [sys.executable, "-m", module,
                    "--handler", self.address, "--engine", "noop", "--slots", str(self.slots),
                    "--scanner-id", f"bench-{n}", "--log-level", "warning",
                    "--log-format", "json", "--backoff-initial", "0.05",
                    "--backoff-max", "0.5"]  # fmt: skip
            if self.stamps:
                args += ["--stamps", str(self.stamp_path(n))]
            self.processes.append(
                subprocess.Popen(
                    args, stdout=subprocess.DEVNULL, stderr=log, env=child_env(), cwd=ROOT
                )
            )

    def stamp_path(self, n: int) -> Path:
        return self.workdir / f"stamps-{n}.bin"

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def drain(self, timeout: float = 30.0) -> None:
        """SIGTERM: each scanner finishes, writes its stamps and exits."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        self.processes = []
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._logs = []

    def __enter__(self) -> Scanners:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def queue_stats(
    stub: job_service_pb2_grpc.JobServiceStub,
) -> job_service_pb2.GetQueueStatsResponse:
    reply: job_service_pb2.GetQueueStatsResponse = await stub.GetQueueStats(  # type: ignore[misc]
        job_service_pb2.GetQueueStatsRequest(), timeout=10
    )
    return reply


async def wait_scanners(address: str, count: int, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        while True:
            stats = await queue_stats(stub)
            if stats.scanners_connected >= count and stats.scanners_free >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {stats.scanners_connected}/{count} scanners connected after {limit:g}s"
                )
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    out: list[float] = []
    started = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - started)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of the values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class DiskSync:
    """This machine's disk as a commit sees it: 300-byte appends, each followed by
    ``fdatasync``, 100 a second. A commit (the journal's fsync round, PostgreSQL's WAL flush)
    cannot be faster than this, and a pickup that waits on one inherits its tail."""

    syncs: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def disk_sync(directory: Path, seconds: float = 3.0) -> DiskSync:
    path = directory / f"disk-sync-{os.getpid()}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took: list[float] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(fd, b"x" * 300)
            started = time.perf_counter()
            os.fdatasync(fd)
            took.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)  # the pace of a commit now and then, not a disk benchmark
    finally:
        os.close(fd)
        path.unlink()
    return DiskSync(len(took), percentile(took, 50), percentile(took, 99), max(took))
