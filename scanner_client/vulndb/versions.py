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
from typing import Any, Final, NamedTuple

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
# Not an OSV type: one node-semver comparator set (the Node.js WG's advisories), its events
# being comparators (">=", "<", ...) that must all hold. An advisory's "a || b" is two ranges.
NPM_RANGE: Final = "NPM"
_COMPARATORS: Final = frozenset({">=", ">", "<=", "<", "=", "*"})
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


class Event(NamedTuple):
    # Tuples: thousands are read back per scan, and a tuple is the cheapest object to make.
    kind: str  # introduced, fixed, last_affected, limit
    value: str


class Range(NamedTuple):
    type: str  # ECOSYSTEM, SEMVER, or NPM (a node-semver expression)
    events: tuple[Event, ...]


def npm_ranges(expression: str) -> tuple[Range, ...]:
    """A node-semver range as comparator sets, one per ``||`` alternative (``^1.2.3``,
    ``~1.2`` and x-ranges expanded by univers)."""
    return tuple(
        Range(NPM_RANGE, tuple(Event(c.comparator, str(c.version)) for c in r.constraints))
        for r in npm_range(expression)
    )


@functools.lru_cache(maxsize=8192)
def npm_range(expression: str) -> tuple[NpmVersionRange, ...]:
    """A node-semver range, one univers range per ``||`` alternative (flattened into one,
    alternatives can make a constraint sequence that univers refuses)."""
    alternatives = []
    for alternative in expression.split("||"):
        try:
            parsed: NpmVersionRange = NpmVersionRange.from_native(alternative.strip() or "*")  # type: ignore[no-untyped-call]
            SemverVersion("0.0.0") in parsed  # noqa: B015 (univers checks the sequence here)
        except Exception as exc:
            raise VersionError(f"{expression!r} is not a node-semver range: {exc}") from None
        alternatives.append(parsed)
    return tuple(alternatives)


def npm_lowest(expression: str) -> str:
    """The lowest version a node-semver range starts at (``>=4.17.19`` -> 4.17.19); "" when
    it has no lower bound (``<0.0.0``: nothing is patched)."""
    try:
        alternatives = npm_range(expression)
    except VersionError:
        return ""
    lowest = [c.version for r in alternatives for c in r.constraints if c.comparator in (">=", "=")]
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
        for event in range_.events:
            if event.kind not in _COMPARATORS:
                raise VersionError(f"unknown comparator {event.kind!r}")
            if event.kind != "*":
                parse("npm", "SEMVER", event.value)
        return
    if not any(event.kind == "introduced" for event in range_.events):
        raise VersionError("a range needs an 'introduced' event")
    for event in range_.events:
        if event.kind not in EVENT_KINDS:
            raise VersionError(f"unknown event {event.kind!r}")
        if event.kind == "introduced" and event.value == "0":
            continue
        parse(ecosystem, range_.type, event.value)


def sort_events(ecosystem: str, range_: Range) -> Range:
    """The range with its events in version order (``introduced: 0`` first; at equal
    versions the record's order is kept), as :func:`affected_by` expects them. Done once,
    when the database is built."""
    if range_.type == NPM_RANGE:
        return range_
    zeros = [e for e in range_.events if e.kind == "introduced" and e.value == "0"]
    rest = [
        (parse(ecosystem, range_.type, e.value), e)
        for e in range_.events
        if not (e.kind == "introduced" and e.value == "0")
    ]
    rest.sort(key=functools.cmp_to_key(_compare))
    return Range(range_.type, (*zeros, *(event for _, event in rest)))


def _compare(a: tuple[Version, Event], b: tuple[Version, Event]) -> int:
    return -1 if a[0] < b[0] else (1 if b[0] < a[0] else 0)


def _key(version: Version) -> Any:
    """What ``version`` is ordered by: univers orders a Version by its ``value`` (the
    packaging / semver / ... object) unless the class compares itself; comparing the values
    directly skips attrs' per-comparison tuples (most of the cost of matching)."""
    return version.value if type(version).__lt__ is Version.__lt__ else version


@functools.lru_cache(maxsize=131072)
def _bound(ecosystem: str, range_type: str, value: str) -> Any:
    return _key(parse(ecosystem, range_type, value))


def affected_by(ecosystem: str, range_: Range, version: str) -> tuple[bool, str]:
    """(affected, fixed version) of ``version`` in ``range_`` (events in version order, see
    :func:`sort_events`): the fixed version is the lowest ``fixed`` event above it ("" when
    none is known). A version the ecosystem cannot place is not affected by any range (it
    still matches an explicit ``versions`` list).

    The events are walked in order and the walk stops at the first bound above the version:
    no later event can change the outcome, so later bounds are not even parsed."""
    try:
        if range_.type == NPM_RANGE:
            return _satisfies(_bound(ecosystem, "SEMVER", version), range_), ""
        current = _bound(ecosystem, range_.type, version)
        events = range_.events
        vulnerable = False
        index = 0
        for index, event in enumerate(events):  # noqa: B007 (index is used after the loop)
            if event.kind == "limit":
                continue
            if event.kind == "introduced" and event.value == "0":
                vulnerable = True
                continue
            bound = _bound(ecosystem, range_.type, event.value)
            if current < bound:
                break
            if event.kind == "introduced":
                vulnerable = True
            elif event.kind == "fixed" or (event.kind == "last_affected" and bound < current):
                vulnerable = False
        else:
            index = len(events)
        if not vulnerable:
            return False, ""
        limits = [e.value for e in events if e.kind == "limit"]
        if limits and not any(current < _bound(ecosystem, range_.type, v) for v in limits):
            return False, ""
        fixed = next((e.value for e in events[index:] if e.kind == "fixed"), "")
        return True, fixed
    except VersionError:
        return False, ""


def _satisfies(current: Any, range_: Range) -> bool:
    for event in range_.events:
        if event.kind == "*":
            continue
        bound = _bound("npm", "SEMVER", event.value)
        if event.kind == ">=":
            ok = not current < bound
        elif event.kind == ">":
            ok = bound < current
        elif event.kind == "<":
            ok = current < bound
        elif event.kind == "<=":
            ok = not bound < current
        else:
            ok = not current < bound and not bound < current
        if not ok:
            return False
    return True


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
