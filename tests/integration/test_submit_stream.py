"""SubmitJobStream over real gRPC: one job per message, each acknowledged in order once it is
as durable as a SubmitJob answer, a refused job acknowledged with its error while the stream
goes on, and the bound on jobs waiting for their acknowledgement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from imagehandler.rpc import read_rpc_error
from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc
from server.transport.guard import STREAM_END
from server.transport.job_service import STREAM_IN_FLIGHT
from tests.conftest import MakeHandler
from tests.helpers import image

DEADLINE = 30.0


def request(tag: str) -> job_service_pb2.SubmitJobStreamRequest:
    return job_service_pb2.SubmitJobStreamRequest(job=image(tag=tag))


async def test_each_job_is_acknowledged_in_order_and_is_queued(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    bad = job_service_pb2.SubmitJobStreamRequest(job=job_service_pb2.SubmitJobRequest())
    sent = [request(f"s{n}") for n in range(50)]
    sent[20] = bad  # no object: refused on its own, the stream goes on
    sent[30] = request("s10")  # the same object as job 10: a duplicate

    async def requests() -> AsyncIterator[job_service_pb2.SubmitJobStreamRequest]:
        for message in sent:
            yield message

    acks = [ack async for ack in handler.jobs.SubmitJobStream(requests(), timeout=DEADLINE)]
    assert [ack.index for ack in acks] == list(range(50))
    error = acks[20].error
    assert not acks[20].HasField("submitted")
    assert error.code == "HNDL-005"
    assert "object is required" in error.message
    assert acks[30].submitted.duplicate
    assert acks[30].submitted.job.id == acks[10].submitted.job.id
    queued = [
        a.submitted.job for a in acks if a.HasField("submitted") and not a.submitted.duplicate
    ]
    assert len(queued) == 48
    assert [j.object.image.tag for j in queued[:3]] == ["s0", "s1", "s2"]
    for job in queued:
        got = await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job.id))
        assert got.job.status == common_pb2.JOB_STATUS_PENDING


async def test_an_acknowledged_job_survives_a_restart(make_handler: MakeHandler) -> None:
    handler = await make_handler()
    stream = handler.jobs.SubmitJobStream(None, timeout=DEADLINE)
    await stream.write(request("durable"))
    ack = await stream.read()
    assert isinstance(ack, job_service_pb2.SubmitJobStreamResponse)
    job_id = ack.submitted.job.id
    await stream.done_writing()
    assert await stream.read() is STREAM_END
    data_dir = handler.config.data_dir
    await handler.server.stop(0)
    again = await make_handler(data_dir=data_dir)
    got = await again.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))
    assert got.job.object.image.tag == "durable"


async def write_all(stream: Any, requests: list[job_service_pb2.SubmitJobStreamRequest]) -> int:
    """Write until done or the handler ends the call; how many were written."""
    for n, message in enumerate(requests):
        try:
            await stream.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError):
            return n  # the call ended: reading says why
    return len(requests)


async def read_all(stream: Any, acks: list[job_service_pb2.SubmitJobStreamResponse]) -> None:
    """Every acknowledgement up to the end of the call (an error raises)."""
    while (ack := await stream.read()) is not STREAM_END:
        acks.append(ack)


async def test_too_many_jobs_waiting_for_acknowledgement_end_the_stream(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    # A client that sends before it reads: its receive window (64 KiB, kept from growing)
    # holds a few hundred acknowledgements, then the handler cannot send more, and the jobs
    # waiting for theirs pass the bound. What the handler read after that stays in its own
    # window, so every write here completes.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(handler.address, options=options) as channel:
        stream = job_service_pb2_grpc.JobServiceStub(channel).SubmitJobStream(
            None, timeout=DEADLINE
        )
        sent = [request(f"f{n}") for n in range(STREAM_IN_FLIGHT + 900)]
        assert await write_all(stream, sent) == len(sent)
        acks: list[job_service_pb2.SubmitJobStreamResponse] = []
        with pytest.raises(grpc.RpcError) as raised:
            await read_all(stream, acks)
    error = read_rpc_error(raised.value)
    assert error.status == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert error.code == "HNDL-007"
    assert f"more than {STREAM_IN_FLIGHT} jobs" in error.message
    # The jobs read before the error were acknowledged first, in order, and are queued.
    assert STREAM_IN_FLIGHT <= len(acks) < len(sent)
    assert [a.index for a in acks] == list(range(len(acks)))
    stats = await handler.jobs.GetQueueStats(job_service_pb2.GetQueueStatsRequest())
    assert stats.pending == len(acks)


async def test_the_submit_rate_limit_ends_a_stream_that_passes_it(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler(submit_rate=1.0, submit_burst=5)
    stream = handler.jobs.SubmitJobStream(None, timeout=DEADLINE)
    await write_all(stream, [request(f"r{n}") for n in range(10)])
    acks: list[job_service_pb2.SubmitJobStreamResponse] = []
    with pytest.raises(grpc.RpcError) as raised:
        await read_all(stream, acks)
    error = read_rpc_error(raised.value)
    assert error.status == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "submit rate limit" in error.message
    assert [a.index for a in acks] == [0, 1, 2, 3, 4]  # the burst, then the refusal
