"""Pulling images with the Docker Registry HTTP API v2 (the OCI distribution spec).

- Manifests: OCI image manifests and indexes, Docker schema 2 manifests and manifest lists; an
  index is resolved to the manifest of the wanted platform (default ``linux/amd64``).
- Auth: anonymous, HTTP Basic, and the token flow (a ``401`` with ``WWW-Authenticate: Bearer
  realm=...,service=...,scope=...`` is answered by fetching a token from the realm, with the
  credentials when there are some). Credentials are never sent to another host on redirects.
- The job policy: every connection (the registry, redirects to blob storage, the token realm)
  goes through :mod:`scanner_client.egress`, which checks the address it resolves to and
  connects to that address; a realm must be on the registry's host or an allowed registry, and
  credentials go to a realm only on a host their grant names. A refusal is a permanent
  HNDL-005 naming the rule.
- Proxy: the job's proxy URL, else the scanner's. One that does not parse is HNDL-011.
- Integrity: every manifest, config and layer is checked against its digest while it streams
  to disk, and against the limits on its size.

Failures are :class:`~scanner_client.engine.ScanFailure`: permanent for what retrying cannot
fix (not found, access denied, no manifest for the platform, too large), transient otherwise
(connection errors, 5xx, a digest mismatch).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final
from urllib.parse import urlsplit

import httpx

from imagehandler.jobpolicy import Grant, Refused
from imagehandler.jobpolicy.egress import DOCKER_HUB_HOSTS
from scanner_client.egress import EgressGuard, guarded_client
from scanner_client.engine import ScanFailure
from scanner_client.engines.builtin.common import Limits, too_large
from scanner_client.job_policy import failure as policy_failure

OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT: Final = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_API: Final = "registry-1.docker.io"
PROXY_SCHEMES: Final = frozenset({"http", "https", "socks5", "socks5h"})
DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
STREAM_CHUNK: Final = 1 << 20


@dataclass(frozen=True)
class Credentials:
    """Pull credentials: a user name and password, or a registry (bearer) token."""

    username: str = ""
    password: str = ""
    token: str = ""


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, value: str) -> Platform:
        parts = value.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {value!r} is not OS/ARCH[/VARIANT]")
        return cls(*parts)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, platform: dict[str, Any]) -> bool:
        if platform.get("os") != self.os or platform.get("architecture") != self.architecture:
            return False
        return not self.variant or platform.get("variant", "") == self.variant


@dataclass
class Blob:
    digest: str
    media_type: str
    size: int
    path: Path
    # The scan made this file and may delete it once used.
    owned: bool = True
    # Not downloaded: the layer cache has what the scan needs of it (``path`` does not exist).
    cached: bool = False


@dataclass
class PulledImage:
    """An image's manifest, config and layer files on local disk."""

    reference: str
    manifest_digest: str
    config: dict[str, Any]
    layers: list[Blob] = field(default_factory=list)


def check_proxy_url(url: str) -> None:
    """HNDL-011 (permanent) for a proxy URL that does not parse as scheme://host[:port]."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ScanFailure(
            f"proxy URL invalid: {url!r}: {exc}", code="HNDL-011", permanent=True
        ) from None
    if parts.scheme not in PROXY_SCHEMES or not parts.hostname or port == 0:
        raise ScanFailure(
            f"proxy URL invalid: {url!r} must look like http://host:port "
            f"(schemes: {', '.join(sorted(PROXY_SCHEMES))})",
            code="HNDL-011",
            permanent=True,
        )


def is_loopback(registry: str) -> bool:
    host = urlsplit(f"//{registry}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        match.group(1).lower(): (
            match.group(2).replace('\\"', '"') if match.group(2) is not None else match.group(3)
        )
        for match in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _transient(detail: str) -> ScanFailure:
    return ScanFailure(detail)


def _permanent(detail: str, code: str = "HNDL-006") -> ScanFailure:
    return ScanFailure(detail, code=code, permanent=True)


class RegistryClient:
    """One registry, one repository's pulls. Use as ``async with``."""

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        proxy: str = "",
        insecure: bool = False,
        limits: Limits | None = None,
        timeout: float = 60.0,
        verify: bool | str | ssl.SSLContext = True,
        guard: EgressGuard,
        grant: Grant | None = None,
        trusted_proxy: str = "",
    ) -> None:
        check_proxy_url(proxy)
        if proxy.startswith("socks"):
            try:
                import socksio  # type: ignore[import-not-found]  # noqa: F401
            except ImportError:
                raise _permanent(
                    f"proxy {proxy!r}: SOCKS proxies need the socksio package", code="HNDL-011"
                ) from None
        self.registry = registry or DOCKER_HUB
        host = DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry
        scheme = "http" if insecure or is_loopback(self.registry) else "https"
        self.base = f"{scheme}://{host}"
        self.api_host = host
        self.credentials = credentials or Credentials()
        # Where the credentials may go besides the registry itself (its token service).
        self.grant = grant
        self.guard = guard
        self.limits = limits or Limits()
        self._client = guarded_client(
            guard,
            proxy=proxy,
            trusted_proxy=trusted_proxy,
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
        )
        # scope -> Authorization header value
        self._auth: dict[str, str] = {}
        # The scheme the registry asked for: "bearer" or "basic" (None until asked).
        self._challenge: tuple[str, dict[str, str]] | None = None

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    # ---- HTTP with auth ---------------------------------------------------------------------

    async def _send(
        self, repository: str, url: str, headers: dict[str, str], stream: bool
    ) -> httpx.Response:
        scope = f"repository:{repository}:pull"
        for attempt in range(2):
            request_headers = dict(headers)
            authorization = self._auth.get(scope)
            if authorization:
                request_headers["Authorization"] = authorization
            request = self._client.build_request("GET", url, headers=request_headers)
            try:
                response = await self._client.send(request, stream=stream)
            except Refused as refused:
                raise policy_failure(refused) from None
            except httpx.ProxyError as exc:
                raise _transient(f"proxy error reaching {self.base}: {exc}") from None
            except httpx.TransportError as exc:
                raise _transient(
                    f"cannot reach registry {self.registry}: {type(exc).__name__}: {exc}"
                ) from None
            if response.status_code != 401 or attempt == 1:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            await response.aclose()
            self._auth[scope] = await self._authorize(challenge, scope)
        raise AssertionError("unreachable")

    async def _authorize(self, challenge: str, scope: str) -> str:
        scheme, params = parse_challenge(challenge)
        credentials = self.credentials
        if scheme == "basic":
            if not credentials.username:
                raise _permanent(f"registry {self.registry} needs credentials (HTTP Basic)")
            pair = f"{credentials.username}:{credentials.password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        if scheme != "bearer" or "realm" not in params:
            raise _permanent(f"registry {self.registry} asks for unsupported auth {challenge!r}")
        if credentials.token and not credentials.username:
            return f"Bearer {credentials.token}"
        try:
            realm = self.guard.policy.check_realm(params["realm"], self.registry, self.api_host)
            if credentials.username and not self._may_send_credentials(realm.netloc):
                raise Refused(
                    "credential-grants",
                    f"registry {self.registry} names the token realm {params['realm']!r}; the "
                    f"credentials are not for {realm.netloc} and are not sent there",
                    "an operator can name that host in the credential's registries",
                )
        except Refused as refused:
            raise policy_failure(refused) from None
        query = {"scope": params.get("scope", scope)}
        if params.get("service"):
            query["service"] = params["service"]
        auth = (
            httpx.BasicAuth(credentials.username, credentials.password)
            if credentials.username
            else None
        )
        try:
            response = await self._client.get(params["realm"], params=query, auth=auth)
        except Refused as refused:
            raise policy_failure(refused) from None
        except httpx.TransportError as exc:
            raise _transient(f"cannot reach the token service {params['realm']}: {exc}") from None
        if response.status_code in (401, 403):
            raise _permanent(
                f"the token service of {self.registry} refused the credentials "
                f"({response.status_code})"
            )
        if response.status_code != 200:
            raise _transient(
                f"the token service of {self.registry} answered {response.status_code}"
            )
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise _transient(f"the token service of {self.registry} sent no token")
        return f"Bearer {token}"

    def _may_send_credentials(self, netloc: str) -> bool:
        """The registry's own host (or Docker Hub's token service for docker.io), or a host the
        credential's grant names."""
        own = {self.registry, self.api_host}
        if self.registry == DOCKER_HUB:
            own |= DOCKER_HUB_HOSTS
        if netloc in own:
            return True
        return self.grant is not None and self.grant.is_for(netloc)

    def _check_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status == 200:
            return
        if status in (401, 403):
            raise _permanent(f"access to {what} denied by {self.registry} ({status})")
        if status == 404:
            raise _permanent(f"{what} not found in {self.registry}")
        if status == 429 or status >= 500:
            raise _transient(f"{self.registry} answered {status} for {what}")
        raise _permanent(f"{self.registry} answered {status} for {what}")

    # ---- pulling ----------------------------------------------------------------------------

    async def manifest(self, repository: str, reference: str) -> tuple[str, str, dict[str, Any]]:
        """(media type, digest, document) of a manifest or index."""
        url = f"{self.base}/v2/{repository}/manifests/{reference}"
        what = (
            f"manifest {repository}:{reference}"
            if ":" not in reference
            else f"{repository}@{reference}"
        )
        response = await self._send(repository, url, {"Accept": ACCEPT}, stream=True)
        try:
            self._check_status(response, what)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.limits.max_document_bytes:
                    raise too_large(what, self.limits.max_document_bytes)
        finally:
            await response.aclose()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if DIGEST.fullmatch(reference) and digest != reference:
            raise _transient(f"{what}: the registry sent content with digest {digest}")
        try:
            document = json.loads(body)
        except ValueError:
            raise _permanent(f"{what} is not JSON") from None
        if not isinstance(document, dict):
            raise _permanent(f"{what} is not a JSON object")
        media_type = document.get("mediaType") or response.headers.get("Content-Type", "")
        media_type = media_type.split(";")[0].strip()
        if media_type not in INDEX_TYPES | MANIFEST_TYPES:
            # An OCI manifest may leave out mediaType: tell by its fields.
            if "manifests" in document:
                media_type = OCI_INDEX
            elif "layers" in document and "config" in document:
                media_type = OCI_MANIFEST
            else:
                raise _permanent(f"{what} has unsupported media type {media_type!r}")
        return media_type, digest, document

    async def blob(
        self,
        repository: str,
        digest: str,
        size: int,
        dest: Path,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a blob to ``dest``, checking its digest and size."""
        if not DIGEST.fullmatch(digest):
            raise _permanent(f"blob digest {digest!r} is not sha256:<64 hex digits>")
        if size > self.limits.max_layer_bytes:
            raise too_large(f"blob {digest} ({size} bytes)", self.limits.max_layer_bytes)
        url = f"{self.base}/v2/{repository}/blobs/{digest}"
        response = await self._send(repository, url, {}, stream=True)
        hasher = hashlib.sha256()
        written = 0
        try:
            self._check_status(response, f"blob {digest}")
            out = await asyncio.to_thread(open, dest, "wb")
            try:
                async for chunk in response.aiter_raw(STREAM_CHUNK):
                    written += len(chunk)
                    if written > max(size, 0) or written > self.limits.max_layer_bytes:
                        raise _permanent(f"blob {digest} is larger than its declared {size} bytes")
                    # Hashing and writing a MiB take a millisecond or two: off the loop.
                    await asyncio.to_thread(_sink, out, hasher, chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            finally:
                await asyncio.to_thread(out.close)
        except httpx.TransportError as exc:
            raise _transient(f"download of blob {digest} failed: {exc}") from None
        finally:
            await response.aclose()
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise _transient(f"blob {digest} arrived with digest {actual}")
        if written != size:
            raise _transient(f"blob {digest} arrived with {written} of {size} bytes")

    async def pull(
        self,
        repository: str,
        reference: str,
        dest: Path,
        platform: Platform,
        progress: Callable[[int, int], None] | None = None,
        skip: Callable[[list[str]], Awaitable[frozenset[int]]] | None = None,
    ) -> PulledImage:
        """Pull ``repository`` at ``reference`` (a tag or digest) into ``dest``.

        ``progress(done, total)`` follows the bytes of the config and layers. ``skip`` gets
        the layer digests in order and answers the indexes of the layers not to download (the
        layer cache has them): those come back ``cached``.
        """
        media_type, digest, document = await self.manifest(repository, reference)
        for _ in range(2):  # an index of indexes is resolved one level down, no further
            if media_type not in INDEX_TYPES:
                break
            chosen = choose_platform(document, platform, f"{repository}:{reference}")
            media_type, digest, document = await self.manifest(repository, chosen)
        if media_type not in MANIFEST_TYPES:
            raise _permanent(f"{repository}:{reference} does not resolve to an image manifest")
        config_ref, layer_refs = manifest_parts(document, f"{repository}@{digest}")
        total = sum(int(item["size"]) for item in [config_ref, *layer_refs])
        if total > self.limits.max_image_bytes:
            raise too_large(
                f"image {repository}@{digest} ({total} bytes)", self.limits.max_image_bytes
            )
        skipped = (
            await skip([str(layer["digest"]) for layer in layer_refs])
            if skip is not None
            else frozenset()
        )
        total -= sum(int(layer_refs[index]["size"]) for index in skipped)
        done = 0

        def on_bytes(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, total)

        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        config_path = dest / "config.json"
        await self.blob(
            repository, config_ref["digest"], int(config_ref["size"]), config_path, on_bytes
        )
        image = PulledImage(
            reference=f"{self.registry}/{repository}@{digest}",
            manifest_digest=digest,
            config=load_config(
                await asyncio.to_thread(config_path.read_bytes), config_ref["digest"]
            ),
        )
        for index, layer in enumerate(layer_refs):
            path = dest / f"layer-{index}"
            cached = index in skipped
            if not cached:
                await self.blob(repository, layer["digest"], int(layer["size"]), path, on_bytes)
            image.layers.append(
                Blob(
                    layer["digest"],
                    str(layer.get("mediaType", "")),
                    int(layer["size"]),
                    path,
                    owned=not cached,
                    cached=cached,
                )
            )
        return image


def _sink(out: BinaryIO, hasher: Any, chunk: bytes) -> None:
    hasher.update(chunk)
    out.write(chunk)


def choose_platform(index: dict[str, Any], platform: Platform, what: str) -> str:
    """The digest of the index entry for ``platform`` (the only entry, when there is one)."""
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    # Attestation manifests (buildx) carry platform unknown/unknown: never images.
    images = [
        m
        for m in manifests
        if (m.get("platform") or {}).get("os") != "unknown"
        and DIGEST.fullmatch(str(m.get("digest")))
    ]
    for entry in images:
        if platform.matches(entry.get("platform") or {}):
            return str(entry["digest"])
    if len(images) == 1 and not images[0].get("platform"):
        return str(images[0]["digest"])
    offered = sorted(
        "/".join(
            p for p in (pl.get("os", "?"), pl.get("architecture", "?"), pl.get("variant", "")) if p
        )
        for pl in ((m.get("platform") or {}) for m in images)
    )
    raise _permanent(
        f"{what} has no manifest for {platform}; it offers {', '.join(offered) or 'none'}",
        code="HNDL-005",
    )


def manifest_parts(
    document: dict[str, Any], what: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The config descriptor and layer descriptors of an image manifest, checked."""
    config = document.get("config")
    layers = document.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise _permanent(f"{what} is not an image manifest (no config or layers)")
    for descriptor in [config, *layers]:
        if (
            not isinstance(descriptor, dict)
            or not DIGEST.fullmatch(str(descriptor.get("digest")))
            or not isinstance(descriptor.get("size"), int)
            or descriptor["size"] < 0
        ):
            raise _permanent(f"{what} has a malformed descriptor: {descriptor!r:.200}")
    return config, layers


def load_config(data: bytes, digest: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except ValueError:
        raise _permanent(f"image config {digest} is not JSON") from None
    if not isinstance(config, dict):
        raise _permanent(f"image config {digest} is not a JSON object")
    return config
