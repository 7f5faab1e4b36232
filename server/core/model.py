"""Domain objects: jobs, the objects they scan, and the enums they use.

The enums share their numbers with the protobuf enums of ``imagehandler.v1`` so the transport
converts them by value; nothing here imports gRPC or protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from imagehandler.jobpolicy import ANONYMOUS, Submitter


class JobStatus(enum.IntEnum):
    PENDING = 1
    IN_PROGRESS = 2
    PROCESSING_RESULTS = 3
    FINISHED = 4
    ERROR = 5
    CANCELLED = 6

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def active(self) -> bool:
        """Still on its way: dedup returns such a job instead of queuing another."""
        return self is JobStatus.PENDING or self is JobStatus.IN_PROGRESS


TERMINAL_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.ERROR, JobStatus.CANCELLED})


class ObjectKind(enum.IntEnum):
    IMAGE = 1
    NODE = 2
    ARTIFACT = 3


class Trigger(enum.IntEnum):
    MANUAL = 1
    RESCAN = 2
    SCHEDULED = 3
    REGISTRY_EVENT = 4
    CICD = 5
    NODE_AGENT = 6
    POLICY_CHANGE = 7
    # A stored SBOM matched again against a newer vulnerability database.
    REMATCH = 8


class Policy(enum.IntEnum):
    VULNERABILITIES = 1
    MALWARE = 2
    MISCONFIGURATIONS = 3
    SECRETS = 4


class Lane(enum.IntEnum):
    BULK = 1
    INTERACTIVE = 2


@dataclass(frozen=True, slots=True)
class ImageRef:
    registry: str
    repository: str
    tag: str = ""
    digest: str = ""
    credentials_ref: str = ""
    proxy_url: str = ""

    def identity(self) -> tuple[str, ...]:
        # The same digest is the same content wherever it lives; without one, the same name.
        if self.digest:
            return ("image", self.digest)
        return ("image", self.registry, self.repository, self.tag)

    def display(self) -> str:
        ref = f"{self.registry}/{self.repository}"
        if self.tag:
            ref += f":{self.tag}"
        if self.digest:
            ref += f"@{self.digest}"
        return ref


@dataclass(frozen=True, slots=True)
class NodeRef:
    cluster: str
    node_name: str
    root_path: str = "/"

    def identity(self) -> tuple[str, ...]:
        return ("node", self.cluster, self.node_name, self.root_path)

    def display(self) -> str:
        return f"node {self.cluster}/{self.node_name}" if self.cluster else f"node {self.node_name}"


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    pipeline: str = ""
    job: str = ""
    path: str = ""
    url: str = ""
    sbom: bytes = b""
    sbom_format: str = ""
    sbom_sha256: str = ""

    def identity(self) -> tuple[str, ...]:
        return ("artifact", self.pipeline, self.job, self.path, self.url, self.sbom_sha256)

    def display(self) -> str:
        where = self.path or self.url or (f"sbom {self.sbom_sha256[:12]}" if self.sbom else "")
        return f"artifact {self.pipeline}/{self.job} {where}".strip()


ScanTarget = ImageRef | NodeRef | ArtifactRef


def kind_of(target: ScanTarget) -> ObjectKind:
    if isinstance(target, ImageRef):
        return ObjectKind.IMAGE
    if isinstance(target, NodeRef):
        return ObjectKind.NODE
    return ObjectKind.ARTIFACT


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated submit: everything a job is created from."""

    target: ScanTarget
    trigger: Trigger
    policies: tuple[Policy, ...]
    max_run_time: float  # seconds, > 0
    lane: Lane
    idempotency_key: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # Who submitted it (not part of its identity): scanners check its credential grants.
    submitter: Submitter = ANONYMOUS
    # Scan even when a stored result could be reused (not kept: it only matters at submit).
    fresh: bool = False
    # The job whose stored result this one finished with, unscanned (reuse by digest).
    reused_from: str = ""
    # For Trigger.REMATCH: the scan whose stored SBOM this job matches again.
    rematch_of: str = ""

    @property
    def kind(self) -> ObjectKind:
        return kind_of(self.target)

    def dedup_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys scan the same object the same way."""
        return (*self.target.identity(), tuple(sorted(self.policies)))


@dataclass(frozen=True, slots=True)
class JobFailure:
    code: str
    message: str
    detail: str = ""


class Transition(NamedTuple):
    """One history entry. A named tuple, not a frozen dataclass: four are made for every job,
    and a frozen dataclass's __init__ costs five times as much."""

    from_status: JobStatus | None
    to_status: JobStatus
    at: datetime
    scanner_id: str
    run: int
    reason: str
    error: JobFailure | None = None


@dataclass(slots=True, eq=False)
class Job:
    """A scan job. Only :mod:`server.core.state_machine` changes ``status``."""

    id: str
    seq: int  # arrival order; a retried job goes back to this place
    spec: JobSpec
    created_at: datetime
    status: JobStatus = JobStatus.PENDING
    runs: int = 0
    scanner_id: str = ""
    error: JobFailure | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    history: list[Transition] = field(default_factory=list)
    # Set while IN_PROGRESS: when the run must end and when the scanner last showed life for it.
    run_deadline: float = 0.0
    last_activity: float = 0.0
    result: Any = None  # the scanner's result, as the transport received it
    result_summary: Any = None
    # Journal position of the last change to this job (0: never journaled).
    lsn: int = 0
    # The full result is in the data directory's results folder (too large for RAM).
    result_in_file: bool = False
    # History entries the receiving server has acknowledged.
    delivered: int = 0
    # Verdict changes made by risk acceptances, and the newest one acknowledged.
    verdict_version: int = 0
    verdict_delivered: int = 0
    # What the newest verdict change came from (for its delivery).
    verdict_cause: str = ""
    # The processed result waits in PROCESSING_RESULTS for the receiving server.
    awaiting_delivery: bool = False
    # spec.dedup_key() and spec.kind, computed once: the indexes and the queue look them up at
    # every status change.
    key: tuple[Any, ...] = field(init=False, repr=False)
    kind: ObjectKind = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = self.spec.dedup_key()
        self.kind = self.spec.kind

    def copy(self) -> Job:
        """A job the state machine can change without touching this one (it appends to the
        history and sets fields); field by field, several times faster than ``copy.copy``."""
        clone = object.__new__(Job)
        for name in _JOB_FIELDS:
            setattr(clone, name, getattr(self, name))
        clone.history = list(self.history)
        return clone


_JOB_FIELDS: tuple[str, ...] = Job.__slots__
