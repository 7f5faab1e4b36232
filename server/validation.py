"""Rules for what clients and scanners send: each check raises a HandlerError that says what
to fix. The transport calls these while it converts protobuf to domain objects."""

from __future__ import annotations

import re
from datetime import date, datetime
from urllib.parse import urlsplit

from imagehandler.errors import Catalogue, HandlerError

# The distribution spec's grammar for repository names and tags.
_REPOSITORY = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_REGISTRY = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
)
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,252}")
_PROXY_SCHEMES = frozenset({"http", "https", "socks5", "socks5h"})

MAX_STRING = 4096
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_SBOM_BYTES = 4 * 1024 * 1024


def set_limits(max_string: int, max_labels: int) -> None:
    """The handler's --max-string-length and --max-labels (process-wide: one handler per
    process; each HandlerServer sets its own when it is made)."""
    global MAX_STRING, MAX_LABELS
    MAX_STRING, MAX_LABELS = max_string, max_labels


def params_error(detail: str) -> HandlerError:
    return HandlerError(Catalogue.SCAN_PARAMS_EMPTY, detail)


def check_repository(repository: str) -> None:
    if not repository:
        raise params_error("image.repository is required (for example library/alpine)")
    if len(repository) > 255 or not _REPOSITORY.fullmatch(repository):
        raise params_error(
            f"image.repository {repository!r} is not a valid repository name "
            "(lowercase letters, digits and . _ - separators, path parts joined by /)"
        )


def check_registry(registry: str) -> None:
    if registry and not _REGISTRY.fullmatch(registry):
        raise params_error(f"image.registry {registry!r} is not a host or host:port")


def check_tag(tag: str) -> None:
    if tag and not _TAG.fullmatch(tag):
        raise params_error(
            f"image.tag {tag!r} is not a valid tag (up to 128 of A-Z a-z 0-9 _ . -, "
            "not starting with . or -)"
        )


def check_digest(digest: str) -> None:
    if digest and not _DIGEST.fullmatch(digest):
        raise params_error(
            f"image.digest {digest!r} is not a digest; expected sha256: and 64 lowercase hex digits"
        )


def check_identifier(field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            raise params_error(f"{field} is required")
        return
    if not _IDENT.fullmatch(value):
        raise params_error(
            f"{field} {value[:80]!r} must be 1-253 characters of letters, digits and . _ : @ / -"
        )


def check_text(field: str, value: str, limit: int | None = None) -> None:
    if limit is None:
        limit = MAX_STRING
    if len(value) > limit:
        raise params_error(f"{field} is {len(value)} characters long; the limit is {limit}")


def check_proxy_url(field: str, url: str) -> None:
    """HNDL-011 for a proxy URL that does not parse as scheme://host[:port]."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise HandlerError(Catalogue.PROXY_URL_INVALID, f"{field} {url!r}: {exc}") from None
    if parts.scheme not in _PROXY_SCHEMES or not parts.hostname:
        raise HandlerError(
            Catalogue.PROXY_URL_INVALID,
            f"{field} {url!r} must look like http://host:port "
            f"(schemes: {', '.join(sorted(_PROXY_SCHEMES))})",
        )
    if port == 0:
        raise HandlerError(Catalogue.PROXY_URL_INVALID, f"{field} {url!r}: port 0")


def check_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise params_error(f"{len(labels)} labels; at most {MAX_LABELS} are allowed (--max-labels)")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY:
            raise params_error(f"label key {key[:80]!r} must be 1-{MAX_LABEL_KEY} characters")
        if len(value) > MAX_LABEL_VALUE:
            raise params_error(f"label {key!r} value is longer than {MAX_LABEL_VALUE} characters")


def parse_release_date(name: str, value: str) -> datetime | date:
    """A database release date: RFC 3339 date or date-time (HNDL-012 empty, HNDL-013 bad)."""
    if not value:
        raise HandlerError(
            Catalogue.DB_RELEASE_DATE_UNKNOWN,
            f"database {name!r} has no released_at; report its release date",
        )
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HandlerError(
            Catalogue.DB_RELEASE_DATE_INVALID,
            f"database {name!r} released_at {value[:64]!r} is not an RFC 3339 date "
            "(for example 2026-11-20 or 2026-11-20T06:00:00Z)",
        ) from None
    if parsed.tzinfo is None:
        raise HandlerError(
            Catalogue.DB_RELEASE_DATE_INVALID,
            f"database {name!r} released_at {value!r} has no time zone offset",
        )
    return parsed
