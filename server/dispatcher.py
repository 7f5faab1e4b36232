"""Matching PENDING jobs to Free scanners.

Free sessions stand in a ring; each pass gives every Free scanner at most one job in ring order
and moves it to the back, so Free scanners share the work fairly. A pass stops as soon as the
queue is empty or no Free scanner can take any queued kind, so its cost follows the number of
assignments made, not the queue length. Jobs given to one scanner in one pass are sent together
in one assignment message.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from server.model import Job
from server.queue import JobQueue
from server.scanners import ScannerSession


class Dispatcher:
    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue
        self._free: OrderedDict[str, ScannerSession] = OrderedDict()

    def refresh(self, session: ScannerSession) -> None:
        """Call after anything that may change whether a session is Free."""
        if session.is_free:
            self._free.setdefault(session.session_id, session)
        else:
            self._free.pop(session.session_id, None)

    @property
    def free_sessions(self) -> int:
        return len(self._free)

    def dispatch(
        self, assign: Callable[[Job, ScannerSession], None]
    ) -> dict[ScannerSession, list[Job]]:
        """Assign as many jobs as there are free slots for; ``assign`` moves each job."""
        batches: dict[ScannerSession, list[Job]] = {}
        while self._queue and self._free:
            assigned_this_pass = False
            for session in list(self._free.values()):
                job = self._queue.pop_for(session.kinds)
                if job is None:
                    continue
                assign(job, session)
                batches.setdefault(session, []).append(job)
                assigned_this_pass = True
                self._free.move_to_end(session.session_id)
                self.refresh(session)
                if not self._queue:
                    break
            if not assigned_this_pass:
                break
        return batches
