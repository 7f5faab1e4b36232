"""The receiving server's clients: an HTTP webhook (JSON body, ``X-ImageHandler-Signature:
sha256=<HMAC-SHA256 of the body with the shared secret>``) and a gRPC ``ResultSinkService``
(``grpc://host:port``). Each implements :class:`server.service.delivery.Receiver`."""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import urlsplit

import grpc
import httpx
from google.protobuf import json_format

from imagehandler.v1 import result_sink_pb2, result_sink_pb2_grpc
from server.service.delivery import DeliveryDeferred, DeliveryFailed, Receiver

SIGNATURE_HEADER = "X-ImageHandler-Signature"
KEY_HEADER = "X-ImageHandler-Idempotency-Key"


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
