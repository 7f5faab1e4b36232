"""The retry decision: given a run that ended without a result, run again or fail the job."""

from __future__ import annotations

from dataclasses import dataclass

from imagehandler.errors import Catalogue

DEFAULT_MAX_RUNS = 3


@dataclass(frozen=True)
class RunFailure:
    """Why a run ended without a result."""

    kind: Catalogue
    detail: str
    # The scanner said retrying cannot help.
    permanent: bool = False


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    max_runs: int = DEFAULT_MAX_RUNS

    def decide(self, runs_so_far: int, failure: RunFailure) -> RetryDecision:
        if failure.permanent:
            return RetryDecision(False, "the scanner reported a permanent failure")
        if not failure.kind.entry.retryable:
            return RetryDecision(False, f"{failure.kind.code} cannot be fixed by running again")
        if runs_so_far >= self.max_runs:
            return RetryDecision(False, f"{runs_so_far} runs without a result")
        return RetryDecision(True, f"run {runs_so_far} of {self.max_runs} ended without a result")
