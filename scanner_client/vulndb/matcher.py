"""Matching installed packages against the compiled database, with each feed's semantics.

- A distribution's package is judged by the data of its own release only (an Alpine 3.11
  package by ``Alpine:v3.11``). When the database has no data for that release (or the release
  is unknown), the package is not matched against other releases: the result carries a
  :class:`Note` saying so, so that "nothing found" is never mistaken for "not vulnerable".
  The same holds for a language ecosystem the database has no data for.
- A language package whose files belong to an OS package (``os_owned``) is not matched
  against the language feed at all: the distribution's data judges its OS package, which
  carries the distribution's backported fixes.
- OSV ranges (``ECOSYSTEM``, ``SEMVER``, events in version order, ``last_affected``,
  ``limit``) and ``versions`` lists; withdrawn records never reach the database.
- Alpine's secdb ``0`` (never affected in this release) clears the advisories that share its
  id for that package.
- Advisories about one vulnerability (the same id or alias: CVE, GHSA, PYSEC, ...) give one
  finding per package, with every id kept: the primary id is a CVE where there is one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from imagehandler.v1 import common_pb2
from scanner_client.vulndb import versions
from scanner_client.vulndb.model import normal_name, split_ecosystem
from scanner_client.vulndb.store import Candidate, VulnStore

NO_DATA: Final = "IH-VULNDB-001"
# Primary id preference among the ids of one vulnerability.
_PREFIXES: Final = ("CVE-", "GHSA-", "PYSEC-")


class Installed(Protocol):
    """What the matcher needs of a package (the builtin engine's ``Package`` has it)."""

    @property
    def ecosystem(self) -> str:
        """OSV ecosystem with the release: ``Debian:12``, ``Alpine:v3.11``, ``PyPI``."""

    @property
    def source_name(self) -> str:
        """The name advisories use (Debian's source package, Alpine's origin)."""

    @property
    def source_version(self) -> str: ...

    @property
    def os_owned(self) -> bool:
        """A language package whose files belong to an OS package."""


P = TypeVar("P", bound=Installed)


@dataclass(frozen=True)
class Finding(Generic[P]):
    package: P
    id: str
    aliases: tuple[str, ...]
    fixed: str
    severity: common_pb2.Severity.ValueType
    title: str


@dataclass(frozen=True)
class Note:
    """Something the match could not judge: packages of an ecosystem or release that the
    database has no data for."""

    id: str
    subject: str
    packages: int
    text: str

    def to_proto(self) -> common_pb2.ScanNote:
        return common_pb2.ScanNote(
            id=self.id, subject=self.subject, packages=self.packages, text=self.text
        )


@dataclass
class MatchReport(Generic[P]):
    findings: list[Finding[P]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    matched_packages: int = 0


@dataclass(slots=True)
class _Hit:
    candidate: Candidate
    fixed: str
    ids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.ids = frozenset((self.candidate.advisory_id, *self.candidate.aliases))


def match(store: VulnStore, packages: Iterable[P]) -> MatchReport[P]:
    report: MatchReport[P] = MatchReport()
    uncovered: dict[tuple[str, str], int] = {}
    coverage = store.coverage
    for package in packages:
        if package.os_owned:
            continue
        ecosystem, release = split_ecosystem(package.ecosystem)
        if (ecosystem, release) not in coverage and (ecosystem, "") not in coverage:
            uncovered[(ecosystem, release)] = uncovered.get((ecosystem, release), 0) + 1
            continue
        report.matched_packages += 1
        name = normal_name(ecosystem, package.source_name)
        report.findings.extend(
            _findings(
                package,
                ecosystem,
                store.candidates(ecosystem, name, release, package.source_version),
            )
        )
    report.notes = [_note(e, r, n, store) for (e, r), n in sorted(uncovered.items())]
    return report


def _findings(package: P, ecosystem: str, candidates: tuple[Candidate, ...]) -> list[Finding[P]]:
    version = package.source_version
    hits: list[_Hit] = []
    cleared: set[str] = set()
    for candidate in candidates:
        if candidate.not_affected:
            cleared |= {candidate.advisory_id, *candidate.aliases}
            continue
        affected, fixed = candidate.listed, ""
        for range_ in candidate.ranges:
            in_range, range_fixed = versions.affected_by(ecosystem, range_, version)
            if in_range:
                affected, fixed = True, range_fixed or fixed
                break
        if affected:
            hits.append(_Hit(candidate, fixed or candidate.fixed_hint))
    if not hits:
        return []
    return [
        _finding(package, ecosystem, group)
        for group in _groups(hits)
        if not cleared or not cleared.intersection(*(hit.ids for hit in group))
    ]


def _groups(hits: list[_Hit]) -> list[list[_Hit]]:
    """Hits that share an id (directly or through others) form one group."""
    if len(hits) == 1:
        return [hits]
    groups: list[tuple[set[str], list[_Hit]]] = []
    for hit in hits:
        ids = hit.ids
        joined = [group for group in groups if group[0] & ids]
        merged_ids, merged = set(ids), [hit]
        for group in joined:
            merged_ids |= group[0]
            merged.extend(group[1])
            groups.remove(group)
        groups.append((merged_ids, merged))
    return [group for _, group in groups]


def primary_id(ids: Iterable[str]) -> str:
    ordered = sorted(ids)
    for prefix in _PREFIXES:
        for value in ordered:
            if value.startswith(prefix):
                return value
    return ordered[0]


def _finding(package: P, ecosystem: str, group: list[_Hit]) -> Finding[P]:
    ids: set[str] = set()
    for hit in group:
        ids |= hit.ids
    first = primary_id(ids)
    fixes = [hit.fixed for hit in group if hit.fixed]
    if len(group) == 1:
        (hit,) = group
        return Finding(
            package=package,
            id=first,
            aliases=tuple(sorted(ids - {first})),
            fixed=hit.fixed,
            severity=hit.candidate.severity,  # type: ignore[arg-type]
            title=hit.candidate.title,
        )
    titled = sorted(
        (hit.candidate for hit in group if hit.candidate.title),
        key=lambda c: (c.advisory_id != first, c.advisory_id),
    )
    return Finding(
        package=package,
        id=first,
        aliases=tuple(sorted(ids - {first})),
        fixed=versions.highest(ecosystem, fixes),
        severity=max(hit.candidate.severity for hit in group),  # type: ignore[arg-type]
        title=titled[0].title if titled else "",
    )


def _note(ecosystem: str, release: str, count: int, store: VulnStore) -> Note:
    known = sorted((r for e, r in store.coverage if e == ecosystem and r), key=_release_order)
    subject = f"{ecosystem}:{release}" if release else ecosystem
    packages = f"{count} package was" if count == 1 else f"{count} packages were"
    if ecosystem in versions.DISTRIBUTIONS and not release:
        text = (
            f"The {ecosystem} release is unknown: {packages} not matched "
            f"(the database has {ecosystem} data for {', '.join(known) or 'no release'})."
        )
    else:
        text = (
            f"No vulnerability data for {subject} in this database: {packages} "
            "inventoried but not matched"
            + (f" (it has {ecosystem} data for {', '.join(known)})" if known else "")
            + ". Update the database with a feed that covers it (image-scanner db update)."
        )
    return Note(NO_DATA, subject, count, text)


def _release_order(release: str) -> tuple[tuple[int, int | str], ...]:
    """v3.9 before v3.10."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"[.:]", release.lstrip("v"))
    )
