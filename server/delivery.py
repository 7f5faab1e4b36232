"""Forwarding to the receiving server (the seed's "mdw adapter").

What a job owes the receiving server is read from the job itself, never kept only here: its
status changes past ``job.delivered`` (acknowledgements are journaled), its processed result
while it waits in PROCESSING_RESULTS, and a verdict change past ``job.verdict_delivered``. The
:class:`Outbox` only remembers which jobs owe something and sends, in order per job, with a
fixed number of senders so that a backlog (after a restart, or a receiver that was down) never
opens more connections than the receiver's pool holds. Nothing owed is ever dropped: a failed
delivery is retried with backoff until it is acknowledged; when a job's result cannot be
delivered within ``--delivery-attempts`` the job manager records HNDL-001 on the job and keeps
the result for ``RedeliverJob``, while the job's status changes go on being retried.

Only what the receiving server answered (or a connection that could not be made) counts as a
failed attempt. A wait inside this process (for a pooled connection) is not the receiver's
fault and is retried without counting.

Two receivers: an HTTP webhook (JSON body, ``X-ImageHandler-Signature: sha256=<HMAC-SHA256 of
the body with the shared secret>``) and a gRPC ``ResultSinkService`` (``grpc://host:port``).
"""

from __future__ import annotations

import asyncio
import enum
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
# A delivery that waited inside this process is tried again after this long, uncounted.
DEFERRED_RETRY_SECONDS = 0.05


class DeliveryFailed(Exception):
    """The receiving server did not take the delivery; the text says what it answered."""


class DeliveryDeferred(Exception):
    """The delivery could not start for a reason local to this process; it is not the
    receiver's failure and costs no attempt."""


class Receiver(Protocol):
    async def send(self, request: result_sink_pb2.DeliverRequest) -> None: ...
    async def close(self) -> None: ...


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookReceiver:
    def __init__(self, url: str, secret: bytes, timeout: float, connections: int) -> None:
        self.url = url
        self.secret = secret
        # As many pooled connections as senders, and no pool timeout: a sender never waits for
        # a connection, and if it ever did, the wait would not count against the receiver.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

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
        except httpx.PoolTimeout as exc:
            raise DeliveryDeferred(f"waited for a pooled connection: {exc}") from None
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


def open_receiver(url: str, secret: bytes, timeout: float, connections: int) -> Receiver:
    scheme = urlsplit(url).scheme
    if scheme == "grpc":
        return GrpcSinkReceiver(urlsplit(url).netloc, timeout)
    return WebhookReceiver(url, secret, timeout, connections)


class Kind(enum.Enum):
    STATUS = "status"
    RESULT = "result"
    VERDICT = "verdict"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event, built when it is sent."""

    job_id: str
    kind: Kind
    request: result_sink_pb2.DeliverRequest
    # What its acknowledgement completes: the history length (STATUS), the run (RESULT) or
    # the verdict version (VERDICT).
    mark: int


class Owed(Protocol):
    """The job manager's side: what a job owes, and what happened to it."""

    async def next_delivery(self, job_id: str) -> Delivery | None:
        """The job's next owed event (journaled before it is returned), or None."""

    def delivered(self, delivery: Delivery) -> None: ...

    def failed(self, delivery: Delivery, answer: str, failures: int) -> None:
        """The receiver refused it; ``failures`` in a row for this job, this one included."""


class _State(enum.Enum):
    READY = 1
    SENDING = 2
    WAITING = 3


@dataclass(slots=True)
class _Tracked:
    since: float  # loop time the job began to owe
    state: _State = _State.READY
    failures: int = 0
    last_answer: str = ""


class Outbox:
    """Jobs that owe deliveries, sent in order per job by a fixed pool of senders."""

    def __init__(
        self,
        receiver: Receiver,
        owed: Owed,
        *,
        senders: int,
        backoff: float,
        max_backoff: float = 30.0,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.receiver = receiver
        self._owed = owed
        self._senders = senders
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._on_failure = on_failure
        self._tracked: dict[str, _Tracked] = {}
        self._ready: deque[str] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Failures in a row across all jobs: while the receiver fails everything, every sender
        # waits, so a long backlog does not hammer a receiver that is down.
        self._streak = 0
        self._paused_until = 0.0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._send_forever(), name=f"delivery-sender-{n}")
            for n in range(self._senders)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self.receiver.close()

    def owe(self, job_id: str) -> None:
        """The job has something (more) to deliver. A job already tracked is looked at again
        after its current send or wait, so one call per change is enough and cheap."""
        if job_id in self._tracked:
            return
        self._tracked[job_id] = _Tracked(since=asyncio.get_running_loop().time())
        self._make_ready(job_id)

    @property
    def owing(self) -> int:
        """Jobs that owe at least one delivery."""
        return len(self._tracked)

    def oldest_age(self) -> float:
        if not self._tracked:
            return 0.0
        now = asyncio.get_running_loop().time()
        return now - min(t.since for t in self._tracked.values())

    def last_answer(self, job_id: str) -> str:
        tracked = self._tracked.get(job_id)
        return tracked.last_answer if tracked is not None else ""

    def _make_ready(self, job_id: str) -> None:
        self._timers.pop(job_id, None)
        tracked = self._tracked.get(job_id)
        if tracked is None:
            return
        tracked.state = _State.READY
        self._ready.append(job_id)
        self._wake.set()

    async def _take(self) -> str:
        while not self._ready:
            self._wake.clear()
            await self._wake.wait()
        return self._ready.popleft()

    async def _send_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job_id = await self._take()
            tracked = self._tracked.get(job_id)
            if tracked is None or tracked.state is not _State.READY:
                continue
            tracked.state = _State.SENDING
            pause = self._paused_until - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                delivery = await self._owed.next_delivery(job_id)
            except Exception:  # a sender must survive any one job
                log.exception("delivery.build_failed", job_id=job_id)
                self._retry_later(job_id, tracked, self.max_backoff)
                continue
            if delivery is None:
                del self._tracked[job_id]  # nothing more is owed
                continue
            try:
                await self.receiver.send(delivery.request)
            except DeliveryDeferred:
                self._retry_later(job_id, tracked, DEFERRED_RETRY_SECONDS)
                continue
            except DeliveryFailed as exc:
                self._failed(job_id, tracked, delivery, str(exc) or "no answer")
                continue
            self._streak = 0
            tracked.failures = 0
            tracked.last_answer = ""
            self._owed.delivered(delivery)
            # To the back of the line: a job with many owed events does not hold a sender.
            self._make_ready(job_id)

    def _failed(self, job_id: str, tracked: _Tracked, delivery: Delivery, answer: str) -> None:
        tracked.failures += 1
        tracked.last_answer = answer
        self._streak += 1
        self._on_failure()
        log.warning(
            "delivery.failed",
            job_id=job_id,
            key=delivery.request.idempotency_key,
            attempt=tracked.failures,
            answer=answer,
        )
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + self._delay(self._streak))
        self._owed.failed(delivery, answer, tracked.failures)
        self._retry_later(job_id, tracked, self._delay(tracked.failures))

    def _delay(self, failures: int) -> float:
        """Exponential backoff with equal jitter: at least half the step, at most the cap."""
        step = min(self.max_backoff, self.backoff * 2.0 ** min(failures - 1, 30))
        return step / 2 + random.uniform(0, step / 2)

    def _retry_later(self, job_id: str, tracked: _Tracked, delay: float) -> None:
        tracked.state = _State.WAITING
        loop = asyncio.get_running_loop()
        self._timers[job_id] = loop.call_later(delay, self._make_ready, job_id)
