"""``image-scanner --health-listen HOST:PORT``: grpc.health.v1 for the scanner's probes.

Kubernetes' native gRPC probes ask two questions, answered on the scanner's own event loop (so
an answer at all proves the loop runs; a loop that is blocked answers nothing and the probe
times out):

- ``""`` (liveness): the client's session machinery is moving. Each connect attempt and each
  message from the handler (the handler heartbeats every few seconds) marks it alive; a client
  that has done neither for longer than a reconnect wait, a registration and a heartbeat
  timeout together is wedged, and NOT_SERVING gets the container restarted. A handler that is
  merely down does not fail it: the client keeps trying, and each try counts.
- ``imagehandler.v1.ScannerService`` (readiness): the scanner is registered on a Connect stream
  now. A rollout waits for new scanners to register before it retires old ones.
"""

from __future__ import annotations

import time

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scanner_client.client import ScannerClient

STREAM_SERVICE = "imagehandler.v1.ScannerService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Beyond the configured waits: the loop's own scheduling and a slow registration answer.
_SLACK_SECONDS = 5.0


class ScannerHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The scanner's health, computed at each check from the client's own state."""

    def __init__(self, client: ScannerClient) -> None:
        self._client = client

    def stall_after(self) -> float:
        """Seconds without a connect attempt or a message after which the client is wedged:
        a reconnect wait, a registration answer and a heartbeat timeout, and some slack."""
        config = self._client.config
        registration = self._client.registration
        heartbeat_timeout = max(
            config.heartbeat_timeout, registration.heartbeat_timeout if registration else 0.0
        )
        return config.backoff_max + config.register_timeout + heartbeat_timeout + _SLACK_SECONDS

    def alive(self) -> bool:
        return time.monotonic() - self._client.last_activity <= self.stall_after()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[object, object]
    ) -> health_pb2.HealthCheckResponse:
        if request.service == "":
            status = SERVING if self.alive() else NOT_SERVING
        elif request.service == STREAM_SERVICE:
            status = SERVING if self._client.registered.is_set() else NOT_SERVING
        else:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {request.service[:200]!r}: ask '' (alive) or {STREAM_SERVICE!r}"
                " (registered on a Connect stream)",
            )
        return health_pb2.HealthCheckResponse(status=status)


async def start_health_server(client: ScannerClient, listen: str) -> tuple[aio.Server, int]:
    """A plaintext server with only the health service on ``listen``; it and its bound port."""
    server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(ScannerHealth(client), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise ValueError(f"cannot listen on --health-listen {listen}: address in use or invalid")
    await server.start()
    return server, port
