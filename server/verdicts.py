"""Verdicts: which findings fail a scan, and risk acceptances that excuse them.

The policy marks findings as failing (vulnerabilities at or above a severity, any malware, any
secret); the summary keeps their ids, so a verdict can be re-evaluated when an acceptance is
added or expires without reading the full result again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from imagehandler.v1 import common_pb2
from server.model import ImageRef, Job

_SEVERITY_FIELDS = {
    common_pb2.SEVERITY_CRITICAL: "critical",
    common_pb2.SEVERITY_HIGH: "high",
    common_pb2.SEVERITY_MEDIUM: "medium",
    common_pb2.SEVERITY_LOW: "low",
    common_pb2.SEVERITY_NEGLIGIBLE: "negligible",
}


@dataclass(frozen=True)
class VerdictPolicy:
    # Vulnerabilities at or above this severity fail the scan.
    fail_severity: int = common_pb2.SEVERITY_HIGH
    fail_on_malware: bool = True
    fail_on_secrets: bool = True

    def failing(self, result: common_pb2.ScanResult) -> list[str]:
        ids = [v.id for v in result.vulnerabilities if v.severity >= self.fail_severity]
        if self.fail_on_malware:
            ids += [m.name or m.sha256 for m in result.malware]
        if self.fail_on_secrets:
            ids += [s.rule_id for s in result.secrets]
        return sorted(set(ids))


def summarize(
    result: common_pb2.ScanResult, policy: VerdictPolicy, accepted: Iterable[str] = ()
) -> common_pb2.ResultSummary:
    if not (result.vulnerabilities or result.malware or result.secrets):
        # Nothing found (most scans of a clean image): nothing to count or excuse.
        summary = common_pb2.ResultSummary(
            misconfigurations=len(result.misconfigurations), verdict=common_pb2.VERDICT_PASSED
        )
        summary.databases.extend(result.databases)
        return summary
    summary = common_pb2.ResultSummary(
        vulnerabilities_total=len(result.vulnerabilities),
        malware=len(result.malware),
        misconfigurations=len(result.misconfigurations),
        secrets=len(result.secrets),
        failing=policy.failing(result),
    )
    summary.databases.extend(result.databases)
    for vulnerability in result.vulnerabilities:
        name = _SEVERITY_FIELDS.get(vulnerability.severity)
        if name is not None:
            setattr(summary, name, getattr(summary, name) + 1)
    apply_acceptances(summary, set(accepted))
    return summary


class Change(enum.Enum):
    """What re-applying acceptances did to a summary."""

    NONE = 0
    ACCEPTED = 1  # the accepted findings changed; the verdict stayed
    VERDICT = 2  # the verdict changed (and with it the accepted findings)


def apply_acceptances(summary: common_pb2.ResultSummary, accepted: set[str]) -> Change:
    """Split the findings the policy fails into ``failing`` (no acceptance covers them) and
    ``accepted``, and set the verdict from what still fails."""
    policy_failing = set(summary.failing).union(summary.accepted)
    excused = sorted(policy_failing.intersection(accepted))
    still_failing = sorted(policy_failing.difference(excused))
    verdict = common_pb2.VERDICT_FAILED if still_failing else common_pb2.VERDICT_PASSED
    if list(summary.accepted) == excused and summary.verdict == verdict:
        return Change.NONE
    change = Change.VERDICT if summary.verdict != verdict else Change.ACCEPTED
    del summary.failing[:]
    summary.failing.extend(still_failing)
    del summary.accepted[:]
    summary.accepted.extend(excused)
    summary.verdict = verdict
    return change


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
