"""What a filesystem root contains: its distribution, the packages of its package managers,
the language packages among its files, and which of those an OS package installed.

The OS package databases are read whole at the end (:func:`os_inventory`); language packages
come one file at a time from the engine's single pass over the files (:func:`file_packages`),
so that no file is read twice. :func:`mark_os_owned` then sets ``os_owned`` on each language
package whose metadata file an OS package lists among its files: Debian's ``python3-urllib3``
is judged by Debian's data (which knows its backported fixes), not by PyPI's advisories for
the upstream version it started from.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Final, Protocol

import structlog

from scanner_client.engines.builtin import analyzers, gobinary, java, rpm
from scanner_client.engines.builtin.analyzers import Distro, Package

log = structlog.get_logger("image_scanner.builtin")
# Files a cataloguer may read whole, beyond the document limit (an rpm database, an archive).
MAX_CATALOG_BYTES: Final = 256 << 20
# The shortest ELF file that can hold build info.
MIN_GO_BINARY: Final = 1024


class Tree(Protocol):
    """A root's files as the catalogue reads them (paths relative to the root, links followed
    inside it)."""

    def read(self, rel: str, limit: int | None = None) -> bytes | None: ...

    def listdir(self, rel: str) -> list[str]: ...

    def link_target(self, rel: str) -> str | None: ...


@dataclass
class OsInventory:
    packages: list[Package] = field(default_factory=list)
    # Paths (relative to the root) that OS packages installed.
    owned: set[str] = field(default_factory=set)
    # Problems worth a log line: an unreadable rpm database, damaged headers.
    notes: list[str] = field(default_factory=list)


def distro_of(tree: Tree) -> Distro | None:
    for rel in analyzers.OS_RELEASE_PATHS:
        data = tree.read(rel)
        if data is not None:
            distro = analyzers.parse_os_release(data)
            if distro is not None:
                return distro
    alpine = tree.read("etc/alpine-release")
    if alpine is not None:
        return Distro("alpine", alpine.decode("utf-8", "replace").strip())
    debian = tree.read("etc/debian_version")
    if debian is not None:
        version = debian.decode("utf-8", "replace").strip()
        return Distro("debian", version if version[:1].isdigit() else "")
    return None


def os_inventory(tree: Tree, distro: Distro | None, *, owned: bool = True) -> OsInventory:
    """The packages of dpkg, apk and rpm, and (with ``owned``) the files they installed."""
    found = OsInventory()
    _dpkg(tree, distro, found, owned)
    installed = tree.read(analyzers.APK_INSTALLED, MAX_CATALOG_BYTES)
    if installed is not None:
        found.packages += analyzers.parse_apk_installed(installed, analyzers.APK_INSTALLED, distro)
        if owned:
            found.owned |= analyzers.apk_owned_files(installed)
    _rpm(tree, distro, found, owned)
    found.packages = analyzers.unique_os_packages(found.packages)
    return found


def _dpkg(tree: Tree, distro: Distro | None, found: OsInventory, owned: bool) -> None:
    status = tree.read(analyzers.DPKG_STATUS, MAX_CATALOG_BYTES)
    if status is not None:
        found.packages += analyzers.parse_dpkg_status(status, analyzers.DPKG_STATUS, distro)
    for entry in sorted(tree.listdir(analyzers.DPKG_STATUS_DIR)):
        rel = f"{analyzers.DPKG_STATUS_DIR}/{entry}"
        data = tree.read(rel)
        if data is None:
            continue
        if entry.endswith(".md5sums"):
            if owned:
                found.owned |= analyzers.dpkg_owned_files(data)
            continue
        found.packages += analyzers.parse_dpkg_status(data, rel, distro)
    if owned:
        for entry in tree.listdir(analyzers.DPKG_INFO_DIR):
            if entry.endswith(".list"):
                data = tree.read(f"{analyzers.DPKG_INFO_DIR}/{entry}", MAX_CATALOG_BYTES)
                if data is not None:
                    found.owned |= analyzers.dpkg_owned_files(data)


def _rpm(tree: Tree, distro: Distro | None, found: OsInventory, owned: bool) -> None:
    read = None
    for rel in rpm.RPMDB_PATHS + rpm.BERKELEY_PATHS:
        database = tree.read(rel, MAX_CATALOG_BYTES)
        if database is None:
            continue
        try:
            if rel.endswith(".sqlite"):
                read = rpm.read_sqlite(database, tree.read(rel + "-wal", MAX_CATALOG_BYTES))
            else:
                read = rpm.read_berkeley(database)
        except rpm.HeaderError as exc:
            found.notes.append(f"/{rel}: {exc}")
            continue
        break  # one database: /var/lib/rpm is a link to /usr/lib/sysimage/rpm on Fedora
    if read is None:
        return
    if read.unreadable:
        found.notes.append(f"/{rel}: {read.unreadable} entries are not package records")
    ecosystem = distro.ecosystem if distro is not None else "rpm"
    for package in read.packages:
        found.packages.append(
            Package(
                "rpm",
                package.name,
                package.full_version,
                ecosystem,
                package.source_name,
                package.full_version,
                rel,
                distro=f"{distro.id}-{distro.version_id}" if distro else "",
                arch=package.arch,
            )
        )
        if owned:
            found.owned.update(package.files)


def wants(rel: str) -> bool:
    """Whether a cataloguer reads this file by its name alone (Go binaries are found by their
    content: see :func:`file_packages`)."""
    return (
        analyzers.is_python_metadata(rel) or analyzers.is_npm_manifest(rel) or java.is_archive(rel)
    )


def file_packages(rel: str, data: bytes) -> list[Package]:
    """The language packages one file names: Python metadata, an npm manifest, a Java
    archive, or a Go binary's build info. A file that breaks a parser names nothing (and is
    logged): one hostile file must not fail the scan of an image."""
    try:
        return _file_packages(rel, data)
    except Exception as exc:  # a parser's bug on input nobody foresaw
        log.warning("unreadable package file", path="/" + rel, error=repr(exc)[:300])
        return []


def _file_packages(rel: str, data: bytes) -> list[Package]:
    if analyzers.is_python_metadata(rel):
        return analyzers.parse_python_metadata(data, rel)
    if analyzers.is_npm_manifest(rel):
        return analyzers.parse_npm_manifest(data, rel)
    if java.is_archive(rel):
        return [_maven(artifact) for artifact in java.read_archive(data, rel)]
    if len(data) >= MIN_GO_BINARY and gobinary.is_elf(data):
        try:
            info = gobinary.read_build_info(data)
        except gobinary.NotGo:
            return []
        return go_packages(info, rel)
    return []


def _maven(artifact: java.Artifact) -> Package:
    coordinates = f"{artifact.group}:{artifact.artifact}" if artifact.group else artifact.artifact
    return Package(
        "maven",
        artifact.artifact,
        artifact.version,
        "Maven",
        coordinates,
        artifact.version,
        artifact.path,
    )


def go_packages(info: gobinary.BuildInfo, rel: str) -> list[Package]:
    """The modules of a Go binary: the main module, each dependency, and the standard library
    of the Go release it was built with (``stdlib``, what Go's advisories name)."""
    modules = ([info.main] if info.main is not None else []) + list(info.deps)
    packages = [
        Package("golang", module.path, module.version, "Go", module.path, module.version, rel)
        for module in modules
        if module.path
    ]
    go_version = info.go_version.split(" ")[0]  # "go1.22.3 X:boringcrypto"
    if go_version.startswith("go"):
        packages.append(
            Package("golang", "stdlib", go_version, "Go", "stdlib", go_version[2:], rel)
        )
    return packages


def mark_os_owned(packages: Iterable[Package], owned: set[str], tree: Tree) -> list[Package]:
    """The packages, with ``os_owned`` set on language packages whose file an OS package
    installed. Paths are compared as the OS database writes them and through the root's
    top-level links (``/lib`` -> ``usr/lib`` on merged-/usr systems)."""
    aliases = _top_level_links(tree)
    marked = []
    for package in packages:
        if package.type not in ("deb", "apk", "rpm") and owned:
            path = package.path.split(":", 1)[0]  # a Java archive inside another
            if _owned(path, owned, aliases):
                package = replace(package, os_owned=True)
        marked.append(package)
    return marked


def _top_level_links(tree: Tree) -> dict[str, str]:
    """Real top-level directory -> the link names that lead to it (``usr/lib`` -> ``lib``)."""
    aliases: dict[str, str] = {}
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        target = tree.link_target(name)
        if target:
            real = posixpath.normpath(posixpath.join("/", target)).lstrip("/")
            aliases[real] = name
    return aliases


def _owned(path: str, owned: set[str], aliases: dict[str, str]) -> bool:
    if path in owned:
        return True
    for real, alias in aliases.items():
        if path.startswith(real + "/") and alias + path[len(real) :] in owned:
            return True
    return False
