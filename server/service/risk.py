"""Risk acceptance: a finding excused for a while (scope: one object, a repository, or
everywhere), and the verdicts of FINISHED jobs re-decided whenever an acceptance is added,
revoked or expires. Every summary that changes is stored with a new verdict version and owed to
the receiving server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from imagehandler.errors import Catalogue, HandlerError
from imagehandler.v1 import job_service_pb2
from server import mapping
from server.core.model import Job, JobStatus, ObjectKind
from server.core.verdicts import Acceptance, Acceptances, Change, Scope, scope_target
from server.service.background import Background
from server.service.summaries import apply_acceptances
from server.storage.repository import JobRepository

log = structlog.get_logger("imagehandler")
FINISHED = frozenset({JobStatus.FINISHED})


@dataclass(frozen=True)
class Reevaluated:
    """FINISHED jobs whose verdict changed, and those whose accepted findings changed while
    their verdict stayed."""

    verdicts: int
    summaries: int


class RiskBook:
    def __init__(self, repository: JobRepository, *, background: Background) -> None:
        self._repository = repository
        # A verdict change is owed to the receiving server, when one is configured.
        self.owe: Callable[[Job], None] | None = None
        self._background = background
        self.acceptances = Acceptances()
        self._records: dict[str, job_service_pb2.RiskAcceptance] = {}
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        # One change of the acceptances in memory at a time: a reload must not see an
        # acceptance this replica is adding (in memory, not yet stored) and drop it.
        self._changing = asyncio.Lock()
        # Another replica changed them (a shared store): read them again.
        repository.on_acceptances(self._changed_elsewhere)

    async def load(self) -> None:
        """The acceptances the store kept (at start); expired ones go at once."""
        await self.reload()
        await self.expire()

    def _changed_elsewhere(self) -> None:
        self._background.spawn(self.reload())

    async def reload(self) -> None:
        """The acceptances in memory become those the store keeps. Verdicts are not decided
        again here: the replica that made the change did that, and stored them; this one's
        later verdicts (results it processes) see the change."""
        async with self._changing:
            stored = {record.id: record for record in await self._repository.acceptances()}
            for acceptance_id in set(self._records) - set(stored):
                self._forget(acceptance_id)
            for acceptance_id, record in stored.items():
                if acceptance_id not in self._records:
                    await self._add(record)

    def _forget(self, acceptance_id: str) -> None:
        self.acceptances.remove(acceptance_id)
        self._records.pop(acceptance_id, None)
        timer = self._expiry_timers.pop(acceptance_id, None)
        if timer is not None:
            timer.cancel()

    def stop(self) -> None:
        for timer in self._expiry_timers.values():
            timer.cancel()
        self._expiry_timers.clear()

    def records(self) -> list[job_service_pb2.RiskAcceptance]:
        return list(self._records.values())

    async def accept(
        self, finding_id: str, scope: Scope, job: Job | None, reason: str, days: float
    ) -> tuple[job_service_pb2.RiskAcceptance, Reevaluated]:
        if scope is not Scope.EVERYWHERE and job is None:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY,
                f"scope {scope.name} needs job_id: the job whose object or repository it covers",
            )
        if scope is Scope.REPOSITORY and job is not None and job.kind is not ObjectKind.IMAGE:
            raise HandlerError(
                Catalogue.SCAN_PARAMS_EMPTY, "scope REPOSITORY applies to image jobs only"
            )
        _, text = scope_target(scope, job)
        at = datetime.now(UTC)
        record = job_service_pb2.RiskAcceptance(
            id=str(uuid.uuid4()),
            finding_id=finding_id,
            scope=job_service_pb2.RiskScope.ValueType(scope),
            job_id=job.id if job is not None else "",
            reason=reason,
            target=text,
            created_at=mapping.timestamp(at),
            expires_at=mapping.timestamp(at + timedelta(days=days)),
        )
        async with self._changing:
            await self._add(record)
            await self._repository.add_acceptance(record)
        log.info("risk.accepted", acceptance_id=record.id, finding=finding_id, scope=scope.name,
                 target=text, days=days)  # fmt: skip
        return record, await self._reevaluate(f"risk acceptance {record.id} added")

    async def revoke(self, acceptance_id: str) -> Reevaluated:
        async with self._changing:
            if acceptance_id not in self.acceptances.by_id:
                raise HandlerError(
                    Catalogue.SCAN_PARAMS_EMPTY, f"no risk acceptance with id {acceptance_id!r}"
                )
            self._forget(acceptance_id)
            await self._repository.remove_acceptance(acceptance_id)
        return await self._reevaluate(f"risk acceptance {acceptance_id} revoked")

    async def _add(self, record: job_service_pb2.RiskAcceptance) -> None:
        job = await self._repository.get(record.job_id) if record.job_id else None
        scope = Scope(record.scope)
        target, text = scope_target(scope, job)
        if scope is not Scope.EVERYWHERE and job is None:
            target = ("(pruned job)",)  # its job is gone: it can match nothing new
        acceptance = Acceptance(
            id=record.id,
            finding_id=record.finding_id,
            scope=scope,
            target=target,
            target_text=record.target or text,
            reason=record.reason,
            created_at=record.created_at.ToDatetime(tzinfo=UTC),
            expires_at=record.expires_at.ToDatetime(tzinfo=UTC),
            job_id=record.job_id,
        )
        self.acceptances.add(acceptance)
        self._records[record.id] = record
        delay = max(0.0, (acceptance.expires_at - datetime.now(UTC)).total_seconds())
        loop = asyncio.get_running_loop()
        self._expiry_timers[record.id] = loop.call_later(delay, self._expire_soon)

    def _expire_soon(self) -> None:
        self._background.spawn(self._expire_quietly())

    async def _expire_quietly(self) -> None:
        await self.expire()

    async def expire(self) -> Reevaluated:
        """Drop acceptances past their expiry; re-evaluate verdicts when any went."""
        async with self._changing:
            expired = self.acceptances.expired(datetime.now(UTC))
            for acceptance in expired:
                self._forget(acceptance.id)
                await self._repository.remove_acceptance(acceptance.id)
                log.info("risk.expired", acceptance_id=acceptance.id, finding=acceptance.finding_id)
        if not expired:
            return Reevaluated(0, 0)
        ids = ", ".join(a.id for a in expired)
        return await self._reevaluate(f"risk acceptance {ids} expired")

    async def _reevaluate(self, cause: str) -> Reevaluated:
        """Re-decide the summaries of FINISHED jobs with findings the policy fails; every
        change is stored and owed to the receiving server."""
        now = datetime.now(UTC)
        verdicts = summaries = 0
        for job in await self._repository.select(FINISHED):
            summary = job.result_summary
            if summary is None or not (summary.failing or summary.accepted):
                continue
            change = apply_acceptances(summary, self.acceptances.accepted_for(job, now))
            if change is Change.NONE:
                continue
            if change is Change.VERDICT:
                verdicts += 1
            else:
                summaries += 1
            job.verdict_version += 1
            job.verdict_cause = cause
            await self._repository.verdict_changed(job)
            if self.owe is not None:
                self.owe(job)
        if verdicts or summaries:
            log.info("verdicts.reevaluated", verdicts=verdicts, summaries=summaries, cause=cause)
        return Reevaluated(verdicts, summaries)
