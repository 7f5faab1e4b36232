"""The README's "Your own engine" code, taken from README.md as written, scans on a real handler."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from imagehandler.v1 import common_pb2, job_service_pb2
from scanner_client import Engine, ScannerClient
from tests.conftest import Handler
from tests.test_scanner_client import alpine, config, running, until_done

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_engine() -> type[Engine]:
    text = README.read_text()
    section = text[text.index("### Your own engine") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "the README's engine example is gone"
    namespace: dict[str, Any] = {"__name__": "readme_example"}  # not __main__: no client run
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # our own README, as written
    engine: object = namespace["Hello"]
    assert isinstance(engine, type)
    assert issubclass(engine, Engine)
    return engine


async def test_the_readme_engine_scans_images_and_refuses_nodes(handler: Handler) -> None:
    client = ScannerClient(handler.address, readme_engine()(), config("readme-hello"))
    async with running(client):
        image = await handler.jobs.SubmitJob(alpine())
        node = await handler.jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(
                object=common_pb2.ScanObject(
                    node=common_pb2.NodeObject(node_name="worker-1", root_path="/host")
                )
            )
        )
        finished = await until_done(handler, image.job.id)
        refused = await until_done(handler, node.job.id)
    assert finished.status == common_pb2.JOB_STATUS_FINISHED
    assert finished.result.verdict == common_pb2.VERDICT_PASSED
    assert refused.status == common_pb2.JOB_STATUS_ERROR
    assert refused.error.code == "HNDL-005"
    assert "hello scans images only" in refused.error.detail + refused.error.message
