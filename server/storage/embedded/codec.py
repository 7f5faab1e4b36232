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


class Decoder:
    """Jobs from their stored records. Kept for many records in a row (recovery), it makes
    the values that jobs share (a batch's timestamps, the same registry, policies or run
    time) once and shares them, as they are in the running handler, so a recovered queue
    costs the memory it cost before the restart. Its caches are bounded."""

    LIMIT = 4096  # entries per cache before it starts over

    def __init__(self) -> None:
        self._times: dict[tuple[int, int], datetime] = {}
        self._micros: dict[int, datetime] = {}
        self._durations: dict[tuple[int, int], float] = {}
        self._strings: dict[str, str] = {}
        self._policies: dict[tuple[int, ...], tuple[Policy, ...]] = {}

    def time(self, ts: timestamp_pb2.Timestamp) -> datetime:
        key = (ts.seconds, ts.nanos)
        found = self._times.get(key)
        if found is None:
            if len(self._times) >= self.LIMIT:
                self._times.clear()
            # What Timestamp.ToDatetime gives (nanoseconds rounded toward zero), without its
            # checks: the value was written by this handler.
            found = self._times[key] = _EPOCH + timedelta(
                seconds=key[0], microseconds=key[1] // 1000
            )
        return found

    def time_micros(self, micros: int) -> datetime:
        """:func:`from_unix_micros`, one object per distinct value."""
        found = self._micros.get(micros)
        if found is None:
            if len(self._micros) >= self.LIMIT:
                self._micros.clear()
            found = self._micros[micros] = _EPOCH + timedelta(microseconds=micros)
        return found

    def strings(self) -> dict[str, str]:
        """The shared strings, for look-ups in bulk (``map(strings.setdefault, ...)``); call
        :meth:`trim` after."""
        return self._strings

    def trim(self) -> None:
        """Keep the caches bounded after look-ups in bulk."""
        if len(self._strings) >= self.LIMIT:
            self._strings.clear()

    def share(self, value: str) -> str:
        """One str object for values that repeat across jobs (registries, scanner ids)."""
        found = self._strings.get(value)
        if found is None:
            if len(self._strings) >= self.LIMIT:
                self._strings.clear()
            found = self._strings[value] = value
        return found

    def _duration(self, message: common_pb2.Job) -> float:
        d = message.max_run_time
        key = (d.seconds, d.nanos)
        found = self._durations.get(key)
        if found is None:
            if len(self._durations) >= self.LIMIT:
                self._durations.clear()
            found = self._durations[key] = d.ToNanoseconds() / 1e9
        return found

    def _policy_tuple(self, numbers: tuple[int, ...]) -> tuple[Policy, ...]:
        found = self._policies.get(numbers)
        if found is None:
            if len(self._policies) >= self.LIMIT:
                self._policies.clear()
            found = self._policies[numbers] = tuple(_POLICY[p] for p in numbers)
        return found

    def _target(self, obj: common_pb2.ScanObject) -> ScanTarget:
        if obj.WhichOneof("target") == "image":
            i = obj.image
            share = self.share
            return ImageRef(
                share(i.registry),
                share(i.repository),
                i.tag,
                i.digest,
                share(i.credentials_ref),
                share(i.proxy_url),
            )
        return _target(obj)

    def _transition(self, t: common_pb2.JobTransition) -> Transition:
        return Transition(
            STATUS[t.from_status] if t.from_status else None,
            STATUS[t.to_status],
            self.time(t.at),
            self.share(t.scanner_id),
            t.run,
            self.share(t.reason),
            failure(t.error) if t.HasField("error") else None,
        )

    def job(self, record: storage_pb2.StoredJob) -> Job:
        message = record.job
        time = self.time
        has = message.HasField
        spec = JobSpec(
            target=self._target(message.object),
            trigger=_TRIGGER[message.trigger],
            policies=self._policy_tuple(tuple(message.policies)),
            max_run_time=self._duration(message),
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
            created_at=time(message.created_at),
            status=STATUS[message.status],
            runs=message.runs,
            scanner_id=self.share(message.scanner_id),
            error=failure(message.error) if has("error") else None,
            updated_at=time(message.updated_at) if has("updated_at") else None,
            started_at=time(message.started_at) if has("started_at") else None,
            finished_at=time(message.finished_at) if has("finished_at") else None,
            history=[self._transition(t) for t in message.history],
            result=message.full_result if has("full_result") else None,
            result_summary=message.result if has("result") else None,
            lsn=record.lsn,
            result_in_file=record.result_in_file,
            delivered=record.delivered,
            verdict_version=record.verdict_version,
            verdict_delivered=record.verdict_delivered,
        )


def job(record: storage_pb2.StoredJob) -> Job:
    """One record's job (a decoder of its own: nothing is shared with other jobs)."""
    return Decoder().job(record)
