"""JobService: submit, read, list, cancel and watch jobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import grpc
from google.protobuf import duration_pb2

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from server import mapping
from server.core.model import Job, JobSpec, JobStatus, Lane, ObjectKind, Transition, Trigger
from server.core.verdicts import Scope
from server.job_policy import SubmitPolicy
from server.service.events import Feed, FellBehind, Subscription
from server.service.handler import Handler
from server.service.jobs import Submitted
from server.service.rematch import RematchFilter
from server.storage.repository import JobFilter
from server.transport import convert
from server.transport.guard import Context, fail, unary

# A watcher of every job takes this many events from the shared log at a time.
WATCH_BATCH = 256
_CLOSE = object()
# Jobs a SubmitJobStream client may have sent and not yet seen acknowledged (what one stream
# can make the handler hold); one more ends the stream with HNDL-007 (RESOURCE_EXHAUSTED).
STREAM_IN_FLIGHT = 1024
# Seconds a SubmitJobStream that ends in an error has to take the acknowledgements owed first.
STREAM_DRAIN = 5.0


class _Ack(NamedTuple):
    """A SubmitJobStream message's outcome, waiting for the commit before it is sent."""

    place: int  # on the stream, from 0
    submitted: Submitted | None
    error: HandlerError | None


def _message_or_bytes(response: bytes | job_service_pb2.WatchJobsResponse) -> bytes:
    """WatchJobs writes either a message or an event already serialized once for all its
    watchers."""
    return response if isinstance(response, bytes) else response.SerializeToString()


_KINDS = frozenset(kind.value for kind in ObjectKind)


class _Capture:
    """Stands in for the server to capture the generated method handlers."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


def register(server: grpc.aio.Server, servicer: JobService) -> None:
    """Add the JobService as the generated code does, with one change: WatchJobs' serializer
    passes pre-serialized events through, so an event costs one serialization however many
    watchers receive it."""
    capture = _Capture()
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, capture)  # type: ignore[arg-type]
    handlers = capture.handlers
    watch = handlers["WatchJobs"]
    handlers["WatchJobs"] = grpc.unary_stream_rpc_method_handler(
        servicer.WatchJobs,
        request_deserializer=watch.request_deserializer,
        response_serializer=_message_or_bytes,
    )
    name = job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    # grpc-stubs predates registered method handlers (grpcio 1.62).
    server.add_registered_method_handlers(name, handlers)  # type: ignore[attr-defined]


def encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if not text.startswith("seq:"):
            raise ValueError(text)
        seq = int(text[4:])
        if seq < 0:
            raise ValueError(text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HandlerError(
            Catalogue.SCAN_PARAMS_EMPTY,
            "page_token is not one this handler issued; pass next_page_token unchanged",
        ) from None
    return seq


class JobService(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, handler: Handler, policy: SubmitPolicy) -> None:
        self.handler = handler
        # What a submitted job may aim scanners at (server/job_policy.py).
        self.policy = policy
        # Watchers of every job share one encoding of each event.
        handler.events.encode = self._encode_event

    def _job(
        self,
        job: Job,
        *,
        history: bool = False,
        full_result: bool = False,
        position: int | None = None,
    ) -> common_pb2.Job:
        if position is None:
            position = self.handler.position(job)
        message = mapping.job_to_proto(
            job, position=position, history=history, full_result=full_result
        )
        owed = self.handler.owed(job)
        if owed:
            message.deliveries_owed = owed
            message.delivery_error = self.handler.delivery_error(job)
        return message

    def _encode_event(self, job: Job, transition: Transition, sequence: int) -> tuple[object, int]:
        """One event as the bytes every watcher of every job is sent (see register())."""
        message = job_service_pb2.WatchJobsResponse(sequence=sequence)
        mapping.set_job(message.job, job, position=self.handler.position(job))
        mapping.set_transition(message.transition, transition)
        data = message.SerializeToString()
        return data, len(data)

    def _reply_job(self, message: common_pb2.Job, submitted: Submitted) -> None:
        if submitted.message is not None:
            # A new job as it was queued (built with its journal record). Dispatch runs while
            # the journal syncs, so a Free scanner may hold it already: WatchJobs tells.
            message.CopyFrom(submitted.message)
        else:  # a duplicate: as it is now
            mapping.set_job(message, submitted.job, position=self.handler.position(submitted.job))

    def _flush_journal(self) -> None:
        """Watchers see only what the store has."""
        self.handler.flush()

    @unary
    async def SubmitJob(
        self, request: job_service_pb2.SubmitJobRequest, context: Context
    ) -> job_service_pb2.SubmitJobResponse:
        spec = convert.spec_from_request(request, self.handler.config, self.policy)
        (submitted,) = await self.handler.submit_many([spec])
        await self.handler.commit()
        response = job_service_pb2.SubmitJobResponse(duplicate=submitted.duplicate)
        self._reply_job(response.job, submitted)
        return response

    @unary
    async def SubmitJobs(
        self, request: job_service_pb2.SubmitJobsRequest, context: Context
    ) -> job_service_pb2.SubmitJobsResponse:
        if not request.jobs:
            raise HandlerError(Catalogue.SCAN_PARAMS_EMPTY, "jobs is empty; send at least one")
        specs = []
        for index, item in enumerate(request.jobs):
            try:
                specs.append(convert.spec_from_request(item, self.handler.config, self.policy))
            except HandlerError as error:
                # Name the bad job; nothing of the batch is queued.
                raise HandlerError(
                    error.kind, f"jobs[{index}]: {error.detail}", reason=error.reason
                ) from None
        submitted = await self.handler.submit_many(specs)
        await self.handler.commit()
        # Filled in place: a message passed to a constructor is copied.
        response = job_service_pb2.SubmitJobsResponse()
        add = response.results.add
        for one in submitted:
            result = add()
            self._reply_job(result.job, one)
            if one.duplicate:
                result.duplicate = True
        return response

    # Written with context.write() (not as a generator), hence the override ignore.
    async def SubmitJobStream(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[job_service_pb2.SubmitJobStreamRequest],
        context: Context,
    ) -> None:
        """One job per message; acknowledgements in order, each after the commit that makes
        its job durable. A reader checks each job as it arrives; a submitter queues what has
        arrived since its last pass in one batch; a writer takes the outcomes, awaits one
        commit for all of them (the journal's group fsync) and writes their
        acknowledgements."""
        acks: asyncio.Queue[_Ack | object] = asyncio.Queue()
        unacknowledged = 0
        # Read but not yet submitted: the jobs that arrive while one batch is being submitted
        # go in the next, so a busy stream is queued in batches as SubmitJobs would be.
        incoming: list[tuple[int, JobSpec | HandlerError]] = []
        arrived = asyncio.Event()
        closed = False

        async def read() -> None:
            nonlocal unacknowledged, closed
            index = 0
            try:
                async for request in request_iterator:
                    if unacknowledged >= STREAM_IN_FLIGHT:
                        raise HandlerError(
                            Catalogue.SYSTEM_ERROR,
                            f"more than {STREAM_IN_FLIGHT} jobs on this SubmitJobStream wait "
                            "for their acknowledgement; read the acknowledgements and keep "
                            f"at most {STREAM_IN_FLIGHT} jobs unacknowledged",
                            reason=Reason.EXHAUSTED,
                        )
                    unacknowledged += 1
                    try:
                        spec: JobSpec | HandlerError = convert.spec_from_request(
                            request.job, self.handler.config, self.policy
                        )
                    except HandlerError as error:
                        spec = error
                    incoming.append((index, spec))
                    arrived.set()
                    index += 1
            finally:
                closed = True
                arrived.set()

        async def submit() -> None:
            nonlocal incoming
            limit = self.handler.config.max_batch
            while True:
                await arrived.wait()
                arrived.clear()
                while incoming:
                    batch, incoming = incoming[:limit], incoming[limit:]
                    specs = [spec for _, spec in batch if not isinstance(spec, HandlerError)]
                    try:
                        done = iter(await self.handler.submit_many(specs) if specs else ())
                        outcomes = [
                            _Ack(i, None, spec) if isinstance(spec, HandlerError)
                            else _Ack(i, next(done), None)
                            for i, spec in batch
                        ]  # fmt: skip
                    except HandlerError as error:  # the whole batch (the queue is full)
                        outcomes = [
                            _Ack(i, None, spec if isinstance(spec, HandlerError) else error)
                            for i, spec in batch
                        ]
                    for outcome in outcomes:
                        acks.put_nowait(outcome)
                if closed:
                    acks.put_nowait(_CLOSE)  # the writer ends once what came before is sent
                    return

        async def write() -> None:
            nonlocal unacknowledged
            while True:
                batch = [await acks.get()]
                while not acks.empty():
                    batch.append(acks.get_nowait())
                if any(isinstance(item, _Ack) and item.submitted for item in batch):
                    await self.handler.commit()  # durable before anyone hears of it
                for item in batch:
                    if not isinstance(item, _Ack):
                        return
                    await context.write(self._ack(item))
                    unacknowledged -= 1

        reader = asyncio.create_task(read())
        submitter = asyncio.create_task(submit())
        writer = asyncio.create_task(write())
        tasks = (reader, submitter, writer)
        error: Exception | None = None
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if submitter.done():
                submitter.result()  # raises what is not one job's refusal
            if reader.done() and reader.exception() is not None:
                # The acknowledgements owed before the error go first, if the client reads
                # them; one that does not read is not waited for long.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(writer), STREAM_DRAIN)
                reader.result()  # raises the reader's error
            await writer  # raises the writer's error; returns once everything is sent
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            # None may be reading or writing when the call ends.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if error is not None:
            await fail(context, error, "SubmitJobStream")

    def _ack(self, ack: _Ack) -> job_service_pb2.SubmitJobStreamResponse:
        response = job_service_pb2.SubmitJobStreamResponse(index=ack.place)
        if ack.submitted is not None:
            submitted = response.submitted
            if ack.submitted.duplicate:
                submitted.duplicate = True
            self._reply_job(submitted.job, ack.submitted)
        elif ack.error is not None:
            error = response.error
            error.code = ack.error.code
            error.message = ack.error.message
            error.detail = ack.error.detail
        return response

    @unary
    async def GetJob(
        self, request: job_service_pb2.GetJobRequest, context: Context
    ) -> job_service_pb2.GetJobResponse:
        job = await self.handler.get(request.job_id)
        full = request.view == job_service_pb2.JOB_VIEW_FULL
        position = await self.handler.position_now(job)
        message = self._job(job, history=full, full_result=full, position=position)
        if full and job.result is None and job.result_in_file:
            result = await self.handler.load_result(job)
            if result is not None:
                message.full_result.CopyFrom(result)
        return job_service_pb2.GetJobResponse(job=message)

    @unary
    async def ListJobs(
        self, request: job_service_pb2.ListJobsRequest, context: Context
    ) -> job_service_pb2.ListJobsResponse:
        where = JobFilter(
            statuses=convert.enum_set(JobStatus, request.statuses, "status"),
            kinds=convert.enum_set(ObjectKind, request.kinds, "kind"),
            triggers=convert.enum_set(Trigger, request.triggers, "trigger"),
        )
        jobs, next_seq = await self.handler.page(
            where, decode_page_token(request.page_token), request.page_size
        )
        positions = await self.handler.positions(jobs)
        return job_service_pb2.ListJobsResponse(
            jobs=[
                self._job(job, position=position)
                for job, position in zip(jobs, positions, strict=True)
            ],
            next_page_token=encode_page_token(next_seq) if next_seq is not None else "",
        )

    @unary
    async def CancelJob(
        self, request: job_service_pb2.CancelJobRequest, context: Context
    ) -> job_service_pb2.CancelJobResponse:
        job = await self.handler.cancel(request.job_id, request.reason[:512])
        await self.handler.commit()
        return job_service_pb2.CancelJobResponse(job=self._job(job))

    async def WatchJobs(  # type: ignore[override]  # written with context.write
        self, request: job_service_pb2.WatchJobsRequest, context: Context
    ) -> None:
        """Every transition in order. Written with context.write so errors keep their code."""
        try:
            statuses = convert.enum_set(JobStatus, request.statuses, "status")
            if request.job_id:
                await self._watch_job(request.job_id, statuses, context)
            else:
                await self._watch_all(request.after_sequence, statuses, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await fail(context, exc, "WatchJobs")

    async def _watch_all(
        self, after_sequence: int, statuses: frozenset[JobStatus], context: Context
    ) -> None:
        """A cursor into the shared event log: a watcher that reads too slowly is ended with
        the last sequence it was sent, and may resume from there."""
        bus = self.handler.events
        self.handler.require_ready()
        try:
            feed = bus.open_feed(after_sequence)
        except FellBehind as behind:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"cannot resume after sequence {after_sequence}: {behind.detail}; list the jobs "
                "(ListJobs) and watch again without after_sequence",
                reason=Reason.OUT_OF_RANGE,
            ) from None
        task = asyncio.current_task()
        assert task is not None
        feed.on_cut = task.cancel  # a watcher blocked in a write cannot see the cut otherwise
        written = feed.last_sent
        try:
            # Headers go out once the feed exists: every later transition will reach it.
            await context.send_initial_metadata(())
            while True:
                entries = bus.read(feed, WATCH_BATCH)
                if not entries:
                    feed.changed.clear()
                    await feed.changed.wait()
                    continue
                self._flush_journal()
                for entry in entries:
                    if not statuses or entry.to_status in statuses:
                        await context.write(entry.payload)
                    written = entry.seq
        except (asyncio.CancelledError, FellBehind):
            if feed.cut is None:
                raise
            task.uncancel()
            raise self._fell_behind(feed, written) from None
        finally:
            bus.close_feed(feed)

    def _fell_behind(self, feed: Feed, written: int) -> HandlerError:
        return HandlerError(
            Catalogue.SYSTEM_ERROR,
            f"watcher ended: it fell more than {self.handler.events.lag_bytes} bytes of events "
            f"behind; the last event it was surely sent is sequence {written} (the next one may "
            f"have been in flight): watch again with after_sequence={written} to resume",
            reason=Reason.EXHAUSTED,
        )

    async def _watch_job(
        self, job_id: str, statuses: frozenset[JobStatus], context: Context
    ) -> None:
        """One job: first the job with its history, then its transitions until it is done."""
        job = await self.handler.get(job_id)
        bus = self.handler.events
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        queued = 0
        limit = bus.lag_bytes
        task = asyncio.current_task()
        assert task is not None
        cut = False

        def on_event(event_job: Job, transition: Transition) -> None:
            nonlocal queued, cut
            if cut:
                return
            message = job_service_pb2.WatchJobsResponse(sequence=bus.seq)
            mapping.set_job(message.job, event_job, position=self.handler.position(event_job))
            mapping.set_transition(message.transition, transition)
            size = message.ByteSize()
            queued += size
            if queued > limit:
                cut = True
                task.cancel()
                return
            outbox.put_nowait((message, size))

        subscription = Subscription(on_event, job_id, statuses)
        bus.subscribe(subscription)
        written = 0
        try:
            # The first message is the job with its history, taken in the same loop turn as
            # the subscription: every later move is queued after it. Decide on the status it
            # shows, not the live one.
            done = job.status.terminal
            first = job_service_pb2.WatchJobsResponse(job=self._job(job, history=True))
            await context.send_initial_metadata(())
            await context.write(first)
            if done:
                return
            while True:
                item, size = await outbox.get()
                queued -= size
                self._flush_journal()
                await context.write(item)
                written = item.sequence
                if JobStatus(item.job.status).terminal:
                    return
        except asyncio.CancelledError:
            if not cut:
                raise
            task.uncancel()
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"watcher of job {job_id} ended: it fell more than {limit} bytes of events "
                f"behind (the last event it was sent is sequence {written}); watch again",
                reason=Reason.EXHAUSTED,
            ) from None
        finally:
            bus.unsubscribe(subscription)

    @unary
    async def GetJobResult(
        self, request: job_service_pb2.GetJobResultRequest, context: Context
    ) -> job_service_pb2.GetJobResultResponse:
        job = await self.handler.get(request.job_id)
        result = await self.handler.load_result(job)
        if result is None or job.result_summary is None:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"job {job.id} is {job.status.name} and has no result yet",
                reason=Reason.FAILED_PRECONDITION,
            )
        return job_service_pb2.GetJobResultResponse(
            job_id=job.id, result=result, summary=job.result_summary
        )

    @unary
    async def RedeliverJob(
        self, request: job_service_pb2.RedeliverJobRequest, context: Context
    ) -> job_service_pb2.RedeliverJobResponse:
        job = await self.handler.redeliver(request.job_id)
        await self.handler.commit()
        return job_service_pb2.RedeliverJobResponse(job=self._job(job))

    @unary
    async def AcceptRisk(
        self, request: job_service_pb2.AcceptRiskRequest, context: Context
    ) -> job_service_pb2.AcceptRiskResponse:
        finding = request.finding_id.strip()
        if not finding or len(finding) > 256:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY,
                "finding_id is required (a CVE id, malware name or secret rule id, "
                "up to 256 characters)",
            )
        if not request.reason.strip():
            raise HandlerError(Catalogue.SCAN_PARAMS_EMPTY, "reason is required: say why")
        scope = convert.enum_value(Scope, request.scope, "scope", default=Scope.OBJECT)
        days = self.handler.config.risk_acceptance_days
        if request.HasField("duration"):
            seconds = request.duration.ToNanoseconds() / 1e9
            if seconds <= 0:
                raise HandlerError(Catalogue.SCAN_PARAMS_EMPTY, "duration must be positive")
            days = seconds / 86400
        acceptance, changed = await self.handler.accept_risk(
            finding, scope, request.job_id, request.reason[:1024], days
        )
        await self.handler.commit()
        return job_service_pb2.AcceptRiskResponse(
            acceptance=acceptance,
            verdicts_changed=changed.verdicts,
            summaries_changed=changed.summaries,
        )

    @unary
    async def ListRiskAcceptances(
        self, request: job_service_pb2.ListRiskAcceptancesRequest, context: Context
    ) -> job_service_pb2.ListRiskAcceptancesResponse:
        return job_service_pb2.ListRiskAcceptancesResponse(
            acceptances=self.handler.acceptance_records()
        )

    @unary
    async def RevokeRiskAcceptance(
        self, request: job_service_pb2.RevokeRiskAcceptanceRequest, context: Context
    ) -> job_service_pb2.RevokeRiskAcceptanceResponse:
        changed = await self.handler.revoke_acceptance(request.id)
        await self.handler.commit()
        return job_service_pb2.RevokeRiskAcceptanceResponse(
            verdicts_changed=changed.verdicts, summaries_changed=changed.summaries
        )

    @unary
    async def RematchJobs(
        self, request: job_service_pb2.RematchJobsRequest, context: Context
    ) -> job_service_pb2.RematchJobsResponse:
        kinds = set()
        for kind in request.kinds:
            if kind not in _KINDS:
                raise HandlerError(
                    Catalogue.SCAN_PARAMS_EMPTY,
                    f"kinds has {kind}, not an object kind: use OBJECT_KIND_IMAGE, _NODE or "
                    "_ARTIFACT",
                )
            kinds.add(ObjectKind(kind))
        queued = await self.handler.rematch(
            RematchFilter(
                kinds=frozenset(kinds),
                registry=request.registry,
                repository=request.repository,
                everything=request.all,
            )
        )
        await self.handler.commit()
        return job_service_pb2.RematchJobsResponse(queued=queued.queued, skipped=queued.skipped)

    @unary
    async def GetQueueStats(
        self, request: job_service_pb2.GetQueueStatsRequest, context: Context
    ) -> job_service_pb2.GetQueueStatsResponse:
        stats = await self.handler.stats()
        now = datetime.now(UTC)
        lanes = []
        for lane in Lane:
            oldest = stats.oldest_pending[lane]
            age = (now - oldest) if oldest is not None else timedelta(0)
            age_pb = duration_pb2.Duration()
            age_pb.FromTimedelta(age)
            lanes.append(
                job_service_pb2.LaneStats(
                    lane=mapping.pb_lane(lane),
                    pending=stats.pending_by_lane[lane],
                    oldest_pending_age=age_pb,
                )
            )
        counts = stats.by_status
        return job_service_pb2.GetQueueStatsResponse(
            pending=counts.get(JobStatus.PENDING, 0),
            in_progress=counts.get(JobStatus.IN_PROGRESS, 0),
            processing_results=counts.get(JobStatus.PROCESSING_RESULTS, 0),
            finished=counts.get(JobStatus.FINISHED, 0),
            error=counts.get(JobStatus.ERROR, 0),
            cancelled=counts.get(JobStatus.CANCELLED, 0),
            lanes=lanes,
            scanners_connected=stats.scanners_connected,
            scanners_free=stats.scanners_free,
            scanners_busy=stats.scanners_busy,
            free_slots=stats.free_slots,
            started_at=mapping.timestamp(stats.started_at),
            queue_limit=stats.queue_limit,
            result_backlog=stats.result_backlog,
            result_backlog_age=mapping.duration(stats.result_backlog_age),
            deliveries_owed=stats.deliveries_owed,
            deliveries_oldest_age=mapping.duration(stats.deliveries_oldest_age),
        )
