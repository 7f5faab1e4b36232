"""The inventory's parts without a handler: rpm headers, Go build info, Java archives, Python
and dpkg details, ownership of language packages by OS packages, and the precision rules of
the secret scan (binaries, keys that must load, placeholders)."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from imagehandler.v1 import common_pb2
from scanner_client.engine import Job, NullProgress
from scanner_client.engines.builtin import (
    BuiltinEngine,
    BuiltinSettings,
    catalog,
    gobinary,
    java,
    rpm,
    secrets,
)
from scanner_client.engines.builtin.analyzers import Distro, Package
from scanner_client.engines.builtin.rootfs import Rootfs
from tests.conftest import TEST_SCANNER_POLICY
from tests.inventory_images import jar
from tests.vulnfeeds import debian_database


def scan_dir(root: Path, db_dir: Path | None = None) -> common_pb2.ScanResult:
    obj = common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(path=str(root)))
    engine = BuiltinEngine(BuiltinSettings(db_dir=db_dir, policy=TEST_SCANNER_POLICY))
    return asyncio.run(engine.scan(Job("j", 1, obj), NullProgress()))


@pytest.fixture(scope="module")
def debian_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged feeds and a Debian one (the packaged database has no Debian data)."""
    return debian_database(tmp_path_factory.mktemp("debian-db"))


def write(root: Path, rel: str, data: bytes | str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def components(result: common_pb2.ScanResult) -> list[tuple[str, str]]:
    return sorted(
        (c["name"], c.get("version", ""))
        for c in json.loads(result.sbom)["components"]
        if c.get("type") == "library"
    )


# ---- dpkg and Python -------------------------------------------------------------------------

LIBC6 = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nSource: glibc\nVersion: 2.36-9+deb12u1\n"


def test_a_package_in_dpkg_status_and_status_d_is_reported_once(
    tmp_path: Path, debian_db: Path
) -> None:
    write(tmp_path, "etc/os-release", 'ID=debian\nVERSION_ID="12"\n')
    write(tmp_path, "var/lib/dpkg/status", LIBC6)
    write(tmp_path, "var/lib/dpkg/status.d/libc6", LIBC6)
    write(tmp_path, "var/lib/dpkg/status.d/libc6.md5sums", "d41d8cd9  usr/lib/libc.so.6\n")
    result = scan_dir(tmp_path, debian_db)
    assert components(result) == [("libc6", "2.36-9+deb12u1")]
    ids = [v.id for v in result.vulnerabilities]
    assert ids
    assert len(ids) == len(set(ids)), ids


def test_a_single_file_egg_info_is_a_python_package(tmp_path: Path) -> None:
    write(
        tmp_path,
        "usr/lib/python3.8/site-packages/PyYAML-5.3-py3.8.egg-info",
        "Metadata-Version: 1.1\nName: PyYAML\nVersion: 5.3\nSummary: YAML parser\n",
    )
    result = scan_dir(tmp_path)
    assert components(result) == [("PyYAML", "5.3")]
    assert {(v.package, v.installed_version) for v in result.vulnerabilities} == {("PyYAML", "5.3")}
    assert all(v.path.endswith("PyYAML-5.3-py3.8.egg-info") for v in result.vulnerabilities)


# ---- ownership: the distribution judges its own language packages --------------------------


def test_language_packages_an_os_package_installed_are_judged_by_the_distribution(
    tmp_path: Path,
) -> None:
    site = "usr/lib/python3/dist-packages"
    write(tmp_path, "etc/os-release", 'ID=debian\nVERSION_ID="12"\n')
    write(
        tmp_path,
        "var/lib/dpkg/status",
        "Package: python3-urllib3\nStatus: install ok installed\nArchitecture: all\n"
        "Source: python-urllib3\nVersion: 1.26.12-1+deb12u1\n\n"
        "Package: node-lodash\nStatus: install ok installed\nArchitecture: all\n"
        "Version: 4.17.21+dfsg+~cs8.31.198.20210220-9\n",
    )
    # Merged /usr: dpkg lists /lib/... for what is really under /usr/lib.
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "lib").symlink_to("usr/lib")
    write(
        tmp_path,
        "var/lib/dpkg/info/python3-urllib3.list",
        f"/.\n/usr\n/{site}/urllib3-1.26.12.egg-info\n/{site}/urllib3-1.26.12.egg-info/PKG-INFO\n",
    )
    write(
        tmp_path,
        "var/lib/dpkg/info/node-lodash.list",
        "/lib/nodejs\n/lib/nodejs/lodash/package.json\n",
    )
    write(
        tmp_path, f"{site}/urllib3-1.26.12.egg-info/PKG-INFO", "Name: urllib3\nVersion: 1.26.12\n"
    )
    write(tmp_path, "usr/lib/nodejs/lodash/package.json", '{"name":"lodash","version":"4.17.15"}')
    # What pip and npm installed is theirs.
    write(
        tmp_path,
        "usr/local/lib/python3.11/dist-packages/urllib3-1.26.16.dist-info/METADATA",
        "Name: urllib3\nVersion: 1.26.16\n",
    )
    write(
        tmp_path,
        "srv/app/node_modules/lodash/package.json",
        '{"name":"lodash","version":"4.17.15"}',
    )
    result = scan_dir(tmp_path)
    # Inventoried all the same (the SBOM says what is there) ...
    assert ("urllib3", "1.26.12") in components(result)
    assert components(result).count(("lodash", "4.17.15")) == 2
    # ... but only pip's and npm's copies are matched against PyPI and npm advisories.
    flagged = {(v.package, v.installed_version, v.path) for v in result.vulnerabilities}
    assert {(name, version) for name, version, _ in flagged} == {
        ("urllib3", "1.26.16"),
        ("lodash", "4.17.15"),
    }
    assert all(not path.startswith(("/usr/lib/", "/lib/")) for _, _, path in flagged)


# ---- rpm ---------------------------------------------------------------------------------------


def header(entries: list[tuple[int, int, bytes, int]]) -> bytes:
    """An rpm header blob: (tag, type, data, count) entries, data packed in order."""
    index, store = b"", b""
    for tag, kind, data, count in entries:
        index += struct.pack(">iIiI", tag, kind, len(store), count)
        store += data
    return struct.pack(">II", len(entries), len(store)) + index + store


def test_rpm_headers_are_parsed_and_damaged_ones_refused() -> None:
    blob = header(
        [
            (rpm.TAG_NAME, rpm.TYPE_STRING, b"openssl-libs\x00", 1),
            (rpm.TAG_VERSION, rpm.TYPE_STRING, b"3.0.7\x00", 1),
            (rpm.TAG_RELEASE, rpm.TYPE_STRING, b"27.el9\x00", 1),
            (rpm.TAG_EPOCH, rpm.TYPE_INT32, struct.pack(">i", 1), 1),
            (rpm.TAG_ARCH, rpm.TYPE_STRING, b"x86_64\x00", 1),
            (rpm.TAG_SOURCERPM, rpm.TYPE_STRING, b"openssl-3.0.7-27.el9.src.rpm\x00", 1),
            (rpm.TAG_BASENAMES, rpm.TYPE_STRING_ARRAY, b"libssl.so.3\x00libcrypto.so.3\x00", 2),
            (rpm.TAG_DIRNAMES, rpm.TYPE_STRING_ARRAY, b"/usr/lib64/\x00", 1),
            (rpm.TAG_DIRINDEXES, rpm.TYPE_INT32, struct.pack(">ii", 0, 0), 2),
        ]
    )
    package = rpm.parse_header(blob)
    assert (package.name, package.full_version, package.arch, package.source_name) == (
        "openssl-libs",
        "1:3.0.7-27.el9",
        "x86_64",
        "openssl",
    )
    assert package.files == ("usr/lib64/libssl.so.3", "usr/lib64/libcrypto.so.3")
    damaged = [
        blob[:6],  # shorter than its counts
        blob[:40],  # the data store is cut
        struct.pack(">II", 1 << 20, 10) + b"\x00" * 32,  # implausible counts
        header([(rpm.TAG_NAME, rpm.TYPE_STRING, b"no-terminator", 1)]),
        header([(rpm.TAG_VERSION, rpm.TYPE_STRING, b"1.0\x00", 1)]),  # no name
        header([(rpm.TAG_EPOCH, rpm.TYPE_INT32, b"\x00\x01", 1000)]),  # integers past the end
    ]
    for bad in damaged:
        with pytest.raises(rpm.HeaderError):
            rpm.parse_header(bad)


def test_an_rpm_database_that_is_not_sqlite_is_a_clear_error() -> None:
    with pytest.raises(rpm.HeaderError, match=r"not an SQLite database|no readable Packages"):
        rpm.read_sqlite(b"this is not a database" * 100)


def test_rpm_distributions_have_their_ecosystems() -> None:
    assert Distro("rhel", "9.2").ecosystem == "Red Hat:9"
    assert Distro("rocky", "8.9").ecosystem == "Rocky Linux:8"
    assert Distro("opensuse-leap", "15.5").ecosystem == "openSUSE:15.5"
    package = Package(
        "rpm", "bash", "1:5.1.8-6.el9", "Red Hat:9", "bash", "1:5.1.8-6.el9", "p",
        distro="rhel-9.2", arch="x86_64",
    )  # fmt: skip
    assert package.purl == "pkg:rpm/redhat/bash@5.1.8-6.el9?arch=x86_64&distro=rhel-9.2&epoch=1"


# ---- Go build info ----------------------------------------------------------------------------

MODINFO = (
    b"0w\xaf\x0c\x92t\x08\x02A\xe1\xc1\x07\xe6\xd6\x18\xe6"
    b"path\texample.com/tool\nmod\texample.com/tool\tv1.2.0\th1:abc=\n"
    b"dep\tgolang.org/x/text\tv0.3.7\th1:def=\n"
    b"dep\tgithub.com/old/lib\tv1.0.0\th1:ghi=\n=>\tgithub.com/fork/lib\tv1.0.1\th1:jkl=\n"
    b"build\t-compiler=gc\n"
    b"\xf92C1\x86\x18 r\x00\x82B\x10A\x16\xd8\xf2"
)


def elf64(segment_data: bytes, address: int) -> bytes:
    """A minimal little-endian ELF64 file with one loadable segment holding ``segment_data``
    at ``address``, and no section headers (as a stripped binary may be)."""
    header_size, program_size = 64, 56
    offset = header_size + program_size
    ident = b"\x7fELF\x02\x01\x01" + b"\x00" * 9
    elf_header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, address, header_size, 0, 0, header_size, program_size, 1,
        64, 0, 0,
    )  # fmt: skip
    program = struct.pack(
        "<IIQQQQQQ", 1, 6, offset, address, address, len(segment_data), len(segment_data), 16
    )
    return elf_header + program + segment_data + b"\x00" * 2048


def test_go_build_info_before_go_1_18_is_read_through_pointers() -> None:
    # Go 1.13-1.17: the header points at two Go string headers in the binary's memory.
    base = 0x400000
    version = b"go1.16.15"
    segment = bytearray(b"\x00" * 16)  # keep the header 16-byte aligned after the ELF headers
    start = len(segment)
    segment += gobinary.BUILDINFO_MAGIC + bytes([8, 0]) + b"\x00" * 16
    strings_at = len(segment)
    segment += b"\x00" * 32  # two string headers
    version_at = len(segment)
    segment += version
    modinfo_at = len(segment)
    segment += MODINFO
    struct.pack_into("<QQ", segment, start + 16, base + strings_at, base + strings_at + 16)
    struct.pack_into("<QQ", segment, strings_at, base + version_at, len(version))
    struct.pack_into("<QQ", segment, strings_at + 16, base + modinfo_at, len(MODINFO))
    # Align the magic on 16 bytes in the file, as the Go linker does.
    pad = (-(120 + start)) % 16
    data = elf64(b"\x00" * pad + bytes(segment), base - pad)
    info = gobinary.read_build_info(data)
    assert info.go_version == "go1.16.15"
    assert info.main == gobinary.Module("example.com/tool", "v1.2.0")
    # A replacement stands for the module it replaces.
    assert info.deps == (
        gobinary.Module("golang.org/x/text", "v0.3.7"),
        gobinary.Module("github.com/fork/lib", "v1.0.1"),
    )
    packages = catalog.go_packages(info, "usr/bin/tool")
    assert [(p.name, p.version, p.source_version) for p in packages][-1] == (
        "stdlib",
        "go1.16.15",
        "1.16.15",
    )
    assert packages[1].purl == "pkg:golang/golang.org/x/text@v0.3.7"


def test_files_that_are_not_go_binaries_are_not_go_packages() -> None:
    for data in (b"\x7fELF" + b"\x00" * 4000, b"#!/bin/sh\n" * 200, b"\x7fELF\x02\x01" * 300):
        assert catalog.file_packages("usr/bin/x", data) == []
    damaged = elf64(gobinary.BUILDINFO_MAGIC + bytes([8, 2]) + b"\x00" * 16 + b"\xff" * 20, 0)
    with pytest.raises(gobinary.NotGo):
        gobinary.read_build_info(damaged)


# ---- Java archives -----------------------------------------------------------------------------


def pom(group: str, artifact: str, version: str) -> str:
    return f"#Generated by Maven\nversion={version}\ngroupId={group}\nartifactId={artifact}\n"


def test_java_archives_name_their_artifacts() -> None:
    inner = jar(
        {
            "META-INF/MANIFEST.MF": "Manifest-Version: 1.0\n",
            "META-INF/maven/com.fasterxml.jackson.core/jackson-databind/pom.properties": pom(
                "com.fasterxml.jackson.core", "jackson-databind", "2.9.8"
            ),
        }
    )
    app = jar(
        {
            "META-INF/MANIFEST.MF": "Manifest-Version: 1.0\nImplementation-Title: demo\n"
            "Implementation-Version: 0.0.1\n",
            "META-INF/maven/org.apache.logging.log4j/log4j-core/pom.properties": pom(
                "org.apache.logging.log4j", "log4j-core", "2.14.1"
            ),
            "BOOT-INF/lib/jackson-databind-2.9.8.jar": inner,
            "BOOT-INF/lib/broken.jar": b"not a zip",
        }
    )
    found = catalog.file_packages("opt/app/demo-app-0.0.1.jar", app)
    assert {(p.name, p.version, p.source_name, p.path) for p in found} == {
        ("demo-app", "0.0.1", "demo-app", "opt/app/demo-app-0.0.1.jar"),
        (
            "log4j-core",
            "2.14.1",
            "org.apache.logging.log4j:log4j-core",
            "opt/app/demo-app-0.0.1.jar",
        ),
        (
            "jackson-databind",
            "2.9.8",
            "com.fasterxml.jackson.core:jackson-databind",
            "opt/app/demo-app-0.0.1.jar:BOOT-INF/lib/jackson-databind-2.9.8.jar",
        ),
    }
    assert {p.purl for p in found} >= {"pkg:maven/org.apache.logging.log4j/log4j-core@2.14.1"}
    # The archive of a pom.properties is that artifact, whatever its manifest says.
    core = jar(
        {
            "META-INF/MANIFEST.MF": "Manifest-Version: 1.0\nImplementation-Version: 9.9\n",
            "META-INF/maven/org.apache.logging.log4j/log4j-core/pom.properties": pom(
                "org.apache.logging.log4j", "log4j-core", "2.14.1"
            ),
        }
    )
    assert [(p.name, p.version) for p in catalog.file_packages("lib/log4j-core.jar", core)] == [
        ("log4j-core", "2.14.1")
    ]
    assert catalog.file_packages("lib/not-a-jar.jar", b"PK\x03\x04 damaged") == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("log4j-core-2.14.1.jar", ("log4j-core", "2.14.1")),
        ("spring-core-5.3.9.RELEASE.jar", ("spring-core", "5.3.9.RELEASE")),
        ("my-http2-server-5.jar", ("my-http2-server", "5")),
        ("jetpack-build235-rc5.jar", ("jetpack", "build235-rc5")),
        ("spring-r2dbc-5.3.0.jar", ("spring-r2dbc", "5.3.0")),
        ("commons_io_2.11.0.jar", ("commons_io", "2.11.0")),
        ("app.jar", ("app", "")),
        ("3rdparty.jar", ("", "")),
    ],
)
def test_archive_file_names(name: str, expected: tuple[str, str]) -> None:
    assert java.filename_parts(f"opt/{name}") == expected


# ---- secrets: precision -------------------------------------------------------------------------


def pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat
) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def test_private_keys_must_load() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    real = [
        pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL),
        pem(rsa_key, serialization.PrivateFormat.PKCS8),
        pem(ec_key, serialization.PrivateFormat.TraditionalOpenSSL),
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"password"),
        ),
    ]
    for block in real:
        assert secrets.is_private_key(secrets.key_block(block, 0) or b""), block[:40]
        # Escaped in a JSON string, indented in YAML: still a key.
        escaped = json.dumps({"key": block.decode()}).encode()
        offset = escaped.index(b"-----BEGIN")
        assert secrets.is_private_key(secrets.key_block(escaped, offset) or b"")
        indented = b"key: |\n" + b"".join(b"    " + line + b"\n" for line in block.splitlines())
        offset = indented.index(b"-----BEGIN")
        assert secrets.is_private_key(secrets.key_block(indented, offset) or b"")
    placeholders = [
        b"-----BEGIN PRIVATE KEY-----\nXXXX\nXXXX\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN RSA PRIVATE KEY-----\n...\n-----END RSA PRIVATE KEY-----\n",
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----",
        b"-----BEGIN EC PRIVATE KEY-----\n<your key here>\n-----END EC PRIVATE KEY-----",
    ]
    for block in placeholders:
        assert not secrets.is_private_key(secrets.key_block(block, 0) or b""), block
    # A BEGIN marker without its END (a parser's constant, a truncated file) is no key.
    assert secrets.key_block(b"if (line == '-----BEGIN PRIVATE KEY-----') {", 13) is None


@pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")
def test_an_openpgp_secret_key_block_is_a_key(tmp_path: Path) -> None:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    run = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback"]
    subprocess.run(
        [*run, "--passphrase", "", "--quick-gen-key", "test <t@example.com>", "ed25519"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    exported = subprocess.run(
        [*run, "--passphrase", "", "--armor", "--export-secret-keys"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert secrets.is_private_key(secrets.key_block(exported, 0) or b"")
    damaged = exported.replace(b"\n=", b"\n=AAAA", 1)  # a wrong checksum
    assert not secrets.is_private_key(secrets.key_block(damaged, 0) or b"")
    public = subprocess.run([*run, "--armor", "--export"], check=True, capture_output=True).stdout
    fake = public.replace(b"PUBLIC KEY BLOCK", b"PRIVATE KEY BLOCK")
    assert not secrets.is_private_key(secrets.key_block(fake, 0) or b"")


@pytest.mark.parametrize(
    ("token", "placeholder"),
    [
        ("AKIAIOSFODNN7EXAMPLE", True),
        ("AKIAXXXXXXXXXXXXXXXX", True),
        ("AKIA0000000000000000", True),
        ("AKIA1234567890ABCDEF", True),
        ("AKIAQ3EGRJ5NZT7WXK2D", False),
        ("ghp_" + "x" * 36, True),
        ("ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", False),
        ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", True),
        ("xoxb-your-token-here-0000000000", True),
    ],
)
def test_placeholders_are_not_secrets(token: str, placeholder: bool) -> None:
    assert secrets.is_placeholder(token) is placeholder


def test_binary_files_are_not_searched_for_secrets(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write(tmp_path, "usr/lib/libgnutls.so.30", b"\x7fELF\x02\x01\x01" + b"\x00" * 100 + key)
    write(tmp_path, "usr/lib/python3/x.cpython-311.pyc", b"\xa7\r\r\n\x00\x00" + key)
    write(tmp_path, "home/user/.ssh/id_ed25519", key)
    result = scan_dir(tmp_path)
    assert [(s.rule_id, s.path) for s in result.secrets] == [
        ("private-key", str(tmp_path / "home/user/.ssh/id_ed25519").removeprefix(str(tmp_path)))
    ]


def test_rootfs_lists_directories_and_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "a").write_text("x")
    (root / "lib").symlink_to("usr/lib")
    rootfs = Rootfs(root)
    assert rootfs.listdir("lib") == ["a"]
    assert rootfs.listdir("missing") == []
    assert rootfs.link_target("lib") == "usr/lib"
    assert rootfs.link_target("usr") is None


def test_sbom_round_trip_of_every_package_type() -> None:
    from scanner_client.engines.builtin import sbom

    packages = [
        Package(
            "rpm", "openssl-libs", "1:3.0.7-27.el9", "Red Hat:9", "openssl", "1:3.0.7-27.el9",
            "var/lib/rpm/rpmdb.sqlite", distro="rhel-9.2", arch="x86_64",
        ),
        Package("golang", "golang.org/x/text", "v0.3.7", "Go", "golang.org/x/text", "v0.3.7", "b"),
        Package("golang", "stdlib", "go1.19.8", "Go", "stdlib", "1.19.8", "b"),
        Package(
            "maven", "log4j-core", "2.14.1", "Maven", "org.apache.logging.log4j:log4j-core",
            "2.14.1", "app.jar",
        ),
        Package("pypi", "urllib3", "1.26.12", "PyPI", "urllib3", "1.26.12", "x", os_owned=True),
    ]  # fmt: skip
    document = sbom.build("reg/app:1", "image", packages, Distro("rhel", "9.2"))
    parsed = sbom.packages_from_cyclonedx(document)
    assert {
        (p.type, p.name, p.version, p.ecosystem, p.source_name, p.source_version, p.os_owned)
        for p in parsed
    } == {
        (p.type, p.name, p.version, p.ecosystem, p.source_name, p.source_version, p.os_owned)
        for p in packages
    }


def test_sboms_follow_the_cyclonedx_schema() -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    from scanner_client.engines.builtin import sbom

    packages = [
        Package("rpm", "bash", "5.1.8-6.el9", "Red Hat:9", "bash", "5.1.8-6.el9", "var/lib/rpm/x"),
        Package("npm", "web-streams-ponyfill", "", "npm", "web-streams-ponyfill", "", "a/package.json"),
        Package("npm", "lodash", "4.17.15", "npm", "lodash", "4.17.15", "b/package.json", "sha256:1"),
        Package("npm", "lodash", "4.17.15", "npm", "lodash", "4.17.15", "c/package.json", "sha256:1"),
        Package("pypi", "six", "1.15.0", "PyPI", "six", "1.15.0", "d/METADATA", os_owned=True),
    ]  # fmt: skip
    for kind, distro in (("image", Distro("rhel", "9.2")), ("node", None), ("artifact", None)):
        document = sbom.build("reg/app:1", kind, packages, distro)
        assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(document.decode()) is None
        parsed = json.loads(document)
        refs = [c["bom-ref"] for c in parsed["components"]]
        assert len(refs) == len(set(refs))  # the second lodash is told apart by its path
        assert parsed["dependencies"][0]["dependsOn"] == refs


def berkeley(blob: bytes, *, stored: int = -1, next_page: int = 0, page_size: int = 4096) -> bytes:
    """A Berkeley DB hash file as db_load writes one: a meta page, one hash page with key 1
    and a value on an overflow page holding ``blob`` (its first ``stored`` bytes, the page
    after it being ``next_page``)."""
    stored = len(blob) if stored < 0 else stored
    meta = bytearray(page_size)
    struct.pack_into("<IIIII", meta, 8, 0, rpm.BDB_HASH_MAGIC, 9, page_size, 0)
    bucket = bytearray(page_size)
    key = bytes([rpm.BDB_ITEM_KEYDATA]) + struct.pack("<I", 1)
    value = bytes([rpm.BDB_ITEM_OFFPAGE, 0, 0, 0]) + struct.pack("<II", 2, len(blob))
    key_at = page_size - len(key)
    value_at = key_at - len(value)
    bucket[key_at:] = key
    bucket[value_at:key_at] = value
    struct.pack_into("<IIIHHBB", bucket, 8, 1, 0, 0, 2, value_at, 0, rpm.BDB_PAGE_HASH)
    struct.pack_into("<HH", bucket, 26, key_at, value_at)
    overflow = bytearray(page_size)
    struct.pack_into("<IIIHHBB", overflow, 8, 2, 0, next_page, 0, stored, 0, 7)
    overflow[26 : 26 + stored] = blob[:stored]
    return bytes(meta + bucket + overflow)


def test_berkeley_db_rpm_databases_are_read_and_damage_is_counted() -> None:
    blob = header(
        [
            (rpm.TAG_NAME, rpm.TYPE_STRING, b"bash\x00", 1),
            (rpm.TAG_VERSION, rpm.TYPE_STRING, b"4.4.20\x00", 1),
            (rpm.TAG_RELEASE, rpm.TYPE_STRING, b"4.el8_6\x00", 1),
        ]
    )
    found = rpm.read_berkeley(berkeley(blob))
    assert [(p.name, p.full_version) for p in found.packages] == [("bash", "4.4.20-4.el8_6")]
    assert found.unreadable == 0
    # An overflow chain that loops back to itself, or ends early, is not a record.
    for next_page in (2, 0):
        damaged = rpm.read_berkeley(berkeley(blob, stored=len(blob) // 2, next_page=next_page))
        assert (damaged.packages, damaged.unreadable) == ([], 1)
    with pytest.raises(rpm.HeaderError, match="not a Berkeley DB hash"):
        rpm.read_berkeley(b"\x00" * 8192)


def test_a_gcp_service_account_key_is_a_secret_only_with_a_real_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = {
        "type": "service_account",
        "project_id": "demo",
        "private_key_id": "0123",
        "private_key": pem(key, serialization.PrivateFormat.PKCS8).decode(),
        "client_email": "demo@demo.iam.gserviceaccount.com",
    }
    write(tmp_path, "srv/real.json", json.dumps(account, indent=2))
    documented = {
        **account,
        "private_key": "-----BEGIN PRIVATE KEY-----\nREDACTED\n-----END PRIVATE KEY-----\n",
    }
    write(tmp_path, "srv/docs.json", json.dumps(documented, indent=2))
    result = scan_dir(tmp_path)
    assert sorted((s.rule_id, s.path) for s in result.secrets) == [
        ("gcp-service-account", "/srv/real.json"),
        ("private-key", "/srv/real.json"),
    ]
