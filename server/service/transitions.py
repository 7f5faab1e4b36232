"""After every status change: the log line, the event for watchers and listeners, and the
delivery the receiving server is now owed. The repository makes the change (through the state
machine); this is the one place the rest of the handler hears of it, in the same loop turn."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import structlog

from server.core.model import Job, JobStatus, Transition
from server.observability import logs
from server.service.events import EventBus
from server.storage.repository import Moved

log = structlog.get_logger("imagehandler")


class Transitions:
    def __init__(self, events: EventBus) -> None:
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

    def all_moved(self, moves: Iterable[Moved]) -> None:
        for moved in moves:
            self.moved(moved)
