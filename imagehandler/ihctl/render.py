"""Everything ihctl prints: tables, key/value views, durations, timestamps, JSON, errors.

Pure functions of protobuf messages (and of ``now`` where an age is shown), so that they are
testable without a handler. Statuses are shown as their upper-case labels (``IN_PROGRESS``),
the other enums as the CLI words that select them (``registry-event``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from imagehandler.errors import Catalogue, format_message
from imagehandler.ihctl import names
from imagehandler.rpc import RemoteError
from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2

DEFAULT_REGISTRY = "docker.io"
NONE = "-"

# ---------------------------------------------------------------------------------------------
# Scalars


def format_duration(seconds: float) -> str:
    """``0s``, ``850ms``, ``3s``, ``2m10s``, ``1h5m``, ``3d4h``: at most two units, truncated."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        millis = int(seconds * 1000)
        return f"{millis}ms" if millis else "0s"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    first = next(i for i, (amount, _) in enumerate(units) if amount)
    shown = units[first : first + 2]
    if len(shown) == 2 and shown[1][0] == 0:
        shown = shown[:1]
    return "".join(f"{amount}{unit}" for amount, unit in shown)


def is_set(ts: timestamp_pb2.Timestamp) -> bool:
    return bool(ts.seconds or ts.nanos)


def to_datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.seconds, UTC) + timedelta(microseconds=ts.nanos // 1000)


def format_timestamp(ts: timestamp_pb2.Timestamp, *, millis: bool = False) -> str:
    """RFC 3339 in UTC, ``2026-11-20T06:00:00Z`` (``.123Z`` with millis); ``-`` when unset."""
    if not is_set(ts):
        return NONE
    moment = to_datetime(ts)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_age(ts: timestamp_pb2.Timestamp, now: datetime) -> str:
    """How long ago ``ts`` was, as a duration; ``-`` when unset."""
    if not is_set(ts):
        return NONE
    return format_duration(max(0.0, (now - to_datetime(ts)).total_seconds()))


def format_timestamp_with_age(ts: timestamp_pb2.Timestamp, now: datetime) -> str:
    if not is_set(ts):
        return NONE
    return f"{format_timestamp(ts)} ({format_age(ts, now)} ago)"


def proto_duration_seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


# ---------------------------------------------------------------------------------------------
# Objects and errors


def short_digest(digest: str) -> str:
    """``sha256:`` and the first 12 hex digits."""
    algorithm, _, hex_digits = digest.partition(":")
    return f"{algorithm}:{hex_digits[:12]}" if hex_digits else digest[:19]


def image_ref(image: common_pb2.ImageObject, *, shorten: bool = False) -> str:
    """``docker.io/library/alpine:3.20``, ``...@sha256:...``; ``:latest`` without tag or digest."""
    ref = f"{image.registry or DEFAULT_REGISTRY}/{image.repository}"
    if image.tag:
        ref += f":{image.tag}"
    if image.digest:
        ref += "@" + (short_digest(image.digest) if shorten else image.digest)
    if not image.tag and not image.digest:
        ref += ":latest"
    return ref


def node_ref(node: common_pb2.NodeObject) -> str:
    return f"{node.cluster}/{node.node_name}" if node.cluster else node.node_name


def artifact_ref(artifact: common_pb2.ArtifactObject) -> str:
    parts = []
    origin = "/".join(part for part in (artifact.pipeline, artifact.job) if part)
    if origin:
        parts.append(origin)
    if artifact.url or artifact.path:
        parts.append(artifact.url or artifact.path)
    if artifact.sbom:
        parts.append(f"sbom ({len(artifact.sbom)} bytes)")
    return " ".join(parts) or NONE


def object_ref(obj: common_pb2.ScanObject, *, shorten: bool = False) -> str:
    """A short, readable reference to the object of a job."""
    which = obj.WhichOneof("target")
    if which == "image":
        return image_ref(obj.image, shorten=shorten)
    if which == "node":
        return node_ref(obj.node)
    if which == "artifact":
        return artifact_ref(obj.artifact)
    return NONE


def object_kind(job: common_pb2.Job) -> str:
    """The kind word of a job, from ``kind`` or, when unset, from the object's oneof."""
    if job.kind:
        return names.OBJECT_KIND.word(job.kind)
    return job.object.WhichOneof("target") or NONE


def job_error_text(error: common_pb2.JobError) -> str:
    """``HNDL-0NN: text: detail``; empty when there is no error."""
    if not (error.code or error.message or error.detail):
        return ""
    message = error.message
    if not message:
        kind = Catalogue.by_code(error.code)
        return format_message(error.code, kind.entry.text if kind else "", error.detail)
    if error.code and not message.startswith(error.code):
        message = f"{error.code}: {message}"
    if error.detail and error.detail not in message:
        message = f"{message}: {error.detail}"
    return message


def remote_error_text(error: RemoteError, handler: str) -> str:
    """The line printed for a failed call: the HNDL message, or what went wrong on the way."""
    if error.code:
        return error.message
    name = error.status.name
    detail = error.message.removeprefix(f"{name}: ")
    if error.status == grpc.StatusCode.UNAVAILABLE:
        text = f"ihctl: cannot reach the handler at {handler} (UNAVAILABLE)"
    elif error.status == grpc.StatusCode.DEADLINE_EXCEEDED:
        text = f"ihctl: no answer from the handler at {handler} in time (DEADLINE_EXCEEDED)"
    else:
        text = f"ihctl: the call to the handler at {handler} failed ({name})"
    return f"{text}: {detail}" if detail else text


# ---------------------------------------------------------------------------------------------
# Layout


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing spaces."""
    all_rows = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(headers))]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    """``key:  value`` lines with the values aligned."""
    items = list(pairs)
    if not items:
        return ""
    width = max(len(key) for key, _ in items) + 1
    return "\n".join(f"{(key + ':').ljust(width)}  {value}".rstrip() for key, value in items)


def to_json(message: Message, *, compact: bool = False) -> str:
    """A message in the protobuf JSON mapping, with the .proto field names and every field."""
    data = MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    if compact:
        return json.dumps(data, separators=(",", ":"), sort_keys=False)
    return json.dumps(data, indent=2)


# ---------------------------------------------------------------------------------------------
# Jobs


def result_text(result: common_pb2.ResultSummary) -> str:
    verdict = names.VERDICT.label(result.verdict)
    severities = ", ".join(
        f"{count} {name}"
        for count, name in (
            (result.critical, "critical"),
            (result.high, "high"),
            (result.medium, "medium"),
            (result.low, "low"),
            (result.negligible, "negligible"),
        )
        if count
    )
    vulnerabilities = f"vulnerabilities {result.vulnerabilities_total}"
    if severities:
        vulnerabilities += f" ({severities})"
    return (
        f"{verdict}: {vulnerabilities}, malware {result.malware}, "
        f"misconfigurations {result.misconfigurations}, secrets {result.secrets}"
    )


def database_text(database: common_pb2.DatabaseVersion) -> str:
    text = f"{database.name} {database.version}".strip()
    if database.released_at:
        text += f" (released {database.released_at})"
    return text


def _object_details(obj: common_pb2.ScanObject) -> list[tuple[str, str]]:
    """The object's fields that its short reference does not show."""
    which = obj.WhichOneof("target")
    details: list[tuple[str, str]] = []
    if which == "image":
        image = obj.image
        details += [("credentials ref", image.credentials_ref), ("proxy url", image.proxy_url)]
    elif which == "node":
        details += [("root path", obj.node.root_path)]
    elif which == "artifact":
        artifact = obj.artifact
        if artifact.url and artifact.path:
            details.append(("path", artifact.path))
        details.append(("sbom format", artifact.sbom_format))
    return [(key, value) for key, value in details if value]


def job_pairs(job: common_pb2.Job, now: datetime) -> list[tuple[str, str]]:
    """The key/value view of a job."""
    pairs: list[tuple[str, str]] = [
        ("id", job.id),
        ("kind", object_kind(job)),
        ("object", object_ref(job.object)),
        *_object_details(job.object),
        ("status", names.JOB_STATUS.label(job.status)),
    ]
    if job.status == common_pb2.JOB_STATUS_PENDING:
        pairs.append(("queue position", str(job.queue_position) if job.queue_position else NONE))
    error = job_error_text(job.error)
    if error:
        key = "error" if job.status == common_pb2.JOB_STATUS_ERROR else "last error"
        pairs.append((key, error))
    pairs += [
        ("trigger", names.TRIGGER.word(job.trigger)),
        ("lane", names.LANE.word(job.lane)),
        ("policies", ", ".join(names.POLICY.word(p) for p in job.policies) or "default"),
        ("runs", str(job.runs)),
        ("scanner", job.scanner_id or NONE),
        ("created", format_timestamp_with_age(job.created_at, now)),
        ("started", format_timestamp_with_age(job.started_at, now)),
        ("finished", format_timestamp_with_age(job.finished_at, now)),
        ("updated", format_timestamp_with_age(job.updated_at, now)),
    ]
    if job.HasField("max_run_time"):
        pairs.append(("max run time", format_duration(proto_duration_seconds(job.max_run_time))))
    if job.idempotency_key:
        pairs.append(("idempotency key", job.idempotency_key))
    if job.labels:
        pairs.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))))
    if job.HasField("result"):
        pairs.append(("result", result_text(job.result)))
        pairs += [("database", database_text(db)) for db in job.result.databases]
    return pairs


def job_view(job: common_pb2.Job, now: datetime) -> str:
    return key_values(job_pairs(job, now))


def history_table(history: Iterable[common_pb2.JobTransition]) -> str:
    return table(
        ["TIME", "TRANSITION", "SCANNER", "RUN", "REASON", "ERROR"],
        (
            [
                format_timestamp(t.at, millis=True),
                transition_text(t),
                t.scanner_id or NONE,
                str(t.run),
                t.reason or NONE,
                job_error_text(t.error) or NONE,
            ]
            for t in history
        ),
    )


def transition_text(transition: common_pb2.JobTransition) -> str:
    """``PENDING -> IN_PROGRESS`` (``- -> PENDING`` for the submit)."""
    before = names.JOB_STATUS.label(transition.from_status)
    after = names.JOB_STATUS.label(transition.to_status)
    return f"{before} -> {after}"


JOB_TABLE_HEADERS = ["ID", "KIND", "OBJECT", "STATUS", "RUNS", "SCANNER", "POSITION", "AGE"]


def jobs_table(jobs: Iterable[common_pb2.Job], now: datetime) -> str:
    return table(
        JOB_TABLE_HEADERS,
        (
            [
                job.id,
                object_kind(job),
                object_ref(job.object, shorten=True),
                names.JOB_STATUS.label(job.status),
                str(job.runs),
                job.scanner_id or NONE,
                str(job.queue_position) if job.queue_position else NONE,
                format_age(job.created_at, now),
            ]
            for job in jobs
        ),
    )


def submit_text(response: job_service_pb2.SubmitJobResponse) -> str:
    """First line: the job id alone; then its status; then a note for a duplicate."""
    job = response.job
    status = f"status: {names.JOB_STATUS.label(job.status)}"
    if job.status == common_pb2.JOB_STATUS_PENDING and job.queue_position:
        status += f"  position: {job.queue_position}"
    status += f"  lane: {names.LANE.word(job.lane)}"
    lines = [job.id, status]
    if response.duplicate:
        lines.append("duplicate of an existing job")
    return "\n".join(lines)


def cancel_text(job: common_pb2.Job) -> str:
    return f"{job.id}  {names.JOB_STATUS.label(job.status)}"


def _fields(pairs: Iterable[tuple[str, str]]) -> str:
    return " ".join(f"{key}={value}" for key, value in pairs if value)


def _quoted(text: str) -> str:
    return json.dumps(text) if text else ""


def watch_line(event: job_service_pb2.WatchJobsResponse, *, with_job: bool) -> str:
    """One line of ``ihctl watch``.

    A transition: ``TIME  [ID  ]FROM -> TO  scanner=s1 run=1 reason="..." error="..."``.
    The job as it is (the first message of a single-job watch):
    ``TIME  [ID  ]STATUS  object=... position=3 runs=0 scanner=s1``.
    ``with_job`` adds the job id (and the object on transitions), for a watch of all jobs.
    """
    job = event.job
    prefix = f"{job.id}  " if with_job else ""
    if event.HasField("transition"):
        transition = event.transition
        fields = _fields(
            [
                ("object", object_ref(job.object, shorten=True) if with_job else ""),
                ("scanner", transition.scanner_id),
                ("run", str(transition.run)),
                ("reason", _quoted(transition.reason)),
                ("error", _quoted(job_error_text(transition.error))),
            ]
        )
        moment = format_timestamp(transition.at, millis=True)
        return f"{moment}  {prefix}{transition_text(transition)}  {fields}"
    pending = job.status == common_pb2.JOB_STATUS_PENDING
    fields = _fields(
        [
            ("id", "" if with_job else job.id),
            ("object", object_ref(job.object, shorten=True)),
            ("position", str(job.queue_position) if pending and job.queue_position else ""),
            ("runs", str(job.runs)),
            ("scanner", job.scanner_id),
            ("error", _quoted(job_error_text(job.error))),
        ]
    )
    moment = format_timestamp(
        job.updated_at if is_set(job.updated_at) else job.created_at, millis=True
    )
    return f"{moment}  {prefix}{names.JOB_STATUS.label(job.status)}  {fields}"


# ---------------------------------------------------------------------------------------------
# Scanners and stats


def scanner_status(scanner: scanner_service_pb2.ScannerInfo) -> str:
    label = names.SCANNER_STATUS.label(scanner.status)
    if not scanner.connected and scanner.status != common_pb2.SCANNER_STATUS_DISCONNECTED:
        return "DISCONNECTED"
    if scanner.draining and scanner.status != common_pb2.SCANNER_STATUS_DRAINING:
        return f"{label},DRAINING"
    return label


SCANNER_TABLE_HEADERS = [
    "ID",
    "STATUS",
    "SLOTS",
    "JOBS",
    "PROCESSING",
    "VERSION",
    "ENGINE",
    "KINDS",
    "LAST SEEN",
]


def scanners_table(scanners: Iterable[scanner_service_pb2.ScannerInfo], now: datetime) -> str:
    return table(
        SCANNER_TABLE_HEADERS,
        (
            [
                s.scanner_id,
                scanner_status(s),
                str(s.slots),
                str(len(s.job_ids)),
                str(len(s.processing_job_ids)),
                s.version or NONE,
                s.engine or NONE,
                ",".join(names.OBJECT_KIND.word(k) for k in s.kinds) or "all",
                f"{format_age(s.last_seen_at, now)} ago" if is_set(s.last_seen_at) else NONE,
            ]
            for s in scanners
        ),
    )


def stats_view(stats: job_service_pb2.GetQueueStatsResponse, now: datetime) -> str:
    pairs: list[tuple[str, str]] = [("pending", str(stats.pending))]
    for lane in stats.lanes:
        text = str(lane.pending)
        if lane.pending and lane.HasField("oldest_pending_age"):
            oldest = format_duration(proto_duration_seconds(lane.oldest_pending_age))
            text += f" (oldest {oldest})"
        pairs.append((f"  {names.LANE.word(lane.lane)}", text))
    pairs += [
        ("in progress", str(stats.in_progress)),
        ("processing results", str(stats.processing_results)),
        ("finished", str(stats.finished)),
        ("error", str(stats.error)),
        ("cancelled", str(stats.cancelled)),
        (
            "scanners",
            f"{stats.scanners_connected} connected, {stats.scanners_free} free, "
            f"{stats.scanners_busy} busy",
        ),
        ("free slots", str(stats.free_slots)),
        ("queue limit", str(stats.queue_limit) if stats.queue_limit else "none"),
        ("up since", format_timestamp_with_age(stats.started_at, now)),
    ]
    return key_values(pairs)


# ---------------------------------------------------------------------------------------------
# Results and risk acceptances


def findings(result: common_pb2.ScanResult) -> str:
    """The findings of a full result as tables, most severe first."""
    parts: list[str] = []
    vulns = sorted(result.vulnerabilities, key=lambda v: (-v.severity, v.id))
    if vulns:
        parts.append(
            table(
                ["VULNERABILITY", "SEVERITY", "PACKAGE", "INSTALLED", "FIXED", "PATH"],
                [
                    [
                        v.id,
                        names.SEVERITY.label(v.severity),
                        v.package,
                        v.installed_version,
                        v.fixed_version or "-",
                        v.path,
                    ]
                    for v in vulns
                ],
            )
        )
    if result.malware:
        parts.append(
            table(
                ["MALWARE", "PATH", "SHA256", "LAYER"],
                [[m.name, m.path, m.sha256[:16], m.layer_digest[:19]] for m in result.malware],
            )
        )
    if result.secrets:
        parts.append(
            table(
                ["SECRET", "PATH", "LINE", "SEVERITY"],
                [
                    [s.rule_id, s.path, str(s.line), names.SEVERITY.label(s.severity)]
                    for s in result.secrets
                ],
            )
        )
    if result.misconfigurations:
        parts.append(
            table(
                ["MISCONFIGURATION", "SEVERITY", "PATH", "TITLE"],
                [
                    [m.id, names.SEVERITY.label(m.severity), m.path, m.title]
                    for m in result.misconfigurations
                ],
            )
        )
    if result.notes:
        # What the scan could not judge (no vulnerability data for a release, ...).
        parts.append("\n".join(f"note {n.id} {n.subject}: {n.text}" for n in result.notes))
    return "\n\n".join(parts) if parts else "no findings"


def acceptances_table(acceptances: Iterable[job_service_pb2.RiskAcceptance]) -> str:
    return table(
        ["ID", "FINDING", "SCOPE", "TARGET", "EXPIRES", "REASON"],
        [
            [
                a.id,
                a.finding_id,
                job_service_pb2.RiskScope.Name(a.scope).removeprefix("RISK_SCOPE_").lower(),
                a.target,
                format_timestamp(a.expires_at),
                a.reason,
            ]
            for a in acceptances
        ],
    )


def reevaluated(verdicts: int, summaries: int, now: str) -> str:
    """What a risk acceptance change did to FINISHED jobs, in words that cannot mislead."""
    jobs = "job" if verdicts == 1 else "jobs"
    text = f"{verdicts} {jobs} now {now}" if verdicts else "no verdict changed"
    if summaries:
        more = "job" if summaries == 1 else "jobs"
        text += f"; {summaries} more {more} with accepted findings updated (verdict unchanged)"
    return text
