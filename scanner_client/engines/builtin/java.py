"""Java archives (JAR, WAR, EAR and kin): which Maven artifacts they are and carry.

An archive is a zip. What names its contents, best first:

- ``META-INF/maven/GROUP/ARTIFACT/pom.properties`` (``groupId``, ``artifactId``, ``version``),
  which Maven writes into every archive it builds, and into the archives it shades in;
- the manifest (``META-INF/MANIFEST.MF``): ``Implementation-Version`` and kin, the OSGi
  ``Bundle-SymbolicName`` of the Maven bundle plugin;
- the file name (``log4j-core-2.14.1.jar``: name ``log4j-core``, version ``2.14.1``).

The archive itself is one package (its main artifact: the ``pom.properties`` whose artifact id
matches the file name, else the manifest and the file name); every other ``pom.properties``
in it is one more (a shaded dependency); archives inside it (``WEB-INF/lib``, Spring Boot's
``BOOT-INF/lib``) are read the same way, to a bounded depth. These are the rules Syft's Java
cataloguer follows, so that the two inventories agree.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

SUFFIXES: Final = (".jar", ".war", ".ear", ".par", ".sar", ".nar", ".jpi", ".hpi", ".kar", ".lpkg")
MANIFEST: Final = "meta-inf/manifest.mf"
# Archives inside archives: how deep, and how large one may be to be read into memory.
MAX_DEPTH: Final = 3
MAX_NESTED_BYTES: Final = 64 << 20
MAX_MEMBER_BYTES: Final = 1 << 20  # a manifest or pom.properties

_VERSION: Final = r"(?:\d.*|build\d+.*|rc?\d+)"
_FILENAME: Final = re.compile(
    rf"^(?P<name>[A-Za-z][\w.]*?(?:-[A-Za-z][\w.]*?)*?)(?:-(?P<version>{_VERSION}))?$", re.I
)
_SECONDARY: Final = re.compile(rf"[._-](?P<version>{_VERSION})$", re.I)
_IDENTIFIER_START: Final = re.compile(r"^[^\W\d]", re.UNICODE)
_NAME_FIELDS: Final = (
    "Name",
    "Bundle-Name",
    "Short-Name",
    "Extension-Name",
    "Implementation-Title",
)
_VERSION_FIELDS: Final = (
    "Implementation-Version",
    "Specification-Version",
    "Plugin-Version",
    "Bundle-Version",
)
_GROUP_FIELDS: Final = ("Implementation-Vendor-Id", "Extension-Name", "Specification-Vendor")


@dataclass(frozen=True)
class Artifact:
    """A Maven artifact found in an archive; ``path`` is the archive's path, with ``:INNER``
    for each archive inside it."""

    group: str
    artifact: str
    version: str
    path: str


def is_archive(rel: str) -> bool:
    return rel.lower().endswith(SUFFIXES)


def filename_parts(path: str) -> tuple[str, str]:
    """(name, version) of an archive's file name: ``spring-core-5.3.9.RELEASE.jar`` is
    (``spring-core``, ``5.3.9.RELEASE``); either may be ""."""
    base = path.rpartition("/")[2].rpartition(":")[2]
    stem = base.rpartition(".")[0] if "." in base else base
    match = _FILENAME.match(stem)
    if match is None:
        return "", ""
    name, version = match.group("name") or "", match.group("version") or ""
    if not version:
        secondary = _SECONDARY.search(name)
        if secondary is not None:
            version = secondary.group("version")
            name = name[: secondary.start()]
    return name, version


def parse_manifest(data: bytes) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The main attributes and the per-entry sections of a JAR manifest (72-byte lines
    continued by a leading space)."""
    sections: list[dict[str, str]] = [{}]
    last = ""
    for raw in data.decode("utf-8", "replace").splitlines():
        if not raw.strip():
            if sections[-1]:
                sections.append({})
            last = ""
            continue
        if raw.startswith(" ") and last:
            sections[-1][last] += raw[1:]
            continue
        key, sep, value = raw.partition(":")
        if sep:
            last = key.strip()
            sections[-1][last] = value.strip()
    main, *rest = sections
    return main, [section for section in rest if section]


def parse_pom_properties(data: bytes) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _name_from_filename(name: str) -> str:
    # ``org.example.thing`` may be group + artifact; Eclipse names its bundles that way.
    if "." in name and not name.startswith("org.eclipse."):
        fields = name.split(".")
        if all(_IDENTIFIER_START.match(field) for field in fields):
            return fields[-1]
    return name


def _field(main: dict[str, str], sections: list[dict[str, str]], name: str) -> str:
    if main.get(name):
        return main[name]
    return next((section[name] for section in sections if section.get(name)), "")


def _matches_filename(artifact: str, filename: str, artifacts: set[str]) -> bool:
    if not artifact or not filename:
        return False
    if filename in artifacts:
        return artifact == filename
    return artifact.startswith(filename) or filename.endswith(artifact)


def read_archive(data: bytes, path: str, depth: int = 0) -> list[Artifact]:
    """The artifacts of the archive ``data`` at ``path`` and of the archives in it; [] when it
    is not a zip (a damaged archive names nothing; nothing is guessed)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError):
        return []
    with archive:
        return list(_artifacts(archive, path, depth))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes | None:
    if info.file_size > limit:
        return None
    try:
        with archive.open(info) as member:
            return member.read(limit + 1)[:limit]
    except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError, EOFError):
        return None
    except Exception:  # zlib.error and other decompression failures of a damaged member
        return None


def _artifacts(archive: zipfile.ZipFile, path: str, depth: int) -> Iterator[Artifact]:
    infos = [info for info in archive.infolist() if not info.is_dir()]
    manifest_data = next(
        (
            _read_member(archive, info, MAX_MEMBER_BYTES)
            for info in infos
            if info.filename.lower() == MANIFEST
        ),
        None,
    )
    poms: dict[str, dict[str, str]] = {}
    for info in infos:
        parts = info.filename.split("/")
        if parts[-1] != "pom.properties" or "META-INF" not in parts[:-1]:
            continue
        raw = _read_member(archive, info, MAX_MEMBER_BYTES)
        if raw is None:
            continue
        properties = parse_pom_properties(raw)
        if properties.get("artifactId") and properties.get("version"):
            poms[info.filename.rpartition("/")[0]] = properties
    file_name, file_version = filename_parts(path)
    main: Artifact | None = None
    if manifest_data is not None:
        manifest, sections = parse_manifest(manifest_data)
        if "Weave-Classes" not in manifest:  # instrumentation that names what it instruments
            main = _main_artifact(manifest, sections, poms, file_name, file_version, path)
    if main is not None and main.artifact:
        yield main
    for properties in (poms[key] for key in sorted(poms)):
        artifact = Artifact(
            properties.get("groupId", ""), properties["artifactId"], properties["version"], path
        )
        if main is not None and (
            (artifact.group, artifact.artifact, artifact.version)
            == (main.group, main.artifact, main.version)
            or artifact.artifact == main.artifact
        ):
            continue
        yield artifact
    if depth >= MAX_DEPTH:
        return
    for info in infos:
        if not is_archive(info.filename):
            continue
        nested = _read_member(archive, info, MAX_NESTED_BYTES)
        if nested is not None:
            yield from read_archive(nested, f"{path}:{info.filename}", depth + 1)


def _main_artifact(
    manifest: dict[str, str],
    sections: list[dict[str, str]],
    poms: dict[str, dict[str, str]],
    file_name: str,
    file_version: str,
    path: str,
) -> Artifact:
    artifacts = {properties["artifactId"] for properties in poms.values()}
    for key in sorted(poms):
        properties = poms[key]
        if _matches_filename(properties["artifactId"], file_name, artifacts):
            return Artifact(
                properties.get("groupId", ""),
                properties["artifactId"],
                properties["version"],
                path,
            )
    name = ""
    symbolic = manifest.get("Bundle-SymbolicName", "").split(";")[0].strip()
    if (
        "Apache Maven Bundle Plugin" in manifest.get("Created-By", "")
        and symbolic
        and manifest.get("Implementation-Vendor-Id", "") != symbolic
    ):
        name = symbolic.split(".")[-1]
    if not name:
        name = _name_from_filename(file_name)
    if not name:
        name = next((manifest[field] for field in _NAME_FIELDS if manifest.get(field)), "")
    version = file_version or next(
        (value for value in (_field(manifest, sections, f) for f in _VERSION_FIELDS) if value), ""
    )
    group = next((manifest[field] for field in _GROUP_FIELDS if manifest.get(field)), "")
    return Artifact(group if "." in group else "", name, version, path)
