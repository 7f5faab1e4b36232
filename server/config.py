"""Handler configuration: one dataclass, read from flags with IMAGE_HANDLER_* environment
variables as their defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from imagehandler.errors import Catalogue, HandlerError, Reason
from server.core.model import Policy
from server.job_policy import check_job_policy

ENV_PREFIX = "IMAGE_HANDLER_"


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    # Prometheus metrics HOST:PORT (GET /metrics); empty: no metrics endpoint.
    metrics_listen: str = ""
    data_dir: Path = Path(".data")
    # Runs without a result before a job is ERROR.
    max_runs: int = 3
    # A run's limit when the job does not set max_run_time (seconds).
    default_max_run_time: float = 1800.0
    # How long a run may go without progress or a heartbeat naming the job (seconds).
    result_wait: float = 300.0
    heartbeat_interval: float = 5.0
    # A scanner silent this long is gone; its jobs go back to the queue.
    heartbeat_timeout: float = 15.0
    default_policies: tuple[Policy, ...] = tuple(Policy)
    # Share of assignments the interactive lane gets while both lanes have work.
    interactive_share: float = 0.8
    result_workers: int = 10
    # Results waiting for workers before the dispatcher holds new assignments back.
    result_backlog_limit: int = 10_000
    # Verdict policy: vulnerabilities at or above this severity fail a scan.
    fail_severity: str = "high"
    fail_on_malware: bool = True
    fail_on_secrets: bool = True
    risk_acceptance_days: float = 30.0
    # The receiving server: http(s)://... (webhook) or grpc://host:port (ResultSinkService).
    receiver_url: str = ""
    # File holding the webhook's HMAC secret (also IMAGE_HANDLER_RECEIVER_SECRET).
    receiver_secret_file: str = ""
    delivery_attempts: int = 5
    delivery_backoff: float = 0.5
    delivery_max_backoff: float = 30.0
    delivery_timeout: float = 10.0
    # Deliveries in flight at once (and the webhook's pooled connections).
    delivery_concurrency: int = 16
    # What WatchJobs keeps for watchers of every job: the shared event log's size, how far one
    # watcher may fall behind before it is ended, and how long events stay resumable after the
    # last such watcher left.
    watch_log_bytes: int = 64 * 1024 * 1024
    watch_lag_bytes: int = 16 * 1024 * 1024
    watch_resume_seconds: float = 60.0
    # PENDING jobs allowed at once; 0 means no limit.
    queue_limit: int = 0
    max_batch: int = 1000
    timezone: str = "UTC"
    log_format: str = "auto"  # auto: JSON unless stderr is a terminal
    log_level: str = "info"
    grace_period: float = 30.0
    reflection: bool = True
    # Durability: "journal" (the data directory), "memory" (nothing survives a restart) or
    # "postgres" (a shared database: several replicas serve one queue).
    storage: str = "journal"
    # --storage postgres: the database (a libpq URL), the schema holding the tables, and how
    # long a replica's runs outlive its last lease renewal.
    database_url: str = ""
    database_schema: str = "imagehandler"
    lease_seconds: float = 15.0
    fsync: str = "batch"  # always, batch or never; see server/storage/journal.py
    snapshot_interval: float = 300.0
    snapshot_journal_mb: float = 64.0
    # Start on a damaged data directory, keeping what is readable (and saying what was lost).
    salvage: bool = False
    retention_days: float = 90.0
    prune_interval: float = 3600.0
    # Seconds a good scan of an image digest is reused for a submit of the same digest and
    # policies (when it was matched against the newest vulnerability database); 0: never.
    reuse_window: float = 0.0
    # Queue rematch jobs of the stored SBOMs when a scanner reports a newer vulnerability
    # database.
    rematch_on_update: bool = True
    # The asyncio event loop: "asyncio" (the standard one) or "uvloop" (needs the uvloop
    # package; about a tenth less CPU per job in bench/e2e.py).
    event_loop: str = "asyncio"
    # Security (server/security/): TLS, mutual TLS, tokens with roles, limits.
    # PEM certificate chain and key: with them the gRPC and metrics ports speak TLS only.
    tls_cert: str = ""
    tls_key: str = ""
    # PEM CA bundle: every client must present a certificate it issued (mutual TLS).
    client_ca: str = ""
    # Token file (NAME ROLES sha256:HEX per line); empty: no token needed.
    token_file: str = ""
    token_reload_interval: float = 1.0
    # Largest message accepted / sent, in bytes.
    max_receive_bytes: int = 16 * 1024 * 1024
    max_send_bytes: int = 64 * 1024 * 1024
    # Largest single ScanResult a scanner may send, in bytes.
    max_result_bytes: int = 16 * 1024 * 1024
    # Open streams (WatchJobs, Connect, ...) per client; 0: no limit.
    max_streams_per_client: int = 100
    # Jobs per second per client through SubmitJob(s); 0: no limit. Burst 0: one second's worth.
    submit_rate: float = 0.0
    submit_burst: int = 0
    # Free-text fields and labels of a job.
    max_string_length: int = 4096
    max_labels: int = 64
    # Seconds a new connection may take to finish its TLS and HTTP/2 handshake.
    handshake_timeout: float = 10.0
    # Plaintext HOST:PORT serving only grpc.health.v1 (for probes without TLS); "": none.
    health_listen: str = ""
    # The job policy (server/job_policy.py, imagehandler/jobpolicy): what a job may aim scanners
    # at. Comma-separated; a scanner enforces its own copy again. Registries: any public one by
    # default; artifact URLs, internal networks and filesystem roots: none unless allowed.
    allowed_registries: str = "*"
    allowed_artifact_urls: str = ""
    allowed_networks: str = ""
    artifact_roots: str = ""
    node_roots: str = ""
    # JSON file of credential grants ({"REF": {"registries": [...], "allowed": [...]}}); "":
    # no credentials_ref is accepted.
    credential_grants: str = ""

    def check(self) -> None:
        """HNDL-003 for scanner settings that cannot work."""
        problems = []
        if self.max_runs < 1:
            problems.append(f"max_runs must be at least 1, got {self.max_runs}")
        for name in ("default_max_run_time", "result_wait", "heartbeat_interval"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            problems.append(
                f"heartbeat_timeout ({self.heartbeat_timeout}s) must exceed "
                f"heartbeat_interval ({self.heartbeat_interval}s)"
            )
        if not 0 < self.interactive_share <= 1:
            problems.append(f"interactive_share must be in (0, 1], got {self.interactive_share}")
        if self.fail_severity.upper() not in ("NEGLIGIBLE", "LOW", "MEDIUM", "HIGH", "CRITICAL"):
            problems.append(
                f"fail_severity must be negligible, low, medium, high or critical, "
                f"got {self.fail_severity!r}"
            )
        if self.receiver_url and not self.receiver_url.startswith(
            ("http://", "https://", "grpc://")
        ):
            problems.append(
                f"receiver_url must start with http://, https:// or grpc://, "
                f"got {self.receiver_url!r}"
            )
        if self.delivery_attempts < 1:
            problems.append(f"delivery_attempts must be at least 1, got {self.delivery_attempts}")
        if self.delivery_concurrency < 1:
            problems.append(
                f"delivery_concurrency must be at least 1, got {self.delivery_concurrency}"
            )
        for name in ("delivery_backoff", "delivery_max_backoff", "delivery_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.watch_lag_bytes <= self.watch_log_bytes:
            problems.append(
                f"watch_lag_bytes ({self.watch_lag_bytes}) must be positive and at most "
                f"watch_log_bytes ({self.watch_log_bytes})"
            )
        if self.watch_resume_seconds < 0:
            problems.append(
                f"watch_resume_seconds must be 0 or positive, got {self.watch_resume_seconds}"
            )
        if self.result_backlog_limit < 1:
            problems.append(
                f"result_backlog_limit must be at least 1, got {self.result_backlog_limit}"
            )
        if self.result_workers < 1:
            problems.append(f"result_workers must be at least 1, got {self.result_workers}")
        if self.storage not in ("journal", "memory", "postgres"):
            problems.append(f"storage must be journal, memory or postgres, got {self.storage!r}")
        if self.storage == "postgres" and not self.database_url:
            problems.append(
                "storage postgres needs database_url (--database-url or "
                "IMAGE_HANDLER_DATABASE_URL), e.g. postgresql://USER@HOST:5432/DB"
            )
        if not self.database_schema.isidentifier():
            problems.append(
                f"database_schema must be a plain SQL name (letters, digits, _), "
                f"got {self.database_schema!r}"
            )
        if self.lease_seconds <= 0:
            problems.append(f"lease_seconds must be positive, got {self.lease_seconds}")
        if self.fsync not in ("always", "batch", "never"):
            problems.append(f"fsync must be always, batch or never, got {self.fsync!r}")
        for name in (
            "snapshot_interval",
            "snapshot_journal_mb",
            "retention_days",
            "prune_interval",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.event_loop not in ("asyncio", "uvloop"):
            problems.append(f"event_loop must be asyncio or uvloop, got {self.event_loop!r}")
        if self.reuse_window < 0:
            problems.append(f"reuse_window must be 0 (never) or positive, got {self.reuse_window}")
        if self.queue_limit < 0:
            problems.append(f"queue_limit must be 0 (none) or positive, got {self.queue_limit}")
        problems.extend(check_tls_settings(self.tls_cert, self.tls_key, self.client_ca))
        if self.max_send_bytes < self.max_receive_bytes + 1024 * 1024:
            problems.append(
                f"max_send_bytes ({self.max_send_bytes}) must be at least max_receive_bytes + "
                "1 MiB: a submit's answer echoes its request"
            )
        for name in ("max_receive_bytes", "max_send_bytes", "max_result_bytes"):
            if getattr(self, name) < 1024:
                problems.append(f"{name} must be at least 1024, got {getattr(self, name)}")
        for name in ("max_streams_per_client", "submit_burst"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 (none) or positive, got {getattr(self, name)}")
        for name in ("submit_rate", "token_reload_interval"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or positive, got {getattr(self, name)}")
        if self.max_string_length < 256:
            problems.append(f"max_string_length must be at least 256, got {self.max_string_length}")
        if self.max_labels < 0:
            problems.append(f"max_labels must be 0 or positive, got {self.max_labels}")
        if self.handshake_timeout <= 0:
            problems.append(f"handshake_timeout must be positive, got {self.handshake_timeout}")
        problems.extend(check_job_policy(self))
        if problems:
            raise HandlerError(
                Catalogue.SCANNER_CONFIG_INVALID,
                "; ".join(problems),
                reason=Reason.FAILED_PRECONDITION,
            )


def check_tls_settings(tls_cert: str, tls_key: str, client_ca: str) -> list[str]:
    """What is wrong with the combination of TLS flags (empty: nothing)."""
    problems = []
    if bool(tls_cert) != bool(tls_key):
        problems.append("tls_cert and tls_key go together: give both or neither")
    if client_ca and not tls_cert:
        problems.append("client_ca (mutual TLS) needs tls_cert and tls_key")
    return problems


def parse_policies(text: str) -> tuple[Policy, ...]:
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    try:
        return tuple(Policy[name] for name in names)
    except KeyError as exc:
        raise argparse.ArgumentTypeError(
            f"unknown policy {exc.args[0].lower()}; "
            f"choose from {', '.join(p.name.lower() for p in Policy)}"
        ) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_HELP: dict[str, str] = {
    "listen": "gRPC address HOST:PORT (port 0 picks a free one)",
    "metrics_listen": "Prometheus metrics address HOST:PORT, served at /metrics ('' = off)",
    "data_dir": "directory for the handler's state",
    "max_runs": "runs without a result before a job is ERROR",
    "default_max_run_time": "seconds a run may take when the job sets no max_run_time",
    "result_wait": "seconds a run may go without progress or heartbeat before HNDL-004",
    "heartbeat_interval": "seconds between heartbeats on scanner streams",
    "heartbeat_timeout": "seconds of silence after which a scanner is gone",
    "default_policies": "comma-separated policies for jobs that name none ('' = none: HNDL-014)",
    "interactive_share": "share of assignments for the interactive lane while both lanes wait",
    "result_workers": "result workers (the seed's scanWorkers)",
    "result_backlog_limit": "results waiting for workers before new assignments are held back",
    "fail_severity": "vulnerabilities at or above this severity fail a scan",
    "fail_on_malware": "any malware fails a scan (true/false)",
    "fail_on_secrets": "any secret fails a scan (true/false)",
    "risk_acceptance_days": "default lifetime of a risk acceptance, in days",
    "receiver_url": "receiving server: http(s)://... webhook or grpc://host:port ('' = none)",
    "receiver_secret_file": "file with the webhook HMAC secret (or IMAGE_HANDLER_RECEIVER_SECRET)",
    "delivery_attempts": "failed attempts in a row before a job's undelivered result is HNDL-001",
    "delivery_backoff": "first retry delay in seconds (doubles, with jitter, up to the max)",
    "delivery_max_backoff": "longest delay between retries of an owed delivery, in seconds",
    "delivery_timeout": "seconds one delivery attempt may take",
    "delivery_concurrency": "deliveries in flight at once (the webhook's pooled connections)",
    "watch_log_bytes": "bytes of recent job events kept for watchers of every job",
    "watch_lag_bytes": "bytes a watcher may fall behind before it is ended (it can resume)",
    "watch_resume_seconds": "seconds events stay resumable after the last all-jobs watcher left",
    "queue_limit": "most PENDING jobs at once; 0 = no limit",
    "max_batch": "most jobs in one SubmitJobs call",
    "timezone": "IANA time zone for log timestamps, or 'local' (HNDL-015 when unknown)",
    "log_format": "auto, json or console",
    "log_level": "debug, info, warning or error",
    "grace_period": "seconds SIGTERM waits for running jobs",
    "reflection": "serve gRPC server reflection (true/false)",
    "storage": "journal (crash-safe, in --data-dir), memory (nothing survives a restart) or "
    "postgres (several replicas share one queue in --database-url)",
    "database_url": "PostgreSQL URL for --storage postgres (postgresql://USER@HOST:PORT/DB)",
    "database_schema": "schema holding the handler's tables in --database-url",
    "lease_seconds": "seconds a replica's runs outlive its last lease renewal (postgres)",
    "fsync": "journal fsync: always, batch (group commit) or never",
    "snapshot_interval": "seconds between snapshots",
    "snapshot_journal_mb": "journal size (MiB) that triggers a snapshot",
    "salvage": "start on a damaged data directory, keeping what is readable",
    "retention_days": "days FINISHED, ERROR and CANCELLED jobs are kept",
    "prune_interval": "seconds between retention sweeps",
    "reuse_window": "seconds a good scan of an image digest answers a submit of the same digest "
    "and policies at once (same vulnerability database; 0 = never)",
    "rematch_on_update": "match the stored SBOMs again when a scanner reports a newer "
    "vulnerability database (true/false)",
    "event_loop": "asyncio, or uvloop (faster; needs the uvloop package)",
    "tls_cert": "PEM certificate chain: TLS on the gRPC and metrics ports ('' = plaintext)",
    "tls_key": "PEM private key of --tls-cert",
    "client_ca": "PEM CA bundle: clients must present a certificate it issued (mutual TLS)",
    "token_file": "token file, lines 'NAME ROLES sha256:HEX' ('' = no tokens needed)",
    "token_reload_interval": "seconds between checks of --token-file for a change",
    "max_receive_bytes": "largest request message accepted, in bytes (HNDL-007 above)",
    "max_send_bytes": "largest response message sent, in bytes (HNDL-007 above)",
    "max_result_bytes": "largest scan result a scanner may send, in bytes (the job is ERROR)",
    "max_streams_per_client": "open streams (watch, scanner, ...) per client; 0 = no limit",
    "submit_rate": "jobs per second each client may submit; 0 = no limit",
    "submit_burst": "jobs a client may submit at once under --submit-rate; 0 = one second's worth",
    "max_string_length": "longest free-text field of a job (paths, URLs), in characters",
    "max_labels": "most labels on one job",
    "handshake_timeout": "seconds a connection may take to finish its TLS/HTTP2 handshake",
    "health_listen": "plaintext HOST:PORT with only the health service, for probes that cannot "
    "speak TLS ('' = none)",
    "allowed_registries": "registries jobs may name, comma-separated HOST[:PORT] patterns "
    "(* any part; no port = the default port only)",
    "allowed_artifact_urls": "artifact URL prefixes jobs may name, comma-separated "
    "SCHEME://HOST[:PORT]/PATH ('' = none)",
    "allowed_networks": "internal networks (CIDR, comma-separated) jobs may reach; loopback, "
    "link-local and private addresses are refused otherwise",
    "artifact_roots": "directories artifact paths may be under, comma-separated ('' = none)",
    "node_roots": "directories node root_paths may be under, comma-separated ('' = none)",
    "credential_grants": "JSON file: which callers may use which credentials_ref, for which "
    "registries ('' = none may)",
}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """One flag per Config field; each defaults to IMAGE_HANDLER_<FIELD> when it is set."""
    env = os.environ if environ is None else environ
    defaults = Config()
    for f in fields(Config):
        default: Any = getattr(defaults, f.name)
        convert: Any
        if f.name == "default_policies":
            convert = parse_policies
        elif isinstance(default, bool):
            convert = _bool
        elif isinstance(default, Path):
            convert = Path
        else:
            convert = type(default)
        env_name = ENV_PREFIX + f.name.upper()
        shown = (
            ",".join(p.name.lower() for p in default) if f.name == "default_policies" else default
        )
        env_value = env.get(env_name)
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=convert,
            default=convert(env_value) if env_value is not None else default,
            help=f"{_HELP.get(f.name, f.name)} [env {env_name}; default {shown}]",
        )


def from_namespace(namespace: argparse.Namespace) -> Config:
    return Config(**{f.name: getattr(namespace, f.name) for f in fields(Config)})


def parse(argv: Sequence[str], environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="image-handler serve")
    add_arguments(parser, environ)
    return from_namespace(parser.parse_args(argv))


__all__ = ["Config", "add_arguments", "from_namespace", "parse", "parse_policies"]
