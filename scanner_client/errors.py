"""The one error the client raises to its caller: the handler refused this scanner."""

from __future__ import annotations

from imagehandler.rpc import RemoteError
from imagehandler.v1 import common_pb2

# The codes a handler refuses a scanner's registration with (PRODUCT.md, "Scanners").
REGISTRATION_CODES = frozenset({"HNDL-003", "HNDL-011", "HNDL-012", "HNDL-013", "HNDL-014"})


class ScannerRejected(Exception):
    """The handler refused the registration: final, the client does not reconnect.

    ``str(error)`` is the catalogue message ``HNDL-0NN: text[: detail]``.
    """

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        self.code = code
        self.message = message or ": ".join(part for part in (code, detail) if part)
        self.detail = detail
        super().__init__(self.message)

    @classmethod
    def from_job_error(cls, error: common_pb2.JobError) -> ScannerRejected:
        return cls(error.code or "HNDL-003", error.message, error.detail)

    @classmethod
    def from_remote(cls, error: RemoteError) -> ScannerRejected:
        return cls(error.code, error.message)
