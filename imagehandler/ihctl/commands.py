"""The ihctl commands: one call (or stream) to the handler each, printed through render.

A command returns its exit code; a failed call raises :class:`grpc.RpcError`, which
:func:`imagehandler.ihctl.main` prints and turns into exit code 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TextIO

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from imagehandler.ihctl import args as cli_args
from imagehandler.ihctl import names, render
from imagehandler.v1 import (
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    scanner_service_pb2,
    scanner_service_pb2_grpc,
)

MAX_PAGE_SIZE = 1000


@dataclass
class Client:
    """The stubs a command calls, and the deadline of its unary calls (None: no deadline)."""

    handler: str
    timeout: float | None
    jobs: job_service_pb2_grpc.JobServiceStub
    scanners: scanner_service_pb2_grpc.ScannerServiceStub

    @classmethod
    def over(cls, channel: grpc.Channel, handler: str, timeout: float) -> Client:
        return cls(
            handler=handler,
            timeout=timeout or None,
            jobs=job_service_pb2_grpc.JobServiceStub(channel),
            scanners=scanner_service_pb2_grpc.ScannerServiceStub(channel),
        )


@dataclass
class Output:
    """Where a command prints, and the clock its ages are measured against."""

    out: TextIO
    err: TextIO
    json: bool
    now: Callable[[], datetime] = lambda: datetime.now(UTC)

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def show(self, response: Message, text: Callable[[], str]) -> int:
        """The response as JSON with --json, else the text; the command's exit code (0)."""
        self.line(render.to_json(response) if self.json else text())
        return 0


Command = Callable[[argparse.Namespace, Client, Output], int]


def submit(args: argparse.Namespace, client: Client, output: Output) -> int:
    response = client.jobs.SubmitJob(cli_args.submit_request(args), timeout=client.timeout)
    if output.json:
        output.line(render.to_json(response))
    elif args.quiet:
        output.line(response.job.id)
    else:
        output.line(render.submit_text(response))
    return 0


def get(args: argparse.Namespace, client: Client, output: Output) -> int:
    view = job_service_pb2.JOB_VIEW_FULL if args.history else job_service_pb2.JOB_VIEW_BASIC
    request = job_service_pb2.GetJobRequest(job_id=args.job_id, view=view)
    response = client.jobs.GetJob(request, timeout=client.timeout)
    if output.json:
        output.line(render.to_json(response))
        return 0
    output.line(render.job_view(response.job, output.now()))
    if args.history:
        output.line("")
        output.line("history:")
        output.line(render.history_table(response.job.history))
    if args.result:
        result_request = job_service_pb2.GetJobResultRequest(job_id=args.job_id)
        result = client.jobs.GetJobResult(result_request, timeout=client.timeout).result
        output.line("")
        output.line(render.findings(result))
    return 0


def redeliver(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = job_service_pb2.RedeliverJobRequest(job_id=args.job_id)
    response = client.jobs.RedeliverJob(request, timeout=client.timeout)
    return output.show(
        response, lambda: f"{response.job.id}  {names.JOB_STATUS.label(response.job.status)}"
    )


_SCOPES = {
    "object": job_service_pb2.RISK_SCOPE_OBJECT,
    "repository": job_service_pb2.RISK_SCOPE_REPOSITORY,
    "everywhere": job_service_pb2.RISK_SCOPE_EVERYWHERE,
}


def accept_risk(args: argparse.Namespace, client: Client, output: Output) -> int:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(days=args.days))
    request = job_service_pb2.AcceptRiskRequest(
        finding_id=args.finding_id,
        scope=_SCOPES[args.scope],
        job_id=args.job,
        reason=args.reason,
        duration=duration,
    )
    response = client.jobs.AcceptRisk(request, timeout=client.timeout)
    acceptance = response.acceptance
    return output.show(
        response,
        lambda: (
            f"{acceptance.id}\n{acceptance.finding_id} accepted ({acceptance.target}); "
            + render.reevaluated(response.verdicts_changed, response.summaries_changed, "PASSED")
        ),
    )


def risks(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = job_service_pb2.ListRiskAcceptancesRequest()
    response = client.jobs.ListRiskAcceptances(request, timeout=client.timeout)
    return output.show(response, lambda: render.acceptances_table(response.acceptances))


def revoke_risk(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = job_service_pb2.RevokeRiskAcceptanceRequest(id=args.acceptance_id)
    response = client.jobs.RevokeRiskAcceptance(request, timeout=client.timeout)
    return output.show(
        response,
        lambda: (
            "revoked; "
            + render.reevaluated(response.verdicts_changed, response.summaries_changed, "FAILED")
        ),
    )


def rematch(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = job_service_pb2.RematchJobsRequest(
        kinds=[names.OBJECT_KIND.parse(word) for word in args.kinds],
        registry=args.registry,
        repository=args.repository,
        all=args.all,
    )
    response = client.jobs.RematchJobs(request, timeout=client.timeout)
    return output.show(
        response, lambda: f"{response.queued} rematch jobs queued, {response.skipped} skipped"
    )


def list_jobs(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = cli_args.list_request(args)
    response = job_service_pb2.ListJobsResponse()
    limit: int = args.limit
    while True:
        remaining = limit - len(response.jobs)
        request.page_size = MAX_PAGE_SIZE if args.all else min(remaining, MAX_PAGE_SIZE)
        request.page_token = response.next_page_token
        page = client.jobs.ListJobs(request, timeout=client.timeout)
        response.jobs.extend(page.jobs)
        stuck = page.next_page_token == request.page_token
        response.next_page_token = page.next_page_token
        if not page.next_page_token or stuck:
            break
        if not args.all and len(response.jobs) >= limit:
            break
    if output.json:
        output.line(render.to_json(response))
    else:
        output.line(render.jobs_table(response.jobs, output.now()))
    if response.next_page_token and not args.all:
        output.note(f"ihctl: more jobs match; use --all or a --limit above {limit}")
    return 0


def watch(args: argparse.Namespace, client: Client, output: Output) -> int:
    """See the exit codes in :func:`watch_exit_code`."""
    single = bool(args.job_id)
    stream = client.jobs.WatchJobs(cli_args.watch_request(args))
    last: common_pb2.Job | None = None
    for event in stream:
        last = event.job
        if output.json:
            output.line(render.to_json(event, compact=True))
            continue
        output.line(render.watch_line(event, with_job=not single))
        if not event.HasField("transition"):
            # A single-job watch starts with the job and its history: show the story so far.
            for transition in event.job.history:
                past = job_service_pb2.WatchJobsResponse(job=event.job, transition=transition)
                output.line(render.watch_line(past, with_job=False))
    if not single:
        return 0
    status = last.status if last is not None else common_pb2.JOB_STATUS_UNSPECIFIED
    if status not in names.TERMINAL_STATUSES:
        # The stream ended without showing the end (a --status filter hid it): ask.
        request = job_service_pb2.GetJobRequest(job_id=args.job_id)
        status = client.jobs.GetJob(request, timeout=client.timeout).job.status
    code = watch_exit_code(status)
    if status not in names.TERMINAL_STATUSES:
        output.note(
            f"ihctl: the watch ended while job {args.job_id} is {names.JOB_STATUS.label(status)}"
        )
    return code


def watch_exit_code(status: int) -> int:
    """0 when the job FINISHED; 1 when it ended ERROR or CANCELLED, or is not done."""
    return 0 if status == common_pb2.JOB_STATUS_FINISHED else 1


def cancel(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = job_service_pb2.CancelJobRequest(job_id=args.job_id, reason=args.reason)
    response = client.jobs.CancelJob(request, timeout=client.timeout)
    return output.show(response, lambda: render.cancel_text(response.job))


def scanners(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = scanner_service_pb2.ListScannersRequest()
    response = client.scanners.ListScanners(request, timeout=client.timeout)
    return output.show(response, lambda: render.scanners_table(response.scanners, output.now()))


def stats(args: argparse.Namespace, client: Client, output: Output) -> int:
    request = job_service_pb2.GetQueueStatsRequest()
    response = client.jobs.GetQueueStats(request, timeout=client.timeout)
    return output.show(response, lambda: render.stats_view(response, output.now()))


COMMANDS: dict[str, Command] = {
    "submit": submit,
    "get": get,
    "list": list_jobs,
    "watch": watch,
    "cancel": cancel,
    "scanners": scanners,
    "stats": stats,
    "redeliver": redeliver,
    "accept-risk": accept_risk,
    "risks": risks,
    "revoke-risk": revoke_risk,
    "rematch": rematch,
}


def run(args: argparse.Namespace, client: Client, output: Output) -> int:
    return COMMANDS[args.command](args, client, output)
