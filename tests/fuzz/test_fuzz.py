"""Hostile input: thousands of random and mutated messages to every RPC and to the scanner
stream, then the handler must still answer health, every job it acknowledged must be intact,
and every refusal must have carried an HNDL code.

Three kinds of payload, all sent as raw bytes through generic (serializer-less) calls:

- **wild messages**: valid protobuf of the method's request type, built from its descriptor with
  wild values (huge and negative numbers, unknown enum values, long and odd strings, out of
  range timestamps and durations, nested messages, several members of a oneof);
- **mutations** of valid requests (bits flipped, bytes inserted, deleted, duplicated, cut);
- **garbage**: random bytes.

How a refusal is judged: it must carry a ``google.rpc.ErrorInfo`` whose reason is an
``HNDL-0NN`` code, and must not be INTERNAL (that is a handler bug: an exception no check
caught). Bytes that do not parse as the request type never reach gRPC's own deserializer
error (which would be a bare INTERNAL/UNKNOWN): the security interceptor answers them with
``HNDL-005`` INVALID_ARGUMENT. The one gRPC-level refusal left is a message over twice
``--max-receive-bytes``, which these payloads never reach (tests/integration/test_security.py covers it).
A stream the fuzz ends itself (client deadline, cancel) is not a refusal.

``make test`` runs a budget that keeps this file well under a minute; the ``slow`` marker runs
ten times more.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagehandler.rpc import read_rpc_error
from imagehandler.v1 import (
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    scanner_service_pb2,
)
from tests.conftest import TEST_CONFIG, BackgroundHandler
from tests.helpers import TODAY, RawScanner, image, node

HNDL = re.compile(r"HNDL-0\d\d")
SC = grpc.StatusCode

FAST = {"unary": 3000, "watch": 150, "connect": 400, "metadata": 200}
SLOW = {name: count * 10 for name, count in FAST.items()}

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
SCANNER_SERVICE = scanner_service_pb2.DESCRIPTOR.services_by_name["ScannerService"]
METHODS: list[MethodDescriptor] = [*JOB_SERVICE.methods, *SCANNER_SERVICE.methods]
UNARY = [m for m in METHODS if not m.client_streaming and not m.server_streaming]
CONNECT = SCANNER_SERVICE.methods_by_name["Connect"]
WATCH = JOB_SERVICE.methods_by_name["WatchJobs"]


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# ----- payloads -----------------------------------------------------------------------------

ODD_TEXT = [
    "",
    " ",
    "\x00",
    "../../etc/passwd",
    "sha256:" + "0" * 64,
    "library/alpine",
    "http://[::1",
    "socks5://h:0",
    "2026-13-45",
    "HNDL-999",
    "00000000-0000-0000-0000-000000000000",
    "c2VxOi0x",  # "seq:-1" as a page token
    "\u202e\ufeff\U0001f600",
    "A" * 5000,
    "é" * 300,
]
INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    cpp = fd.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if fd.type == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64)
        return st.one_of(st.text(max_size=40), st.sampled_from(ODD_TEXT))
    if cpp in INT_RANGES:
        low, high = INT_RANGES[cpp]
        edges = [v for v in (low, high, -1, 0, 1, 2, 3, 1024, 1025) if low <= v <= high]
        return st.one_of(st.sampled_from(edges), st.integers(low, high))
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        assert fd.enum_type is not None
        return st.one_of(
            st.sampled_from([v.number for v in fd.enum_type.values]),
            st.integers(-(2**31), 2**31 - 1),
        )
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return st.floats(width=32)
    return st.floats()


def nested(descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
    return st.deferred(lambda: message_of(descriptor, depth))


def message_of(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Valid protobuf messages of ``descriptor`` with wild values."""
    cls = message_factory.GetMessageClass(descriptor)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = (
                fd.message_type.fields_by_name["key"],
                fd.message_type.fields_by_name["value"],
            )
            if value_fd.message_type is not None:
                continue
            optional[fd.name] = st.dictionaries(scalar(key_fd), scalar(value_fd), max_size=4)
        elif fd.message_type is not None:
            if depth >= 3:
                continue
            inner = nested(fd.message_type, depth + 1)
            is_repeated = fd.is_repeated
            optional[fd.name] = st.lists(inner, max_size=3) if is_repeated else inner
        elif fd.is_repeated:
            optional[fd.name] = st.lists(scalar(fd), max_size=5)
        else:
            optional[fd.name] = scalar(fd)

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            fd = descriptor.fields_by_name[name]
            target = getattr(message, name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                if fd.message_type is not None:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.extend(value)
            elif isinstance(value, Message):
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


def seeds() -> dict[str, list[bytes]]:
    """Valid requests to mutate, by request type name."""
    register = scanner_service_pb2.Register(
        scanner_id="fuzz-seed",
        version="1",
        slots=2,
        databases=[common_pb2.DatabaseVersion(name="db", version="1", released_at=TODAY)],
    )
    messages: list[Message] = [
        image(labels={"team": "a"}),
        node("n1"),
        job_service_pb2.SubmitJobsRequest(jobs=[image(), node("n2")]),
        job_service_pb2.GetJobRequest(job_id="00000000-0000-4000-8000-000000000000"),
        job_service_pb2.ListJobsRequest(
            page_size=5, statuses=[common_pb2.JOB_STATUS_PENDING, common_pb2.JOB_STATUS_ERROR]
        ),
        job_service_pb2.AcceptRiskRequest(
            finding_id="CVE-2024-1", reason="r", scope=job_service_pb2.RISK_SCOPE_OBJECT
        ),
        scanner_service_pb2.ConnectRequest(register=register),
        scanner_service_pb2.ConnectRequest(ready=scanner_service_pb2.Ready(free_slots=1)),
        scanner_service_pb2.ConnectRequest(
            result=scanner_service_pb2.Results(results=[common_pb2.ScanResult(job_id="x", run=1)])
        ),
    ]
    out: dict[str, list[bytes]] = {}
    for message in messages:
        out.setdefault(message.DESCRIPTOR.full_name, []).append(message.SerializeToString())
    return out


SEEDS = seeds()
ANY_SEED = [data for group in SEEDS.values() for data in group]


def mutate(data: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    buffer = bytearray(data)
    for position, value, kind in edits:
        at = position % (len(buffer) + 1)
        if kind == "flip" and buffer:
            buffer[at % len(buffer)] ^= 1 << (value % 8)
        elif kind == "set" and buffer:
            buffer[at % len(buffer)] = value
        elif kind == "insert":
            buffer[at:at] = bytes([value])
        elif kind == "delete" and buffer:
            del buffer[at % len(buffer)]
        elif kind == "cut":
            del buffer[at:]
        elif kind == "dup":
            buffer[at:at] = buffer[at : at + value % 16]
    return bytes(buffer)


EDITS = st.lists(
    st.tuples(
        st.integers(0, 10_000),
        st.integers(0, 255),
        st.sampled_from(["flip", "set", "insert", "delete", "cut", "dup"]),
    ),
    min_size=1,
    max_size=4,
)


def payload_for(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    seeds_here = SEEDS.get(descriptor.full_name) or ANY_SEED
    return st.one_of(
        message_of(descriptor).map(lambda m: m.SerializeToString()),
        st.builds(mutate, st.sampled_from(seeds_here), EDITS),
        st.builds(mutate, st.sampled_from(ANY_SEED), EDITS),
        st.binary(max_size=200),
    )


# ----- the handler under fire -------------------------------------------------------------


@dataclass
class Fuzzed:
    handler: BackgroundHandler
    channel: grpc.Channel
    before: dict[str, common_pb2.Job]
    acknowledged: dict[str, bytes] = field(default_factory=dict)  # job id -> object bytes
    refusals: dict[str, int] = field(default_factory=dict)  # "method status code" -> count
    sent: int = 0

    def judge(self, where: str, error: grpc.RpcError, *, local_ok: bool = False) -> None:
        remote = read_rpc_error(error)
        if local_ok and remote.status in (SC.CANCELLED, SC.DEADLINE_EXCEEDED) and not remote.code:
            return  # the fuzz ended the call itself
        assert HNDL.fullmatch(remote.code), f"{where}: a refusal without an HNDL code: {remote}"
        assert remote.status != SC.INTERNAL, f"{where}: the handler failed inside: {remote}"
        key = f"{where} {remote.status.name} {remote.code}"
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def check_intact(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        for job_id, old in self.before.items():
            now = jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id), timeout=10).job
            if old.status in TERMINAL:
                assert now == old, f"ended job {job_id} changed"
            else:
                assert (now.object, now.policies, now.labels, now.created_at) == (
                    old.object,
                    old.policies,
                    old.labels,
                    old.created_at,
                )
                assert now.runs >= old.runs
        for job_id, data in self.acknowledged.items():
            now = jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id), timeout=10).job
            assert now.object.SerializeToString(deterministic=True) == data
        # Still does its work: a submit is taken and a scanner finishes it.
        assert asyncio.run_coroutine_threadsafe(
            round_trip(self.handler.server.address), self.handler.loop
        ).result(timeout=30)


TERMINAL = {
    common_pb2.JOB_STATUS_FINISHED,
    common_pb2.JOB_STATUS_ERROR,
    common_pb2.JOB_STATUS_CANCELLED,
}


async def round_trip(address: str) -> bool:
    channel = grpc.aio.insecure_channel(address)
    try:
        from imagehandler.v1 import scanner_service_pb2_grpc

        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        scanners = scanner_service_pb2_grpc.ScannerServiceStub(channel)
        async with RawScanner(scanners, "after-fuzz", slots=64) as scanner:
            await scanner.start()
            job_id = (await jobs.SubmitJob(image(tag="after-fuzz"))).job.id
            async with asyncio.timeout(10):
                while True:
                    assigned = await scanner.assigned()
                    for job in assigned:
                        await scanner.finish(job)
                    if any(job.job_id == job_id for job in assigned):
                        return True
    finally:
        await channel.close(None)


async def prepare(address: str) -> dict[str, common_pb2.Job]:
    """Jobs in every state before the fuzz starts."""
    from imagehandler.v1 import scanner_service_pb2_grpc

    channel = grpc.aio.insecure_channel(address)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    scanners = scanner_service_pb2_grpc.ScannerServiceStub(channel)
    try:
        async with RawScanner(scanners, "before-fuzz", slots=4) as scanner:
            await scanner.start()
            ids = [(await jobs.SubmitJob(image(tag=f"pre{n}"))).job.id for n in range(4)]
            assigned = await scanner.assigned(4)
            for job in assigned[:2]:
                await scanner.finish(job)
            await scanner.fail(assigned[2], code="HNDL-005", permanent=True)
            await jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=assigned[3].job_id))
            await scanner.send(ready=scanner_service_pb2.Ready(free_slots=0))
        # Wait until the results are processed (FINISHED) before taking the snapshot.
        for job_id in ids:
            async with asyncio.timeout(10):
                async for event in jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id)):
                    if event.job.status in TERMINAL:
                        break
        ids += [(await jobs.SubmitJob(node(f"pending-{n}"))).job.id for n in range(6)]
        snapshot = {}
        for job_id in ids:
            snapshot[job_id] = (await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))).job
        return snapshot
    finally:
        await channel.close(None)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    config = replace(TEST_CONFIG, data_dir=tmp_path_factory.mktemp("fuzz"))
    handler = BackgroundHandler(config)
    channel = grpc.insecure_channel(handler.server.address)
    try:
        before = asyncio.run_coroutine_threadsafe(
            prepare(handler.server.address), handler.loop
        ).result(timeout=60)
        yield Fuzzed(handler, channel, before)
    finally:
        channel.close()
        handler.stop()


def fuzz_settings(count: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def unary_fuzz(fuzzed: Fuzzed, count: int) -> None:
    method_and_payload = st.sampled_from(UNARY).flatmap(
        lambda m: st.tuples(st.just(m), payload_for(m.input_type))
    )

    @fuzz_settings(count)
    @given(method_and_payload)
    def run(case: tuple[MethodDescriptor, bytes]) -> None:
        method, payload = case
        call = fuzzed.channel.unary_unary(
            path_of(method), request_serializer=None, response_deserializer=None
        )
        fuzzed.sent += 1
        try:
            reply = call(payload, timeout=10)
        except grpc.RpcError as error:
            fuzzed.judge(method.name, error)
            return
        if method.name == "SubmitJob":
            job = job_service_pb2.SubmitJobResponse.FromString(reply).job
            fuzzed.acknowledged[job.id] = job.object.SerializeToString(deterministic=True)
        elif method.name == "SubmitJobs":
            for result in job_service_pb2.SubmitJobsResponse.FromString(reply).results:
                data = result.job.object.SerializeToString(deterministic=True)
                fuzzed.acknowledged[result.job.id] = data

    run()


def watch_fuzz(fuzzed: Fuzzed, count: int) -> None:
    @fuzz_settings(count)
    @given(payload_for(WATCH.input_type))
    def run(payload: bytes) -> None:
        call: Any = fuzzed.channel.unary_stream(
            path_of(WATCH), request_serializer=None, response_deserializer=None
        )(payload, timeout=10)
        fuzzed.sent += 1
        try:
            call.initial_metadata()  # headers once subscribed, or the refusal
            call.cancel()
            call.code()
            for _ in call:
                pass
        except grpc.RpcError as error:
            fuzzed.judge("WatchJobs", error, local_ok=True)

    run()


def connect_fuzz(fuzzed: Fuzzed, count: int) -> None:
    register = scanner_service_pb2.ConnectRequest(
        register=scanner_service_pb2.Register(
            scanner_id="fuzz-scanner",
            version="1",
            slots=1,
            databases=[common_pb2.DatabaseVersion(name="db", version="1", released_at=TODAY)],
        )
    ).SerializeToString()
    messages = st.lists(payload_for(CONNECT.input_type), min_size=1, max_size=4)
    # Half the streams start with a valid registration, so the later messages reach a session.
    streams = st.tuples(st.booleans(), messages).map(
        lambda case: [register, *case[1]] if case[0] else case[1]
    )

    @fuzz_settings(count)
    @given(streams)
    def run(payloads: list[bytes]) -> None:
        call = fuzzed.channel.stream_stream(
            path_of(CONNECT), request_serializer=None, response_deserializer=None
        )(iter(payloads), timeout=10)
        fuzzed.sent += len(payloads)
        try:
            for raw in call:
                response = scanner_service_pb2.ConnectResponse.FromString(raw)
                if response.WhichOneof("message") == "rejected":
                    code = response.rejected.error.code
                    assert HNDL.fullmatch(code), f"Connect: rejected without a code: {response}"
                    assert response.rejected.error.message.startswith(code)
        except grpc.RpcError as error:
            fuzzed.judge("Connect", error)

    run()


# ----- the tests ----------------------------------------------------------------------------


def test_fuzz_every_unary_rpc(fuzzed: Fuzzed) -> None:
    unary_fuzz(fuzzed, FAST["unary"])
    fuzzed.check_intact()
    assert fuzzed.sent >= FAST["unary"]
    assert any("HNDL-005" in key for key in fuzzed.refusals)


def test_fuzz_watch_jobs(fuzzed: Fuzzed) -> None:
    watch_fuzz(fuzzed, FAST["watch"])
    fuzzed.check_intact()


def test_fuzz_the_scanner_stream(fuzzed: Fuzzed) -> None:
    connect_fuzz(fuzzed, FAST["connect"])
    fuzzed.check_intact()
    assert any(key.startswith("Connect") for key in fuzzed.refusals)


def test_fuzz_authorization_headers(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("ops admin sha256:" + "0" * 64 + "\n")
    config = replace(TEST_CONFIG, data_dir=tmp_path / "data", token_file=str(token_file))
    handler = BackgroundHandler(config)
    channel = grpc.insecure_channel(handler.server.address)
    try:
        target = Fuzzed(handler, channel, {})
        metadata_fuzz(target, FAST["metadata"])
    finally:
        channel.close()
        handler.stop()


def metadata_fuzz(target: Fuzzed, count: int) -> None:
    printable = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)
    headers = st.one_of(printable, printable.map(lambda t: "Bearer " + t))

    @fuzz_settings(count)
    @given(st.sampled_from(METHODS), headers, st.binary(max_size=64))
    def run(method: MethodDescriptor, header: str, payload: bytes) -> None:
        target.sent += 1
        path = path_of(method)
        metadata = (("authorization", header),)
        try:
            if method.client_streaming:
                for _ in target.channel.stream_stream(path, None, None)(
                    iter([payload]), metadata=metadata, timeout=10
                ):
                    pass
            elif method.server_streaming:
                for _ in target.channel.unary_stream(path, None, None)(
                    payload, metadata=metadata, timeout=10
                ):
                    pass
            else:
                target.channel.unary_unary(path, None, None)(payload, metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            remote = read_rpc_error(error)
            assert (remote.code, remote.status) == ("HNDL-007", SC.UNAUTHENTICATED), remote
            return
        raise AssertionError(f"{method.name} answered without a valid token")

    run()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_bigger_budget(tmp_path_factory: pytest.TempPathFactory) -> None:
    config = replace(TEST_CONFIG, data_dir=tmp_path_factory.mktemp("fuzz-slow"))
    handler = BackgroundHandler(config)
    channel = grpc.insecure_channel(handler.server.address)
    try:
        before = asyncio.run_coroutine_threadsafe(
            prepare(handler.server.address), handler.loop
        ).result(timeout=60)
        target = Fuzzed(handler, channel, before)
        unary_fuzz(target, SLOW["unary"])
        watch_fuzz(target, SLOW["watch"])
        connect_fuzz(target, SLOW["connect"])
        target.check_intact()
        assert target.sent >= sum(SLOW[k] for k in ("unary", "watch", "connect"))
    finally:
        channel.close()
        handler.stop()


def test_payload_strategies_make_valid_wire_format() -> None:
    """The 'wild message' payloads parse as their type: the fuzz sends both kinds."""

    @fuzz_settings(50)
    @given(message_of(scanner_service_pb2.ConnectRequest.DESCRIPTOR))
    def run(message: Message) -> None:
        data = message.SerializeToString()
        assert scanner_service_pb2.ConnectRequest.FromString(data) == message or any(
            isinstance(v, float) and math.isnan(v) for v in _floats(message)
        )

    run()


def _floats(message: Message) -> Iterator[float]:
    for fd, value in message.ListFields():
        if fd.message_type is not None:
            items = value if fd.is_repeated else [value]
            for item in items:
                if isinstance(item, Message):
                    yield from _floats(item)
        elif isinstance(value, float):
            yield value
