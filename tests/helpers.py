"""Test clients that speak the real protocol: a scanner that a test drives message by message,
and a watcher. Everything waits on messages with deadlines, never on sleeps."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from imagehandler.rpc import RemoteError, read_rpc_error
from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from server.transport.guard import STREAM_END

TODAY = dt.date.today().isoformat()
DEADLINE = 10.0


def image(
    repository: str = "library/alpine", tag: str = "3.20", **kw: Any
) -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(image=common_pb2.ImageObject(repository=repository, tag=tag)),
        **kw,
    )


def node(name: str, **kw: Any) -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(
        object=common_pb2.ScanObject(
            node=common_pb2.NodeObject(cluster="c1", node_name=name, root_path="/host")
        ),
        **kw,
    )


async def remote_error(call: Any) -> RemoteError:
    """Await a call that must fail; its HNDL code and message."""
    try:
        if hasattr(call, "read"):  # a stream: read on until it ends
            while await call.read() is not STREAM_END:
                pass
        else:
            await call
    except grpc.RpcError as exc:
        return read_rpc_error(exc)
    raise AssertionError("the call succeeded; an error was expected")


class RawScanner:
    """A scanner driven by the test: it sends exactly what the test says."""

    def __init__(
        self,
        stub: Any,
        scanner_id: str,
        *,
        slots: int = 1,
        kinds: Sequence[common_pb2.ObjectKind.ValueType] = (),
        databases: Iterable[common_pb2.DatabaseVersion] | None = None,
        proxy_url: str = "",
        heartbeat_every: float | None = 0.2,
    ) -> None:
        self.stub = stub
        self.scanner_id = scanner_id
        self.register = scanner_service_pb2.Register(
            scanner_id=scanner_id,
            version="test",
            kinds=kinds,
            slots=slots,
            databases=list(databases)
            if databases is not None
            else [common_pb2.DatabaseVersion(name="vulns", version="1", released_at=TODAY)],
            config=scanner_service_pb2.ScannerConfig(proxy_url=proxy_url),
            engine="test",
        )
        self.heartbeat_every = heartbeat_every
        self.call: Any = None
        self._lock = asyncio.Lock()
        self._heartbeats: asyncio.Task[None] | None = None
        self.held: list[str] = []

    async def __aenter__(self) -> RawScanner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> scanner_service_pb2.ConnectResponse:
        self.call = self.stub.Connect()
        await self.send(register=self.register)
        first = await self.next()
        if first.WhichOneof("message") == "registered" and self.heartbeat_every:
            self._heartbeats = asyncio.create_task(self._beat())
        return first

    async def start(self, free_slots: int | None = None) -> None:
        """Register and say Ready."""
        first = await self.connect()
        assert first.WhichOneof("message") == "registered", first
        await self.send(
            ready=scanner_service_pb2.Ready(free_slots=free_slots or self.register.slots)
        )

    async def _beat(self) -> None:
        assert self.heartbeat_every
        while True:
            await asyncio.sleep(self.heartbeat_every)  # a pacing interval, not a wait for state
            await self.send(
                heartbeat=scanner_service_pb2.ScannerHeartbeat(active_job_ids=self.held)
            )

    async def send(self, **message: Any) -> None:
        async with self._lock:
            await self.call.write(scanner_service_pb2.ConnectRequest(**message))

    async def next(self, timeout: float = DEADLINE) -> scanner_service_pb2.ConnectResponse:
        """The next message other than a heartbeat."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.call.read()
                if message is STREAM_END:
                    raise EOFError("the handler ended the stream")
                if message.WhichOneof("message") != "heartbeat":
                    return message  # type: ignore[no-any-return]

    async def expect(self, which: str, timeout: float = DEADLINE) -> Any:
        message = await self.next(timeout)
        assert message.WhichOneof("message") == which, message
        return getattr(message, which)

    async def assigned(
        self, count: int = 1, timeout: float = DEADLINE
    ) -> list[scanner_service_pb2.AssignedJob]:
        jobs: list[scanner_service_pb2.AssignedJob] = []
        while len(jobs) < count:
            assignment = await self.expect("assignment", timeout)
            jobs.extend(assignment.jobs)
        self.held.extend(j.job_id for j in jobs)
        return jobs

    async def finish(self, job: scanner_service_pb2.AssignedJob, **result: Any) -> None:
        self.held.remove(job.job_id)
        await self.send(
            result=scanner_service_pb2.Results(
                results=[common_pb2.ScanResult(job_id=job.job_id, run=job.run, **result)]
            )
        )

    async def fail(
        self,
        job: scanner_service_pb2.AssignedJob,
        code: str = "HNDL-006",
        detail: str = "boom",
        permanent: bool = False,
    ) -> None:
        self.held.remove(job.job_id)
        await self.send(
            failure=scanner_service_pb2.Failure(
                job_id=job.job_id, code=code, detail=detail, permanent=permanent
            )
        )

    async def stop_heartbeats(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
            self._heartbeats = None

    async def close(self) -> None:
        await self.stop_heartbeats()
        if self.call is not None:
            self.call.cancel()
            self.call = None


class Watcher:
    """Collects WatchJobs messages in the background."""

    def __init__(
        self, jobs_stub: Any, request: job_service_pb2.WatchJobsRequest | None = None
    ) -> None:
        self.call = jobs_stub.WatchJobs(request or job_service_pb2.WatchJobsRequest())
        self.events: asyncio.Queue[job_service_pb2.WatchJobsResponse] = asyncio.Queue()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.call:
            self.events.put_nowait(event)

    async def subscribed(self) -> Watcher:
        """Wait until the handler has subscribed the watch (it then sends headers)."""
        async with asyncio.timeout(DEADLINE):
            await self.call.initial_metadata()
        return self

    async def next(self, timeout: float = DEADLINE) -> job_service_pb2.WatchJobsResponse:
        async with asyncio.timeout(timeout):
            return await self.events.get()

    async def until(
        self, job_id: str, status: int, timeout: float = DEADLINE
    ) -> list[job_service_pb2.WatchJobsResponse]:
        """Events up to and including ``job_id`` reaching ``status``."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                seen.append(event)
                if event.job.id == job_id and event.job.status == status:
                    return seen

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def wait_for_status(
    jobs_stub: Any, job_id: str, status: int, timeout: float = DEADLINE
) -> common_pb2.Job:
    """Watch one job until it reaches ``status`` (fails if it ends in another)."""
    async with asyncio.timeout(timeout):
        async for event in jobs_stub.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id)):
            if event.job.status == status:
                return event.job  # type: ignore[no-any-return]
    raise AssertionError(f"job {job_id} ended without reaching status {status}")


HIGH = common_pb2.Vulnerability(id="CVE-2024-6119", package="libssl3", installed_version="3.0.13",
                       fixed_version="3.0.15", severity=common_pb2.SEVERITY_HIGH)  # fmt: skip
LOW = common_pb2.Vulnerability(
    id="CVE-2024-5535", package="libssl3", severity=common_pb2.SEVERITY_LOW
)


async def scan_once(handler: Any, scanner: RawScanner, request: Any, **result: Any) -> str:
    job_id: str = (await handler.jobs.SubmitJob(request)).job.id
    (job,) = await scanner.assigned()
    assert job.job_id == job_id
    await scanner.finish(job, **result)
    return job_id
