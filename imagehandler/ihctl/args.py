"""The command line of ihctl and the requests it builds from the parsed arguments."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2

from imagehandler.ihctl import names
from imagehandler.v1 import common_pb2, job_service_pb2

DEFAULT_HANDLER = "127.0.0.1:50051"
HANDLER_ENV = "IHCTL_HANDLER"
TOKEN_ENV = "IHCTL_TOKEN"
TLS_CA_ENV = "IHCTL_TLS_CA"
DEFAULT_TIMEOUT = 10.0
DEFAULT_LIMIT = 100

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

DESCRIPTION = "Operator CLI of the image handler: submit, read, list, watch and cancel scan jobs."

EPILOG = """\
output:
  Tables and key/value views by default; statuses are shown upper case (IN_PROGRESS), the
  other enums as the words the options take (registry-event). Times are UTC (RFC 3339),
  ages and durations like 3s, 2m10s, 1h5m.
  --json prints the RPC's response message instead, in the
  protobuf JSON mapping with the .proto field names and every field present, e.g.
  ihctl --json get JOB | jq -r .job.status  ->  JOB_STATUS_PENDING.
  watch --json prints one compact WatchJobsResponse per line.
  submit prints the job id alone on its first line (submit -q prints only the id):
  JOB=$(ihctl submit image --repository library/alpine --tag 3.20 -q)

exit codes:
  0  success; for `watch JOB`, the job FINISHED
  1  a call failed (the HNDL-0NN message, or why the handler could not be reached, is on
     stderr); for `watch JOB`, the job ended ERROR or CANCELLED, or the stream ended first
  2  usage error
  130  interrupted (Ctrl-C)

environment:
  IHCTL_HANDLER  the handler address when --handler is not given (default 127.0.0.1:50051)
  IHCTL_TOKEN    the bearer token when --token is not given (prefer it to --token: a
                 command line is visible to other users of the machine)
  IHCTL_TLS_CA   the CA bundle when --tls-ca is not given

--handler, --json and --timeout may also follow the command.
"""


# ---------------------------------------------------------------------------------------------
# Argument types


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``1m30s``, ``1.5h``, ``500ms``; must be more than 0."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r} (seconds, or like 90s, 5m, 1h30m)"
            ) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (must be more than 0)")
    return seconds


def parse_timeout(text: str) -> float:
    """Seconds; 0 means no deadline."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r} (seconds, 0 for none)")
    return seconds


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"invalid label {text!r} (want key=value)")
    return key.strip(), value


def parse_digest(text: str) -> str:
    if not _DIGEST.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid digest {text!r} (want sha256: and 64 lowercase hex digits)"
        )
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid number {text!r} (want 1 or more)")
    return value


def read_sbom(path: str) -> bytes:
    """The bytes of an SBOM file; ``-`` reads standard input."""
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror}") from err


# ---------------------------------------------------------------------------------------------
# The parser


def _enum_option(
    parser: argparse.ArgumentParser,
    flag: str,
    words: names.EnumWords[Any],
    help_text: str,
    *,
    repeat: bool = False,
    dest: str | None = None,
) -> None:
    parser.add_argument(
        flag,
        type=names.normalize_word,  # checked against choices after
        choices=words.words,
        action="append" if repeat else "store",
        default=[] if repeat else None,
        dest=dest,
        metavar=words.prefix.rstrip("_"),
        help=f"{help_text} ({', '.join(words.words)})" + ("; repeatable" if repeat else ""),
    )


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = environ if environ is not None else {}
    handler_default = env.get(HANDLER_ENV) or DEFAULT_HANDLER
    parser = argparse.ArgumentParser(
        prog="ihctl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--handler",
        default=handler_default,
        metavar="HOST:PORT",
        help=f"the handler's gRPC address (env {HANDLER_ENV}; default {DEFAULT_HANDLER})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--token",
        default=env.get(TOKEN_ENV, ""),
        metavar="TOKEN",
        help=f"bearer token for a handler with --token-file (env {TOKEN_ENV})",
    )
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    parser.add_argument(
        "--tls-ca",
        default=env.get(TLS_CA_ENV, ""),
        metavar="FILE",
        help=f"connect with TLS, trusting this PEM CA bundle (env {TLS_CA_ENV})",
    )
    parser.add_argument(
        "--tls-cert", default="", metavar="FILE", help="client certificate (mutual TLS), PEM"
    )
    parser.add_argument("--tls-key", default="", metavar="FILE", help="key of --tls-cert, PEM")
    parser.add_argument(
        "--timeout",
        type=parse_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of each call, 0 for none (default {DEFAULT_TIMEOUT:g}); "
        "not applied to the watch stream",
    )

    # The global options are also accepted after the command; SUPPRESS keeps the global value
    # (or default) when they are not given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument(
        "--handler", default=argparse.SUPPRESS, metavar="HOST:PORT", help="as before COMMAND"
    )
    common.add_argument(
        "--timeout",
        type=parse_timeout,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="as before COMMAND",
    )

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_submit(commands, common)

    get = commands.add_parser(
        "get", parents=[common], help="show one job", description="Show one job."
    )
    get.add_argument("job_id", metavar="JOB", help="the job id")
    get.add_argument(
        "--history", action="store_true", help="also print the job's transitions (full view)"
    )
    get.add_argument("--result", action="store_true", help="also print the full result's findings")

    jobs = commands.add_parser(
        "list",
        parents=[common],
        help="list jobs",
        description="List jobs in arrival order, as a table "
        "(ID, KIND, OBJECT, STATUS, RUNS, SCANNER, POSITION, AGE).",
    )
    _enum_option(jobs, "--status", names.JOB_STATUS, "only this status", repeat=True)
    _enum_option(jobs, "--kind", names.OBJECT_KIND, "only this object kind", repeat=True)
    _enum_option(jobs, "--trigger", names.TRIGGER, "only this trigger", repeat=True)
    jobs.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N jobs (default {DEFAULT_LIMIT}); a note on stderr says when more exist",
    )
    jobs.add_argument(
        "--all",
        action="store_true",
        help="every matching job, following pages (--limit is ignored)",
    )

    watch = commands.add_parser(
        "watch",
        parents=[common],
        help="follow job transitions live",
        description="With JOB: print the job as it is, then a line per transition, until the "
        "job is done; exit 0 when it FINISHED, 1 when it ended ERROR or CANCELLED. Without "
        "JOB: print every transition until Ctrl-C.",
    )
    watch.add_argument(
        "job_id", metavar="JOB", nargs="?", default="", help="the job id; all jobs without it"
    )
    _enum_option(
        watch, "--status", names.JOB_STATUS, "only transitions into this status", repeat=True
    )

    cancel = commands.add_parser(
        "cancel",
        parents=[common],
        help="cancel a PENDING or IN_PROGRESS job",
        description="Cancel a job; prints the job id and its new status.",
    )
    cancel.add_argument("job_id", metavar="JOB", help="the job id")
    cancel.add_argument("--reason", default="", help="why (recorded in the job's history)")

    commands.add_parser(
        "scanners",
        parents=[common],
        help="list the scanners",
        description="Scanners as a table: ID, STATUS, SLOTS, JOBS (in progress), "
        "PROCESSING (results being processed), VERSION, ENGINE, KINDS, LAST SEEN.",
    )
    commands.add_parser(
        "stats",
        parents=[common],
        help="queue and scanner counts",
        description="Jobs per status (pending per lane with the oldest's age), scanners "
        "connected/free/busy and free slots.",
    )
    redeliver = commands.add_parser(
        "redeliver",
        parents=[common],
        help="deliver a kept result to the receiving server again (after HNDL-001)",
        description="Deliver the result of a job whose delivery failed (HNDL-001) again.",
    )
    redeliver.add_argument("job_id", metavar="JOB", help="the job id")
    accept = commands.add_parser(
        "accept-risk",
        parents=[common],
        help="accept a finding's risk for a while",
        description="Accepted findings no longer fail verdicts; FINISHED jobs are re-evaluated "
        "at once and again when the acceptance expires. Prints the acceptance id.",
    )
    accept.add_argument("finding_id", metavar="FINDING", help="a CVE id, malware name, rule id")
    accept.add_argument("--reason", required=True, help="why the risk is accepted")
    accept.add_argument(
        "--scope",
        choices=("object", "repository", "everywhere"),
        default="object",
        help="the job's object (default), its repository, or everywhere",
    )
    accept.add_argument("--job", default="", help="the job whose object or repository it covers")
    accept.add_argument("--days", type=float, default=30.0, help="how long it holds (default 30)")
    commands.add_parser(
        "risks",
        parents=[common],
        help="list risk acceptances",
        description="Acceptances in force: ID, FINDING, SCOPE, TARGET, EXPIRES, REASON.",
    )
    revoke = commands.add_parser("revoke-risk", parents=[common], help="revoke a risk acceptance")
    revoke.add_argument("acceptance_id", metavar="ID", help="the acceptance id")
    rematch = commands.add_parser(
        "rematch",
        parents=[common],
        help="match stored SBOMs against the scanners' vulnerability database again",
        description="Queue a rematch job (trigger rematch, bulk lane) for the latest good scan "
        "of each object the filter selects: its stored SBOM is matched again, nothing is "
        "pulled. Scans already matched against the newest database are left out unless --all. "
        "Prints how many were queued and skipped.",
    )
    _enum_option(
        rematch, "--kind", names.OBJECT_KIND, "only objects of this kind", repeat=True, dest="kinds"
    )
    rematch.add_argument("--registry", default="", metavar="HOST", help="only this registry")
    rematch.add_argument("--repository", default="", help="only this repository")
    rematch.add_argument(
        "--all", action="store_true", help="also scans matched against the newest database"
    )
    return parser


def _add_submit(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    submit_common = argparse.ArgumentParser(add_help=False)
    _enum_option(submit_common, "--trigger", names.TRIGGER, "why the job is queued")
    _enum_option(
        submit_common,
        "--policy",
        names.POLICY,
        "a scan policy; none means the handler's default",
        repeat=True,
        dest="policies",
    )
    submit_common.add_argument(
        "--max-run-time",
        type=parse_duration,
        metavar="SECONDS",
        help="the longest one run may take (seconds, or like 90s, 5m)",
    )
    submit_common.add_argument(
        "--idempotency-key", default="", metavar="KEY", help="a second submit returns the first"
    )
    submit_common.add_argument(
        "--label",
        type=parse_label,
        action="append",
        default=[],
        dest="labels",
        metavar="KEY=VALUE",
        help="a label; repeatable",
    )
    _enum_option(submit_common, "--lane", names.LANE, "the queue lane")
    submit_common.add_argument(
        "--fresh",
        action="store_true",
        help="scan even when a stored result of the same image digest could be reused",
    )
    submit_common.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    parents = [common, submit_common]

    submit = commands.add_parser(
        "submit",
        help="queue a scan job",
        description="Queue a scan job. Prints the job id alone on the first line, then its "
        "status, then 'duplicate of an existing job' when the handler returned an existing one; "
        "-q prints only the id.",
    )
    kinds = submit.add_subparsers(dest="kind", metavar="KIND", required=True)

    image = kinds.add_parser("image", parents=parents, help="a container image")
    image.add_argument("--repository", required=True, help="for example library/alpine")
    image.add_argument("--registry", default="", metavar="HOST", help="default docker.io")
    image.add_argument("--tag", default="", help='default "latest" without tag or digest')
    image.add_argument("--digest", type=parse_digest, metavar="sha256:HEX")
    image.add_argument("--credentials-ref", default="", metavar="NAME", help="pull credentials")
    image.add_argument("--proxy-url", default="", metavar="URL", help="proxy for the pull")

    node = kinds.add_parser("node", parents=parents, help="a cluster node")
    node.add_argument("--node-name", required=True, metavar="NAME")
    node.add_argument("--cluster", default="")
    node.add_argument(
        "--root-path",
        required=True,
        metavar="PATH",
        help="where the node agent mounts the node's filesystem on the scanner (e.g. /host)",
    )

    artifact = kinds.add_parser("artifact", parents=parents, help="a CI/CD artifact")
    artifact.add_argument("--pipeline", default="")
    artifact.add_argument("--job", default="")
    artifact.add_argument("--path", default="")
    artifact.add_argument("--url", default="")
    artifact.add_argument(
        "--sbom-file",
        type=read_sbom,
        default=b"",
        dest="sbom",
        metavar="FILE",
        help="an SBOM document (CycloneDX JSON) sent inline; - reads stdin",
    )
    artifact.add_argument(
        "--sbom-format", default="", metavar="FORMAT", help="as the handler names it"
    )


# ---------------------------------------------------------------------------------------------
# Requests


def scan_object(args: argparse.Namespace) -> common_pb2.ScanObject:
    kind: str = args.kind
    if kind == "image":
        return common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry=args.registry,
                repository=args.repository,
                tag=args.tag,
                digest=args.digest or "",
                credentials_ref=args.credentials_ref,
                proxy_url=args.proxy_url,
            )
        )
    if kind == "node":
        return common_pb2.ScanObject(
            node=common_pb2.NodeObject(
                cluster=args.cluster, node_name=args.node_name, root_path=args.root_path
            )
        )
    if kind == "artifact":
        return common_pb2.ScanObject(
            artifact=common_pb2.ArtifactObject(
                pipeline=args.pipeline,
                job=args.job,
                path=args.path,
                url=args.url,
                sbom=args.sbom,
                sbom_format=args.sbom_format,
            )
        )
    raise ValueError(f"unknown object kind {kind!r}")


def submit_request(args: argparse.Namespace) -> job_service_pb2.SubmitJobRequest:
    request = job_service_pb2.SubmitJobRequest(
        object=scan_object(args),
        policies=[names.POLICY.parse(word) for word in args.policies],
        idempotency_key=args.idempotency_key,
        labels=dict(args.labels),
        fresh=args.fresh,
    )
    if args.trigger:
        request.trigger = names.TRIGGER.parse(args.trigger)
    if args.lane:
        request.lane = names.LANE.parse(args.lane)
    if args.max_run_time is not None:
        request.max_run_time.CopyFrom(seconds_to_duration(args.max_run_time))
    return request


def seconds_to_duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def list_request(args: argparse.Namespace) -> job_service_pb2.ListJobsRequest:
    """The filters of ``list``; the caller sets page_size and page_token."""
    return job_service_pb2.ListJobsRequest(
        statuses=[names.JOB_STATUS.parse(word) for word in args.status],
        kinds=[names.OBJECT_KIND.parse(word) for word in args.kind],
        triggers=[names.TRIGGER.parse(word) for word in args.trigger],
    )


def watch_request(args: argparse.Namespace) -> job_service_pb2.WatchJobsRequest:
    return job_service_pb2.WatchJobsRequest(
        job_id=args.job_id,
        statuses=[names.JOB_STATUS.parse(word) for word in args.status],
    )
