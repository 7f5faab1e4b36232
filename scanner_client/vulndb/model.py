"""What every importer yields: advisories in one shape (the OSV schema's, trimmed to what
matching needs), whatever feed they came from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from cvss import CVSS3, CVSS4

from imagehandler.v1 import common_pb2
from scanner_client.vulndb.versions import Range

Severity: TypeAlias = common_pb2.Severity.ValueType

SEVERITY_NAMES: Final[dict[str, Severity]] = {
    "NEGLIGIBLE": common_pb2.SEVERITY_NEGLIGIBLE,
    "NONE": common_pb2.SEVERITY_NEGLIGIBLE,
    "LOW": common_pb2.SEVERITY_LOW,
    "MODERATE": common_pb2.SEVERITY_MEDIUM,
    "MEDIUM": common_pb2.SEVERITY_MEDIUM,
    "HIGH": common_pb2.SEVERITY_HIGH,
    "IMPORTANT": common_pb2.SEVERITY_HIGH,
    "CRITICAL": common_pb2.SEVERITY_CRITICAL,
}
_PYPI_NAME: Final = re.compile(r"[-_.]+")


@dataclass(frozen=True)
class Affected:
    """One package an advisory names, in one ecosystem and (for distributions) one release."""

    ecosystem: str  # without the release: "Debian", "Alpine", "PyPI"
    release: str  # "12", "v3.11"; "" for ecosystems without releases
    name: str  # normalised (see normal_name)
    ranges: tuple[Range, ...] = ()
    versions: tuple[str, ...] = ()
    # Alpine's secdb: the repository ("main", "community") the fix was published in.
    repository: str = ""
    # Alpine's secdb "0": this package was never affected in this release.
    not_affected: bool = False
    # The fixed version when the ranges cannot say (Node.js WG's patched_versions).
    fixed_hint: str = ""


@dataclass(frozen=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    title: str
    severity: Severity
    # RFC 3339; "" when the feed does not say.
    modified: str
    affected: tuple[Affected, ...]
    withdrawn: str = ""
    source: str = ""
    # The feed's kind ("osv", "alpine-secdb", "nodejs-wg"): the same id in two kinds is two
    # records about one vulnerability (merged when matched), in one kind it is one record.
    kind: str = "osv"

    @property
    def ids(self) -> frozenset[str]:
        return frozenset((self.id, *self.aliases))


@dataclass(frozen=True)
class Problem:
    """A record that was skipped, and why (reported, never silent)."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class Imported:
    """What one source yielded."""

    advisories: list[Advisory] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Records left out on purpose, by reason ("withdrawn", "ecosystem Gentoo not supported").
    left_out: dict[str, int] = field(default_factory=dict)
    # Files that hold no records (licences, READMEs, scripts).
    other_files: int = 0
    # The newest date a record carries ("" when none does).
    newest_record: str = ""
    licence: str = ""
    # The kinds of record found: "osv", "alpine-secdb", "nodejs-wg".
    formats: set[str] = field(default_factory=set)
    # Withdrawn ids, with the date of the withdrawal record (it wins over older copies).
    withdrawn: dict[str, str] = field(default_factory=dict)
    # Alpine secdb entries by advisory id, gathered over all files of the source.
    secdb: dict[str, dict[tuple[str, str], Affected]] = field(default_factory=dict)
    # The file being read (for problems found deep inside a record).
    current: str = ""

    def leave_out(self, reason: str) -> None:
        self.left_out[reason] = self.left_out.get(reason, 0) + 1


def split_ecosystem(full: str) -> tuple[str, str]:
    """``Debian:12`` -> (Debian, 12); ``Ubuntu:22.04:LTS`` -> (Ubuntu, 22.04); ``PyPI`` ->
    (PyPI, "")."""
    ecosystem, _, release = full.partition(":")
    if ecosystem == "Ubuntu" and release.endswith(":LTS"):
        release = release.removesuffix(":LTS")
    return ecosystem, release


def normal_name(ecosystem: str, name: str) -> str:
    """The name as matching compares it: PEP 503 for PyPI, as written elsewhere."""
    if ecosystem == "PyPI":
        return _PYPI_NAME.sub("-", name).lower()
    return name


def severity_from_cvss(vector: str) -> Severity | None:
    """The qualitative rating of a CVSS v3 or v4 vector's base score; None if it does not
    parse."""
    try:
        if vector.startswith("CVSS:4"):
            return severity_from_score(float(CVSS4(vector).base_score))
        if vector.startswith("CVSS:3"):
            return severity_from_score(float(CVSS3(vector).base_score))
    except Exception:  # the cvss library raises several types for a bad vector
        return None
    return None


def severity_from_score(score: float) -> Severity:
    """CVSS v3's rating scale."""
    if score >= 9.0:
        return common_pb2.SEVERITY_CRITICAL
    if score >= 7.0:
        return common_pb2.SEVERITY_HIGH
    if score >= 4.0:
        return common_pb2.SEVERITY_MEDIUM
    if score > 0.0:
        return common_pb2.SEVERITY_LOW
    return common_pb2.SEVERITY_NEGLIGIBLE


def title_of(summary: str, details: str) -> str:
    """The summary, else the first sentence of the details, at most 200 characters."""
    text = " ".join((summary or details or "").split())
    if not summary and ". " in text:
        text = text.split(". ", 1)[0] + "."
    return text if len(text) <= 200 else text[:199] + "…"
