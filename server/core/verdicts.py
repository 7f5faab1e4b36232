"""Verdicts: which findings fail a scan, and risk acceptances that excuse them.

The policy marks findings as failing (vulnerabilities at or above a severity, any malware, any
secret); a job's summary keeps their ids, so a verdict can be re-evaluated when an acceptance
is added or expires without reading the full result again. This module decides; the result's
own format is read and written in :mod:`server.service.summaries`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from server.core.model import ImageRef, Job


class Severity(enum.IntEnum):
    """The numbers of ``imagehandler.v1.Severity``."""

    UNSPECIFIED = 0
    NEGLIGIBLE = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5


class Verdict(enum.IntEnum):
    """The numbers of ``imagehandler.v1.Verdict``."""

    UNSPECIFIED = 0
    PASSED = 1
    FAILED = 2


@dataclass(frozen=True)
class VerdictPolicy:
    # Vulnerabilities at or above this severity fail the scan.
    fail_severity: Severity = Severity.HIGH
    fail_on_malware: bool = True
    fail_on_secrets: bool = True


class Change(enum.Enum):
    """What re-applying acceptances did to a summary."""

    NONE = 0
    ACCEPTED = 1  # the accepted findings changed; the verdict stayed
    VERDICT = 2  # the verdict changed (and with it the accepted findings)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    failing: list[str]  # failing and not excused
    accepted: list[str]  # failing but excused by an acceptance


def decide(policy_failing: Iterable[str], accepted: set[str]) -> Decision:
    """Split the findings the policy fails into those an acceptance excuses and the rest; the
    verdict fails while any of the rest remains."""
    failing = set(policy_failing)
    excused = sorted(failing.intersection(accepted))
    still = sorted(failing.difference(excused))
    return Decision(Verdict.FAILED if still else Verdict.PASSED, still, excused)


class Scope(enum.IntEnum):
    OBJECT = 1
    REPOSITORY = 2
    EVERYWHERE = 3


@dataclass
class Acceptance:
    id: str
    finding_id: str
    scope: Scope
    target: tuple[str, ...]  # what it matches: the object's identity, a repository, or ()
    target_text: str
    reason: str
    created_at: datetime
    expires_at: datetime
    job_id: str = ""

    def matches(self, job: Job) -> bool:
        if self.scope is Scope.EVERYWHERE:
            return True
        if self.scope is Scope.OBJECT:
            return job.spec.target.identity() == self.target
        target = job.spec.target
        return isinstance(target, ImageRef) and (target.registry, target.repository) == self.target


def scope_target(scope: Scope, job: Job | None) -> tuple[tuple[str, ...], str]:
    """What an acceptance of this scope, made from this job, matches (and how to show it)."""
    if scope is Scope.EVERYWHERE or job is None:
        return (), "everywhere"
    target = job.spec.target
    if scope is Scope.OBJECT:
        return target.identity(), target.display()
    assert isinstance(target, ImageRef)
    return (target.registry, target.repository), f"{target.registry}/{target.repository}"


@dataclass
class Acceptances:
    """The acceptances in force."""

    by_id: dict[str, Acceptance] = field(default_factory=dict)

    def add(self, acceptance: Acceptance) -> None:
        self.by_id[acceptance.id] = acceptance

    def remove(self, acceptance_id: str) -> Acceptance | None:
        return self.by_id.pop(acceptance_id, None)

    def accepted_for(self, job: Job, now: datetime) -> set[str]:
        return {a.finding_id for a in self.by_id.values() if a.expires_at > now and a.matches(job)}

    def expired(self, now: datetime) -> list[Acceptance]:
        return [a for a in self.by_id.values() if a.expires_at <= now]
