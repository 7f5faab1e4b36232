"""What TLS and the auth interceptor cost: end-to-end throughput with plaintext, TLS, and
mutual TLS + tokens, as ratios to plaintext.

The same end-to-end run as ``bench.e2e`` (handler process with the journal and ``batch``
fsync, log level ``warning``; ``image-scanner`` processes with the noop engine; this process
submits ``SubmitJobs`` batches of 100 with 4 in flight, or single ``SubmitJob`` calls with 32 in
flight, and polls ``GetQueueStats`` every 20 ms until every job is FINISHED), three ways:

- ``plaintext``: no security flag (the interceptor still runs: size checks and decoding);
- ``tls``: ``--tls-cert/--tls-key``; scanners and the submitter check the handler's certificate;
- ``mtls+tokens``: also ``--client-ca`` (every client presents a certificate; each scanner its
  own, whose name is its scanner id) and ``--token-file`` (scanner tokens on the streams, a
  submit+read token on every submit and poll).

Certificates are made for the run (``tests/certs.py``). The configurations take turns within each
repeat so that drift of the machine affects them alike; the figure is the median of the repeats.

    .venv/bin/python -m bench.security --jobs 20000 --scanners 8 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.common import ROOT, child_env, cpu_seconds, free_port, image_request
from imagehandler.channel import bearer_metadata
from imagehandler.v1 import job_service_pb2, job_service_pb2_grpc
from server.security.tokens import file_line, new_token
from tests.certs import Authority

BATCH = 100
BATCH_IN_FLIGHT = 4
SINGLE_IN_FLIGHT = 32
POLL = 0.02
CONFIGS = ("plaintext", "tls", "mtls+tokens")


@dataclass
class Pki:
    directory: Path
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    scanners: list[tuple[Path, Path]]
    token_file: Path
    submit_token: str
    scanner_token: str
    ca_pem: bytes = b""
    client_pem: tuple[bytes, bytes] = (b"", b"")

    @classmethod
    def make(cls, directory: Path, scanners: int) -> Pki:
        authority = Authority("bench CA")
        ca = directory / "ca.crt"
        ca.write_bytes(authority.pem)
        client_pair = authority.issue("bench-submitter")
        submit_token, scanner_token = new_token(), new_token()
        token_file = directory / "tokens"
        token_file.write_text(
            file_line("submitter", ["submit", "read"], submit_token)
            + "\n"
            + file_line("scanners", ["scanner"], scanner_token)
            + "\n"
        )
        return cls(
            directory=directory,
            ca=ca,
            server=authority.server().write(directory, "server"),
            client=client_pair.write(directory, "client"),
            scanners=[
                authority.issue(f"bench-{n}").write(directory, f"scanner-{n}")
                for n in range(scanners)
            ],
            token_file=token_file,
            submit_token=submit_token,
            scanner_token=scanner_token,
            ca_pem=authority.pem,
            client_pem=(client_pair.key_pem, client_pair.cert_pem),
        )


@dataclass
class Setup:
    """The flags and client credentials of one configuration."""

    name: str
    pki: Pki

    def handler_flags(self) -> list[str]:
        pki = self.pki
        if self.name == "plaintext":
            return []
        flags = ["--tls-cert", str(pki.server[0]), "--tls-key", str(pki.server[1])]
        if self.name == "mtls+tokens":
            flags += ["--client-ca", str(pki.ca), "--token-file", str(pki.token_file)]
        return flags

    def scanner_flags(self, n: int) -> list[str]:
        pki = self.pki
        if self.name == "plaintext":
            return []
        flags = ["--tls-ca", str(pki.ca)]
        if self.name == "mtls+tokens":
            cert, key = pki.scanners[n]
            flags += ["--tls-cert", str(cert), "--tls-key", str(key)]
        return flags

    def scanner_env(self) -> dict[str, str]:
        if self.name == "mtls+tokens":
            return child_env(IMAGE_SCANNER_TOKEN=self.pki.scanner_token)
        return child_env()

    def channel(self, address: str) -> grpc.aio.Channel:
        if self.name == "plaintext":
            return grpc.aio.insecure_channel(address)
        key, cert = self.pki.client_pem if self.name == "mtls+tokens" else (None, None)
        credentials = grpc.ssl_channel_credentials(self.pki.ca_pem, key, cert)
        return grpc.aio.secure_channel(address, credentials)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.pki.submit_token) if self.name == "mtls+tokens" else ()


@dataclass
class Run:
    config: str
    mode: str
    jobs: int
    seconds: float
    jobs_per_second: float
    handler_cpu_us_per_job: float
    errors: int


@dataclass
class Processes:
    handler: subprocess.Popen[bytes] | None = None
    scanners: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for process in [*self.scanners, self.handler]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in [*self.scanners, self.handler]:
            if process is not None:
                process.wait(timeout=30)
        for log in self.logs:
            log.close()


def start(setup: Setup, workdir: Path, scanners: int, slots: int) -> tuple[str, Processes]:
    address = f"127.0.0.1:{free_port()}"
    processes = Processes()
    log = open(workdir / f"handler-{setup.name}.log", "ab")  # noqa: SIM115 - closed in stop()
    processes.logs.append(log)
    data = workdir / f"data-{time.monotonic_ns()}"
    processes.handler = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--listen", address,
         "--data-dir", str(data), "--log-level", "warning", "--log-format", "json",
         "--fsync", "batch", "--snapshot-journal-mb", "100000",
         "--snapshot-interval", "100000", "--grace-period", "0",
         *setup.handler_flags()],
        stdout=subprocess.DEVNULL, stderr=log, env=child_env(), cwd=ROOT,
    )  # fmt: skip
    for n in range(scanners):
        scanner_log = open(workdir / f"scanner-{setup.name}-{n}.log", "ab")  # noqa: SIM115
        processes.logs.append(scanner_log)
        processes.scanners.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "scanner_client.cli",
                    "--handler",
                    address,
                    "--engine",
                    "noop",
                    "--slots",
                    str(slots),
                    "--scanner-id",
                    f"bench-{n}",
                    "--log-level",
                    "warning",
                    "--log-format",
                    "json",
                    "--backoff-initial",
                    "0.05",
                    "--backoff-max",
                    "0.5",
                    *setup.scanner_flags(n),
                ],
                stdout=subprocess.DEVNULL,
                stderr=scanner_log,
                env=setup.scanner_env(),
                cwd=ROOT,
            )
        )
    return address, processes


async def stats(stub: Any, metadata: Sequence[tuple[str, str]]) -> Any:
    return await stub.GetQueueStats(
        job_service_pb2.GetQueueStatsRequest(), metadata=metadata, timeout=10
    )


async def wait_ready(setup: Setup, address: str, scanners: int, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    async with setup.channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stats(stub, setup.metadata)
                if reply.scanners_connected >= scanners and reply.scanners_free >= scanners:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{setup.name}: the handler and its scanners were not ready in {limit}s")


async def measure_once(setup: Setup, address: str, jobs: int, mode: str) -> tuple[float, int]:
    """(seconds from the first submit to the last FINISHED, jobs in ERROR)."""
    metadata = setup.metadata
    async with setup.channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        before = await stats(stub, metadata)
        base = before.finished + before.error
        if mode == "batched":
            work: list[Any] = [
                job_service_pb2.SubmitJobsRequest(
                    jobs=[image_request(n, "s") for n in range(first, min(jobs, first + BATCH))]
                )
                for first in range(0, jobs, BATCH)
            ]
            call: Any = stub.SubmitJobs
            in_flight = BATCH_IN_FLIGHT
        else:
            work = [image_request(n, "s") for n in range(jobs)]
            call = stub.SubmitJob
            in_flight = SINGLE_IN_FLIGHT
        work.reverse()

        async def submitter() -> None:
            while work:
                await call(work.pop(), metadata=metadata, timeout=60)

        started = time.perf_counter()
        submitting = asyncio.gather(*(submitter() for _ in range(in_flight)))
        while True:
            await asyncio.sleep(POLL)
            reply = await stats(stub, metadata)
            if reply.finished + reply.error - base >= jobs:
                ended = time.perf_counter()
                break
            if submitting.done() and submitting.exception() is not None:
                raise submitting.exception()  # type: ignore[misc]
        await submitting
        return ended - started, reply.error - before.error


def run_one(setup: Setup, workdir: Path, scanners: int, slots: int, jobs: int, mode: str) -> Run:
    address, processes = start(setup, workdir, scanners, slots)
    try:
        asyncio.run(wait_ready(setup, address, scanners))
        assert processes.handler is not None
        cpu_before = cpu_seconds(processes.handler.pid)
        seconds, errors = asyncio.run(measure_once(setup, address, jobs, mode))
        cpu = cpu_seconds(processes.handler.pid) - cpu_before
    finally:
        processes.stop()
    return Run(setup.name, mode, jobs, seconds, jobs / seconds, cpu / jobs * 1e6, errors)


def summarize(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in sorted({r.mode for r in runs}):
        rates = {
            config: statistics.median(
                r.jobs_per_second for r in runs if r.config == config and r.mode == mode
            )
            for config in CONFIGS
            if any(r.config == config and r.mode == mode for r in runs)
        }
        cpu = {
            config: statistics.median(
                r.handler_cpu_us_per_job for r in runs if r.config == config and r.mode == mode
            )
            for config in rates
        }
        base = rates.get("plaintext")
        out[mode] = {
            config: {
                "jobs_per_second": round(rate),
                "ratio_to_plaintext": round(rate / base, 3) if base else None,
                "handler_cpu_us_per_job": round(cpu[config]),
            }
            for config, rate in rates.items()
        }
    return out


async def _interceptor_cost(calls: int, workdir: Path) -> dict[str, float]:
    """Microseconds per unary call the interceptor adds (intercept, decode, the behaviour
    wrapper) around a method that does nothing, without and with a token file."""
    from types import SimpleNamespace

    from server.security.interceptor import SecurityInterceptor
    from server.security.tokens import TokenFile

    request = job_service_pb2.GetQueueStatsRequest()
    raw = request.SerializeToString()
    reply = job_service_pb2.GetQueueStatsResponse(pending=1)

    async def method(request: Any, context: Any) -> Any:
        return reply

    handler = grpc.unary_unary_rpc_method_handler(
        method,
        request_deserializer=job_service_pb2.GetQueueStatsRequest.FromString,
        response_serializer=job_service_pb2.GetQueueStatsResponse.SerializeToString,
    )

    async def continuation(details: Any) -> Any:
        return handler

    context = SimpleNamespace(peer=lambda: "ipv4:127.0.0.1:1", auth_context=lambda: {})
    token = new_token()
    token_file = workdir / "micro-tokens"
    token_file.write_text(file_line("bench", ["read"], token) + "\n")
    path = "/imagehandler.v1.JobService/GetQueueStats"
    out: dict[str, float] = {}
    for name, interceptor, metadata in (
        ("none", None, ()),
        ("interceptor", SecurityInterceptor(max_receive_bytes=1 << 24, max_send_bytes=1 << 26), ()),
        (
            "interceptor+token",
            SecurityInterceptor(
                tokens=TokenFile(token_file), max_receive_bytes=1 << 24, max_send_bytes=1 << 26
            ),
            bearer_metadata(token),
        ),
    ):
        details = SimpleNamespace(method=path, invocation_metadata=metadata)
        started = time.perf_counter()
        for _ in range(calls):
            if interceptor is None:
                await method(job_service_pb2.GetQueueStatsRequest.FromString(raw), context)
            else:
                wrapped: Any = await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]
                await wrapped.unary_unary(wrapped.request_deserializer(raw), context)
        out[name] = (time.perf_counter() - started) / calls * 1e6
    return {
        "us_per_call_without": round(out["none"], 2),
        "interceptor_us_per_call": round(out["interceptor"] - out["none"], 2),
        "interceptor_with_token_us_per_call": round(out["interceptor+token"] - out["none"], 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scanners", type=int, default=8)
    parser.add_argument("--slots", type=int, default=128, help="per scanner")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=("batched", "single", "both"), default="both")
    parser.add_argument("--json", type=Path, help="also write the runs and summary here")
    parser.add_argument(
        "--micro", action="store_true", help="only the interceptor's own cost per call, in-process"
    )
    args = parser.parse_args(argv)
    if args.micro:
        with tempfile.TemporaryDirectory(prefix="bench-security-") as tmp:
            print(json.dumps(asyncio.run(_interceptor_cost(200_000, Path(tmp))), indent=2))
        return
    modes = ("batched", "single") if args.mode == "both" else (args.mode,)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-security-") as tmp:
        workdir = Path(tmp)
        pki = Pki.make(workdir, args.scanners)
        for repeat in range(args.repeats):
            for mode in modes:
                for config in CONFIGS:
                    run = run_one(
                        Setup(config, pki), workdir, args.scanners, args.slots, args.jobs, mode
                    )
                    runs.append(run)
                    print(
                        f"  [{repeat + 1}/{args.repeats}] {mode:7} {config:12}"
                        f" {run.jobs_per_second:8,.0f} jobs/s ({run.jobs:,} jobs in"
                        f" {run.seconds:.2f} s, handler {run.handler_cpu_us_per_job:.0f} us"
                        f" CPU/job, {run.errors} errors)",
                        flush=True,
                    )
    summary = summarize(runs)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(
            json.dumps({"runs": [asdict(r) for r in runs], "summary": summary}, indent=2)
        )


if __name__ == "__main__":
    main()
