"""The ordered queue of PENDING jobs.

FIFO by arrival (``Job.seq``) within each lane; a job whose run failed goes back to its own
place, ahead of later arrivals, because the order is its arrival number, not the time it was
queued again. Jobs are kept per (lane, object kind) in sorted lists so that taking the next job
for a scanner costs O(log n) whatever the queue length, and a job's position is a bisection.

The interactive lane is served first with a bounded share: while both lanes have work for a
scanner, at most ``interactive_share`` of the jobs taken go to the interactive lane, so bulk
rescans never starve a person waiting on one scan and the bulk lane always moves too.
"""

from __future__ import annotations

from collections.abc import Iterable

from sortedcontainers import SortedKeyList

from server.model import Job, Lane, ObjectKind

ALL_KINDS: frozenset[ObjectKind] = frozenset(ObjectKind)


def _seq(job: Job) -> int:
    return job.seq


class JobQueue:
    def __init__(self, interactive_share: float = 0.8) -> None:
        if not 0.0 < interactive_share <= 1.0:
            raise ValueError("interactive_share must be in (0, 1]")
        self.interactive_share = interactive_share
        self._lists: dict[tuple[Lane, ObjectKind], SortedKeyList[Job, int]] = {
            (lane, kind): SortedKeyList(key=_seq) for lane in Lane for kind in ObjectKind
        }
        self._size = 0
        # Jobs taken from each lane while both lanes had work (the contended period).
        self._taken: dict[Lane, int] = {Lane.INTERACTIVE: 0, Lane.BULK: 0}

    def __len__(self) -> int:
        return self._size

    def __contains__(self, job: Job) -> bool:
        return job in self._lists[job.spec.lane, job.kind]

    def push(self, job: Job) -> None:
        self._lists[job.spec.lane, job.kind].add(job)
        self._size += 1

    def remove(self, job: Job) -> bool:
        jobs = self._lists[job.spec.lane, job.kind]
        if job not in jobs:
            return False
        jobs.remove(job)
        self._size -= 1
        return True

    def lane_size(self, lane: Lane) -> int:
        return sum(len(self._lists[lane, kind]) for kind in ObjectKind)

    def oldest(self, lane: Lane) -> Job | None:
        heads = [jobs[0] for kind in ObjectKind if (jobs := self._lists[lane, kind])]
        return min(heads, key=_seq, default=None)

    def position(self, job: Job) -> int:
        """1-based place among the PENDING jobs of the job's lane (1 = next to go)."""
        lane = job.spec.lane
        return 1 + sum(self._lists[lane, kind].bisect_key_left(job.seq) for kind in ObjectKind)

    def _head(self, lane: Lane, kinds: frozenset[ObjectKind]) -> Job | None:
        best: Job | None = None
        for kind in kinds:
            jobs = self._lists[lane, kind]
            if jobs and (best is None or jobs[0].seq < best.seq):
                best = jobs[0]
        return best

    def pop_for(self, kinds: frozenset[ObjectKind]) -> Job | None:
        """Take the next job a scanner of these kinds may run, or None."""
        interactive = self._head(Lane.INTERACTIVE, kinds)
        bulk = self._head(Lane.BULK, kinds)
        chosen: Job | None
        if interactive is not None and bulk is not None:
            taken_total = self._taken[Lane.INTERACTIVE] + self._taken[Lane.BULK]
            share_left = self._taken[Lane.INTERACTIVE] < self.interactive_share * (taken_total + 1)
            chosen = interactive if share_left else bulk
            self._taken[chosen.spec.lane] += 1
        else:
            # No contention: forget the counts so the next contended period starts fresh.
            self._taken[Lane.INTERACTIVE] = self._taken[Lane.BULK] = 0
            chosen = interactive or bulk
        if chosen is not None:
            self._lists[chosen.spec.lane, chosen.kind].remove(chosen)
            self._size -= 1
        return chosen

    def jobs(self, lanes: Iterable[Lane] = tuple(Lane)) -> list[Job]:
        """PENDING jobs in arrival order (for inspection; O(n))."""
        out = [job for lane in lanes for kind in ObjectKind for job in self._lists[lane, kind]]
        out.sort(key=_seq)
        return out
