"""The handler's security: TLS and mutual TLS (:mod:`.tls`), tokens with roles (:mod:`.tokens`,
:mod:`.roles`), per-client limits (:mod:`.limits`), and the one server interceptor that applies
them to every call (:mod:`.interceptor`).

:class:`Security` builds all of it from the handler's :class:`~server.config.Config`; the app
adds its credentials, interceptor and channel options to the gRPC server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from grpc import aio
from grpc_health.v1 import health_pb2_grpc

from imagehandler.errors import Catalogue, HandlerError
from server.security.interceptor import SecurityInterceptor
from server.security.tls import (
    bind_scanner_identity,
    is_loopback,
    metrics_ssl_context,
    server_credentials,
)
from server.security.tokens import TokenFile

if TYPE_CHECKING:
    import ssl

    from server.config import Config

log = structlog.get_logger("imagehandler.security")

# Messages over twice --max-receive-bytes are cut by gRPC itself before they are read into
# memory (RESOURCE_EXHAUSTED without an HNDL code); those in between reach the interceptor,
# which answers HNDL-007 naming the limit.
RECEIVE_HEADROOM = 2


class Security:
    """Credentials, interceptor and gRPC options for one handler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.credentials: grpc.ServerCredentials | None = server_credentials(
            config.tls_cert, config.tls_key, config.client_ca
        )
        self.tokens = (
            TokenFile(Path(config.token_file), config.token_reload_interval)
            if config.token_file
            else None
        )
        self.interceptor = SecurityInterceptor(
            tokens=self.tokens,
            max_receive_bytes=config.max_receive_bytes,
            max_send_bytes=config.max_send_bytes,
            submit_rate=config.submit_rate,
            submit_burst=config.submit_burst,
            max_streams_per_client=config.max_streams_per_client,
        )

    @property
    def options(self) -> list[tuple[str, Any]]:
        config = self.config
        return [
            ("grpc.max_receive_message_length", config.max_receive_bytes * RECEIVE_HEADROOM),
            ("grpc.max_send_message_length", config.max_send_bytes),
            # A connection that has not finished its (TLS and HTTP/2) handshake by then is closed.
            ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout * 1000)),
        ]

    def health_server(self, servicer: Any) -> tuple[aio.Server | None, int]:
        """A plaintext server with the health service alone on ``--health-listen`` (None when
        not asked for), and its bound port: for probes that cannot speak TLS."""
        listen = self.config.health_listen
        if not listen:
            return None, 0
        server = aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port(listen)
        if port == 0:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"cannot listen on --health-listen {listen}: address in use or invalid",
            )
        return server, port

    def metrics_ssl(self) -> ssl.SSLContext | None:
        return metrics_ssl_context(self.config.tls_cert, self.config.tls_key)

    def warn_if_exposed(self, address: str) -> None:
        """A clear warning when a non-loopback address is served without TLS."""
        if self.credentials is None and not is_loopback(self.config.listen):
            log.warning(
                "handler.plaintext",
                address=address,
                detail="serving plaintext gRPC on a non-loopback address: anyone on the network "
                "can read jobs, results and tokens in transit; start with --tls-cert and "
                "--tls-key (and --client-ca for mutual TLS)",
            )


__all__ = [
    "Security",
    "SecurityInterceptor",
    "TokenFile",
    "bind_scanner_identity",
    "is_loopback",
]
