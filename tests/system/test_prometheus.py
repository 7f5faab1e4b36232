"""A real Prometheus (Debian's package) scrapes a running handler with the chart's scrape settings
(the ServiceMonitor's path, scheme and interval) and evaluates the chart's PrometheusRule; every
alert rule evaluates cleanly, every series the rules read exists, and every query of the Grafana
dashboard returns data once jobs have flowed (jobs in both lanes, results, failed deliveries to
a receiver that refuses connections, journal fsyncs)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagehandler.v1 import common_pb2
from scanner_client import ClientConfig, NoopEngine, ScannerClient
from tests.conftest import Handler, MakeHandler
from tests.helm.test_helm import CHART, FULLNAME, find, manifests, render
from tests.helpers import image

DEADLINE = 60.0
JOBS = 12
# What Grafana puts in for $__rate_interval at this scrape interval, with room to spare.
RATE_INTERVAL = "1m"
DASHBOARD = json.loads((CHART / "files" / "dashboard.json").read_text())

pytestmark = pytest.mark.timeout(120)


class Prometheus:
    """``prometheus`` on a free port with a config file; queried over its HTTP API."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is missing: apt-get install prometheus (make test-tools does)")
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("w+")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                "--web.listen-address=127.0.0.1:0",
                "--log.format=json",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = ""

    async def started(self) -> Prometheus:
        """Wait for its log to name the port it listens on."""
        async with asyncio.timeout(DEADLINE):
            while not self.url:
                assert self.process.poll() is None, self.logged()
                for line in self.logged().splitlines():
                    event = json.loads(line)
                    if event.get("msg") == "Listening on":
                        self.url = f"http://{event['address']}"
                await asyncio.sleep(0.05)  # polls the log file of another process
        return self

    def logged(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    async def get(self, path: str, **params: str) -> Any:
        return await asyncio.to_thread(self._get, path, **params)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]  # type: ignore[no-any-return]

    async def until(self, expr: str) -> list[dict[str, Any]]:
        """Wait (with a deadline) for ``expr`` to return data: Prometheus scrapes every second."""
        async with asyncio.timeout(DEADLINE):
            # Another process's state, seen only through its API: poll it.
            while not (result := await self.query(expr)):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        return result


def chart_objects() -> tuple[dict[str, Any], dict[str, Any], str]:
    """The ServiceMonitor's endpoint, the PrometheusRule's spec and the metrics Service name,
    rendered with a one-second interval so the test need not wait long."""
    docs = manifests(
        render(
            {
                "serviceMonitor": {"enabled": True, "interval": "1s", "scrapeTimeout": "1s"},
                "prometheusRule": {"enabled": True},
            }
        )
    )
    (endpoint,) = find(docs, "ServiceMonitor", FULLNAME)["spec"]["endpoints"]
    rules = find(docs, "PrometheusRule", FULLNAME)["spec"]
    service = find(docs, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"][0]["name"] == endpoint["port"]
    return endpoint, rules, service["metadata"]["name"]


@pytest.fixture
async def refusing_receiver() -> AsyncIterator[str]:
    """A bound port that does not listen: every delivery is refused (HNDL-001)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/results"


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def dashboard_queries(job: str) -> list[tuple[str, str]]:
    queries = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$job", job)
                .replace("$instance", ".+")
            )
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know"
            queries.append((panel["title"], expr))
    return queries


async def test_prometheus_scrapes_the_handler_and_every_query_returns_data(
    make_handler: MakeHandler, refusing_receiver: str, tmp_path: Path
) -> None:
    endpoint, rules, job = chart_objects()
    handler: Handler = await make_handler(
        metrics_listen="127.0.0.1:0",
        queue_limit=1000,
        fsync="batch",
        receiver_url=refusing_receiver,
        delivery_attempts=2,
        delivery_backoff=0.01,
        delivery_timeout=2.0,
    )
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    prometheus = Prometheus(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yaml")],
            "scrape_configs": [
                {
                    # As the Prometheus Operator names a ServiceMonitor's job: the Service.
                    "job_name": job,
                    "metrics_path": endpoint["path"],
                    "scheme": endpoint["scheme"],
                    "scrape_interval": endpoint["interval"],
                    "scrape_timeout": endpoint["scrapeTimeout"],
                    "static_configs": [{"targets": [f"127.0.0.1:{handler.server.metrics_port}"]}],
                }
            ],
        },
        tmp_path,
    )
    client = ScannerClient(
        handler.address,
        NoopEngine(),
        ClientConfig(scanner_id="prom-scanner", slots=4, backoff_max=0.1),
    )
    running = asyncio.create_task(client.run())
    try:
        await prometheus.started()
        # A first scrape before any traffic, so rates see the counters move.
        await prometheus.until(f'up{{job="{job}"}} == 1')
        async with asyncio.timeout(DEADLINE):
            await client.registered.wait()
        for n in range(JOBS):
            lane = common_pb2.LANE_INTERACTIVE if n % 3 == 0 else common_pb2.LANE_BULK
            await handler.jobs.SubmitJob(image(tag=f"p{n}", lane=lane))
        async with asyncio.timeout(DEADLINE):
            await client.wait_for(lambda stats: stats.jobs_done >= JOBS)
        await prometheus.until(f'sum(imagehandler_runs_per_job_count{{job="{job}"}}) >= {JOBS}')
        await prometheus.until(f'imagehandler_deliveries_failed_total{{job="{job}"}} > 0')

        # Grafana's variables: the job and its instances are found from imagehandler_ready.
        jobs = await prometheus.get("/api/v1/label/job/values", **{"match[]": "imagehandler_ready"})
        assert jobs == [job]

        empty, not_a_number = [], []
        for title, expr in dashboard_queries(job):
            result = await prometheus.query(expr)
            if not result:
                empty.append((title, expr))
            elif not finite(result):
                not_a_number.append((title, expr))
        assert empty == [], "dashboard queries without data"
        assert not_a_number == [], "dashboard queries with no finite value"

        # Every series the alert rules read is there...
        read = {
            name
            for group in rules["groups"]
            for rule in group["rules"]
            for name in re.findall(r"\b(imagehandler_[a-z_]+)\b", rule["expr"])
        }
        assert len(read) >= 9
        for name in sorted(read):
            assert await prometheus.query(f'{name}{{job="{job}"}}'), f"{name}: no series"
        # ...and Prometheus evaluates every rule without an error.
        async with asyncio.timeout(DEADLINE):
            while True:
                groups = (await prometheus.get("/api/v1/rules"))["groups"]
                evaluated = [r for g in groups for r in g["rules"]]
                if all(r.get("lastEvaluation", "").startswith("20") for r in evaluated):
                    break
                await asyncio.sleep(0.2)
        assert len(evaluated) == sum(len(g["rules"]) for g in rules["groups"])
        assert [
            (r["name"], r["health"], r.get("lastError")) for r in evaluated if r["health"] != "ok"
        ] == []
        # A healthy handler with a scanner fires nothing.
        assert [r["name"] for r in evaluated if r["state"] != "inactive"] == []
    finally:
        await client.stop()
        await asyncio.gather(running, return_exceptions=True)
        prometheus.stop()
