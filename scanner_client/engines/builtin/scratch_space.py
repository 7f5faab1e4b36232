"""The builtin engine's scratch directory: checked when the scanner starts, and again when a scan
fails, so that a scanner whose disk went away stops instead of failing every job it is given.

A scratch directory is usable when it is a directory, a file can be created in it, and its file
system has at least ``--min-free-scratch`` MiB free (room for one image's layers to start).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Final

MIB: Final = 1 << 20
# The default of --min-free-scratch: a small image's layers and their unpacked files.
DEFAULT_MIN_FREE_MIB: Final = 256


def default_root() -> Path:
    """Where scans unpack without --scratch-dir: the system's temporary directory."""
    return Path(tempfile.gettempdir())


def problem(root: Path, min_free: int) -> str | None:
    """What keeps scans from using ``root`` (with what to do), or None when they can."""
    try:
        if not root.is_dir():
            return (
                "is not a directory"
                if root.exists()
                else "does not exist (it was removed, or its volume is not mounted)"
            )
        with tempfile.TemporaryFile(prefix=".image-scanner-check-", dir=root):
            pass
    except OSError as exc:
        return f"is not writable: {exc.strerror or exc}"
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return f"has no readable free space: {exc.strerror or exc}"
    if free < min_free:
        return (
            f"has {free // MIB} MiB free, less than --min-free-scratch {min_free // MIB} MiB: "
            "free space there, or give a lower --min-free-scratch"
        )
    return None


def prepare(root: Path, min_free: int) -> None:
    """Create ``root`` if needed and check it; ``ValueError`` naming the flag when unusable."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file of that name: problem() says so
    except OSError as exc:
        raise ValueError(
            f"--scratch-dir {root} cannot be created: {exc.strerror or exc}; give a writable "
            "directory"
        ) from None
    found = problem(root, min_free)
    if found is not None:
        raise ValueError(f"--scratch-dir {root} {found}")
