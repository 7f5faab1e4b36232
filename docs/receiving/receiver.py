"""A minimal receiving server for the handler's webhook (standard library only).

It checks each delivery's signature with the key exactly as the handler derives it, answers 200
to a delivery it accepts (and to a repeat of one: the idempotency key says so), 401 to one whose
signature does not match, and prints one JSON line per delivery on stdout.

    python3 docs/receiving/receiver.py --listen 127.0.0.1:8080 --secret-file receiver.secret

and start the handler with ``--receiver-url http://127.0.0.1:8080/hook --receiver-secret-file
receiver.secret``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def read_secret(path: str) -> bytes:
    """The HMAC key, as the handler reads --receiver-secret-file: the file's bytes without
    leading and trailing whitespace, so the newline an editor or ``echo`` ends the file with is
    not part of the key."""
    return Path(path).read_bytes().strip()


def signature_ok(secret: bytes, body: bytes, header: str) -> bool:
    """``X-ImageHandler-Signature`` is ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header, expected)


class Receiver(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], secret: bytes) -> None:
        super().__init__(address, Delivery)
        self.secret = secret
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def say(self, **line: Any) -> None:
        with self.lock:
            print(json.dumps(line), flush=True)


class Delivery(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        key = self.headers.get("X-ImageHandler-Idempotency-Key", "")
        if not signature_ok(
            self.server.secret, body, self.headers.get("X-ImageHandler-Signature", "")
        ):
            self.server.say(refused=key, reason="signature does not match")
            self.send_response(401)
            self.end_headers()
            return
        event = json.loads(body)
        with self.server.lock:
            repeat = key in self.server.seen
            self.server.seen.add(key)
        if not repeat:
            job = event.get("job", {})
            what = "result" if "result" in event else "status"
            self.server.say(received=key, kind=what, job=job.get("id"), status=job.get("status"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per delivery on stdout is enough


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    parser.add_argument("--secret-file", required=True, metavar="FILE")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    server = Receiver((host, int(port)), read_secret(args.secret_file))
    print(f"receiving on http://{host}:{server.server_port}/hook", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it quietly
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
