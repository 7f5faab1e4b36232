"""Building the handler's gRPC server apart from running it: tests bind port 0 and read back
the port; the CLI runs the same object until a signal arrives."""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import (
    job_service_pb2,
    scanner_service_pb2,
    scanner_service_pb2_grpc,
)
from server.adapters.receivers import open_receiver
from server.config import Config
from server.job_policy import SubmitPolicy
from server.observability.metrics import DELIVERIES_FAILED, JOURNAL_FSYNC_SECONDS, MetricsExporter
from server.security import Security
from server.service.delivery import Receiver
from server.service.handler import Handler
from server.storage.embedded import EmbeddedRepository
from server.storage.embedded.journal import FsyncPolicy
from server.storage.memory import MemoryRepository
from server.storage.repository import JobRepository
from server.transport.job_service import JobService
from server.transport.job_service import register as register_job_service
from server.transport.scanner_service import ScannerService
from server.validation import set_limits

log = structlog.get_logger("imagehandler")

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
SCANNER_SERVICE = scanner_service_pb2.DESCRIPTOR.services_by_name["ScannerService"].full_name
SERVICES = (JOB_SERVICE, SCANNER_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HandlerServer:
    """The gRPC server, the handler behind it and the health service."""

    def __init__(self, config: Config) -> None:
        config.check()
        self.config = config
        # TLS, tokens and limits (server/security/); a bad certificate or token file stops here.
        self.security = Security(config)
        set_limits(config.max_string_length, config.max_labels)
        self.repository = open_repository(config)
        self.handler = Handler(
            config,
            self.repository,
            receiver=self._receiver(config),
            on_delivery_failure=DELIVERIES_FAILED.inc,
        )
        # Prometheus text on --metrics-listen (none when empty); metrics_port is the bound port.
        self.metrics = (
            MetricsExporter(self.handler, config.metrics_listen, ssl=self.security.metrics_ssl())
            if config.metrics_listen
            else None
        )
        self.metrics_port = 0
        self._stopping = False
        # grpc_health re-exports its asyncio servicer as health.aio without declaring it.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.server = aio.server(
            interceptors=[self.security.interceptor],
            options=[*self.security.options, ("grpc.so_reuseport", 0)],
        )
        # The job policy; start() adds the handler's own endpoints once its ports are bound.
        self.job_service = JobService(self.handler, SubmitPolicy.from_config(config))
        register_job_service(self.server, self.job_service)
        scanner_service_pb2_grpc.add_ScannerServiceServicer_to_server(
            ScannerService(self.handler), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # --health-listen: health alone on a plaintext port (Kubernetes' gRPC probes cannot
        # speak TLS); health_port is its bound port.
        self.health_server, self.health_port = self.security.health_server(self.health)
        if config.reflection:
            reflection.enable_server_reflection(
                (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        credentials = self.security.credentials
        self.port = (
            self.server.add_secure_port(config.listen, credentials)
            if credentials is not None
            else self.server.add_insecure_port(config.listen)
        )
        if self.port == 0:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"cannot listen on {config.listen}: address in use or invalid",
            )
        host = config.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    @staticmethod
    def _receiver(config: Config) -> Receiver | None:
        if not config.receiver_url:
            return None
        secret = os.environ.get("IMAGE_HANDLER_RECEIVER_SECRET", "").encode()
        if config.receiver_secret_file:
            try:
                secret = Path(config.receiver_secret_file).read_bytes().strip()
            except OSError as exc:
                raise HandlerError(
                    Catalogue.SCANNER_CONFIG_INVALID,
                    f"cannot read --receiver-secret-file {config.receiver_secret_file}: "
                    f"{exc.strerror}",
                    reason=Reason.FAILED_PRECONDITION,
                ) from None
        return open_receiver(
            config.receiver_url, secret, config.delivery_timeout, config.delivery_concurrency
        )

    def own_endpoints(self) -> list[tuple[str, int]]:
        """The handler's bound addresses (gRPC, health, metrics): no job may aim a scanner at
        them."""
        found = [(self.config.listen.rsplit(":", 1)[0], self.port)]
        if self.health_server is not None:
            found.append((self.config.health_listen.rsplit(":", 1)[0], self.health_port))
        if self.metrics is not None:
            found.append((self.config.metrics_listen.rsplit(":", 1)[0], self.metrics_port))
        return found

    async def start(self) -> None:
        """Serve health (NOT_SERVING) at once, recover the queue, then go SERVING."""
        if self.metrics is not None:
            self.metrics_port = await self.metrics.start()
        self.job_service.policy = SubmitPolicy.from_config(self.config, self.own_endpoints())
        await self._set_health(NOT_SERVING)
        if self.health_server is not None:
            await self.health_server.start()
        await self.server.start()
        log.info("handler.started", address=self.address, data_dir=str(self.config.data_dir))
        self.security.warn_if_exposed(self.address)
        try:
            recovered = await self.handler.open()
        except BaseException:
            await self.server.stop(0)
            if self.health_server is not None:
                await self.health_server.stop(0)
            await self.handler.stop()
            if self.metrics is not None:
                await self.metrics.stop()
            raise
        counts = await self.repository.counts()
        log.info(
            "handler.recovered",
            jobs=recovered.jobs,
            pending=counts.pending,
            records_replayed=recovered.records_replayed,
            torn_bytes_cut=recovered.torn_bytes_cut,
            lost=recovered.lost,
            seconds=round(recovered.seconds, 3),
        )
        await self._set_health(SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Readiness (the per-service statuses) goes NOT_SERVING at once so Kubernetes stops
        routing; submits are refused; scanners are told to drain and running jobs get up to
        ``grace`` seconds to finish; then a snapshot, and the server stops. Liveness (the
        overall status "") stays SERVING throughout: the process is alive and finishing its
        work, and a failing liveness probe would have it killed mid-drain. A second call does
        nothing."""
        if self._stopping:
            return
        self._stopping = True
        await self._set_readiness(NOT_SERVING)
        handler = self.handler
        handler.accepting_submits = False
        finished = True
        if grace and handler.ready:
            finished = await handler.drain(grace)
        handler.close_sessions("the handler is shutting down; reconnect")
        await self.server.stop(min(grace or 0, 1.0))
        if self.health_server is not None:
            await self.health_server.stop(0)
        await handler.stop()  # the store's last snapshot
        if self.metrics is not None:
            await self.metrics.stop()
        log.info("handler.stopped", address=self.address, drained=finished)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        """Liveness ("", asked by the liveness and startup probes) and readiness together."""
        await self.health.set("", status)
        await self._set_readiness(status)

    async def _set_readiness(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        """The per-service statuses, which the readiness probe asks."""
        for service in SERVICES:
            await self.health.set(service, status)


def open_repository(config: Config) -> JobRepository:
    """The store ``--storage`` names (the embedded one locks its data directory now: a clear
    error before the port is bound)."""
    if config.storage == "memory":
        return MemoryRepository(interactive_share=config.interactive_share)
    if config.storage == "postgres":
        return open_postgres(config)
    return EmbeddedRepository(
        config.data_dir,
        policy=FsyncPolicy(config.fsync),
        interactive_share=config.interactive_share,
        snapshot_bytes=int(config.snapshot_journal_mb * 1024 * 1024),
        snapshot_interval=config.snapshot_interval,
        salvage=config.salvage,
        observe_fsync=JOURNAL_FSYNC_SECONDS.observe,
    )


def open_postgres(config: Config) -> JobRepository:
    """The shared PostgreSQL store (needs the [postgres] extra)."""
    try:
        from server.storage.postgres import PostgresRepository
    except ImportError:
        raise HandlerError(
            Catalogue.SCANNER_CONFIG_INVALID,
            "--storage postgres needs psycopg and psycopg_pool: pip install "
            "'image-handler[postgres]'",
            reason=Reason.FAILED_PRECONDITION,
        ) from None
    return PostgresRepository(
        config.database_url,
        schema=config.database_schema,
        interactive_share=config.interactive_share,
        lease_seconds=config.lease_seconds,
        # Without a receiving server this replica's changes are owed to no one.
        delivers=bool(config.receiver_url),
    )


async def create_server(config: Config) -> HandlerServer:
    """A started handler; ``.port`` is the bound port (use listen ':0' in tests)."""
    server = HandlerServer(config)
    await server.start()
    return server
