"""SBOMs: CycloneDX 1.6 JSON out of the packages found, and packages out of an inline
CycloneDX document (an artifact's SBOM).

The document is written directly as JSON (the tests check it against CycloneDX's own 1.6
schema): an image of a few thousand packages is written in milliseconds, where building it
through cyclonedx-python-lib's object model takes seconds (its dependency graph registers
each component with a linear search).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from packageurl import PackageURL

from scanner_client.engine import ScanFailure
from scanner_client.engines.builtin.analyzers import Distro, Package, pypi_name

FORMAT: Final = "cyclonedx-json"
SPEC_VERSION: Final = "1.6"
SCHEMA: Final = "http://cyclonedx.org/schema/bom-1.6.schema.json"
PROPERTY_PREFIX: Final = "imagehandler:"
# A language package whose files an OS package installed (see Package.os_owned).
OS_OWNED: Final = "os-owned"
_ROOT_TYPES: Final = {"image": "container", "node": "operating-system"}


def build(subject: str, kind: str, packages: Sequence[Package], distro: Distro | None) -> bytes:
    """A CycloneDX 1.6 JSON document: ``subject`` (an image reference, a node, a path) with
    the packages as components (purl, the layer and path they came from), each a dependency
    of the subject."""
    root_ref = f"{kind}:{subject}"
    components: list[dict[str, Any]] = []
    if distro is not None:
        os_component: dict[str, Any] = {
            "type": "operating-system",
            "bom-ref": f"os:{distro.id}@{distro.version_id}",
            "name": distro.id,
        }
        if distro.version_id:
            os_component["version"] = distro.version_id
        components.append(os_component)
    seen: set[str] = set()
    for package in sorted(packages, key=lambda p: (p.type, p.name, p.version, p.path)):
        purl = package.purl
        ref = f"{purl}#{package.path}" if purl in seen else purl
        seen.add(purl)
        properties = [{"name": PROPERTY_PREFIX + "path", "value": "/" + package.path}]
        if package.layer:
            properties.append({"name": PROPERTY_PREFIX + "layer", "value": package.layer})
        if package.source_name != package.name:
            properties.append({"name": PROPERTY_PREFIX + "source", "value": package.source_name})
        if package.os_owned:
            # Kept so that matching this SBOM again judges the package the same way.
            properties.append({"name": PROPERTY_PREFIX + OS_OWNED, "value": "true"})
        component: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": package.name}
        if package.version:
            component["version"] = package.version
        component["purl"] = purl
        component["properties"] = properties
        components.append(component)
    refs = [component["bom-ref"] for component in components]
    document = {
        "$schema": SCHEMA,
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": uuid.uuid4().urn,
        "version": 1,
        "metadata": {
            "timestamp": datetime.now(UTC).isoformat(),
            "component": {
                "type": _ROOT_TYPES.get(kind, "application"),
                "bom-ref": root_ref,
                "name": subject,
            },
        },
        "components": components,
        "dependencies": [{"ref": root_ref, "dependsOn": refs}] + [{"ref": ref} for ref in refs],
    }
    return orjson.dumps(document)


# Parsed purls remembered (a few hundred bytes each).
PURL_CACHE: Final = 65536
# purl types whose packages are matched.
_PURL_TYPES: Final = frozenset({"deb", "apk", "rpm", "pypi", "npm", "golang", "maven"})


def packages_from_cyclonedx(data: bytes) -> list[Package]:
    """The components of a CycloneDX JSON document that carry a purl of a type we match
    (deb, apk, rpm, pypi, npm, golang, maven). The distribution release comes from the purl's
    ``distro``; a component with our ``os-owned`` property keeps it."""
    try:
        document: Any = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ScanFailure(f"the SBOM is not JSON: {exc}", code="HNDL-005", permanent=True) from None
    if not isinstance(document, dict) or document.get("bomFormat") != "CycloneDX":
        raise ScanFailure(
            "the SBOM is not a CycloneDX JSON document (bomFormat must be 'CycloneDX')",
            code="HNDL-005",
            permanent=True,
        )
    packages: list[Package] = []
    stack = list(document.get("components") or [])
    while stack:
        component = stack.pop()
        if not isinstance(component, dict):
            continue
        stack.extend(component.get("components") or [])
        raw = component.get("purl")
        if not isinstance(raw, str):
            continue
        package = _parsed(raw)
        if package is not None:
            properties = component.get("properties") or []
            owned = any(
                isinstance(p, dict)
                and p.get("name") == PROPERTY_PREFIX + OS_OWNED
                and p.get("value") == "true"
                for p in properties
            )
            packages.append(replace(package, os_owned=owned) if owned else package)
    return packages


@functools.lru_cache(maxsize=PURL_CACHE)
def _parsed(raw: str) -> Package | None:
    """The package a purl names, remembered: parsing a purl costs more than matching it, and
    the SBOMs of a fleet (rematched at every database update) share most of their purls."""
    try:
        return _package(PackageURL.from_string(raw))
    except ValueError:
        return None


def _package(purl: PackageURL) -> Package | None:
    kind = purl.type
    if kind not in _PURL_TYPES or not purl.version:
        return None
    qualifiers = purl.qualifiers if isinstance(purl.qualifiers, dict) else {}
    distro = str(qualifiers.get("distro", ""))
    arch = str(qualifiers.get("arch", ""))
    path = f"sbom:{purl.to_string()}"
    if kind == "deb":
        family = "Ubuntu" if (purl.namespace or "").lower() == "ubuntu" else "Debian"
        release = distro.rpartition("-")[2].split(".")[0] if distro else ""
        if family == "Ubuntu" and distro:
            release = distro.rpartition("-")[2]
        ecosystem = f"{family}:{release}" if release else family
        source = str(qualifiers.get("upstream", purl.name)).split("@")[0]
        return Package(
            "deb", purl.name, purl.version, ecosystem, source, purl.version, path, arch=arch
        )
    if kind == "apk":
        release = distro.rpartition("-")[2] if distro else ""
        major_minor = ".".join(release.split(".")[:2])
        ecosystem = f"Alpine:v{major_minor}" if major_minor else "Alpine"
        return Package(
            "apk", purl.name, purl.version, ecosystem, purl.name, purl.version, path, arch=arch
        )
    if kind == "rpm":
        distro_id, _, version_id = distro.rpartition("-")
        os_id = "rhel" if (purl.namespace or "") == "redhat" else (distro_id or purl.namespace)
        ecosystem = Distro(os_id or "", version_id).ecosystem if os_id else "rpm"
        epoch = str(qualifiers.get("epoch", ""))
        version = f"{epoch}:{purl.version}" if epoch else purl.version
        source = str(qualifiers.get("upstream", purl.name))
        if source.endswith(".rpm"):  # Syft names the source rpm file
            parts = source.removesuffix(".rpm").rsplit(".", 1)[0].rsplit("-", 2)
            source = parts[0] if len(parts) == 3 else purl.name
        return Package(
            "rpm", purl.name, version, ecosystem, source, version, path,
            distro=distro, arch=arch,
        )  # fmt: skip
    if kind == "pypi":
        return Package(
            "pypi", purl.name, purl.version, "PyPI", pypi_name(purl.name), purl.version, path
        )
    name = f"{purl.namespace}/{purl.name}" if purl.namespace else purl.name
    if kind == "golang":
        if name == "stdlib":
            version = purl.version if purl.version.startswith("go") else f"go{purl.version}"
            return Package("golang", name, version, "Go", name, version.removeprefix("go"), path)
        return Package("golang", name, purl.version, "Go", name, purl.version, path)
    if kind == "maven":
        coordinates = f"{purl.namespace}:{purl.name}" if purl.namespace else purl.name
        return Package("maven", purl.name, purl.version, "Maven", coordinates, purl.version, path)
    return Package("npm", name, purl.version, "npm", name, purl.version, path)
