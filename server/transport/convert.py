"""Protobuf <-> domain conversion. Requests are checked on the way in (server.validation says
what is wrong); nothing else happens here."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from enum import IntEnum
from typing import TypeVar
from urllib.parse import urlsplit

from google.protobuf import duration_pb2, timestamp_pb2

from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from server import validation
from server.config import Config
from server.errors import Catalogue, HandlerError
from server.model import (
    ArtifactRef,
    ImageRef,
    Job,
    JobFailure,
    JobSpec,
    JobStatus,
    Lane,
    NodeRef,
    ObjectKind,
    Policy,
    ScanTarget,
    Transition,
    Trigger,
)
from server.scanners import Database, ScannerProfile, ScannerSession

E = TypeVar("E", bound=IntEnum)

DEFAULT_REGISTRY = "docker.io"
MAX_RUN_TIME_LIMIT = 7 * 24 * 3600.0


def enum_value(enum_type: type[E], value: int, field: str, *, default: E | None = None) -> E:
    """A protobuf enum number as a domain enum; 0 (unspecified) takes ``default``."""
    if value == 0 and default is not None:
        return default
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(f"{m.name} ({m.value})" for m in enum_type)
        raise validation.params_error(
            f"{field} {value} is unknown; choose from {choices}"
        ) from None


def enum_set(enum_type: type[E], values: Iterable[int], field: str) -> frozenset[E]:
    return frozenset(enum_value(enum_type, v, field) for v in values)


# Domain enums share their numbers with the protobuf enums; these give mypy the protobuf type.
def pb_status(status: JobStatus) -> common_pb2.JobStatus.ValueType:
    return common_pb2.JobStatus.ValueType(status)


def pb_lane(lane: Lane) -> common_pb2.Lane.ValueType:
    return common_pb2.Lane.ValueType(lane)


def pb_policies(policies: Iterable[Policy]) -> list[common_pb2.Policy.ValueType]:
    return [common_pb2.Policy.ValueType(p) for p in policies]


def pb_kinds(kinds: Iterable[ObjectKind]) -> list[common_pb2.ObjectKind.ValueType]:
    return [common_pb2.ObjectKind.ValueType(k) for k in sorted(kinds)]


# ----- timestamps ----------------------------------------------------------------------


def timestamp(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


# ----- requests in ---------------------------------------------------------------------


def target_from_proto(obj: common_pb2.ScanObject) -> ScanTarget:
    which = obj.WhichOneof("target")
    if which == "image":
        return _image(obj.image)
    if which == "node":
        return _node(obj.node)
    if which == "artifact":
        return _artifact(obj.artifact)
    raise validation.params_error(
        "object is required: set object.image, object.node or object.artifact"
    )


def _image(image: common_pb2.ImageObject) -> ImageRef:
    registry = image.registry.lower() or DEFAULT_REGISTRY
    validation.check_registry(registry)
    repository = image.repository
    validation.check_repository(repository)
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"  # how Docker Hub names official images
    validation.check_tag(image.tag)
    validation.check_digest(image.digest)
    validation.check_identifier("image.credentials_ref", image.credentials_ref, required=False)
    validation.check_proxy_url("image.proxy_url", image.proxy_url)
    tag = image.tag or ("" if image.digest else "latest")
    return ImageRef(registry, repository, tag, image.digest, image.credentials_ref, image.proxy_url)


def _node(node: common_pb2.NodeObject) -> NodeRef:
    validation.check_identifier("node.node_name", node.node_name, required=True)
    validation.check_identifier("node.cluster", node.cluster, required=False)
    root = node.root_path or "/"
    validation.check_text("node.root_path", root)
    if not root.startswith("/") or "\x00" in root:
        raise validation.params_error(f"node.root_path {root[:80]!r} must be an absolute path")
    return NodeRef(node.cluster, node.node_name, root)


def _artifact(artifact: common_pb2.ArtifactObject) -> ArtifactRef:
    validation.check_text("artifact.pipeline", artifact.pipeline, 256)
    validation.check_text("artifact.job", artifact.job, 256)
    validation.check_text("artifact.path", artifact.path)
    validation.check_text("artifact.url", artifact.url)
    if not (artifact.path or artifact.url or artifact.sbom):
        raise validation.params_error("artifact needs a path, a url or an inline sbom")
    if artifact.url:
        parts = urlsplit(artifact.url)
        if parts.scheme not in ("http", "https", "oci", "s3", "gs") or not parts.netloc:
            raise validation.params_error(
                f"artifact.url {artifact.url[:80]!r} must be an absolute http(s), oci, s3 or gs URL"
            )
    if len(artifact.sbom) > validation.MAX_SBOM_BYTES:
        raise validation.params_error(
            f"artifact.sbom is {len(artifact.sbom)} bytes; the limit is {validation.MAX_SBOM_BYTES}"
        )
    sbom_format = artifact.sbom_format or ("cyclonedx-json" if artifact.sbom else "")
    return ArtifactRef(
        artifact.pipeline,
        artifact.job,
        artifact.path,
        artifact.url,
        artifact.sbom,
        sbom_format,
        hashlib.sha256(artifact.sbom).hexdigest() if artifact.sbom else "",
    )


def spec_from_request(request: job_service_pb2.SubmitJobRequest, config: Config) -> JobSpec:
    if not request.HasField("object"):
        raise validation.params_error(
            "object is required: set object.image, object.node or object.artifact"
        )
    target = target_from_proto(request.object)
    trigger = enum_value(Trigger, request.trigger, "trigger", default=Trigger.MANUAL)
    lane = enum_value(Lane, request.lane, "lane", default=Lane.BULK)
    policies = tuple(sorted(enum_set(Policy, request.policies, "policy")))
    if not policies:
        policies = config.default_policies
        if not policies:
            raise HandlerError(
                Catalogue.SCAN_POLICIES_EMPTY,
                "the job names no policy and the handler has no default policy "
                "(set policies, or start the handler with --default-policies)",
            )
    max_run_time = config.default_max_run_time
    if request.HasField("max_run_time"):
        seconds = request.max_run_time.ToNanoseconds() / 1e9
        if request.max_run_time.seconds < 0 or request.max_run_time.nanos < 0:
            raise validation.params_error(f"max_run_time {seconds:g}s is negative")
        if abs(request.max_run_time.nanos) >= 1_000_000_000:
            raise validation.params_error("max_run_time.nanos must be below 1e9")
        if seconds > MAX_RUN_TIME_LIMIT:
            raise validation.params_error(
                f"max_run_time {seconds:g}s is longer than {MAX_RUN_TIME_LIMIT:g}s (7 days)"
            )
        if seconds > 0:
            max_run_time = seconds
    validation.check_text("idempotency_key", request.idempotency_key, 256)
    labels = dict(request.labels)
    validation.check_labels(labels)
    return JobSpec(
        target=target,
        trigger=trigger,
        policies=policies,
        max_run_time=max_run_time,
        lane=lane,
        idempotency_key=request.idempotency_key,
        labels=labels,
    )


def profile_from_register(register: scanner_service_pb2.Register, config: Config) -> ScannerProfile:
    def invalid(detail: str) -> HandlerError:
        return HandlerError(Catalogue.SCANNER_CONFIG_INVALID, detail)

    try:
        validation.check_identifier("scanner_id", register.scanner_id, required=True)
    except HandlerError as error:
        raise invalid(error.detail) from None
    if not 1 <= register.slots <= 1024:
        raise invalid(f"slots must be 1..1024, got {register.slots}")
    try:
        kinds = enum_set(ObjectKind, register.kinds, "kind") or frozenset(ObjectKind)
        policies = tuple(sorted(enum_set(Policy, register.config.policies, "policy")))
    except HandlerError as error:
        raise invalid(error.detail) from None
    if not policies and not config.default_policies:
        raise HandlerError(
            Catalogue.SCAN_POLICIES_EMPTY,
            "the scanner declares no policy and the handler has no default policy",
        )
    validation.check_proxy_url("config.proxy_url", register.config.proxy_url)
    if not register.databases:
        raise HandlerError(
            Catalogue.DB_RELEASE_DATE_UNKNOWN,
            "the scanner reported no scan databases; report each with its released_at date",
        )
    for db in register.databases:
        validation.parse_release_date(db.name, db.released_at)
    return ScannerProfile(
        scanner_id=register.scanner_id,
        version=register.version[:128],
        engine=register.engine[:64],
        kinds=kinds,
        slots=register.slots,
        databases=tuple(Database(d.name, d.version, d.released_at) for d in register.databases),
        proxy_url=register.config.proxy_url,
        policies=policies,
    )


# ----- domain out ----------------------------------------------------------------------


def object_to_proto(target: ScanTarget) -> common_pb2.ScanObject:
    if isinstance(target, ImageRef):
        return common_pb2.ScanObject(
            image=common_pb2.ImageObject(
                registry=target.registry,
                repository=target.repository,
                tag=target.tag,
                digest=target.digest,
                credentials_ref=target.credentials_ref,
                proxy_url=target.proxy_url,
            )
        )
    if isinstance(target, NodeRef):
        return common_pb2.ScanObject(
            node=common_pb2.NodeObject(
                cluster=target.cluster, node_name=target.node_name, root_path=target.root_path
            )
        )
    return common_pb2.ScanObject(
        artifact=common_pb2.ArtifactObject(
            pipeline=target.pipeline,
            job=target.job,
            path=target.path,
            url=target.url,
            sbom=target.sbom,
            sbom_format=target.sbom_format,
        )
    )


def error_to_proto(error: JobFailure | None) -> common_pb2.JobError | None:
    if error is None:
        return None
    return common_pb2.JobError(code=error.code, message=error.message, detail=error.detail)


def transition_to_proto(t: Transition) -> common_pb2.JobTransition:
    return common_pb2.JobTransition(
        from_status=pb_status(t.from_status)
        if t.from_status
        else common_pb2.JOB_STATUS_UNSPECIFIED,
        to_status=pb_status(t.to_status),
        at=timestamp(t.at),
        scanner_id=t.scanner_id,
        run=t.run,
        error=error_to_proto(t.error),
        reason=t.reason,
    )


def job_to_proto(
    job: Job, *, position: int, history: bool = False, full_result: bool = False
) -> common_pb2.Job:
    spec = job.spec
    message = common_pb2.Job(
        id=job.id,
        object=object_to_proto(spec.target),
        status=pb_status(job.status),
        trigger=common_pb2.Trigger.ValueType(spec.trigger),
        policies=pb_policies(spec.policies),
        runs=job.runs,
        scanner_id=job.scanner_id,
        error=error_to_proto(job.error),
        queue_position=position,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        result=job.result_summary,
        max_run_time=duration(spec.max_run_time),
        idempotency_key=spec.idempotency_key,
        labels=spec.labels,
        lane=pb_lane(spec.lane),
        kind=common_pb2.ObjectKind.ValueType(job.kind),
    )
    if history:
        message.history.extend(transition_to_proto(t) for t in job.history)
    if full_result and job.result is not None:
        message.full_result.CopyFrom(job.result)
    return message


def assigned_job_to_proto(job: Job, deadline: datetime) -> scanner_service_pb2.AssignedJob:
    return scanner_service_pb2.AssignedJob(
        job_id=job.id,
        object=object_to_proto(job.spec.target),
        policies=pb_policies(job.spec.policies),
        run=job.runs,
        deadline=timestamp(deadline),
        labels=job.spec.labels,
    )


def scanner_to_proto(
    session: ScannerSession, processing: list[str]
) -> scanner_service_pb2.ScannerInfo:
    profile = session.profile
    return scanner_service_pb2.ScannerInfo(
        scanner_id=profile.scanner_id,
        version=profile.version,
        engine=profile.engine,
        kinds=pb_kinds(profile.kinds),
        slots=profile.slots,
        status=common_pb2.ScannerStatus.ValueType(session.status),
        connected=session.connected,
        draining=session.draining,
        job_ids=list(session.held),
        processing_job_ids=processing,
        databases=[
            common_pb2.DatabaseVersion(name=d.name, version=d.version, released_at=d.released_at)
            for d in profile.databases
        ],
        connected_at=timestamp(session.connected_at),
        last_seen_at=timestamp(session.last_seen_at),
        jobs_finished=session.jobs_finished,
        jobs_failed=session.jobs_failed,
    )
