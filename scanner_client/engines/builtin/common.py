"""What the builtin engine's parts share: cancellation, limits and the failures they raise."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from imagehandler.v1 import common_pb2
from scanner_client.engine import ScanFailure

MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB

SEVERITIES: Final[dict[str, common_pb2.Severity.ValueType]] = {
    "NEGLIGIBLE": common_pb2.SEVERITY_NEGLIGIBLE,
    "LOW": common_pb2.SEVERITY_LOW,
    "MODERATE": common_pb2.SEVERITY_MEDIUM,
    "MEDIUM": common_pb2.SEVERITY_MEDIUM,
    "HIGH": common_pb2.SEVERITY_HIGH,
    "CRITICAL": common_pb2.SEVERITY_CRITICAL,
    "UNKNOWN": common_pb2.SEVERITY_UNSPECIFIED,
}


class Cancelled(Exception):
    """The scan was cancelled; raised inside worker threads at the next check."""


class CancelToken:
    """Set from the event loop when a scan is cancelled; worker threads call :meth:`check`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("scan cancelled")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one scan may pull and unpack (a hostile image must not fill the disk)."""

    # Compressed size of one layer blob, and of all blobs of an image.
    max_layer_bytes: int = 8 * GIB
    max_image_bytes: int = 32 * GIB
    # Unpacked: one file, all files of an image, and the number of entries.
    max_file_bytes: int = 8 * GIB
    max_unpacked_bytes: int = 64 * GIB
    max_entries: int = 2_000_000
    # Manifests, configs and package metadata files are read whole: keep them small.
    max_document_bytes: int = 16 * MIB
    # Files larger than this are not matched against malware and secret rules.
    max_match_bytes: int = 256 * MIB

    def check(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"limit {name} must be a positive number of bytes, got {value!r}")


def too_large(what: str, limit: int) -> ScanFailure:
    """A permanent failure: the object is past a limit; running it again cannot help."""
    return ScanFailure(f"{what} is past the limit of {limit} bytes", permanent=True)


def excerpt(text: str, limit: int = 2000) -> str:
    """The end of ``text`` (where errors usually are), at most ``limit`` characters."""
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]
