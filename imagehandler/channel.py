"""The client side of a channel to a handler: TLS and mutual TLS credentials, the bearer token
(ihctl, the scanner library, tests and benches; never the server's security stack).

The token goes in the ``authorization: Bearer <token>`` metadata of every call, over TLS or (on
loopback) plaintext alike; it is added by a client interceptor or per call, never printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc

AUTHORIZATION = "authorization"

PEM_CERT = b"-----BEGIN CERTIFICATE-----"
PEM_KEY = b"PRIVATE KEY-----"


def read_pem(flag: str, path: str, marker: bytes) -> bytes:
    """The bytes of a PEM file; ValueError naming the flag when it is missing or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if marker not in data:
        what = "a PEM certificate" if marker == PEM_CERT else "a PEM private key"
        raise ValueError(f"{flag} {path} does not hold {what}")
    return data


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Trust ``ca`` (PEM file; empty: the system roots) and present ``cert``/``key`` (mutual
    TLS) when given. ValueError saying what is wrong."""
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem("--tls-ca", ca, PEM_CERT) if ca else None,
        private_key=read_pem("--tls-key", key, PEM_KEY) if key else None,
        certificate_chain=read_pem("--tls-cert", cert, PEM_CERT) if cert else None,
    )


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty without one)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the bearer token to every call of a synchronous channel."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), *self._metadata]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    target: str,
    *,
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    token: str = "",
    tls: bool = False,
    options: tuple[tuple[str, Any], ...] = (),
) -> grpc.Channel:
    """A synchronous channel: TLS when ``tls`` or any TLS file is given, and the token on every
    call when given. ValueError for unusable TLS files."""
    channel: grpc.Channel
    if tls or tls_ca or tls_cert or tls_key:
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        channel = grpc.secure_channel(target, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    if token:
        channel = grpc.intercept_channel(channel, TokenInterceptor(token))
    return channel


__all__ = [
    "AUTHORIZATION",
    "PEM_CERT",
    "PEM_KEY",
    "TokenInterceptor",
    "bearer_metadata",
    "channel_credentials",
    "open_channel",
    "read_pem",
]
