"""The job state machine: the only code that changes a job's status.

Everything else asks :func:`move` to move a job; an illegal move raises instead of corrupting
state. Each move updates the job's timestamps and run counter and appends to its history.
"""

from __future__ import annotations

from datetime import datetime

from imagehandler.errors import Catalogue, HandlerError
from server.core.model import Job, JobFailure, JobStatus, Transition

S = JobStatus

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # Straight to PROCESSING_RESULTS, with no run: a stored result reused by digest.
    S.PENDING: frozenset({S.IN_PROGRESS, S.CANCELLED, S.PROCESSING_RESULTS}),
    # Back to PENDING: the run ended without a result and another run is allowed.
    S.IN_PROGRESS: frozenset({S.PROCESSING_RESULTS, S.PENDING, S.ERROR, S.CANCELLED}),
    # Back to PENDING only when a crash lost a result before it was stored: run again.
    S.PROCESSING_RESULTS: frozenset({S.FINISHED, S.ERROR, S.PENDING}),
    S.FINISHED: frozenset(),
    # Back to PROCESSING_RESULTS only to deliver a kept result again (RedeliverJob).
    S.ERROR: frozenset({S.PROCESSING_RESULTS}),
    S.CANCELLED: frozenset(),
}


class IllegalTransition(HandlerError):
    def __init__(self, job: Job, to_status: JobStatus) -> None:
        super().__init__(
            Catalogue.SYSTEM_ERROR,
            f"job {job.id} cannot move from {job.status.name} to {to_status.name}",
        )


def can_move(job: Job, to_status: JobStatus) -> bool:
    return to_status in ALLOWED[job.status]


def record_creation(job: Job, at: datetime, reason: str = "submitted") -> Transition:
    """The first history entry of a new (PENDING) job."""
    transition = Transition(None, JobStatus.PENDING, at, "", 0, reason)
    job.history.append(transition)
    job.updated_at = at
    return transition


def move(
    job: Job,
    to_status: JobStatus,
    *,
    at: datetime,
    reason: str,
    scanner_id: str = "",
    error: JobFailure | None = None,
) -> Transition:
    """Move ``job`` to ``to_status`` or raise :class:`IllegalTransition`."""
    if not can_move(job, to_status):
        raise IllegalTransition(job, to_status)
    from_status = job.status
    if to_status is JobStatus.IN_PROGRESS:
        # A run counts when the job is assigned.
        job.runs += 1
        job.started_at = at
        job.scanner_id = scanner_id
    if error is not None:
        job.error = error
    elif to_status is JobStatus.FINISHED:
        # Finished means nothing is wrong now; the history keeps every failure on the way.
        job.error = None
    if to_status.terminal:
        job.finished_at = at
    job.status = to_status
    job.updated_at = at
    transition = Transition(
        from_status, to_status, at, scanner_id or job.scanner_id, job.runs, reason, error
    )
    job.history.append(transition)
    return transition
