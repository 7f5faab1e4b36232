"""A scanner's copy of the job policy (imagehandler.jobpolicy), and its view wins.

The handler checked the job at submit; a scanner checks it again before it acts on it, with
its own settings (``--allowed-registries``, ``--allowed-artifact-urls``,
``--allowed-networks``, ``--artifact-roots``, ``--node-roots``, ``--credential-grants``), and
sees more: paths after every symbolic link on its own filesystem is resolved, and (in
:mod:`scanner_client.egress`) the address every connection really goes to. A refusal fails the
job with HNDL-005 naming the rule; it is not retried.

Engines that reach the network or the filesystem for a job call :meth:`ScannerPolicy.check_job`
before they start, :func:`resolved_path` for the paths they open, and make their HTTP
connections with :func:`scanner_client.egress.guarded_client`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from imagehandler.jobpolicy import (
    EgressPolicy,
    Grant,
    Grants,
    JobPolicy,
    Refused,
    Roots,
    parse_grants,
)
from imagehandler.v1 import common_pb2
from scanner_client.engine import Job, ScanFailure

if TYPE_CHECKING:
    from scanner_client.egress import EgressGuard


def failure(refused: Refused) -> ScanFailure:
    """A refusal as the job's failure: HNDL-005, permanent (running it again cannot help)."""
    return ScanFailure(refused.message, code="HNDL-005", permanent=True)


def read_grants(path: str | Path) -> dict[str, Grant]:
    """A ``--credential-grants`` file; ValueError saying what is wrong."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--credential-grants {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"--credential-grants {path}: not JSON: {exc}") from None
    return parse_grants(document, f"--credential-grants {path}")


@dataclass(frozen=True)
class ScannerPolicy:
    rules: JobPolicy = field(default_factory=JobPolicy)
    # The handler's HOST:PORT (--handler): never a job's target.
    handler: str = ""

    @classmethod
    def parse(
        cls,
        *,
        allowed_registries: str = "*",
        allowed_artifact_urls: str = "",
        allowed_networks: str = "",
        artifact_roots: str = "",
        node_roots: str = "",
        credential_grants: str = "",
        handler: str = "",
    ) -> ScannerPolicy:
        """From the flags' values; ValueError naming the flag of one that does not parse."""
        return cls(
            JobPolicy(
                egress=EgressPolicy.parse(
                    registries=allowed_registries,
                    artifact_urls=allowed_artifact_urls,
                    networks=allowed_networks,
                ),
                artifact_roots=Roots.parse("--artifact-roots", artifact_roots),
                node_roots=Roots.parse("--node-roots", node_roots),
                grants=Grants(read_grants(credential_grants) if credential_grants else {}),
            ),
            handler,
        )

    def with_grants(self, grants: dict[str, Grant]) -> ScannerPolicy:
        return replace(self, rules=replace(self.rules, grants=Grants(grants)))

    def guard(self) -> EgressGuard:
        # Imported here: the guard's HTTP client is the builtin engine's (its extra), and a
        # scanner of another engine must not need it.
        from scanner_client.egress import EgressGuard

        return EgressGuard(self.rules.egress, self.handler)

    def check_job(self, job: Job) -> Grant | None:
        """The job's names, paths and credentials (ScanFailure HNDL-005 when refused); the
        grant of its credentials_ref, if it names one."""
        obj = job.object
        try:
            which = obj.WhichOneof("target")
            if which == "image":
                return self.check_image(obj.image, job)
            if which == "node":
                if obj.node.root_path:  # none at all: the engine's own HNDL-005 says so
                    resolved_path(self.rules.node_roots, obj.node.root_path, "node.root_path")
            elif which == "artifact":
                artifact = obj.artifact
                if artifact.path:
                    resolved_path(self.rules.artifact_roots, artifact.path, "artifact.path")
                if artifact.url:
                    self.rules.egress.check_artifact_url(artifact.url)
        except Refused as refused:
            raise failure(refused) from None
        return None

    def check_image(self, image: common_pb2.ImageObject, job: Job) -> Grant | None:
        """Refused (not yet a failure) for an image object, the object of ``job``."""
        return self.rules.check_image(
            image.registry, image.credentials_ref, image.proxy_url, job.submitter
        )


def resolved_path(roots: Roots, path: str, field: str) -> Path:
    """``path`` with every link resolved, when it and its resolution lie under ``roots``
    (resolved too); Refused otherwise. Open what this returns, not ``path``."""
    written = roots.check(path, field)
    resolved = os.path.realpath(written)
    roots.check_resolved(path, resolved, [os.path.realpath(root) for root in roots.paths], field)
    return Path(resolved)


__all__ = ["ScannerPolicy", "failure", "read_grants", "resolved_path"]
