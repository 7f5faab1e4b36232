"""Bearer tokens with roles, from a file of hashes that is re-read when it changes.

The file (``--token-file``; a Kubernetes Secret mounted as a file works, rotation included)
holds one token per line::

    # name        roles         hash of the token (64 hex digits, shortened here)
    ci-pipeline   submit,read   sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0...
    scanners      scanner       sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04f...

Only SHA-256 hashes are stored, never a token. Tokens are random 256-bit secrets
(``image-handler token NAME ROLES`` makes one), so a fast hash is enough: nobody can guess a
token from its hash, and a slow password hash would cost every call. The handler looks each
presented token up by its hash.

The file is checked for a change (modification time, size, inode) at most every
``reload_interval`` seconds when a call comes in; a changed file is read again and takes effect
for the next call. A file that no longer parses keeps the previous tokens and logs
``tokens.reload_failed``. Nothing here ever logs a token.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from imagehandler.errors import Catalogue, HandlerError, Reason

log = structlog.get_logger("imagehandler.security")

ROLES = ("submit", "read", "admin", "scanner")
HASH_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Principal:
    """Whoever presented a known token: the token's name and its roles."""

    name: str
    roles: frozenset[str]


def hash_token(token: str) -> str:
    """``sha256:<hex>`` of the token's UTF-8 bytes: what the token file stores."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


TOKEN_PREFIX = "ihk_"


def new_token() -> str:
    """A fresh random token: ``ihk_`` and 256 bits of URL-safe base64.

    The prefix matters: base64url can start with ``-``, and a token that does is read as an
    option by every command line that takes ``--token VALUE`` (ihctl's did, in CI). It also
    makes a leaked token easy to spot with a secret scanner.
    """
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_roles(text: str) -> frozenset[str]:
    roles = frozenset(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    if not roles:
        raise ValueError(f"no role; roles are {', '.join(ROLES)}")
    return roles


def file_line(name: str, roles: Iterable[str], token: str) -> str:
    """The token file line for ``token``."""
    return f"{name}\t{','.join(sorted(roles))}\t{hash_token(token)}"


def parse_token_file(text: str) -> dict[str, Principal]:
    """Principals by token hash; ValueError naming the line for anything wrong."""
    table: dict[str, Principal] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(
                f"line {number}: expected 'NAME ROLES sha256:HEX', got {len(parts)} fields"
            )
        name, roles_text, digest = parts
        try:
            roles = parse_roles(roles_text)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        hex_part = digest[len(HASH_PREFIX) :]
        if not digest.startswith(HASH_PREFIX) or len(hex_part) != 64 or not set(hex_part) <= _HEX:
            raise ValueError(
                f"line {number}: the hash must be sha256: and 64 lowercase hex digits "
                "(store the hash, never the token: image-handler token NAME ROLES prints the line)"
            )
        if digest in table:
            raise ValueError(f"line {number}: the same token hash appears twice")
        table[digest] = Principal(name, roles)
    return table


def _stamp(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev)


class TokenFile:
    """The token table, re-read from ``path`` when the file changes."""

    def __init__(
        self,
        path: Path,
        reload_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.reload_interval = reload_interval
        self._clock = clock
        self._checked = clock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._table: dict[str, Principal] = {}
        self.reloads = 0
        try:
            self._load()
        except (OSError, ValueError) as exc:
            raise HandlerError(
                Catalogue.SCANNER_CONFIG_INVALID,
                f"--token-file {path}: {_reason(exc)}",
                reason=Reason.FAILED_PRECONDITION,
            ) from None

    def _load(self) -> None:
        stamp = _stamp(self.path.stat())
        table = parse_token_file(self.path.read_text(encoding="utf-8"))
        self._table, self._stamp = table, stamp

    def refresh(self) -> None:
        """Re-read the file when it changed since the last look (at most every interval)."""
        now = self._clock()
        if now - self._checked < self.reload_interval:
            return
        self._checked = now
        try:
            stamp = _stamp(self.path.stat())
        except OSError as exc:
            if self._stamp is not None:
                log.error("tokens.reload_failed", path=str(self.path), error=_reason(exc))
                self._stamp = None  # say it once, and read it again when it is back
            return
        if stamp == self._stamp:
            return
        try:
            self._load()
        except (OSError, ValueError) as exc:
            self._stamp = stamp  # keep the previous tokens until the file changes again
            log.error("tokens.reload_failed", path=str(self.path), error=_reason(exc))
            return
        self.reloads += 1
        log.info("tokens.reloaded", path=str(self.path), tokens=len(self._table))

    def lookup(self, token: str) -> Principal | None:
        self.refresh()
        return self._table.get(hash_token(token))

    def __len__(self) -> int:
        return len(self._table)


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    """``image-handler token NAME ROLES [--stdin]``."""
    parser.description = (
        "Make a bearer token: prints the token (give it to the client; it is stored nowhere) "
        "and, on the next line, the line to add to --token-file (its SHA-256 hash)."
    )
    parser.add_argument("name", help="a name for the token's holder (shown in logs and errors)")
    parser.add_argument("roles", type=_roles_argument, help=f"comma-separated: {', '.join(ROLES)}")
    parser.add_argument(
        "--stdin", action="store_true", help="hash a token read from standard input instead"
    )


def _roles_argument(text: str) -> frozenset[str]:
    try:
        return parse_roles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def token_main(args: argparse.Namespace) -> int:
    if not args.name or any(c.isspace() or c == "#" for c in args.name):
        print("image-handler token: NAME must be one word without '#'", file=sys.stderr)
        return 2
    token = sys.stdin.readline().strip() if args.stdin else new_token()
    if not token:
        print("image-handler token: no token on standard input", file=sys.stderr)
        return 2
    if not args.stdin:
        print(token)
    print(file_line(args.name, args.roles, token))
    return 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


__all__ = [
    "HASH_PREFIX",
    "ROLES",
    "TOKEN_PREFIX",
    "Principal",
    "TokenFile",
    "add_token_arguments",
    "file_line",
    "hash_token",
    "new_token",
    "parse_roles",
    "parse_token_file",
    "token_main",
]
