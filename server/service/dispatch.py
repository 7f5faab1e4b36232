"""Dispatch: once per loop turn at most, the Free scanners in ring order ask the repository for
work; what each gets goes to it in one assignment message.

Many submits or results in one turn share one pass. While more results wait for the result
workers than ``--result-backlog-limit``, nothing new is assigned (back-pressure); every
finished result asks for a pass again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from server.scheduling.dispatcher import FreeRing
from server.service.sessions import AssignJobs, ScannerSession
from server.service.transitions import Transitions
from server.storage.repository import Claimed, Demand, JobRepository, Moved

log = structlog.get_logger("imagehandler")

Assigned = Callable[[ScannerSession, list[Moved]], None]


class Dispatch:
    def __init__(
        self,
        repository: JobRepository,
        transitions: Transitions,
        ring: FreeRing[ScannerSession],
        *,
        backlog: Callable[[], int],
        backlog_limit: int,
    ) -> None:
        self._repository = repository
        self._transitions = transitions
        self.ring = ring
        self._backlog = backlog
        self._backlog_limit = backlog_limit
        # The run supervisor's bookkeeping for jobs handed to a session (set by the handler).
        self.assigned: Assigned = lambda session, moves: None
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One claim at a time, so no two claims count the same free slots: a pass (clear
        # while it runs), or a loan of the Free scanners to a batch of inserts that claims in
        # its own transaction.
        self._pass_ended = asyncio.Event()
        self._pass_ended.set()
        self._loan: list[ScannerSession] | None = None
        self._skipped = False  # a pass was asked while the loan was out
        # Batches of inserts waiting for the running pass to lend them the Free scanners; no
        # new pass starts while one waits (see lend).
        self._lenders = 0
        self._room = True  # the last pass left a scanner Free
        repository.claim_with_inserts(self.lend, self.hand)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def request(self) -> None:
        """Dispatch soon, once: many requests in one loop turn share one pass."""
        self._wanted.set()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.once()
            except Exception:  # the dispatcher must outlive any one failed pass
                log.exception("dispatch.failed")

    async def lend(self) -> list[Demand]:
        """The Free scanners' demands for a batch of inserts that claims in its own
        transaction (the store calls it; see ``JobRepository.claim_with_inserts``), in ring
        order as a pass asks them; none while another loan is claiming.

        While a pass is claiming, and the last pass left scanners Free (the queue was empty
        when it claimed), the batch waits for the pass to end rather than go unclaimed. An
        unclaimed job waits for the next pass, a round trip more than the wait, and the pass
        its insert asks for would make the next batches go unclaimed in turn, so that under a
        steady trickle of single submits a share of them kept going that long way. When
        passes fill every Free scanner (a queue with a backlog), nothing would be left to lend
        after the pass, and the batch goes at once, unclaimed, beside it."""
        if not self._pass_ended.is_set() and self._room:
            self._lenders += 1
            try:
                await self._pass_ended.wait()
            except BaseException:
                self._lenders -= 1
                self._resume()
                raise
            self._lenders -= 1
        if (
            not self._pass_ended.is_set()
            or self._loan is not None
            or self._backlog() >= self._backlog_limit
        ):
            self._resume()
            return []
        sessions = self.ring.members()
        if not sessions:
            self._resume()
            return []
        self._loan = sessions
        return [Demand(s.scanner_id, s.kinds, s.free_slots) for s in sessions]

    def _resume(self) -> None:
        """A pass skipped for a loan that did not come is asked again."""
        if self._skipped and self._loan is None and not self._lenders:
            self._skipped = False
            self.request()

    def hand(self, claimed: list[Claimed]) -> None:
        """What a loan's demands took: sent as a pass sends it; the loan ends."""
        sessions, self._loan = self._loan, None
        if sessions is None:
            return
        for session in self._hand_out(sessions, claimed):
            self.ring.took(session)
        if self._skipped:
            self._skipped = False
            self.request()

    async def once(self) -> None:
        if self._backlog() >= self._backlog_limit:
            return
        if self._loan is not None or self._lenders:
            # The loan's claim serves these scanners; a pass follows it.
            self._skipped = True
            return
        self._pass_ended.clear()
        try:
            await self._pass()
        finally:
            self._pass_ended.set()

    async def _pass(self) -> None:
        wanted = self._repository.pending_hint()
        if wanted == 0:
            return
        # Ask the Free scanners in ring order, a chunk at a time: as many as there are jobs
        # (a store that cannot tell without I/O gets every Free scanner at once). Another chunk
        # is asked only while jobs are left, e.g. for kinds the first chunk does not take, so a
        # pass costs what it hands out, not the number of idle scanners; chunks at least double,
        # so jobs no Free scanner takes cost a few claims, not one per scanner.
        took: list[ScannerSession] = []
        start = 0
        size = wanted
        while True:
            sessions = self.ring.members(start, size)
            if not sessions:
                break
            start += len(sessions)
            took += self._hand_out(
                sessions,
                await self._repository.claim(
                    [Demand(s.scanner_id, s.kinds, s.free_slots) for s in sessions],
                    at=datetime.now(UTC),
                ),
            )
            wanted = self._repository.pending_hint()
            if not wanted:
                break
            size = max(wanted, 2 * len(sessions))
        # Reordered only after the pass, so the chunks above are consecutive slices of one ring.
        for session in took:
            self.ring.took(session)
        self._room = len(self.ring) > 0

    def _hand_out(
        self, sessions: list[ScannerSession], claimed: list[Claimed]
    ) -> list[ScannerSession]:
        """Send each session what it claimed; the sessions that took a job, once per job."""
        batches: dict[int, list[Moved]] = {}
        for item in claimed:
            batches.setdefault(item.demand, []).append(item.moved)
            self._transitions.moved(item.moved)
        for index, moves in batches.items():
            session = sessions[index]
            self.assigned(session, moves)  # ends the runs at once if the session left meanwhile
            if session.connected:
                session.send(AssignJobs(tuple(moved.job for moved in moves)))
        return [sessions[item.demand] for item in claimed]
