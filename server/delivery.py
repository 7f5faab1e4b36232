"""Forwarding to the receiving server (the seed's "mdw adapter").

Every status change and every result is delivered at least once, in order per job, with an
idempotency key that stays the same across retries (``<job id>:<history index>`` for a status
change, ``<job id>:result:<run>`` for a result). Retries back off exponentially with full
jitter. When a result's retry budget is spent, the job records ``HNDL-001: mdw adapter send
status: <what the server answered>`` and keeps its result for ``RedeliverJob``.

Two receivers: an HTTP webhook (JSON body, ``X-ImageHandler-Signature: sha256=<HMAC-SHA256 of
the body with the shared secret>``) and a gRPC ``ResultSinkService`` (``grpc://host:port``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import grpc
import httpx
import structlog
from google.protobuf import json_format

from imagehandler.v1 import result_sink_pb2, result_sink_pb2_grpc

log = structlog.get_logger("imagehandler.delivery")

SIGNATURE_HEADER = "X-ImageHandler-Signature"
KEY_HEADER = "X-ImageHandler-Idempotency-Key"


class DeliveryFailed(Exception):
    """The receiving server did not take the delivery; the text says what it answered."""


class Receiver(Protocol):
    async def send(self, request: result_sink_pb2.DeliverRequest) -> None: ...
    async def close(self) -> None: ...


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookReceiver:
    def __init__(self, url: str, secret: bytes, timeout: float) -> None:
        self.url = url
        self.secret = secret
        self._client = httpx.AsyncClient(timeout=timeout)

    async def send(self, request: result_sink_pb2.DeliverRequest) -> None:
        body = json.dumps(
            json_format.MessageToDict(request, preserving_proto_field_name=True),
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/json",
            KEY_HEADER: request.idempotency_key,
            SIGNATURE_HEADER: sign(self.secret, body),
        }
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"HTTP {response.status_code}: {response.text[:200]}")

    async def close(self) -> None:
        await self._client.aclose()


class GrpcSinkReceiver:
    def __init__(self, target: str, timeout: float) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = result_sink_pb2_grpc.ResultSinkServiceStub(self._channel)
        self._timeout = timeout

    async def send(self, request: result_sink_pb2.DeliverRequest) -> None:
        try:
            await self._stub.Deliver(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise DeliveryFailed(f"{exc.code().name}: {exc.details()}") from None

    async def close(self) -> None:
        await self._channel.close(None)


def open_receiver(url: str, secret: bytes, timeout: float) -> Receiver:
    scheme = urlsplit(url).scheme
    if scheme == "grpc":
        return GrpcSinkReceiver(urlsplit(url).netloc, timeout)
    return WebhookReceiver(url, secret, timeout)


@dataclass(frozen=True)
class Delivery:
    job_id: str
    request: result_sink_pb2.DeliverRequest
    # For a status change: the history length it completes; 0 for a result.
    history_count: int = 0

    @property
    def is_result(self) -> bool:
        return self.request.HasField("result")


StatusDelivered = Callable[[str, int], None]
ResultDelivered = Callable[[str, "str | None"], None]  # job id, failure text or None


class Deliverer:
    """Per-job ordered delivery queues, each drained by its own task while it has work."""

    def __init__(
        self,
        receiver: Receiver,
        *,
        attempts: int,
        backoff: float,
        max_backoff: float = 30.0,
        on_status: StatusDelivered,
        on_result: ResultDelivered,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.receiver = receiver
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._on_status = on_status
        self._on_result = on_result
        self._on_failure = on_failure
        self._queues: dict[str, deque[Delivery]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Jobs with a status change whose attempts were spent: the job's acknowledged count
        # must not move past it, so a restart sends it (and those after it) again.
        self._status_gaps: set[str] = set()

    def enqueue(self, delivery: Delivery) -> None:
        self._queues.setdefault(delivery.job_id, deque()).append(delivery)
        if delivery.job_id not in self._tasks:
            self._tasks[delivery.job_id] = asyncio.create_task(self._drain(delivery.job_id))

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def _drain(self, job_id: str) -> None:
        queue = self._queues[job_id]
        try:
            while queue:
                delivery = queue[0]
                failure = await self._send_with_retries(delivery)
                queue.popleft()
                if delivery.is_result:
                    self._on_result(job_id, failure)
                elif failure is not None:
                    self._status_gaps.add(job_id)
                elif job_id not in self._status_gaps:
                    self._on_status(job_id, delivery.history_count)
        finally:
            self._tasks.pop(job_id, None)
            if not queue:
                self._queues.pop(job_id, None)

    async def _send_with_retries(self, delivery: Delivery) -> str | None:
        """None when delivered; else what the receiver last answered."""
        answer = ""
        for attempt in range(1, self.attempts + 1):
            try:
                await self.receiver.send(delivery.request)
                return None
            except DeliveryFailed as exc:
                answer = str(exc)
                log.warning(
                    "delivery.failed",
                    job_id=delivery.job_id,
                    key=delivery.request.idempotency_key,
                    attempt=attempt,
                    answer=answer,
                )
            if attempt < self.attempts:
                ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, ceiling))  # full jitter
        self._on_failure()
        return answer or "no answer"

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.receiver.close()
