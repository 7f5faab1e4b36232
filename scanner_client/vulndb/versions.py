"""Each ecosystem's own version order, and the OSV rule for "is this version in this range".

Versions are compared by :mod:`univers` (Debian's epochs and tildes, Alpine's ``-rN``
revisions, RPM, PEP 440, semver, Go, Maven, ...), never by hand. A range is evaluated as the OSV
schema's evaluation section says: its events sorted by version, ``introduced`` opens an
affected interval, ``fixed`` closes it (the fixed version is not affected), ``last_affected``
closes it after that version, and ``limit`` bounds the whole range from above.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from univers.version_range import NpmVersionRange
from univers.versions import (
    AlpineLinuxVersion,
    ComposerVersion,
    DebianVersion,
    GolangVersion,
    MavenVersion,
    NugetVersion,
    PypiVersion,
    RpmVersion,
    RubygemsVersion,
    SemverVersion,
    Version,
)

# OSV ecosystem (without its release) -> the version type its ECOSYSTEM ranges use.
ECOSYSTEM_VERSIONS: Final[dict[str, type[Version]]] = {
    "Debian": DebianVersion,
    "Ubuntu": DebianVersion,
    "Alpine": AlpineLinuxVersion,
    "Wolfi": AlpineLinuxVersion,
    "Chainguard": AlpineLinuxVersion,
    "Red Hat": RpmVersion,
    "Rocky Linux": RpmVersion,
    "AlmaLinux": RpmVersion,
    "openSUSE": RpmVersion,
    "SUSE": RpmVersion,
    "Mageia": RpmVersion,
    "Photon OS": RpmVersion,
    "PyPI": PypiVersion,
    "npm": SemverVersion,
    "Go": GolangVersion,
    "Maven": MavenVersion,
    "crates.io": SemverVersion,
    "RubyGems": RubygemsVersion,
    "NuGet": NugetVersion,
    "Packagist": ComposerVersion,
    "Hex": SemverVersion,
    "Pub": SemverVersion,
}

# Distributions: their packages are judged by the data of their own release.
DISTRIBUTIONS: Final = frozenset(
    {
        "Debian",
        "Ubuntu",
        "Alpine",
        "Red Hat",
        "Rocky Linux",
        "AlmaLinux",
        "openSUSE",
        "SUSE",
        "Mageia",
        "Photon OS",
    }
)

RANGE_TYPES: Final = frozenset({"ECOSYSTEM", "SEMVER"})
# Not an OSV type: a node-semver expression kept as written (the Node.js WG's advisories).
NPM_RANGE: Final = "NPM"
EVENT_KINDS: Final = ("introduced", "fixed", "last_affected", "limit")


class VersionError(ValueError):
    """A version string that the ecosystem's order cannot place."""


def supported(ecosystem: str) -> bool:
    return ecosystem in ECOSYSTEM_VERSIONS


def _semver_text(value: str) -> str:
    # Go's and some SEMVER ranges write a leading "v".
    return value[1:] if value[:1] == "v" and value[1:2].isdigit() else value


@functools.lru_cache(maxsize=65536)
def parse(ecosystem: str, range_type: str, value: str) -> Version:
    """``value`` as a version of ``ecosystem`` (SEMVER ranges: as semver); VersionError if not."""
    try:
        if range_type == "SEMVER" or ecosystem not in ECOSYSTEM_VERSIONS:
            return SemverVersion(_semver_text(value))
        kind = ECOSYSTEM_VERSIONS[ecosystem]
        if kind is GolangVersion:
            return kind(value if value.startswith("v") else "v" + value)
        return kind(value)
    except Exception as exc:  # univers raises several types; all mean "cannot be placed"
        raise VersionError(f"{value!r} is not a valid {ecosystem} version") from exc


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # introduced, fixed, last_affected, limit
    value: str


@dataclass(frozen=True, slots=True)
class Range:
    type: str  # ECOSYSTEM or SEMVER
    events: tuple[Event, ...]


@functools.lru_cache(maxsize=8192)
def npm_range(expression: str) -> NpmVersionRange:
    try:
        parsed: NpmVersionRange = NpmVersionRange.from_native(expression)  # type: ignore[no-untyped-call]
        return parsed
    except Exception as exc:
        raise VersionError(f"{expression!r} is not a node-semver range: {exc}") from None


def npm_lowest(expression: str) -> str:
    """The lowest version a node-semver range starts at (``>=4.17.19`` -> 4.17.19); "" when
    it has no lower bound (``<0.0.0``: nothing is patched)."""
    try:
        constraints = npm_range(expression).constraints
    except VersionError:
        return ""
    lowest = [c.version for c in constraints if c.comparator in (">=", "=")]
    if not lowest:
        return ""
    best = lowest[0]
    for version in lowest[1:]:
        if version < best:
            best = version
    return str(best)


def check_range(ecosystem: str, range_: Range) -> None:
    """Raise VersionError when an event version does not parse, or the events are not a
    range (no ``introduced`` at all)."""
    if range_.type == NPM_RANGE:
        npm_range(range_.events[0].value)
        return
    if not any(event.kind == "introduced" for event in range_.events):
        raise VersionError("a range needs an 'introduced' event")
    for event in range_.events:
        if event.kind not in EVENT_KINDS:
            raise VersionError(f"unknown event {event.kind!r}")
        if event.kind == "introduced" and event.value == "0":
            continue
        parse(ecosystem, range_.type, event.value)


def _sorted_events(ecosystem: str, range_: Range) -> list[tuple[Version | None, Event]]:
    # introduced "0" sorts first; at equal versions, the order of the record is kept.
    keyed = [
        (
            None
            if event.value == "0" and event.kind == "introduced"
            else parse(ecosystem, range_.type, event.value),
            event,
        )
        for event in range_.events
    ]
    zeros = [item for item in keyed if item[0] is None]
    rest = [item for item in keyed if item[0] is not None]
    rest.sort(key=functools.cmp_to_key(_compare))
    return zeros + rest


def _compare(a: tuple[Version | None, Event], b: tuple[Version | None, Event]) -> int:
    left, right = a[0], b[0]
    assert left is not None
    assert right is not None
    return -1 if left < right else (1 if right < left else 0)


@functools.lru_cache(maxsize=32768)
def _prepared(ecosystem: str, range_: Range) -> tuple[tuple[Version | None, Event], ...]:
    return tuple(_sorted_events(ecosystem, range_))


def affected_by(ecosystem: str, range_: Range, version: str) -> tuple[bool, str]:
    """(affected, fixed version) of ``version`` in ``range_``: the fixed version is the lowest
    ``fixed`` event above it ("" when none is known). A version the ecosystem cannot place is
    not affected by any range (it still matches an explicit ``versions`` list)."""
    try:
        if range_.type == NPM_RANGE:
            current = parse(ecosystem, "SEMVER", version)
            return current in npm_range(range_.events[0].value), ""
        current = parse(ecosystem, range_.type, version)
        events = _prepared(ecosystem, range_)
    except VersionError:
        return False, ""
    limits = [bound for bound, event in events if event.kind == "limit" and bound is not None]
    if limits and not any(current < bound for bound in limits):
        return False, ""
    vulnerable = False
    for bound, event in events:
        if event.kind == "introduced":
            if bound is None or not current < bound:
                vulnerable = True
        elif event.kind == "fixed":
            assert bound is not None
            if not current < bound:
                vulnerable = False
        elif event.kind == "last_affected":
            assert bound is not None
            if bound < current:
                vulnerable = False
    if not vulnerable:
        return False, ""
    fixed = [
        (bound, event.value)
        for bound, event in events
        if event.kind == "fixed" and bound is not None and current < bound
    ]
    if not fixed:
        return True, ""
    lowest = functools.reduce(lambda a, b: b if b[0] < a[0] else a, fixed)
    return True, lowest[1]


def highest(ecosystem: str, values: Sequence[str]) -> str:
    """The highest of ``values`` in the ecosystem's order (unparseable ones last); "" if none."""
    best: tuple[Version, str] | None = None
    for value in values:
        if not value:
            continue
        try:
            parsed = parse(ecosystem, "ECOSYSTEM", value)
        except VersionError:
            continue
        if best is None or best[0] < parsed:
            best = (parsed, value)
    if best is not None:
        return best[1]
    return next((value for value in values if value), "")
