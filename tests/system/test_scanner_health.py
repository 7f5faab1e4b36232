"""``image-scanner --health-listen``: the scanner's liveness and readiness probes over real gRPC.

Readiness (``imagehandler.v1.ScannerService``) follows the Connect stream: SERVING while
registered. Liveness (``""``) says the client's session machinery is moving: a handler that is
down does not fail it (the client keeps trying), a client that has stopped trying does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scanner_client import ClientConfig, NoopEngine, ScannerClient
from scanner_client.health import STREAM_SERVICE, ScannerHealth, start_health_server
from tests.conftest import Handler, MakeHandler

DEADLINE = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(port: int, service: str) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


@pytest.fixture
async def scanner(handler: Handler) -> AsyncIterator[tuple[ScannerClient, int]]:
    client = ScannerClient(
        handler.address,
        NoopEngine(),
        ClientConfig(scanner_id="probed", backoff_initial=0.01, backoff_max=0.1),
    )
    server, port = await start_health_server(client, "127.0.0.1:0")
    yield client, port
    await client.stop()
    await server.stop(0)


async def test_readiness_follows_the_stream_and_liveness_survives_a_handler_outage(
    scanner: tuple[ScannerClient, int], handler: Handler
) -> None:
    client, port = scanner
    # Not yet connected: alive (just started), not ready.
    assert await check(port, "") == SERVING
    assert await check(port, STREAM_SERVICE) == NOT_SERVING
    task = asyncio.create_task(client.run())
    async with asyncio.timeout(DEADLINE):
        await client.registered.wait()
    assert await check(port, STREAM_SERVICE) == SERVING
    assert await check(port, "") == SERVING

    # The handler goes away: the stream breaks, the scanner is not ready, and stays alive
    # because it keeps trying to connect.
    await handler.server.stop(0)
    async with asyncio.timeout(DEADLINE):
        await client.wait_for(lambda stats: stats.disconnects >= 1 and stats.connect_attempts >= 3)
    assert await check(port, STREAM_SERVICE) == NOT_SERVING
    assert await check(port, "") == SERVING
    await client.stop()
    await task


async def test_a_client_that_stopped_moving_is_not_alive(
    scanner: tuple[ScannerClient, int],
) -> None:
    client, port = scanner
    health = ScannerHealth(client)
    # backoff 0.1 + registration 10 + heartbeat timeout 15 + slack 5
    assert health.stall_after() == pytest.approx(30.1)
    assert health.alive()
    # The last connect attempt or message from the handler is older than that bound.
    client.last_activity = time.monotonic() - health.stall_after() - 1
    assert not health.alive()
    assert await check(port, "") == NOT_SERVING


async def test_an_unknown_service_is_not_found(scanner: tuple[ScannerClient, int]) -> None:
    _, port = scanner
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(port, "imagehandler.v1.JobService")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert STREAM_SERVICE in (caught.value.details() or "")


async def test_the_cli_serves_the_probes_and_drains_on_sigterm(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scanner_client.cli",
        "--handler",
        handler.address,
        "--health-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--scanner-id",
        "cli-probed",
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    port = 0
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                line = await process.stderr.readline()
                assert line, "the scanner exited before it served health"
                event = json.loads(line)
                if event.get("event") == "health listening":
                    port = event["port"]
                if event.get("event") == "registered":
                    break
        assert port
        assert await check(port, STREAM_SERVICE) == SERVING
        assert await check(port, "") == SERVING
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_a_bad_health_address_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scanner_client.cli", "--health-listen", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--health-listen" in result.stderr
    assert "'nowhere' is not HOST:PORT" in result.stderr
