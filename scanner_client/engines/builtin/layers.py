"""Image layers, streamed: the final filesystem of an image as an index, with no file written.

A layer is a tar stream (plain, gzip or zstd). The layers of an image are read in order, each
once, straight from its blob; :class:`ImageTree` keeps one :class:`Node` a path (directory,
file or link, and the layer that last wrote it), applying each layer on top of the ones before
as a container runtime would:

- **Whiteouts** (OCI image spec): ``.wh.NAME`` removes ``NAME`` of lower layers, and
  ``.wh..wh..opq`` empties its directory of what lower layers put there.
- **Containment**: every path is resolved inside the image the way a ``chroot`` would:
  ``..`` stops at the root, and a symbolic link met on the way (absolute or relative) is
  followed *within* the image. An entry whose own name climbs out of the root
  (``../../etc/passwd``), or a hard link to outside it, is not taken and is reported. Devices
  and FIFOs are not taken. Nothing reaches the scanner's own file system: nothing is written.
- **Limits** (:class:`~scanner_client.engines.builtin.common.Limits`): the size of one file,
  of all files, and the number of entries. Past one, the scan fails for good.

File contents pass through once, as the layer streams: a :class:`FileHandler` says which files
it wants to read (and which to keep in memory: the package databases), and finds each file's
facts (packages, malware, secrets) on the spot. A file that a later layer removes or replaces
takes its facts with it.

A layer applied from its blob can be **recorded** (:class:`LayerRecord`: each entry's name,
type, size, mode and link, and for the files the handler read their facts and kept bytes), and
a record **replayed** later through the same code in place of the blob (the layer cache,
:mod:`scanner_client.engines.builtin.layer_cache`): whiteouts, opaque directories, links,
containment and limits then apply exactly as they did when the blob was read.
"""

from __future__ import annotations

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
# Longer paths are not kept (Linux's PATH_MAX).
MAX_PATH: Final = 4096

GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Skipped:
    """A layer entry that was not taken into the image's tree, and why."""

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


DIR: Final = "dir"
FILE: Final = "file"
LINK: Final = "link"


class Node:
    """One path of the image: a directory, a regular file or a symbolic link."""

    __slots__ = ("data", "facts", "kind", "layer", "mode", "size", "target")

    def __init__(
        self,
        kind: str,
        layer: str,
        *,
        size: int = 0,
        mode: int = 0,
        target: str = "",
        facts: Any = None,
        data: bytes | None = None,
    ) -> None:
        self.kind = kind
        self.layer = layer
        self.size = size
        self.mode = mode
        self.target = target  # a link's target, as written in the layer
        self.facts = facts  # what the handler found in the file
        self.data = data  # the file's bytes, for the files the handler keeps


# A recorded entry's type (a tar member's, for what the tree does with it).
ENTRY_DIR: Final = "d"
ENTRY_FILE: Final = "f"
ENTRY_SYMLINK: Final = "s"
ENTRY_HARDLINK: Final = "h"
ENTRY_OTHER: Final = "o"  # devices and FIFOs: not taken


class Entry:
    """One layer entry as recorded: what :class:`_Layer` reads of a tar member, and for a
    regular file the handler read, its facts (``read``) and kept bytes."""

    __slots__ = ("data", "facts", "linkname", "mode", "name", "read", "size", "type")

    def __init__(
        self,
        type: str,
        name: str,
        *,
        size: int = 0,
        mode: int = 0,
        linkname: str = "",
        read: bool = False,
        facts: Any = None,
        data: bytes | None = None,
    ) -> None:
        self.type = type
        self.name = name
        self.size = size
        self.mode = mode
        self.linkname = linkname
        self.read = read
        self.facts = facts
        self.data = data

    # The tar member interface _Layer uses.
    def isreg(self) -> bool:
        return self.type == ENTRY_FILE

    def isdir(self) -> bool:
        return self.type == ENTRY_DIR

    def issym(self) -> bool:
        return self.type == ENTRY_SYMLINK

    def islnk(self) -> bool:
        return self.type == ENTRY_HARDLINK

    @classmethod
    def of(cls, member: tarfile.TarInfo) -> Entry:
        if member.isreg():
            kind = ENTRY_FILE
        elif member.isdir():
            kind = ENTRY_DIR
        elif member.issym():
            kind = ENTRY_SYMLINK
        elif member.islnk():
            kind = ENTRY_HARDLINK
        else:
            kind = ENTRY_OTHER
        return cls(kind, member.name, size=member.size, mode=member.mode, linkname=member.linkname)


@dataclass
class LayerRecord:
    """A layer's entries in tar order, enough to apply it again without its blob."""

    entries: list[Entry] = field(default_factory=list)


class StaleRecord(Exception):
    """A replayed record does not fit the tree below it (the handler now wants a file the
    record did not read): the layer must be read from its blob."""


class FileHandler(Protocol):
    """What an :class:`ImageTree` asks about each regular file as it streams past."""

    def wants(self, rel: str, size: int, mode: int) -> int:
        """1 to read the file (then :meth:`analyse` sees it), | 2 to keep its bytes."""
        ...

    def analyse(self, rel: str, data: bytes) -> Any:
        """The file's facts (kept on its node)."""
        ...


READ: Final = 1
RETAIN: Final = 2


@dataclass
class ImageTree:
    """The final filesystem of an image's layers: paths relative to the root, each a real path
    (no link among its parents)."""

    limits: Limits = field(default_factory=Limits)
    nodes: dict[str, Node] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    unpacked_bytes: int = 0
    entries: int = 0
    # Kept files that the last layer applied wrote or removed.
    changed: set[str] = field(default_factory=set)
    # Directory -> the names in it (insertion order).
    _children: dict[str, dict[str, None]] = field(default_factory=lambda: {"": {}})

    # ---- reading ------------------------------------------------------------------------

    def resolve(
        self,
        rel: str,
        *,
        follow_final: bool = True,
        directory: bool = False,
        create: str | None = None,
    ) -> str | None:
        """``rel`` as a real path of the image, links followed inside it.

        The final component is a link itself when ``follow_final`` is false; a missing final
        component is fine. A missing parent is made a directory of layer ``create`` (a
        non-directory in the way is replaced), else the answer is None. With ``directory`` the
        final component is a parent too. None also for a loop of links.
        """
        pending = [part for part in rel.split("/") if part not in ("", ".")]
        pending.reverse()  # pop() takes the next component
        done: list[str] = []
        hops = 0
        nodes = self.nodes
        while pending:
            part = pending.pop()
            if part == "..":
                if done:
                    done.pop()
                continue
            last = not pending and not directory
            here = f"{'/'.join(done)}/{part}" if done else part
            node = nodes.get(here)
            if node is None:
                if last:
                    done.append(part)
                    break
                if create is None:
                    return None
                self._put(here, Node(DIR, create))
            elif node.kind == LINK and (follow_final or not last):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    return None
                if node.target.startswith("/"):
                    done = []
                pending.extend(reversed([p for p in node.target.split("/") if p not in ("", ".")]))
                continue
            elif not last and node.kind != DIR:
                if create is None:
                    return None
                self._remove(here)
                self._put(here, Node(DIR, create))
            done.append(part)
        return "/".join(done)

    def node(self, rel: str) -> Node | None:
        real = self.resolve(rel)
        return self.nodes.get(real) if real else None

    def read(self, rel: str, limit: int | None = None) -> bytes | None:
        """The bytes of a kept file (links followed inside the image), or None."""
        node = self.node(rel)
        if node is None or node.kind != FILE or node.data is None:
            return None
        return node.data if limit is None else node.data[:limit]

    def listdir(self, rel: str) -> list[str]:
        real = self.resolve(rel, directory=True)
        if real is None:
            return []
        return list(self._children.get(real, ()))

    def link_target(self, rel: str) -> str | None:
        real = self.resolve(rel, follow_final=False)
        node = self.nodes.get(real) if real else None
        return node.target if node is not None and node.kind == LINK else None

    def origin(self, rel: str) -> str:
        """The digest of the layer that last wrote ``rel`` ("" when it is not there)."""
        node = self.nodes.get(rel)
        return node.layer if node is not None else ""

    def files(self) -> Iterator[tuple[str, Node]]:
        """Every regular file of the image, in no particular order."""
        for rel, node in self.nodes.items():
            if node.kind == FILE:
                yield rel, node

    # ---- changes ----------------------------------------------------------------------------

    def _put(self, rel: str, node: Node) -> None:
        self.nodes[rel] = node
        parent, _, base = rel.rpartition("/")
        self._children.setdefault(parent, {})[base] = None
        if node.kind == DIR:
            self._children.setdefault(rel, {})
        elif node.data is not None:
            self.changed.add(rel)

    def _remove(self, rel: str) -> None:
        """Remove ``rel`` (not followed) and everything under it."""
        node = self.nodes.pop(rel, None)
        if node is None:
            return
        parent, _, base = rel.rpartition("/")
        self._children.get(parent, {}).pop(base, None)
        if node.data is not None:
            self.changed.add(rel)
        if node.kind == DIR:
            for name in list(self._children.pop(rel, ())):
                self._remove(f"{rel}/{name}" if rel else name)

    def skip(self, layer: str, name: str, reason: str, escapes: bool = False) -> None:
        self.skipped.append(Skipped(layer, name, reason, escapes))

    def apply(
        self,
        blob: Path,
        layer: str,
        token: CancelToken,
        handler: FileHandler,
        progress: Callable[[int], None] | None = None,
        record: LayerRecord | None = None,
    ) -> None:
        """Apply the layer blob at ``blob`` (its digest ``layer``) on top of the tree.

        ``progress`` gets the compressed bytes read so far, about once per MiB. With
        ``record``, every entry is also recorded there (for :meth:`replay`).
        """
        self.changed = set()
        with open(blob, "rb") as raw:
            stream = open_layer(raw)
            # A plain tar is read in place (seeking past the files nobody reads); a compressed
            # one as a stream, each byte decompressed once.
            mode = "r:" if stream is raw else "r|"
            try:
                with tarfile.open(fileobj=stream, mode=mode) as tar:  # type: ignore[call-overload]
                    _Layer(self, layer, tar, token, raw, handler, progress, record).run()
            except tarfile.TarError as exc:
                raise ScanFailure(f"layer {layer} is not a valid tar stream: {exc}") from None
            except (zlib.error, ValueError, EOFError) as exc:
                raise ScanFailure(f"layer {layer} cannot be decompressed: {exc}") from None

    def replay(
        self, record: LayerRecord, layer: str, token: CancelToken, handler: FileHandler
    ) -> None:
        """Apply a recorded layer (its digest ``layer``) on top of the tree, as :meth:`apply`
        applied it from its blob. :class:`StaleRecord` when the handler wants a file the record
        did not read (the tree may then be partly changed: start again)."""
        self.changed = set()
        _Layer(self, layer, None, token, None, handler, None, None).replay(record)


class _Layer:
    """One layer being applied."""

    def __init__(
        self,
        tree: ImageTree,
        digest: str,
        tar: tarfile.TarFile | None,
        token: CancelToken,
        raw: IO[bytes] | None,
        handler: FileHandler,
        progress: Callable[[int], None] | None,
        record: LayerRecord | None,
    ) -> None:
        self.tree = tree
        self.limits = tree.limits
        self.digest = digest
        self.tar = tar
        self.token = token
        self.raw = raw
        self.handler = handler
        self.progress = progress
        self.record = record
        # Paths this layer wrote, and their directories: whiteouts spare them.
        self.written: set[str] = set()
        self._reported = 0

    def run(self) -> None:
        assert self.tar is not None
        assert self.raw is not None
        members: list[tarfile.TarInfo] = self.tar.members  # type: ignore[attr-defined]
        recorded = self.record.entries if self.record is not None else None
        for member in self.tar:
            # tarfile keeps every header it read: dropped, so memory follows the tree alone.
            members.clear()
            self._count()
            entry = Entry.of(member)
            self._entry(entry, member)
            if recorded is not None:
                recorded.append(entry)
            if self.progress is not None:
                position = self.raw.tell()
                if position - self._reported >= CHUNK:
                    self._reported = position
                    self.progress(position)

    def replay(self, record: LayerRecord) -> None:
        for entry in record.entries:
            self._count()
            self._entry(entry, None)

    def _count(self) -> None:
        tree = self.tree
        self.token.check()
        tree.entries += 1
        if tree.entries > self.limits.max_entries:
            raise ScanFailure(
                f"the image has more than {self.limits.max_entries} entries", permanent=True
            )

    def _entry(self, member: Entry, tar_member: tarfile.TarInfo | None) -> None:
        tree = self.tree
        name = clean_path(member.name)
        if name is None:
            tree.skip(self.digest, member.name, "the path leaves the image root", escapes=True)
            return
        if not name:
            return  # the root itself
        if len(name) > MAX_PATH:
            tree.skip(self.digest, member.name[:200] + "...", "the path is too long")
            return
        parent, _, base = name.rpartition("/")
        if base == OPAQUE:
            self._opaque(parent)
            return
        if base.startswith(WHITEOUT):
            self._whiteout(f"{parent}/{base[len(WHITEOUT) :]}" if parent else base[len(WHITEOUT) :])
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            tree.skip(self.digest, member.name, "devices and FIFOs are not taken")
            return
        parent_node = tree.nodes.get(parent) if parent else None
        if parent and (parent_node is None or parent_node.kind != DIR):
            # Not a plain directory yet: resolve it (links, missing directories).
            real_parent = tree.resolve(parent, create=self.digest, directory=True)
            if real_parent is None:
                tree.skip(self.digest, member.name, "its directory cannot be resolved (link loop)")
                return
            parent = real_parent
        rel = f"{parent}/{base}" if parent else base
        existing = tree.nodes.get(rel)
        if member.isdir():
            if existing is not None and existing.kind != DIR:
                tree._remove(rel)
                existing = None
            if existing is None:
                tree._put(rel, Node(DIR, self.digest))
            else:
                existing.layer = self.digest
            self._wrote(rel)
            return
        if member.issym():
            node = Node(LINK, self.digest, target=member.linkname)
        elif member.islnk():
            linked = self._hardlink(member, rel)
            if linked is None:
                return
            node = linked
        else:
            node = self._file(member, tar_member, rel)
        if existing is not None:
            tree._remove(rel)
        tree._put(rel, node)
        self._wrote(rel)

    def _wrote(self, rel: str) -> None:
        while rel and rel not in self.written:
            self.written.add(rel)
            rel = rel.rpartition("/")[0]

    def _file(self, member: Entry, tar_member: tarfile.TarInfo | None, rel: str) -> Node:
        limits, tree = self.limits, self.tree
        if member.size > limits.max_file_bytes:
            raise too_large(
                f"{rel} in layer {self.digest} ({member.size} bytes)", limits.max_file_bytes
            )
        if tree.unpacked_bytes + member.size > limits.max_unpacked_bytes:
            raise too_large("the unpacked image", limits.max_unpacked_bytes)
        tree.unpacked_bytes += member.size
        node = Node(FILE, self.digest, size=member.size, mode=member.mode)
        flags = self.handler.wants(rel, member.size, member.mode)
        if not flags & READ:
            return node
        if tar_member is None:  # replayed: the facts and bytes as recorded
            if not member.read or (flags & RETAIN and member.data is None):
                raise StaleRecord(f"{rel} of layer {self.digest} was not read when recorded")
            node.facts = member.facts
            node.data = member.data if flags & RETAIN else None
            return node
        assert self.tar is not None
        source = self.tar.extractfile(tar_member)
        data = source.read() if source is not None else b""
        if len(data) != member.size:
            raise ScanFailure(f"layer {self.digest} ends inside {member.name}")
        node.facts = self.handler.analyse(rel, data)
        member.read = True
        member.facts = node.facts
        if flags & RETAIN:
            node.data = data
            member.data = data
        return node

    def _hardlink(self, member: Entry, rel: str) -> Node | None:
        tree = self.tree
        target = clean_path(member.linkname)
        real = tree.resolve(target, follow_final=False) if target else None
        if not real:
            tree.skip(
                self.digest,
                member.name,
                f"hard link to {member.linkname!r} leaves the root",
                escapes=True,
            )
            return None
        source = tree.nodes.get(real)
        if source is None:
            tree.skip(self.digest, member.name, f"hard link to missing {member.linkname!r}")
            return None
        if source.kind == DIR:
            tree.skip(self.digest, member.name, "hard link to a directory")
            return None
        facts = source.facts
        relocate = getattr(facts, "relocated", None)
        return Node(
            source.kind,
            self.digest,
            size=source.size,
            mode=source.mode,
            target=source.target,
            facts=relocate(real, rel) if relocate is not None else facts,
            data=source.data,
        )

    def _whiteout(self, name: str) -> None:
        tree = self.tree
        parent, _, base = name.rpartition("/")
        real_parent = tree.resolve(parent, directory=True) if parent else ""
        if real_parent is None or base in ("", ".", ".."):
            return
        rel = f"{real_parent}/{base}" if real_parent else base
        if rel not in self.written:
            tree._remove(rel)

    def _opaque(self, directory: str) -> None:
        real = self.tree.resolve(directory, directory=True) if directory else ""
        if real is None:
            return
        self._clear_lower(real)

    def _clear_lower(self, rel_dir: str) -> None:
        """Remove what lower layers put in ``rel_dir``, keeping this layer's entries."""
        tree = self.tree
        for name in list(tree._children.get(rel_dir, ())):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel not in self.written:
                tree._remove(rel)
            elif (node := tree.nodes.get(rel)) is not None and node.kind == DIR:
                self._clear_lower(rel)
