"""The scanner side of the image handler: plug a scanning engine in, the client does the rest.

A minimal engine, run with ``asyncio.run(ScannerClient("127.0.0.1:50051", Hello()).run())``::

    from scanner_client import Database, Engine, Job, ProgressReporter, ScanFailure
    from imagehandler.v1 import common_pb2

    class Hello(Engine):
        name = "hello"

        def databases(self) -> list[Database]:
            return [Database("hello-db", "1", released_at="2026-11-20")]

        async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
            progress.report("analyse", 50)
            if not job.object.HasField("image"):
                raise ScanFailure("hello scans images only", code="HNDL-005", permanent=True)
            return common_pb2.ScanResult(verdict=common_pb2.VERDICT_PASSED)

The client registers, keeps the stream and its heartbeats up, runs each assigned job as a task
(one per slot), cancels it at its deadline (HNDL-004), reports results in batches, turns
:class:`ScanFailure` into a ``Failure`` and any other exception into HNDL-007, stops taking
work and exits when the engine raises :class:`ScannerBroken`, and reconnects with backoff when
the stream breaks. ``image-scanner`` (:mod:`scanner_client.cli`) runs it.

A job is untrusted input: an engine that opens files or connects anywhere for a job holds it to
a :class:`ScannerPolicy` first (:mod:`scanner_client.job_policy`, :mod:`scanner_client.egress`;
docs/operating/multi-tenant-hardening.md).
"""

from scanner_client.backoff import Backoff
from scanner_client.client import ClientConfig, ClientStats, Registration, ScannerClient
from scanner_client.engine import (
    Database,
    Engine,
    Job,
    Kind,
    NullProgress,
    Policy,
    ProgressReporter,
    ScanFailure,
    ScannerBroken,
)
from scanner_client.engines import ENGINES, EngineSettings, NoopEngine
from scanner_client.errors import ScannerRejected
from scanner_client.job_policy import ScannerPolicy

__all__ = [
    "ENGINES",
    "Backoff",
    "ClientConfig",
    "ClientStats",
    "Database",
    "Engine",
    "EngineSettings",
    "Job",
    "Kind",
    "NoopEngine",
    "NullProgress",
    "Policy",
    "ProgressReporter",
    "Registration",
    "ScanFailure",
    "ScannerBroken",
    "ScannerClient",
    "ScannerPolicy",
    "ScannerRejected",
]
