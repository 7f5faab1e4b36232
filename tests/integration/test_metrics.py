"""Prometheus metrics over real HTTP from a running handler while jobs flow.

Every figure is read with a real scrape of ``/metrics`` (urllib, in a thread: the handler runs
on the test's own loop). Each step waits for the event that makes the figure true (an
assignment on the scanner's stream, a job reaching a status) before scraping: no sleeps.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagehandler.errors import HandlerError
from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from server.app import HandlerServer
from server.observability import metrics
from tests.conftest import TEST_CONFIG, Handler, MakeHandler
from tests.helpers import RawScanner, Watcher, image, wait_for_status

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def _get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


async def http_get(
    handler: Handler, path: str = "/metrics", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{handler.server.metrics_port}{path}"
    return await asyncio.to_thread(_get, url, headers)


async def scrape(handler: Handler) -> Samples:
    status, headers, body = await http_get(handler)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_figures_move_as_jobs_flow(make_handler: MakeHandler) -> None:
    handler = await make_handler(metrics_listen="127.0.0.1:0")
    assert handler.server.metrics_port > 0

    m = await scrape(handler)
    assert value(m, "imagehandler_queue_depth", lane="bulk") == 0
    assert total(m, "imagehandler_jobs") == 0
    assert value(m, "imagehandler_scanners_connected") == 0
    assert total(m, "imagehandler_dispatch_latency_seconds_count") == 0
    assert value(m, "imagehandler_result_workers") == TEST_CONFIG.result_workers

    # Two bulk jobs and one interactive, no scanner yet: all wait.
    bulk = [(await handler.jobs.SubmitJob(image(tag=f"v{n}"))).job.id for n in range(2)]
    urgent = (
        await handler.jobs.SubmitJob(image(tag="urgent", lane=common_pb2.LANE_INTERACTIVE))
    ).job.id
    m = await scrape(handler)
    assert value(m, "imagehandler_queue_depth", lane="bulk") == 2
    assert value(m, "imagehandler_queue_depth", lane="interactive") == 1
    assert value(m, "imagehandler_queue_oldest_age_seconds", lane="bulk") >= 0
    assert value(m, "imagehandler_jobs", status="pending") == 3
    assert value(m, "imagehandler_jobs_submitted_total", lane="bulk") == 2
    assert value(m, "imagehandler_jobs_submitted_total", lane="interactive") == 1

    async with RawScanner(handler.scanners, "s1", slots=1) as scanner:
        await scanner.start()
        # The interactive lane goes first.
        (first,) = await scanner.assigned()
        assert first.job_id == urgent
        assert first.run == 1
        m = await scrape(handler)
        assert value(m, "imagehandler_queue_depth", lane="interactive") == 0
        assert value(m, "imagehandler_queue_depth", lane="bulk") == 2
        assert value(m, "imagehandler_jobs", status="pending") == 2
        assert value(m, "imagehandler_jobs", status="in_progress") == 1
        assert value(m, "imagehandler_dispatch_latency_seconds_count", lane="interactive") == 1
        assert value(m, "imagehandler_dispatch_latency_seconds_count", lane="bulk") == 0
        assert value(m, "imagehandler_scanners_connected") == 1
        assert value(m, "imagehandler_scanners", status="busy") == 1
        assert value(m, "imagehandler_scanners", status="free") == 0
        assert value(m, "imagehandler_scanner_slots") == 1
        assert value(m, "imagehandler_scanner_free_slots") == 0

        # A failed run goes back to the queue and runs again: a second run, not a second
        # dispatch (dispatch latency counts first assignments only).
        await scanner.fail(first)
        (again,) = await scanner.assigned()
        assert again.job_id == urgent
        assert again.run == 2
        m = await scrape(handler)
        assert value(m, "imagehandler_run_duration_seconds_count", outcome="retried") == 1
        assert total(m, "imagehandler_dispatch_latency_seconds_count") == 1

        # The result finishes it after two runs; the freed slot takes the first bulk job.
        await scanner.finish(again)
        (second,) = await scanner.assigned()
        assert second.job_id == bulk[0]
        await wait_for_status(handler.jobs, urgent, common_pb2.JOB_STATUS_FINISHED)
        m = await scrape(handler)
        assert value(m, "imagehandler_jobs", status="finished") == 1
        assert value(m, "imagehandler_jobs", status="in_progress") == 1
        assert value(m, "imagehandler_queue_depth", lane="bulk") == 1
        assert value(m, "imagehandler_run_duration_seconds_count", outcome="result") == 1
        assert value(m, "imagehandler_runs_per_job_count", status="finished") == 1
        assert value(m, "imagehandler_runs_per_job_sum", status="finished") == 2
        assert value(m, "imagehandler_runs_per_job_bucket", status="finished", le="1.0") == 0
        assert value(m, "imagehandler_runs_per_job_bucket", status="finished", le="2.0") == 1
        assert value(m, "imagehandler_dispatch_latency_seconds_count", lane="bulk") == 1
        assert total(m, "imagehandler_dispatch_latency_seconds_count") == 2
        assert value(m, "imagehandler_result_backlog") == 0
        assert value(m, "imagehandler_result_oldest_age_seconds") == 0

        # Cancel the job still waiting: it ends with no run at all.
        await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=bulk[1]))
        m = await scrape(handler)
        assert value(m, "imagehandler_queue_depth", lane="bulk") == 0
        assert value(m, "imagehandler_jobs", status="cancelled") == 1
        assert value(m, "imagehandler_runs_per_job_bucket", status="cancelled", le="0.0") == 1

        # Drain: the handler handles a stream's messages in order, so the rejection of a
        # progress report for a job it does not hold proves the drain was taken.
        await scanner.send(drain=scanner_service_pb2.Drain())
        await scanner.send(progress=scanner_service_pb2.Progress(job_id=urgent, percent=1))
        await scanner.expect("rejected")
        m = await scrape(handler)
        assert value(m, "imagehandler_scanners", status="draining") == 1
        assert value(m, "imagehandler_scanners", status="busy") == 0

        watcher = await Watcher(
            handler.jobs, job_service_pb2.WatchJobsRequest(job_id=second.job_id)
        ).subscribed()
    # The scanner went away holding the bulk job: the run ends, the job waits again.
    try:
        await watcher.until(second.job_id, common_pb2.JOB_STATUS_PENDING)
    finally:
        await watcher.close()
    m = await scrape(handler)
    assert value(m, "imagehandler_scanners_connected") == 0
    assert value(m, "imagehandler_queue_depth", lane="bulk") == 1
    assert value(m, "imagehandler_run_duration_seconds_count", outcome="retried") == 2
    assert total(m, "imagehandler_run_duration_seconds_count") == 3
    assert total(m, "imagehandler_jobs") == 3


async def test_every_documented_metric_is_exported(make_handler: MakeHandler) -> None:
    handler = await make_handler(metrics_listen="127.0.0.1:0")
    names = {name for name, _ in await scrape(handler)}
    documented = {
        "imagehandler_queue_depth",
        "imagehandler_queue_oldest_age_seconds",
        "imagehandler_queue_limit",
        "imagehandler_jobs",
        "imagehandler_jobs_submitted_total",
        "imagehandler_dispatch_latency_seconds_bucket",
        "imagehandler_run_duration_seconds_bucket",
        "imagehandler_runs_per_job_bucket",
        "imagehandler_scanners",
        "imagehandler_scanners_connected",
        "imagehandler_scanner_slots",
        "imagehandler_scanner_free_slots",
        "imagehandler_result_backlog",
        "imagehandler_result_oldest_age_seconds",
        "imagehandler_result_workers",
        "imagehandler_deliveries_failed_total",
        "imagehandler_journal_fsync_seconds_bucket",
        "imagehandler_ready",
        "process_cpu_seconds_total",
    }
    assert documented <= names, documented - names
    # Dispatch latency is fine-grained at the millisecond end.
    m = await scrape(handler)
    buckets = sorted(
        float(dict(labels)["le"])
        for name, labels in m
        if name == "imagehandler_dispatch_latency_seconds_bucket" and ("lane", "bulk") in labels
    )
    assert buckets[:3] == [0.0005, 0.001, 0.0025]
    assert buckets[-2:] == [10.0, float("inf")]


async def test_each_handler_has_its_own_figures(make_handler: MakeHandler) -> None:
    one = await make_handler(metrics_listen="127.0.0.1:0", queue_limit=7)
    two = await make_handler(metrics_listen="127.0.0.1:0")
    await one.jobs.SubmitJob(image())
    assert value(await scrape(one), "imagehandler_queue_depth", lane="bulk") == 1
    assert value(await scrape(one), "imagehandler_queue_limit") == 7
    assert value(await scrape(two), "imagehandler_queue_depth", lane="bulk") == 0


async def test_http_details(make_handler: MakeHandler) -> None:
    handler = await make_handler(metrics_listen="127.0.0.1:0")
    status, _, body = await http_get(handler, "/nope")
    assert status == 404
    assert b"/metrics" in body
    status, _, body = await http_get(handler, "/")
    assert status == 200
    assert b"/metrics" in body
    status, headers, body = await http_get(
        handler, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    # A client that connects and sends nothing holds nothing up: scrapes go on.
    reader, writer = await asyncio.open_connection("127.0.0.1", handler.server.metrics_port)
    try:
        assert value(await scrape(handler), "imagehandler_scanners_connected") == 0
    finally:
        writer.close()
        await writer.wait_closed()
    del reader


async def test_metrics_are_off_by_default(handler: Handler) -> None:
    assert handler.server.metrics is None
    assert handler.server.metrics_port == 0


async def test_stop_closes_the_metrics_port(tmp_path: Path) -> None:
    server = HandlerServer(replace(TEST_CONFIG, metrics_listen="127.0.0.1:0", data_dir=tmp_path))
    await server.start()
    port = server.metrics_port
    await server.stop(0)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "127.0.0.1:"])
def test_a_bad_metrics_address_is_refused(listen: str) -> None:
    with pytest.raises(HandlerError) as caught:
        metrics.parse_listen(listen)
    assert caught.value.code == "HNDL-007"
    assert "--metrics-listen" in caught.value.message


async def test_a_busy_metrics_port_stops_the_start(
    make_handler: MakeHandler, tmp_path: Path
) -> None:
    handler = await make_handler(metrics_listen="127.0.0.1:0")
    busy = f"127.0.0.1:{handler.server.metrics_port}"
    server = HandlerServer(replace(TEST_CONFIG, metrics_listen=busy, data_dir=tmp_path))
    try:
        with pytest.raises(HandlerError) as caught:
            await server.start()
        assert f"cannot listen for metrics on {busy}" in caught.value.message
    finally:
        await server.stop(0)


def test_parse_listen() -> None:
    assert metrics.parse_listen("0.0.0.0:9090") == ("0.0.0.0", 9090)
    assert metrics.parse_listen(":9090") == (None, 9090)
    assert metrics.parse_listen("[::1]:0") == ("::1", 0)


async def test_journal_fsyncs_are_timed(make_handler: MakeHandler) -> None:
    handler = await make_handler(metrics_listen="127.0.0.1:0", fsync="batch")
    before = value(await scrape(handler), "imagehandler_journal_fsync_seconds_count")
    # With fsync=batch, an acknowledged submit has waited for an fsync.
    await handler.jobs.SubmitJob(image(tag="fsync-timed"))
    after = value(await scrape(handler), "imagehandler_journal_fsync_seconds_count")
    assert after > before


async def test_database_ages_and_readiness(make_handler: MakeHandler) -> None:
    """What the stale-database and not-ready alerts read: each connected scanner's database
    age from its release date, and 1/0 for taking work (0 from the moment SIGTERM drains)."""
    handler = await make_handler(metrics_listen="127.0.0.1:0")
    m = await scrape(handler)
    assert value(m, "imagehandler_ready") == 1
    assert not [n for n, _ in m if n == "imagehandler_scanner_database_age_seconds"]

    released = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3, hours=2)
    plain_day = (datetime.now(UTC) - timedelta(days=10)).date()
    databases = [
        common_pb2.DatabaseVersion(
            name="vulns", version="7", released_at=released.isoformat().replace("+00:00", "Z")
        ),
        common_pb2.DatabaseVersion(name="malware", version="2", released_at=plain_day.isoformat()),
    ]
    async with RawScanner(handler.scanners, "s-old", databases=databases) as scanner:
        await scanner.start()
        before = datetime.now(UTC)
        m = await scrape(handler)
        after = datetime.now(UTC)
        age = value(
            m, "imagehandler_scanner_database_age_seconds", scanner_id="s-old", database="vulns"
        )
        assert (before - released).total_seconds() <= age <= (after - released).total_seconds()
        midnight = datetime.combine(plain_day, time(), UTC)
        age = value(
            m, "imagehandler_scanner_database_age_seconds", scanner_id="s-old", database="malware"
        )
        assert (before - midnight).total_seconds() <= age <= (after - midnight).total_seconds()

        # SIGTERM's drain: the scanner holds a job, so the handler waits for it, not ready.
        await handler.jobs.SubmitJob(image(tag="held"))
        (held,) = await scanner.assigned()
        stopping = asyncio.create_task(handler.server.stop(30))
        await scanner.expect("drain")
        assert value(await scrape(handler), "imagehandler_ready") == 0
        await scanner.finish(held)
        await stopping
