"""Real inputs for the inventory tests: an rpm database made by rpm itself (packages built with
``rpmbuild`` and installed with ``rpm --root``), a Go binary compiled by the Go toolchain
(offline: its one dependency is vendored), Java archives as Maven lays them out, a stock
Debian root made by ``debootstrap --variant=minbase``, and Syft's inventory of an image.

Slow builds are cached outside the repository, in ``~/.cache/image-handler-tests/``: the Go
build cache, and the debootstrap root as one tar keyed by suite and date.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from scanner_client.engines.builtin.analyzers import pypi_name

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "image-handler-tests"


# ---- rpm ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RpmSpec:
    name: str
    version: str
    release: str
    epoch: int | None
    # Path (absolute, in the image) -> content.
    files: dict[str, str]
    noarch: bool = True

    def text(self) -> str:
        lines = [
            f"Name: {self.name}",
            f"Version: {self.version}",
            f"Release: {self.release}",
            "Summary: inventory test package",
            "License: MIT",
        ]
        if self.epoch is not None:
            lines.append(f"Epoch: {self.epoch}")
        if self.noarch:
            lines.append("BuildArch: noarch")
        lines += ["%description", "A package of the inventory tests.", "%install"]
        for path, content in self.files.items():
            directory = path.rpartition("/")[0]
            lines.append(f"mkdir -p %{{buildroot}}{directory}")
            escaped = content.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "")
            lines.append(f"printf '{escaped}' > %{{buildroot}}{path}")
        lines += ["%files", *self.files]
        # No debuginfo, no build-id links: the package holds exactly its files.
        return "\n".join(["%global debug_package %{nil}", "%define _build_id_links none", *lines])


def rpm_root(workdir: Path, specs: list[RpmSpec]) -> Path:
    """A root with the packages of ``specs`` installed by rpm into ``/var/lib/rpm``."""
    top = workdir / "rpmbuild"
    for sub in ("SPECS", "BUILD", "RPMS", "SOURCES", "SRPMS", "BUILDROOT"):
        (top / sub).mkdir(parents=True, exist_ok=True)
    for spec in specs:
        path = top / "SPECS" / f"{spec.name}.spec"
        path.write_text(spec.text() + "\n")
        run(["rpmbuild", "--define", f"_topdir {top}", "-bb", str(path)])
    root = workdir / "root"
    root.mkdir()
    packages = sorted(str(p) for p in (top / "RPMS").rglob("*.rpm"))
    run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "--nodeps", "-i", *packages])
    return root


def berkeley_packages(root: Path) -> bytes:
    """The rpm database of ``root`` (SQLite, made by rpm) as the Berkeley DB hash file
    ``Packages`` of older releases (RHEL 8, UBI 8): its header blobs loaded by Berkeley DB's
    own ``db5.3_load``, then read back by rpm's ``bdb_ro`` backend to prove it is one."""
    import sqlite3
    import struct
    import tempfile

    with sqlite3.connect(root / "var" / "lib" / "rpm" / "rpmdb.sqlite") as connection:
        rows = connection.execute("SELECT hnum, blob FROM Packages ORDER BY hnum").fetchall()

    def text(data: bytes) -> str:
        return "".join(f"\\{byte:02x}" for byte in data)

    with tempfile.TemporaryDirectory(prefix="bdb-") as scratch:
        dump = Path(scratch) / "dump.txt"
        dump.write_text(
            "".join(f"{text(struct.pack('<I', number))}\n{text(blob)}\n" for number, blob in rows)
        )
        database = Path(scratch) / "db"
        database.mkdir()
        run(["db5.3_load", "-T", "-t", "hash", "-f", str(dump), str(database / "Packages")])
        listed = run(
            ["rpm", "--dbpath", str(database), "--define", "_db_backend bdb_ro", "-qa",
             "--qf", "%{NAME}\n"]
        ).stdout.split()  # fmt: skip
        if len(listed) != len(rows):
            raise RuntimeError(f"rpm reads {len(listed)} of {len(rows)} packages back")
        return (database / "Packages").read_bytes()


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, **kwargs
    )  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done  # type: ignore[no-any-return]


# ---- Go -----------------------------------------------------------------------------------------

GO_MAIN = 'package main\n\nimport "example.com/greet"\n\nfunc main() { println(greet.Hello()) }\n'
GO_DEP = 'package greet\n\n// Hello greets.\nfunc Hello() string { return "hello" }\n'


def go_binary(workdir: Path) -> bytes:
    """A static Go binary of module ``example.com/hello`` with one dependency,
    ``example.com/greet v1.4.2`` (vendored, so the build needs no network)."""
    source = workdir / "go"
    (source / "vendor" / "example.com" / "greet").mkdir(parents=True)
    (source / "go.mod").write_text(
        "module example.com/hello\n\ngo 1.19\n\nrequire example.com/greet v1.4.2\n"
    )
    (source / "main.go").write_text(GO_MAIN)
    (source / "vendor" / "example.com" / "greet" / "greet.go").write_text(GO_DEP)
    (source / "vendor" / "modules.txt").write_text(
        "# example.com/greet v1.4.2\n## explicit\nexample.com/greet\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "GOCACHE": str(CACHE / "go-build"),
        "GOPATH": str(workdir / "gopath"),
        "GOFLAGS": "-mod=vendor",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    run(["go", "build", "-trimpath", "-o", "hello", "."], cwd=source, env=env)
    return (source / "hello").read_bytes()


# ---- Java ---------------------------------------------------------------------------------------


def jar(members: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def maven_jar(group: str, artifact: str, version: str, **extra: bytes) -> bytes:
    """A JAR as Maven builds it: a manifest and META-INF/maven/GROUP/ARTIFACT/pom.*."""
    base = f"META-INF/maven/{group}/{artifact}"
    return jar(
        {
            "META-INF/MANIFEST.MF": "Manifest-Version: 1.0\nCreated-By: Maven JAR Plugin 3.2.0\n"
            f"Implementation-Title: {artifact}\nImplementation-Version: {version}\n",
            f"{base}/pom.properties": f"artifactId={artifact}\ngroupId={group}\nversion={version}\n",
            f"{base}/pom.xml": f"<project><groupId>{group}</groupId><artifactId>{artifact}"
            f"</artifactId><version>{version}</version></project>",
            **extra,
        }
    )


# ---- a stock Debian root ------------------------------------------------------------------------


def debian_suite_and_mirror() -> tuple[str, str] | None:
    """The host's Debian suite and the mirror apt already uses for it (``apt-get
    indextargets``); None on a host that is not Debian or has no such source."""
    try:
        release = dict(
            line.split("=", 1)
            for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
    except OSError:
        return None
    suite = release.get("VERSION_CODENAME", "").strip('"')
    if release.get("ID", "").strip('"') != "debian" or not suite or not shutil.which("apt-get"):
        return None
    listing = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(CODENAME) $(REPO_URI)", "Identifier: Packages"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    for line in listing.splitlines():
        codename, _, uri = line.partition(" ")
        if codename == suite and uri.startswith(("http://", "https://")):
            return suite, uri
    return None


def minbase_tar() -> Path:
    """A ``debootstrap --variant=minbase`` root of the host's suite as an uncompressed layer
    tar, built once a day (the first build takes a minute or two) and reused after; what apt
    downloaded is removed, as image builds do."""
    return stock_tar("minbase", ())


# A bigger stock image: Debian's npm (with some 400 node-* modules under /usr/share/nodejs)
# and Python libraries that Debian patches (urllib3, jinja2, yaml): about 490 packages.
NPM_PYTHON: Final = ("npm", "python3-urllib3", "python3-jinja2", "python3-yaml", "curl")


def stock_tar(label: str, include: tuple[str, ...]) -> Path:
    """A stock root of the host's suite as an uncompressed layer tar, cached a day: the
    minbase root, plus ``include`` installed by apt inside it (``--no-install-recommends``,
    as image builds do), with apt's downloads and lists removed."""
    found = debian_suite_and_mirror()
    if found is None:
        raise LookupError("the host is not Debian with an apt source for its own suite")
    suite, mirror = found
    CACHE.mkdir(parents=True, exist_ok=True)
    prefix = f"debootstrap-{label}-{suite}-"
    tar = CACHE / f"{prefix}{dt.date.today().isoformat()}.tar"
    if tar.exists():
        return tar
    build = CACHE / f"debootstrap-{label}-{suite}.build-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    root = build / "root"
    try:
        if include:
            root.mkdir(parents=True)
            run(["tar", "--numeric-owner", "-C", str(root), "-xf", str(minbase_tar())])
            _apt_install(root, include)
        else:
            run(["debootstrap", "--variant=minbase", suite, str(root), mirror])
        for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            deb.unlink()
        partial = build / "layer.tar"
        run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."])
        partial.rename(tar)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    for old in CACHE.glob(f"{prefix}*.tar*"):
        if not old.name.startswith(tar.name):
            old.unlink(missing_ok=True)
    return tar


def _apt_install(root: Path, packages: tuple[str, ...]) -> None:
    """``apt-get install`` inside the root (chroot): no service is started (policy-rc.d),
    and the host's resolver is lent for the download only."""
    resolv = root / "etc" / "resolv.conf"
    policy = root / "usr" / "sbin" / "policy-rc.d"
    link = os.readlink(resolv) if resolv.is_symlink() else None
    saved = resolv.read_bytes() if link is None and resolv.is_file() else None
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["chroot", str(root), "apt-get", "-qq", "update"], env=env)
        run(
            ["chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends",
             *packages],
            env=env,
        )  # fmt: skip
        run(["chroot", str(root), "apt-get", "clean"], env=env)
    finally:
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if link is not None:
            resolv.symlink_to(link)
        elif saved is not None:
            resolv.write_bytes(saved)
        shutil.rmtree(root / "var" / "lib" / "apt" / "lists", ignore_errors=True)
        (root / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True, exist_ok=True)


# ---- Syft ---------------------------------------------------------------------------------------

# Syft's package types -> the purl types of our SBOM, for the ecosystems both inventory.
SYFT_TYPES = {
    "deb": "deb",
    "apk": "apk",
    "rpm": "rpm",
    "python": "pypi",
    "npm": "npm",
    "go-module": "golang",
    "java-archive": "maven",
    "jenkins-plugin": "maven",
}


def syft_binary() -> Path:
    return Path(sys.executable).parent / "syft"


def syft_inventory(image: str) -> set[tuple[str, str, str]]:
    """(purl type, name, version) of what Syft finds in ``registry:IMAGE`` (a plain-HTTP
    registry on 127.0.0.1), in the ecosystems the builtin engine inventories."""
    env = {
        **os.environ,
        "SYFT_CHECK_FOR_APP_UPDATE": "false",
        "SYFT_REGISTRY_INSECURE_USE_HTTP": "true",
        "SYFT_CACHE_DIR": str(CACHE / "syft"),
    }
    done = run([str(syft_binary()), "scan", f"registry:{image}", "-q", "-o", "syft-json"], env=env)
    found = set()
    for artifact in json.loads(done.stdout)["artifacts"]:
        kind = SYFT_TYPES.get(artifact["type"])
        if kind is not None:
            # Syft writes UNKNOWN where an archive names no version (its purl has none).
            version = "" if artifact["version"] == "UNKNOWN" else artifact["version"]
            found.add(normal(kind, artifact["name"], version))
    return found


def sbom_inventory(sbom: bytes) -> set[tuple[str, str, str]]:
    """(purl type, name, version) of the libraries of one of our CycloneDX SBOMs."""
    found = set()
    for component in json.loads(sbom).get("components", []):
        purl = str(component.get("purl", ""))
        if component.get("type") == "library" and purl.startswith("pkg:"):
            kind = purl[4:].split("/", 1)[0]
            found.add(normal(kind, component["name"], component.get("version", "")))
    return found


def normal(kind: str, name: str, version: str) -> tuple[str, str, str]:
    return (kind, pypi_name(name) if kind == "pypi" else name, version)
