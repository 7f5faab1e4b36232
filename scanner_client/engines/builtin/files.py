"""One file's facts: the language packages it names and the malware and secret rules it
matches, from its bytes, read once.

Which files are read (:meth:`FileAnalyser.wants`):

- the OS package databases and release files, kept whole until the end of the image (they
  are read again after each layer, and by the catalogue at the end): :func:`retained`;
- files a cataloguer reads by name (Python metadata, ``package.json``, Java archives) and
  executables (which may be Go binaries), up to :data:`catalog.MAX_CATALOG_BYTES`;
- with the malware or secrets policy, every regular file that is not empty and not larger
  than ``Limits.max_match_bytes`` (what is larger is not matched, and not read).

Nothing else is read into memory: an image's other bytes only pass through the decompressor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Final

from scanner_client.engines.builtin import analyzers, catalog, malware, rpm, secrets
from scanner_client.engines.builtin.analyzers import Package
from scanner_client.engines.builtin.common import Limits
from scanner_client.engines.builtin.malware import Hit

READ: Final = 1
RETAIN: Final = 2

RETAINED_PATHS: Final = frozenset(
    {
        analyzers.DPKG_STATUS,
        analyzers.APK_INSTALLED,
        *analyzers.OS_RELEASE_PATHS,
        "etc/alpine-release",
        "etc/debian_version",
        *rpm.RPMDB_PATHS,
        *(path + "-wal" for path in rpm.RPMDB_PATHS),
        *rpm.BERKELEY_PATHS,
    }
)
# The files whose change in a layer means its OS packages must be read again.
OS_DATABASES: Final = frozenset(
    {analyzers.DPKG_STATUS, analyzers.APK_INSTALLED, *rpm.RPMDB_PATHS, *rpm.BERKELEY_PATHS}
)


def retained(rel: str) -> bool:
    """Whether a file is an OS package database or release file, kept whole in memory."""
    return (
        rel in RETAINED_PATHS
        or rel.startswith(analyzers.DPKG_STATUS_DIR + "/")
        or (rel.startswith(analyzers.DPKG_INFO_DIR + "/") and rel.endswith(".list"))
    )


def os_database(rel: str) -> bool:
    return rel in OS_DATABASES or rel.startswith(analyzers.DPKG_STATUS_DIR + "/")


@dataclass
class FileFacts:
    packages: list[Package] = field(default_factory=list)
    # (hit, sha256 of the file) of each malware rule that matched.
    malware: list[tuple[Hit, str]] = field(default_factory=list)
    # (hit, line of its first real match) of each confirmed secret.
    secrets: list[tuple[Hit, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.packages or self.malware or self.secrets)

    def relocated(self, old: str, new: str) -> FileFacts:
        """The same facts for a hard link of the file at ``old`` named ``new``."""
        packages = [
            replace(p, path=new + p.path[len(old) :])
            if p.path == old or p.path.startswith(old + ":")
            else p
            for p in self.packages
        ]
        return FileFacts(packages, list(self.malware), list(self.secrets))


class FileAnalyser:
    """Decides which files to read and finds their facts, for one scan's policies."""

    def __init__(
        self, signatures: malware.Signatures, namespaces: frozenset[str], limits: Limits
    ) -> None:
        self.signatures = signatures
        self.namespaces = namespaces
        self.limits = limits

    def wants(self, rel: str, size: int, mode: int) -> int:
        """READ and/or RETAIN for a regular file of ``size`` bytes."""
        flags = 0
        if size <= catalog.MAX_CATALOG_BYTES:
            if retained(rel):
                flags = READ | RETAIN
            elif catalog.wants(rel) or (mode & 0o111 and size >= catalog.MIN_GO_BINARY):
                flags = READ
        if self.namespaces and 0 < size <= self.limits.max_match_bytes:
            flags |= READ
        return flags

    def analyse(self, rel: str, data: bytes) -> FileFacts:
        facts = FileFacts()
        if catalog.wants(rel) or (len(data) >= catalog.MIN_GO_BINARY and data[:4] == b"\x7fELF"):
            facts.packages = catalog.file_packages(rel, data)
        if not self.namespaces or not data or len(data) > self.limits.max_match_bytes:
            return facts
        hits = self.signatures.match_data(data, self.namespaces)
        found = [hit for hit in hits if hit.namespace == malware.MALWARE]
        if found:
            digest = hashlib.sha256(data).hexdigest()
            facts.malware = [(hit, digest) for hit in found]
        if any(hit.namespace == secrets.NAMESPACE for hit in hits):
            facts.secrets = [
                (hit, malware.line_at(data, offset))
                for hit, offset in malware.confirmed_secrets(hits, data)
            ]
        return facts
