"""structlog set-up: JSON lines in production (stderr not a terminal), readable on a terminal.

Every state change is one event carrying job_id, scanner_id and run; timestamps are ISO 8601 in
the configured time zone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from server.errors import Catalogue, HandlerError


def resolve_timezone(name: str) -> tzinfo:
    """The configured zone; HNDL-015 when it cannot be resolved."""
    if name == "local":
        local = datetime.now().astimezone().tzinfo
        if local is None:
            raise HandlerError(Catalogue.TIMEZONE_UNKNOWN, "the system reports no local time zone")
        return local
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HandlerError(
            Catalogue.TIMEZONE_UNKNOWN,
            f"time zone {name!r} is not an IANA zone name known here (for example UTC or "
            "Europe/Moscow); set --timezone / IMAGE_HANDLER_TIMEZONE",
        ) from None


def configure(fmt: str = "auto", level: str = "info", zone: tzinfo | None = None) -> None:
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    tz = zone

    def add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["timestamp"] = datetime.now(tz).isoformat(timespec="milliseconds")
        return event

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
