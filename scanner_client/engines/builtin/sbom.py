"""SBOMs: CycloneDX JSON out of the packages found (``cyclonedx-python-lib``), and packages out
of an inline CycloneDX document (an artifact's SBOM)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from cyclonedx.model import Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from scanner_client.engine import ScanFailure
from scanner_client.engines.builtin.analyzers import Distro, Package, pypi_name

FORMAT: Final = "cyclonedx-json"
PROPERTY_PREFIX: Final = "imagehandler:"


def build(subject: str, kind: str, packages: Sequence[Package], distro: Distro | None) -> bytes:
    """A CycloneDX 1.6 JSON document: ``subject`` (an image reference, a node, a path) with
    the packages as components (purl, the layer and path they came from)."""
    bom = Bom()
    root_type = {
        "image": ComponentType.CONTAINER,
        "node": ComponentType.OPERATING_SYSTEM,
    }.get(kind, ComponentType.APPLICATION)
    root = Component(name=subject, type=root_type, bom_ref=f"{kind}:{subject}")
    bom.metadata.component = root
    components = []
    if distro is not None:
        os_component = Component(
            name=distro.id,
            version=distro.version_id or None,
            type=ComponentType.OPERATING_SYSTEM,
            bom_ref=f"os:{distro.id}@{distro.version_id}",
        )
        components.append(os_component)
    seen: set[str] = set()
    for package in sorted(packages, key=lambda p: (p.type, p.name, p.version, p.path)):
        purl = package.purl
        ref = f"{purl}#{package.path}" if purl in seen else purl
        seen.add(purl)
        component = Component(
            name=package.name,
            version=package.version,
            type=ComponentType.LIBRARY,
            purl=PackageURL.from_string(purl),
            bom_ref=ref,
        )
        component.properties.add(Property(name=PROPERTY_PREFIX + "path", value="/" + package.path))
        if package.layer:
            component.properties.add(Property(name=PROPERTY_PREFIX + "layer", value=package.layer))
        if package.source_name != package.name:
            component.properties.add(
                Property(name=PROPERTY_PREFIX + "source", value=package.source_name)
            )
        components.append(component)
    for component in components:
        bom.components.add(component)
    bom.register_dependency(root, components)
    return JsonV1Dot6(bom).output_as_string(indent=None).encode()


# purl type -> (OSV ecosystem, Package.type)
_PURL_TYPES: Final = {"deb": "deb", "apk": "apk", "pypi": "pypi", "npm": "npm"}


def packages_from_cyclonedx(data: bytes) -> list[Package]:
    """The components of a CycloneDX JSON document that carry a purl of a type we match
    (deb, apk, pypi, npm). The Debian/Alpine release comes from the purl's ``distro``."""
    try:
        document: Any = json.loads(data)
    except ValueError as exc:
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
        try:
            purl = PackageURL.from_string(raw)
        except ValueError:
            continue
        package = _package(purl)
        if package is not None:
            packages.append(package)
    return packages


def _package(purl: PackageURL) -> Package | None:
    kind = _PURL_TYPES.get(purl.type)
    if kind is None or not purl.version:
        return None
    qualifiers = purl.qualifiers if isinstance(purl.qualifiers, dict) else {}
    distro = str(qualifiers.get("distro", ""))
    path = f"sbom:{purl.to_string()}"
    if kind == "deb":
        family = "Ubuntu" if (purl.namespace or "").lower() == "ubuntu" else "Debian"
        release = distro.rpartition("-")[2].split(".")[0] if distro else ""
        if family == "Ubuntu" and distro:
            release = distro.rpartition("-")[2]
        ecosystem = f"{family}:{release}" if release else family
        source = str(qualifiers.get("upstream", purl.name)).split("@")[0]
        return Package("deb", purl.name, purl.version, ecosystem, source, purl.version, path)
    if kind == "apk":
        release = distro.rpartition("-")[2] if distro else ""
        major_minor = ".".join(release.split(".")[:2])
        ecosystem = f"Alpine:v{major_minor}" if major_minor else "Alpine"
        return Package("apk", purl.name, purl.version, ecosystem, purl.name, purl.version, path)
    if kind == "pypi":
        return Package(
            "pypi", purl.name, purl.version, "PyPI", pypi_name(purl.name), purl.version, path
        )
    name = f"{purl.namespace}/{purl.name}" if purl.namespace else purl.name
    return Package("npm", name, purl.version, "npm", name, purl.version, path)
