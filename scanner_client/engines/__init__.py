"""Engines shipped with the scanner, by the name ``image-scanner --engine`` takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scanner_client.engine import Engine
from scanner_client.engines.noop import NoopEngine


@dataclass(frozen=True)
class EngineSettings:
    """The engine options the CLI reads; each factory takes what it needs."""

    # Seconds each no-op scan takes.
    delay: float = 0.0


EngineFactory = Callable[[EngineSettings], Engine]

ENGINES: dict[str, EngineFactory] = {
    "noop": lambda settings: NoopEngine(delay=settings.delay),
}

__all__ = ["ENGINES", "EngineFactory", "EngineSettings", "NoopEngine"]
