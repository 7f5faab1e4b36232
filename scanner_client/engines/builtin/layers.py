"""Unpacking image layers into a scratch root, safely.

A layer is a tar stream (plain, gzip or zstd). Each layer is applied on top of the ones before
it in one scratch directory, the *root*:

- **Whiteouts** (OCI image spec): ``.wh.NAME`` removes ``NAME`` of lower layers, and
  ``.wh..wh..opq`` empties its directory of what lower layers put there.
- **Containment**: every path is resolved inside the root the way a ``chroot`` would: ``..``
  stops at the root, and a symbolic link met on the way (absolute or relative) is followed
  *within* the root. An entry whose own name climbs out of the root (``../../etc/passwd``) is
  not written and is reported. Files are created with ``O_NOFOLLOW | O_EXCL`` after whatever
  was at their place is removed, so no write ever goes through a link. Devices and FIFOs are
  not created; set-uid bits and ownership are dropped.
- **Limits** (:class:`~scanner_client.engines.builtin.common.Limits`): the size of one file,
  of everything unpacked, and the number of entries. Past one, the scan fails for good.

:class:`Rootfs` also remembers which layer last wrote each path (``origin``), so findings can
name the layer they come from, and reads files back with the same in-root resolution.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Protocol

from scanner_client.engine import ScanFailure
from scanner_client.engines.builtin.common import MIB, CancelToken, Limits, too_large

WHITEOUT: Final = ".wh."
OPAQUE: Final = ".wh..wh..opq"
CHUNK: Final = MIB
# Symbolic links followed while resolving one path (Linux's own limit).
MAX_LINK_HOPS: Final = 40
# OS errors a hostile entry can cause: the entry is skipped, the scan goes on.
_ENTRY_ERRORS: Final = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.EMLINK})

GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Skipped:
    """A layer entry that was not written, and why."""

    layer: str
    path: str
    reason: str
    # The entry tried to reach outside the image root (a hostile layer).
    escapes: bool = False


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Decompressed:
    """A file-like ``read`` over a gzip (multi-member) or zstd stream, in large chunks."""

    def __init__(self, raw: IO[bytes], kind: str) -> None:
        self._raw = raw
        self._inflate: Any = zlib.decompressobj(wbits=31) if kind == "gzip" else None
        self._zstd: _Readable | None = None
        if kind == "zstd":
            import zstandard  # imported here: only zstd layers need it

            self._zstd = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK)
        self._buffer = b""
        self._offset = 0
        self._eof = False

    def _fill(self) -> None:
        if self._zstd is not None:
            data = self._zstd.read(CHUNK)
            if not data:
                self._eof = True
            self._buffer, self._offset = data, 0
            return
        decoder = self._inflate
        if decoder.eof:
            # Another gzip member may follow (or trailing zeros: padding some tools add).
            compressed = decoder.unused_data
            if not compressed.strip(b"\x00"):
                compressed = self._raw.read(CHUNK)
                if not compressed.strip(b"\x00"):
                    self._eof = True
                    self._buffer, self._offset = b"", 0
                    return
            decoder = self._inflate = zlib.decompressobj(wbits=31)
        else:
            compressed = self._raw.read(CHUNK)
            if not compressed:
                raise ValueError("the gzip stream ends early")
        self._buffer, self._offset = decoder.decompress(compressed), 0

    def read(self, size: int = -1, /) -> bytes:
        parts: list[bytes] = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0 and not self._eof:
            if self._offset >= len(self._buffer):
                self._fill()
                continue
            piece = self._buffer[self._offset : self._offset + wanted]
            self._offset += len(piece)
            wanted -= len(piece)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def open_layer(raw: IO[bytes]) -> _Readable:
    """The tar stream inside a layer blob, by its first bytes (plain, gzip or zstd)."""
    head = raw.read(4)
    raw.seek(0)
    if head.startswith(GZIP_MAGIC):
        return _Decompressed(raw, "gzip")
    if head == ZSTD_MAGIC:
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ScanFailure(
                "the layer is zstd-compressed and the zstandard package is not installed",
                permanent=True,
            ) from None
        return _Decompressed(raw, "zstd")
    return raw


def clean_path(name: str) -> str | None:
    """``name`` relative to the root with ``.`` and ``..`` folded; None when it climbs out."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


@dataclass
class Rootfs:
    """A scratch directory the layers of one image are unpacked into."""

    root: Path
    limits: Limits = field(default_factory=Limits)
    # Relative path -> digest of the layer that last wrote it (files and links).
    origin: dict[str, str] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    unpacked_bytes: int = 0
    entries: int = 0
    # Relative paths known to be real directories (not links); cleared on any removal.
    _dirs: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(os.path.realpath(self.root))
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- resolution inside the root -----------------------------------------------------

    def resolve(
        self,
        rel: str,
        *,
        follow_final: bool = True,
        create: bool = False,
        directory: bool = False,
    ) -> str | None:
        """``rel`` as a real path relative to the root, links followed inside the root.

        The parents of the result are real directories under the root; the final component is
        a link itself when ``follow_final`` is false. A missing final component is fine; a
        missing parent is created when ``create`` (replacing a non-directory), else None.
        With ``directory`` the final component is a parent too. None also for a loop of links.
        """
        pending = [part for part in rel.split("/") if part not in ("", ".")]
        pending.reverse()  # pop() takes the next component
        done: list[str] = []
        hops = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if done:
                    done.pop()
                continue
            last = not pending and not directory
            here = "/".join((*done, part))
            if not last and here in self._dirs:
                done.append(part)
                continue
            path = os.path.join(self.root, here)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if last:
                    done.append(part)
                    break
                if not create:
                    return None
                os.mkdir(path, 0o755)
                self._dirs.add(here)
                done.append(part)
                continue
            except NotADirectoryError:
                return None
            if stat.S_ISLNK(mode) and (follow_final or not last):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    return None
                target = os.readlink(path)
                if target.startswith("/"):
                    done = []
                pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            if not last:
                if not stat.S_ISDIR(mode):
                    if not create:
                        return None
                    self._remove(here)
                    os.mkdir(path, 0o755)
                self._dirs.add(here)
            done.append(part)
        return "/".join(done)

    def path(self, rel: str) -> Path:
        """The absolute path of a resolved relative path."""
        return self.root / rel if rel else self.root

    def open(self, rel: str) -> IO[bytes] | None:
        """A regular file of the image for reading, links followed inside the root; None when
        it is missing or not a regular file."""
        real = self.resolve(rel)
        if real is None or not real:
            return None
        try:
            fd = os.open(self.path(real), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def read(self, rel: str, limit: int | None = None) -> bytes | None:
        """A file's bytes (at most ``limit``, default the document limit), or None."""
        handle = self.open(rel)
        if handle is None:
            return None
        with handle:
            return handle.read(self.limits.max_document_bytes if limit is None else limit)

    def listdir(self, rel: str) -> list[str]:
        """The names in a directory of the image (links followed inside the root); [] when it
        is missing or not a directory."""
        real = self.resolve(rel, directory=True)
        if real is None:
            return []
        try:
            return os.listdir(self.path(real))
        except OSError:
            return []

    def link_target(self, rel: str) -> str | None:
        """Where the symbolic link ``rel`` points (as written in the image); None when it is
        not a link."""
        real = self.resolve(rel, follow_final=False)
        if not real:
            return None
        try:
            return os.readlink(self.path(real))
        except OSError:
            return None

    def walk(
        self, token: CancelToken | None = None, skip: frozenset[str] = frozenset()
    ) -> Iterator[tuple[str, os.stat_result]]:
        """Every regular file under the root, as (relative path, lstat), links not followed;
        ``skip`` names top-level directories left out."""
        stack = [""]
        while stack:
            if token is not None:
                token.check()
            rel_dir = stack.pop()
            try:
                entries = list(os.scandir(self.path(rel_dir)))
            except OSError:
                continue
            for entry in sorted(entries, key=lambda item: item.name):
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    if not (rel_dir == "" and entry.name in skip):
                        stack.append(rel)
                elif stat.S_ISREG(info.st_mode):
                    yield rel, info

    # ---- changes ----------------------------------------------------------------------------

    def _remove(self, rel: str) -> None:
        """Remove ``rel`` (not followed) and forget what was under it."""
        path = self.path(rel)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
            prefix = rel + "/"
            for key in [key for key in self.origin if key.startswith(prefix)]:
                del self.origin[key]
        else:
            os.unlink(path)
        self.origin.pop(rel, None)
        self._dirs.clear()

    def _skip(self, layer: str, name: str, reason: str, escapes: bool = False) -> None:
        self.skipped.append(Skipped(layer, name, reason, escapes))

    def apply(
        self,
        blob: Path,
        layer: str,
        token: CancelToken,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Unpack the layer blob at ``blob`` (its digest ``layer``) on top of the root.

        ``progress`` gets the compressed bytes read so far, about once per MiB.
        """
        with open(blob, "rb") as raw:
            stream = open_layer(raw)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                    _Layer(self, layer, tar, token, raw, progress).run()
            except tarfile.TarError as exc:
                raise ScanFailure(f"layer {layer} is not a valid tar stream: {exc}") from None
            except (zlib.error, ValueError, EOFError) as exc:
                raise ScanFailure(f"layer {layer} cannot be decompressed: {exc}") from None


class _Layer:
    """One layer being applied."""

    def __init__(
        self,
        rootfs: Rootfs,
        digest: str,
        tar: tarfile.TarFile,
        token: CancelToken,
        raw: IO[bytes],
        progress: Callable[[int], None] | None,
    ) -> None:
        self.rootfs = rootfs
        self.limits = rootfs.limits
        self.digest = digest
        self.tar = tar
        self.token = token
        self.raw = raw
        self.progress = progress
        # Resolved paths this layer wrote, and their directories: whiteouts spare them.
        self.written: set[str] = set()
        self._reported = 0

    def run(self) -> None:
        for member in self.tar:
            self.token.check()
            rootfs = self.rootfs
            rootfs.entries += 1
            if rootfs.entries > self.limits.max_entries:
                raise ScanFailure(
                    f"the image has more than {self.limits.max_entries} entries", permanent=True
                )
            try:
                self._entry(member)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ScanFailure(f"the scratch disk is full unpacking {self.digest}") from None
                if exc.errno not in _ENTRY_ERRORS:
                    raise
                rootfs._skip(self.digest, member.name, f"cannot be written: {exc.strerror}")
            if self.progress is not None:
                position = self.raw.tell()
                if position - self._reported >= CHUNK:
                    self._reported = position
                    self.progress(position)

    def _entry(self, member: tarfile.TarInfo) -> None:
        rootfs = self.rootfs
        name = clean_path(member.name)
        if name is None:
            rootfs._skip(self.digest, member.name, "the path leaves the image root", escapes=True)
            return
        if not name:
            return  # the root itself
        parent, _, base = name.rpartition("/")
        if base == OPAQUE:
            self._opaque(parent)
            return
        if base.startswith(WHITEOUT):
            self._whiteout(f"{parent}/{base[len(WHITEOUT) :]}" if parent else base[len(WHITEOUT) :])
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            rootfs._skip(self.digest, member.name, "devices and FIFOs are not created")
            return
        real_parent = rootfs.resolve(parent, create=True, directory=True) if parent else ""
        if real_parent is None:
            rootfs._skip(self.digest, member.name, "its directory cannot be resolved (link loop)")
            return
        rel = f"{real_parent}/{base}" if real_parent else base
        path = rootfs.path(rel)
        try:
            existing = os.lstat(path).st_mode
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing):
                rootfs._remove(rel)
                existing = None
            if existing is None:
                os.mkdir(path, 0o755)
            self._wrote(rel)
            return
        if existing is not None:
            rootfs._remove(rel)
        if member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            if not self._hardlink(member, path):
                return
        else:
            self._file(member, rel, path)
        rootfs.origin[rel] = self.digest
        self._wrote(rel)

    def _wrote(self, rel: str) -> None:
        while rel and rel not in self.written:
            self.written.add(rel)
            rel = rel.rpartition("/")[0]

    def _file(self, member: tarfile.TarInfo, rel: str, path: Path) -> None:
        limits = self.limits
        if member.size > limits.max_file_bytes:
            raise too_large(
                f"{rel} in layer {self.digest} ({member.size} bytes)", limits.max_file_bytes
            )
        if self.rootfs.unpacked_bytes + member.size > limits.max_unpacked_bytes:
            raise too_large("the unpacked image", limits.max_unpacked_bytes)
        mode = 0o755 if member.mode & 0o111 else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, mode)
        with os.fdopen(fd, "wb") as out:
            source = self.tar.extractfile(member)
            if source is None:
                return
            remaining = member.size
            while remaining > 0:
                self.token.check()
                data = source.read(min(CHUNK, remaining))
                if not data:
                    raise ScanFailure(f"layer {self.digest} ends inside {member.name}")
                out.write(data)
                remaining -= len(data)
        self.rootfs.unpacked_bytes += member.size

    def _hardlink(self, member: tarfile.TarInfo, path: Path) -> bool:
        rootfs = self.rootfs
        target = clean_path(member.linkname)
        real = rootfs.resolve(target, follow_final=False) if target else None
        if not real:
            rootfs._skip(
                self.digest,
                member.name,
                f"hard link to {member.linkname!r} leaves the root",
                escapes=True,
            )
            return False
        source = rootfs.path(real)
        try:
            mode = os.lstat(source).st_mode
        except FileNotFoundError:
            rootfs._skip(self.digest, member.name, f"hard link to missing {member.linkname!r}")
            return False
        if stat.S_ISDIR(mode):
            rootfs._skip(self.digest, member.name, "hard link to a directory")
            return False
        os.link(source, path, follow_symlinks=False)
        return True

    def _whiteout(self, name: str) -> None:
        rootfs = self.rootfs
        parent, _, base = name.rpartition("/")
        real_parent = rootfs.resolve(parent) if parent else ""
        if real_parent is None or base in ("", ".", ".."):
            return
        rel = f"{real_parent}/{base}" if real_parent else base
        if rel not in self.written:
            rootfs._remove(rel)

    def _opaque(self, directory: str) -> None:
        rootfs = self.rootfs
        real = rootfs.resolve(directory) if directory else ""
        if real is None:
            return
        self._clear_lower(real)

    def _clear_lower(self, rel_dir: str) -> None:
        """Remove what lower layers put in ``rel_dir``, keeping this layer's entries."""
        path = self.rootfs.path(rel_dir)
        try:
            names = os.listdir(path)
        except (NotADirectoryError, FileNotFoundError):
            return
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel not in self.written:
                self.rootfs._remove(rel)
            elif os.path.isdir(self.rootfs.path(rel)) and not os.path.islink(self.rootfs.path(rel)):
                self._clear_lower(rel)
