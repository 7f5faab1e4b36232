"""A real receiving server for the delivery tests: an HTTP server in a thread that records
every delivery it accepts and can be told to refuse some or all of them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SECRET = b"s3cret-for-tests"


class Receiver(BaseHTTPRequestHandler):
    """A receiving server: records deliveries, fails the first ``fail`` requests."""

    server: ReceiverServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.attempts += 1
            failing = srv.attempts <= srv.fail or srv.always_fail
            if srv.fail_status and srv.fail_status in body.decode():
                failing = True
        srv.gate.wait(timeout=30)
        if failing:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"receiver is down for maintenance")
            return
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(self.headers["X-ImageHandler-Signature"], expected)
        with srv.lock:
            srv.received.append(
                (self.headers["X-ImageHandler-Idempotency-Key"], json.loads(body), signed)
            )
        self.send_response(200 if signed else 401)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class ReceiverServer(ThreadingHTTPServer):
    fail = 0
    always_fail = False
    attempts = 0
    fail_status = ""  # refuse every status change to this status (e.g. "JOB_STATUS_IN_PROGRESS")

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Receiver)
        self.lock = threading.Lock()
        self.received: list[tuple[str, dict[str, Any], bool]] = []
        self.gate = threading.Event()
        self.gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def results(self) -> list[tuple[str, dict[str, Any], bool]]:
        with self.lock:
            return [r for r in self.received if "result" in r[1]]


@pytest.fixture
def receiver() -> Iterator[ReceiverServer]:
    server = ReceiverServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.gate.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return path


async def received_keys(receiver: ReceiverServer, want: set[str]) -> set[str]:
    """The idempotency keys received, once ``want`` are among them (10 s deadline)."""
    async with asyncio.timeout(10):
        while True:
            with receiver.lock:
                keys = {k for k, _, _ in receiver.received}
            if want <= keys:
                return keys
            await asyncio.sleep(0.01)  # the receiver is another thread's record: poll it
