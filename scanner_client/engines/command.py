"""The command engine: runs an external scanner (Trivy, Grype, a script) for each job.

The command is a template split like a shell would (``shlex``), then each word is filled in
with the job's fields; no shell runs it, so a field cannot inject words. Placeholders:

``{image}`` (``registry/repository[:tag][@digest]``), ``{registry}``, ``{repository}``,
``{tag}``, ``{digest}``, ``{proxy}``, ``{node}``, ``{root}`` (a node's root path), ``{path}``,
``{url}``, ``{sbom}`` (a file holding an artifact's inline SBOM), ``{job_id}``.

For example ``trivy image --quiet --format json {image}`` with ``--command-format trivy-json``.
The command's standard output is parsed in the declared format: ``trivy-json`` (Trivy's JSON
report, schema 2 or the older list) or ``scanresult-json`` (our ``ScanResult`` in protobuf's
JSON mapping, for wrappers written for this handler). A non-zero exit is HNDL-006 with the
command and the end of its standard error; a command past its timeout is killed (its whole
process group) and is HNDL-006 too; a cancelled job kills the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import string
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from google.protobuf import json_format

from imagehandler.jobpolicy import Refused
from imagehandler.jobpolicy.egress import DOCKER_HUB, DOCKER_HUB_API
from imagehandler.jobpolicy.patterns import split_host
from imagehandler.v1 import common_pb2
from scanner_client.engine import (
    Database,
    Engine,
    Job,
    Kind,
    ProgressReporter,
    ScanFailure,
    ScannerBroken,
)
from scanner_client.engines.builtin.common import SEVERITIES, excerpt
from scanner_client.job_policy import ScannerPolicy
from scanner_client.job_policy import failure as policy_failure

FORMATS: Final = ("trivy-json", "scanresult-json")
PLACEHOLDERS: Final = frozenset(
    {
        "image", "registry", "repository", "tag", "digest", "proxy", "node", "root",
        "path", "url", "sbom", "job_id",
    }
)  # fmt: skip
MAX_OUTPUT: Final = 256 * 1024 * 1024
STDERR_EXCERPT: Final = 2000


def parse_database(value: str) -> Database:
    """``NAME=VERSION@RELEASED_AT`` (for example ``trivy-db=2@2026-11-20T06:00:00Z``)."""
    name, sep, rest = value.partition("=")
    version, sep2, released_at = rest.rpartition("@")
    if not sep or not sep2 or not name or not version or not released_at:
        raise ValueError(f"database {value!r} is not NAME=VERSION@RELEASED_AT")
    return Database(name.strip(), version.strip(), released_at.strip())


class CommandEngine(Engine):
    """Runs ``template`` per job and turns its output into a ScanResult."""

    name = "command"

    def __init__(
        self,
        template: str,
        *,
        output_format: str = "trivy-json",
        timeout: float = 600.0,
        databases: Sequence[Database] = (),
        kinds: frozenset[Kind] = frozenset(),
        proxy_url: str = "",
        env: Mapping[str, str] | None = None,
        policy: ScannerPolicy | None = None,
    ) -> None:
        if not template.strip():
            raise ValueError("the command engine needs a command (--command)")
        if output_format not in FORMATS:
            raise ValueError(f"output format {output_format!r} is not one of {', '.join(FORMATS)}")
        if timeout <= 0:
            raise ValueError(f"command timeout must be positive, got {timeout}")
        try:
            self.words = shlex.split(template)
        except ValueError as exc:
            raise ValueError(f"command {template!r}: {exc}") from None
        for word in self.words:
            for _, field, _, _ in string.Formatter().parse(word):
                if field is not None and field not in PLACEHOLDERS:
                    raise ValueError(
                        f"command placeholder {{{field}}} is unknown; use "
                        f"{', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))}"
                    )
        self.template = template
        self.output_format = output_format
        self.timeout = timeout
        self._databases = list(databases)
        self.kinds = kinds
        self.proxy_url = proxy_url
        self.env = dict(os.environ if env is None else env)
        # The job policy (default: refuse internal addresses, paths and artifact URLs). The
        # command makes its own connections, so they cannot be pinned: the job's names, paths
        # and the addresses its hosts resolve to now are checked before it runs.
        self.policy = policy or ScannerPolicy()
        self.guard = self.policy.guard()

    def databases(self) -> Sequence[Database]:
        return self._databases

    def argv(self, job: Job, sbom_file: str = "") -> list[str]:
        values = _fields(job, self.proxy_url)
        values["sbom"] = sbom_file
        return [word.format_map(values) for word in self.words]

    async def _check(self, job: Job) -> None:
        """The job policy before the command runs (ScanFailure HNDL-005 when refused)."""
        self.policy.check_job(job)
        obj = job.object
        # (field, URL) of each host the command would connect to for the job.
        targets: list[tuple[str, str]] = []
        if obj.HasField("image"):
            registry = obj.image.registry or DOCKER_HUB
            host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
            targets.append(("image.registry", f"https://{host}"))
            if obj.image.proxy_url and obj.image.proxy_url != self.proxy_url:
                targets.append(("image.proxy_url", obj.image.proxy_url))
        elif obj.HasField("artifact") and obj.artifact.url:
            targets.append(("artifact.url", obj.artifact.url))
        for what, url in targets:
            try:
                parts = urlsplit(url)
                host, port = split_host(parts.netloc.rpartition("@")[2])
                default = 80 if parts.scheme == "http" else 443
                await self.guard.addresses(host, int(port) if port.isdigit() else default, what)
            except Refused as refused:
                raise policy_failure(refused) from None
            except (OSError, TimeoutError, ValueError):
                pass  # a name this machine cannot resolve: the command will say so

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        await self._check(job)
        try:
            workdir = tempfile.TemporaryDirectory(prefix="image-scanner-cmd-")
        except OSError as exc:
            # No job can run here: stop taking work rather than fail every job.
            raise ScannerBroken(
                f"cannot make a scan directory in {tempfile.gettempdir()}: "
                f"{exc.strerror or exc} (set TMPDIR to a writable directory)"
            ) from exc
        with workdir as scratch:
            sbom_file = ""
            if job.object.HasField("artifact") and job.object.artifact.sbom:
                sbom_file = str(Path(scratch) / "sbom.json")
                await asyncio.to_thread(Path(sbom_file).write_bytes, job.object.artifact.sbom)
            argv = self.argv(job, sbom_file)
            progress.report("analyse", 0, argv[0])
            stdout = await self._run(argv, scratch, job)
        progress.report("report", 90)
        result = parse_output(stdout, self.output_format, shlex.join(argv))
        if not result.databases:
            result.databases.extend(d.to_proto() for d in self._databases)
        return result

    async def _run(self, argv: list[str], cwd: str, job: Job) -> bytes:
        env = dict(self.env)
        proxy = _fields(job, self.proxy_url)["proxy"]
        if proxy:
            env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy)
        command = shlex.join(argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own process group: killed as a whole
            )
        except OSError as exc:
            raise ScanFailure(f"command {command!r} cannot start: {exc}", permanent=True) from None
        try:
            async with asyncio.timeout(self.timeout):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            await _kill(process)
            raise ScanFailure(
                f"command {command!r} did not finish within {self.timeout:g}s and was killed"
            ) from None
        except BaseException:
            await _kill(process)  # cancelled: the command must not outlive the job
            raise
        if process.returncode != 0:
            text = excerpt(stderr.decode("utf-8", "replace"), STDERR_EXCERPT)
            raise ScanFailure(
                f"command {command!r} exited with {process.returncode}: {text or '(no stderr)'}"
            )
        if len(stdout) > MAX_OUTPUT:
            raise ScanFailure(f"command {command!r} wrote more than {MAX_OUTPUT} bytes")
        return stdout


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await asyncio.shield(process.wait())


def _fields(job: Job, scanner_proxy: str) -> dict[str, str]:
    values = dict.fromkeys(PLACEHOLDERS, "")
    values["job_id"] = job.job_id
    target = job.object.WhichOneof("target")
    if target == "image":
        image = job.object.image
        registry = image.registry or "docker.io"
        reference = f"{registry}/{image.repository}"
        if image.tag:
            reference += f":{image.tag}"
        if image.digest:
            reference += f"@{image.digest}"
        values.update(
            image=reference,
            registry=registry,
            repository=image.repository,
            tag=image.tag,
            digest=image.digest,
            proxy=image.proxy_url or scanner_proxy,
        )
    elif target == "node":
        if not job.object.node.root_path:
            # Not "/": that is this scanner's own filesystem, not the node's.
            raise ScanFailure(
                "node.root_path is empty: the job must name where the node's filesystem is "
                "mounted on this scanner",
                code="HNDL-005",
                permanent=True,
            )
        values.update(node=job.object.node.node_name, root=job.object.node.root_path)
    elif target == "artifact":
        values.update(path=job.object.artifact.path, url=job.object.artifact.url)
    if not values["proxy"]:
        values["proxy"] = scanner_proxy
    return values


def parse_output(stdout: bytes, output_format: str, command: str) -> common_pb2.ScanResult:
    """The command's output as a ScanResult; HNDL-006 when it is not in the declared format."""
    try:
        document: Any = json.loads(stdout)
    except ValueError as exc:
        raise ScanFailure(
            f"command {command!r} wrote no valid JSON ({output_format}): {exc}; output starts "
            f"{stdout[:200]!r}"
        ) from None
    if output_format == "scanresult-json":
        try:
            return json_format.ParseDict(document, common_pb2.ScanResult())
        except json_format.ParseError as exc:
            raise ScanFailure(f"command {command!r} output is not a ScanResult: {exc}") from None
    return parse_trivy(document, command)


def _severity(value: object) -> common_pb2.Severity.ValueType:
    return SEVERITIES.get(str(value or "").upper(), common_pb2.SEVERITY_UNSPECIFIED)


def parse_trivy(document: Any, command: str = "trivy") -> common_pb2.ScanResult:
    """A Trivy JSON report: ``{"SchemaVersion": 2, "Results": [...]}`` or the older list."""
    results = document.get("Results") if isinstance(document, dict) else document
    if results is None:
        results = []
    if not isinstance(results, list):
        raise ScanFailure(f"command {command!r}: Trivy JSON has no Results list")
    scan = common_pb2.ScanResult()
    for item in results:
        if not isinstance(item, dict):
            continue
        target = str(item.get("Target", ""))
        for vulnerability in item.get("Vulnerabilities") or []:
            if not isinstance(vulnerability, dict) or not vulnerability.get("VulnerabilityID"):
                continue
            layer = vulnerability.get("Layer") or {}
            scan.vulnerabilities.append(
                common_pb2.Vulnerability(
                    id=str(vulnerability["VulnerabilityID"]),
                    package=str(vulnerability.get("PkgName", "")),
                    installed_version=str(vulnerability.get("InstalledVersion", "")),
                    fixed_version=str(vulnerability.get("FixedVersion", "")),
                    severity=_severity(vulnerability.get("Severity")),
                    path=str(vulnerability.get("PkgPath") or target),
                    layer_digest=str(layer.get("Digest") or layer.get("DiffID") or ""),
                    title=str(vulnerability.get("Title", "")),
                )
            )
        for misconfiguration in item.get("Misconfigurations") or []:
            if not isinstance(misconfiguration, dict):
                continue
            if misconfiguration.get("Status", "FAIL") != "FAIL":
                continue
            scan.misconfigurations.append(
                common_pb2.Misconfiguration(
                    id=str(misconfiguration.get("ID") or misconfiguration.get("AVDID") or ""),
                    title=str(misconfiguration.get("Title", "")),
                    severity=_severity(misconfiguration.get("Severity")),
                    path=target,
                )
            )
        for secret in item.get("Secrets") or []:
            if not isinstance(secret, dict) or not secret.get("RuleID"):
                continue
            scan.secrets.append(
                common_pb2.Secret(
                    rule_id=str(secret["RuleID"]),
                    title=str(secret.get("Title", "")),
                    path=target,
                    line=int(secret.get("StartLine") or 0),
                    severity=_severity(secret.get("Severity")),
                )
            )
    failing = any(v.severity >= common_pb2.SEVERITY_HIGH for v in scan.vulnerabilities) or bool(
        scan.secrets
    )
    scan.verdict = common_pb2.VERDICT_FAILED if failing else common_pb2.VERDICT_PASSED
    return scan
