"""What operators and Kubernetes rely on: health, reflection, and the real grpcurl binary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import BackgroundHandler, Handler

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


@pytest.mark.parametrize(
    "service", ["", "imagehandler.v1.JobService", "imagehandler.v1.ScannerService"]
)
async def test_health_is_serving_overall_and_per_service(handler: Handler, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(handler.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_goes_not_serving_when_the_handler_stops(make_handler: Any) -> None:
    handler = await make_handler()
    stub = health_pb2_grpc.HealthStub(handler.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="imagehandler.v1.JobService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    await handler.server.stop(1)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_every_service(handler: Handler) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(handler.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "imagehandler.v1.JobService",
        "imagehandler.v1.ScannerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "grpcurl is installed by the project's dev extras"
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_lists_services_and_submits_a_job(background_handler: BackgroundHandler) -> None:
    address = background_handler.server.address
    listed = grpcurl("-plaintext", address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "imagehandler.v1.JobService",
        "imagehandler.v1.ScannerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    submitted = grpcurl(
        "-plaintext",
        "-d",
        '{"object": {"image": {"repository": "library/alpine", "tag": "3.20"}}, "lane": "LANE_INTERACTIVE"}',
        address,
        "imagehandler.v1.JobService/SubmitJob",
    )
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["job"]
    assert job["status"] == "JOB_STATUS_PENDING"
    assert job["lane"] == "LANE_INTERACTIVE"
    got = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"job_id": job["id"]}),
        address,
        "imagehandler.v1.JobService/GetJob",
    )
    assert json.loads(got.stdout)["job"]["id"] == job["id"]


def test_grpcurl_shows_the_hndl_code_of_a_rejected_call(
    background_handler: BackgroundHandler,
) -> None:
    address = background_handler.server.address
    failed = grpcurl(
        "-plaintext", "-d", '{"job_id": "nope"}', address, "imagehandler.v1.JobService/GetJob"
    )
    assert failed.returncode != 0
    assert "Code: InvalidArgument" in failed.stderr
    assert "HNDL-008: job id empty: 'nope' is not a job id" in failed.stderr
    assert '"reason":"HNDL-008"' in failed.stderr.replace(" ", "")


def test_grpcurl_health_check(background_handler: BackgroundHandler) -> None:
    checked = grpcurl(
        "-plaintext", background_handler.server.address, "grpc.health.v1.Health/Check"
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}


def test_sync_clients_see_the_real_handler(grpc_channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(grpc_channel)
    assert (
        stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    )


def test_serve_logs_json_events_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """Production shape: stderr is not a terminal, so logs are JSON lines; SIGTERM exits 0."""
    env = {
        **os.environ,
        "IMAGE_HANDLER_LISTEN": "127.0.0.1:0",
        "IMAGE_HANDLER_DATA_DIR": str(tmp_path),
        # The job policy takes node jobs only under configured roots.
        "IMAGE_HANDLER_NODE_ROOTS": "/host",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    try:
        address = ""
        for line in process.stderr:  # bounded by the test timeout
            if line.startswith("image-handler listening on "):
                address = line.split()[-1]
                break
        assert address, "the handler did not start"
        assert address != "127.0.0.1:0"  # the environment variable was read, port 0 resolved
        submitted = grpcurl(
            "-plaintext",
            "-d",
            '{"object": {"node": {"cluster": "prod", "node_name": "worker-7", "root_path": "/host"}}, "trigger": "TRIGGER_NODE_AGENT"}',
            address,
            "imagehandler.v1.JobService/SubmitJob",
        )
        job_id = json.loads(submitted.stdout)["job"]["id"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        events = [json.loads(line) for line in process.stderr.read().splitlines()]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    submitted_event = next(e for e in events if e["event"] == "job.submitted")
    assert submitted_event["job_id"] == job_id
    assert submitted_event["object"] == "node prod/worker-7"
    assert submitted_event["level"] == "info"
    assert "timestamp" in submitted_event
    names = [e["event"] for e in events]
    assert names.index("handler.stopping") < names.index("snapshot.written")
    assert names[-1] == "handler.stopped"
