"""Scan once, match many: results reused by digest, and stored SBOMs matched again when the
vulnerability database changes.

- :class:`DatabaseWatch` follows the newest vulnerability database the scanners reported (at
  registration and after a live update).
- :class:`Reuse`: a submit for an image digest whose latest good scan (the repository's
  ``latest_finished``: the same object and policies) is younger than ``--reuse-window`` and was
  matched against the newest database gets a job that finishes at once with that result,
  marked ``reused_from``; the submit's ``fresh`` asks for a scan anyway. A job of the same
  object that is being scanned does not hide the last good result: that stays the latest
  until the new scan finishes.
- :class:`Rematch` queues one ``Trigger.REMATCH`` job per latest good scan (bulk lane): the
  scan's stored CycloneDX SBOM as an artifact, matched for vulnerabilities only, so nothing is
  pulled. ``rematch_of`` names the scan whose findings it is compared with (the latest good
  scan, or that scan's latest rematch); the receiving server gets the rematch's result with a
  :func:`findings_change`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from imagehandler.v1 import common_pb2, result_sink_pb2
from server.config import Config
from server.core.model import (
    ArtifactRef,
    ImageRef,
    Job,
    JobSpec,
    JobStatus,
    Lane,
    ObjectKind,
    Policy,
    Trigger,
)
from server.core.verdicts import VerdictPolicy
from server.service.sessions import Database
from server.service.summaries import failing
from server.service.transitions import Transitions
from server.storage.repository import Inserted, JobFilter, JobRepository

log = structlog.get_logger("imagehandler.rematch")

VULNERABILITIES = "vulnerabilities"
# New vulnerability ids listed in one change event.
MAX_NEW_IDS = 1000
PAGE = 1000
PENDING = frozenset({JobStatus.PENDING})

LoadResult = Callable[[Job], Awaitable[common_pb2.ScanResult | None]]


def database_version(databases: Sequence[Any]) -> str:
    """The vulnerability database's version among ``databases`` (messages or records)."""
    for database in databases:
        if database.name == VULNERABILITIES:
            return str(database.version)
    return ""


class DatabaseWatch:
    """The newest vulnerability database any scanner reported since the handler started."""

    def __init__(self) -> None:
        self.newest: Database | None = None
        self.on_newer: Callable[[Database], None] = lambda database: None

    @property
    def version(self) -> str:
        return self.newest.version if self.newest is not None else ""

    def seen(self, databases: Sequence[Database], *, updated: bool = False) -> None:
        """A scanner's databases, at registration or (``updated``) after a live update. Newer
        is a later release date, or any other version a scanner took into use by a live update
        (``db update`` from feeds of the operator's choosing: its date says when its newest
        feed was published, not when it was built)."""
        for database in databases:
            if database.name != VULNERABILITIES:
                continue
            current = self.newest
            if current is not None and not (
                database.released_at > current.released_at
                or (updated and database.version != current.version)
            ):
                continue
            self.newest = database
            log.info(
                "databases.newer",
                version=database.version,
                released_at=database.released_at,
                previous=current.version if current is not None else "",
            )
            self.on_newer(database)


class Reuse:
    """Reuse by digest (see the module)."""

    def __init__(
        self,
        config: Config,
        repository: JobRepository,
        transitions: Transitions,
        watch: DatabaseWatch,
        load_result: LoadResult,
    ) -> None:
        self.window = config.reuse_window
        self._repository = repository
        self._transitions = transitions
        self._watch = watch
        self._load_result = load_result
        # Set by the handler: a job whose (reused) result waits for the result workers.
        self.on_result: Callable[[Job], None] = lambda job: None
        self.reused = 0  # jobs finished with a stored result, since start

    async def prepare(
        self, specs: Sequence[JobSpec]
    ) -> tuple[list[JobSpec], dict[int, common_pb2.ScanResult]]:
        """The specs to insert (a reusable one marked ``reused_from``) and, by index, the
        stored results they finish with."""
        if self.window <= 0 or not self._watch.version:
            return list(specs), {}
        out = list(specs)
        results: dict[int, common_pb2.ScanResult] = {}
        since = datetime.now(UTC) - timedelta(seconds=self.window)
        for index, spec in enumerate(specs):
            target = spec.target
            if spec.fresh or not isinstance(target, ImageRef) or not target.digest:
                continue
            if spec.trigger is Trigger.REMATCH:
                continue
            latest = await self._repository.latest_finished(spec.dedup_key())
            if latest is None or latest.finished_at is None or latest.finished_at < since:
                continue
            summary = latest.result_summary
            if summary is not None and database_version(summary.databases) != self._watch.version:
                continue  # matched against another database: its result is not read
            result = await self._load_result(latest)
            if result is None or database_version(result.databases) != self._watch.version:
                continue
            out[index] = replace(spec, reused_from=latest.spec.reused_from or latest.id)
            results[index] = result
        return out, results

    async def finish(
        self, inserted: list[Inserted], results: dict[int, common_pb2.ScanResult]
    ) -> None:
        """Move each new reused job to PROCESSING_RESULTS with its stored result (no run):
        the result workers summarise it and deliver it like a scanner's. Its entry in
        ``inserted`` then shows it as it is now (the submit's reply)."""
        for index, result in results.items():
            item = inserted[index]
            if item.duplicate:
                continue
            copy = common_pb2.ScanResult()
            copy.CopyFrom(result)
            copy.job_id = item.job.id
            copy.run = 0
            moved = await self._transitions.move(
                item.job.id,
                JobStatus.PROCESSING_RESULTS,
                expect=PENDING,
                reason=f"the result of job {item.job.spec.reused_from} reused",
                result=copy,
            )
            if moved is not None:
                self.reused += 1
                inserted[index] = Inserted(moved.job, duplicate=False)
                self.on_result(moved.job)


@dataclass(frozen=True)
class RematchFilter:
    kinds: frozenset[ObjectKind] = frozenset()
    registry: str = ""
    repository: str = ""
    # Also scans already matched against the newest database.
    everything: bool = False

    def matches(self, job: Job) -> bool:
        if self.kinds and job.kind not in self.kinds:
            return False
        target = job.spec.target
        if self.registry or self.repository:
            if not isinstance(target, ImageRef):
                return False
            if self.registry and target.registry != self.registry:
                return False
            if self.repository and target.repository != self.repository:
                return False
        return True


@dataclass(frozen=True)
class Queued:
    queued: int
    skipped: int


class Rematch:
    """Rematch jobs for stored SBOMs (see the module)."""

    def __init__(
        self,
        config: Config,
        repository: JobRepository,
        watch: DatabaseWatch,
        load_result: LoadResult,
        submit: Callable[[Sequence[JobSpec]], Awaitable[list[Inserted]]],
    ) -> None:
        self.config = config
        self._repository = repository
        self._watch = watch
        self._load_result = load_result
        self._submit = submit
        self._lock = asyncio.Lock()
        self.queued = 0  # rematch jobs queued since start

    async def queue(self, where: RematchFilter) -> Queued:
        """One rematch job per latest good scan the filter selects (see the module)."""
        async with self._lock:  # two sweeps at once would queue everything twice
            return await self._queue(where)

    async def _queue(self, where: RematchFilter) -> Queued:
        origins: dict[str, Job] = {}  # the latest good scan's id -> that scan
        newest: dict[str, Job] = {}  # the latest good scan's id -> its newest rematch
        keys: dict[tuple[Any, ...], Job] = {}
        rematches: list[Job] = []
        finished = JobFilter(statuses=frozenset({JobStatus.FINISHED}))
        after = 0
        while True:
            page, cursor = await self._repository.page(finished, after, PAGE)
            for job in page:
                if job.spec.trigger is Trigger.REMATCH:
                    rematches.append(job)
                elif where.matches(job) and job.key not in keys:
                    latest = await self._repository.latest_finished(job.key)
                    if latest is not None:
                        keys[job.key] = latest
                        origins[latest.id] = latest
            if cursor is None:
                break
            after = cursor
        by_id = {job.id: job for job in rematches}
        for job in rematches:  # in arrival order: the last one seen is the newest
            source = _origin(job, by_id)
            if source in origins:
                newest[source] = job
        specs: list[JobSpec] = []
        skipped = 0
        version = self._watch.version
        for origin_id, origin in origins.items():
            previous = newest.get(origin_id, origin)
            # The summary names the databases: a scan the newest database has seen is left
            # out without reading its result (a sweep at every restart reads no result file).
            summary = previous.result_summary
            if (
                not where.everything
                and version
                and summary is not None
                and database_version(summary.databases) == version
            ):
                skipped += 1
                continue
            origin_result = await self._load_result(origin)
            if origin_result is None or not origin_result.sbom:
                skipped += 1
                continue
            sbom = bytes(origin_result.sbom)
            specs.append(
                JobSpec(
                    target=ArtifactRef(
                        sbom=sbom,
                        sbom_format=origin_result.sbom_format or "cyclonedx-json",
                        sbom_sha256=hashlib.sha256(sbom).hexdigest(),
                    ),
                    trigger=Trigger.REMATCH,
                    policies=(Policy.VULNERABILITIES,),
                    max_run_time=self.config.default_max_run_time,
                    lane=Lane.BULK,
                    labels=dict(origin.spec.labels),
                    submitter=origin.spec.submitter,
                    rematch_of=previous.id,
                )
            )
        queued = 0
        for start in range(0, len(specs), self.config.max_batch):
            inserted = await self._submit(specs[start : start + self.config.max_batch])
            queued += sum(1 for item in inserted if not item.duplicate)
        self.queued += queued
        log.info("rematch.queued", queued=queued, skipped=skipped, database=version)
        return Queued(queued, skipped)


def _origin(job: Job, by_id: dict[str, Job]) -> str:
    """The scan a rematch's SBOM came from: its rematch_of, followed past other rematches."""
    seen = 0
    origin = job.spec.rematch_of
    while origin in by_id and seen < len(by_id):
        origin = by_id[origin].spec.rematch_of
        seen += 1
    return origin


def _key(vulnerability: common_pb2.Vulnerability) -> tuple[str, str, str]:
    return (vulnerability.id, vulnerability.package, vulnerability.installed_version)


def set_findings_change(
    change: result_sink_pb2.FindingsChange,
    previous_job: Job | None,
    previous: common_pb2.ScanResult | None,
    result: common_pb2.ScanResult,
    policy: VerdictPolicy,
) -> None:
    """What a rematch changed since ``previous`` (vulnerabilities; the verdicts compare the
    vulnerabilities alone: the SBOM holds no malware or secrets)."""
    before = {_key(v) for v in previous.vulnerabilities} if previous is not None else set()
    now = {_key(v) for v in result.vulnerabilities}
    new = now - before
    change.new = len(new)
    change.fixed = len(before - now)
    change.unchanged = len(now & before)
    change.new_ids.extend(sorted({key[0] for key in new})[:MAX_NEW_IDS])
    change.verdict = _verdict(result, policy)
    change.database = database_version(result.databases)
    if previous_job is not None:
        change.previous_job_id = previous_job.id
        if previous is not None:
            change.previous_verdict = _verdict(previous, policy)
            change.previous_database = database_version(previous.databases)
            change.verdict_changed = change.previous_verdict != change.verdict


def _verdict(result: common_pb2.ScanResult, policy: VerdictPolicy) -> common_pb2.Verdict.ValueType:
    only = common_pb2.ScanResult()
    only.vulnerabilities.extend(result.vulnerabilities)
    return common_pb2.VERDICT_FAILED if failing(only, policy) else common_pb2.VERDICT_PASSED
