"""Record framing for journal and snapshot files: length, CRC-32 and payload.

A frame is ``<u32 length><u32 crc32(body)><body>`` (little endian), where the body is a
format byte (1) and the payload, so no frame is empty: a zero-filled stretch never reads as one.
Reading tells a torn tail (the last frame is short or fails its checksum and nothing follows
it: a write cut by a crash) from corruption (a bad frame with more data after it), because only
the first may be cut off safely.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

HEADER = struct.Struct("<II")
MAX_FRAME = 64 * 1024 * 1024


FORMAT = b"\x01"


def frame(payload: bytes) -> bytes:
    body = FORMAT + payload
    return HEADER.pack(len(body), zlib.crc32(body)) + body


@dataclass(frozen=True)
class Damage:
    """Where a file stops being readable."""

    path: Path
    offset: int
    reason: str
    torn_tail: bool  # True: only the tail is bad and may be cut off

    def describe(self) -> str:
        kind = "torn tail" if self.torn_tail else "corrupt record"
        return f"{self.path} at byte {self.offset}: {kind} ({self.reason})"


@dataclass(frozen=True)
class Frames:
    payloads: list[bytes]
    good_end: int  # offset just after the last good frame
    damage: Damage | None


def _check(data: bytes, offset: int) -> tuple[int, str]:
    """(length of the frame at offset, "") or (0, why it is bad)."""
    if len(data) - offset < HEADER.size:
        return 0, "incomplete frame header"
    length, crc = HEADER.unpack_from(data, offset)
    if length == 0:
        # Never written: a zero-filled stretch (as a crash can leave) must not read as frames.
        return 0, "empty frame"
    if length > MAX_FRAME:
        return 0, f"frame length {length} is over the limit"
    end = offset + HEADER.size + length
    if end > len(data):
        return 0, f"frame of {length} bytes runs past the end of the file"
    if zlib.crc32(data[offset + HEADER.size : end]) != crc:
        return 0, "checksum mismatch"
    if data[offset + HEADER.size : offset + HEADER.size + 1] != FORMAT:
        return 0, "unknown record format"
    return HEADER.size + length, ""


def read_frames(path: Path, data: bytes, start: int = 0) -> Frames:
    payloads: list[bytes] = []
    offset = start
    while offset < len(data):
        size, problem = _check(data, offset)
        if problem:
            return Frames(payloads, offset, Damage(path, offset, problem, _is_tail(data, offset)))
        payloads.append(data[offset + HEADER.size + len(FORMAT) : offset + size])
        offset += size
    return Frames(payloads, offset, None)


def _is_tail(data: bytes, offset: int) -> bool:
    """A bad frame is a torn tail when no good frame can be found after it."""
    return next(_resync(data, offset + 1), None) is None


def _resync(data: bytes, start: int) -> Iterator[int]:
    """Offsets after ``start`` where a whole, valid frame begins."""
    for offset in range(start, max(start, len(data) - HEADER.size + 1)):
        _size, problem = _check(data, offset)
        if not problem:
            yield offset


def salvage_frames(path: Path, data: bytes) -> tuple[list[bytes], list[Damage]]:
    """Every readable frame, skipping damaged stretches; what was skipped."""
    payloads: list[bytes] = []
    damages: list[Damage] = []
    offset = 0
    while offset < len(data):
        frames = read_frames(path, data, offset)
        payloads.extend(frames.payloads)
        if frames.damage is None:
            break
        damages.append(frames.damage)
        offset = next(_resync(data, frames.good_end + 1), len(data))
    return payloads, damages


class FrameStream:
    """The frames of a file from ``start``, read one after another through a buffer: memory for
    one frame at a time, not the file's size. Iterating stops at the end or at the first bad
    frame; then ``damage`` says where and why (a torn tail or corruption, told apart as
    :func:`read_frames` does, from the rest of the file), and ``good_end`` is the offset just
    after the last good frame."""

    BUFFER = 1 << 20

    def __init__(self, path: Path, handle: BinaryIO, start: int = 0) -> None:
        self.path = path
        self._handle = handle
        self.good_end = start
        self.damage: Damage | None = None

    def __iter__(self) -> Iterator[bytes]:
        read = self._handle.read
        crc32 = zlib.crc32
        unpack = HEADER.unpack
        offset = self.good_end
        while True:
            head = read(HEADER.size)
            if not head:
                return
            if len(head) == HEADER.size:
                length, crc = unpack(head)
                if 0 < length <= MAX_FRAME:
                    body = read(length)
                    if len(body) == length and crc32(body) == crc and body[:1] == FORMAT:
                        offset += HEADER.size + length
                        self.good_end = offset
                        yield body[1:]
                        continue
            # Something is wrong here: judge it as read_frames does, on the rest of the file.
            self._handle.seek(offset)
            rest = self._handle.read()
            _size, problem = _check(rest, 0)
            problem = problem or "unreadable frame"
            self.damage = Damage(self.path, offset, problem, _is_tail(rest, 0))
            return


def open_frames(path: Path) -> BinaryIO:
    """A file opened for :class:`FrameStream` (a large buffer: few system calls)."""
    return open(path, "rb", buffering=FrameStream.BUFFER)
