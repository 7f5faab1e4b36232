"""Job ids: random UUIDs (version 4, RFC 9562), made 256 at a time.

``str(uuid.uuid4())`` costs several microseconds (a UUID object, its checks, its formatting) and
a system call per id; here one ``os.urandom`` call serves 256 ids and each is formatted
directly. The ids are the same kind: 122 random bits with the version and variant set.
"""

from __future__ import annotations

import os

_BATCH = 256
# Clear the version nibble (bits 76-79) and the variant's two bits (62-63), then set version 4
# and variant 0b10.
_CLEAR = ~((0xF << 76) | (0x3 << 62))
_SET = (0x4 << 76) | (0x2 << 62)

_pool: list[str] = []


def _make(count: int) -> list[str]:
    raw = os.urandom(16 * count)
    from_bytes = int.from_bytes
    out = []
    for start in range(0, 16 * count, 16):
        h = f"{(from_bytes(raw[start : start + 16]) & _CLEAR) | _SET:032x}"
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def new_job_id() -> str:
    if not _pool:
        _pool.extend(_make(_BATCH))
    return _pool.pop()


def _reset_after_fork() -> None:
    _pool.clear()  # a forked child must not hand out the ids its parent will hand out


os.register_at_fork(after_in_child=_reset_after_fork)
