"""Security against a real handler: TLS and mutual TLS with certificates made here, the role
matrix (every RPC x every role), token file reloads, scanner trust, and every limit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imagehandler.channel import bearer_metadata
from imagehandler.rpc import RemoteError, read_rpc_error
from imagehandler.v1 import (
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    scanner_service_pb2,
    scanner_service_pb2_grpc,
)
from server.security.tokens import file_line
from tests.certs import Authority, KeyPair
from tests.conftest import Handler, MakeHandler
from tests.helpers import DEADLINE, RawScanner, image, remote_error, wait_for_status

SC = grpc.StatusCode
ROLES = ("submit", "read", "admin", "scanner")
AUTH_STATUSES = (SC.UNAUTHENTICATED, SC.PERMISSION_DENIED)


# ----- certificates and tokens ----------------------------------------------------------


@dataclass
class Pki:
    ca: Authority
    directory: Path
    server_cert: Path
    server_key: Path
    ca_file: Path
    scanner: KeyPair  # CN scanner-1, SAN scanner-1.scans.svc
    other_ca_scanner: KeyPair  # CN scanner-1, from another CA
    expired: KeyPair  # CN scanner-1, expired yesterday
    operator: KeyPair  # CN ops

    def config(self, mutual: bool = True, **overrides: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "tls_cert": str(self.server_cert),
            "tls_key": str(self.server_key),
        }
        if mutual:
            settings["client_ca"] = str(self.ca_file)
        return {**settings, **overrides}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority()
    server_cert, server_key = ca.server().write(directory, "server")
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.pem)
    return Pki(
        ca=ca,
        directory=directory,
        server_cert=server_cert,
        server_key=server_key,
        ca_file=ca_file,
        scanner=ca.issue("scanner-1", dns=("scanner-1.scans.svc",)),
        other_ca_scanner=Authority("another CA").issue("scanner-1"),
        expired=ca.issue("scanner-1", expired=True),
        operator=ca.issue("ops"),
    )


def tls_channel(handler: Handler, pki: Pki, client: KeyPair | None = None) -> aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.pem,
        client.key_pem if client else None,
        client.cert_pem if client else None,
    )
    return aio.secure_channel(handler.address, credentials)


TOKENS = {role: f"{role}-{secrets.token_urlsafe(24)}" for role in ROLES}
TOKENS["read-2"] = f"read2-{secrets.token_urlsafe(24)}"


def write_tokens(path: Path, entries: dict[str, tuple[str, str]]) -> None:
    """entries: name -> (roles, token). Written atomically, as a Secret update is."""
    text = "".join(f"{file_line(name, r.split(','), t)}\n" for name, (r, t) in entries.items())
    temporary = path.with_suffix(".tmp")
    temporary.write_text("# name roles hash\n" + text)
    os.replace(temporary, path)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    write_tokens(path, {role: (role, TOKENS[role]) for role in ROLES})
    return path


def md(token: str) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(token)


class TokenStub:
    """A ScannerService stub whose Connect carries a token (for RawScanner)."""

    def __init__(self, channel: aio.Channel, token: str) -> None:
        self._stub = scanner_service_pb2_grpc.ScannerServiceStub(channel)
        self._metadata = md(token)

    def Connect(self) -> Any:
        return self._stub.Connect(None, metadata=self._metadata)


async def health_check(channel: aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
    return reply.status  # type: ignore[no-any-return]


# ----- TLS and mutual TLS -----------------------------------------------------------------


async def test_tls_serves_tls_clients_and_refuses_plaintext(
    make_handler: MakeHandler, pki: Pki
) -> None:
    handler = await make_handler(**pki.config(mutual=False))
    channel = tls_channel(handler, pki)
    try:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        reply = await stub.SubmitJob(image())
        assert reply.job.status == common_pb2.JOB_STATUS_PENDING
    finally:
        await channel.close(None)
    # The fixture's own channel is plaintext: the TLS port does not answer it.
    error = await remote_error(handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest()))
    assert error.status == SC.UNAVAILABLE


async def test_health_listen_serves_probes_in_plaintext_and_nothing_else(
    make_handler: MakeHandler, pki: Pki
) -> None:
    handler = await make_handler(**pki.config(), health_listen="127.0.0.1:0")
    probe = aio.insecure_channel(f"127.0.0.1:{handler.server.health_port}")
    try:
        assert await health_check(probe) == health_pb2.HealthCheckResponse.SERVING
        jobs = job_service_pb2_grpc.JobServiceStub(probe)
        error = await remote_error(jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest()))
        assert error.status == SC.UNIMPLEMENTED
        await handler.server.stop(0)
        with pytest.raises(grpc.RpcError):
            await health_check(probe)
    finally:
        await probe.close(None)


@pytest.mark.parametrize("client", ["none", "other_ca", "expired"])
async def test_mutual_tls_refuses_bad_client_certificates(
    make_handler: MakeHandler, pki: Pki, client: str
) -> None:
    handler = await make_handler(**pki.config())
    pair = {"none": None, "other_ca": pki.other_ca_scanner, "expired": pki.expired}[client]
    bad = tls_channel(handler, pki, pair)
    good = tls_channel(handler, pki, pki.scanner)
    try:
        scanner = RawScanner(scanner_service_pb2_grpc.ScannerServiceStub(bad), "scanner-1")
        with pytest.raises(grpc.RpcError) as refused:
            await scanner.connect()
        # The TLS handshake fails: no call reaches the handler, so no HNDL code here.
        assert refused.value.code() == SC.UNAVAILABLE
        await scanner.close()
        with pytest.raises(grpc.RpcError):
            await health_check(bad)
        # Everyone else is still served.
        assert await health_check(good) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await bad.close(None)
        await good.close(None)


async def test_certificate_identity_is_the_scanner_id(make_handler: MakeHandler, pki: Pki) -> None:
    handler = await make_handler(**pki.config())
    channel = tls_channel(handler, pki, pki.scanner)
    stub = scanner_service_pb2_grpc.ScannerServiceStub(channel)
    try:
        # An empty scanner_id takes the certificate's common name.
        async with RawScanner(stub, "") as nameless:
            first = await nameless.connect()
            assert first.registered.scanner_id == "scanner-1"
        await wait_until_disconnected(handler, "scanner-1")
        # A subject alternative name is the certificate's identity too.
        async with RawScanner(stub, "scanner-1.scans.svc") as by_san:
            first = await by_san.connect()
            assert first.registered.scanner_id == "scanner-1.scans.svc"
        # Any other id is refused with HNDL-003: a certificate cannot pose as another scanner.
        async with RawScanner(stub, "scanner-2") as impostor:
            first = await impostor.connect()
            assert first.WhichOneof("message") == "rejected"
            assert first.rejected.error.code == "HNDL-003"
            assert "does not match the client certificate" in first.rejected.error.message
            error = await remote_error(impostor.call)
            assert (error.code, error.status) == ("HNDL-003", SC.INVALID_ARGUMENT)
    finally:
        await channel.close(None)


async def wait_until_disconnected(handler: Handler, scanner_id: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while handler.server.handler.sessions.registry.live(scanner_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # polling the handler's state with a deadline


async def test_second_stream_with_a_live_scanner_id_is_refused(
    make_handler: MakeHandler, pki: Pki
) -> None:
    handler = await make_handler(**pki.config())
    channel = tls_channel(handler, pki, pki.scanner)
    stub = scanner_service_pb2_grpc.ScannerServiceStub(channel)
    try:
        async with RawScanner(stub, "scanner-1") as first, RawScanner(stub, "scanner-1") as second:
            await first.start()
            jobs = job_service_pb2_grpc.JobServiceStub(channel)
            job_id = (await jobs.SubmitJob(image())).job.id
            [assigned] = await first.assigned()
            reply = await second.connect()
            assert reply.WhichOneof("message") == "rejected"
            error = await remote_error(second.call)
            assert (error.code, error.status) == ("HNDL-007", SC.UNAVAILABLE)
            assert "already connected" in error.message
            # The live stream keeps its job and finishes it.
            job = (await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))).job
            assert (job.status, job.scanner_id) == (common_pb2.JOB_STATUS_IN_PROGRESS, "scanner-1")
            await first.finish(assigned)
            await wait_for_status(jobs, job_id, common_pb2.JOB_STATUS_FINISHED)
    finally:
        await channel.close(None)


async def test_a_scanner_reports_only_on_jobs_assigned_to_it_in_this_session(
    handler: Handler,
) -> None:
    async with (
        RawScanner(handler.scanners, "owner") as owner,
        RawScanner(handler.scanners, "thief") as thief,
    ):
        await owner.start()
        job_id = (await handler.jobs.SubmitJob(image())).job.id
        [assigned] = await owner.assigned()
        await thief.start()
        # Another scanner's job: HNDL-008 on the thief's stream; the job is untouched.
        await thief.send(
            result=scanner_service_pb2.Results(
                results=[common_pb2.ScanResult(job_id=job_id, run=assigned.run)]
            )
        )
        rejected = await thief.expect("rejected")
        assert (rejected.job_id, rejected.error.code) == (job_id, "HNDL-008")
        await thief.send(failure=scanner_service_pb2.Failure(job_id=job_id, code="HNDL-006"))
        assert (await thief.expect("rejected")).error.code == "HNDL-008"
        job = (await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))).job
        assert (job.status, job.scanner_id, job.runs) == (
            common_pb2.JOB_STATUS_IN_PROGRESS,
            "owner",
            1,
        )
        # The owner reconnects: the old session's job is back in the queue, and a result
        # for it on the new session (before any new assignment) is refused too.
        await thief.close()
        await wait_until_disconnected(handler, "thief")
        await owner.close()
        await wait_until_disconnected(handler, "owner")
        async with RawScanner(handler.scanners, "owner") as again:
            assert (await again.connect()).WhichOneof("message") == "registered"
            await again.send(
                result=scanner_service_pb2.Results(
                    results=[common_pb2.ScanResult(job_id=job_id, run=assigned.run)]
                )
            )
            assert (await again.expect("rejected")).error.code == "HNDL-008"
        job = (await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))).job
        assert job.status == common_pb2.JOB_STATUS_PENDING


# ----- tokens and roles -------------------------------------------------------------------

# The specification: who may call what, besides admin (which may call everything). A method
# not listed (one added later) is admin only.
ALLOWED: dict[str, set[str]] = {
    "SubmitJob": {"submit"},
    "SubmitJobs": {"submit"},
    "SubmitJobStream": {"submit"},
    "GetJob": {"read"},
    "ListJobs": {"read"},
    "WatchJobs": {"read"},
    "GetQueueStats": {"read"},
    "GetJobResult": {"read"},
    "ListRiskAcceptances": {"read"},
    "ListScanners": {"read"},
    "Connect": {"scanner"},
    "CancelJob": set(),
    "RedeliverJob": set(),
    "AcceptRisk": set(),
    "RevokeRiskAcceptance": set(),
    "RematchJobs": set(),
}


def all_methods() -> list[tuple[str, str, Any]]:
    """(service full name, method name, method descriptor) of both handler services."""
    out = []
    for module, service in (
        (job_service_pb2, "JobService"),
        (scanner_service_pb2, "ScannerService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        out += [(descriptor.full_name, m.name, m) for m in descriptor.methods]
    return out


async def attempt(
    channel: aio.Channel, service: str, method: Any, metadata: Any, job_id: str, n: int
) -> RemoteError | None:
    """Call ``method`` as the holder of ``metadata``: None when the call got past the
    interceptor, else the error."""
    name = method.name
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    scanners = scanner_service_pb2_grpc.ScannerServiceStub(channel)
    requests: dict[str, Any] = {
        "SubmitJob": image(tag=f"m{n}"),
        "SubmitJobs": job_service_pb2.SubmitJobsRequest(jobs=[image(tag=f"b{n}")]),
        "GetJob": job_service_pb2.GetJobRequest(job_id=job_id),
        "ListJobs": job_service_pb2.ListJobsRequest(),
        "GetQueueStats": job_service_pb2.GetQueueStatsRequest(),
        "GetJobResult": job_service_pb2.GetJobResultRequest(job_id=job_id),
        "ListRiskAcceptances": job_service_pb2.ListRiskAcceptancesRequest(),
        "ListScanners": scanner_service_pb2.ListScannersRequest(),
        "CancelJob": job_service_pb2.CancelJobRequest(job_id=job_id),
        "RedeliverJob": job_service_pb2.RedeliverJobRequest(job_id=job_id),
        "AcceptRisk": job_service_pb2.AcceptRiskRequest(finding_id="CVE-2024-0001", reason="r"),
        "RevokeRiskAcceptance": job_service_pb2.RevokeRiskAcceptanceRequest(id="nope"),
    }
    try:
        if name == "WatchJobs":
            call = jobs.WatchJobs(
                job_service_pb2.WatchJobsRequest(job_id=job_id), metadata=metadata
            )
            await call.read()  # the job itself comes first
            call.cancel()
        elif name == "SubmitJobStream":
            submits = jobs.SubmitJobStream(None, metadata=metadata)
            with contextlib.suppress(Exception):  # the call already ended: read() says why
                await submits.write(job_service_pb2.SubmitJobStreamRequest(job=image(tag=f"s{n}")))
            ack = await submits.read()
            submits.cancel()
            assert isinstance(ack, job_service_pb2.SubmitJobStreamResponse), ack
            assert ack.HasField("submitted"), ack
        elif name == "Connect":
            stream = scanners.Connect(None, metadata=metadata)
            scanner = RawScanner(scanners, f"matrix-{n}")
            with contextlib.suppress(Exception):  # the call already ended: read() says why
                await stream.write(scanner_service_pb2.ConnectRequest(register=scanner.register))
            reply = await stream.read()
            stream.cancel()
            assert isinstance(reply, scanner_service_pb2.ConnectResponse), reply
            assert reply.WhichOneof("message") == "registered", reply
        elif name in requests:
            stub = jobs if service.endswith("JobService") else scanners
            await getattr(stub, name)(requests[name], metadata=metadata, timeout=DEADLINE)
        elif not method.client_streaming and not method.server_streaming:
            generic = channel.unary_unary(
                f"/{service}/{name}", request_serializer=None, response_deserializer=None
            )
            await generic(b"", metadata=metadata, timeout=DEADLINE)
        else:
            pytest.fail(f"the role matrix needs a request for the new streaming RPC {name}")
    except grpc.RpcError as exc:
        error = read_rpc_error(exc)
        return error
    return None


async def test_role_matrix_every_rpc_times_every_role(
    make_handler: MakeHandler, token_file: Path
) -> None:
    handler = await make_handler(token_file=str(token_file))
    admin = md(TOKENS["admin"])
    job_id = (await handler.jobs.SubmitJob(image(), metadata=admin)).job.id
    holders: dict[str, Any] = {role: md(TOKENS[role]) for role in ROLES}
    holders["no token"] = ()
    holders["unknown token"] = md("not-a-token-" + secrets.token_urlsafe(16))
    holders["malformed header"] = (("authorization", "Basic dXNlcjpwYXNz"),)
    seen = []
    n = 0
    for service, name, method in all_methods():
        for holder, metadata in holders.items():
            n += 1
            error = await attempt(handler.channel, service, method, metadata, job_id, n)
            if holder not in ROLES:
                expected = SC.UNAUTHENTICATED
            elif holder == "admin" or holder in ALLOWED.get(name, set()):
                expected = None
            else:
                expected = SC.PERMISSION_DENIED
            got = error.status if error is not None and error.status in AUTH_STATUSES else None
            seen.append((name, holder, got))
            assert got == expected, (name, holder, error)
            if error is not None and expected is not None:
                assert error.code == "HNDL-007", error  # ErrorInfo reason on the wire
                assert TOKENS.get(holder, "~") not in error.message
                if expected == SC.PERMISSION_DENIED:
                    assert f"token {holder!r}" in error.message
                    assert name in error.message
    assert {name for name, _, _ in seen} >= set(ALLOWED)


async def test_health_and_reflection_stay_open(make_handler: MakeHandler, token_file: Path) -> None:
    handler = await make_handler(token_file=str(token_file))
    assert await health_check(handler.channel) == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(handler.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    assert "imagehandler.v1.JobService" in {s.name for s in reply.list_services_response.service}
    error = await remote_error(handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest()))
    assert (error.code, error.status) == ("HNDL-007", SC.UNAUTHENTICATED)


async def test_reflection_can_be_switched_off(make_handler: MakeHandler, token_file: Path) -> None:
    handler = await make_handler(token_file=str(token_file), reflection=False)
    stub = reflection_pb2_grpc.ServerReflectionStub(handler.channel)
    error = await remote_error(stub.ServerReflectionInfo())
    assert error.status == SC.UNIMPLEMENTED
    assert await health_check(handler.channel) == health_pb2.HealthCheckResponse.SERVING


async def test_token_file_change_takes_effect_without_restart(
    make_handler: MakeHandler, tmp_path: Path
) -> None:
    """A Kubernetes Secret volume: the file is a symlink through ..data, which is swapped."""
    secret = tmp_path / "secret"
    secret.mkdir()

    def publish(version: int, entries: dict[str, tuple[str, str]]) -> None:
        target = secret / f"..v{version}"
        target.mkdir()
        write_tokens(target / "tokens", entries)
        link = secret / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, secret / "..data")

    publish(1, {"ci": ("submit", TOKENS["submit"])})
    (secret / "tokens").symlink_to("..data/tokens")
    handler = await make_handler(token_file=str(secret / "tokens"), token_reload_interval=0.0)
    stats = job_service_pb2.GetQueueStatsRequest()
    new_token = "rotated-" + secrets.token_urlsafe(24)

    error = await remote_error(handler.jobs.GetQueueStats(stats, metadata=md(TOKENS["submit"])))
    assert error.status == SC.PERMISSION_DENIED
    assert (
        await remote_error(handler.jobs.GetQueueStats(stats, metadata=md(new_token)))
    ).status == (SC.UNAUTHENTICATED)

    # Rotation: the old token is gone, a new one has read and submit.
    publish(2, {"ci": ("submit,read", new_token)})
    await handler.jobs.GetQueueStats(stats, metadata=md(new_token))
    error = await remote_error(handler.jobs.SubmitJob(image(), metadata=md(TOKENS["submit"])))
    assert error.status == SC.UNAUTHENTICATED
    await handler.jobs.SubmitJob(image(), metadata=md(new_token))

    # A broken file keeps the tokens that were in force.
    publish(3, {})
    (secret / "..v3" / "tokens").write_text("ci submit sha256:not-a-hash\n")
    await handler.jobs.GetQueueStats(stats, metadata=md(new_token))
    assert handler.server.security.tokens is not None
    assert handler.server.security.tokens.reloads == 1


async def test_token_file_without_the_file_stops_the_start(
    make_handler: MakeHandler, tmp_path: Path
) -> None:
    from imagehandler.errors import HandlerError

    with pytest.raises(HandlerError) as refused:
        await make_handler(token_file=str(tmp_path / "missing"))
    assert refused.value.code == "HNDL-003"
    assert "--token-file" in refused.value.message


async def test_scanner_with_a_token(make_handler: MakeHandler, token_file: Path) -> None:
    handler = await make_handler(token_file=str(token_file))
    async with RawScanner(TokenStub(handler.channel, TOKENS["scanner"]), "tok-scanner") as scanner:
        await scanner.start()
        job_id = (await handler.jobs.SubmitJob(image(), metadata=md(TOKENS["submit"]))).job.id
        [assigned] = await scanner.assigned()
        assert assigned.job_id == job_id
        await scanner.finish(assigned)
    # A read token may not pose as a scanner.
    async with RawScanner(TokenStub(handler.channel, TOKENS["read"]), "reader") as reader:
        with pytest.raises(grpc.RpcError) as refused:
            await reader.connect()
        error = read_rpc_error(refused.value)
        assert (error.code, error.status) == ("HNDL-007", SC.PERMISSION_DENIED)


# ----- limits -----------------------------------------------------------------------------


async def test_submit_rate_limit_per_client(make_handler: MakeHandler, token_file: Path) -> None:
    write_tokens(
        token_file,
        {"a": ("submit", TOKENS["submit"]), "b": ("submit,read", TOKENS["read-2"])},
    )
    # 0.5 jobs/s refills one job in 2 s: the calls below take far less.
    handler = await make_handler(
        token_file=str(token_file), submit_rate=0.5, submit_burst=3, storage="memory"
    )
    a, b = md(TOKENS["submit"]), md(TOKENS["read-2"])
    for n in range(3):
        await handler.jobs.SubmitJob(image(tag=f"r{n}"), metadata=a)
    error = await remote_error(handler.jobs.SubmitJob(image(tag="r4"), metadata=a))
    assert (error.code, error.status) == ("HNDL-007", SC.RESOURCE_EXHAUSTED)
    assert "submit rate limit of 0.5 jobs/s (burst 3) for token 'a'" in error.message
    # Another client has its own bucket; a batch counts its jobs.
    batch = job_service_pb2.SubmitJobsRequest(jobs=[image(tag=f"x{n}") for n in range(3)])
    await handler.jobs.SubmitJobs(batch, metadata=b)
    error = await remote_error(handler.jobs.SubmitJob(image(tag="x9"), metadata=b))
    assert error.status == SC.RESOURCE_EXHAUSTED
    big = job_service_pb2.SubmitJobsRequest(jobs=[image(tag=f"y{n}") for n in range(4)])
    error = await remote_error(handler.jobs.SubmitJobs(big, metadata=b))
    assert "more than the submit burst of 3 jobs (--submit-burst)" in error.message


async def test_rate_limit_without_tokens_counts_per_address(make_handler: MakeHandler) -> None:
    handler = await make_handler(submit_rate=0.5, submit_burst=1, storage="memory")
    await handler.jobs.SubmitJob(image())
    error = await remote_error(handler.jobs.SubmitJob(image(tag="2")))
    assert (error.code, error.status) == ("HNDL-007", SC.RESOURCE_EXHAUSTED)
    assert "for address 127.0.0.1" in error.message


async def test_message_size_limits(make_handler: MakeHandler) -> None:
    max_send = 64 * 1024 + 1024 * 1024  # the least allowed with a 64 KiB receive limit
    handler = await make_handler(
        max_receive_bytes=64 * 1024, max_send_bytes=max_send, storage="memory"
    )
    options = [("grpc.max_send_message_length", -1)]
    channel = aio.insecure_channel(handler.address, options=options)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)

    def sbom_job(size: int, n: int = 0) -> job_service_pb2.SubmitJobRequest:
        artifact = common_pb2.ArtifactObject(sbom=b"{" * size, path=f"/a/{n}")
        return job_service_pb2.SubmitJobRequest(object=common_pb2.ScanObject(artifact=artifact))

    try:
        for n in range(40):
            await jobs.SubmitJob(sbom_job(32 * 1024, n))
        error = await remote_error(jobs.SubmitJob(sbom_job(100 * 1024)))
        assert (error.code, error.status) == ("HNDL-007", SC.RESOURCE_EXHAUSTED)
        assert "the limit is 65536 bytes (--max-receive-bytes)" in error.message
        # Past twice the limit gRPC itself cuts the message before it is read (no HNDL code).
        error = await remote_error(jobs.SubmitJob(sbom_job(200 * 1024)))
        assert (error.code, error.status) == ("", SC.RESOURCE_EXHAUSTED)
        # A response over --max-send-bytes: 40 jobs with their 32 KiB SBOMs.
        listed = await remote_error(jobs.ListJobs(job_service_pb2.ListJobsRequest()))
        assert (listed.code, listed.status) == ("HNDL-007", SC.RESOURCE_EXHAUSTED)
        assert f"the limit is {max_send} bytes (--max-send-bytes)" in listed.message
        page = await jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=10))
        assert len(page.jobs) == 10
        assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close(None)


async def test_result_over_the_limit_fails_the_job(make_handler: MakeHandler) -> None:
    handler = await make_handler(max_result_bytes=4096, storage="memory")
    async with RawScanner(handler.scanners, "big") as scanner:
        await scanner.start()
        job_id = (await handler.jobs.SubmitJob(image())).job.id
        [assigned] = await scanner.assigned()
        findings = [
            common_pb2.Vulnerability(
                id=f"CVE-2024-{n:04}", package="p" * 50, severity=common_pb2.SEVERITY_LOW
            )
            for n in range(200)
        ]
        await scanner.finish(assigned, vulnerabilities=findings)
        rejected = await scanner.expect("rejected")
        assert (rejected.job_id, rejected.error.code) == (job_id, "HNDL-007")
        assert "--max-result-bytes" in rejected.error.message
    job = await wait_for_status(handler.jobs, job_id, common_pb2.JOB_STATUS_ERROR)
    assert job.error.code == "HNDL-007"
    assert job.runs == 1  # permanent: not run again


async def test_label_and_string_caps_are_configurable(make_handler: MakeHandler) -> None:
    handler = await make_handler(max_labels=2, max_string_length=300, storage="memory")
    error = await remote_error(handler.jobs.SubmitJob(image(labels={"a": "1", "b": "2", "c": "3"})))
    assert (error.code, error.status) == ("HNDL-005", SC.INVALID_ARGUMENT)
    assert "3 labels; at most 2 are allowed (--max-labels)" in error.message
    long_path = job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path="/" + "a" * 300))
    )
    error = await remote_error(handler.jobs.SubmitJob(long_path))
    assert error.code == "HNDL-005"
    assert "the limit is 300" in error.message
    await handler.jobs.SubmitJob(image(labels={"a": "1", "b": "2"}))


async def test_streams_per_client_are_limited(make_handler: MakeHandler, token_file: Path) -> None:
    write_tokens(
        token_file,
        {"greedy": ("read", TOKENS["read"]), "other": ("read", TOKENS["read-2"])},
    )
    handler = await make_handler(token_file=str(token_file), max_streams_per_client=3)
    greedy, other = md(TOKENS["read"]), md(TOKENS["read-2"])
    request = job_service_pb2.WatchJobsRequest()
    opened = []
    for _ in range(3):
        call = handler.jobs.WatchJobs(request, metadata=greedy)
        await asyncio.wait_for(call.initial_metadata(), DEADLINE)
        opened.append(call)
    error = await remote_error(handler.jobs.WatchJobs(request, metadata=greedy))
    assert (error.code, error.status) == ("HNDL-007", SC.RESOURCE_EXHAUSTED)
    assert "token 'greedy' has 3 streams open; the limit is 3" in error.message
    # Another client is not affected, and unary calls go on.
    call = handler.jobs.WatchJobs(request, metadata=other)
    await asyncio.wait_for(call.initial_metadata(), DEADLINE)
    call.cancel()
    await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest(), metadata=greedy)
    # Closing a stream frees its place.
    opened.pop().cancel()
    async with asyncio.timeout(DEADLINE):
        while True:
            call = handler.jobs.WatchJobs(request, metadata=greedy)
            try:
                await call.initial_metadata()
                if not call.done():
                    opened.append(call)
                    break
            except grpc.RpcError:
                pass
            await call.code()
            await asyncio.sleep(0.01)  # the server releases the slot when the stream ends
    for call in opened:
        call.cancel()


async def test_slow_and_greedy_clients_do_not_starve_others(
    make_handler: MakeHandler, token_file: Path
) -> None:
    """Slow-loris connections (the HTTP/2 preface a byte at a time, never finished), a scanner
    stream that never registers, watchers that never read and a client past its stream limit,
    while a normal client and a scanner get 20 jobs done."""
    write_tokens(
        token_file,
        {
            "greedy": ("admin", TOKENS["admin"]),
            "ci": ("submit,read", TOKENS["submit"]),
            "worker": ("scanner", TOKENS["scanner"]),
        },
    )
    handler = await make_handler(
        token_file=str(token_file), max_streams_per_client=40, handshake_timeout=1.0
    )
    host, port = handler.address.rsplit(":", 1)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    sockets = [socket.create_connection((host, int(port))) for _ in range(30)]

    async def dribble() -> None:
        for index in range(len(preface) - 1):  # never the whole preface
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(preface[index : index + 1])
            await asyncio.sleep(0.02)  # slow-loris pacing, not a wait for state

    dribbling = asyncio.create_task(dribble())
    greedy = md(TOKENS["admin"])
    silent = handler.scanners.Connect(None, metadata=greedy)
    watchers = [
        handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(), metadata=greedy)
        for _ in range(45)
    ]
    ci = md(TOKENS["submit"])
    try:
        # 46 streams against a limit of 40: six are refused with HNDL-007.
        async with asyncio.timeout(DEADLINE):
            while True:
                ended = [w for w in [silent, *watchers] if w.done()]
                codes = [await w.code() for w in ended]
                if codes.count(SC.RESOURCE_EXHAUSTED) >= 6:
                    break
                await asyncio.sleep(0.01)  # polling the calls' state with a deadline
        assert codes.count(SC.RESOURCE_EXHAUSTED) == 6
        async with RawScanner(
            TokenStub(handler.channel, TOKENS["scanner"]), "worker", slots=4
        ) as scanner:
            await scanner.start()
            ids = {
                (await handler.jobs.SubmitJob(image(tag=f"t{n}"), metadata=ci)).job.id
                for n in range(20)
            }
            done: set[str] = set()
            async with asyncio.timeout(DEADLINE):
                while done != ids:
                    for job in await scanner.assigned():
                        await scanner.finish(job)
                        done.add(job.job_id)
            for job_id in ids:
                reply = await handler.jobs.GetJob(
                    job_service_pb2.GetJobRequest(job_id=job_id), metadata=ci
                )
                assert reply.job.status in (
                    common_pb2.JOB_STATUS_PROCESSING_RESULTS,
                    common_pb2.JOB_STATUS_FINISHED,
                )
        assert await health_check(handler.channel) == health_pb2.HealthCheckResponse.SERVING
        # The handshake timeout closed every slow-loris connection.
        await dribbling
        closed = await asyncio.gather(*(asyncio.to_thread(closed_by_peer, s) for s in sockets))
        assert all(closed)
    finally:
        dribbling.cancel()
        for sock in sockets:
            sock.close()
        silent.cancel()
        for watcher in watchers:
            watcher.cancel()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` within the deadline (reading whatever it sends)."""
    sock.settimeout(DEADLINE)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True
