"""ScannerService: the scanners' bidirectional stream, and the scanner list.

One Connect call is one scanner session. A reader task turns each ConnectRequest into a call on
the handler; a writer task sends what the handler pushes (assignments, cancels, rejections)
and a heartbeat whenever the stream has been idle for the heartbeat interval.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from imagehandler.errors import Catalogue, HandlerError
from imagehandler.rpc import abort
from imagehandler.v1 import scanner_service_pb2, scanner_service_pb2_grpc
from server import mapping
from server.core.model import JobFailure
from server.core.retry import RunFailure
from server.security import limits as security_limits
from server.security.tls import bind_scanner_identity
from server.service.handler import Handler
from server.service.sessions import (
    AssignJobs,
    CancelRun,
    DrainScanner,
    RejectMessage,
    ScannerMessage,
    ScannerSession,
)
from server.transport import convert
from server.transport.guard import STREAM_END, Context, as_handler_error, unary

log = structlog.get_logger("imagehandler.scanners")

Response = scanner_service_pb2.ConnectResponse

# Assignments queued for one scanner are merged into one message up to about this size (the
# scanner's default receive limit is 4 MiB; one AssignedJob is a few hundred bytes).
MAX_ASSIGNMENT_BYTES = 1 << 20


@dataclass(frozen=True)
class _Close:
    error: HandlerError


class _HeartbeatDue:
    """Put in the outbox by the session's heartbeat timer; sent only if the stream was idle."""


_HEARTBEAT_DUE = _HeartbeatDue()
_Outbox = asyncio.Queue["ScannerMessage | _Close | _HeartbeatDue"]


def rejected(error: HandlerError, job_id: str = "") -> Response:
    return Response(
        rejected=scanner_service_pb2.Rejected(
            error=mapping.error_to_proto(JobFailure(error.code, error.message, error.detail)),
            job_id=job_id,
        )
    )


class ScannerService(scanner_service_pb2_grpc.ScannerServiceServicer):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    # Written with context.read()/write() (not as a generator), hence the override ignore.
    async def Connect(self, request_iterator: object, context: Context) -> None:  # type: ignore[override]
        config = self.handler.config
        try:
            async with asyncio.timeout(config.heartbeat_timeout):
                first = await context.read()
        except TimeoutError:
            await abort(
                context,
                HandlerError(
                    Catalogue.SCANNER_CONFIG_INVALID,
                    f"no register message within {config.heartbeat_timeout:g}s",
                ),
            )
            return
        if first is STREAM_END:
            return
        assert isinstance(first, scanner_service_pb2.ConnectRequest)
        outbox: _Outbox = asyncio.Queue()
        try:
            if first.WhichOneof("message") != "register":
                raise HandlerError(
                    Catalogue.SCANNER_CONFIG_INVALID,
                    f"the first message must be register, got {first.WhichOneof('message')}",
                )
            # Mutual TLS: the client certificate names the scanner (HNDL-003 on a mismatch).
            bind_scanner_identity(context, first.register)
            profile = convert.profile_from_register(first.register, config)
            session = self.handler.connect_scanner(
                profile, send=outbox.put_nowait, close=lambda e: outbox.put_nowait(_Close(e))
            )
        except Exception as exc:
            error = as_handler_error(exc, "Connect")
            log.warning(
                "scanner.rejected", scanner_id=first.register.scanner_id[:128], error=error.message
            )
            await context.write(rejected(error))
            await abort(context, error)
            return
        ended = RunFailure(
            Catalogue.SYSTEM_ERROR, f"scanner {profile.scanner_id} disconnected during the run"
        )
        try:
            await context.write(
                Response(
                    registered=scanner_service_pb2.Registered(
                        scanner_id=profile.scanner_id,
                        session_id=session.session_id,
                        heartbeat_interval=mapping.duration(config.heartbeat_interval),
                        heartbeat_timeout=mapping.duration(config.heartbeat_timeout),
                    )
                )
            )
            reader = asyncio.create_task(self._read(session, context))
            writer = asyncio.create_task(self._write(session, outbox, context))
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                reader.cancel()
                writer.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
            closing = writer.result() if writer in done and not writer.cancelled() else None
            if isinstance(closing, _Close):
                await abort(context, closing.error)
            elif reader in done and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
        finally:
            self.handler.disconnect(session, ended)

    async def _read(self, session: ScannerSession, context: Context) -> None:
        while True:
            request = await context.read()
            if request is STREAM_END:
                return
            assert isinstance(request, scanner_service_pb2.ConnectRequest)
            self.handler.touch(session)
            try:
                await self._handle(session, request)
            except HandlerError as error:
                session.send(RejectMessage(error))

    async def _handle(
        self, session: ScannerSession, request: scanner_service_pb2.ConnectRequest
    ) -> None:
        handler = self.handler
        which = request.WhichOneof("message")
        if which == "ready":
            handler.scanner_ready(session, request.ready.free_slots)
        elif which == "heartbeat":
            handler.heartbeat(session, request.heartbeat.active_job_ids)
        elif which == "progress":
            p = request.progress
            handler.progress(session, p.job_id, p.stage[:64], p.percent)
        elif which == "result":
            limit = handler.config.max_result_bytes
            together = []
            for result in request.result.results:
                too_large = security_limits.oversized_result(result, limit)
                if too_large is not None:  # --max-result-bytes: the job is ERROR (HNDL-007)
                    await handler.failure(
                        session, result.job_id, RunFailure(too_large.kind, too_large.detail, True)
                    )
                    session.send(RejectMessage(too_large, result.job_id))
                    continue
                if handler.shared_store:
                    # A shared database: this message's results in one batch of moves.
                    together.append(handler.result(session, result.job_id, result.run, result))
                else:
                    await handler.result(session, result.job_id, result.run, result)
            if together:
                await asyncio.gather(*together)
        elif which == "failure":
            f = request.failure
            kind = Catalogue.by_code(f.code) if f.code else Catalogue.SYSTEM_ERROR
            detail = f.detail[:2048]
            if kind is None:
                kind, detail = (
                    Catalogue.SYSTEM_ERROR,
                    f"scanner reported unknown code {f.code[:16]!r}: {detail}",
                )
            await handler.failure(session, f.job_id, RunFailure(kind, detail, f.permanent))
        elif which == "drain":
            handler.drain_scanner(session)
        elif which == "databases":
            # HNDL-012/013 refuse the message (a Rejected); the handler keeps the old list.
            databases = convert.databases_from_proto(request.databases.databases)
            handler.databases_changed(session, databases)
        elif which == "register":
            raise HandlerError(
                Catalogue.SCANNER_CONFIG_INVALID, "already registered on this stream"
            )
        else:
            raise HandlerError(Catalogue.SCAN_PARAMS_EMPTY, "empty ConnectRequest: set one message")

    async def _write(
        self, session: ScannerSession, outbox: _Outbox, context: Context
    ) -> _Close | None:
        interval = self.handler.config.heartbeat_interval
        loop = asyncio.get_running_loop()
        last_write = loop.time()

        # One timer at a time, not one per message: when it fires after a whole interval
        # without a write it asks the writer for a heartbeat; otherwise it waits on until an
        # interval after the last write.
        timer: asyncio.TimerHandle

        def heartbeat_due() -> None:
            nonlocal timer
            now = loop.time()
            if now - last_write >= interval:
                outbox.put_nowait(_HEARTBEAT_DUE)
                timer = loop.call_at(now + interval, heartbeat_due)
            else:
                timer = loop.call_at(last_write + interval, heartbeat_due)

        timer = loop.call_at(last_write + interval, heartbeat_due)
        held: ScannerMessage | _Close | _HeartbeatDue | None = None  # taken, not sent yet
        try:
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    item = await outbox.get()
                if isinstance(item, _Close):
                    return item
                if isinstance(item, _HeartbeatDue):
                    if loop.time() - last_write < interval:
                        continue  # something went out since it was asked for: life enough
                    response = Response(
                        heartbeat=scanner_service_pb2.HandlerHeartbeat(
                            sent_at=mapping.timestamp(datetime.now(UTC))
                        )
                    )
                elif isinstance(item, AssignJobs):
                    # Batching on the wire: assignments queued behind this one (while the
                    # stream was busy) go in the same message, in order; anything else waits.
                    response, held = self._assignment(item, outbox)
                else:
                    response = self._message(item)
                self._flush_journal()
                await context.write(response)
                last_write = loop.time()
        finally:
            timer.cancel()

    @staticmethod
    def _assignment(
        first: AssignJobs, outbox: _Outbox
    ) -> tuple[Response, ScannerMessage | _Close | _HeartbeatDue | None]:
        """One Assignment message for ``first`` and the assignments queued right behind it
        (up to ``MAX_ASSIGNMENT_BYTES``); the first other item taken, if any, is returned."""
        response = Response()
        jobs = response.assignment.jobs
        size = 0
        item: ScannerMessage | _Close | _HeartbeatDue = first
        while True:
            assert isinstance(item, AssignJobs)
            for job in item.jobs:
                assigned = jobs.add()
                convert.set_assigned_job(
                    assigned,
                    job,
                    (job.started_at or datetime.now(UTC))
                    + timedelta(seconds=job.spec.max_run_time),
                )
                size += assigned.ByteSize()
            if size >= MAX_ASSIGNMENT_BYTES or outbox.empty():
                return response, None
            item = outbox.get_nowait()
            if not isinstance(item, AssignJobs):
                return response, item

    def _flush_journal(self) -> None:
        """What a scanner is told must be in the journal first (a crash then replays it)."""
        self.handler.flush()

    @staticmethod
    def _message(item: ScannerMessage) -> Response:
        if isinstance(item, AssignJobs):
            response = Response()
            jobs = response.assignment.jobs
            for job in item.jobs:
                convert.set_assigned_job(
                    jobs.add(),
                    job,
                    (job.started_at or datetime.now(UTC))
                    + timedelta(seconds=job.spec.max_run_time),
                )
            return response
        if isinstance(item, DrainScanner):
            return Response(drain=scanner_service_pb2.Drain())
        if isinstance(item, CancelRun):
            return Response(
                cancel=scanner_service_pb2.Cancel(job_id=item.job_id, reason=item.reason)
            )
        return rejected(item.error, item.job_id)

    @unary
    async def ListScanners(
        self, request: scanner_service_pb2.ListScannersRequest, context: Context
    ) -> scanner_service_pb2.ListScannersResponse:
        processing = self.handler.processing_by_scanner()
        return scanner_service_pb2.ListScannersResponse(
            scanners=[
                convert.scanner_to_proto(s, processing.get(s.scanner_id, []))
                for s in self.handler.scanners()
            ]
        )
