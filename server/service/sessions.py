"""Scanner sessions: who is connected, what each can scan, how many slots it has free; their
connection, Free state and watchdogs.

A session is one Connect stream. The handler counts the jobs each session holds itself, so a
scanner is FREE exactly when it is accepting work, not draining, and holds fewer jobs than slots.
Messages to the scanner go through ``send``, which the transport implements; this module knows
nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog

from imagehandler.errors import Catalogue, HandlerError, Reason
from server.config import Config
from server.core.model import Job, ObjectKind, Policy
from server.core.retry import RunFailure
from server.scheduling.dispatcher import FreeRing

log = structlog.get_logger("imagehandler")


class ScannerStatus(enum.IntEnum):
    FREE = 1
    BUSY = 2
    DRAINING = 3
    DISCONNECTED = 4


@dataclass(frozen=True)
class Database:
    name: str
    version: str
    released_at: str


@dataclass(frozen=True)
class ScannerProfile:
    """What a scanner said about itself at registration, validated."""

    scanner_id: str
    version: str
    engine: str
    kinds: frozenset[ObjectKind]
    slots: int
    databases: tuple[Database, ...]
    proxy_url: str = ""
    policies: tuple[Policy, ...] = ()


@dataclass(frozen=True)
class AssignJobs:
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class CancelRun:
    job_id: str
    reason: str


@dataclass(frozen=True)
class DrainScanner:
    """The handler is shutting down: finish running jobs, expect no new ones."""


@dataclass(frozen=True)
class RejectMessage:
    error: HandlerError
    job_id: str = ""


ScannerMessage = AssignJobs | CancelRun | DrainScanner | RejectMessage


@dataclass(eq=False)
class ScannerSession:
    profile: ScannerProfile
    session_id: str
    connected_at: datetime
    send: Callable[[ScannerMessage], None]
    # Ends the stream; the transport implements it.
    close: Callable[[HandlerError], None]
    last_seen_at: datetime
    last_seen: float  # loop time
    accepting: bool = False
    draining: bool = False
    connected: bool = True
    held: dict[str, Job] = field(default_factory=dict)
    jobs_finished: int = 0
    jobs_failed: int = 0

    @property
    def scanner_id(self) -> str:
        return self.profile.scanner_id

    @property
    def kinds(self) -> frozenset[ObjectKind]:
        return self.profile.kinds

    @property
    def free_slots(self) -> int:
        return max(0, self.profile.slots - len(self.held))

    @property
    def is_free(self) -> bool:
        return self.connected and self.accepting and not self.draining and self.free_slots > 0

    @property
    def status(self) -> ScannerStatus:
        if not self.connected:
            return ScannerStatus.DISCONNECTED
        if self.draining:
            return ScannerStatus.DRAINING
        return ScannerStatus.FREE if self.is_free else ScannerStatus.BUSY


class ScannerRegistry:
    """Connected sessions by scanner id, and the last session of scanners that left."""

    def __init__(self, keep_disconnected: int = 1000) -> None:
        self._live: dict[str, ScannerSession] = {}
        self._gone: dict[str, ScannerSession] = {}
        self._keep_disconnected = keep_disconnected

    def live(self, scanner_id: str) -> ScannerSession | None:
        return self._live.get(scanner_id)

    def add(self, session: ScannerSession) -> None:
        self._gone.pop(session.scanner_id, None)
        self._live[session.scanner_id] = session

    def remove(self, session: ScannerSession) -> None:
        if self._live.get(session.scanner_id) is session:
            del self._live[session.scanner_id]
            self._gone[session.scanner_id] = session
            while len(self._gone) > self._keep_disconnected:
                del self._gone[next(iter(self._gone))]

    def connected(self) -> list[ScannerSession]:
        return list(self._live.values())

    def all(self) -> list[ScannerSession]:
        return [*self._live.values(), *self._gone.values()]


class Runs(Protocol):
    """What sessions need of the run supervisor."""

    def end_runs_soon(self, session: ScannerSession, failure: RunFailure) -> None: ...


class ScannerSessions:
    """Connecting and disconnecting scanners, their Free state, and their watchdogs."""

    def __init__(
        self,
        config: Config,
        ring: FreeRing[ScannerSession],
        request_dispatch: Callable[[], None],
    ) -> None:
        self.config = config
        self.registry = ScannerRegistry()
        self.ring = ring
        self._request_dispatch = request_dispatch
        self.runs: Runs | None = None  # set by the handler once the run supervisor exists
        self._watchdogs: dict[str, asyncio.TimerHandle] = {}

    def connect(
        self,
        profile: ScannerProfile,
        send: Callable[[ScannerMessage], None],
        close: Callable[[HandlerError], None],
    ) -> ScannerSession:
        if self.registry.live(profile.scanner_id) is not None:
            # Refused, not replaced: a second stream must not take over a live scanner's jobs.
            # UNAVAILABLE so a scanner that reconnects before its old stream timed out retries.
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"scanner id {profile.scanner_id!r} is already connected; a scanner id may hold "
                f"one stream (retry after {self.config.heartbeat_timeout:g}s if the old one died)",
                reason=Reason.UNAVAILABLE,
                retry_after=self.config.heartbeat_timeout,
            )
        at = datetime.now(UTC)
        session = ScannerSession(
            profile=profile,
            session_id=str(uuid.uuid4()),
            connected_at=at,
            send=send,
            close=close,
            last_seen_at=at,
            last_seen=asyncio.get_running_loop().time(),
        )
        self.registry.add(session)
        self._arm_watchdog(session)
        log.info(
            "scanner.connected",
            scanner_id=profile.scanner_id,
            session_id=session.session_id,
            slots=profile.slots,
            kinds=sorted(k.name for k in profile.kinds),
            engine=profile.engine,
            version=profile.version,
        )
        return session

    def touch(self, session: ScannerSession) -> None:
        """Any message from a scanner shows it is alive."""
        session.last_seen = asyncio.get_running_loop().time()
        session.last_seen_at = datetime.now(UTC)

    def ready(self, session: ScannerSession, free_slots: int) -> None:
        was_free = session.is_free
        session.accepting = free_slots > 0
        self.ring.refresh(session)
        if session.is_free != was_free:
            log.info(
                "scanner.status",
                scanner_id=session.scanner_id,
                status=session.status.name,
                free_slots=session.free_slots,
            )
        self._request_dispatch()

    def drain(self, session: ScannerSession) -> None:
        session.draining = True
        self.ring.refresh(session)
        log.info("scanner.draining", scanner_id=session.scanner_id, jobs=list(session.held))

    def databases_changed(self, session: ScannerSession, databases: tuple[Database, ...]) -> None:
        """A live database update on the scanner: ListScanners shows the new versions."""
        session.profile = dataclasses.replace(session.profile, databases=databases)
        log.info(
            "scanner.databases_changed",
            scanner_id=session.scanner_id,
            databases={d.name: f"{d.version}@{d.released_at}" for d in databases},
        )

    def disconnect(self, session: ScannerSession, failure: RunFailure) -> None:
        """The stream ended: every run it held ends without a result. Idempotent."""
        if not session.connected:
            return
        session.connected = False
        self.ring.refresh(session)
        self.registry.remove(session)
        handle = self._watchdogs.pop(session.session_id, None)
        if handle is not None:
            handle.cancel()
        log.info(
            "scanner.disconnected",
            scanner_id=session.scanner_id,
            session_id=session.session_id,
            reason=failure.detail,
            jobs_returned=list(session.held),
        )
        if session.held and self.runs is not None:
            self.runs.end_runs_soon(session, failure)

    def close_all(self, detail: str) -> None:
        """End every scanner stream with UNAVAILABLE so scanners reconnect elsewhere at once."""
        error = HandlerError(Catalogue.SYSTEM_ERROR, detail, reason=Reason.UNAVAILABLE)
        for session in self.registry.connected():
            self.disconnect(session, RunFailure(error.kind, detail))
            session.close(error)

    def drain_all(self) -> None:
        """Shutting down: every scanner finishes what it runs and gets nothing new."""
        for session in self.registry.connected():
            if not session.draining:
                self.drain(session)
                session.send(DrainScanner())

    def stop(self) -> None:
        for handle in self._watchdogs.values():
            handle.cancel()
        self._watchdogs.clear()

    def _arm_watchdog(self, session: ScannerSession) -> None:
        when = session.last_seen + self.config.heartbeat_timeout
        loop = asyncio.get_running_loop()
        self._watchdogs[session.session_id] = loop.call_at(when, self._on_watchdog, session)

    def _on_watchdog(self, session: ScannerSession) -> None:
        self._watchdogs.pop(session.session_id, None)
        if not session.connected:
            return
        silent_for = asyncio.get_running_loop().time() - session.last_seen
        if silent_for < self.config.heartbeat_timeout:
            self._arm_watchdog(session)
            return
        error = HandlerError(
            Catalogue.SCAN_TIME_OUT,
            f"scanner {session.scanner_id} sent nothing for {silent_for:.1f}s "
            f"(heartbeat timeout {self.config.heartbeat_timeout:g}s)",
        )
        self.disconnect(session, RunFailure(error.kind, error.detail))
        session.close(error)
