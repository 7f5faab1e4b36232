"""Enum value <-> CLI word conversions, derived from the protobuf enum descriptors.

Every enum of the contract follows the buf STANDARD naming: values carry the enum's name in
UPPER_SNAKE_CASE as a prefix (``JOB_STATUS_IN_PROGRESS``) and value 0 is ``*_UNSPECIFIED``.
The CLI word of a value is the rest of the name, lower case, with hyphens
(``in-progress``); the label shown in tables is the rest of the name as it is
(``IN_PROGRESS``). Parsing accepts either spelling, in any case.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Generic, TypeVar

from imagehandler.v1 import common_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)


def _enum_prefix(enum_name: str) -> str:
    """``JobStatus`` -> ``JOB_STATUS_``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper() + "_"


def normalize_word(text: str) -> str:
    """A CLI word as typed (``IN_PROGRESS``, ``In-Progress``) in its canonical form."""
    return text.strip().lower().replace("_", "-")


class EnumWords(Generic[V]):
    """The CLI words of one protobuf enum, without its UNSPECIFIED value."""

    def __init__(self, wrapper: _EnumTypeWrapper[V]) -> None:
        self._wrapper = wrapper
        self.prefix = _enum_prefix(wrapper.DESCRIPTOR.name)
        self._by_word: dict[str, V] = {}
        for name, value in wrapper.items():
            if value == 0:
                continue
            self._by_word[normalize_word(name.removeprefix(self.prefix))] = value

    @property
    def words(self) -> list[str]:
        """The accepted words, in the enum's declaration order."""
        return list(self._by_word)

    def parse(self, word: str) -> V:
        """The value of a word; KeyError when the word is not one of :attr:`words`."""
        return self._by_word[normalize_word(word)]

    def label(self, value: int) -> str:
        """``IN_PROGRESS``; the number for a value this client does not know; ``-`` for 0."""
        if value == 0:
            return "-"
        try:
            name = self._wrapper.Name(value)  # type: ignore[arg-type]
        except ValueError:
            return str(value)
        return name.removeprefix(self.prefix)

    def word(self, value: int) -> str:
        """``in-progress``; the number for a value this client does not know; ``-`` for 0."""
        label = self.label(value)
        return label if label == "-" or label.isdigit() else normalize_word(label)


JOB_STATUS = EnumWords(common_pb2.JobStatus)
OBJECT_KIND = EnumWords(common_pb2.ObjectKind)
TRIGGER = EnumWords(common_pb2.Trigger)
POLICY = EnumWords(common_pb2.Policy)
LANE = EnumWords(common_pb2.Lane)
SCANNER_STATUS = EnumWords(common_pb2.ScannerStatus)
VERDICT = EnumWords(common_pb2.Verdict)
SEVERITY = EnumWords(common_pb2.Severity)

# Statuses a job never leaves.
TERMINAL_STATUSES = frozenset(
    {
        common_pb2.JOB_STATUS_FINISHED,
        common_pb2.JOB_STATUS_ERROR,
        common_pb2.JOB_STATUS_CANCELLED,
    }
)
