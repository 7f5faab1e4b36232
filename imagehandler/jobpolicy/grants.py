"""Credential grants: which callers may use which pull credentials, and for which registries.

A grant is an entry of a JSON object keyed by the ``credentials_ref`` a job names::

    {"team-a-ghcr": {"registries": ["ghcr.io"], "allowed": ["ci-team-a", "role:admin"]}}

- ``registries``: host patterns (:mod:`.patterns`) of the registries the credential is for,
  and of their token services when those live on another host. A job may use it only for such
  a registry, and a scanner sends it to no other host.
- ``allowed``: who may name it: token names (from the handler's ``--token-file``),
  ``role:ROLE`` for every token with that role, or ``*`` for every caller (also anonymous
  ones, when the handler takes calls without tokens).

The handler reads its grants from ``--credential-grants`` (a file without secrets); a scanner
reads the same keys from the entries of its ``--credentials-file`` (beside the secrets) or from
its own ``--credential-grants``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imagehandler.jobpolicy.patterns import HostPattern, any_host, split_host
from imagehandler.jobpolicy.refusal import Refused

GRANT_KEYS = ("registries", "allowed")


@dataclass(frozen=True)
class Submitter:
    """Who submitted a job: the token's name and roles ("" and none: no token was needed)."""

    name: str = ""
    roles: frozenset[str] = frozenset()

    def describe(self) -> str:
        return f"token {self.name!r}" if self.name else "an anonymous caller"


ANONYMOUS = Submitter()


@dataclass(frozen=True)
class Grant:
    ref: str
    registries: tuple[HostPattern, ...]
    allowed: frozenset[str]

    def may_use(self, who: Submitter) -> bool:
        if "*" in self.allowed:
            return True
        if who.name and who.name in self.allowed:
            return True
        return any(f"role:{role}" in self.allowed for role in who.roles)

    def is_for(self, netloc: str) -> bool:
        """Whether the credential may go to ``netloc`` (a registry or host[:port])."""
        try:
            host, port = split_host(netloc)
        except ValueError:
            return False
        return any_host(self.registries, host, port)


def parse_grant(ref: str, value: object, source: str) -> Grant:
    """One entry; ValueError naming ``source`` and the ref when it is not a grant."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: {ref!r} must be an object")
    registries = value.get("registries")
    allowed = value.get("allowed")
    for key, given in (("registries", registries), ("allowed", allowed)):
        if (
            not isinstance(given, list)
            or not given
            or not all(isinstance(item, str) and item.strip() for item in given)
        ):
            raise ValueError(
                f"{source}: {ref!r} needs {key!r}, a non-empty list of strings "
                + (
                    '(the registries it is for, e.g. ["ghcr.io"])'
                    if key == "registries"
                    else '(token names, "role:ROLE" or "*", e.g. ["ci-team-a"])'
                )
            )
    assert isinstance(registries, list)
    assert isinstance(allowed, list)
    try:
        patterns = tuple(HostPattern.parse(item) for item in registries)
    except ValueError as exc:
        raise ValueError(f"{source}: {ref!r} registries: {exc}") from None
    return Grant(ref, patterns, frozenset(item.strip() for item in allowed))


def parse_grants(document: object, source: str) -> dict[str, Grant]:
    """Every entry of a grants document (or of a credentials file with grants)."""
    if not isinstance(document, Mapping):
        raise ValueError(f"{source}: expected a JSON object of credential references")
    return {str(ref): parse_grant(str(ref), value, source) for ref, value in document.items()}


@dataclass(frozen=True)
class Grants:
    by_ref: Mapping[str, Grant]

    def check(self, ref: str, registry: str, who: Submitter, field: str) -> Grant:
        """The grant that lets ``who`` use ``ref`` for ``registry``; Refused otherwise. Whether
        the ref exists is not told to a caller who may not use it."""
        grant = self.by_ref.get(ref)
        if grant is None or not grant.may_use(who):
            raise Refused(
                "credential-grants",
                f"{field} {ref!r} is not granted to {who.describe()}",
                "an operator grants credentials in --credential-grants",
            )
        if not grant.is_for(registry):
            raise Refused(
                "credential-grants",
                f"{field} {ref!r} is not for registry {registry!r}",
                "a credential is only used for the registries its grant names",
            )
        return grant


__all__ = ["ANONYMOUS", "GRANT_KEYS", "Grant", "Grants", "Submitter", "parse_grant", "parse_grants"]
