"""Conversions between the wire messages of ScannerService and the client's own types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from imagehandler.jobpolicy import ANONYMOUS, Submitter
from imagehandler.v1 import common_pb2, scanner_service_pb2
from scanner_client.engine import Database, Job, Kind, Policy


def register_request(
    *,
    scanner_id: str,
    version: str,
    engine: str,
    kinds: Iterable[Kind],
    slots: int,
    databases: Sequence[Database],
    proxy_url: str,
    policies: Iterable[Policy],
) -> scanner_service_pb2.ConnectRequest:
    return scanner_service_pb2.ConnectRequest(
        register=scanner_service_pb2.Register(
            scanner_id=scanner_id,
            version=version,
            kinds=[kind.proto for kind in sorted(kinds)],
            slots=slots,
            databases=[database.to_proto() for database in databases],
            config=scanner_service_pb2.ScannerConfig(
                proxy_url=proxy_url, policies=[policy.proto for policy in policies]
            ),
            engine=engine,
        )
    )


def ready(free_slots: int) -> scanner_service_pb2.ConnectRequest:
    return scanner_service_pb2.ConnectRequest(
        ready=scanner_service_pb2.Ready(free_slots=free_slots)
    )


def heartbeat(active_job_ids: Iterable[str]) -> scanner_service_pb2.ConnectRequest:
    return scanner_service_pb2.ConnectRequest(
        heartbeat=scanner_service_pb2.ScannerHeartbeat(active_job_ids=sorted(active_job_ids))
    )


def databases_changed(databases: Sequence[Database]) -> scanner_service_pb2.ConnectRequest:
    return scanner_service_pb2.ConnectRequest(
        databases=scanner_service_pb2.DatabasesChanged(
            databases=[database.to_proto() for database in databases]
        )
    )


def drain() -> scanner_service_pb2.ConnectRequest:
    return scanner_service_pb2.ConnectRequest(drain=scanner_service_pb2.Drain())


def failure(
    job_id: str, code: str, detail: str, *, permanent: bool = False
) -> scanner_service_pb2.Failure:
    return scanner_service_pb2.Failure(job_id=job_id, code=code, detail=detail, permanent=permanent)


def seconds(duration: duration_pb2.Duration, default: float) -> float:
    """A Duration in seconds; ``default`` when it is unset or not positive."""
    value = duration.seconds + duration.nanos / 1e9
    return value if value > 0 else default


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# The last deadline converted, as (seconds, nanos, datetime, epoch seconds): the jobs of one
# Assignment mostly share their deadline, and datetimes are immutable, so they can share it.
_last_deadline: tuple[int, int, datetime, float] = (0, 0, _EPOCH, 0.0)


def _deadline(ts: timestamp_pb2.Timestamp) -> tuple[datetime, float]:
    """The deadline as a datetime and as seconds since the epoch (for the loop's clock)."""
    global _last_deadline
    seconds = ts.seconds
    nanos = ts.nanos
    last = _last_deadline
    if last[0] == seconds and last[1] == nanos:
        return last[2], last[3]
    value = _EPOCH + timedelta(0, seconds, nanos // 1000)
    epoch = seconds + nanos / 1e9
    _last_deadline = (seconds, nanos, value, epoch)
    return value, epoch


# Policy lists converted once each: there are few distinct ones (four policies) and every
# assigned job carries one. Bounded, as the values come off the wire.
_POLICY_LISTS: dict[tuple[int, ...], tuple[Policy, ...]] = {}
_POLICY_LISTS_MAX = 256


def _policies(values: Sequence[common_pb2.Policy.ValueType]) -> tuple[Policy, ...]:
    # A slice of a repeated field is a list, made in C; tuple() on the field iterates in Python.
    key = tuple(values[:])
    policies = _POLICY_LISTS.get(key)
    if policies is None:
        policies = tuple(
            policy for policy in (Policy.from_proto(value) for value in key) if policy is not None
        )
        if len(_POLICY_LISTS) < _POLICY_LISTS_MAX:
            _POLICY_LISTS[key] = policies
    return policies


def job_from_assignment(assigned: scanner_service_pb2.AssignedJob) -> Job:
    return assigned_job(assigned)[0]


def assigned_job(assigned: scanner_service_pb2.AssignedJob) -> tuple[Job, float | None]:
    """The engine's job and its deadline in seconds since the epoch (None when unset)."""
    if assigned.HasField("deadline"):
        deadline, epoch = _deadline(assigned.deadline)
    else:
        deadline, epoch = None, None
    labels = assigned.labels
    job = Job(
        job_id=assigned.job_id,
        run=assigned.run,
        # The assignment's own message, not a copy: nothing else holds or changes it.
        object=assigned.object,
        policies=_policies(assigned.policies),
        deadline=deadline,
        # dict() of an empty map field costs ten times the check.
        labels=dict(labels) if labels else {},
        submitter=_submitter(assigned.submitter),
    )
    return job, epoch


def _submitter(message: common_pb2.Submitter) -> Submitter:
    if not message.token_name:
        return ANONYMOUS
    return Submitter(message.token_name, frozenset(message.roles))


def format_deadline(deadline: datetime) -> str:
    return deadline.astimezone(UTC).isoformat().replace("+00:00", "Z")
