"""Result processing: the step between a scanner's result and a FINISHED job.

A result moves its job to PROCESSING_RESULTS and waits in a queue for one of the result
workers (the seed's ``scanWorkers``); the worker checks and summarises it and hands the job
back to be finished. Summaries count findings by severity and decide a verdict when the scanner
gave none (fail on critical or high vulnerabilities, or any malware).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from imagehandler.v1 import common_pb2
from server.errors import Catalogue, HandlerError
from server.model import Job

log = structlog.get_logger("imagehandler.results")

_SEVERITY_FIELDS = {
    common_pb2.SEVERITY_CRITICAL: "critical",
    common_pb2.SEVERITY_HIGH: "high",
    common_pb2.SEVERITY_MEDIUM: "medium",
    common_pb2.SEVERITY_LOW: "low",
    common_pb2.SEVERITY_NEGLIGIBLE: "negligible",
}


def summarize(result: common_pb2.ScanResult) -> common_pb2.ResultSummary:
    summary = common_pb2.ResultSummary(
        vulnerabilities_total=len(result.vulnerabilities),
        malware=len(result.malware),
        misconfigurations=len(result.misconfigurations),
        secrets=len(result.secrets),
    )
    summary.databases.extend(result.databases)
    for vulnerability in result.vulnerabilities:
        name = _SEVERITY_FIELDS.get(vulnerability.severity)
        if name is not None:
            setattr(summary, name, getattr(summary, name) + 1)
    if result.verdict != common_pb2.VERDICT_UNSPECIFIED:
        summary.verdict = result.verdict
    elif summary.critical or summary.high or summary.malware:
        summary.verdict = common_pb2.VERDICT_FAILED
    else:
        summary.verdict = common_pb2.VERDICT_PASSED
    return summary


def check_result(result: common_pb2.ScanResult) -> None:
    """HNDL-005 for a result that cannot be right."""
    known = common_pb2.Verdict.values()
    if result.verdict not in known:
        raise HandlerError(
            Catalogue.SCAN_PARAMS_EMPTY, f"result verdict {result.verdict} is unknown"
        )
    for index, vulnerability in enumerate(result.vulnerabilities):
        if not vulnerability.id:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY, f"result vulnerabilities[{index}] has no id"
            )


Finish = Callable[[Job, "common_pb2.ResultSummary | HandlerError"], None]


class ResultPipeline:
    """A bounded pool of result workers fed in arrival order."""

    def __init__(self, workers: int, finish: Finish) -> None:
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._finish = finish
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.in_pipeline: dict[str, Job] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"result-worker-{n}")
            for n in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def submit(self, job: Job) -> None:
        self.in_pipeline[job.id] = job
        self._queue.put_nowait(job)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                outcome = await self._process(job)
                self.in_pipeline.pop(job.id, None)
                self._finish(job, outcome)
            except Exception:  # a worker must survive any one bad result
                log.exception("result.worker_failed", job_id=job.id)
                self.in_pipeline.pop(job.id, None)
                self._finish(job, HandlerError(Catalogue.SYSTEM_ERROR, "result processing failed"))

    async def _process(self, job: Job) -> common_pb2.ResultSummary | HandlerError:
        result: common_pb2.ScanResult = job.result
        try:
            check_result(result)
        except HandlerError as error:
            return error
        return summarize(result)
