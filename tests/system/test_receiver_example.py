"""docs/receiving/: the example webhook receiver, run as a real process, verifies the handler's
signatures with the key exactly as the docs state it (the secret file's bytes, stripped), for a
secret file that ends in a newline as ``echo`` writes it."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imagehandler.v1 import common_pb2
from tests.conftest import MakeHandler
from tests.helpers import RawScanner, image, wait_for_status
from tests.paths import ROOT

EXAMPLE = ROOT / "docs" / "receiving" / "receiver.py"
WAIT = 10.0


class ExampleReceiver:
    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.lines: list[dict[str, Any]] = []

    async def until(self, key: str) -> dict[str, Any]:
        """The line it printed for the delivery with idempotency key ``key``."""
        assert self.process.stdout is not None
        async with asyncio.timeout(WAIT):
            while True:
                line: dict[str, Any] = json.loads(await self.process.stdout.readline())
                self.lines.append(line)
                if key in (line.get("received"), line.get("refused")):
                    return line


@pytest.fixture
async def example_receiver(tmp_path: Path) -> AsyncIterator[tuple[ExampleReceiver, Path]]:
    secret_file = tmp_path / "receiver.secret"
    secret_file.write_bytes(b"s3cret\n")  # printf 's3cret\n' > receiver.secret
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--listen", "127.0.0.1:0", "--secret-file", str(secret_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    async with asyncio.timeout(WAIT):
        banner = (await process.stderr.readline()).decode()
    assert banner.startswith("receiving on http://127.0.0.1:"), banner
    try:
        yield ExampleReceiver(process, banner.split()[-1]), secret_file
    finally:
        process.kill()
        await process.wait()


async def test_the_example_receiver_verifies_signatures_with_the_documented_key(
    make_handler: MakeHandler, example_receiver: tuple[ExampleReceiver, Path]
) -> None:
    receiver, secret_file = example_receiver
    handler = await make_handler(
        receiver_url=receiver.url, receiver_secret_file=str(secret_file), delivery_backoff=0.01
    )
    async with RawScanner(handler.scanners, "s1") as scanner:
        await scanner.start()
        job_id = (await handler.jobs.SubmitJob(image())).job.id
        (assigned,) = await scanner.assigned()
        await scanner.finish(assigned)
        line = await receiver.until(f"{job_id}:result:1")
        await wait_for_status(handler.jobs, job_id, common_pb2.JOB_STATUS_FINISHED)
    # Taken (its signature matched), and so was every status change before it.
    assert (line.get("received"), line["kind"], line["job"]) == (
        f"{job_id}:result:1",
        "result",
        job_id,
    )
    assert all("received" in seen for seen in receiver.lines), receiver.lines
