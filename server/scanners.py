"""Scanner sessions: who is connected, what each can scan, how many slots it has free.

A session is one Connect stream. The handler counts the jobs each session holds itself, so a
scanner is FREE exactly when it is accepting work, not draining, and holds fewer jobs than slots.
Messages to the scanner go through ``send``, which the transport implements; this module knows
nothing of gRPC.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from imagehandler.errors import HandlerError
from server.core.model import Job, ObjectKind, Policy


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
