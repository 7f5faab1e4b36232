"""Jobs to and from their stored form (imagehandler.storage.v1)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from imagehandler.storage.v1 import storage_pb2
from imagehandler.v1 import common_pb2
from server import mapping
from server.core.model import (
    ArtifactRef,
    ImageRef,
    Job,
    JobFailure,
    JobSpec,
    JobStatus,
    Lane,
    NodeRef,
    Policy,
    ScanTarget,
    Transition,
    Trigger,
)


def set_stored(message: storage_pb2.StoredJob, job: Job) -> None:
    """Fill ``message`` (an empty StoredJob, e.g. a journal record's field) from ``job``."""
    mapping.set_job(message.job, job, position=0, history=True, full_result=True)
    message.seq = job.seq
    message.lsn = job.lsn
    if job.result_in_file:
        message.result_in_file = True
    if job.delivered:
        message.delivered = job.delivered
    if job.verdict_version:
        message.verdict_version = job.verdict_version
        message.verdict_delivered = job.verdict_delivered
    mapping.set_submitter(message.submitter, job.spec.submitter)


def set_stored_from(message: storage_pb2.StoredJob, job: Job, built: common_pb2.Job) -> None:
    """:func:`set_stored` for a new job whose Job message (without history) is already built:
    one C-level copy instead of filling every field again."""
    message.job.CopyFrom(built)
    message.job.ClearField("queue_position")
    add = message.job.history.add
    for t in job.history:
        mapping.set_transition(add(), t)
    message.seq = job.seq
    mapping.set_submitter(message.submitter, job.spec.submitter)


def stored(job: Job) -> storage_pb2.StoredJob:
    message = storage_pb2.StoredJob()
    set_stored(message, job)
    return message


# Enum members by number: a dict look-up is several times cheaper than calling the enum, and
# recovery does it a few times per job.
STATUS = {m.value: m for m in JobStatus}
_TRIGGER = {m.value: m for m in Trigger}
_POLICY = {m.value: m for m in Policy}
_LANE = {m.value: m for m in Lane}


def _target(obj: common_pb2.ScanObject) -> ScanTarget:
    """The stored object as it was validated and normalised at submit (no second check)."""
    which = obj.WhichOneof("target")
    if which == "image":
        i = obj.image
        return ImageRef(i.registry, i.repository, i.tag, i.digest, i.credentials_ref, i.proxy_url)
    if which == "node":
        return NodeRef(obj.node.cluster, obj.node.node_name, obj.node.root_path)
    a = obj.artifact
    digest = hashlib.sha256(a.sbom).hexdigest() if a.sbom else ""
    return ArtifactRef(a.pipeline, a.job, a.path, a.url, a.sbom, a.sbom_format, digest)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def unix_micros(at: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact, unlike timestamp())."""
    return (at - _EPOCH) // _MICROSECOND


def from_unix_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _time(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _optional_time(message: common_pb2.Job, field: str) -> datetime | None:
    return _time(getattr(message, field)) if message.HasField(field) else None  # type: ignore[arg-type]


def failure(error: common_pb2.JobError) -> JobFailure:
    return JobFailure(error.code, error.message, error.detail)


def transition(t: common_pb2.JobTransition) -> Transition:
    return Transition(
        from_status=STATUS[t.from_status] if t.from_status else None,
        to_status=STATUS[t.to_status],
        at=_time(t.at),
        scanner_id=t.scanner_id,
        run=t.run,
        reason=t.reason,
        error=failure(t.error) if t.HasField("error") else None,
    )


def job(record: storage_pb2.StoredJob) -> Job:
    message = record.job
    spec = JobSpec(
        target=_target(message.object),
        trigger=_TRIGGER[message.trigger],
        policies=tuple(_POLICY[p] for p in message.policies),
        max_run_time=message.max_run_time.ToNanoseconds() / 1e9,
        lane=_LANE[message.lane],
        idempotency_key=message.idempotency_key,
        labels=dict(message.labels),
        submitter=mapping.submitter_from_proto(record.submitter),
        reused_from=message.reused_from,
        rematch_of=message.rematch_of,
    )
    return Job(
        id=message.id,
        seq=record.seq,
        spec=spec,
        created_at=_time(message.created_at),
        status=STATUS[message.status],
        runs=message.runs,
        scanner_id=message.scanner_id,
        error=failure(message.error) if message.HasField("error") else None,
        updated_at=_optional_time(message, "updated_at"),
        started_at=_optional_time(message, "started_at"),
        finished_at=_optional_time(message, "finished_at"),
        history=[transition(t) for t in message.history],
        result=message.full_result if message.HasField("full_result") else None,
        result_summary=message.result if message.HasField("result") else None,
        lsn=record.lsn,
        result_in_file=record.result_in_file,
        delivered=record.delivered,
        verdict_version=record.verdict_version,
        verdict_delivered=record.verdict_delivered,
    )
