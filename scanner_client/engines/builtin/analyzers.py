"""Package analysers: what is installed in a filesystem root.

- the distribution, from ``etc/os-release`` (or ``etc/alpine-release``, ``etc/debian_version``);
- Debian packages from the dpkg database (``var/lib/dpkg/status`` and the ``status.d``
  directory distroless images use), with their source package, which is what Debian's
  advisories name;
- Alpine packages from the apk database (``lib/apk/db/installed``), with their origin;
- Python distributions from ``*.dist-info/METADATA``, ``*.egg-info/PKG-INFO`` and single-file
  ``*.egg-info`` (what ``setup.py install`` of distutils-era packages leaves);
- npm packages from every ``package.json`` that names a package and its version (the way
  Syft's cataloguer reads images: inside ``node_modules`` or not);
- which files the OS packages own (dpkg ``info/*.list``, apk ``R:`` lines, rpm file lists),
  so that a language package installed by the distribution is judged by the distribution.

Every reader takes bytes and returns :class:`Package` records; the caller finds the files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from typing import Final

from packageurl import PackageURL

DPKG_STATUS: Final = "var/lib/dpkg/status"
DPKG_STATUS_DIR: Final = "var/lib/dpkg/status.d"
DPKG_INFO_DIR: Final = "var/lib/dpkg/info"
APK_INSTALLED: Final = "lib/apk/db/installed"
OS_RELEASE_PATHS: Final = ("etc/os-release", "usr/lib/os-release")

_PYPI_NAME = re.compile(r"[-_.]+")


@dataclass(frozen=True)
class Distro:
    """The operating system of a root: ``id`` as os-release says (``debian``, ``alpine``)."""

    id: str
    version_id: str
    pretty_name: str = ""

    @property
    def ecosystem(self) -> str:
        """The OSV ecosystem of its packages: ``Debian:12``, ``Alpine:v3.20``, ``Ubuntu:22.04``,
        ``Rocky Linux:9``; the os-release id itself for a distribution OSV does not name."""
        major = self.version_id.split(".")[0]
        if self.id == "debian":
            return f"Debian:{major}" if major else "Debian"
        if self.id == "alpine":
            major_minor = ".".join(self.version_id.split(".")[:2])
            return f"Alpine:v{major_minor}" if major_minor else "Alpine"
        if self.id == "ubuntu":
            return f"Ubuntu:{self.version_id}" if self.version_id else "Ubuntu"
        family = RPM_FAMILIES.get(self.id)
        if family is not None:
            release = major if family not in RPM_FULL_RELEASE else self.version_id
            return f"{family}:{release}" if release else family
        return self.id

    @property
    def purl_namespace(self) -> str:
        """The namespace of its OS packages' purls (``redhat`` for RHEL, as Syft writes)."""
        return {"rhel": "redhat"}.get(self.id, self.id)


# os-release ids of rpm distributions -> the ecosystem name their advisories use (OSV's where
# it has one); releases by major version except where the full version names the release.
RPM_FAMILIES: Final = {
    "rhel": "Red Hat",
    "centos": "CentOS",
    "rocky": "Rocky Linux",
    "almalinux": "AlmaLinux",
    "ol": "Oracle Linux",
    "fedora": "Fedora",
    "amzn": "Amazon Linux",
    "opensuse-leap": "openSUSE",
    "opensuse-tumbleweed": "openSUSE",
    "sles": "SUSE",
    "mariner": "Mariner",
    "azurelinux": "Azure Linux",
    "photon": "Photon OS",
}
RPM_FULL_RELEASE: Final = frozenset({"openSUSE", "SUSE", "Mariner", "Azure Linux", "Photon OS"})


@dataclass(frozen=True)
class Package:
    """An installed package.

    ``ecosystem`` is the OSV ecosystem (``Debian:12``, ``Alpine:v3.20``, ``PyPI``, ``npm``);
    ``source_name``/``source_version`` are what advisories name (the Debian source package,
    the Alpine origin; the package itself elsewhere). ``path`` is where it was found and
    ``layer`` the digest of the layer that brought it ("" outside images). ``os_owned``: a
    language package (PyPI, npm, ...) whose files belong to an OS package; the distribution's
    data judges it, not the language feed.
    """

    type: str  # deb, apk, rpm, pypi, npm, golang, maven
    name: str
    version: str
    ecosystem: str
    source_name: str
    source_version: str
    path: str
    layer: str = ""
    distro: str = ""
    # A language package whose files belong to an OS package: the distribution's data
    # judges it (through its OS package), not the language feed (see vulndb.matcher).
    os_owned: bool = False
    # The machine architecture of an OS package ("amd64", "x86_64"), "" when not known.
    arch: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.type, self.name, self.version, self.path)

    @property
    def purl(self) -> str:
        qualifiers = {"arch": self.arch} if self.arch else {}
        if self.distro:
            qualifiers["distro"] = self.distro
        if self.type == "deb":
            if self.source_name != self.name:
                qualifiers["upstream"] = self.source_name
            namespace = self.ecosystem.split(":")[0].lower()
            return PackageURL("deb", namespace, self.name, self.version, qualifiers).to_string()
        if self.type == "apk":
            return PackageURL("apk", "alpine", self.name, self.version, qualifiers).to_string()
        if self.type == "rpm":
            epoch, _, version = self.version.rpartition(":")
            if epoch:
                qualifiers["epoch"] = epoch
            if self.source_name != self.name:
                qualifiers["upstream"] = self.source_name
            distro_id = self.distro.rpartition("-")[0]
            return PackageURL(
                "rpm", Distro(distro_id, "").purl_namespace or None, self.name, version, qualifiers
            ).to_string()
        if self.type == "golang":
            namespace, _, name = self.name.rpartition("/")
            version = self.version.removeprefix("go") if self.name == "stdlib" else self.version
            return PackageURL("golang", namespace or None, name, version).to_string()
        if self.type == "maven":
            group, _, artifact = self.source_name.rpartition(":")
            return PackageURL("maven", group or None, artifact, self.version).to_string()
        if self.type == "pypi":
            return PackageURL("pypi", None, pypi_name(self.name), self.version).to_string()
        namespace, _, name = self.name.rpartition("/")
        return PackageURL("npm", namespace or None, name, self.version).to_string()

    def with_layer(self, layer: str) -> Package:
        return replace(self, layer=layer)


def pypi_name(name: str) -> str:
    """PEP 503 normalised name: ``Jinja2`` and ``jinja_2`` are ``jinja2`` and ``jinja-2``."""
    return _PYPI_NAME.sub("-", name).lower()


def parse_os_release(data: bytes) -> Distro | None:
    values: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    distro_id = values.get("ID", "").lower()
    if not distro_id:
        return None
    return Distro(distro_id, values.get("VERSION_ID", ""), values.get("PRETTY_NAME", ""))


def _stanzas(data: bytes) -> list[dict[str, str]]:
    """RFC 822-like stanzas (dpkg status): ``Field: value`` lines, continuation lines, blank
    lines between records."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            if current:
                records.append(current)
            current, last = {}, ""
            continue
        if line[0] in " \t":
            if last:
                current[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            last = key.strip()
            current[last] = value.strip()
    if current:
        records.append(current)
    return records


def parse_dpkg_status(data: bytes, path: str, distro: Distro | None) -> list[Package]:
    """Installed packages of a dpkg status file (``Status: install ok installed``; distroless
    ``status.d`` files have no Status field: every stanza there is installed)."""
    ecosystem = distro.ecosystem if distro and distro.id in ("debian", "ubuntu") else "Debian"
    packages = []
    for record in _stanzas(data):
        name = record.get("Package", "")
        version = record.get("Version", "")
        status = record.get("Status", "install ok installed").split()
        if not name or not version or (status and status[-1] != "installed"):
            continue
        source_name, source_version = name, version
        source = record.get("Source", "")
        if source:
            source_name, _, rest = source.partition(" ")
            match = re.match(r"\(([^)]+)\)", rest.strip())
            if match:
                source_version = match.group(1)
        packages.append(
            Package(
                "deb",
                name,
                version,
                ecosystem,
                source_name,
                source_version,
                path,
                distro=f"{distro.id}-{distro.version_id}" if distro else "",
                arch=record.get("Architecture", ""),
            )
        )
    return packages


def unique_os_packages(packages: list[Package]) -> list[Package]:
    """The packages with each (type, name, version, arch) once: a package that dpkg's
    ``status`` and a ``status.d`` file both list is one package (the first path is kept)."""
    seen: set[tuple[str, str, str, str]] = set()
    unique = []
    for package in packages:
        key = (package.type, package.name, package.version, package.arch)
        if key not in seen:
            seen.add(key)
            unique.append(package)
    return unique


def parse_apk_installed(data: bytes, path: str, distro: Distro | None) -> list[Package]:
    """Installed packages of apk's database: ``P:`` name, ``V:`` version, ``o:`` origin."""
    ecosystem = distro.ecosystem if distro and distro.id == "alpine" else "Alpine"
    packages = []
    for block in data.decode("utf-8", "replace").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if len(line) > 2 and line[1] == ":" and line[0] not in fields:
                fields[line[0]] = line[2:]
        name, version = fields.get("P", ""), fields.get("V", "")
        if not name or not version:
            continue
        packages.append(
            Package(
                "apk",
                name,
                version,
                ecosystem,
                fields.get("o", name),
                version,
                path,
                distro=f"alpine-{distro.version_id}" if distro else "",
                arch=fields.get("A", ""),
            )
        )
    return packages


def apk_owned_files(data: bytes) -> set[str]:
    """The files apk's database says its packages installed: each ``R:`` line names a file of
    the directory the ``F:`` line before it names (paths relative to the root)."""
    owned: set[str] = set()
    directory = ""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("F:"):
            directory = line[2:].strip("/")
        elif line.startswith("R:"):
            owned.add(f"{directory}/{line[2:]}" if directory else line[2:])
        elif not line:
            directory = ""
    return owned


def dpkg_owned_files(data: bytes) -> set[str]:
    """The paths of a dpkg ``info/PACKAGE.list`` file (one absolute path a line), or of a
    ``status.d/PACKAGE.md5sums`` file (``MD5  relative/path``), relative to the root."""
    owned: set[str] = set()
    for line in data.decode("utf-8", "replace").splitlines():
        if "  " in line and not line.startswith("/"):
            line = line.split("  ", 1)[1]
        line = line.strip().strip("/")
        if line and line != ".":
            owned.add(line)
    return owned


def is_python_metadata(rel: str) -> bool:
    """A Python distribution's metadata file (callers pass regular files only: a path that
    ends in ``.egg-info`` is then the single-file form)."""
    return rel.endswith((".dist-info/METADATA", ".egg-info/PKG-INFO", ".egg-info"))


def parse_python_metadata(data: bytes, path: str) -> list[Package]:
    headers = BytesHeaderParser().parsebytes(data)
    name, version = headers.get("Name", ""), headers.get("Version", "")
    if not name or not version:
        return []
    name, version = str(name).strip(), str(version).strip()
    return [Package("pypi", name, version, "PyPI", pypi_name(name), version, path)]


def is_npm_manifest(rel: str) -> bool:
    """Any ``package.json``: modules in ``node_modules``, an application's own manifest, and
    the modules Debian ships under ``/usr/share/nodejs`` (owned by their dpkg packages)."""
    return rel == "package.json" or rel.endswith("/package.json")


def parse_npm_manifest(data: bytes, path: str) -> list[Package]:
    """The package a ``package.json`` names; one that names no version (a sub-package's
    manifest, such as ``ponyfill/package.json``) is still a package, with version "" (what
    Syft reports as UNKNOWN), and no advisory matches it."""
    try:
        document = json.loads(data)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    name, version = document.get("name"), document.get("version", "")
    if not isinstance(name, str) or not name or not isinstance(version, str):
        return []
    return [Package("npm", name, version, "npm", name, version, path)]
