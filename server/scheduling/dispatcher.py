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
from itertools import islice

from server.core.model import Job
from server.scanners import ScannerSession
from server.scheduling.queue import JobQueue


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
        """Assign as many jobs as there are free slots for; ``assign`` moves each job.

        A pass visits the sessions that are Free at its start in ring order. Sessions that take
        a job go to the back of the ring; the others stay in front, so the next session to
        visit is always the one after the ones skipped so far. Sessions are read from the ring
        a few at a time (no more than there are jobs), so a pass costs what it assigns, not
        the number of Free scanners.
        """
        batches: dict[ScannerSession, list[Job]] = {}
        queue = self._queue
        free = self._free
        while queue and free:
            assigned_this_pass = False
            skipped = 0  # sessions at the front of the ring that took nothing in this pass
            unvisited = len(free)
            while unvisited and queue:
                chunk = list(islice(free.values(), skipped, skipped + min(unvisited, len(queue))))
                unvisited -= len(chunk)
                for session in chunk:
                    job = queue.pop_for(session.kinds)
                    if job is None:
                        skipped += 1
                        continue
                    assign(job, session)
                    batch = batches.get(session)
                    if batch is None:
                        batches[session] = [job]
                    else:
                        batch.append(job)
                    assigned_this_pass = True
                    free.move_to_end(session.session_id)
                    self.refresh(session)
                    if not queue:
                        break
            if not assigned_this_pass:
                break
        return batches
