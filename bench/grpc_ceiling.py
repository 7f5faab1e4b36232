"""The transport's ceilings: a raw grpc.aio echo between two processes on this machine.

An echo server (its own process, nothing but ``grpc.aio`` and one protobuf message type,
``Batch { repeated bytes items = 1; }``, made at run time) parses every message it gets and
sends it back. Over one bidirectional stream this process writes messages of one
93-byte item, or of 100 such items, as fast as flow control lets it, and counts the echoed
items; and unary echo calls of one item with 32 in flight. No handler code is involved: these
are the most items per second a Python gRPC peer can move here, the bound for any design that
sends one message per job (or per 100 jobs).

Each run also gives the CPU each side spent per message (the server's from /proc, this
process's own): the floor a Python gRPC peer pays per unary call and per message echoed on a
stream, whatever it does with them. ``bench.run`` adds these floors up for the handler's single
path (a unary call and a message each way on a scanner stream per job).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from bench.common import ROOT, child_env, cpu_seconds, free_port

ITEM = b"x" * 93
SERVICE = "ihbench.Echo"


def _batch_class() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="ihbench_echo.proto", package="ihbench")
    message = file.message_type.add(name="Batch")
    message.field.add(
        name="items",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("ihbench.Batch"))


Batch = _batch_class()
SERIALIZE = Batch.SerializeToString
DESERIALIZE = Batch.FromString


@dataclass
class EchoResult:
    shape: str
    items_per_message: int
    messages: int
    seconds: float
    items_per_second: float
    # CPU per message: the echo server's (a unary call, or a stream message read and written
    # back) and this process's (the caller's side of the same).
    server_cpu_us_per_message: float = float("nan")
    client_cpu_us_per_message: float = float("nan")


async def serve(port: int) -> None:
    async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for message in requests:
            yield message

    async def unary(request: Any, context: Any) -> Any:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Stream": grpc.stream_stream_rpc_method_handler(
                        stream, request_deserializer=DESERIALIZE, response_serializer=SERIALIZE
                    ),
                    "Unary": grpc.unary_unary_rpc_method_handler(
                        unary, request_deserializer=DESERIALIZE, response_serializer=SERIALIZE
                    ),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def stream_echo(address: str, items: int, messages: int) -> EchoResult:
    payload = Batch(items=[ITEM] * items)
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any = channel.stream_stream(
            f"/{SERVICE}/Stream", request_serializer=SERIALIZE, response_deserializer=DESERIALIZE
        )()  # type: ignore[call-arg]
        await call.write(payload)  # warm up: the stream is open before the clock starts
        await call.read()
        started = time.perf_counter()

        async def writer() -> None:
            for _ in range(messages):
                await call.write(payload)
            await call.done_writing()

        writing = asyncio.create_task(writer())
        received = 0
        while received < messages * items:
            reply = await call.read()
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                raise RuntimeError("the echo stream ended early")
            received += len(reply.items)
        seconds = time.perf_counter() - started
        await writing
    return EchoResult("stream", items, messages, seconds, messages * items / seconds)


async def unary_echo(address: str, calls: int, in_flight: int = 32) -> EchoResult:
    async with grpc.aio.insecure_channel(address) as channel:
        unary = channel.unary_unary(
            f"/{SERVICE}/Unary", request_serializer=SERIALIZE, response_deserializer=DESERIALIZE
        )
        payload = Batch(items=[ITEM])
        await unary(payload)
        left = calls
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await unary(payload)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        seconds = time.perf_counter() - started
    return EchoResult(f"unary x{in_flight}", 1, calls, seconds, calls / seconds)


def measure(scale: float = 1.0, verbose: bool = True) -> dict[str, EchoResult]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_ceiling", "--serve", str(port)],
        stdout=subprocess.PIPE, env=child_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("the echo server did not start")
        address = f"127.0.0.1:{port}"

        def timed(run: Coroutine[Any, Any, EchoResult]) -> EchoResult:
            server_before, client_before = cpu_seconds(server.pid), time.process_time()
            result = asyncio.run(run)
            result.server_cpu_us_per_message = (
                (cpu_seconds(server.pid) - server_before) / result.messages * 1e6
            )
            result.client_cpu_us_per_message = (
                (time.process_time() - client_before) / result.messages * 1e6
            )
            return result

        out = {
            "stream_1": timed(stream_echo(address, 1, int(20_000 * scale))),
            "stream_100": timed(stream_echo(address, 100, int(4_000 * scale))),
            "unary_1": timed(unary_echo(address, int(10_000 * scale))),
        }
    finally:
        server.terminate()
        server.wait(timeout=10)
    if verbose:
        for result in out.values():
            print(
                f"  grpc.aio echo, {result.shape:9} {result.items_per_message:3} item(s)/message:"
                f" {result.items_per_second:9,.0f} items/s; CPU per message: server"
                f" {result.server_cpu_us_per_message:5.0f} us, caller"
                f" {result.client_cpu_us_per_message:5.0f} us",
                flush=True,
            )
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        measure()
