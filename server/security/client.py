"""The client side: channels to a handler with TLS, mutual TLS and a bearer token (ihctl, the
scanner, tests and benches).

The token goes in the ``authorization: Bearer <token>`` metadata of every call, over TLS or (on
loopback) plaintext alike; it is added by a client interceptor, never printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc

from server.security.tls import channel_credentials

AUTHORIZATION = "authorization"


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


__all__ = ["AUTHORIZATION", "TokenInterceptor", "bearer_metadata", "open_channel"]
