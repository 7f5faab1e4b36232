"""Images from local paths: an OCI image layout directory, an ``oci-archive`` tar of one, or a
``docker save`` archive. Each gives the same :class:`PulledImage` a registry pull does."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any, Final

from scanner_client.engine import ScanFailure
from scanner_client.engines.builtin.common import Limits, too_large
from scanner_client.engines.builtin.registry import (
    DIGEST,
    INDEX_TYPES,
    Blob,
    Platform,
    PulledImage,
    choose_platform,
    load_config,
    manifest_parts,
)

_LAYOUT_MEMBER: Final = re.compile(r"(?:\./)?(oci-layout|index\.json|blobs/sha256/[0-9a-f]{64})")


def _bad(detail: str) -> ScanFailure:
    return ScanFailure(detail, code="HNDL-005", permanent=True)


def is_oci_layout(path: Path) -> bool:
    return path.is_dir() and (path / "oci-layout").is_file() and (path / "index.json").is_file()


def archive_kind(path: Path) -> str | None:
    """ "docker-archive", "oci-archive", "tar" for another tar, or None for a non-tar file."""
    if not path.is_file() or not tarfile.is_tarfile(path):
        return None
    try:
        with tarfile.open(path) as tar:
            names = {name.removeprefix("./") for name in tar.getnames()}
    except (tarfile.TarError, OSError, EOFError):
        return None
    if "manifest.json" in names:
        return "docker-archive"
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    return "tar"


def _read_json(path: Path, limits: Limits, what: str) -> Any:
    try:
        if path.stat().st_size > limits.max_document_bytes:
            raise too_large(what, limits.max_document_bytes)
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _bad(f"{what} is missing") from None
    except ValueError:
        raise _bad(f"{what} is not JSON") from None


def _blob_path(layout: Path, digest: str) -> Path:
    if not DIGEST.fullmatch(digest):
        raise _bad(f"blob digest {digest!r} is not sha256:<64 hex digits>")
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _checked_document(layout: Path, digest: str, limits: Limits) -> dict[str, Any]:
    path = _blob_path(layout, digest)
    data = path.read_bytes() if path.is_file() else None
    if data is None:
        raise _bad(f"blob {digest} is missing from {layout}")
    if len(data) > limits.max_document_bytes:
        raise too_large(f"blob {digest}", limits.max_document_bytes)
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise _bad(f"blob {digest} in {layout} does not match its digest")
    try:
        document = json.loads(data)
    except ValueError:
        raise _bad(f"blob {digest} is not JSON") from None
    if not isinstance(document, dict):
        raise _bad(f"blob {digest} is not a JSON object")
    return document


def read_oci_layout(layout: Path, platform: Platform, limits: Limits, tag: str = "") -> PulledImage:
    """The image of an OCI layout: the index entry named ``tag`` (annotation
    ``org.opencontainers.image.ref.name``), else the one for ``platform``."""
    index = _read_json(layout / "index.json", limits, f"{layout}/index.json")
    if not isinstance(index, dict):
        raise _bad(f"{layout}/index.json is not an index")
    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if tag:
        entries = [
            m
            for m in entries
            if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
        ]
        if not entries:
            raise _bad(f"{layout} has no image tagged {tag!r}")
    if len(entries) == 1:
        digest = str(entries[0].get("digest"))
        media_type = str(entries[0].get("mediaType", ""))
    else:
        digest = choose_platform({"manifests": entries}, platform, str(layout))
        media_type = next(str(m.get("mediaType", "")) for m in entries if m.get("digest") == digest)
    document = _checked_document(layout, digest, limits)
    for _ in range(2):
        if media_type not in INDEX_TYPES and "manifests" not in document:
            break
        digest = choose_platform(document, platform, f"{layout}@{digest}")
        document = _checked_document(layout, digest, limits)
        media_type = str(document.get("mediaType", ""))
    config_ref, layer_refs = manifest_parts(document, f"{layout}@{digest}")
    config_path = _blob_path(layout, config_ref["digest"])
    if not config_path.is_file():
        raise _bad(f"config blob {config_ref['digest']} is missing from {layout}")
    image = PulledImage(
        reference=f"oci:{layout}@{digest}",
        manifest_digest=digest,
        config=load_config(config_path.read_bytes(), config_ref["digest"]),
    )
    for layer in layer_refs:
        path = _blob_path(layout, layer["digest"])
        if not path.is_file():
            raise _bad(f"layer {layer['digest']} is missing from {layout}")
        image.layers.append(
            Blob(
                layer["digest"],
                str(layer.get("mediaType", "")),
                int(layer["size"]),
                path,
                owned=False,
            )
        )
    return image


def unpack_oci_archive(archive: Path, dest: Path, limits: Limits) -> Path:
    """The OCI layout inside an ``oci-archive`` tar, written under ``dest`` (only the layout's
    own file names are taken; nothing else in the tar is written)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    total = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            match = _LAYOUT_MEMBER.fullmatch(member.name)
            if match is None or not member.isreg():
                continue
            total += member.size
            if total > limits.max_image_bytes:
                raise too_large(f"archive {archive}", limits.max_image_bytes)
            source = tar.extractfile(member)
            if source is None:
                continue
            with source, open(dest / match.group(1), "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    return dest


def read_docker_archive(archive: Path, dest: Path, limits: Limits) -> PulledImage:
    """The first image of a ``docker save`` archive; its layers are copied under ``dest`` and
    named by the sha256 of their (uncompressed or compressed) tar."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = {member.name.removeprefix("./"): member for member in tar.getmembers()}

        def extract(name: str, target: Path, limit: int) -> str:
            member = members.get(name.removeprefix("./"))
            if member is None or not member.isreg():
                raise _bad(f"{archive} has no file {name!r}")
            if member.size > limit:
                raise too_large(f"{name} in {archive}", limit)
            source = tar.extractfile(member)
            assert source is not None
            hasher = hashlib.sha256()
            with source, open(target, "wb") as out:
                while chunk := source.read(1 << 20):
                    hasher.update(chunk)
                    out.write(chunk)
            return "sha256:" + hasher.hexdigest()

        extract("manifest.json", dest / "manifest.json", limits.max_document_bytes)
        manifest = _read_json(dest / "manifest.json", limits, f"{archive}: manifest.json")
        if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
            raise _bad(f"{archive}: manifest.json lists no image")
        entry = manifest[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise _bad(f"{archive}: manifest.json needs Config and Layers")
        config_digest = extract(config_name, dest / "config.json", limits.max_document_bytes)
        image = PulledImage(
            reference=f"docker-archive:{archive}",
            manifest_digest=config_digest,
            config=load_config((dest / "config.json").read_bytes(), config_digest),
        )
        for index, name in enumerate(layer_names):
            path = dest / f"layer-{index}"
            digest = extract(str(name), path, limits.max_layer_bytes)
            image.layers.append(Blob(digest, "", path.stat().st_size, path))
    return image
