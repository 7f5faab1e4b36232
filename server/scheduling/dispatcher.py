"""The ring of Free scanners.

Free sessions stand in a ring; a dispatch pass offers work to them in ring order and moves each
one that took a job to the back, so Free scanners share the work fairly. Which jobs go where is
the job repository's ``claim``; this is only the order in which scanners ask.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice
from typing import Generic, Protocol, TypeVar


class Member(Protocol):
    @property
    def session_id(self) -> str: ...

    @property
    def is_free(self) -> bool: ...


M = TypeVar("M", bound=Member)


class FreeRing(Generic[M]):
    def __init__(self) -> None:
        self._free: OrderedDict[str, M] = OrderedDict()

    def refresh(self, member: M) -> None:
        """Call after anything that may change whether a member is Free."""
        if member.is_free:
            self._free.setdefault(member.session_id, member)
        else:
            self._free.pop(member.session_id, None)

    def __len__(self) -> int:
        return len(self._free)

    def members(self, start: int = 0, count: int | None = None) -> list[M]:
        """The Free members, the one to ask first first; ``start``/``count`` take a slice of
        them without building the whole list."""
        stop = None if count is None else start + count
        return list(islice(self._free.values(), start, stop))

    def took(self, member: M) -> None:
        """The member was handed a job: to the back of the ring (if still Free)."""
        if member.session_id in self._free:
            self._free.move_to_end(member.session_id)
        self.refresh(member)
