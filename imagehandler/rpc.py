"""The one place where handler errors become gRPC statuses, and where clients read them back.

On the wire an error is the gRPC status its :class:`~imagehandler.errors.Reason` maps to
(:data:`STATUS_OF`, the only such mapping), the message ``HNDL-0NN: text[: detail]`` and a
``google.rpc.ErrorInfo`` detail whose ``reason`` is the code, so clients can match on the code
without parsing the message. A refusal that time lifts (a scanner id whose old stream has not
timed out yet) also carries a ``google.rpc.RetryInfo`` detail: the client waits at least its
``retry_delay`` before trying again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagehandler.errors import Catalogue, HandlerError, Reason

ERROR_DOMAIN = "imagehandler.v1"
_DETAILS_KEY = "grpc-status-details-bin"

STATUS_OF: MappingProxyType[Reason, grpc.StatusCode] = MappingProxyType(
    {
        Reason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
        Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        Reason.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        Reason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
        Reason.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        Reason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        Reason.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.INTERNAL: grpc.StatusCode.INTERNAL,
        Reason.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    }
)


def status_code(error: HandlerError) -> grpc.StatusCode:
    """The gRPC status code a handler error is answered with."""
    return STATUS_OF[error.reason]


def to_rpc_status(error: HandlerError) -> grpc.Status:
    """The gRPC status for a handler error, with the ErrorInfo detail attached."""
    info = error_details_pb2.ErrorInfo(
        reason=error.code,
        domain=ERROR_DOMAIN,
        metadata={"text": error.text, "detail": error.detail},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if error.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(round(error.retry_after * 1e9))
        hint = any_pb2.Any()
        hint.Pack(retry)
        details.append(hint)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(
            code=status_code(error).value[0],  # grpc.StatusCode values are (number, name)
            message=error.message,
            details=details,
        )
    )
    return status


async def abort(context: grpc.aio.ServicerContext[object, object], error: HandlerError) -> None:
    """End the call with the error's status; never returns normally (grpc raises)."""
    status = to_rpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass(frozen=True)
class RemoteError:
    """An error as a client reads it from a failed call."""

    code: str  # "HNDL-0NN", or "" when the server sent no ErrorInfo
    message: str
    status: grpc.StatusCode
    # Seconds the server asked to wait before trying again (its RetryInfo), if it said.
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.message


def read_rpc_error(error: grpc.RpcError) -> RemoteError:
    """The HNDL code and message of a failed call (works for sync and aio errors)."""
    # grpc.RpcError itself declares none of these; every raised error is also a grpc.Call.
    call = cast(grpc.Call, error)
    return remote_error(call.code(), call.details() or "", call.trailing_metadata())


def remote_error(status_code: grpc.StatusCode, details: str, trailing: object) -> RemoteError:
    """The error a call ended with, from its status code, details and trailing metadata (for
    an aio call that ended after a message, where there is no exception to read)."""
    metadata = cast(Sequence[tuple[str, str | bytes]], trailing or ())
    for key, value in metadata:
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        code, retry_after = "", None
        for any_detail in status.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if any_detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                code = info.reason
            elif any_detail.Unpack(retry) and retry.HasField("retry_delay"):
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        if code:
            return RemoteError(code, status.message, status_code, retry_after)
    if Catalogue.by_code(details[:8]) is not None:
        return RemoteError(details[:8], details, status_code)
    return RemoteError("", f"{status_code.name}: {details}", status_code)


__all__ = [
    "ERROR_DOMAIN",
    "STATUS_OF",
    "RemoteError",
    "abort",
    "read_rpc_error",
    "remote_error",
    "status_code",
    "to_rpc_status",
]
