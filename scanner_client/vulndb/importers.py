"""Importers: OSV records (JSON or YAML), Alpine's secdb (YAML, and the JSON Alpine serves
today) and the Node.js security WG's npm advisories, each file recognised by its content.

Every record becomes an :class:`~scanner_client.vulndb.model.Advisory`. A record that cannot
be used is reported as a :class:`~scanner_client.vulndb.model.Problem` (the file and why) and
skipped; records left out on purpose (withdrawn, an ecosystem no version order exists for) are
counted by reason. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Final

import yaml

from imagehandler.v1 import common_pb2
from scanner_client.vulndb import versions
from scanner_client.vulndb.model import (
    SEVERITY_NAMES,
    Advisory,
    Affected,
    Imported,
    Problem,
    Severity,
    normal_name,
    severity_from_cvss,
    severity_from_score,
    split_ecosystem,
    title_of,
)
from scanner_client.vulndb.sources import Member
from scanner_client.vulndb.versions import Event, Range, VersionError

_ID: Final = re.compile(r"[A-Za-z][A-Za-z0-9._:+-]*")
_CVE_TYPO: Final = re.compile(r"^CVE[ _](\d{4})-")


FORMAT_NAMES: Final = {
    "osv": "osv",
    "osv-list": "osv",
    "secdb": "alpine-secdb",
    "nodejs": "nodejs-wg",
    "nodejs-index": "nodejs-wg",
}


class RecordError(ValueError):
    """Why one record cannot be used."""


def parse_document(member: Member) -> Any:
    """A record file's content: JSON, or YAML read as plain strings (so that ``1.10`` stays
    a version and is not read as the number 1.1)."""
    try:
        if member.path.endswith(".json"):
            return json.loads(member.data)
        return yaml.load(member.data, Loader=getattr(yaml, "CBaseLoader", yaml.BaseLoader))
    except (ValueError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecordError(f"does not parse: {reason}") from None


def import_members(members: Iterable[Member], imported: Imported, source: str) -> None:
    """Add what each member holds to ``imported``."""
    for member in members:
        imported.current = member.path
        try:
            document = parse_document(member)
        except RecordError as exc:
            imported.problems.append(Problem(member.path, str(exc)))
            continue
        import_document(document, member.path, imported, source)
    finish_secdb(imported, source)


def import_document(document: Any, path: str, imported: Imported, source: str) -> None:
    kind = detect(document)
    if kind:
        imported.formats.add(FORMAT_NAMES[kind])
    if kind == "osv":
        _add(imported, path, lambda: osv_record(document, source, imported))
    elif kind == "osv-list":
        records = document["records"] if isinstance(document, dict) else document
        for index, record in enumerate(records):
            _add(imported, f"{path}[{index}]", lambda r=record: osv_record(r, source, imported))
    elif kind == "secdb":
        secdb_document(document, path, imported, source)
    elif kind == "nodejs":
        _add(imported, path, lambda: nodejs_record(document, source, imported))
    elif kind == "nodejs-index":
        for key, record in document.items():
            _add(imported, f"{path}[{key}]", lambda r=record: nodejs_record(r, source, imported))
    else:
        imported.problems.append(
            Problem(path, "not an OSV record, an Alpine secdb file or a Node.js WG advisory")
        )


def _add(imported: Imported, path: str, make: Any) -> None:
    try:
        advisory = make()
    except RecordError as exc:
        imported.problems.append(Problem(path, str(exc)))
        return
    if advisory is not None:
        imported.advisories.append(advisory)


def detect(document: Any) -> str:
    if isinstance(document, dict):
        if "module_name" in document and "vulnerable_versions" in document:
            return "nodejs"
        if "packages" in document and ("distroversion" in document or "reponame" in document):
            return "secdb"
        if "id" in document and ("affected" in document or "withdrawn" in document):
            return "osv"
        if isinstance(document.get("records"), list):
            return "osv-list"
        values = list(document.values())
        if values and all(isinstance(v, dict) and "module_name" in v for v in values):
            return "nodejs-index"
    if (
        isinstance(document, list)
        and document
        and all(isinstance(item, dict) and "id" in item for item in document)
    ):
        return "osv-list"
    return ""


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{what} must be a non-empty string")
    return value.strip()


def _newest(imported: Imported, *dates: object) -> None:
    for value in dates:
        if isinstance(value, str) and value > imported.newest_record:
            imported.newest_record = value


def clean_id(value: str) -> str:
    value = _CVE_TYPO.sub(r"CVE-\1-", value.strip().strip(",;"))
    if not _ID.fullmatch(value):
        raise RecordError(f"{value[:80]!r} is not an advisory id")
    return value


# ---- OSV ----------------------------------------------------------------------------------------


def osv_record(record: Any, source: str, imported: Imported) -> Advisory | None:
    """One OSV record; None when it is withdrawn or names only unsupported ecosystems."""
    if not isinstance(record, dict):
        raise RecordError("a record must be an object")
    advisory_id = clean_id(_text(record.get("id"), "'id'"))
    _newest(imported, record.get("modified"))
    if record.get("withdrawn"):
        imported.leave_out("withdrawn")
        imported.withdrawn[advisory_id] = str(record.get("modified") or record["withdrawn"])
        return None
    # "upstream" (OSV 1.6: DEBIAN-CVE-2023-4911 -> CVE-2023-4911) names the same
    # vulnerability for matching purposes: one finding, its CVE as the id.
    aliases: list[Any] = []
    for key in ("aliases", "upstream"):
        listed = record.get(key) or []
        if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
            raise RecordError(f"{advisory_id}: 'aliases' and 'upstream' must be lists of strings")
        aliases += listed
    affected_list = record.get("affected")
    if not isinstance(affected_list, list) or not affected_list:
        raise RecordError(f"{advisory_id}: 'affected' must be a non-empty list")
    affected: list[Affected] = []
    unsupported: set[str] = set()
    for item in affected_list:
        entry = _osv_affected(advisory_id, item, unsupported, imported)
        if entry is not None:
            affected.append(entry)
    if not affected:
        for ecosystem in sorted(unsupported):
            imported.leave_out(f"ecosystem {ecosystem} has no version order here")
        return None
    return Advisory(
        id=advisory_id,
        aliases=tuple(sorted({clean_id(a) for a in aliases} - {advisory_id})),
        title=title_of(str(record.get("summary") or ""), str(record.get("details") or "")),
        severity=_osv_severity(record),
        modified=str(record.get("modified") or ""),
        affected=tuple(affected),
        source=source,
    )


def _osv_severity(record: dict[str, Any]) -> Severity:
    found: list[Severity] = []
    for entry in record.get("severity") or []:
        if isinstance(entry, dict) and isinstance(entry.get("score"), str):
            rated = severity_from_cvss(entry["score"])
            if rated is not None:
                found.append(rated)
    if found:
        return max(found)
    specific = record.get("database_specific")
    if isinstance(specific, dict):
        named = SEVERITY_NAMES.get(str(specific.get("severity", "")).upper())
        if named is not None:
            return named
    for item in record.get("affected") or []:
        specific = item.get("ecosystem_specific") if isinstance(item, dict) else None
        if isinstance(specific, dict):
            named = SEVERITY_NAMES.get(str(specific.get("severity", "")).upper())
            if named is not None:
                return named
    return common_pb2.SEVERITY_UNSPECIFIED


def _osv_affected(
    advisory_id: str, item: Any, unsupported: set[str], imported: Imported
) -> Affected | None:
    if not isinstance(item, dict) or not isinstance(item.get("package"), dict):
        raise RecordError(f"{advisory_id}: every 'affected' entry needs a 'package'")
    package = item["package"]
    full = _text(package.get("ecosystem"), f"{advisory_id}: affected package 'ecosystem'")
    name = _text(package.get("name"), f"{advisory_id}: affected package 'name'")
    ecosystem, release = split_ecosystem(full)
    if not versions.supported(ecosystem):
        unsupported.add(ecosystem)
        return None
    ranges: list[Range] = []
    for raw in item.get("ranges") or []:
        if not isinstance(raw, dict) or raw.get("type") not in versions.RANGE_TYPES | {"GIT"}:
            raise RecordError(f"{advisory_id}: a range needs a type ECOSYSTEM, SEMVER or GIT")
        if raw["type"] == "GIT":
            continue  # commit ranges say nothing about installed versions
        try:
            ranges.append(_osv_range(advisory_id, ecosystem, raw))
        except RecordError as exc:
            # One bad range: the record keeps what else it says (other ranges, versions).
            imported.problems.append(Problem(imported.current, f"{exc} (this range skipped)"))
    listed = item.get("versions") or []
    if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
        raise RecordError(f"{advisory_id}: 'versions' must be a list of strings")
    if not ranges and not listed:
        raise RecordError(f"{advisory_id}: {name} has no usable version range nor versions")
    return Affected(
        ecosystem=ecosystem,
        release=release,
        name=normal_name(ecosystem, name),
        ranges=tuple(ranges),
        versions=tuple(sorted(set(listed))),
    )


def _osv_range(advisory_id: str, ecosystem: str, raw: dict[str, Any]) -> Range:
    events = raw.get("events")
    if not isinstance(events, list) or not events:
        raise RecordError(f"{advisory_id}: a range needs a list of events")
    parsed: list[Event] = []
    for event in events:
        if not isinstance(event, dict) or len(event) != 1:
            raise RecordError(f"{advisory_id}: each event has exactly one key")
        ((kind, value),) = event.items()
        if not isinstance(value, str) or not value:
            raise RecordError(f"{advisory_id}: event {kind!r} needs a version string")
        parsed.append(Event(str(kind), value))
    range_ = Range(str(raw["type"]), tuple(parsed))
    try:
        versions.check_range(ecosystem, range_)
        return versions.sort_events(ecosystem, range_)
    except VersionError as exc:
        raise RecordError(f"{advisory_id}: {exc}") from None


# ---- Alpine secdb -------------------------------------------------------------------------------


def secdb_document(document: dict[str, Any], path: str, imported: Imported, source: str) -> None:
    """One secdb file (a release and repository): each fixed version -> its CVE ids. One
    advisory per (release, package, id); ``0`` as the fixed version means never affected."""
    release = str(document.get("distroversion") or "")
    repository = str(document.get("reponame") or "")
    if not re.fullmatch(r"v\d+\.\d+|edge", release):
        imported.problems.append(
            Problem(path, f"distroversion {release!r} is not a release like v3.11")
        )
        return
    packages = document.get("packages") or []
    if not isinstance(packages, list):
        imported.problems.append(Problem(path, "'packages' must be a list"))
        return
    for index, entry in enumerate(packages):
        where = f"{path}: packages[{index}]"
        pkg = entry.get("pkg") if isinstance(entry, dict) else None
        if not isinstance(pkg, dict) or not isinstance(pkg.get("name"), str):
            imported.problems.append(Problem(where, "needs pkg.name"))
            continue
        name = pkg["name"]
        fixes = pkg.get("secfixes") or {}
        if not isinstance(fixes, dict):
            imported.problems.append(Problem(where, f"{name}: secfixes must be a mapping"))
            continue
        for fixed, ids in fixes.items():
            fixed = str(fixed).strip()
            if not isinstance(ids, list):
                imported.problems.append(Problem(where, f"{name} {fixed}: ids must be a list"))
                continue
            not_affected = fixed == "0"
            if not not_affected:
                try:
                    versions.parse("Alpine", "ECOSYSTEM", fixed)
                except VersionError as exc:
                    imported.problems.append(Problem(where, f"{name}: {exc}"))
                    continue
            for advisory_id in _secdb_ids(ids, where, name, fixed, imported):
                entries = imported.secdb.setdefault(advisory_id, {})
                previous = entries.get((release, name))
                if (
                    previous is not None
                    and _secdb_fix(previous)
                    and (not_affected or _higher(_secdb_fix(previous), fixed))
                ):
                    continue  # the same id fixed twice: the higher fix is the one that holds
                entries[(release, name)] = Affected(
                    ecosystem="Alpine",
                    release=release,
                    name=name,
                    ranges=()
                    if not_affected
                    else (Range("ECOSYSTEM", (Event("introduced", "0"), Event("fixed", fixed))),),
                    repository=repository,
                    not_affected=not_affected,
                )


def _secdb_ids(ids: list[Any], where: str, name: str, fixed: str, imported: Imported) -> list[str]:
    """The ids of one fix; free text after an id (``CVE-2018-14468 (FrameRelay)``) is a
    comment."""
    found = []
    for raw in ids:
        text = re.sub(r"\([^)]*\)", " ", str(raw))
        for word in text.replace(",", " ").split():
            try:
                found.append(clean_id(word))
            except RecordError as exc:
                imported.problems.append(Problem(where, f"{name} {fixed}: {exc}"))
    return found


def _secdb_fix(affected: Affected) -> str:
    return affected.ranges[0].events[-1].value if affected.ranges else ""


def _higher(left: str, right: str) -> bool:
    """Whether Alpine version ``left`` is above ``right``."""
    return versions.parse("Alpine", "ECOSYSTEM", right) < versions.parse(
        "Alpine", "ECOSYSTEM", left
    )


def finish_secdb(imported: Imported, source: str) -> None:
    """One advisory per id, naming every (release, package) the secdb files gave it."""
    for advisory_id, entries in sorted(imported.secdb.items()):
        imported.advisories.append(
            Advisory(
                id=advisory_id,
                aliases=(),
                title="",
                severity=common_pb2.SEVERITY_UNSPECIFIED,
                modified="",
                affected=tuple(entries[key] for key in sorted(entries)),
                source=source,
                kind="alpine-secdb",
            )
        )
    imported.secdb.clear()


# ---- Node.js security WG ------------------------------------------------------------------------


def nodejs_record(record: Any, source: str, imported: Imported) -> Advisory:
    """One advisory of the Node.js security WG's ``vuln/npm``: ``vulnerable_versions`` is a
    node-semver range (``>=4.17.15 <4.17.19``, ``||`` between alternatives), kept as written
    and evaluated by node-semver's rules (:func:`versions.affected_by`)."""
    if not isinstance(record, dict):
        raise RecordError("a record must be an object")
    number = record.get("id")
    if not isinstance(number, int):
        raise RecordError("'id' must be a number")
    advisory_id = f"NSWG-ECO-{number}"
    name = _text(record.get("module_name"), f"{advisory_id}: 'module_name'")
    _newest(imported, record.get("updated_at"))
    vulnerable = _text(record.get("vulnerable_versions"), f"{advisory_id}: 'vulnerable_versions'")
    try:
        ranges = versions.npm_ranges(vulnerable)
        for range_ in ranges:
            versions.check_range("npm", range_)
    except VersionError as exc:
        raise RecordError(f"{advisory_id}: vulnerable_versions: {exc}") from None
    patched = record.get("patched_versions")
    cves = record.get("cves") or []
    if not isinstance(cves, list):
        raise RecordError(f"{advisory_id}: 'cves' must be a list")
    # The publisher's score first: some records' vectors compute to another score (516:
    # cvss_score 7.4, its vector 6.3) and the record states which one it means.
    severity: Severity = common_pb2.SEVERITY_UNSPECIFIED
    score = record.get("cvss_score")
    if isinstance(score, int | float):
        severity = severity_from_score(float(score))
    elif isinstance(record.get("cvss_vector"), str):
        severity = severity_from_cvss(record["cvss_vector"]) or severity
    return Advisory(
        id=advisory_id,
        aliases=tuple(sorted({clean_id(str(c)) for c in cves})),
        title=title_of(str(record.get("title") or ""), str(record.get("overview") or "")),
        severity=severity,
        modified=str(record.get("updated_at") or ""),
        kind="nodejs-wg",
        affected=(
            Affected(
                ecosystem="npm",
                release="",
                name=name,
                ranges=ranges,
                fixed_hint=versions.npm_lowest(patched) if isinstance(patched, str) else "",
            ),
        ),
        source=source,
    )
