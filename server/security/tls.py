"""TLS for the handler's listeners, mutual TLS for its clients, and the certificate identity a
scanner connects with (the client side is :mod:`imagehandler.channel`).

- ``--tls-cert`` / ``--tls-key``: the handler's certificate chain and private key (PEM). With
  them, the gRPC port (and the metrics port) speak TLS only.
- ``--client-ca``: PEM bundle of the CAs that issue client certificates. With it, every gRPC
  client must present a certificate from one of them (mutual TLS): a client without one, with
  one from another CA, or with an expired one fails the TLS handshake (the client sees
  UNAVAILABLE; no call reaches the handler). A scanner's certificate identity is then bound to
  its scanner id (:func:`bind_scanner_identity`).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from typing import Any

import grpc

from imagehandler import channel
from imagehandler.channel import PEM_CERT, PEM_KEY
from imagehandler.errors import Catalogue, HandlerError, Reason


def _config_error(detail: str) -> HandlerError:
    return HandlerError(Catalogue.SCANNER_CONFIG_INVALID, detail, reason=Reason.FAILED_PRECONDITION)


def read_pem(flag: str, path: str, marker: bytes) -> bytes:
    """The bytes of a PEM file, HNDL-003 naming the flag when it is missing or not PEM."""
    try:
        return channel.read_pem(flag, path, marker)
    except ValueError as exc:
        raise _config_error(str(exc)) from None


def server_credentials(
    tls_cert: str, tls_key: str, client_ca: str
) -> grpc.ServerCredentials | None:
    """gRPC server credentials for the flags, or None for plaintext."""
    if not tls_cert:
        return None
    chain = read_pem("--tls-cert", tls_cert, PEM_CERT)
    key = read_pem("--tls-key", tls_key, PEM_KEY)
    roots = read_pem("--client-ca", client_ca, PEM_CERT) if client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def metrics_ssl_context(tls_cert: str, tls_key: str) -> ssl.SSLContext | None:
    """TLS for the metrics endpoint with the same certificate (no client certificate asked)."""
    if not tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls_cert, tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise _config_error(f"cannot load --tls-cert/--tls-key for metrics: {exc}") from None
    return context


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT binds only the loopback interface."""
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----- the peer's certificate ------------------------------------------------------------


def _values(auth: dict[str, Any], key: str) -> list[str]:
    out = []
    for value in auth.get(key, ()):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if text:
            out.append(text)
    return out


def certificate_names(context: Any) -> tuple[str, ...]:
    """The client certificate's common name then its subject alternative names (empty without
    a client certificate). ``context`` is a gRPC servicer context."""
    auth: dict[str, Any] = context.auth_context()
    names = _values(auth, "x509_common_name") + _values(auth, "x509_subject_alternative_name")
    return tuple(dict.fromkeys(names))


def bind_scanner_identity(context: Any, register: Any) -> None:
    """With a client certificate, the scanner id is its identity: an empty ``scanner_id`` takes
    the certificate's common name; a given one must be the common name or a subject alternative
    name, else HNDL-003. Without a certificate, nothing changes. ``register`` is a Register."""
    names: Sequence[str] = certificate_names(context)
    if not names:
        return
    if not register.scanner_id:
        register.scanner_id = names[0]
        return
    if register.scanner_id not in names:
        raise HandlerError(
            Catalogue.SCANNER_CONFIG_INVALID,
            f"scanner_id {register.scanner_id[:128]!r} does not match the client certificate "
            f"(it names {', '.join(repr(n) for n in names[:4])}); register with the "
            "certificate's identity or leave scanner_id empty",
        )


__all__ = [
    "bind_scanner_identity",
    "certificate_names",
    "is_loopback",
    "metrics_ssl_context",
    "server_credentials",
]
