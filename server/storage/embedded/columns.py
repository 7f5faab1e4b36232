"""Queued jobs in columns (``JobColumns``): how a batch of new jobs is journaled and how a
snapshot stores the queue, so that recovery parses a thousand jobs with one call and reads
plain lists instead of a message per job.

Only jobs of one shape fit (:func:`fits`): an image to scan, PENDING with its creation as its
whole history, never run, without labels, error or result; any other job stays a StoredJob.
That shape is every job a queue of a million holds after a burst of submits.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from itertools import repeat
from typing import TypeVar

from imagehandler.jobpolicy import Submitter
from imagehandler.storage.v1 import storage_pb2
from server import mapping
from server.core.model import (
    ImageRef,
    Job,
    JobSpec,
    JobStatus,
    Lane,
    ObjectKind,
    Policy,
    Transition,
    Trigger,
)
from server.storage.embedded.codec import Decoder, unix_micros

T = TypeVar("T")
_TRIGGER = {m.value: m for m in Trigger}
_LANE = {m.value: m for m in Lane}
_POLICY = {m.value: m for m in Policy}


def _bits(policies: tuple[Policy, ...]) -> int:
    """The policies as bits, or -1 when they are not in ascending order without repeats (the
    columns give them back in that order)."""
    bits = 0
    last = -1
    for policy in policies:
        if policy <= last:
            return -1
        bits |= 1 << policy
        last = policy
    return bits


_BITS_OF: dict[tuple[Policy, ...], int] = {}


def policy_bits(policies: tuple[Policy, ...]) -> int:
    found = _BITS_OF.get(policies)
    if found is None:
        found = _bits(policies)
        if len(_BITS_OF) < 1024:
            _BITS_OF[policies] = found
    return found


def fits(job: Job) -> bool:
    """Whether ``job`` has the one shape the columns hold (nothing of it would be lost)."""
    spec = job.spec
    if (
        job.status is not JobStatus.PENDING
        or job.runs
        or type(spec.target) is not ImageRef
        or spec.labels
        or spec.reused_from
        or spec.rematch_of
        or len(job.history) != 1
        or job.error is not None
        or job.result is not None
        or job.result_summary is not None
        or job.result_in_file
        or job.verdict_version
        or job.started_at is not None
        or job.finished_at is not None
    ):
        return False
    first = job.history[0]
    return (
        job.updated_at == job.created_at
        and first.at == job.created_at
        and first.from_status is None
        and first.to_status is JobStatus.PENDING
        and not first.scanner_id
        and not first.run
        and first.error is None
        and job.delivered <= 1
        and policy_bits(spec.policies) >= 0
    )


class ColumnsBuilder:
    """Jobs that :func:`fits` gathered in Python lists (appending to a protobuf repeated field
    one value at a time costs several times more), turned into one message at the end."""

    __slots__ = (
        "_last_at",
        "_submitters",
        "created",
        "credentials",
        "delivered",
        "digests",
        "ids",
        "keys",
        "lanes",
        "lsns",
        "policies",
        "proxies",
        "reasons",
        "registries",
        "repositories",
        "run_times",
        "seqs",
        "submitter_of",
        "tags",
        "triggers",
    )  # fmt: skip

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.seqs: list[int] = []
        self.lsns: list[int] = []
        self.created: list[int] = []
        self.registries: list[str] = []
        self.repositories: list[str] = []
        self.tags: list[str] = []
        self.digests: list[str] = []
        self.credentials: list[str] = []
        self.proxies: list[str] = []
        self.triggers: list[int] = []
        self.lanes: list[int] = []
        self.run_times: list[int] = []
        self.policies: list[int] = []
        self.keys: list[str] = []
        self.reasons: list[str] = []
        self.submitter_of: list[int] = []
        self.delivered: list[int] = []
        self._submitters: dict[Submitter, int] = {}
        self._last_at: tuple[datetime | None, int] = (None, 0)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, job: Job, lsn: int = 0) -> None:
        """Add a job that :func:`fits` (``lsn``: a snapshot's; a journal record numbers them)."""
        spec = job.spec
        target: ImageRef = spec.target  # type: ignore[assignment]  # fits() checked it
        at = job.created_at
        last, micros = self._last_at
        if at is not last:  # a batch's jobs share one datetime
            micros = unix_micros(at)
            self._last_at = (at, micros)
        submitter = self._submitters.setdefault(spec.submitter, len(self._submitters))
        self.ids.append(job.id)
        self.seqs.append(job.seq)
        if lsn:
            self.lsns.append(lsn)
        self.created.append(micros)
        self.registries.append(target.registry)
        self.repositories.append(target.repository)
        self.tags.append(target.tag)
        self.digests.append(target.digest)
        self.credentials.append(target.credentials_ref)
        self.proxies.append(target.proxy_url)
        self.triggers.append(spec.trigger)
        self.lanes.append(spec.lane)
        self.run_times.append(round(spec.max_run_time * 1e9))
        self.policies.append(policy_bits(spec.policies))
        self.keys.append(spec.idempotency_key)
        self.reasons.append(job.history[0].reason)
        self.submitter_of.append(submitter)
        self.delivered.append(job.delivered)

    def fill(self, message: storage_pb2.JobColumns, *, delivered: bool = False) -> None:
        """Fill an empty JobColumns (``delivered``: the snapshot's column too)."""
        message.ids.extend(self.ids)
        message.seqs.extend(self.seqs)
        message.lsns.extend(self.lsns)
        message.created_unix_micros.extend(self.created)
        message.registries.extend(self.registries)
        message.repositories.extend(self.repositories)
        message.tags.extend(self.tags)
        message.digests.extend(self.digests)
        message.credentials_refs.extend(self.credentials)
        message.proxy_urls.extend(self.proxies)
        message.triggers.extend(self.triggers)
        message.lanes.extend(self.lanes)
        message.max_run_time_nanos.extend(self.run_times)
        message.policy_bits.extend(self.policies)
        message.idempotency_keys.extend(self.keys)
        message.reasons.extend(self.reasons)
        message.submitter_of.extend(self.submitter_of)
        for submitter in self._submitters:
            mapping.set_submitter(message.submitters.add(), submitter)
        if delivered:
            message.delivered.extend(self.delivered)


class ColumnsReader:
    """Jobs back from JobColumns; shares what jobs share through one :class:`Decoder`."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self._policies: dict[int, tuple[Policy, ...]] = {}
        self._run_times: dict[int, float] = {}

    def _policy_tuple(self, bits: int) -> tuple[Policy, ...]:
        found = self._policies.get(bits)
        if found is None:
            found = tuple(p for n, p in sorted(_POLICY.items()) if bits & (1 << n))
            if len(self._policies) < 1024:
                self._policies[bits] = found
        return found

    def _run_time(self, nanos: int) -> float:
        found = self._run_times.get(nanos)
        if found is None:
            found = nanos / 1e9
            if len(self._run_times) < 1024:
                self._run_times[nanos] = found
        return found

    def jobs(self, columns: storage_pb2.JobColumns, first_lsn: int = 0) -> list[Job]:
        """The jobs, each with its lsn: the column's, else ``first_lsn`` + its index.

        Each column of few distinct values (times, registries, policies...) is mapped to its
        shared objects in one pass in C (``map`` over a dict's look-up), and the objects are
        made a column at a time (:func:`made`), so no Python code runs per job."""
        count = len(columns.ids)
        strings = self.decoder.strings()

        # A protobuf column makes a new object per value each time it is read: each is read
        # once. A column of one value (a batch's time, one registry...) is one list product.
        def shared(column: Sequence[str]) -> list[str]:
            values = list(column)
            distinct = set(values)
            if len(distinct) == 1:
                (value,) = distinct
                return [strings.setdefault(value, value)] * len(values)
            return list(map(strings.setdefault, values, values))

        def mapped(column: Sequence[int], make: Callable[[int], T]) -> list[T]:
            values = list(column)
            distinct = set(values)
            if len(distinct) == 1:
                return [make(values[0])] * len(values)
            made_of = {value: make(value) for value in distinct}
            return list(map(made_of.__getitem__, values))

        micros = list(columns.created_unix_micros)
        created = mapped(micros, self.decoder.time_micros)
        registries = shared(columns.registries)
        repositories = shared(columns.repositories)
        tags = list(columns.tags)
        digests = list(columns.digests)
        policies = mapped(columns.policy_bits, self._policy_tuple)
        targets = made(
            ImageRef,
            count,
            registry=registries,
            repository=repositories,
            tag=tags,
            digest=digests,
            credentials_ref=shared(columns.credentials_refs),
            proxy_url=shared(columns.proxy_urls),
        )
        submitters = [mapping.submitter_from_proto(s) for s in columns.submitters]
        specs = made(
            JobSpec,
            count,
            target=targets,
            trigger=mapped(columns.triggers, _TRIGGER.__getitem__),
            policies=policies,
            max_run_time=mapped(columns.max_run_time_nanos, self._run_time),
            lane=mapped(columns.lanes, _LANE.__getitem__),
            idempotency_key=columns.idempotency_keys,
            labels=[{} for _ in range(count)],
            submitter=list(map(submitters.__getitem__, columns.submitter_of)),
        )
        if any(digests):
            keys = [spec.dedup_key() for spec in specs]
        else:
            # JobSpec.dedup_key() of an image without a digest, a tuple at a time in C (zip):
            # ImageRef.identity() and then the policies, which the columns keep ascending.
            keys = list(zip(repeat("image"), registries, repositories, tags, policies))
        # A creation's entry is the same for the jobs of one time and reason: one tuple each.
        firsts = list(zip(micros, columns.reasons, strict=True))
        entries = {
            (micros, reason): Transition(
                None, _PENDING, self.decoder.time_micros(micros), "", 0, self.decoder.share(reason)
            )
            for micros, reason in set(firsts)
        }
        out = made(
            Job,
            count,
            id=columns.ids,
            seq=columns.seqs,
            spec=specs,
            created_at=created,
            updated_at=created,
            history=list(map(list, zip(map(entries.__getitem__, firsts)))),
            lsn=columns.lsns or range(first_lsn, first_lsn + count),
            delivered=columns.delivered or [0] * count,
            key=keys,
            kind=[ObjectKind.IMAGE] * count,
        )
        self.decoder.trim()
        return out


_PENDING = JobStatus.PENDING
_DEFAULTS: dict[type, dict[str, object]] = {}


def _defaults(cls: type) -> dict[str, object]:
    """The fields of the dataclass ``cls`` that have a plain default, with it."""
    found = _DEFAULTS.get(cls)
    if found is None:
        found = _DEFAULTS[cls] = {
            f.name: f.default
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        }
    return found


def made(cls: type[T], count: int, **columns: Collection[object]) -> list[T]:
    """``count`` objects of the slotted dataclass ``cls``: each field from its column of
    ``count`` values, a field not given its default. Made without ``__init__``: a loop in C
    per field (``map`` over the slot's setter) instead of a Python call per object, which
    costs several times more (a frozen dataclass's most). So nothing is checked or computed:
    the values must be what ``__init__`` and ``__post_init__`` would have set."""
    defaults = _defaults(cls)
    slots: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]
    missing = [name for name in slots if name not in columns and name not in defaults]
    unknown = columns.keys() - set(slots)
    if missing or unknown:
        raise TypeError(f"{cls.__name__}: no values for {missing}, unknown {sorted(unknown)}")
    for name, column in columns.items():
        if len(column) != count:
            raise ValueError(f"{cls.__name__}.{name}: {len(column)} values for {count} objects")
    objects: list[T] = list(map(object.__new__, repeat(cls, count)))
    # setattr is the cheaper call, but a frozen class's __setattr__ refuses: its slots' own
    # setters then. deque(maxlen=0) runs a map to its end in C and keeps nothing.
    plain = cls.__setattr__ is object.__setattr__
    for name in slots:
        column = columns[name] if name in columns else [defaults[name]] * count
        if plain:
            deque(map(setattr, objects, repeat(name), column), maxlen=0)
        else:
            deque(map(getattr(cls, name).__set__, objects, column), maxlen=0)
    return objects
