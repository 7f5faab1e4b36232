"""What every store that writes files needs to make them survive a power loss.

Kept apart from the embedded store's package so that a module outside it (the result files the
memory store also uses) does not import that package, which imports the memory store back.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
