"""SIGTERM under the chart's probes: a draining handler goes unready at once but stays live
until it exits, so its liveness probe cannot have it killed before the drain is over.

The chart is rendered (Helm as a library, as in tests/helm/test_helm.py) and its handler container's
environment, probe settings and termination grace period are read from the manifests; a real
``image-handler serve`` runs with that environment while a scanner holds a job (so the drain
lasts the whole grace period); the test probes like the kubelet, only more often: every probe
opens a new connection and fails past the probe's ``timeoutSeconds``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagehandler.v1 import job_service_pb2_grpc, scanner_service_pb2_grpc
from tests.helm.test_helm import FULLNAME, container, environment, find, manifests, render
from tests.helpers import RawScanner, image
from tests.integration.test_scanner_client_protocol import Spawn, spawn

__all__ = ["spawn"]  # the fixture, imported for this module's tests

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The drain this test sets (handler.timeouts.gracePeriod); the chart's default is longer.
GRACE = 2
# How often the test probes: far more often than any kubelet period, so it misses nothing.
PROBE_EVERY = 0.05


@dataclass(frozen=True)
class Probe:
    at: float
    # The status, or None when the probe failed (refused, or no answer within its timeout).
    live: int | None
    ready: int | None


async def check(address: str, service: str, timeout: float) -> int | None:
    """One probe as the kubelet makes it: a new connection, one Check, a deadline."""
    async with aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_draining_handler_stays_live_until_it_exits_under_the_charts_probes(
    spawn: Spawn, tmp_path: Path
) -> None:
    docs = manifests(render({"handler": {"timeouts": {"gracePeriod": GRACE}}}))
    statefulset = find(docs, "StatefulSet", FULLNAME)
    handler = container(statefulset)
    liveness, readiness = handler["livenessProbe"], handler["readinessProbe"]
    termination_grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = environment(docs, statefulset)
    assert float(env["IMAGE_HANDLER_GRACE_PERIOD"]) == GRACE
    address = f"127.0.0.1:{free_port()}"
    env.update(
        IMAGE_HANDLER_LISTEN=address,
        IMAGE_HANDLER_DATA_DIR=str(tmp_path / "data"),
        IMAGE_HANDLER_METRICS_LISTEN="127.0.0.1:0",
    )
    child = await spawn("-m", "server.cli", "serve", env=env)
    await child.line(lambda line: line.startswith("image-handler listening on"))
    live_service, live_timeout = liveness["grpc"]["service"], liveness["timeoutSeconds"]
    ready_service, ready_timeout = readiness["grpc"]["service"], readiness["timeoutSeconds"]
    assert live_service == ""  # the overall status

    async with aio.insecure_channel(address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        async with RawScanner(scanner_service_pb2_grpc.ScannerServiceStub(channel), "s1") as held:
            await held.start()
            await jobs.SubmitJob(image())
            await held.assigned()  # never finished: the drain waits the whole grace period
            assert await check(address, live_service, live_timeout) == SERVING
            loop = asyncio.get_running_loop()
            exited = asyncio.create_task(child.process.wait())
            child.signal(signal.SIGTERM)
            sigterm = loop.time()
            probes: list[Probe] = []
            while not exited.done():
                live, ready = await asyncio.gather(
                    check(address, live_service, live_timeout),
                    check(address, ready_service, ready_timeout),
                )
                probes.append(Probe(loop.time(), live, ready))
                # A pacing interval between probes, as the kubelet's period is (not a wait
                # for state: the loop ends on the exit).
                await asyncio.wait({exited}, timeout=PROBE_EVERY)
            assert await exited == 0, child.stderr
            exit_at = loop.time()

    # Readiness: NOT_SERVING once the signal is handled, and for good, so the Service stops
    # routing to the pod.
    unready = [n for n, p in enumerate(probes) if p.ready == NOT_SERVING]
    assert unready, probes
    assert all(p.ready != SERVING for p in probes[unready[0] :])
    # Liveness: SERVING while the handler drains; never NOT_SERVING.
    assert all(p.live in (SERVING, None) for p in probes), probes
    assert any(p.live == SERVING for p in probes)
    # Probes fail only in the last moment, once the server has stopped listening: shorter than
    # the failureThreshold consecutive failures, periodSeconds apart, a restart needs.
    last_live = max((p.at for p in probes if p.live == SERVING), default=sigterm)
    failing_for = exit_at - last_live
    assert failing_for < (liveness["failureThreshold"] - 1) * liveness["periodSeconds"]
    # The drain, snapshot and exit fit in the pod's termination grace period.
    assert exit_at - sigterm < termination_grace
