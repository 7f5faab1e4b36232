"""The one catalogue of handler errors: code, text and the gRPC status each maps to.

Every error a client, scanner or operator sees is ``HNDL-0NN: text[: detail]``. Code raises
:class:`HandlerError` with a catalogue entry and a detail; the transport turns it into a gRPC
status in exactly one place (:mod:`server.transport.status`). This module knows nothing of the
transport beyond the status names, so the queue and dispatcher stay testable without gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from grpc import StatusCode


@dataclass(frozen=True)
class CatalogueEntry:
    code: str
    text: str
    # The first status is the default; the others are allowed where a call site says which.
    statuses: tuple[StatusCode, ...]
    # False when running the job again cannot fix it (bad parameters).
    retryable: bool = True

    @property
    def status(self) -> StatusCode:
        return self.statuses[0]


class Catalogue(enum.Enum):
    """The HNDL codes. HNDL-002, 009 and 010 are not documented by the original product."""

    MDW_ADAPTER_SEND_STATUS = CatalogueEntry(
        "HNDL-001", "mdw adapter send status", (StatusCode.UNAVAILABLE,)
    )
    SCANNER_CONFIG_INVALID = CatalogueEntry(
        "HNDL-003",
        "scanner config invalid",
        (StatusCode.INVALID_ARGUMENT, StatusCode.FAILED_PRECONDITION),
        retryable=False,
    )
    SCAN_TIME_OUT = CatalogueEntry("HNDL-004", "scan time out", (StatusCode.DEADLINE_EXCEEDED,))
    SCAN_PARAMS_EMPTY = CatalogueEntry(
        "HNDL-005", "scan params empty", (StatusCode.INVALID_ARGUMENT,), retryable=False
    )
    SUBPROCESS_FAILED = CatalogueEntry("HNDL-006", "", (StatusCode.INTERNAL,))
    SYSTEM_ERROR = CatalogueEntry(
        "HNDL-007",
        "",
        (
            StatusCode.INTERNAL,
            StatusCode.RESOURCE_EXHAUSTED,
            StatusCode.UNAVAILABLE,
            StatusCode.UNAUTHENTICATED,
            StatusCode.PERMISSION_DENIED,
            StatusCode.OUT_OF_RANGE,
        ),
    )
    JOB_ID_INVALID = CatalogueEntry(
        "HNDL-008",
        "job id empty",
        (StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND, StatusCode.FAILED_PRECONDITION),
        retryable=False,
    )
    PROXY_URL_INVALID = CatalogueEntry(
        "HNDL-011", "proxy URL invalid", (StatusCode.INVALID_ARGUMENT,), retryable=False
    )
    DB_RELEASE_DATE_UNKNOWN = CatalogueEntry(
        "HNDL-012", "last release date of databases is unknown", (StatusCode.FAILED_PRECONDITION,)
    )
    DB_RELEASE_DATE_INVALID = CatalogueEntry(
        "HNDL-013", "invalid format of databases release date", (StatusCode.INVALID_ARGUMENT,)
    )
    SCAN_POLICIES_EMPTY = CatalogueEntry(
        "HNDL-014", "scan policies empty", (StatusCode.FAILED_PRECONDITION,), retryable=False
    )
    TIMEZONE_UNKNOWN = CatalogueEntry(
        "HNDL-015", "can not get local timezone", (StatusCode.FAILED_PRECONDITION,)
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
    """A failure with its catalogue entry; the only exception the transport maps to a status."""

    def __init__(
        self,
        kind: Catalogue,
        detail: str = "",
        *,
        status: StatusCode | None = None,
        retry_after: float | None = None,
    ) -> None:
        if status is not None and status not in kind.entry.statuses:
            raise ValueError(f"{kind.code} cannot be answered with {status.name}")
        if retry_after is not None and not retry_after > 0:
            raise ValueError(f"retry_after must be positive seconds, got {retry_after}")
        self.kind = kind
        self.detail = detail
        self.status = status or kind.entry.status
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
