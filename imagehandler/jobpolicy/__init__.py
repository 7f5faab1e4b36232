"""The job policy: a job is untrusted input, and this says what it may make a scanner do.

A submitter aims a network client (the scanner) and a file reader at whatever a job names. This
package holds the rules both sides apply, pure and without gRPC, so the handler (at submit) and
every scanner (before each connection and each file it opens) decide alike:

- :mod:`.egress`: allowed registries and artifact URLs, refused address classes, the
  handler's own endpoints, token realms;
- :mod:`.roots`: artifact paths and node roots only under configured roots;
- :mod:`.grants`: pull credentials bound to the registries they are for and the callers who
  may use them.

A refusal is :class:`Refused`, naming the rule. The handler answers it as HNDL-005; a scanner
fails the job with HNDL-005, which is not retried. See docs/operating/multi-tenant-hardening.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imagehandler.jobpolicy.egress import DOCKER_HUB, EgressPolicy
from imagehandler.jobpolicy.grants import ANONYMOUS, Grant, Grants, Submitter, parse_grants
from imagehandler.jobpolicy.refusal import Refused
from imagehandler.jobpolicy.roots import Roots


@dataclass(frozen=True)
class JobPolicy:
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    artifact_roots: Roots = field(default_factory=lambda: Roots("--artifact-roots"))
    node_roots: Roots = field(default_factory=lambda: Roots("--node-roots"))
    grants: Grants = field(default_factory=lambda: Grants({}))

    def check_image(
        self,
        registry: str,
        credentials_ref: str,
        proxy_url: str,
        who: Submitter,
        field: str = "image",
    ) -> Grant | None:
        """An image job: its registry, its proxy, and its credentials (the grant, if any)."""
        self.egress.check_registry(registry, f"{field}.registry")
        self.egress.check_proxy(proxy_url, f"{field}.proxy_url")
        if not credentials_ref:
            return None
        return self.grants.check(
            credentials_ref, registry or DOCKER_HUB, who, f"{field}.credentials_ref"
        )

    def check_node(self, root_path: str) -> str:
        return self.node_roots.check(root_path, "node.root_path")

    def check_artifact(self, path: str, url: str) -> None:
        if path:
            self.artifact_roots.check(path, "artifact.path")
        if url:
            self.egress.check_artifact_url(url, "artifact.url")


__all__ = [
    "ANONYMOUS",
    "EgressPolicy",
    "Grant",
    "Grants",
    "JobPolicy",
    "Refused",
    "Roots",
    "Submitter",
    "parse_grants",
]
