"""The one catalogue of handler errors, as data: code, text, retryable, and the reasons each
code may be given for.

Every error a client, scanner or operator sees is ``HNDL-0NN: text[: detail]``. Code raises
:class:`HandlerError` with a catalogue entry, a detail and, where the entry allows more than
one, a domain :class:`Reason`. This module imports no grpc and no protobuf: the core, the
handler's service layer and the clients all use it, and :mod:`imagehandler.rpc` alone maps a
reason to a gRPC status.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(enum.Enum):
    """Why a call failed, in the domain's words (one gRPC status each: :mod:`imagehandler.rpc`)."""

    INVALID = "invalid"  # the request itself is wrong: fixing it is the caller's job
    NOT_FOUND = "not_found"  # an id names nothing (any more)
    FAILED_PRECONDITION = "failed_precondition"  # right request, wrong state or setting
    UNAVAILABLE = "unavailable"  # not now: starting, stopping, a peer is down; try again
    EXHAUSTED = "exhausted"  # a limit or quota is reached
    UNAUTHENTICATED = "unauthenticated"  # no usable credentials
    PERMISSION_DENIED = "permission_denied"  # credentials without the role needed
    DEADLINE = "deadline"  # a run or wait took longer than allowed
    INTERNAL = "internal"  # a defect or a failure the caller cannot act on
    OUT_OF_RANGE = "out_of_range"  # a position (a watch sequence) past what is kept


@dataclass(frozen=True)
class CatalogueEntry:
    code: str
    text: str
    # The first reason is the default; the others are allowed where a call site says which.
    reasons: tuple[Reason, ...]
    # False when running the job again cannot fix it (bad parameters).
    retryable: bool = True

    @property
    def reason(self) -> Reason:
        return self.reasons[0]


class Catalogue(enum.Enum):
    """The HNDL codes. HNDL-002, 009 and 010 are not documented by the original product."""

    MDW_ADAPTER_SEND_STATUS = CatalogueEntry(
        "HNDL-001", "mdw adapter send status", (Reason.UNAVAILABLE,)
    )
    SCANNER_CONFIG_INVALID = CatalogueEntry(
        "HNDL-003",
        "scanner config invalid",
        (Reason.INVALID, Reason.FAILED_PRECONDITION),
        retryable=False,
    )
    SCAN_TIME_OUT = CatalogueEntry("HNDL-004", "scan time out", (Reason.DEADLINE,))
    SCAN_PARAMS_EMPTY = CatalogueEntry(
        "HNDL-005", "scan params empty", (Reason.INVALID,), retryable=False
    )
    SUBPROCESS_FAILED = CatalogueEntry("HNDL-006", "", (Reason.INTERNAL,))
    SYSTEM_ERROR = CatalogueEntry(
        "HNDL-007",
        "",
        (
            Reason.INTERNAL,
            Reason.EXHAUSTED,
            Reason.UNAVAILABLE,
            Reason.UNAUTHENTICATED,
            Reason.PERMISSION_DENIED,
            Reason.OUT_OF_RANGE,
        ),
    )
    JOB_ID_INVALID = CatalogueEntry(
        "HNDL-008",
        "job id empty",
        (Reason.INVALID, Reason.NOT_FOUND, Reason.FAILED_PRECONDITION),
        retryable=False,
    )
    PROXY_URL_INVALID = CatalogueEntry(
        "HNDL-011", "proxy URL invalid", (Reason.INVALID,), retryable=False
    )
    DB_RELEASE_DATE_UNKNOWN = CatalogueEntry(
        "HNDL-012", "last release date of databases is unknown", (Reason.FAILED_PRECONDITION,)
    )
    DB_RELEASE_DATE_INVALID = CatalogueEntry(
        "HNDL-013", "invalid format of databases release date", (Reason.INVALID,)
    )
    SCAN_POLICIES_EMPTY = CatalogueEntry(
        "HNDL-014", "scan policies empty", (Reason.FAILED_PRECONDITION,), retryable=False
    )
    TIMEZONE_UNKNOWN = CatalogueEntry(
        "HNDL-015", "can not get local timezone", (Reason.FAILED_PRECONDITION,)
    )

    @property
    def entry(self) -> CatalogueEntry:
        value: CatalogueEntry = self.value
        return value

    @property
    def code(self) -> str:
        return self.entry.code

    @classmethod
    def by_code(cls, code: str) -> Catalogue | None:
        return _BY_CODE.get(code)


_BY_CODE: dict[str, Catalogue] = {member.code: member for member in Catalogue}


def format_message(code: str, text: str, detail: str) -> str:
    """``HNDL-0NN: text: detail``, leaving out the parts that are empty."""
    return ": ".join(part for part in (code, text, detail) if part)


class HandlerError(Exception):
    """A failure with its catalogue entry and reason; the only exception the transport maps to
    a status."""

    def __init__(
        self,
        kind: Catalogue,
        detail: str = "",
        *,
        reason: Reason | None = None,
        retry_after: float | None = None,
    ) -> None:
        if reason is not None and reason not in kind.entry.reasons:
            raise ValueError(f"{kind.code} cannot be given for reason {reason.name}")
        if retry_after is not None and not retry_after > 0:
            raise ValueError(f"retry_after must be positive seconds, got {retry_after}")
        self.kind = kind
        self.detail = detail
        self.reason = reason or kind.entry.reason
        # Seconds before trying again can succeed (a refusal that time will lift); on the wire
        # a google.rpc.RetryInfo detail, which clients honour before their own backoff.
        self.retry_after = retry_after
        super().__init__(self.message)

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def text(self) -> str:
        return self.kind.entry.text

    @property
    def message(self) -> str:
        return format_message(self.code, self.text, self.detail)

    @property
    def retryable(self) -> bool:
        return self.kind.entry.retryable


__all__ = ["Catalogue", "CatalogueEntry", "HandlerError", "Reason", "format_message"]
