"""The one place the service changes a job's status: :meth:`Transitions.move` asks the
repository for the move (a compare-and-set through the state machine) and, when it is made,
writes the log line, publishes the event for watchers and listeners, and owes the receiving
server the change, in the same loop turn. Moves the repository makes itself (a claim) are
published through :meth:`Transitions.moved`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from server.core.model import Job, JobFailure, JobStatus, Transition
from server.observability import logs
from server.service.events import EventBus
from server.storage.repository import JobRepository, Moved

log = structlog.get_logger("imagehandler")


class Transitions:
    def __init__(self, repository: JobRepository, events: EventBus) -> None:
        self._repository = repository
        self.events = events
        # The delivery outbox's owe(job_id), when a receiving server is configured.
        self.owe: Callable[[str], None] | None = None

    def created(self, job: Job, transition: Transition) -> None:
        if logs.enabled(logging.INFO):  # the fields cost more than the check
            log.info(
                "job.submitted",
                job_id=job.id,
                kind=job.kind.name,
                object=job.spec.target.display(),
                trigger=job.spec.trigger.name,
                lane=job.spec.lane.name,
                status=JobStatus.PENDING.name,
            )
        self.events.publish(job, transition)
        if self.owe is not None:
            self.owe(job.id)

    def moved(self, moved: Moved) -> None:
        job, transition = moved.job, moved.transition
        if logs.enabled(logging.INFO):
            error = transition.error
            log.info(
                "job.transition",
                job_id=job.id,
                scanner_id=transition.scanner_id,
                run=job.runs,
                from_status=transition.from_status.name if transition.from_status else None,
                status=transition.to_status.name,
                reason=transition.reason,
                error=error.message if error else None,
            )
        self.events.publish(job, transition)
        if self.owe is not None:
            self.owe(job.id)

    async def move(
        self,
        job_id: str,
        to_status: JobStatus,
        *,
        expect: frozenset[JobStatus],
        run: int = 0,
        reason: str,
        error: JobFailure | None = None,
        result: Any = None,
        summary: Any = None,
    ) -> Moved | None:
        """Move the job if it is in ``expect`` (and that run); None when another move won."""
        moved = await self._repository.move(
            job_id,
            to_status,
            expect=expect,
            run=run,
            at=datetime.now(UTC),
            reason=reason,
            error=error,
            result=result,
            summary=summary,
        )
        if moved is not None:
            self.moved(moved)
        return moved

    async def settle(
        self,
        job_id: str,
        *,
        run: int,
        result: Any,
        received_at: datetime,
        summary: Any,
    ) -> list[Moved]:
        """A result processed as it arrived: PROCESSING_RESULTS and FINISHED in one write
        (the repository's ``settle``), each move published as :meth:`move` does."""
        moves = await self._repository.settle(
            job_id,
            run=run,
            result=result,
            received_at=received_at,
            summary=summary,
            stored_at=datetime.now(UTC),
        )
        for moved in moves:
            self.moved(moved)
        return moves
