"""Engines shipped with the scanner, by the name ``image-scanner --engine`` takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scanner_client.engine import Engine
from scanner_client.engines.noop import NoopEngine
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
    credentials_file: str = ""
    insecure_registries: tuple[str, ...] = ()
    platform: str = "linux/amd64"
    # builtin: periodic vulnerability database update into db_dir (sources, seconds between).
    db_update_from: tuple[str, ...] = ()
    db_update_interval: float = 0.0
    # builtin and command: the job policy's flags (scanner_client.job_policy), and the
    # handler's HOST:PORT, which no job may aim at.
    allowed_registries: str = "*"
    allowed_artifact_urls: str = ""
    allowed_networks: str = ""
    artifact_roots: str = ""
    node_roots: str = ""
    credential_grants: str = ""
    handler: str = ""
    # command: the template, its output format, timeout, and declared databases
    # (NAME=VERSION@RELEASED_AT).
    command: str = ""
    command_format: str = "trivy-json"
    command_timeout: float = 600.0
    command_databases: tuple[str, ...] = ()


EngineFactory = Callable[[EngineSettings], Engine]


def job_policy(settings: EngineSettings) -> ScannerPolicy:
    """ValueError naming the flag of a value that does not parse (the scanner exits 2)."""
    return ScannerPolicy.parse(
        allowed_registries=settings.allowed_registries,
        allowed_artifact_urls=settings.allowed_artifact_urls,
        allowed_networks=settings.allowed_networks,
        artifact_roots=settings.artifact_roots,
        node_roots=settings.node_roots,
        credential_grants=settings.credential_grants,
        handler=settings.handler,
    )


def _builtin(settings: EngineSettings) -> Engine:
    # Imported here: the builtin engine loads yara and its databases, the noop one needs neither.
    from scanner_client.engines.builtin import BuiltinEngine, BuiltinSettings

    return BuiltinEngine(
        BuiltinSettings(
            db_dir=Path(settings.db_dir) if settings.db_dir else None,
            scratch_dir=Path(settings.scratch_dir) if settings.scratch_dir else None,
            min_free_scratch=int(settings.min_free_scratch * (1 << 20)),
            proxy_url=settings.proxy_url,
            credentials_file=Path(settings.credentials_file) if settings.credentials_file else None,
            insecure_registries=frozenset(settings.insecure_registries),
            platform=settings.platform,
            db_update_from=settings.db_update_from,
            db_update_interval=settings.db_update_interval,
            policy=job_policy(settings),
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
        policy=job_policy(settings),
    )


ENGINES: dict[str, EngineFactory] = {
    "noop": lambda settings: NoopEngine(delay=settings.delay),
    "builtin": _builtin,
    "command": _command,
}

__all__ = ["ENGINES", "EngineFactory", "EngineSettings", "NoopEngine"]
