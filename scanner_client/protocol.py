"""Conversions between the wire messages of ScannerService and the client's own types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

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


def _datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    """``ts.ToDatetime(tzinfo=UTC)`` without its slower generic path."""
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def job_from_assignment(assigned: scanner_service_pb2.AssignedJob) -> Job:
    policies = tuple(
        policy
        for policy in (Policy.from_proto(value) for value in assigned.policies)
        if policy is not None
    )
    deadline = _datetime(assigned.deadline) if assigned.HasField("deadline") else None
    scan_object = common_pb2.ScanObject()
    scan_object.CopyFrom(assigned.object)
    return Job(
        job_id=assigned.job_id,
        run=assigned.run,
        object=scan_object,
        policies=policies,
        deadline=deadline,
        labels=dict(assigned.labels),
    )


def format_deadline(deadline: datetime) -> str:
    return deadline.astimezone(UTC).isoformat().replace("+00:00", "Z")
