"""The handler's side of the job policy (imagehandler.jobpolicy): every submitted job is held
to it before it is queued, so a job that would aim a scanner at an internal address, a file
outside the configured roots, or another team's credentials is refused at once with HNDL-005
naming the rule. Scanners check again with their own copy of the rules (their view wins: they
also see where names resolve, redirects and token realms).

Settings: ``--allowed-registries``, ``--allowed-artifact-urls``, ``--allowed-networks``,
``--artifact-roots``, ``--node-roots``, ``--credential-grants`` (server.config). The handler's
own endpoints (its gRPC, metrics and health addresses) are refused always.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from imagehandler.errors import Catalogue, HandlerError, Reason
from imagehandler.jobpolicy import (
    EgressPolicy,
    Grants,
    JobPolicy,
    Refused,
    Roots,
    Submitter,
    parse_grants,
)
from server.core.model import ArtifactRef, ImageRef, NodeRef, ScanTarget


class Settings(Protocol):
    """The job policy's settings (the handler's Config has them)."""

    @property
    def allowed_registries(self) -> str: ...
    @property
    def allowed_artifact_urls(self) -> str: ...
    @property
    def allowed_networks(self) -> str: ...
    @property
    def artifact_roots(self) -> str: ...
    @property
    def node_roots(self) -> str: ...
    @property
    def credential_grants(self) -> str: ...


# Registries already judged: most jobs name one of a few. Bounded: cleared when full.
_CACHE_MAX = 4096


def _policy(config: Settings, *, read_grants: bool = True) -> JobPolicy:
    """ValueError naming the setting for anything that does not parse (the grants file is read
    only with ``read_grants``)."""
    grants: Grants = Grants({})
    if config.credential_grants and read_grants:
        path = Path(config.credential_grants)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"--credential-grants {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"--credential-grants {path}: not JSON: {exc}") from None
        grants = Grants(parse_grants(document, f"--credential-grants {path}"))
    return JobPolicy(
        egress=EgressPolicy.parse(
            registries=config.allowed_registries,
            artifact_urls=config.allowed_artifact_urls,
            networks=config.allowed_networks,
        ),
        artifact_roots=Roots.parse("--artifact-roots", config.artifact_roots),
        node_roots=Roots.parse("--node-roots", config.node_roots),
        grants=grants,
    )


def check_job_policy(config: Settings) -> list[str]:
    """The job policy's settings' problems, for Config.check (HNDL-003 at start). The grants
    file is read when the handler is built (SubmitPolicy.from_config)."""
    try:
        _policy(config, read_grants=False)
    except ValueError as exc:
        return [str(exc)]
    return []


def refusal(refused: Refused) -> HandlerError:
    return HandlerError(Catalogue.SCAN_PARAMS_EMPTY, refused.message)


class SubmitPolicy:
    """The checks one handler applies to the jobs submitted to it."""

    def __init__(self, policy: JobPolicy) -> None:
        self.policy = policy
        self._registries: dict[str, Refused | None] = {}

    @classmethod
    def from_config(
        cls, config: Settings, own_endpoints: Iterable[tuple[str, int]] = ()
    ) -> SubmitPolicy:
        try:
            policy = _policy(config)
        except ValueError as exc:
            raise HandlerError(
                Catalogue.SCANNER_CONFIG_INVALID,
                str(exc),
                reason=Reason.FAILED_PRECONDITION,
            ) from None
        egress = policy.egress.with_own_endpoints(own_endpoints)
        return cls(JobPolicy(egress, policy.artifact_roots, policy.node_roots, policy.grants))

    def _check_registry(self, registry: str) -> None:
        if registry in self._registries:
            found = self._registries[registry]
        else:
            try:
                self.policy.egress.check_registry(registry)
                found = None
            except Refused as refused:
                found = refused
            if len(self._registries) >= _CACHE_MAX:
                self._registries.clear()
            self._registries[registry] = found
        if found is not None:
            raise refusal(found)

    def check(self, target: ScanTarget, who: Submitter) -> None:
        """HNDL-005 naming the rule when ``target`` may not be scanned for ``who``."""
        if isinstance(target, ImageRef):
            self._check_registry(target.registry)
            if not (target.proxy_url or target.credentials_ref):
                return
        try:
            if isinstance(target, ImageRef):
                self.policy.check_image(
                    target.registry, target.credentials_ref, target.proxy_url, who
                )
            elif isinstance(target, NodeRef):
                self.policy.check_node(target.root_path)
            elif isinstance(target, ArtifactRef):
                self.policy.check_artifact(target.path, target.url)
        except Refused as refused:
            raise refusal(refused) from None


__all__ = ["SubmitPolicy", "check_job_policy", "refusal"]
