"""The engine interface: what a third party implements to plug a scanner into the handler.

An engine knows how to scan one object; the client does everything else (the stream, slots,
heartbeats, deadlines, reconnects, batching results). See :mod:`scanner_client` for a minimal
engine.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from imagehandler.jobpolicy import ANONYMOUS, Submitter
from imagehandler.v1 import common_pb2

_CODE = re.compile(r"HNDL-[0-9]{3}")


class Kind(enum.StrEnum):
    """An object kind a scanner can scan (``common_pb2.ObjectKind`` without the prefix)."""

    IMAGE = "image"
    NODE = "node"
    ARTIFACT = "artifact"

    @property
    def proto(self) -> common_pb2.ObjectKind.ValueType:
        return _KIND_TO_PROTO[self]

    @classmethod
    def of(cls, scan_object: common_pb2.ScanObject) -> Kind | None:
        """The kind of a protobuf object, or None when it carries none."""
        target = scan_object.WhichOneof("target")
        return cls(target) if target is not None else None


_KIND_TO_PROTO: dict[Kind, common_pb2.ObjectKind.ValueType] = {
    Kind.IMAGE: common_pb2.OBJECT_KIND_IMAGE,
    Kind.NODE: common_pb2.OBJECT_KIND_NODE,
    Kind.ARTIFACT: common_pb2.OBJECT_KIND_ARTIFACT,
}


class Policy(enum.StrEnum):
    """What a scan looks for (``common_pb2.Policy`` without the prefix)."""

    VULNERABILITIES = "vulnerabilities"
    MALWARE = "malware"
    MISCONFIGURATIONS = "misconfigurations"
    SECRETS = "secrets"

    @property
    def proto(self) -> common_pb2.Policy.ValueType:
        return _POLICY_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: common_pb2.Policy.ValueType) -> Policy | None:
        """The policy for a protobuf value; None for POLICY_UNSPECIFIED or an unknown value."""
        return _PROTO_TO_POLICY.get(value)


_POLICY_TO_PROTO: dict[Policy, common_pb2.Policy.ValueType] = {
    Policy.VULNERABILITIES: common_pb2.POLICY_VULNERABILITIES,
    Policy.MALWARE: common_pb2.POLICY_MALWARE,
    Policy.MISCONFIGURATIONS: common_pb2.POLICY_MISCONFIGURATIONS,
    Policy.SECRETS: common_pb2.POLICY_SECRETS,
}
_PROTO_TO_POLICY = {value: policy for policy, value in _POLICY_TO_PROTO.items()}


@dataclass(frozen=True)
class Database:
    """A scan database and the date it was released (RFC 3339 date or date-time)."""

    name: str
    version: str
    released_at: str

    def to_proto(self) -> common_pb2.DatabaseVersion:
        return common_pb2.DatabaseVersion(
            name=self.name, version=self.version, released_at=self.released_at
        )


@dataclass(frozen=True)
class Job:
    """One run of one job, as the engine gets it."""

    job_id: str
    # The run number the handler gave; the client echoes it in the result.
    run: int
    object: common_pb2.ScanObject
    # Empty means every policy the engine supports.
    policies: tuple[Policy, ...] = ()
    # The run must end by then (timezone-aware); None when the handler set no deadline. The
    # client cancels the scan at the deadline and reports HNDL-004: engines need not check it.
    deadline: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Who submitted the job (its token's name and roles): the job's credentials_ref must be
    # granted to it (scanner_client.job_policy).
    submitter: Submitter = ANONYMOUS

    @property
    def kind(self) -> Kind | None:
        return Kind.of(self.object)


class ProgressReporter(Protocol):
    """Where an engine reports how far a scan got. Reporting never blocks and never fails."""

    def report(self, stage: str, percent: int, message: str = "") -> None:
        """``stage`` is "pull", "unpack", "analyse", "report", ...; ``percent`` is 0-100."""


class NullProgress:
    """A reporter that drops everything (for running an engine outside the client)."""

    def report(self, stage: str, percent: int, message: str = "") -> None:
        return None


class ScanFailure(Exception):
    """A scan that ended without a result, reported to the handler as a ``Failure``.

    ``code`` is a catalogue code: HNDL-006 (the scanner's subprocess or command failed, the
    default), HNDL-005 (the job's parameters are wrong), HNDL-007 (any other error), ...
    ``permanent`` says that running the job again cannot help.
    """

    def __init__(self, detail: str, code: str = "HNDL-006", *, permanent: bool = False) -> None:
        if not _CODE.fullmatch(code):
            raise ValueError(f"ScanFailure code must look like HNDL-006, got {code!r}")
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.permanent = permanent


class ScannerBroken(Exception):
    """The scanner itself cannot work, whatever the job: its scratch directory vanished or is
    read-only, its disk is full, its database cannot be read. Raise it from ``scan`` (with what
    is wrong and what to fix) instead of :class:`ScanFailure`, so that a broken scanner does not
    burn every job's runs.

    The client then reports that run as a retryable HNDL-007 failure (the job goes back to the
    queue, in its place, for another scanner), tells the handler it drains (it is assigned
    nothing more; a job assigned before the handler heard is handed back the same way), logs
    the reason as an error, lets the scans still running end, and :meth:`ScannerClient.run`
    raises this exception: ``image-scanner`` prints it and exits 3, so that an orchestrator
    restarts the scanner and the operator sees why.
    """


class Engine(abc.ABC):
    """A scanning engine. Subclass it, set ``name``, implement ``databases`` and ``scan``.

    ``scan`` runs as one asyncio task per job, up to ``slots`` at once: do blocking work in a
    thread (``asyncio.to_thread``) or a subprocess (``asyncio.create_subprocess_exec``). A scan
    may be cancelled at any await (the job was cancelled, its deadline passed, or the stream
    broke); clean up in ``finally`` and let ``CancelledError`` propagate.

    A scan ends in one of three ways: a ``ScanResult``; :class:`ScanFailure` when this job
    cannot be scanned (retried up to the handler's run limit, or not at all when
    ``permanent``); :class:`ScannerBroken` when this scanner cannot scan anything (the job is
    handed back and the scanner stops taking work, then exits). Check the environment an
    engine needs when it is built (raise ``ValueError`` there: the scanner does not start).
    """

    # Shown by the handler ("noop", "trivy", ...).
    name: str = "engine"
    # Object kinds this engine scans; empty means every kind.
    kinds: frozenset[Kind] = frozenset()
    # Set by the client: called (on the event loop) when ``databases()`` changed, so that
    # the handler is told the new versions.
    databases_changed_callback: Callable[[], None] | None = None

    @abc.abstractmethod
    def databases(self) -> Sequence[Database]:
        """The scan databases in use now, with their release dates (sent at registration,
        and again whenever :meth:`notify_databases_changed` is called)."""

    def notify_databases_changed(self) -> None:
        """Call after a live database update: the client tells the handler."""
        if self.databases_changed_callback is not None:
            self.databases_changed_callback()

    async def refresh_databases(self) -> bool:
        """Take updated databases into use between jobs; True when ``databases()`` changed.
        The default has nothing to refresh."""
        return False

    async def run_background(self) -> None:
        """Work the engine does for as long as the client runs (periodic database updates);
        cancelled when the client stops. The default does nothing."""
        return None

    @abc.abstractmethod
    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        """Scan ``job.object``; return what was found, or raise :class:`ScanFailure` (this job)
        or :class:`ScannerBroken` (this scanner).

        The client fills in ``job_id``, ``run`` and (when left empty) ``databases``.
        """
