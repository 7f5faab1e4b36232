"""structlog set-up: JSON lines in production (stderr not a terminal), readable on a terminal.

Every state change is one event carrying job_id, scanner_id and run; timestamps are ISO 8601 in
the configured time zone.

At ``info`` that is several lines per job, so the JSON path is built for speed: a level that is
off costs one no-op call (``make_filtering_bound_logger``, loggers cached on first use); the
timestamp string is made once per millisecond; lines are rendered by orjson, straight to bytes;
and the lines of one event-loop turn are written together at the end of the turn (warnings and
errors, and lines logged off the loop, are written at once; whatever is left is written at exit).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from collections.abc import MutableMapping
from datetime import datetime, tzinfo
from typing import Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import structlog

from imagehandler.errors import Catalogue, HandlerError


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


# A long loop turn writes its lines in pieces of this many.
MAX_BUFFERED_LINES = 1000


class TurnBufferedLogger:
    """A structlog logger writing rendered lines (bytes) to ``stream``: ``debug`` and ``info``
    lines logged on an event loop are written together when the loop turn ends (one ``write``
    and ``flush`` for all of them); anything else, and anything logged off the loop, at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._scheduled = False
        atexit.register(self.flush)

    def _later(self, message: bytes) -> None:
        self._lines.append(message)
        if self._scheduled:
            if len(self._lines) >= MAX_BUFFERED_LINES:
                self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self._flush_turn)

    def _now(self, message: bytes) -> None:
        self._lines.append(message)
        self.flush()

    def _flush_turn(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            if not lines:
                return
            lines.append(b"")
            data = b"\n".join(lines)
            stream = self._stream
            binary = getattr(stream, "buffer", None)
            if binary is None:  # a text-only stream (some test harnesses)
                stream.write(data.decode("utf-8", "replace"))
                stream.flush()
                return
            stream.flush()  # what was printed as text goes first
            binary.write(data)
            binary.flush()

    debug = info = _later
    msg = log = warning = warn = error = err = critical = fatal = exception = failure = _now


class _TurnBufferedLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._logger = TurnBufferedLogger(stream)

    def __call__(self, *args: Any) -> TurnBufferedLogger:
        return self._logger


def _fallback(obj: Any) -> Any:
    """What structlog's JSONRenderer does with values JSON has no type for (orjson itself
    renders str, numbers, bools, None, lists, dicts, datetimes, enums and dataclasses)."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def render_json_line(event: MutableMapping[str, Any]) -> bytes:
    """One JSON line. orjson refuses a few values the standard encoder takes (a string with
    a lone surrogate, as a path of non-UTF-8 bytes becomes; an int past 64 bits): such a line
    goes through the standard encoder instead, so logging never raises."""
    try:
        # OPT_NON_STR_KEYS: in case a caller logs a dict with other keys than strings.
        return orjson.dumps(event, default=_fallback, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(event, default=_fallback).encode("utf-8", "backslashreplace")


# The configured threshold (a ``logging`` level number); everything is on until configure().
_threshold = logging.NOTSET


def enabled(level: int) -> bool:
    """Whether ``level`` lines are written: hot paths skip building a line's fields (a few
    microseconds per job at ``info``) when no one will read it."""
    return level >= _threshold


def configure(fmt: str = "auto", level: str = "info", zone: tzinfo | None = None) -> None:
    global _threshold
    _threshold = logging.getLevelNamesMapping()[level.upper()]
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    tz = zone
    cached_ms = -1
    cached_text = ""

    def add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        nonlocal cached_ms, cached_text
        ms = time.time_ns() // 1_000_000
        if ms != cached_ms:
            # The same instant datetime.now(tz) would give, to the millisecond.
            at = datetime.fromtimestamp(ms / 1000, tz)
            cached_ms, cached_text = ms, at.isoformat(timespec="milliseconds")
        event["timestamp"] = cached_text
        return event

    def format_exc_info(logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
        if "exc_info" in event:
            return structlog.processors.format_exc_info(logger, name, event)
        return event

    def render_json(_: Any, __: str, event: MutableMapping[str, Any]) -> bytes:
        return render_json_line(event)

    renderer: Any = (
        render_json if json_output else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            # (No merge_contextvars: the handler binds none, and it costs a copy per line.)
            structlog.processors.add_log_level,
            add_timestamp,
            format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_threshold),
        logger_factory=(
            _TurnBufferedLoggerFactory(sys.stderr)
            if json_output
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
