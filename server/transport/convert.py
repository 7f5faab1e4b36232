"""Requests to domain objects, checked on the way in (server.validation says what is wrong),
and the scanner-facing messages. Jobs and transitions as messages are :mod:`server.mapping`'s.

These functions run several times for every job (the submit's answer, the journal records, the
assignment), so the hot ones fill messages in place: nested fields are set through the parent
(``message.created_at.seconds = ...``) instead of building a sub-message and copying it in, and
timestamps are computed with integer arithmetic rather than ``Timestamp.FromDatetime``. The
messages they produce are the same.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import IntEnum
from typing import TypeVar
from urllib.parse import urlsplit

from imagehandler.errors import Catalogue, HandlerError
from imagehandler.v1 import common_pb2, job_service_pb2, scanner_service_pb2
from server import validation
from server.config import Config
from server.core.model import (
    ArtifactRef,
    ImageRef,
    Job,
    JobSpec,
    Lane,
    NodeRef,
    ObjectKind,
    Policy,
    ScanTarget,
    Trigger,
)
from server.job_policy import SubmitPolicy
from server.mapping import pb_kinds, set_object, set_submitter, set_timestamp, timestamp
from server.security import caller
from server.service.sessions import Database, ScannerProfile, ScannerSession

E = TypeVar("E", bound=IntEnum)

DEFAULT_REGISTRY = "docker.io"
MAX_RUN_TIME_LIMIT = 7 * 24 * 3600.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)  # Timestamp.FromDatetime reads a naive datetime as UTC
_NANOS = 1_000_000_000


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
    members = enum_type._value2member_map_
    try:
        return frozenset([members[v] for v in values])  # type: ignore[misc]
    except (KeyError, TypeError):
        return frozenset(enum_value(enum_type, v, field) for v in values)


# ----- timestamps ----------------------------------------------------------------------


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


# (registry, repository) as sent -> as checked, normalised and interned. Many jobs name the same
# repository (a rescan of every tag): the two pattern matches then run once, and every queued
# job holds the same two strings. Bounded: cleared when full.
_CHECKED_NAMES: dict[tuple[str, str], tuple[str, str]] = {}
_CHECKED_NAMES_MAX = 4096
_CHECKED_NAME_MAX_CHARS = 512


def _image_name(registry_sent: str, repository_sent: str) -> tuple[str, str]:
    found = _CHECKED_NAMES.get((registry_sent, repository_sent))
    if found is not None:
        return found
    registry = registry_sent.lower() or DEFAULT_REGISTRY
    validation.check_registry(registry)
    repository = repository_sent
    validation.check_repository(repository)
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"  # how Docker Hub names official images
    found = (sys.intern(registry), sys.intern(repository))
    if len(registry_sent) + len(repository_sent) <= _CHECKED_NAME_MAX_CHARS:  # RAM stays small
        if len(_CHECKED_NAMES) >= _CHECKED_NAMES_MAX:
            _CHECKED_NAMES.clear()
        _CHECKED_NAMES[registry_sent, repository_sent] = found
    return found


def _image(image: common_pb2.ImageObject) -> ImageRef:
    registry, repository = _image_name(image.registry, image.repository)
    tag, digest = image.tag, image.digest
    validation.check_tag(tag)
    validation.check_digest(digest)
    credentials_ref, proxy_url = image.credentials_ref, image.proxy_url
    validation.check_identifier("image.credentials_ref", credentials_ref, required=False)
    validation.check_proxy_url("image.proxy_url", proxy_url)
    tag = tag or ("" if digest else "latest")
    return ImageRef(registry, repository, tag, digest, credentials_ref, proxy_url)


def _node(node: common_pb2.NodeObject) -> NodeRef:
    validation.check_identifier("node.node_name", node.node_name, required=True)
    validation.check_identifier("node.cluster", node.cluster, required=False)
    root = node.root_path
    if not root:
        # Never a default of "/": that would be the scanner host's own filesystem.
        raise validation.params_error(
            "node.root_path is required: give the absolute path where the node agent mounts "
            "the node's filesystem (for example /host)"
        )
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
        try:
            parts = urlsplit(artifact.url)
        except ValueError:  # "http://[::1" and the like (found by tests/fuzz/test_fuzz.py)
            parts = urlsplit("")
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


# Requests name the same few policy lists again and again: each list's sorted set, once.
_POLICY_SETS: dict[tuple[int, ...], tuple[Policy, ...]] = {}


def _policies(values: Iterable[int]) -> tuple[Policy, ...]:
    key = tuple(values)
    found = _POLICY_SETS.get(key)
    if found is None:
        found = tuple(sorted(enum_set(Policy, key, "policy")))  # raises for an unknown one
        if len(_POLICY_SETS) < 1024:
            _POLICY_SETS[key] = found
    return found


def spec_from_request(
    request: job_service_pb2.SubmitJobRequest, config: Config, policy: SubmitPolicy
) -> JobSpec:
    """The job a submit asks for, checked, and held to the job ``policy`` for its caller."""
    if not request.HasField("object"):
        raise validation.params_error(
            "object is required: set object.image, object.node or object.artifact"
        )
    target = target_from_proto(request.object)
    submitter = caller.current()
    policy.check(target, submitter)
    trigger = enum_value(Trigger, request.trigger, "trigger", default=Trigger.MANUAL)
    lane = enum_value(Lane, request.lane, "lane", default=Lane.BULK)
    policies = _policies(request.policies)
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
    labels = dict(request.labels) if request.labels else {}
    if labels:
        validation.check_labels(labels)
    return JobSpec(
        target=target,
        trigger=trigger,
        policies=policies,
        max_run_time=max_run_time,
        lane=lane,
        idempotency_key=request.idempotency_key,
        labels=labels,
        submitter=submitter,
        fresh=request.fresh,
    )


def databases_from_proto(
    databases: Iterable[common_pb2.DatabaseVersion],
) -> tuple[Database, ...]:
    """A scanner's databases, at registration or after a live update: at least one, each with
    a release date (HNDL-012 when missing, HNDL-013 when it does not parse)."""
    given = tuple(databases)
    if not given:
        raise HandlerError(
            Catalogue.DB_RELEASE_DATE_UNKNOWN,
            "the scanner reported no scan databases; report each with its released_at date",
        )
    for db in given:
        validation.parse_release_date(db.name, db.released_at)
    return tuple(Database(d.name, d.version, d.released_at) for d in given)


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
    databases = databases_from_proto(register.databases)
    return ScannerProfile(
        scanner_id=register.scanner_id,
        version=register.version[:128],
        engine=register.engine[:64],
        kinds=kinds,
        slots=register.slots,
        databases=databases,
        proxy_url=register.config.proxy_url,
        policies=policies,
    )


# ----- domain out ----------------------------------------------------------------------


def set_assigned_job(
    message: scanner_service_pb2.AssignedJob, job: Job, deadline: datetime
) -> None:
    """Fill ``message`` (an empty AssignedJob, e.g. ``assignment.jobs.add()``)."""
    spec = job.spec
    message.job_id = job.id
    set_object(message.object, spec.target)
    message.policies.extend(spec.policies)  # type: ignore[arg-type]
    message.run = job.runs
    set_timestamp(message.deadline, deadline)
    if spec.labels:
        message.labels.update(spec.labels)
    set_submitter(message.submitter, spec.submitter)


def assigned_job_to_proto(job: Job, deadline: datetime) -> scanner_service_pb2.AssignedJob:
    message = scanner_service_pb2.AssignedJob()
    set_assigned_job(message, job, deadline)
    return message


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
