"""A job is untrusted input (issue 19): every way a submitter could aim a scanner at an
internal address, a local file or another team's credentials, tried through the real handler
and a real builtin-engine scanner, is refused with HNDL-005 naming the rule, while a listener
in the target's place counts the connections that reach it: none.

The handler starts from the production defaults here (the other tests' allowances,
tests/conftest.py's TEST_JOB_POLICY, are taken back), and each test opens exactly what it
needs. A control test shows the listener does see a scanner that is allowed through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagehandler.channel import bearer_metadata
from imagehandler.jobpolicy import EgressPolicy, Refused
from imagehandler.jobpolicy.addresses import address_class, literal_address
from imagehandler.v1 import common_pb2, job_service_pb2
from scanner_client import ScannerClient
from scanner_client.egress import EgressGuard, guarded_client
from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings
from scanner_client.job_policy import ScannerPolicy
from server.config import Config
from server.job_policy import SubmitPolicy
from server.security.tokens import file_line
from tests.conftest import TEST_JOB_POLICY, Handler, MakeHandler
from tests.engine.test_engine_e2e import DONE, client_config, running
from tests.helpers import RawScanner, remote_error
from tests.integration.test_scanner_client_protocol import Spawn, spawn  # noqa: F401 (fixture)
from tests.integration.test_security import TokenStub

DEADLINE = 20.0
ROOT = Path(__file__).resolve().parent.parent
# The production defaults of the job policy's settings.
DEFAULTS = {name: getattr(Config(), name) for name in TEST_JOB_POLICY}
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


# ---- what stands in for the targets ----------------------------------------------------------


@dataclass
class Listener:
    """A TCP server in the target's place: counts connections, keeps what each sent first,
    and answers 404 (so an allowed scan ends at once, permanently)."""

    host: str = "127.0.0.1"
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> Listener:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Hostile:
    """An HTTP server a submitter controls (allowed on its own), which sends the scanner on:
    a redirect, or a token realm, pointing at ``target``."""

    target: str
    # "redirect", "realm", or "basic-redirect" (asks for Basic credentials, then redirects)
    mode: str
    host: str = "127.0.0.2"
    server: asyncio.Server | None = None
    served: int = 0
    saw_credentials: bool = False

    async def start(self) -> Hostile:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        return self

    @property
    def netloc(self) -> str:
        assert self.server is not None
        return f"{self.host}:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.served += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            request = await reader.readuntil(b"\r\n\r\n")
            self.saw_credentials |= b"\r\nauthorization: basic " in request.lower()
            if self.mode == "basic-redirect" and not self.saw_credentials:
                head = 'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="r"\r\n'
            elif self.mode in ("redirect", "basic-redirect"):
                head = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {self.target}\r\n"
            else:
                head = (
                    "HTTP/1.1 401 Unauthorized\r\n"
                    f'WWW-Authenticate: Bearer realm="{self.target}",service="x"\r\n'
                )
            writer.write(head.encode() + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    started = await Listener().start()
    yield started
    await started.stop()


# ---- the handler and the scanner -------------------------------------------------------------


async def strict_handler(make_handler: MakeHandler, **policy: Any) -> Handler:
    """A handler with the job policy's production defaults, plus ``policy``."""
    return await make_handler(**{**DEFAULTS, **policy})


def engine(tmp_path: Path, handler: Handler, **policy: Any) -> BuiltinEngine:
    """A builtin engine with the scanner's production defaults, plus ``policy``."""
    credentials = policy.pop("credentials_file", None)
    return BuiltinEngine(
        BuiltinSettings(
            scratch_dir=tmp_path,
            credentials_file=credentials,
            policy=ScannerPolicy.parse(handler=handler.address, **policy),
        )
    )


def image_at(registry: str, **fields: Any) -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(
            image=common_pb2.ImageObject(registry=registry, repository="x/y", tag="1", **fields)
        )
    )


def artifact(**fields: Any) -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(pipeline="p", **fields))
    )


def node(root: str) -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(node=common_pb2.NodeObject(node_name="n1", root_path=root))
    )


async def refused_by_scanner(
    handler: Handler, request: job_service_pb2.SubmitJobRequest, metadata: Any = None
) -> common_pb2.Job:
    """Submit (the handler takes it) and watch the job to its end."""
    response = await handler.jobs.SubmitJob(request, metadata=metadata)
    call = handler.jobs.WatchJobs(
        job_service_pb2.WatchJobsRequest(job_id=response.job.id), metadata=metadata
    )
    try:
        async with asyncio.timeout(DEADLINE):
            async for event in call:
                if event.job.status in DONE:
                    return event.job
    finally:
        call.cancel()
    raise AssertionError("the watch ended first")


def assert_refused(job: common_pb2.Job, *rules: str) -> None:
    assert job.status == common_pb2.JOB_STATUS_ERROR, job
    assert job.error.code == "HNDL-005", job.error
    assert any(f"(rule {rule})" in job.error.message for rule in rules), job.error.message
    assert job.runs == 1  # permanent: never tried again


# ---- the attacks, refused at submit ----------------------------------------------------------


SUBMIT_ATTACKS: list[tuple[str, dict[str, Any], Callable[[Listener, Handler], Any], str]] = [
    # ihctl submit artifact --url http://127.0.0.1:PORT/internal/secret-api
    (
        "an artifact URL on an internal service",
        {},
        lambda t, h: artifact(url=f"http://{t.netloc}/internal/secret-api"),
        "allowed-artifact-urls",
    ),
    (
        "... even under an allowed prefix",
        {"allowed_artifact_urls": "http://127.0.0.1:*/"},
        lambda t, h: artifact(url=f"http://{t.netloc}/internal/secret-api"),
        "loopback",
    ),
    (
        "... spelled as a decimal address",
        {"allowed_artifact_urls": "http://*:*/"},
        lambda t, h: artifact(url=f"http://2130706433:{t.port}/internal/secret-api"),
        "loopback",
    ),
    (
        "... with the allowed host as user information",
        {"allowed_artifact_urls": "http://artifacts.example.com/"},
        lambda t, h: artifact(url=f"http://artifacts.example.com@{t.netloc}/x"),
        "url",
    ),
    # ihctl submit image --registry 127.0.0.1:PORT --repository x/y --tag 1
    ("a registry on an internal port", {}, lambda t, h: image_at(t.netloc), "allowed-registries"),
    (
        "... when every registry name is allowed",
        {"allowed_registries": "*,*:*"},
        lambda t, h: image_at(t.netloc),
        "loopback",
    ),
    ("cloud metadata", {}, lambda t, h: image_at("169.254.169.254"), "link-local"),
    (
        "the handler itself",
        {"allowed_registries": "*:*", "allowed_networks": "127.0.0.0/8"},
        lambda t, h: image_at(h.address),
        "handler",
    ),
    (
        "a proxy on an internal port",
        {},
        lambda t, h: image_at("ghcr.io", proxy_url=f"http://{t.netloc}"),
        "loopback",
    ),
    # ihctl submit artifact --path /some/dir, and a node job with any root_path
    ("a path on the scanner", {}, lambda t, h: artifact(path="/etc"), "artifact-roots"),
    ("a node root", {}, lambda t, h: node("/"), "node-roots"),
    (
        "a path out of an allowed root",
        {"artifact_roots": "/srv/artifacts"},
        lambda t, h: artifact(path="/srv/artifacts/../../etc/shadow"),
        "artifact-roots",
    ),
    (
        "a credential nobody granted",
        {},
        lambda t, h: image_at("ghcr.io", credentials_ref="team-a-pull"),
        "credential-grants",
    ),
]


@pytest.mark.parametrize(
    ("policy", "request_for", "rule"),
    [attack[1:] for attack in SUBMIT_ATTACKS],
    ids=[attack[0] for attack in SUBMIT_ATTACKS],
)
async def test_the_handler_refuses_each_attack_at_submit(
    make_handler: MakeHandler,
    listener: Listener,
    tmp_path: Path,
    policy: dict[str, Any],
    request_for: Callable[[Listener, Handler], Any],
    rule: str,
) -> None:
    handler = await strict_handler(make_handler, **policy)
    # A scanner that would go anywhere stands ready: nothing refused may reach it.
    permissive = engine(tmp_path, handler, allowed_registries="*:*", allowed_networks="127.0.0.0/8")
    async with running(ScannerClient(handler.address, permissive, client_config("ready"))):
        error = await remote_error(handler.jobs.SubmitJob(request_for(listener, handler)))
        stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
    assert error.code == "HNDL-005"
    assert f"(rule {rule})" in error.message, error.message
    assert "refused by the job policy" in error.message
    assert stats.pending == 0
    assert stats.in_progress == 0
    assert listener.connections == 0


async def test_with_explicit_allowances_the_same_job_reaches_the_target(
    make_handler: MakeHandler, listener: Listener, tmp_path: Path
) -> None:
    """The control: the listener does count a scanner that both policies let through."""
    allow = {"allowed_artifact_urls": "http://127.0.0.1:*/", "allowed_networks": "127.0.0.1/32"}
    handler = await strict_handler(make_handler, **allow)
    scanner = engine(tmp_path, handler, **allow)
    async with running(ScannerClient(handler.address, scanner, client_config("allowed"))):
        job = await refused_by_scanner(
            handler, artifact(url=f"http://{listener.netloc}/internal/secret-api")
        )
    assert listener.connections == 1
    assert listener.requests[0].startswith(b"GET /internal/secret-api HTTP/1.1")
    assert job.error.code == "HNDL-006"  # the 404 the listener answers: not found


# ---- the scanner's own view wins ---------------------------------------------------------


async def test_the_scanner_refuses_what_its_own_policy_does_not_allow(
    make_handler: MakeHandler, listener: Listener, tmp_path: Path
) -> None:
    """A handler configured too widely (or an older one): the scanner, with the defaults,
    refuses before it connects."""
    handler = await strict_handler(
        make_handler,
        allowed_registries="*:*",
        allowed_artifact_urls="http://127.0.0.1:*/",
        allowed_networks="127.0.0.0/8",
    )
    async with running(
        ScannerClient(handler.address, engine(tmp_path, handler), client_config("strict"))
    ):
        by_url = await refused_by_scanner(
            handler, artifact(url=f"http://{listener.netloc}/internal/secret-api")
        )
        by_registry = await refused_by_scanner(handler, image_at(listener.netloc))
    assert_refused(by_url, "allowed-artifact-urls")
    assert_refused(by_registry, "allowed-registries")
    assert listener.connections == 0


@pytest.mark.parametrize(
    ("kind", "mode", "rule"),
    [
        ("registry", "redirect", "loopback"),
        ("artifact", "redirect", "loopback"),
        ("registry", "realm", "token-realm"),
    ],
)
async def test_redirects_and_token_realms_are_checked_before_connecting(
    make_handler: MakeHandler, listener: Listener, tmp_path: Path, kind: str, mode: str, rule: str
) -> None:
    """A server the policy allows (on 127.0.0.2, allowed by address) sends the scanner on to
    the listener (127.0.0.1, not allowed): by a redirect, or by naming it as its token realm."""
    target = f"http://{listener.netloc}/internal/secret-api"
    hostile = await Hostile(target, mode).start()
    try:
        allow = {
            "allowed_registries": hostile.netloc,
            "allowed_artifact_urls": f"http://{hostile.netloc}/",
            "allowed_networks": "127.0.0.2/32",
        }
        handler = await strict_handler(make_handler, **allow)
        scanner = engine(tmp_path, handler, **allow)
        request = (
            image_at(hostile.netloc)
            if kind == "registry"
            else artifact(url=f"http://{hostile.netloc}/build/1.tar")
        )
        async with running(ScannerClient(handler.address, scanner, client_config("hops"))):
            job = await refused_by_scanner(handler, request)
    finally:
        await hostile.stop()
    assert hostile.served >= 1  # the scanner did talk to the allowed server
    assert_refused(job, rule)
    assert listener.connections == 0


def _internal_hostname() -> str | None:
    """This machine's name, when it resolves to internal addresses only (loopback here and in
    most containers' /etc/hosts, or a private pod address)."""
    name = socket.gethostname()
    try:
        found = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    addresses = [literal_address(str(a).split("%")[0]) for a in found]
    if literal_address(name) is not None or name == "localhost":
        return None
    return name if all(a and address_class(a) for a in addresses) else None


async def test_a_hostname_that_resolves_to_an_internal_address_is_refused(
    make_handler: MakeHandler,
    spawn: Spawn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The name is allowed and is not an address, so the handler cannot tell; the scanner
    resolves it, sees an internal address, and does not connect. Through the image-scanner
    process and its flags."""
    name = _internal_hostname()
    if name is None:
        pytest.skip("this machine's name does not resolve to internal addresses only")
    listener = await Listener(host="0.0.0.0").start()  # whichever address the name has
    try:
        handler = await strict_handler(make_handler, allowed_registries=f"{name}:*")
        scanner = await spawn(
            "-m", "scanner_client.cli", "--handler", handler.address, "--engine", "builtin",
            "--scanner-id", "dns", "--log-format", "json", "--scratch-dir", str(tmp_path),
            "--allowed-registries", f"{name}:*",
        )  # fmt: skip
        await scanner.event("registered")
        job = await refused_by_scanner(handler, image_at(f"{name}:{listener.port}"))
    finally:
        await listener.stop()
    assert_refused(job, "loopback", "private", "link-local", "shared", "reserved")
    assert f"{name} resolves to" in job.error.message
    assert listener.connections == 0


async def test_a_symlink_out_of_an_allowed_root_is_refused(
    make_handler: MakeHandler, tmp_path: Path
) -> None:
    """Artifact paths and node roots are read only under the configured roots after every link
    is resolved: a link inside the root to a directory outside is refused, not followed."""
    allowed, secret = tmp_path / "artifacts", tmp_path / "elsewhere"
    allowed.mkdir()
    (secret / "etc").mkdir(parents=True)
    (secret / "malware.bin").write_bytes(EICAR)
    (allowed / "build").symlink_to(secret, target_is_directory=True)
    (allowed / "real").mkdir()
    (allowed / "real" / "malware.bin").write_bytes(EICAR)
    roots = {"artifact_roots": str(allowed), "node_roots": str(allowed)}
    handler = await strict_handler(make_handler, **roots)
    scanner = engine(tmp_path / "scratch", handler, **roots)
    async with running(ScannerClient(handler.address, scanner, client_config("roots"))):
        by_path = await refused_by_scanner(handler, artifact(path=str(allowed / "build")))
        by_node = await refused_by_scanner(handler, node(str(allowed / "build")))
        inside = await refused_by_scanner(handler, artifact(path=str(allowed / "real")))
    for job in (by_path, by_node):
        assert_refused(job, "artifact-roots" if job is by_path else "node-roots")
        assert "symbolic link" in job.error.message
        assert not job.HasField("result")
    # A real directory under the root is scanned (and its EICAR found).
    assert inside.status == common_pb2.JOB_STATUS_FINISHED, inside.error
    assert inside.result.malware == 1


# ---- credentials bound to callers ------------------------------------------------------------


async def test_credentials_are_bound_to_the_callers_and_registries_granted(
    make_handler: MakeHandler, listener: Listener, tmp_path: Path
) -> None:
    tokens = {"team-a": "tok-a-" + "a" * 20, "team-b": "tok-b-" + "b" * 20}
    scanner_token = "tok-scanner-" + "s" * 20
    token_file = tmp_path / "tokens"
    token_file.write_text(
        "".join(f"{file_line(n, ['submit', 'read'], t)}\n" for n, t in tokens.items())
        + file_line("scanners", ["scanner"], scanner_token)
        + "\n"
    )
    registry = listener.netloc
    grant = {"registries": [registry], "allowed": ["team-a"]}
    grants = tmp_path / "grants.json"
    grants.write_text(json.dumps({"team-a-pull": grant}))
    # The handler's grant is wider than the scanner's (an operator's mistake, or an old copy):
    # then the scanner's, which holds the secret, decides.
    wide = tmp_path / "wide-grants.json"
    wide.write_text(json.dumps({"team-a-pull": {**grant, "allowed": ["*"]}}))
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps({"team-a-pull": {"username": "a", "password": "a-secret", **grant}})
    )
    allow = {"allowed_registries": "*,127.0.0.1:*", "allowed_networks": "127.0.0.1/32"}

    def md(name: str) -> tuple[tuple[str, str], ...]:
        return tuple(bearer_metadata(tokens[name]))

    handler = await strict_handler(
        make_handler, token_file=str(token_file), credential_grants=str(grants), **allow
    )
    stolen = image_at(registry, credentials_ref="team-a-pull")
    error = await remote_error(handler.jobs.SubmitJob(stolen, metadata=md("team-b")))
    assert error.code == "HNDL-005"
    assert "team-a-pull' is not granted to token 'team-b'" in error.message
    other_registry = image_at("ghcr.io", credentials_ref="team-a-pull")
    error = await remote_error(handler.jobs.SubmitJob(other_registry, metadata=md("team-a")))
    assert "is not for registry 'ghcr.io'" in error.message
    assert listener.connections == 0

    lax = await strict_handler(
        make_handler, token_file=str(token_file), credential_grants=str(wide), **allow
    )
    scanner = engine(tmp_path, lax, credentials_file=credentials, **allow)
    client = ScannerClient(lax.address, scanner, client_config("creds"), token=scanner_token)
    async with running(client):
        taken = await refused_by_scanner(lax, stolen, metadata=md("team-b"))
        assert_refused(taken, "credential-grants")
        assert "not granted to token 'team-b'" in taken.error.message
        assert listener.connections == 0
        # The team it is granted to: the scanner goes to the registry (the listener answers
        # 404, so the pull ends there).
        own = await refused_by_scanner(lax, stolen, metadata=md("team-a"))
    assert own.error.code == "HNDL-006", own.error
    assert listener.connections == 1


async def test_who_submitted_a_job_survives_a_restart_and_goes_with_its_assignment(
    make_handler: MakeHandler, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(
        f"{file_line('team-a', ['submit', 'read'], 'tok-a-' + 'a' * 20)}\n"
        f"{file_line('scanners', ['scanner'], 'tok-s-' + 's' * 20)}\n"
    )
    settings = {"token_file": str(token_file), "node_roots": "/host"}
    handler = await strict_handler(make_handler, **settings)
    submitted = await handler.jobs.SubmitJob(
        node("/host"), metadata=bearer_metadata("tok-a-" + "a" * 20)
    )
    await handler.server.stop(0)
    restarted = await strict_handler(make_handler, data_dir=handler.config.data_dir, **settings)
    async with RawScanner(TokenStub(restarted.channel, "tok-s-" + "s" * 20), "s1") as scanner:
        await scanner.start()
        (assigned,) = await scanner.assigned()
    assert assigned.job_id == submitted.job.id
    assert assigned.submitter.token_name == "team-a"
    assert sorted(assigned.submitter.roles) == ["read", "submit"]


async def test_credentials_never_follow_a_redirect_to_another_host(
    make_handler: MakeHandler, listener: Listener, tmp_path: Path
) -> None:
    """A registry that takes the credentials and redirects (as registries do, to blob
    storage): the redirect is followed, the credentials are not sent along."""
    hostile = await Hostile(f"http://{listener.netloc}/blob", "basic-redirect").start()
    try:
        allow = {"allowed_registries": hostile.netloc, "allowed_networks": "127.0.0.0/8"}
        grant = {"registries": [hostile.netloc], "allowed": ["*"]}
        grants = tmp_path / "grants.json"
        grants.write_text(json.dumps({"pull": grant}))
        credentials = tmp_path / "credentials.json"
        credentials.write_text(json.dumps({"pull": {"username": "u", "password": "p", **grant}}))
        handler = await strict_handler(make_handler, credential_grants=str(grants), **allow)
        scanner = engine(tmp_path, handler, credentials_file=credentials, **allow)
        async with running(ScannerClient(handler.address, scanner, client_config("creds"))):
            job = await refused_by_scanner(
                handler, image_at(hostile.netloc, credentials_ref="pull")
            )
    finally:
        await hostile.stop()
    assert hostile.saw_credentials  # the registry got them
    assert listener.connections == 1  # the redirect was followed ...
    assert b"\r\nauthorization:" not in listener.requests[0].lower()  # ... without them
    assert job.error.code == "HNDL-006"  # the listener's 404


# ---- the guard on its own: one resolution, and the connection goes to what was checked ----------


async def test_connections_go_to_the_address_that_was_checked() -> None:
    """DNS rebinding: a name that resolves to an allowed address when checked and an internal
    one a moment later. The guard resolves once and connects to the address it checked, so
    the second answer is never used; TLS and the Host header still carry the name."""
    answers = [["127.0.0.2"], ["127.0.0.1"]]
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[min(len(asked), len(answers)) - 1]

    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    allowed = await asyncio.start_server(serve, "127.0.0.2", 0)
    port = allowed.sockets[0].getsockname()[1]
    internal = await Listener().start()
    try:
        guard = EgressGuard(EgressPolicy.parse(networks="127.0.0.2/32"), resolver=resolver)
        async with guarded_client(guard) as client:
            response = await client.get(f"http://rebinding.example:{port}/x")
        assert response.text == "ok"
        assert asked == ["rebinding.example"]
        assert seen[0].split(b"\r\n")[0] == b"GET /x HTTP/1.1"
        assert f"host: rebinding.example:{port}".encode() in seen[0].lower()
        # The next connection resolves again and gets the internal answer: refused, not made.
        async with guarded_client(guard) as client:
            with pytest.raises(Refused, match="rule loopback"):
                await client.get(f"http://rebinding.example:{internal.port}/x")
        assert internal.connections == 0
    finally:
        allowed.close()
        await allowed.wait_closed()
        await internal.stop()


async def test_a_name_with_any_internal_address_is_refused_whole() -> None:
    """A name that resolves to a public address and an internal one is refused: a client that
    falls back to the next address would otherwise reach the internal one."""

    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "169.254.169.254"]

    guard = EgressGuard(EgressPolicy(), resolver=resolver)
    with pytest.raises(Refused, match=r"rule link-local.*resolves to 169\.254\.169\.254"):
        await guard.addresses("mixed.example", 443, "a connection")


async def test_the_scanner_never_calls_its_handler(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    guard = EgressGuard(EgressPolicy.parse(networks="127.0.0.0/8"), handler.address)
    host, port = handler.address.rsplit(":", 1)
    with pytest.raises(Refused, match="rule handler"):
        await guard.addresses(host, int(port), "a connection")
    assert await guard.addresses(host, int(port) + 1, "a connection") == [host]


def test_bad_policy_settings_stop_the_handler_and_the_scanner(tmp_path: Path) -> None:
    import subprocess

    from imagehandler.errors import HandlerError

    with pytest.raises(HandlerError, match=r"HNDL-003.*--allowed-networks"):
        Config(allowed_networks="10.0.0.0/33").check()
    missing = str(tmp_path / "missing.json")
    with pytest.raises(HandlerError, match=r"HNDL-003.*--credential-grants .*missing\.json"):
        SubmitPolicy.from_config(Config(credential_grants=missing))
    done = subprocess.run(
        [sys.executable, "-m", "scanner_client.cli", "--engine", "builtin",
         "--node-roots", "host", "--scratch-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--node-roots: 'host' is not an absolute path" in done.stderr
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"ungranted": {"username": "u", "password": "p"}}))
    done = subprocess.run(
        [sys.executable, "-m", "scanner_client.cli", "--engine", "builtin",
         "--credentials-file", str(credentials), "--scratch-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "'ungranted' names no registries and allowed callers" in done.stderr
