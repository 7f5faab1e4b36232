"""JobService: submit, read, list, cancel and watch jobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2

from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from server.errors import Catalogue, HandlerError
from server.events import Subscription
from server.job_manager import JobManager, Submitted, now_utc
from server.model import Job, JobStatus, Lane, ObjectKind, Transition, Trigger
from server.transport import convert
from server.transport.guard import Context, fail, log, unary
from server.verdicts import Scope

# A watcher that falls this far behind is ended with an error rather than silently skipped.
WATCH_BUFFER = 10_000
_CLOSE = object()


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
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def _job(self, job: Job, *, history: bool = False, full_result: bool = False) -> common_pb2.Job:
        return convert.job_to_proto(
            job, position=self.manager.position(job), history=history, full_result=full_result
        )

    def _reply_job(self, message: common_pb2.Job, submitted: Submitted) -> None:
        if submitted.message is not None:
            # A new job as it was queued (built with its journal record). Dispatch runs while
            # the journal syncs, so a Free scanner may hold it already: WatchJobs tells.
            message.CopyFrom(submitted.message)
        else:  # a duplicate: as it is now
            convert.set_job(message, submitted.job, position=self.manager.position(submitted.job))

    def _flush_journal(self) -> None:
        """Watchers see only what the journal has (unless it is failing: then say so)."""
        try:
            self.manager.store.flush()
        except HandlerError as error:
            log.error("journal.flush_failed", error=error.message)

    @unary
    async def SubmitJob(
        self, request: job_service_pb2.SubmitJobRequest, context: Context
    ) -> job_service_pb2.SubmitJobResponse:
        spec = convert.spec_from_request(request, self.manager.config)
        submitted = self.manager.submit(spec)
        await self.manager.store.sync()
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
                specs.append(convert.spec_from_request(item, self.manager.config))
            except HandlerError as error:
                # Name the bad job; nothing of the batch is queued.
                raise HandlerError(
                    error.kind, f"jobs[{index}]: {error.detail}", status=error.status
                ) from None
        submitted = self.manager.submit_many(specs)
        await self.manager.store.sync()
        # Filled in place: a message passed to a constructor is copied.
        response = job_service_pb2.SubmitJobsResponse()
        add = response.results.add
        for one in submitted:
            result = add()
            self._reply_job(result.job, one)
            if one.duplicate:
                result.duplicate = True
        return response

    @unary
    async def GetJob(
        self, request: job_service_pb2.GetJobRequest, context: Context
    ) -> job_service_pb2.GetJobResponse:
        job = self.manager.get(request.job_id)
        full = request.view == job_service_pb2.JOB_VIEW_FULL
        message = self._job(job, history=full, full_result=full)
        if full and job.result is None and job.result_in_file:
            result = await self.manager.load_result(job)
            if result is not None:
                message.full_result.CopyFrom(result)
        return job_service_pb2.GetJobResponse(job=message)

    @unary
    async def ListJobs(
        self, request: job_service_pb2.ListJobsRequest, context: Context
    ) -> job_service_pb2.ListJobsResponse:
        jobs, next_seq = self.manager.list_jobs(
            statuses=convert.enum_set(JobStatus, request.statuses, "status"),
            kinds=convert.enum_set(ObjectKind, request.kinds, "kind"),
            triggers=convert.enum_set(Trigger, request.triggers, "trigger"),
            after_seq=decode_page_token(request.page_token),
            page_size=request.page_size,
        )
        return job_service_pb2.ListJobsResponse(
            jobs=[self._job(job) for job in jobs],
            next_page_token=encode_page_token(next_seq) if next_seq is not None else "",
        )

    @unary
    async def CancelJob(
        self, request: job_service_pb2.CancelJobRequest, context: Context
    ) -> job_service_pb2.CancelJobResponse:
        job = self.manager.cancel(request.job_id, request.reason[:512])
        await self.manager.store.sync()
        return job_service_pb2.CancelJobResponse(job=self._job(job))

    async def WatchJobs(  # type: ignore[override]  # written with context.write
        self, request: job_service_pb2.WatchJobsRequest, context: Context
    ) -> None:
        """Every transition in order. Written with context.write so errors keep their code."""
        subscription: Subscription | None = None
        try:
            statuses = convert.enum_set(JobStatus, request.statuses, "status")
            job = self.manager.get(request.job_id) if request.job_id else None
            outbox: asyncio.Queue[Any] = asyncio.Queue()

            def on_event(event_job: Job, transition: Transition) -> None:
                if outbox.qsize() >= WATCH_BUFFER:
                    outbox.put_nowait(_CLOSE)
                    return
                outbox.put_nowait(
                    job_service_pb2.WatchJobsResponse(
                        job=self._job(event_job),
                        transition=convert.transition_to_proto(transition),
                    )
                )

            subscription = Subscription(on_event, request.job_id, statuses)
            self.manager.events.subscribe(subscription)
            # The first message of a single-job watch is the job with its history, taken in
            # the same loop turn as the subscription: every later move is queued after it.
            # Decide on the status it shows, not the live one.
            first = None
            done = False
            if job is not None:
                done = job.status.terminal
                first = job_service_pb2.WatchJobsResponse(job=self._job(job, history=True))
            # Headers go out once the watch is subscribed: a client that awaits them knows
            # that every later transition will reach it.
            await context.send_initial_metadata(())
            if first is not None:
                await context.write(first)
                if done:
                    return
            while True:
                item = await outbox.get()
                if item is _CLOSE:
                    raise HandlerError(
                        Catalogue.SYSTEM_ERROR,
                        f"watcher fell {WATCH_BUFFER} events behind and was ended; watch again",
                        status=Catalogue.SYSTEM_ERROR.entry.statuses[1],
                    )
                self._flush_journal()
                await context.write(item)
                if job is not None and JobStatus(item.job.status).terminal:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await fail(context, exc, "WatchJobs")
        finally:
            if subscription is not None:
                self.manager.events.unsubscribe(subscription)

    @unary
    async def GetJobResult(
        self, request: job_service_pb2.GetJobResultRequest, context: Context
    ) -> job_service_pb2.GetJobResultResponse:
        job = self.manager.get(request.job_id)
        result = await self.manager.load_result(job)
        if result is None or job.result_summary is None:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"job {job.id} is {job.status.name} and has no result yet",
                status=Catalogue.JOB_ID_INVALID.entry.statuses[2],
            )
        return job_service_pb2.GetJobResultResponse(
            job_id=job.id, result=result, summary=job.result_summary
        )

    @unary
    async def RedeliverJob(
        self, request: job_service_pb2.RedeliverJobRequest, context: Context
    ) -> job_service_pb2.RedeliverJobResponse:
        job = self.manager.redeliver(request.job_id)
        await self.manager.store.sync()
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
        days = self.manager.config.risk_acceptance_days
        if request.HasField("duration"):
            seconds = request.duration.ToNanoseconds() / 1e9
            if seconds <= 0:
                raise HandlerError(Catalogue.SCAN_PARAMS_EMPTY, "duration must be positive")
            days = seconds / 86400
        acceptance, changed = self.manager.accept_risk(
            finding, scope, request.job_id, request.reason[:1024], days
        )
        await self.manager.store.sync()
        return job_service_pb2.AcceptRiskResponse(acceptance=acceptance, verdicts_changed=changed)

    @unary
    async def ListRiskAcceptances(
        self, request: job_service_pb2.ListRiskAcceptancesRequest, context: Context
    ) -> job_service_pb2.ListRiskAcceptancesResponse:
        return job_service_pb2.ListRiskAcceptancesResponse(
            acceptances=self.manager.acceptance_records()
        )

    @unary
    async def RevokeRiskAcceptance(
        self, request: job_service_pb2.RevokeRiskAcceptanceRequest, context: Context
    ) -> job_service_pb2.RevokeRiskAcceptanceResponse:
        changed = self.manager.revoke_acceptance(request.id)
        await self.manager.store.sync()
        return job_service_pb2.RevokeRiskAcceptanceResponse(verdicts_changed=changed)

    @unary
    async def GetQueueStats(
        self, request: job_service_pb2.GetQueueStatsRequest, context: Context
    ) -> job_service_pb2.GetQueueStatsResponse:
        stats = self.manager.stats()
        now = now_utc()
        lanes = []
        for lane in Lane:
            oldest = stats.oldest_pending[lane]
            age = (now - oldest) if oldest is not None else timedelta(0)
            age_pb = duration_pb2.Duration()
            age_pb.FromTimedelta(age)
            lanes.append(
                job_service_pb2.LaneStats(
                    lane=convert.pb_lane(lane),
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
            started_at=convert.timestamp(stats.started_at),
            queue_limit=stats.queue_limit,
            result_backlog=stats.result_backlog,
            result_backlog_age=convert.duration(self.manager.results.oldest_age()),
        )
