"""A result's summary under the verdict policy, in the wire format jobs carry it in.

The decisions are :mod:`server.core.verdicts`'; this module reads a ``ScanResult`` and writes a
``ResultSummary``.
"""

from __future__ import annotations

from collections.abc import Iterable

from imagehandler.v1 import common_pb2
from server.core.verdicts import Change, VerdictPolicy, decide

_SEVERITY_FIELDS = {
    common_pb2.SEVERITY_CRITICAL: "critical",
    common_pb2.SEVERITY_HIGH: "high",
    common_pb2.SEVERITY_MEDIUM: "medium",
    common_pb2.SEVERITY_LOW: "low",
    common_pb2.SEVERITY_NEGLIGIBLE: "negligible",
}


def failing(result: common_pb2.ScanResult, policy: VerdictPolicy) -> list[str]:
    """The ids of the findings the policy fails."""
    ids = [v.id for v in result.vulnerabilities if v.severity >= policy.fail_severity]
    if policy.fail_on_malware:
        ids += [m.name or m.sha256 for m in result.malware]
    if policy.fail_on_secrets:
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
        failing=failing(result, policy),
    )
    summary.databases.extend(result.databases)
    for vulnerability in result.vulnerabilities:
        name = _SEVERITY_FIELDS.get(vulnerability.severity)
        if name is not None:
            setattr(summary, name, getattr(summary, name) + 1)
    apply_acceptances(summary, set(accepted))
    return summary


def apply_acceptances(summary: common_pb2.ResultSummary, accepted: set[str]) -> Change:
    """Split the findings the policy fails into ``failing`` (no acceptance covers them) and
    ``accepted``, and set the verdict from what still fails."""
    decision = decide(set(summary.failing).union(summary.accepted), accepted)
    verdict: common_pb2.Verdict.ValueType = decision.verdict  # type: ignore[assignment]
    if list(summary.accepted) == decision.accepted and summary.verdict == verdict:
        return Change.NONE
    change = Change.VERDICT if summary.verdict != verdict else Change.ACCEPTED
    del summary.failing[:]
    summary.failing.extend(decision.failing)
    del summary.accepted[:]
    summary.accepted.extend(decision.accepted)
    summary.verdict = verdict
    return change
