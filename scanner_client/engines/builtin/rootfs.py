"""A directory read as a root filesystem: a node's root, a directory artifact.

Every path is resolved inside the root the way a ``chroot`` would: ``..`` stops at the root,
and a symbolic link met on the way (absolute or relative) is followed *within* the root, so
that a link to ``/etc`` reads the root's ``etc``, never the scanner host's. Files are opened
with ``O_NOFOLLOW`` after that resolution. Nothing is ever written.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from scanner_client.engines.builtin.common import CancelToken, Limits

# Symbolic links followed while resolving one path (Linux's own limit).
MAX_LINK_HOPS: Final = 40


@dataclass
class Rootfs:
    """A directory read as a root filesystem (a node's root, a directory artifact)."""

    root: Path
    limits: Limits = field(default_factory=Limits)
    # Relative paths known to be real directories (not links).
    _dirs: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(os.path.realpath(self.root))

    def origin(self, rel: str) -> str:
        """The layer a file came from: none, outside images."""
        return ""

    # ---- resolution inside the root -----------------------------------------------------

    def resolve(
        self,
        rel: str,
        *,
        follow_final: bool = True,
        directory: bool = False,
    ) -> str | None:
        """``rel`` as a real path relative to the root, links followed inside the root (as a
        ``chroot`` would: ``..`` stops at the root, absolute links start from it).

        The parents of the result are real directories under the root; the final component is
        a link itself when ``follow_final`` is false. A missing final component is fine; a
        missing parent gives None. With ``directory`` the final component is a parent too.
        None also for a loop of links.
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
                return None
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
                    return None
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
