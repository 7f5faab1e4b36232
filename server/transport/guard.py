"""Turns exceptions escaping a servicer into coded gRPC errors: HandlerError by its catalogue
entry, anything else as HNDL-007 (logged with its traceback), so no request can end in a bare
UNKNOWN and no bug crashes the server."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from grpc import aio

from imagehandler.errors import Catalogue, HandlerError
from imagehandler.rpc import abort

log = structlog.get_logger("imagehandler.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = aio.ServicerContext[Any, Any]
# The end-of-stream marker of context.read(); grpc-stubs does not declare it.
STREAM_END: object = getattr(aio, "EOF")  # noqa: B009


def as_handler_error(exc: BaseException, method: str) -> HandlerError:
    if isinstance(exc, HandlerError):
        return exc
    log.exception("rpc.internal_error", method=method)
    return HandlerError(Catalogue.SYSTEM_ERROR, f"internal error in {method}: {type(exc).__name__}")


async def fail(context: Context, exc: BaseException, method: str) -> None:
    error = as_handler_error(exc, method)
    await abort(context, error)


def unary(
    method: Callable[[Any, Req, Context], Awaitable[Resp]],
) -> Callable[[Any, Req, Context], Awaitable[Resp]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:
            await fail(context, exc, method.__name__)
            raise  # unreachable: abort raises

    return wrapper
