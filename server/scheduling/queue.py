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

import operator
from collections.abc import Iterable
from itertools import compress
from typing import TypeAlias

from sortedcontainers import SortedKeyList

from server.core.model import Job, Lane, ObjectKind

ALL_KINDS: frozenset[ObjectKind] = frozenset(ObjectKind)
# Iterating an enum class runs Python code each time; a tuple does not.
_KINDS = tuple(ObjectKind)


# C calls, not Python functions: the sorted lists call the key at every insertion, and
# recovery sorts a million jobs with it.
_seq = operator.attrgetter("seq")
_LANE = operator.attrgetter("spec.lane")
_KIND = operator.attrgetter("kind")


JobList: TypeAlias = "SortedKeyList[Job, int]"  # jobs by seq


class JobQueue:
    def __init__(self, interactive_share: float = 0.8) -> None:
        if not 0.0 < interactive_share <= 1.0:
            raise ValueError("interactive_share must be in (0, 1]")
        self.interactive_share = interactive_share
        self._lists: dict[tuple[Lane, ObjectKind], JobList] = {
            (lane, kind): SortedKeyList(key=_seq) for lane in Lane for kind in ObjectKind
        }
        # For each scanner's kinds (a frozenset caches its hash; a (lane, kind) key is built
        # and hashed at every lookup): the lists it takes from, interactive lane first.
        self._by_kinds: dict[frozenset[ObjectKind], tuple[tuple[JobList, ...], ...]] = {}
        self._lane_sizes: dict[Lane, int] = {Lane.INTERACTIVE: 0, Lane.BULK: 0}
        self._size = 0
        # Jobs taken from each lane while both lanes had work (the contended period).
        self._taken: dict[Lane, int] = {Lane.INTERACTIVE: 0, Lane.BULK: 0}

    def __len__(self) -> int:
        return self._size

    def __contains__(self, job: Job) -> bool:
        return job in self._lists[job.spec.lane, job.kind]

    def push(self, job: Job) -> None:
        lane = job.spec.lane
        self._lists[lane, job.kind].add(job)
        self._lane_sizes[lane] += 1
        self._size += 1

    def push_many(self, jobs: Iterable[Job]) -> None:
        """:meth:`push` for many jobs at once (recovery): each list is sorted once, not
        searched once per job, and the jobs are parted among the lists a C pass per list
        (few lists; nearly always one)."""
        some_jobs = list(jobs)
        places = list(zip(map(_LANE, some_jobs), map(_KIND, some_jobs), strict=True))
        for lane, kind in set(places):
            some = list(compress(some_jobs, map((lane, kind).__eq__, places)))
            self._lists[lane, kind].update(some)
            self._lane_sizes[lane] += len(some)
            self._size += len(some)

    def remove(self, job: Job) -> bool:
        lane = job.spec.lane
        jobs = self._lists[lane, job.kind]
        if job not in jobs:
            return False
        jobs.remove(job)
        self._lane_sizes[lane] -= 1
        self._size -= 1
        return True

    def lane_size(self, lane: Lane) -> int:
        return self._lane_sizes[lane]

    def oldest(self, lane: Lane) -> Job | None:
        heads = [jobs[0] for kind in _KINDS if (jobs := self._lists[lane, kind])]
        return min(heads, key=_seq, default=None)

    def position(self, job: Job) -> int:
        """1-based place among the PENDING jobs of the job's lane (1 = next to go)."""
        lane = job.spec.lane
        seq = job.seq
        ahead = 0
        for kind in _KINDS:
            jobs = self._lists[lane, kind]
            if not jobs:
                continue
            last = jobs[-1].seq  # usually the newest job asks: no bisection then
            if last < seq:
                ahead += len(jobs)
            elif last == seq:
                ahead += len(jobs) - 1
            else:
                ahead += jobs.bisect_key_left(seq)
        return 1 + ahead

    def _lists_for(self, kinds: frozenset[ObjectKind]) -> tuple[tuple[JobList, ...], ...]:
        """(interactive lists, bulk lists) a scanner of ``kinds`` takes from."""
        found = self._by_kinds.get(kinds)
        if found is None:
            found = tuple(
                tuple(self._lists[lane, kind] for kind in sorted(kinds))
                for lane in (Lane.INTERACTIVE, Lane.BULK)
            )
            self._by_kinds[kinds] = found
        return found

    @staticmethod
    def _head(lists: tuple[JobList, ...]) -> JobList | None:
        """The list whose first job arrived first."""
        best: JobList | None = None
        for jobs in lists:
            if jobs and (best is None or jobs[0].seq < best[0].seq):
                best = jobs
        return best

    def pop_for(self, kinds: frozenset[ObjectKind]) -> Job | None:
        """Take the next job a scanner of these kinds may run, or None."""
        if not self._size:
            self._taken[Lane.INTERACTIVE] = self._taken[Lane.BULK] = 0
            return None
        interactive_lists, bulk_lists = self._lists_for(kinds)
        interactive = self._head(interactive_lists) if self._lane_sizes[Lane.INTERACTIVE] else None
        bulk = self._head(bulk_lists) if self._lane_sizes[Lane.BULK] else None
        chosen: JobList | None
        lane: Lane
        if interactive is not None and bulk is not None:
            taken = self._taken
            taken_total = taken[Lane.INTERACTIVE] + taken[Lane.BULK]
            share_left = taken[Lane.INTERACTIVE] < self.interactive_share * (taken_total + 1)
            chosen, lane = (interactive, Lane.INTERACTIVE) if share_left else (bulk, Lane.BULK)
            taken[lane] += 1
        else:
            # No contention: forget the counts so the next contended period starts fresh.
            self._taken[Lane.INTERACTIVE] = self._taken[Lane.BULK] = 0
            if interactive is not None:
                chosen, lane = interactive, Lane.INTERACTIVE
            elif bulk is not None:
                chosen, lane = bulk, Lane.BULK
            else:
                return None
        job: Job = chosen.pop(0)
        self._lane_sizes[lane] -= 1
        self._size -= 1
        return job

    def jobs(self, lanes: Iterable[Lane] = tuple(Lane)) -> list[Job]:
        """PENDING jobs in arrival order (for inspection; O(n))."""
        out = [job for lane in lanes for kind in ObjectKind for job in self._lists[lane, kind]]
        out.sort(key=_seq)
        return out
