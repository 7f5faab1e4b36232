"""Large results live in files under ``<data-dir>/results/``, not in RAM or the journal."""

from __future__ import annotations

import os
from pathlib import Path

from server.storage.disk import fsync_directory


class ResultFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory / "results"

    def _path(self, job_id: str) -> Path:
        return self.directory / job_id[:2] / f"{job_id}.pb"

    def write(self, job_id: str, payload: bytes) -> None:
        """Atomically (temporary file, fsync, rename); call from a worker thread."""
        path = self._path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)

    def read(self, job_id: str) -> bytes | None:
        try:
            return self._path(job_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)


class MemoryResultFiles(ResultFiles):
    """For the memory store: the same interface, kept in a dict."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}

    def write(self, job_id: str, payload: bytes) -> None:
        self._files[job_id] = payload

    def read(self, job_id: str) -> bytes | None:
        return self._files.get(job_id)

    def delete(self, job_id: str) -> None:
        self._files.pop(job_id, None)
