"""The docs' examples are files the pages show as they are, and each runs as its page says:
the engine of docs/scanners/own-engine.md scans on a real handler, the API page's client
submits to one, and docs/performance.md's table printer reads a real bench results file."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from tests.conftest import Handler
from tests.integration.test_scanner_client import DONE, alpine
from tests.paths import ROOT

DOCS = ROOT / "docs"
EXAMPLE = DOCS / "examples" / "hello_engine.py"
# A bound, not a timing: the example starts a Python process of its own (imports included).
DEADLINE = 60.0


@pytest.mark.parametrize(
    ("page", "example"),
    [
        ("scanners/own-engine.md", "examples/hello_engine.py"),
        ("reference/api.md", "examples/submit_job.py"),
    ],
)
def test_the_page_shows_the_example_file_as_it_is(page: str, example: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.DOTALL)
    assert (DOCS / example).read_text() in blocks, f"{page} no longer shows {example} verbatim"


async def finished(
    handler: Handler, job_id: str, example: asyncio.subprocess.Process
) -> common_pb2.Job:
    """The job once it is done, from WatchJobs; fails at once if the example process exits."""

    async def watch() -> common_pb2.Job:
        call = handler.jobs.WatchJobs(job_service_pb2.WatchJobsRequest(job_id=job_id))
        try:
            async for event in call:
                if event.job.status in DONE:
                    job: common_pb2.Job = event.job
                    return job
        finally:
            call.cancel()
        raise AssertionError(f"the watch of {job_id} ended before the job was done")

    watching = asyncio.create_task(watch())
    exited = asyncio.create_task(example.wait())
    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.wait({watching, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        if not watching.done():
            watching.cancel()
    if not watching.done() or watching.cancelled():
        raise AssertionError(
            f"the example exited with {example.returncode} before {job_id} was done"
        )
    return watching.result()


async def test_the_example_engine_scans_images_and_refuses_nodes(
    handler: Handler, tmp_path: Path
) -> None:
    image = await handler.jobs.SubmitJob(alpine())
    node = await handler.jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(
            object=common_pb2.ScanObject(
                node=common_pb2.NodeObject(node_name="worker-1", root_path="/host")
            )
        )
    )
    output = tmp_path / "example.log"
    with output.open("wb") as sink:
        # As the page says to run it: the file itself, given the handler's address.
        example = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), handler.address, cwd=ROOT, stdout=sink, stderr=sink
        )
    try:
        passed = await finished(handler, image.job.id, example)
        refused = await finished(handler, node.job.id, example)
        listed = await handler.scanners.ListScanners(scanner_service_pb2.ListScannersRequest())
    finally:
        if example.returncode is None:
            example.terminate()
        async with asyncio.timeout(DEADLINE):
            await example.wait()
    log = output.read_text(errors="replace")
    assert passed.status == common_pb2.JOB_STATUS_FINISHED, log
    assert passed.result.verdict == common_pb2.VERDICT_PASSED
    assert passed.scanner_id == "hello-1"
    assert refused.status == common_pb2.JOB_STATUS_ERROR, log
    assert refused.error.code == "HNDL-005"
    assert refused.runs == 1  # permanent: not run again
    assert "hello scans images only" in refused.error.detail + refused.error.message
    engines = {s.scanner_id: s.engine for s in listed.scanners}
    assert engines.get("hello-1") == "hello"


def test_the_bench_table_example_prints_every_figure_of_a_results_file() -> None:
    """docs/performance.md reads bench results with docs/examples/bench_table.py: every figure
    of the kept reference run, and a run set beside itself compares as 1.00 x."""
    reference = ROOT / "bench" / "results" / "reference-2026-12-02.json"
    script = ROOT / "docs" / "examples" / "bench_table.py"
    figures = [row["figure"] for row in json.loads(reference.read_text())["table"]]
    shown = subprocess.run(
        [sys.executable, str(script), str(reference)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(shown) == 1 + len(figures)
    for line, figure in zip(shown[1:], figures, strict=True):
        assert line.startswith(figure), (line, figure)
    verdicts = {line.rsplit(" ", 1)[-1] for line in shown}
    assert {"PASS", "FAIL"} <= verdicts
    side_by_side = subprocess.run(
        [sys.executable, str(script), str(reference), str(reference)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    compared = side_by_side[2:]
    assert len(compared) == len(figures)
    for line, figure in zip(compared, figures, strict=True):
        assert line.startswith(figure), (line, figure)
        assert line.endswith("1.00 x"), line


async def test_the_submit_example_queues_a_job(handler: Handler) -> None:
    """docs/examples/submit_job.py, run as the API page says, queues a job the handler knows."""
    example = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DOCS / "examples" / "submit_job.py"),
        handler.address,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await example.communicate()
    assert example.returncode == 0, err.decode()
    job_id, status = out.decode().split()
    assert status == "JOB_STATUS_PENDING"
    job = (await handler.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))).job
    assert job.object.image.repository == "library/alpine"
    assert job.object.image.tag == "3.20"
