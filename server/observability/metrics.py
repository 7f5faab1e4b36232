"""Prometheus metrics: the handler's figures as Prometheus text on ``--metrics-listen``.

Two sources, both through the handler's façade:

- **Transitions** (``handler.events``): every status change arrives here the moment it
  happens, so the histograms are exact: dispatch latency (a job's creation to its first
  assignment), run duration (an assignment to the run's end) and runs per job (at a terminal
  status).
- **Current state**, read when Prometheus scrapes: queue depth per lane, jobs per status,
  scanners and their slots, the result backlog. A custom collector reads them at scrape time, so
  the figures are never stale and cost nothing between scrapes.

The HTTP endpoint is a small asyncio server on the handler's own event loop: a scrape reads the
handler's state on the loop that owns it (no thread ever sees a half-made change) and ``stop``
closes it with the handler. Every handler gets its own :class:`CollectorRegistry`, so tests may
run many handlers in one process.

Code that cannot reach a handler (the journal, result deliveries) uses the process-wide
:data:`JOURNAL_FSYNC_SECONDS` and :data:`DELIVERIES_FAILED`, which every handler's registry also
exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
from collections.abc import Iterable
from datetime import UTC, datetime, time
from urllib.parse import urlsplit

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from imagehandler.errors import Catalogue, HandlerError
from server.core.model import Job, JobStatus, Lane, Transition
from server.service.events import Subscription
from server.service.handler import Handler, QueueStats
from server.service.sessions import ScannerSession, ScannerStatus
from server.validation import parse_release_date

log = structlog.get_logger("imagehandler.metrics")

PREFIX = "imagehandler_"

# Submit -> assignment: fine-grained at the millisecond end, where a healthy handler lives.
DISPATCH_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Assignment -> end of the run: scans take from milliseconds (no-op) to the 30-minute default limit.
RUN_DURATION_BUCKETS = (
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
# 0: cancelled before any run; 3 is the default --max-runs.
RUNS_PER_JOB_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0)
FSYNC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

# ----- process-wide metrics (one handler per process in production) -----------------------

JOURNAL_FSYNC_SECONDS = Histogram(
    PREFIX + "journal_fsync_seconds",
    "Time one fsync of the journal took (a group commit counts once).",
    buckets=FSYNC_BUCKETS,
    registry=None,
)
"""The journal observes each fsync: ``JOURNAL_FSYNC_SECONDS.observe(seconds)``."""

DELIVERIES_FAILED = Counter(
    PREFIX + "deliveries_failed",
    "Deliveries to the receiving server that failed (each failed attempt counts).",
    registry=None,
)
"""Result forwarding counts each failed delivery attempt: ``DELIVERIES_FAILED.inc()``."""

# How a run ended, by the status its job moved to from IN_PROGRESS.
RUN_OUTCOMES: dict[JobStatus, str] = {
    JobStatus.PROCESSING_RESULTS: "result",
    JobStatus.PENDING: "retried",
    JobStatus.ERROR: "error",
    JobStatus.CANCELLED: "cancelled",
}

_HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REQUEST_TIMEOUT = 10.0
_MAX_REQUEST_HEAD = 16 * 1024


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``HOST:PORT`` (``[v6]:PORT``; ``:PORT`` for every interface) -> (host or None, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise HandlerError(
            Catalogue.SYSTEM_ERROR,
            f"--metrics-listen {listen!r} is not HOST:PORT (for example 0.0.0.0:9090; port 0 "
            "picks a free one)",
        )
    host = host.removeprefix("[").removesuffix("]")
    return (host or None), int(port_text)


def _age(since: datetime | None, now: datetime) -> float:
    return max(0.0, (now - since).total_seconds()) if since is not None else 0.0


def _database_ages(connected: Iterable[ScannerSession], now: datetime) -> GaugeMetricFamily:
    """Age of each connected scanner's databases: what an alert on stale data reads."""
    family = GaugeMetricFamily(
        PREFIX + "scanner_database_age_seconds",
        "Age of a connected scanner's database, from its release date to now.",
        labels=["scanner_id", "database"],
    )
    for session in connected:
        for database in session.profile.databases:
            # Validated at registration (HNDL-012/013), so it parses; a plain date is midnight UTC.
            released = parse_release_date(database.name, database.released_at)
            if not isinstance(released, datetime):
                released = datetime.combine(released, time(), UTC)
            family.add_metric([session.profile.scanner_id, database.name], _age(released, now))
    return family


class StateCollector:
    """Gauges read from the handler at scrape time (``stats`` is taken just before)."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.stats: QueueStats | None = None

    def collect(self) -> Iterable[Metric]:
        handler = self._handler
        stats = self.stats
        now = datetime.now(UTC)

        depth = GaugeMetricFamily(
            PREFIX + "queue_depth", "PENDING jobs waiting in the lane's queue.", labels=["lane"]
        )
        oldest = GaugeMetricFamily(
            PREFIX + "queue_oldest_age_seconds",
            "Age of the lane's oldest PENDING job (0 when the lane is empty).",
            labels=["lane"],
        )
        for lane in Lane:
            depth.add_metric([lane.name.lower()], stats.pending_by_lane[lane] if stats else 0)
            head = stats.oldest_pending[lane] if stats else None
            oldest.add_metric([lane.name.lower()], _age(head, now))
        yield depth
        yield oldest
        yield GaugeMetricFamily(
            PREFIX + "queue_limit",
            "Most PENDING jobs allowed at once (--queue-limit; 0 = no limit).",
            value=handler.config.queue_limit,
        )

        jobs = GaugeMetricFamily(
            PREFIX + "jobs", "Jobs the handler knows, by status.", labels=["status"]
        )
        for status in JobStatus:
            jobs.add_metric([status.name.lower()], stats.by_status.get(status, 0) if stats else 0)
        yield jobs

        connected = handler.connected_scanners()
        by_status = dict.fromkeys(
            (ScannerStatus.FREE, ScannerStatus.BUSY, ScannerStatus.DRAINING), 0
        )
        for session in connected:
            if session.status in by_status:
                by_status[session.status] += 1
        scanners = GaugeMetricFamily(
            PREFIX + "scanners",
            "Connected scanners by status: free (a free slot and Ready), busy, draining.",
            labels=["status"],
        )
        for scanner_status, count in by_status.items():
            scanners.add_metric([scanner_status.name.lower()], count)
        yield scanners
        yield GaugeMetricFamily(
            PREFIX + "scanners_connected",
            "Scanners holding a Connect stream.",
            value=len(connected),
        )
        yield GaugeMetricFamily(
            PREFIX + "scanner_slots",
            "Slots (jobs at once) of the connected scanners.",
            value=sum(session.profile.slots for session in connected),
        )
        yield GaugeMetricFamily(
            PREFIX + "scanner_free_slots",
            "Free slots of the Free scanners: jobs that could be assigned at once.",
            value=sum(session.free_slots for session in connected if session.is_free),
        )
        yield _database_ages(connected, now)
        # The readiness probe's answer as a figure: recovery ended and submits are taken.
        yield GaugeMetricFamily(
            PREFIX + "ready",
            "1 once recovery ended and the handler takes work; 0 while recovering or draining.",
            value=int(handler.ready and handler.accepting_submits),
        )

        yield GaugeMetricFamily(
            PREFIX + "result_backlog",
            "Results waiting for a result worker.",
            value=stats.result_backlog if stats else 0,
        )
        yield GaugeMetricFamily(
            PREFIX + "result_oldest_age_seconds",
            "Time the oldest result not yet processed has waited (0 when none).",
            value=stats.result_backlog_age if stats else 0.0,
        )
        yield GaugeMetricFamily(
            PREFIX + "result_workers",
            "Result workers (--result-workers, the seed's scanWorkers).",
            value=handler.config.result_workers,
        )
        yield GaugeMetricFamily(
            PREFIX + "deliveries_owed",
            "Jobs that owe the receiving server a delivery (status change, result or verdict).",
            value=stats.deliveries_owed if stats else 0,
        )
        yield GaugeMetricFamily(
            PREFIX + "deliveries_oldest_owed_age_seconds",
            "How long the job owing a delivery the longest has waited (0 when none).",
            value=stats.deliveries_oldest_age if stats else 0.0,
        )
        yield GaugeMetricFamily(
            PREFIX + "watchers",
            "WatchJobs streams watching every job (each a cursor into the shared event log).",
            value=handler.events.feeds,
        )
        yield GaugeMetricFamily(
            PREFIX + "watch_log_bytes",
            "Bytes of job events kept for watchers of every job (--watch-log-bytes at most).",
            value=handler.events.logged_bytes,
        )
        yield CounterMetricFamily(
            PREFIX + "results_reused",
            "Jobs that finished at once with the stored result of an image digest "
            "(--reuse-window).",
            value=handler.reuse.reused,
        )
        yield CounterMetricFamily(
            PREFIX + "rematch_jobs_queued",
            "Rematch jobs queued for stored SBOMs (a newer vulnerability database, RematchJobs).",
            value=handler.rematcher.queued,
        )


class MetricsExporter:
    """The handler's metrics and the HTTP endpoint that serves them."""

    def __init__(
        self, handler: Handler, listen: str, ssl: ssl_module.SSLContext | None = None
    ) -> None:
        self.listen = listen
        self._ssl = ssl  # HTTPS with the handler's --tls-cert
        self._host, self._port = parse_listen(listen)
        self.port = 0
        self.registry = CollectorRegistry()

        self.jobs_submitted = Counter(
            PREFIX + "jobs_submitted",
            "Jobs queued (duplicates returned instead of queued do not count).",
            ["lane"],
            registry=self.registry,
        )
        self.dispatch_latency = Histogram(
            PREFIX + "dispatch_latency_seconds",
            "From a job's submit to its first assignment to a scanner.",
            ["lane"],
            buckets=DISPATCH_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.run_duration = Histogram(
            PREFIX + "run_duration_seconds",
            "From a run's assignment to its end, by how it ended "
            "(result, retried, error, cancelled).",
            ["outcome"],
            buckets=RUN_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.runs_per_job = Histogram(
            PREFIX + "runs_per_job",
            "Runs a job took, observed when it ends (finished, error, cancelled).",
            ["status"],
            buckets=RUNS_PER_JOB_BUCKETS,
            registry=self.registry,
        )
        # Every series exists from the start, at 0. The children are looked up once: labels()
        # costs more than the observation, and these are updated at every transition.
        self._submitted_by_lane = {
            lane: self.jobs_submitted.labels(lane.name.lower()) for lane in Lane
        }
        self._dispatch_latency_by_lane = {
            lane: self.dispatch_latency.labels(lane.name.lower()) for lane in Lane
        }
        self._run_duration_by_end = {
            status: self.run_duration.labels(outcome) for status, outcome in RUN_OUTCOMES.items()
        }
        self._runs_per_job_by_end = {
            status: self.runs_per_job.labels(status.name.lower())
            for status in JobStatus
            if status.terminal
        }
        self._state = StateCollector(handler)
        self.registry.register(self._state)
        self.registry.register(JOURNAL_FSYNC_SECONDS)
        self.registry.register(DELIVERIES_FAILED)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

        self._handler = handler
        self._subscription = Subscription(self._on_transition)
        handler.events.subscribe(self._subscription)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    # ----- transitions ------------------------------------------------------------------

    def _on_transition(self, job: Job, transition: Transition) -> None:
        to_status = transition.to_status
        if transition.from_status is None:
            self._submitted_by_lane[job.spec.lane].inc()
        elif transition.from_status is JobStatus.IN_PROGRESS:
            # state_machine sets started_at at each assignment.
            self._run_duration_by_end[to_status].observe(_age(job.started_at, transition.at))
        if to_status is JobStatus.IN_PROGRESS and transition.run == 1:
            self._dispatch_latency_by_lane[job.spec.lane].observe(
                _age(job.created_at, transition.at)
            )
        elif to_status in self._runs_per_job_by_end:
            self._runs_per_job_by_end[to_status].observe(transition.run)

    # ----- the HTTP endpoint ------------------------------------------------------------

    async def start(self) -> int:
        """Listen; the bound port (useful with port 0)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=_MAX_REQUEST_HEAD, ssl=self._ssl
            )
        except OSError as exc:
            raise HandlerError(
                Catalogue.SYSTEM_ERROR,
                f"cannot listen for metrics on {self.listen}: {exc.strerror or exc}",
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics.listening", address=self.listen, port=self.port)
        return self.port

    async def stop(self) -> None:
        self._handler.events.unsubscribe(self._subscription)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                # The counts a store may have to be asked for, taken before rendering.
                self._state.stats = await self._handler.stats() if self._handler.ready else None
                writer.write(self._respond(head))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            writer.write(_response(400, b"request head too large\n"))
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return _response(400, b"bad request\n")
        method, target, _ = parts
        path = urlsplit(target).path
        if method not in ("GET", "HEAD"):
            return _response(405, b"use GET\n", extra={"Allow": "GET, HEAD"})
        if path == "/":
            body = b"image handler metrics: GET /metrics\n"
            return _response(200, body, head_only=method == "HEAD")
        if path != "/metrics":
            return _response(404, b"not found: the metrics are at /metrics\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        return _response(
            200, encoder(self.registry), content_type=content_type, head_only=method == "HEAD"
        )


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: dict[str, str] | None = None,
    head_only: bool = False,
) -> bytes:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Connection": "close",
        **(extra or {}),
    }
    text = f"HTTP/1.1 {status} {_HTTP_REASONS[status]}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return text.encode("latin-1") + b"\r\n" + (b"" if head_only else body)
