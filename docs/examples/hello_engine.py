"""A complete scanning engine: images pass, anything else is refused for good.

Run it against a handler (``make run`` starts one on 127.0.0.1:50051):

    .venv/bin/python docs/examples/hello_engine.py 127.0.0.1:50051
"""

import asyncio
import sys

from imagehandler.v1 import common_pb2
from scanner_client import (
    ClientConfig,
    Database,
    Engine,
    Job,
    ProgressReporter,
    ScanFailure,
    ScannerClient,
)


class Hello(Engine):
    name = "hello"

    def databases(self) -> list[Database]:
        return [Database("hello-db", "1", released_at="2026-11-20")]

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        progress.report("analyse", 50)
        if not job.object.HasField("image"):
            raise ScanFailure("hello scans images only", code="HNDL-005", permanent=True)
        return common_pb2.ScanResult(verdict=common_pb2.VERDICT_PASSED)


if __name__ == "__main__":
    handler = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    client = ScannerClient(handler, Hello(), ClientConfig(scanner_id="hello-1"))
    asyncio.run(client.run())
