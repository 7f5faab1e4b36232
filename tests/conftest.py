"""Fixtures: a real handler on a free port, real gRPC channels, no fakes of our own server.

``handler`` runs the server in the test's own event loop (pytest-asyncio); tests drive it with
aio stubs. For plain synchronous tests, pytest-grpc's ``grpc_channel`` / ``grpc_stub`` fixtures
are pointed at a real handler running on a background loop: its ``grpc_addr`` is replaced (the
plugin's version leaves a socket open) and its ``grpc_server`` is the real handler, not the
plugin's thread-pool server, which cannot host asyncio servicers.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from grpc import aio

from imagehandler.v1 import job_service_pb2_grpc, scanner_service_pb2_grpc
from scanner_client.job_policy import ScannerPolicy
from server.app import HandlerServer
from server.config import Config
from server.observability import logs

# The receiving-server fixtures (``receiver``, ``secret_file``) for every test module.
pytest_plugins = ["tests.receiver"]

# The job policy refuses internal addresses, filesystem paths and artifact URLs by default; the
# tests' jobs name registries and servers on loopback, node roots such as /host and files in
# temporary directories, so these are the tests' own explicit allowances (the job policy's
# tests, tests/test_job_policy_e2e.py, start from the defaults).
TEST_JOB_POLICY: dict[str, Any] = {
    "allowed_registries": "*,*:*",
    "allowed_artifact_urls": "http://127.0.0.1:*/",
    "allowed_networks": "127.0.0.0/8",
    "artifact_roots": f"{tempfile.gettempdir()},/a",
    "node_roots": f"{tempfile.gettempdir()},/host,/h",
}

# The same allowances for the scanners the tests run in-process (BuiltinEngine, CommandEngine).
TEST_SCANNER_POLICY = ScannerPolicy.parse(**TEST_JOB_POLICY)
# ... and as image-scanner flags, for the tests that run it as a process.
TEST_SCANNER_FLAGS = [
    part for key, value in TEST_JOB_POLICY.items() for part in ("--" + key.replace("_", "-"), value)
]

TEST_CONFIG = Config(
    listen="127.0.0.1:0",
    heartbeat_interval=0.2,
    heartbeat_timeout=1.5,
    result_wait=30.0,
    log_format="json",
    log_level="warning",
    **TEST_JOB_POLICY,
)

logs.configure("json", "warning")


@dataclass
class Handler:
    server: HandlerServer
    channel: aio.Channel
    jobs: job_service_pb2_grpc.JobServiceAsyncStub
    scanners: scanner_service_pb2_grpc.ScannerServiceAsyncStub

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def config(self) -> Config:
        return self.server.config


MakeHandler = Callable[..., Awaitable[Handler]]


@pytest.fixture
async def make_handler(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MakeHandler]:
    """Start handlers with Config overrides: ``await make_handler(max_runs=2)``. Each gets its
    own data directory unless ``data_dir`` is given."""
    started: list[Handler] = []

    async def start(**overrides: Any) -> Handler:
        overrides.setdefault("data_dir", tmp_path_factory.mktemp("data"))
        server = HandlerServer(replace(TEST_CONFIG, **overrides))
        await server.start()
        channel = aio.insecure_channel(server.address)
        handler = Handler(
            server,
            channel,
            job_service_pb2_grpc.JobServiceStub(channel),
            scanner_service_pb2_grpc.ScannerServiceStub(channel),
        )
        started.append(handler)
        return handler

    yield start
    for handler in started:
        await handler.channel.close(None)
        await handler.server.stop(0)


@pytest.fixture
async def handler(make_handler: MakeHandler) -> Handler:
    return await make_handler()


class BackgroundHandler:
    """A real handler on its own loop in a thread, for synchronous clients."""

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: HandlerServer = self._run(self._start(config))

    async def _start(self, config: Config) -> HandlerServer:
        server = HandlerServer(config)
        await server.start()
        return server

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def background_handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundHandler]:
    handler = BackgroundHandler(replace(TEST_CONFIG, data_dir=tmp_path_factory.mktemp("data")))
    yield handler
    handler.stop()


@pytest.fixture(scope="module")
def grpc_addr(background_handler: BackgroundHandler) -> str:
    """Overrides pytest-grpc's fixture, which leaves its probe socket open."""
    return background_handler.server.address


@pytest.fixture(scope="module")
def grpc_server(background_handler: BackgroundHandler) -> HandlerServer:
    """Overrides pytest-grpc's server with the real handler."""
    return background_handler.server
