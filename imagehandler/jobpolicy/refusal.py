"""The one exception of the job policy: which rule refused what, and how to allow it."""

from __future__ import annotations


class Refused(Exception):
    """A job (or one connection of it) that the policy does not allow.

    ``rule`` names the rule that refused it (``allowed-registries``, ``loopback``,
    ``artifact-roots``, ``credential-grants``, ...): the handler answers it as HNDL-005 at submit,
    a scanner fails the job with HNDL-005 (not retried), and both say the rule, so an operator
    knows which setting to change and a submitter knows what to fix.
    """

    def __init__(self, rule: str, detail: str, hint: str = "") -> None:
        self.rule = rule
        self.detail = detail
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"refused by the job policy (rule {self.rule}): {self.detail}"
        return f"{text}; {self.hint}" if self.hint else text


__all__ = ["Refused"]
