"""Every HNDL code the API answers with: its gRPC status, message and ErrorInfo reason.

The unary calls use pytest-grpc's synchronous ``grpc_stub`` against a real handler (see
conftest); stream and configuration cases use the async fixtures.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from imagehandler.rpc import read_rpc_error
from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc, scanner_service_pb2
from tests.conftest import Handler, MakeHandler
from tests.helpers import RawScanner, image, remote_error, wait_for_status

SC = grpc.StatusCode
Img = common_pb2.ImageObject


@pytest.fixture(scope="module")
def grpc_stub_cls() -> Any:
    return job_service_pb2_grpc.JobServiceStub


def submit(**image_fields: Any) -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(object=common_pb2.ScanObject(image=Img(**image_fields)))


SHA = "sha256:" + "a" * 64

BAD_REQUESTS = [
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "object is required",
    ),
    (
        "SubmitJob",
        submit(tag="3.20"),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "image.repository is required",
    ),
    (
        "SubmitJob",
        submit(repository="alpine", digest="sha256:xyz"),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "is not a digest",
    ),
    (
        "SubmitJob",
        submit(repository="Alpine!"),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "not a valid repository",
    ),
    (
        "SubmitJob",
        submit(repository="alpine", tag="-bad"),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "not a valid tag",
    ),
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(object=image().object, trigger=99),  # type: ignore[arg-type]
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "trigger 99 is unknown",
    ),
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(object=image().object, policies=[42]),  # type: ignore[list-item]
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "policy 42 is unknown",
    ),
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(object=image().object, lane=7),  # type: ignore[arg-type]
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "lane 7 is unknown",
    ),
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(
            object=image().object, max_run_time=duration_pb2.Duration(seconds=-5)
        ),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "max_run_time -5s is negative",
    ),
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(
            object=common_pb2.ScanObject(node=common_pb2.NodeObject())
        ),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "node.node_name is required",
    ),
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(
            object=common_pb2.ScanObject(node=common_pb2.NodeObject(node_name="worker-1"))
        ),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "node.root_path is required",
    ),
    (
        "SubmitJob",
        job_service_pb2.SubmitJobRequest(
            object=common_pb2.ScanObject(artifact=common_pb2.ArtifactObject(pipeline="p"))
        ),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "artifact needs a path, a url or an inline sbom",
    ),
    (
        "SubmitJob",
        submit(repository="alpine", proxy_url="http//proxy:3128"),
        "HNDL-011",
        SC.INVALID_ARGUMENT,
        "must look like http://host:port",
    ),
    (
        "SubmitJob",
        submit(repository="alpine", proxy_url="http://proxy:99999"),
        "HNDL-011",
        SC.INVALID_ARGUMENT,
        "proxy_url",
    ),
    (
        "SubmitJobs",
        job_service_pb2.SubmitJobsRequest(jobs=[image(tag="ok"), submit(repository="")]),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "jobs[1]: image.repository is required",
    ),
    (
        "SubmitJobs",
        job_service_pb2.SubmitJobsRequest(),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "jobs is empty",
    ),
    ("GetJob", job_service_pb2.GetJobRequest(), "HNDL-008", SC.INVALID_ARGUMENT, "job_id is empty"),
    (
        "GetJob",
        job_service_pb2.GetJobRequest(job_id="not-a-uuid"),
        "HNDL-008",
        SC.INVALID_ARGUMENT,
        "is not a job id",
    ),
    (
        "GetJob",
        job_service_pb2.GetJobRequest(job_id="00000000-0000-4000-8000-000000000000"),
        "HNDL-008",
        SC.NOT_FOUND,
        "no job with id 00000000-0000-4000-8000-000000000000",
    ),
    (
        "CancelJob",
        job_service_pb2.CancelJobRequest(job_id=""),
        "HNDL-008",
        SC.INVALID_ARGUMENT,
        "job_id is empty",
    ),
    (
        "ListJobs",
        job_service_pb2.ListJobsRequest(page_token="garbage"),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "page_token",
    ),
    (
        "ListJobs",
        job_service_pb2.ListJobsRequest(page_size=5000),
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "page_size 5000",
    ),
    (
        "ListJobs",
        job_service_pb2.ListJobsRequest(statuses=[77]),  # type: ignore[list-item]
        "HNDL-005",
        SC.INVALID_ARGUMENT,
        "status 77 is unknown",
    ),
]


@pytest.mark.parametrize(
    ("method", "request_message", "code", "status", "says"),
    BAD_REQUESTS,
    ids=[f"{m}-{c}-{s[:24]}" for m, _, c, _, s in BAD_REQUESTS],
)
def test_bad_request_gets_its_code(
    grpc_stub: Any, method: str, request_message: Any, code: str, status: grpc.StatusCode, says: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        getattr(grpc_stub, method)(request_message)
    error: Any = raised.value  # a grpc.Call as well as an RpcError
    assert error.code() == status
    assert error.details().startswith(f"{code}: ")
    assert says in error.details()
    # The rich status carries an ErrorInfo whose reason is the code.
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    rich = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert (info.reason, info.domain) == (code, "imagehandler.v1")
    assert read_rpc_error(error).code == code


def test_bad_requests_leave_the_queue_untouched(grpc_stub: Any) -> None:
    before = grpc_stub.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
    for method, request_message, *_ in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError):
            getattr(grpc_stub, method)(request_message)
    after = grpc_stub.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
    assert after.pending == before.pending


async def test_no_policies_and_no_default_is_hndl_014(make_handler: MakeHandler) -> None:
    handler = await make_handler(default_policies=())
    error = await remote_error(handler.jobs.SubmitJob(image()))
    assert (error.code, error.status) == ("HNDL-014", SC.FAILED_PRECONDITION)
    ok = await handler.jobs.SubmitJob(image(policies=[common_pb2.POLICY_MALWARE]))
    assert list(ok.job.policies) == [common_pb2.POLICY_MALWARE]


async def test_queue_full_is_resource_exhausted_and_drops_nothing(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler(queue_limit=2)
    first = await handler.jobs.SubmitJob(image(tag="1"))
    await handler.jobs.SubmitJob(image(tag="2"))
    error = await remote_error(handler.jobs.SubmitJob(image(tag="3")))
    assert (error.code, error.status) == ("HNDL-007", SC.RESOURCE_EXHAUSTED)
    assert "queue full (limit 2)" in error.message
    # A duplicate of a queued job is still answered: it adds nothing.
    again = await handler.jobs.SubmitJob(image(tag="1"))
    assert again.duplicate
    assert again.job.id == first.job.id
    stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
    assert stats.pending == 2


async def test_cancel_of_a_finished_job_is_failed_precondition(handler: Handler) -> None:
    job_id = (await handler.jobs.SubmitJob(image())).job.id
    await handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=job_id))
    error = await remote_error(
        handler.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=job_id))
    )
    assert (error.code, error.status) == ("HNDL-008", SC.FAILED_PRECONDITION)
    assert "is CANCELLED" in error.message


def db(name: str = "vulns", released_at: str = "2026-11-20") -> common_pb2.DatabaseVersion:
    return common_pb2.DatabaseVersion(name=name, version="1", released_at=released_at)


SCANNER_REJECTIONS = [
    ({"slots": 0}, "HNDL-003", SC.INVALID_ARGUMENT, "slots must be 1..1024, got 0"),
    ({"kinds": [9]}, "HNDL-003", SC.INVALID_ARGUMENT, "kind 9 is unknown"),
    ({"scanner_id": ""}, "HNDL-003", SC.INVALID_ARGUMENT, "scanner_id is required"),
    ({"proxy_url": "ftp:/nowhere"}, "HNDL-011", SC.INVALID_ARGUMENT, "config.proxy_url"),
    ({"databases": [db(released_at="")]}, "HNDL-012", SC.FAILED_PRECONDITION, "has no released_at"),
    ({"databases": []}, "HNDL-012", SC.FAILED_PRECONDITION, "no scan databases"),
    (
        {"databases": [db(released_at="20/11/2026")]},
        "HNDL-013",
        SC.INVALID_ARGUMENT,
        "is not an RFC 3339 date",
    ),
]


@pytest.mark.parametrize(
    ("fields", "code", "status", "says"),
    SCANNER_REJECTIONS,
    ids=[r[3][:30] for r in SCANNER_REJECTIONS],
)
async def test_invalid_scanner_is_rejected_and_told_why(
    handler: Handler, fields: dict[str, Any], code: str, status: grpc.StatusCode, says: str
) -> None:
    scanner = RawScanner(
        handler.scanners, fields.pop("scanner_id", "bad"), heartbeat_every=None, **fields
    )
    first = await scanner.connect()
    assert first.WhichOneof("message") == "rejected"
    assert first.rejected.error.code == code
    assert says in first.rejected.error.message
    error = await remote_error(scanner.call)
    assert (error.code, error.status) == (code, status)
    # A rejected scanner gets no jobs: it is not listed as connected.
    listed = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
    assert not [s for s in listed.scanners if s.connected]


async def test_scanner_without_a_policy_and_no_default_is_hndl_014(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler(default_policies=())
    scanner = RawScanner(handler.scanners, "s1", heartbeat_every=None)
    first = await scanner.connect()
    assert first.rejected.error.code == "HNDL-014"


async def test_first_message_must_be_register(handler: Handler) -> None:
    call: Any = handler.scanners.Connect()  # type: ignore[call-arg]  # write() style
    await call.write(
        scanner_service_pb2.ConnectRequest(ready=scanner_service_pb2.Ready(free_slots=1))
    )
    reply = await call.read()
    assert reply.rejected.error.code == "HNDL-003"
    error = await remote_error(call)
    assert error.code == "HNDL-003"


async def test_second_stream_with_a_live_scanner_id_is_refused(handler: Handler) -> None:
    async with RawScanner(handler.scanners, "dup") as first:
        await first.start()
        second = RawScanner(handler.scanners, "dup", heartbeat_every=None)
        reply = await second.connect()
        assert reply.rejected.error.code == "HNDL-007"
        assert "already connected" in reply.rejected.error.message
        error = await remote_error(second.call)
        assert error.status == SC.UNAVAILABLE
        # When trying again can work: once the old stream's heartbeat timeout has passed.
        assert error.retry_after == handler.config.heartbeat_timeout


async def test_result_for_a_job_not_assigned_is_hndl_008_on_the_stream(handler: Handler) -> None:
    other = (await handler.jobs.SubmitJob(image(tag="other"))).job.id
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        (job,) = await scanner.assigned()
        assert job.job_id == other
        await scanner.send(
            result=scanner_service_pb2.Results(
                results=[common_pb2.ScanResult(job_id="00000000-0000-4000-8000-00000000dead")]
            )
        )
        rejected = await scanner.expect("rejected")
        assert rejected.error.code == "HNDL-008"
        assert rejected.job_id == "00000000-0000-4000-8000-00000000dead"
        # The stream goes on and the real job still finishes.
        await scanner.finish(job)
        done = await wait_for_status(handler.jobs, other, common_pb2.JOB_STATUS_FINISHED)
        assert done.runs == 1


def serve_refuses_to_start(tmp_path: Any, *flags: str) -> str:
    """Run ``image-handler serve`` with ``flags``; it must exit 2. Its stderr."""
    command = [sys.executable, "-m", "server.cli", "serve", "--listen", "127.0.0.1:0"]
    result = subprocess.run(
        [*command, "--data-dir", str(tmp_path), *flags], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_unknown_timezone_stops_the_start_with_hndl_015(tmp_path: Any) -> None:
    stderr = serve_refuses_to_start(tmp_path, "--timezone", "Mars/Olympus_Mons")
    assert "HNDL-015: can not get local timezone: time zone 'Mars/Olympus_Mons'" in stderr


def test_bad_handler_settings_stop_the_start_with_hndl_003(tmp_path: Any) -> None:
    stderr = serve_refuses_to_start(
        tmp_path, "--heartbeat-timeout", "1", "--heartbeat-interval", "5"
    )
    assert "HNDL-003: scanner config invalid: heartbeat_timeout (1.0s) must exceed" in stderr
