"""Host and URL patterns of the job policy, and the parsing they are matched against.

A **host pattern** is ``HOST`` or ``HOST:PORT``. In HOST, ``*`` stands for any run of
characters (``*.example.com`` is every name under example.com, ``*`` every host); PORT is a
number or ``*``. A pattern without a port matches only hosts named without one (the scheme's
default port): ``registry.example.com`` does not let a job reach ``registry.example.com:22``;
``registry.example.com:*`` does.

A **URL pattern** is ``SCHEME://HOST-PATTERN/PATH-PREFIX``: a URL matches when its scheme is
the same, its host matches, and its path is the prefix or continues it after a ``/`` (the
prefix ``/builds`` takes ``/builds/1.tar`` but not ``/builds-old/1.tar``).

URLs are parsed strictly before they are matched: characters on which URL parsers disagree
(backslashes, white space, control and non-ASCII characters), user information
(``https://allowed.example@evil.example/``) and dot segments (``/builds/../admin``, also
percent-encoded) are refused, so that what is checked is what a client connects to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from imagehandler.jobpolicy.refusal import Refused

DEFAULT_PORTS = {"http": "80", "https": "443", "oci": "443"}
_UNSAFE = re.compile(r"[^\x21-\x7e]|\\")


def split_host(netloc: str) -> tuple[str, str]:
    """``Host:5000`` -> (``host``, ``5000``); ``[::1]:5000`` -> (``[::1]``, ``5000``); the
    host lowercased, a trailing dot dropped; the port "" when absent."""
    text = netloc.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{netloc!r}: unclosed [")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{netloc!r}: text after ]")
        port = rest[1:]
    else:
        host, _, port = text.partition(":")
    if port and not (port == "*" or port.isdigit()):
        raise ValueError(f"{netloc!r}: port {port!r} is not a number")
    return host.rstrip("."), port


def _glob(text: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in text.split("*")))


@dataclass(frozen=True)
class HostPattern:
    text: str
    host: re.Pattern[str]
    port: str  # "" (no port given), "*" (any) or digits

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        value = text.strip()
        if not value or "/" in value or _UNSAFE.search(value):
            raise ValueError(f"{text!r} is not HOST or HOST:PORT (* stands for any part)")
        host, port = split_host(value)
        if not host:
            raise ValueError(f"{text!r} names no host")
        return cls(value, _glob(host), port)

    def matches(self, host: str, port: str) -> bool:
        if self.port != "*" and self.port != port:
            return False
        return self.host.fullmatch(host) is not None


def parse_hosts(values: list[str] | tuple[str, ...], flag: str) -> tuple[HostPattern, ...]:
    try:
        return tuple(HostPattern.parse(v) for v in values if v.strip())
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def any_host(patterns: tuple[HostPattern, ...], host: str, port: str) -> bool:
    return any(p.matches(host, port) for p in patterns)


@dataclass(frozen=True)
class ParsedUrl:
    """A URL as checked: scheme and host lowercased, the port "" when it is the scheme's
    default, the path with its percent-escapes as sent."""

    url: str
    scheme: str
    host: str
    port: str
    path: str

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host


def parse_url(url: str, field: str) -> ParsedUrl:
    """``url`` checked for the tricks above (Refused, rule ``url``)."""

    def refuse(why: str) -> Refused:
        return Refused("url", f"{field} {url[:200]!r} {why}")

    if _UNSAFE.search(url):
        raise refuse("holds a backslash, white space, or a control or non-ASCII character")
    try:
        parts = urlsplit(url)
        port_number = parts.port
    except ValueError as exc:
        raise refuse(f"does not parse: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise refuse("is not an absolute URL (scheme://host/path)")
    if "@" in parts.netloc:
        raise refuse("carries user information (user@host): give credentials another way")
    try:
        host, port = split_host(parts.netloc)
    except ValueError as exc:
        raise refuse(f"has a bad host: {exc}") from None
    if not host:
        raise refuse("names no host")
    if port_number is not None and str(port_number) == DEFAULT_PORTS.get(scheme):
        port = ""
    decoded = unquote(parts.path)
    if any(segment in (".", "..") for segment in decoded.split("/")):
        raise refuse("has . or .. path segments")
    return ParsedUrl(url, scheme, host, port, parts.path or "/")


@dataclass(frozen=True)
class UrlPattern:
    text: str
    scheme: str
    host: HostPattern
    path: str

    @classmethod
    def parse(cls, text: str) -> UrlPattern:
        value = text.strip()
        if "://" not in value:
            raise ValueError(f"{text!r} is not SCHEME://HOST[:PORT]/PATH-PREFIX")
        scheme, _, rest = value.partition("://")
        netloc, slash, path = rest.partition("/")
        if not scheme or not netloc:
            raise ValueError(f"{text!r} is not SCHEME://HOST[:PORT]/PATH-PREFIX")
        host = HostPattern.parse(netloc)
        default = DEFAULT_PORTS.get(scheme.lower())
        if default is not None and host.port == default:
            host = HostPattern(host.text, host.host, "")
        if any(segment in (".", "..") for segment in unquote(path).split("/")):
            raise ValueError(f"{text!r} has . or .. path segments")
        return cls(value, scheme.lower(), host, slash + path if slash else "/")

    def matches(self, url: ParsedUrl) -> bool:
        if url.scheme != self.scheme or not self.host.matches(url.host, url.port):
            return False
        prefix = self.path
        if prefix.endswith("/"):
            return url.path.startswith(prefix)
        return url.path == prefix or url.path.startswith(prefix + "/")


def parse_urls(values: list[str] | tuple[str, ...], flag: str) -> tuple[UrlPattern, ...]:
    try:
        return tuple(UrlPattern.parse(v) for v in values if v.strip())
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


__all__ = [
    "HostPattern",
    "ParsedUrl",
    "UrlPattern",
    "any_host",
    "parse_hosts",
    "parse_url",
    "parse_urls",
    "split_host",
]
