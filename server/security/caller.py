"""Who is calling: the interceptor binds the caller for the length of each unary call, and a
servicer reads it there (a job records who submitted it, for its credential grants).

A context variable, not a parameter: the generated servicer signatures are fixed, and gRPC runs
each call in its own task, so one call never sees another's caller."""

from __future__ import annotations

from contextvars import ContextVar, Token

from imagehandler.jobpolicy import ANONYMOUS, Submitter
from server.security.tokens import Principal

_CALLER: ContextVar[Submitter] = ContextVar("imagehandler_caller", default=ANONYMOUS)


def submitter_of(principal: Principal | None) -> Submitter:
    """The token's name and roles; anonymous when the handler needs no tokens."""
    if principal is None:
        return ANONYMOUS
    return Submitter(principal.name, principal.roles)


def bind(submitter: Submitter) -> Token[Submitter]:
    return _CALLER.set(submitter)


def unbind(token: Token[Submitter]) -> None:
    _CALLER.reset(token)


def current() -> Submitter:
    """The caller of the call being served (anonymous outside one)."""
    return _CALLER.get()


__all__ = ["bind", "current", "submitter_of", "unbind"]
