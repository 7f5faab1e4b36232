"""The job book: submitting, reading, listing, cancelling and pruning jobs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import structlog

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.v1 import common_pb2
from server.config import Config
from server.core.model import Job, JobSpec, JobStatus
from server.service.rematch import Reuse
from server.service.runs import RunSupervisor
from server.service.transitions import Transitions
from server.storage.repository import Inserted, JobFilter, JobRepository, Moved

log = structlog.get_logger("imagehandler")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
PENDING = frozenset({JobStatus.PENDING})


# What a submit answers per job: the job, whether it existed already, and (for a new job) its
# reply built once with its stored record.
Submitted = Inserted


class JobBook:
    def __init__(
        self,
        config: Config,
        repository: JobRepository,
        transitions: Transitions,
        runs: RunSupervisor,
        *,
        request_dispatch: Callable[[], None],
        reuse: Reuse | None = None,
    ) -> None:
        self.config = config
        self._reuse = reuse
        self._repository = repository
        self._transitions = transitions
        self._runs = runs
        self._request_dispatch = request_dispatch

    async def submit_many(self, specs: Sequence[JobSpec]) -> list[Submitted]:
        """Queue jobs (or return the existing job for the same key or object); they are
        stored before this returns (await the handler's ``commit()`` before acknowledging).
        When the store fails nothing is queued."""
        if len(specs) > self.config.max_batch:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY,
                f"{len(specs)} jobs in one batch; at most {self.config.max_batch} are allowed",
            )
        reused: dict[int, common_pb2.ScanResult] = {}
        if self._reuse is not None and self._reuse.window > 0:  # no coroutine on the hot path
            specs, reused = await self._reuse.prepare(specs)
        inserted = await self._repository.insert_many(
            specs, at=datetime.now(UTC), queue_limit=self.config.queue_limit
        )
        created = self._transitions.created
        for item in inserted:
            if not item.duplicate:
                created(item.job, item.job.history[0])
        if reused and self._reuse is not None:
            await self._reuse.finish(inserted, reused)
        self._request_dispatch()
        return inserted

    async def get(self, job_id: str) -> Job:
        if not job_id:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID, "job_id is empty; pass the id SubmitJob returned"
            )
        try:
            uuid.UUID(job_id)
        except ValueError:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"{job_id[:80]!r} is not a job id (job ids are UUIDs as SubmitJob returns them)",
            ) from None
        job = await self._repository.get(job_id)
        if job is None:
            raise HandlerError(
                Catalogue.JOB_ID_INVALID, f"no job with id {job_id}", reason=Reason.NOT_FOUND
            )
        return job

    async def page(
        self, where: JobFilter, after_seq: int, page_size: int
    ) -> tuple[list[Job], int | None]:
        """A page of jobs in arrival order after ``after_seq``; the next cursor or None."""
        size = page_size or DEFAULT_PAGE_SIZE
        if size < 0 or size > MAX_PAGE_SIZE:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY, f"page_size {page_size} must be 0..{MAX_PAGE_SIZE}"
            )
        return await self._repository.page(where, after_seq, size)

    async def cancel(self, job_id: str, reason: str = "") -> Job:
        job = await self.get(job_id)
        why = reason or "cancelled by a client"
        moved: Moved | None = None
        if job.status is JobStatus.PENDING:
            moved = await self._transitions.move(
                job.id, JobStatus.CANCELLED, expect=PENDING, reason=why
            )
        elif job.status is JobStatus.IN_PROGRESS:
            moved = await self._runs.cancel(job, why)
        if moved is None:
            job = await self.get(job_id)
            raise HandlerError(
                Catalogue.JOB_ID_INVALID,
                f"job {job.id} is {job.status.name}; only PENDING or IN_PROGRESS jobs can be "
                "cancelled",
                reason=Reason.FAILED_PRECONDITION,
            )
        return moved.job

    async def prune(self, now: datetime) -> int:
        """Forget FINISHED, ERROR and CANCELLED jobs older than the retention period."""
        cutoff = now - timedelta(days=self.config.retention_days)
        pruned = await self._repository.prune(cutoff)
        if pruned:
            log.info("jobs.pruned", count=len(pruned), older_than=cutoff.isoformat())
        return len(pruned)
