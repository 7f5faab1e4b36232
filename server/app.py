"""Building the handler's gRPC server apart from running it: tests bind port 0 and read back
the port; the CLI runs the same object until a signal arrives."""

from __future__ import annotations

import structlog
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagehandler.v1 import (
    job_service_pb2,
    job_service_pb2_grpc,
    scanner_service_pb2,
    scanner_service_pb2_grpc,
)
from server.config import Config
from server.errors import Catalogue, HandlerError
from server.job_manager import JobManager
from server.transport.job_service import JobService
from server.transport.scanner_service import ScannerService

log = structlog.get_logger("imagehandler")

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
SCANNER_SERVICE = scanner_service_pb2.DESCRIPTOR.services_by_name["ScannerService"].full_name
SERVICES = (JOB_SERVICE, SCANNER_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HandlerServer:
    """The gRPC server, the job manager behind it and the health service."""

    def __init__(self, config: Config) -> None:
        config.check()
        self.config = config
        self.manager = JobManager(config)
        # grpc_health re-exports its asyncio servicer as health.aio without declaring it.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.server = aio.server(
            options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ]
        )
        job_service_pb2_grpc.add_JobServiceServicer_to_server(JobService(self.manager), self.server)
        scanner_service_pb2_grpc.add_ScannerServiceServicer_to_server(
            ScannerService(self.manager), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            reflection.enable_server_reflection(
                (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        self.port = self.server.add_insecure_port(config.listen)
        if self.port == 0:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"cannot listen on {config.listen}: address in use or invalid",
            )
        host = config.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        await self._set_health(NOT_SERVING)
        self.manager.start()
        await self.server.start()
        await self._set_health(SERVING)
        log.info("handler.started", address=self.address, data_dir=str(self.config.data_dir))

    async def stop(self, grace: float | None = None) -> None:
        """Readiness goes NOT_SERVING first so Kubernetes stops routing, then the server stops."""
        await self._set_health(NOT_SERVING)
        self.manager.accepting_submits = False
        self.manager.close_sessions("the handler is shutting down; reconnect")
        await self.server.stop(grace)
        await self.manager.stop()
        log.info("handler.stopped", address=self.address)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        await self.health.set("", status)
        for service in SERVICES:
            await self.health.set(service, status)


async def create_server(config: Config) -> HandlerServer:
    """A started handler; ``.port`` is the bound port (use listen ':0' in tests)."""
    server = HandlerServer(config)
    await server.start()
    return server
