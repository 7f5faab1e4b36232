"""Filesystem roots: the directories a job's paths may name on a scanner.

An artifact's ``path`` must lie under one of ``--artifact-roots`` and a node job's
``root_path`` under one of ``--node-roots``; with none configured, no such job is taken. The
handler checks the path as written (absolute, no ``..``, under a root); a scanner checks it
again after resolving every symbolic link on its own filesystem, so a link inside an allowed
root that points out of it is refused too.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from imagehandler.jobpolicy.refusal import Refused


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


@dataclass(frozen=True)
class Roots:
    """The roots of one kind of path: ``flag`` names the setting, also the rule."""

    flag: str
    paths: tuple[str, ...] = ()

    @classmethod
    def parse(cls, flag: str, values: str | Iterable[str]) -> Roots:
        items = values.split(",") if isinstance(values, str) else values
        found = []
        for item in (i.strip() for i in items):
            if not item:
                continue
            if not item.startswith("/") or "\x00" in item:
                raise ValueError(f"{flag}: {item!r} is not an absolute path")
            found.append(posixpath.normpath(item) if item != "/" else "/")
        return cls(flag, tuple(found))

    @property
    def rule(self) -> str:
        return self.flag.removeprefix("--")

    def _refuse(self, field: str, path: str, why: str) -> Refused:
        if not self.paths:
            return Refused(
                self.rule,
                f"{field} {path[:200]!r}: no {self.flag} are configured, so no "
                f"{_what(self.flag)} is taken",
                f"an operator can allow a directory with {self.flag}",
            )
        return Refused(
            self.rule,
            f"{field} {path[:200]!r} {why} (allowed: {', '.join(self.paths)})",
            f"an operator can allow another directory with {self.flag}",
        )

    def check(self, path: str, field: str) -> str:
        """The path as written: absolute, without ``..``, under a root. Returns it
        normalised."""
        if not path.startswith("/") or "\x00" in path:
            raise Refused(self.rule, f"{field} {path[:200]!r} must be an absolute path")
        if ".." in path.split("/"):
            raise Refused(self.rule, f"{field} {path[:200]!r} must not contain '..'")
        normal = posixpath.normpath(path)
        if normal.startswith("//"):
            normal = "/" + normal.lstrip("/")
        if not any(_under(normal, root) for root in self.paths):
            raise self._refuse(field, path, "is not under an allowed root")
        return normal

    def check_resolved(
        self, path: str, resolved: str, resolved_roots: Iterable[str], field: str
    ) -> None:
        """``resolved`` (the path with every link resolved on this machine) must lie under one
        of ``resolved_roots`` (the roots resolved the same way)."""
        if not any(_under(resolved, root) for root in resolved_roots):
            raise self._refuse(
                field,
                path,
                f"resolves to {resolved[:200]!r}, which is not under an allowed root "
                "(a symbolic link leads out of it)",
            )


def _what(flag: str) -> str:
    return "node job" if "node" in flag else "artifact path"


__all__ = ["Roots"]
