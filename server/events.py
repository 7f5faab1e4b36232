"""Job events for watchers: every transition, in order, the moment it happens.

Subscribers are called synchronously inside the transition, so each sees the job exactly as the
transition left it (the transport snapshots it there) and in the order transitions happened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.model import Job, JobStatus, Transition

Listener = Callable[[Job, Transition], None]


@dataclass(eq=False)
class Subscription:
    listener: Listener
    job_id: str = ""
    statuses: frozenset[JobStatus] = frozenset()

    def wants(self, job: Job, transition: Transition) -> bool:
        if self.job_id and job.id != self.job_id:
            return False
        return not self.statuses or transition.to_status in self.statuses


class EventBus:
    def __init__(self) -> None:
        self._all: list[Subscription] = []
        self._by_job: dict[str, list[Subscription]] = {}

    def subscribe(self, subscription: Subscription) -> None:
        if subscription.job_id:
            self._by_job.setdefault(subscription.job_id, []).append(subscription)
        else:
            self._all.append(subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription.job_id:
            subs = self._by_job.get(subscription.job_id, [])
            if subscription in subs:
                subs.remove(subscription)
            if not subs:
                self._by_job.pop(subscription.job_id, None)
        elif subscription in self._all:
            self._all.remove(subscription)

    def publish(self, job: Job, transition: Transition) -> None:
        for subscription in (*self._all, *self._by_job.get(job.id, ())):
            if subscription.wants(job, transition):
                subscription.listener(job, transition)
