"""The vulnerability database: OSV records, matched with each ecosystem's own version order.

Records follow the OSV schema (``id``, ``aliases``, ``summary``, ``affected[].package``
``{ecosystem, name}``, ``affected[].ranges[]`` of type ``ECOSYSTEM`` or ``SEMVER`` with
``introduced`` / ``fixed`` / ``last_affected`` events, ``affected[].versions``) plus a
``database_specific.severity``. Versions are compared by :mod:`univers` (Debian's epochs and
tildes, Alpine's ``-rN`` revisions, PEP 440, semver), never by hand.

An ecosystem with a release (``Debian:12``, ``Alpine:v3.20``) applies to packages of that
release only; one without (``Debian``, ``PyPI``, ``npm``) to all. A package whose distribution
release is unknown is matched against every release of its ecosystem.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from univers.version_constraint import VersionConstraint
from univers.version_range import (
    AlpineLinuxVersionRange,
    DebianVersionRange,
    NpmVersionRange,
    PypiVersionRange,
    VersionRange,
)
from univers.versions import (
    AlpineLinuxVersion,
    DebianVersion,
    PypiVersion,
    SemverVersion,
    Version,
)

from imagehandler.v1 import common_pb2
from scanner_client.db import DatabaseError
from scanner_client.engines.builtin.analyzers import Package, pypi_name
from scanner_client.engines.builtin.common import SEVERITIES

# OSV ecosystem (without release) -> univers range class.
RANGE_CLASSES: Final[dict[str, type[VersionRange]]] = {
    "Debian": DebianVersionRange,
    "Ubuntu": DebianVersionRange,
    "Alpine": AlpineLinuxVersionRange,
    "PyPI": PypiVersionRange,
    "npm": NpmVersionRange,
}
VERSION_CLASSES: Final[dict[str, type[Version]]] = {
    "Debian": DebianVersion,
    "Ubuntu": DebianVersion,
    "Alpine": AlpineLinuxVersion,
    "PyPI": PypiVersion,
    "npm": SemverVersion,
}
_ECOSYSTEM_OF: Final = {range_class: name for name, range_class in RANGE_CLASSES.items()}
RANGE_TYPES: Final = frozenset({"ECOSYSTEM", "SEMVER"})
# Language feeds: a package whose files an OS package owns is not matched against them.
LANGUAGE_ECOSYSTEMS: Final = frozenset({"PyPI", "npm", "Go", "Maven", "crates.io", "RubyGems"})


@dataclass(frozen=True)
class Interval:
    """One affected interval: ``introduced <= v < fixed`` (or ``<= last_affected``)."""

    range: VersionRange | None  # None: every version
    fixed: str


@dataclass(frozen=True)
class Affected:
    ecosystem: str  # without the release: "Debian"
    release: str  # "12", "v3.20", or "" for all
    name: str
    intervals: tuple[Interval, ...]
    versions: frozenset[str]


@dataclass(frozen=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    summary: str
    severity: common_pb2.Severity.ValueType
    affected: tuple[Affected, ...]


@dataclass(frozen=True)
class Match:
    advisory: Advisory
    package: Package
    fixed: str


def _normal_name(ecosystem: str, name: str) -> str:
    return pypi_name(name) if ecosystem == "PyPI" else name


class VulnerabilityDB:
    """Advisories indexed by (ecosystem, package name)."""

    def __init__(self, advisories: Sequence[Advisory]) -> None:
        self.advisories = tuple(advisories)
        self._index: dict[tuple[str, str], list[tuple[Advisory, Affected]]] = {}
        for advisory in self.advisories:
            for affected in advisory.affected:
                key = (affected.ecosystem, affected.name)
                self._index.setdefault(key, []).append((advisory, affected))

    def __len__(self) -> int:
        return len(self.advisories)

    @classmethod
    def load(cls, path: Path) -> VulnerabilityDB:
        try:
            document: Any = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise DatabaseError(f"{path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise DatabaseError(f"{path}: {exc}") from None
        records = document.get("records") if isinstance(document, dict) else document
        if not isinstance(records, list):
            raise DatabaseError(f"{path}: expected a list of OSV records in 'records'")
        advisories = []
        seen: set[str] = set()
        for index, record in enumerate(records):
            try:
                advisory = parse_record(record)
            except DatabaseError as exc:
                raise DatabaseError(f"{path}: records[{index}]: {exc}") from None
            if advisory.id in seen:
                raise DatabaseError(f"{path}: records[{index}]: {advisory.id} appears twice")
            seen.add(advisory.id)
            advisories.append(advisory)
        return cls(advisories)

    def match(self, packages: Iterable[Package]) -> list[Match]:
        """The advisories that affect each package, one match per (advisory, package)."""
        matches = []
        for package in packages:
            ecosystem, _, release = package.ecosystem.partition(":")
            if package.os_owned and ecosystem in LANGUAGE_ECOSYSTEMS:
                continue
            name = _normal_name(ecosystem, package.source_name)
            for advisory, affected in self._index.get((ecosystem, name), ()):
                if affected.release and release and affected.release != release:
                    continue
                fixed = affects(affected, package.source_version)
                if fixed is not None:
                    matches.append(Match(advisory, package, fixed))
        unique = {(m.advisory.id, m.package.key): m for m in matches}
        return list(unique.values())


def affects(affected: Affected, version: str) -> str | None:
    """The fixed version ("" when none is known) if ``version`` is affected, else None."""
    if version in affected.versions:
        return next((i.fixed for i in affected.intervals if i.fixed), "")
    if not affected.intervals:
        return None
    try:
        parsed = VERSION_CLASSES[affected.ecosystem](version)
    except Exception:
        return None  # a version this ecosystem cannot order is matched by no range
    for interval in affected.intervals:
        if interval.range is None or parsed in interval.range:
            return interval.fixed
    return None


def parse_record(record: object) -> Advisory:
    if not isinstance(record, dict):
        raise DatabaseError("a record must be an object")
    advisory_id = record.get("id")
    if not isinstance(advisory_id, str) or not advisory_id:
        raise DatabaseError("a record needs an 'id'")
    specific = record.get("database_specific") or {}
    severity_name = str(specific.get("severity", "")).upper() if isinstance(specific, dict) else ""
    if severity_name not in SEVERITIES:
        raise DatabaseError(
            f"{advisory_id}: database_specific.severity {severity_name!r} is not one of "
            f"{', '.join(SEVERITIES)}"
        )
    affected_list = record.get("affected")
    if not isinstance(affected_list, list) or not affected_list:
        raise DatabaseError(f"{advisory_id}: 'affected' must be a non-empty list")
    affected = tuple(_parse_affected(advisory_id, item) for item in affected_list)
    aliases = record.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise DatabaseError(f"{advisory_id}: 'aliases' must be a list of strings")
    return Advisory(
        id=advisory_id,
        aliases=tuple(aliases),
        summary=str(record.get("summary", "")),
        severity=SEVERITIES[severity_name],
        affected=affected,
    )


def _parse_affected(advisory_id: str, item: object) -> Affected:
    if not isinstance(item, dict) or not isinstance(item.get("package"), dict):
        raise DatabaseError(f"{advisory_id}: every 'affected' entry needs a 'package'")
    package = item["package"]
    full_ecosystem, name = package.get("ecosystem"), package.get("name")
    if not isinstance(full_ecosystem, str) or not isinstance(name, str) or not name:
        raise DatabaseError(f"{advisory_id}: affected package needs 'ecosystem' and 'name'")
    ecosystem, _, release = full_ecosystem.partition(":")
    if ecosystem not in RANGE_CLASSES:
        raise DatabaseError(
            f"{advisory_id}: ecosystem {full_ecosystem!r} is not supported "
            f"({', '.join(RANGE_CLASSES)})"
        )
    range_class = RANGE_CLASSES[ecosystem]
    intervals: list[Interval] = []
    for ranges in item.get("ranges") or []:
        if not isinstance(ranges, dict) or ranges.get("type") not in RANGE_TYPES | {"GIT"}:
            raise DatabaseError(f"{advisory_id}: a range needs a type ECOSYSTEM, SEMVER or GIT")
        if ranges["type"] == "GIT":
            continue  # commit ranges say nothing about installed versions
        intervals.extend(_intervals(advisory_id, range_class, ranges.get("events")))
    versions = item.get("versions") or []
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise DatabaseError(f"{advisory_id}: 'versions' must be a list of strings")
    if not intervals and not versions:
        raise DatabaseError(f"{advisory_id}: {name} has neither ranges nor versions")
    return Affected(
        ecosystem, release, _normal_name(ecosystem, name), tuple(intervals), frozenset(versions)
    )


def _version(advisory_id: str, range_class: type[VersionRange], value: object) -> Version:
    if not isinstance(value, str) or not value:
        raise DatabaseError(f"{advisory_id}: an event version must be a non-empty string")
    try:
        return VERSION_CLASSES[_ECOSYSTEM_OF[range_class]](value)
    except Exception as exc:
        raise DatabaseError(
            f"{advisory_id}: {value!r} is not a valid {range_class.scheme} version: {exc}"
        ) from None


def _intervals(advisory_id: str, range_class: type[VersionRange], events: object) -> list[Interval]:
    """OSV events, in order, to intervals: each ``introduced`` opens one, the next ``fixed``
    or ``last_affected`` closes it."""
    if not isinstance(events, list) or not events:
        raise DatabaseError(f"{advisory_id}: a range needs a list of events")
    intervals: list[Interval] = []
    lower: Version | None = None
    opened = False
    for event in events:
        if not isinstance(event, dict) or len(event) != 1:
            raise DatabaseError(f"{advisory_id}: each event has exactly one key")
        (kind, value), *_ = event.items()
        if kind == "introduced":
            if opened:
                raise DatabaseError(f"{advisory_id}: 'introduced' twice without an end")
            opened = True
            lower = None if value == "0" else _version(advisory_id, range_class, value)
            continue
        if kind not in ("fixed", "last_affected", "limit"):
            raise DatabaseError(f"{advisory_id}: unknown event {kind!r}")
        if kind == "limit":
            continue
        if not opened:
            raise DatabaseError(f"{advisory_id}: {kind!r} before any 'introduced'")
        upper = _version(advisory_id, range_class, value)
        constraints = [
            VersionConstraint(comparator="<" if kind == "fixed" else "<=", version=upper)
        ]
        if lower is not None:
            if not lower < upper:
                raise DatabaseError(f"{advisory_id}: {value!r} is not above its 'introduced'")
            constraints.insert(0, VersionConstraint(comparator=">=", version=lower))
        intervals.append(
            Interval(range_class(constraints=tuple(constraints)), value if kind == "fixed" else "")
        )
        opened, lower = False, None
    if opened:
        # Introduced and never fixed: every version from there on.
        only = (
            None
            if lower is None
            else range_class(constraints=(VersionConstraint(comparator=">=", version=lower),))
        )
        intervals.append(Interval(only, ""))
    return intervals
