"""Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter").

The n-th retry waits a uniformly random time in ``[0, min(maximum, initial * multiplier**n)]``:
many scanners that lost the same handler do not come back in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def ceiling(attempt: int, initial: float, maximum: float, multiplier: float = 2.0) -> float:
    """The upper bound of the wait before retry number ``attempt`` (0-based)."""
    if attempt < 0:
        raise ValueError(f"attempt must not be negative, got {attempt}")
    # Stop multiplying once past the maximum, so huge attempt numbers cannot overflow.
    bound = initial
    for _ in range(attempt):
        if bound >= maximum:
            break
        bound *= multiplier
    return min(maximum, bound)


def full_jitter(
    attempt: int,
    initial: float,
    maximum: float,
    multiplier: float = 2.0,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """A random wait in ``[0, ceiling(attempt, ...)]``."""
    return uniform(0.0, ceiling(attempt, initial, maximum, multiplier))


class Backoff:
    """Successive waits for reconnecting; ``reset()`` after a connection that worked."""

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 30.0,
        multiplier: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0:
            raise ValueError(f"initial backoff must be positive, got {initial}")
        if maximum < initial:
            raise ValueError(f"maximum backoff {maximum} is below the initial {initial}")
        if multiplier < 1:
            raise ValueError(f"backoff multiplier must be at least 1, got {multiplier}")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        """The wait before the next attempt; each call widens the window up to the maximum."""
        delay = full_jitter(
            self.attempt, self.initial, self.maximum, self.multiplier, self._rng.uniform
        )
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
