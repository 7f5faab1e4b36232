"""Building real OCI images in tests: layers as tar streams, an OCI image layout on disk, and a
local ``docker-registry`` (Debian's package) that ``skopeo`` pushes them to.

The EICAR test string is assembled at run time, so no file of the project is itself it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-" + b"TEST-FILE!$H+H*"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Entry:
    """One tar entry: ``kind`` is file, dir, symlink or hardlink."""

    name: str
    data: bytes = b""
    kind: str = "file"
    target: str = ""
    mode: int = 0o644


def file(name: str, data: bytes | str = b"", mode: int = 0o644) -> Entry:
    return Entry(name, data.encode() if isinstance(data, str) else data, mode=mode)


def directory(name: str) -> Entry:
    return Entry(name, kind="dir", mode=0o755)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, kind="symlink", target=target)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, kind="hardlink", target=target)


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mode = entry.mode
            info.mtime = 0
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                tar.addfile(info)
            elif entry.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = entry.target
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return buffer.getvalue()


@dataclass(frozen=True)
class Layer:
    blob: bytes
    diff_id: str
    media_type: str = OCI_LAYER_GZIP

    @property
    def digest(self) -> str:
        return sha256(self.blob)


@dataclass(frozen=True)
class DiskLayer:
    """An uncompressed layer tar already on disk (a large root filesystem): linked into a
    layout, not read into memory."""

    path: Path
    digest: str
    media_type: str = OCI_LAYER_TAR
    # A compressed layer's diff id: the digest of its uncompressed tar.
    uncompressed_digest: str = ""

    @property
    def diff_id(self) -> str:
        return self.uncompressed_digest or self.digest

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def disk_layer(path: Path) -> DiskLayer:
    """A layer of the tar at ``path``; its digest is cached beside it (``PATH.sha256``)."""
    cached = path.with_name(path.name + ".sha256")
    if cached.exists() and cached.stat().st_mtime >= path.stat().st_mtime:
        return DiskLayer(path, cached.read_text().strip())
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    cached.write_text("sha256:" + digest.hexdigest())
    return DiskLayer(path, "sha256:" + digest.hexdigest())


def layer(entries: Sequence[Entry], compress: bool = True) -> Layer:
    raw = tar_bytes(entries)
    if not compress:
        return Layer(raw, sha256(raw), OCI_LAYER_TAR)
    return Layer(gzip.compress(raw, compresslevel=1, mtime=0), sha256(raw))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    layers: list[Layer | DiskLayer]
    user: str = ""
    env: list[str] = field(default_factory=list)
    os: str = "linux"
    architecture: str = "amd64"

    def config(self) -> bytes:
        return json.dumps(
            {
                "architecture": self.architecture,
                "os": self.os,
                "config": {"User": self.user, "Env": self.env},
                "rootfs": {"type": "layers", "diff_ids": [lay.diff_id for lay in self.layers]},
            },
            sort_keys=True,
        ).encode()


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict[str, Any]] = []

    def blob(self, data: bytes) -> str:
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    def layer(self, lay: Layer | DiskLayer) -> dict[str, Any]:
        """Store one layer blob (a disk layer is hard-linked, or copied across file systems);
        its descriptor."""
        if isinstance(lay, Layer):
            return {
                "mediaType": lay.media_type,
                "digest": self.blob(lay.blob),
                "size": len(lay.blob),
            }
        target = self.path / "blobs" / "sha256" / lay.digest.removeprefix("sha256:")
        if not target.exists():
            try:
                os.link(lay.path, target)
            except OSError:
                shutil.copyfile(lay.path, target)
        return {"mediaType": lay.media_type, "digest": lay.digest, "size": lay.size}

    def manifest(self, image: Image) -> dict[str, Any]:
        """Write the image's blobs and manifest; its descriptor."""
        config = image.config()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": self.blob(config),
                    "size": len(config),
                },
                "layers": [self.layer(lay) for lay in image.layers],
            }
        ).encode()
        return {
            "mediaType": OCI_MANIFEST,
            "digest": self.blob(manifest),
            "size": len(manifest),
            "platform": {"os": image.os, "architecture": image.architecture},
        }

    def add(self, tag: str, *images: Image) -> str:
        """Tag one image, or an index of several; the tagged digest."""
        descriptors = [self.manifest(image) for image in images]
        if len(descriptors) == 1:
            descriptor = descriptors[0]
        else:
            index = json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
            ).encode()
            descriptor = {"mediaType": OCI_INDEX, "digest": self.blob(index), "size": len(index)}
        descriptor = {**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}}
        self.entries.append(descriptor)
        (self.path / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries})
        )
        return str(descriptor["digest"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tools_missing() -> list[str]:
    return [tool for tool in ("docker-registry", "skopeo") if shutil.which(tool) is None]


class TokenService:
    """A registry token service (the distribution token auth spec) on 127.0.0.1: checks Basic
    credentials and answers with an RS256 JWT that grants what was asked, signed by a
    self-signed certificate the registry trusts (``rootcertbundle``)."""

    service = "test-registry"
    issuer = "test-token-issuer"

    def __init__(self, workdir: Path, user: str, password: str) -> None:
        import datetime as dt
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.user, self.password = user, password
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = workdir / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service.answer(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.netloc = f"127.0.0.1:{self.server.server_address[1]}"
        self.realm = f"http://{self.netloc}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, request: Any) -> None:
        import base64
        from urllib.parse import parse_qs, urlsplit

        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query).items()}
        scopes = parse_qs(urlsplit(request.path).query).get("scope", [])
        header = request.headers.get("Authorization", "")
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        self.requests.append({**query, "authorization": header.split(" ")[0]})
        if header != f"Basic {expected}":
            request.send_response(401)
            request.end_headers()
            return
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":") if scope.count(":") == 2 else ("", "", "")
            if kind == "repository":
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = self.token(access)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def token(self, access: list[dict[str, Any]]) -> str:
        import base64
        import secrets

        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": self.user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64(signature)}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1 with temporary storage; optional htpasswd or
    token auth."""

    def __init__(
        self,
        workdir: Path,
        htpasswd: tuple[str, str] | None = None,
        token: TokenService | None = None,
        *,
        access_log: bool = False,
    ) -> None:
        """``access_log``: the registry logs every request (see :meth:`blob_fetches`)."""
        self.workdir = workdir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.credentials = htpasswd
        storage = workdir / "storage"
        storage.mkdir(parents=True)
        auth = ""
        if htpasswd is not None:
            import bcrypt

            user, password = htpasswd
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            (workdir / "htpasswd").write_text(f"{user}:{hashed}\n")
            auth = (
                f"auth:\n  htpasswd:\n    realm: test-registry\n    path: {workdir / 'htpasswd'}\n"
            )
        if token is not None:
            self.credentials = (token.user, token.password)
            auth = (
                f"auth:\n  token:\n    realm: {token.realm}\n    service: {token.service}\n"
                f"    issuer: {token.issuer}\n    rootcertbundle: {token.bundle}\n"
            )
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            f"log:\n  level: error\n  accesslog:\n    disabled: {str(not access_log).lower()}\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n  secret: test-secret\n" + auth
        )
        self.log = open(workdir / "registry.log", "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        (workdir / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        self._wait_ready(10.0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited: {(self.workdir / 'registry.log').read_text()}"
                )
            try:
                status = httpx.get(f"http://{self.address}/v2/", timeout=1.0).status_code
                if status in (200, 401):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)  # the registry process starting: nothing to wait on but its port
        raise TimeoutError(f"docker-registry did not answer on {self.address} in {timeout}s")

    def push(self, layout: Path, tag: str, repository: str, *, all_images: bool = False) -> str:
        """``skopeo copy`` the layout's ``tag`` to ``repository:tag``; the pushed digest."""
        digest_file = self.workdir / f"digest-{repository.replace('/', '_')}-{tag}"
        command = [
            "skopeo",
            "--policy",
            str(self.workdir / "policy.json"),
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--digestfile",
            str(digest_file),
        ]
        if all_images:
            command.append("--all")
        if self.credentials is not None:
            command.append(f"--dest-creds={self.credentials[0]}:{self.credentials[1]}")
        command += [f"oci:{layout}:{tag}", f"docker://{self.address}/{repository}:{tag}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"skopeo copy failed: {done.stderr}")
        return digest_file.read_text().strip()

    def blob_fetches(self) -> list[str]:
        """The digests of the blobs the registry sent (GET .../blobs/DIGEST answered 200), in
        order, from its access log (``access_log=True``)."""
        found = []
        for line in (self.workdir / "registry.log").read_text(errors="replace").splitlines():
            match = re.search(
                r'"GET /v2/[^ ]+/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" 200 ', line
            )
            if match:
                found.append(match.group(1))
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
