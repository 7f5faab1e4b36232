"""Engines shipped with the scanner, by the name ``image-scanner --engine`` takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scanner_client.engine import Engine
from scanner_client.engines.noop import NoopEngine
from scanner_client.extras import builtin_engine_extra
from scanner_client.job_policy import ScannerPolicy


@dataclass(frozen=True)
class EngineSettings:
    """The engine options the CLI reads; each factory takes what it needs."""

    # Seconds each no-op scan takes.
    delay: float = 0.0
    # builtin and command: the scanner's proxy (a job's image.proxy_url wins).
    proxy_url: str = ""
    # builtin: databases directory ("" = packaged), scratch directory ("" = system temp),
    # credentials file for credentials_ref, plain-HTTP registries, the platform to pull.
    db_dir: str = ""
    scratch_dir: str = ""
    # MiB the scratch directory must keep free.
    min_free_scratch: float = 256.0
    # builtin: the layer cache's directory ("" = no cache) and its size in MiB.
    layer_cache_dir: str = ""
    layer_cache_size: float = 2048.0
    credentials_file: str = ""
    insecure_registries: tuple[str, ...] = ()
    platform: str = "linux/amd64"
    # builtin: periodic vulnerability database update into db_dir (sources, seconds between).
    db_update_from: tuple[str, ...] = ()
    db_update_interval: float = 0.0
    # builtin and command: what a job may aim the scanner at (scanner_client.job_policy).
    policy: ScannerPolicy = field(default_factory=ScannerPolicy)
    # command: the template, its output format, timeout, and declared databases
    # (NAME=VERSION@RELEASED_AT).
    command: str = ""
    command_format: str = "trivy-json"
    command_timeout: float = 600.0
    command_databases: tuple[str, ...] = ()


EngineFactory = Callable[[EngineSettings], Engine]


def _builtin(settings: EngineSettings) -> Engine:
    # Imported here: the builtin engine loads yara and its databases, the noop one needs neither
    # (nor the builtin-engine extra that installs them).
    with builtin_engine_extra("--engine builtin"):
        from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings

    return BuiltinEngine(
        BuiltinSettings(
            db_dir=Path(settings.db_dir) if settings.db_dir else None,
            scratch_dir=Path(settings.scratch_dir) if settings.scratch_dir else None,
            min_free_scratch=int(settings.min_free_scratch * (1 << 20)),
            layer_cache_dir=Path(settings.layer_cache_dir) if settings.layer_cache_dir else None,
            layer_cache_size=max(1, int(settings.layer_cache_size * (1 << 20))),
            proxy_url=settings.proxy_url,
            credentials_file=Path(settings.credentials_file) if settings.credentials_file else None,
            insecure_registries=frozenset(settings.insecure_registries),
            platform=settings.platform,
            db_update_from=settings.db_update_from,
            db_update_interval=settings.db_update_interval,
            policy=settings.policy,
        )
    )


def _command(settings: EngineSettings) -> Engine:
    from scanner_client.engines.command import CommandEngine, parse_database

    return CommandEngine(
        settings.command,
        output_format=settings.command_format,
        timeout=settings.command_timeout,
        databases=[parse_database(value) for value in settings.command_databases],
        proxy_url=settings.proxy_url,
        policy=settings.policy,
    )


ENGINES: dict[str, EngineFactory] = {
    "noop": lambda settings: NoopEngine(delay=settings.delay),
    "builtin": _builtin,
    "command": _command,
}

__all__ = ["ENGINES", "EngineFactory", "EngineSettings", "NoopEngine"]
