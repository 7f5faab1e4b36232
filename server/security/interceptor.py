"""The one server interceptor every call passes: authentication, roles, limits, hostile bytes.

For each call, before any servicer code runs:

1. **Tokens** (with ``--token-file``): health and reflection are open; every other method needs
   ``authorization: Bearer <token>``. No token, or one the file does not know:
   UNAUTHENTICATED. A known token without a role the method needs (:mod:`.roles`):
   PERMISSION_DENIED. Both are ``HNDL-007`` with an ErrorInfo, via
   :mod:`imagehandler.rpc`, and a refused call's request is never parsed. A token
   never appears in a message or a log line; its *name* from the token file does.
2. **Requests in**: a request larger than ``--max-receive-bytes`` is ``HNDL-007``
   RESOURCE_EXHAUSTED; bytes that do not parse as the method's request message are ``HNDL-005``
   INVALID_ARGUMENT (on the scanner stream too, which ends the stream).
3. **Submit rate** (``--submit-rate``): jobs per second per client, a token bucket of
   ``--submit-burst`` jobs; past it ``HNDL-007`` RESOURCE_EXHAUSTED naming the limit.
4. **Streams** (``--max-streams-per-client``): open WatchJobs, Connect, health Watch and
   reflection streams per client; one more is ``HNDL-007`` RESOURCE_EXHAUSTED.
5. **Responses out**: a unary response larger than ``--max-send-bytes`` is ``HNDL-007``
   RESOURCE_EXHAUSTED (ask for a smaller page or the summary view).

A client is the token's name, else the client certificate's identity, else the peer's IP.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf.message import Message
from grpc import aio

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.rpc import abort
from server.security import caller, roles
from server.security.limits import StreamCounter, SubmitRateLimiter
from server.security.tls import certificate_names
from server.security.tokens import Principal, TokenFile

log = structlog.get_logger("imagehandler.security")

Context = aio.ServicerContext[Any, Any]
Deserializer = Callable[[bytes], Any]
if TYPE_CHECKING:  # generic in grpc-stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerInterceptor = aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _ServerInterceptor = aio.ServerInterceptor

_SYSTEM = Catalogue.SYSTEM_ERROR
_AUTHORIZATION = "authorization"
_BEARER = "bearer "
_MAX_WRAPPED = 4096


def _error(detail: str, reason: Reason) -> HandlerError:
    return HandlerError(_SYSTEM, detail, reason=reason)


class _Refused:
    """What a unary request's deserializer returns for bytes it refuses (the behaviour then
    answers with the error; gRPC would otherwise fail the call without a code of ours)."""

    __slots__ = ("error",)

    def __init__(self, error: HandlerError) -> None:
        self.error = error


def bearer_token(metadata: Sequence[Any] | None) -> str | None:
    """The token of ``authorization: Bearer <token>`` (None when absent or malformed)."""
    for key, value in metadata or ():
        if key != _AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if text[: len(_BEARER)].lower() == _BEARER and text[len(_BEARER) :].strip():
            return text[len(_BEARER) :].strip()
        return None
    return None


def peer_host(context: Context) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``; ``ipv6:[::1]:5`` -> ``::1``."""
    peer: str = context.peer() or ""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return scheme or "unknown"


class SecurityInterceptor(_ServerInterceptor):
    def __init__(
        self,
        *,
        tokens: TokenFile | None = None,
        max_receive_bytes: int = 0,
        max_send_bytes: int = 0,
        submit_rate: float = 0.0,
        submit_burst: int = 0,
        max_streams_per_client: int = 0,
    ) -> None:
        self.tokens = tokens
        self.max_receive = max_receive_bytes
        self.max_send = max_send_bytes
        self.rate = (
            SubmitRateLimiter(submit_rate, submit_burst or math.ceil(submit_rate))
            if submit_rate > 0
            else None
        )
        self.streams = StreamCounter(max_streams_per_client) if max_streams_per_client else None
        self._wrapped: dict[tuple[str, Principal | None], tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return handler  # type: ignore[return-value]  # the stubs say never None
        method: str = handler_call_details.method
        principal: Principal | None = None
        if self.tokens is not None and not roles.is_open(method):
            outcome = self._authorize(method, handler_call_details.invocation_metadata)
            if isinstance(outcome, HandlerError):
                return _refusal(handler, outcome)
            principal = outcome
        # One wrapped handler per method and principal, made on first use.
        key = (method, principal)
        wrapped = self._wrapped.get(key)
        if wrapped is None or wrapped[0] is not handler:
            if len(self._wrapped) >= _MAX_WRAPPED:
                self._wrapped.clear()
            wrapped = (handler, self._wrap(handler, method, principal))
            self._wrapped[key] = wrapped
        return wrapped[1]

    # ----- who may call ---------------------------------------------------------------

    def _authorize(self, method: str, metadata: Sequence[Any] | None) -> Principal | HandlerError:
        assert self.tokens is not None
        name = roles.short_name(method)
        token = bearer_token(metadata)
        if token is None:
            log.warning("rpc.unauthenticated", method=name, reason="no bearer token")
            return _error(
                f"{name} needs a token: send the metadata 'authorization: Bearer <token>'",
                Reason.UNAUTHENTICATED,
            )
        principal = self.tokens.lookup(token)
        if principal is None:
            log.warning("rpc.unauthenticated", method=name, reason="unknown token")
            return _error(
                f"{name}: the token is not known to this handler (wrong, revoked or not yet "
                "in --token-file)",
                Reason.UNAUTHENTICATED,
            )
        needed = roles.roles_for(method)
        if principal.roles.isdisjoint(needed):
            log.warning(
                "rpc.permission_denied",
                method=name,
                token_name=principal.name,
                roles=sorted(principal.roles),
            )
            return _error(
                f"token {principal.name!r} (roles: {', '.join(sorted(principal.roles))}) may not "
                f"call {name}; that needs the role {' or '.join(sorted(needed))}",
                Reason.PERMISSION_DENIED,
            )
        return principal

    @staticmethod
    def client_of(principal: Principal | None, context: Context) -> str:
        if principal is not None:
            return f"token {principal.name!r}"
        names = certificate_names(context)
        if names:
            return f"certificate {names[0]!r}"
        return f"address {peer_host(context)}"

    # ----- wrapping the method --------------------------------------------------------

    def _wrap(self, handler: Handler, method: str, principal: Principal | None) -> Handler:
        name = roles.short_name(method)
        if not handler.request_streaming:
            decode = self._unary_decoder(handler.request_deserializer, name)
            if handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(
                    self._unary_stream(handler.unary_stream, principal),
                    request_deserializer=decode,
                    response_serializer=handler.response_serializer,
                )
            return grpc.unary_unary_rpc_method_handler(
                self._unary_unary(handler.unary_unary, principal, method),
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        decode = self._stream_decoder(handler.request_deserializer, name)
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, principal, counted=True, method=method),
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            self._streaming(handler.stream_unary, principal, counted=False),
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )

    def _too_large(self, size: int, name: str) -> HandlerError:
        return _error(
            f"the {name} request is {size} bytes; the limit is {self.max_receive} bytes "
            "(--max-receive-bytes)",
            Reason.EXHAUSTED,
        )

    @staticmethod
    def _undecodable(size: int, name: str) -> HandlerError:
        return HandlerError(
            Catalogue.SCAN_PARAMS_EMPTY,
            f"the {name} request ({size} bytes) is not a valid protobuf message of its type",
        )

    def _unary_decoder(self, deserialize: Deserializer | None, name: str) -> Deserializer:
        limit = self.max_receive

        def decode(raw: bytes) -> Any:
            if limit and len(raw) > limit:
                return _Refused(self._too_large(len(raw), name))
            if deserialize is None:
                return raw
            try:
                return deserialize(raw)
            except Exception:
                return _Refused(self._undecodable(len(raw), name))

        return decode

    def _stream_decoder(self, deserialize: Deserializer | None, name: str) -> Deserializer:
        """On a stream the servicer reads each message itself: refusing means raising the
        error there; it ends the stream with that error (see :meth:`_streaming`)."""
        limit = self.max_receive

        def decode(raw: bytes) -> Any:
            if limit and len(raw) > limit:
                raise self._too_large(len(raw), name)
            if deserialize is None:
                return raw
            try:
                return deserialize(raw)
            except Exception:
                raise self._undecodable(len(raw), name) from None

        return decode

    def _unary_unary(
        self, inner: Any, principal: Principal | None, method: str
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        max_send = self.max_send
        name = roles.short_name(method)
        submit = self.rate is not None and method in roles.SUBMIT_METHODS
        is_async = inspect.iscoroutinefunction(inner)
        submitter = caller.submitter_of(principal)

        async def behaviour(request: Any, context: Context) -> Any:
            if isinstance(request, _Refused):
                await abort(context, request.error)
            if submit:
                await self._check_rate(method, request, principal, context)
            bound = caller.bind(submitter)  # who submits, for the job's credential grants
            try:
                if is_async:
                    response = await inner(request, context)
                else:  # a plain function (none of ours): called on the loop
                    response = inner(request, context)
            finally:
                caller.unbind(bound)
            if max_send and isinstance(response, Message):
                size = response.ByteSize()
                if size > max_send:
                    await abort(
                        context,
                        _error(
                            f"the {name} response would be {size} bytes; the limit is "
                            f"{max_send} bytes (--max-send-bytes): ask for less (a smaller "
                            "page_size, or the summary view)",
                            Reason.EXHAUSTED,
                        ),
                    )
            return response

        return behaviour

    async def _check_rate(
        self, method: str, request: Any, principal: Principal | None, context: Context
    ) -> None:
        assert self.rate is not None
        jobs = len(request.jobs) if method == roles.SUBMIT_BATCH else 1
        client = self.client_of(principal, context)
        wait = self.rate.take(client, jobs)
        if wait:
            await abort(context, self._rate_refusal(client, jobs, wait))

    def _rate_refusal(self, client: str, jobs: int, wait: float) -> HandlerError:
        assert self.rate is not None
        rate, burst = self.rate.rate, self.rate.burst
        if math.isinf(wait):
            detail = (
                f"{jobs} jobs in one call is more than the submit burst of {burst} jobs "
                f"(--submit-burst) for {client}; send smaller batches"
            )
        else:
            detail = (
                f"submit rate limit of {rate:g} jobs/s (burst {burst}) for {client} reached; "
                f"retry in {wait:.2f}s"
            )
        return _error(detail, Reason.EXHAUSTED)

    def _rate_limited(
        self, requests: AsyncIterator[Any], principal: Principal | None, context: Context
    ) -> AsyncIterator[Any]:
        """The submit stream's messages, each taken from the client's submit rate: one over
        the limit ends the stream with the error, as a SubmitJob over it is refused."""
        rate = self.rate
        assert rate is not None
        client = self.client_of(principal, context)

        async def limited() -> AsyncIterator[Any]:
            async for request in requests:
                wait = rate.take(client, 1)
                if wait:
                    raise self._rate_refusal(client, 1, wait)
                yield request

        return limited()

    async def _open_stream(self, principal: Principal | None, context: Context) -> str | None:
        """Count a stream against its client (None: not counted); refuse one too many."""
        if self.streams is None:
            return None
        client = self.client_of(principal, context)
        if not self.streams.acquire(client):
            await abort(
                context,
                _error(
                    f"{client} has {self.streams.open(client)} streams open; the limit is "
                    f"{self.streams.limit} (--max-streams-per-client)",
                    Reason.EXHAUSTED,
                ),
            )
        return client

    def _unary_stream(
        self, inner: Any, principal: Principal | None
    ) -> Callable[[Any, Context], Awaitable[None]]:
        async def behaviour(request: Any, context: Context) -> None:
            if isinstance(request, _Refused):
                await abort(context, request.error)
            client = await self._open_stream(principal, context)
            try:
                await _run_streaming(inner, request, context)
            finally:
                if client is not None and self.streams is not None:
                    self.streams.release(client)

        return behaviour

    def _streaming(
        self, inner: Any, principal: Principal | None, *, counted: bool, method: str = ""
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        submitter = caller.submitter_of(principal)
        limited = self.rate is not None and method == roles.SUBMIT_STREAM

        async def behaviour(request_iterator: Any, context: Context) -> Any:
            client = await self._open_stream(principal, context) if counted else None
            if limited:
                request_iterator = self._rate_limited(request_iterator, principal, context)
            bound = caller.bind(submitter)  # who submits, for the job's credential grants
            try:
                return await _run_streaming(inner, request_iterator, context)
            except HandlerError as error:
                # A message the decoder refused, raised where the servicer read it.
                await abort(context, error)
            finally:
                caller.unbind(bound)
                if client is not None and self.streams is not None:
                    self.streams.release(client)

        return behaviour


async def _run_streaming(inner: Any, request: Any, context: Context) -> Any:
    """Run a streaming method written either way: with ``context.write`` (a coroutine) or as
    an async generator (reflection), whose items are written here."""
    if inspect.isasyncgenfunction(inner):
        generator: AsyncIterator[Any] = inner(request, context)
        async for item in generator:
            await context.write(item)
        return None
    return await inner(request, context)


def _refusal(handler: Handler, error: HandlerError) -> Handler:
    """A handler of the same shape that answers ``error`` without reading the request."""

    async def refuse(request: Any, context: Context) -> None:
        await abort(context, error)

    def skip(raw: bytes) -> None:
        return None

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, skip, handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, skip, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, skip, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, skip, handler.response_serializer)


__all__ = ["SecurityInterceptor", "bearer_token", "peer_host"]
