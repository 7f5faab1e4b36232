"""The builtin engine: pulls images and streams their layers, walks node roots and artifacts,
and finds packages (into a CycloneDX SBOM), vulnerabilities, malware, secrets and
misconfigurations.

Network work (registry pulls, artifact downloads) runs in the event loop and stops at once on
cancellation. Layer streaming and analysis run in a worker thread that checks a cancel token
between files and chunks; a cancelled scan waits for that thread to stop before it removes its
scratch directory (which holds the downloaded blobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import ssl
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import structlog

from imagehandler.jobpolicy import Grant, Refused
from imagehandler.jobpolicy.grants import GRANT_KEYS, parse_grant
from imagehandler.v1 import common_pb2
from scanner_client.egress import guarded_client
from scanner_client.engine import (
    Database,
    Engine,
    Job,
    Kind,
    Policy,
    ProgressReporter,
    ScanFailure,
    ScannerBroken,
)
from scanner_client.engines.builtin import (
    catalog,
    files,
    images,
    layer_cache,
    malware,
    sbom,
    scratch_space,
    secrets,
)
from scanner_client.engines.builtin.analyzers import Distro, Package
from scanner_client.engines.builtin.common import Cancelled, CancelToken, Limits, too_large
from scanner_client.engines.builtin.databases import DatabaseKeeper, LoadedDatabases
from scanner_client.engines.builtin.files import FileAnalyser, FileFacts
from scanner_client.engines.builtin.layer_cache import LayerCache
from scanner_client.engines.builtin.layers import ImageTree, LayerRecord, StaleRecord
from scanner_client.engines.builtin.registry import (
    Credentials,
    Platform,
    PulledImage,
    RegistryClient,
    check_proxy_url,
)
from scanner_client.engines.builtin.rootfs import Rootfs
from scanner_client.job_policy import ScannerPolicy, resolved_path
from scanner_client.job_policy import failure as policy_failure
from scanner_client.vulndb import matcher

T = TypeVar("T")
log = structlog.get_logger("image_scanner.builtin")

# How long a cancelled scan waits for its worker thread before it leaves it behind.
THREAD_STOP_WAIT: Final = 10.0
# Top-level directories of a node root that hold no files of the node's own.
NODE_SKIP: Final = frozenset({"proc", "sys", "dev", "run"})
ROOT_USERS: Final = frozenset({"", "root", "0", "0:0", "root:root"})


@dataclass(frozen=True)
class BuiltinSettings:
    # Databases (default: the packaged ones).
    db_dir: Path | None = None
    # Periodic update of the vulnerability database in db_dir: sources and seconds between.
    db_update_from: tuple[str, ...] = ()
    db_update_interval: float = 0.0
    # How often an idle scanner looks for a database file replaced by `db update`.
    db_poll_interval: float = 5.0
    # Where scans keep downloaded blobs (default: the system temporary directory), and the
    # free space it must have: checked at start (the scanner does not start without it) and
    # after a failed scan (the scanner stops taking work).
    scratch_dir: Path | None = None
    min_free_scratch: int = scratch_space.DEFAULT_MIN_FREE_MIB * scratch_space.MIB
    # The scanner's proxy; a job's image.proxy_url wins.
    proxy_url: str = ""
    # JSON: {"REF": {"username": ..., "password": ... | "token": ..., "registries": [...],
    # "allowed": [...]}} for credentials_ref; registries and allowed (the grant) may come from
    # the policy's --credential-grants instead.
    credentials_file: Path | None = None
    # What a job may aim this scanner at (scanner_client.job_policy). The default refuses
    # internal addresses, filesystem paths and artifact URLs.
    policy: ScannerPolicy = field(default_factory=ScannerPolicy)
    # Registries reached over plain HTTP (loopback registries always are).
    insecure_registries: frozenset[str] = frozenset()
    platform: str = "linux/amd64"
    limits: Limits = field(default_factory=Limits)
    registry_timeout: float = 60.0
    # CA bundle for registries with a private CA (default: the system's).
    ca_file: Path | None = None
    # The layer cache (layer_cache.py): what was learned from each layer, so that a layer
    # seen before is neither downloaded nor unpacked; None: no cache.
    layer_cache_dir: Path | None = None
    layer_cache_size: int = layer_cache.DEFAULT_SIZE


class _ThreadProgress:
    """Progress from the worker thread, handed to the loop; repeated values are dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reporter: ProgressReporter) -> None:
        self._loop = loop
        self._reporter = reporter
        self._last: tuple[str, int] | None = None

    def __call__(self, stage: str, percent: int, message: str = "") -> None:
        percent = max(0, min(100, percent))
        if (stage, percent) == self._last:
            return
        self._last = (stage, percent)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._reporter.report, stage, percent, message)


Report = Callable[..., None]


@dataclass
class Findings:
    packages: list[Package] = field(default_factory=list)
    distro: Distro | None = None
    malware: list[common_pb2.Malware] = field(default_factory=list)
    secrets: list[common_pb2.Secret] = field(default_factory=list)
    misconfigurations: list[common_pb2.Misconfiguration] = field(default_factory=list)


class BuiltinEngine(Engine):
    """Scans images, nodes and artifacts with the project's own analysers and databases."""

    name = "builtin"
    kinds = frozenset(Kind)

    def __init__(self, settings: BuiltinSettings | None = None) -> None:
        self.settings = settings or BuiltinSettings()
        self.settings.limits.check()
        self.platform = Platform.parse(self.settings.platform)
        try:
            check_proxy_url(self.settings.proxy_url)
        except ScanFailure as exc:
            raise ValueError(str(exc)) from None
        self.scratch_root = self.settings.scratch_dir or scratch_space.default_root()
        # ValueError naming --scratch-dir when scans could not unpack there.
        scratch_space.prepare(self.scratch_root, self.settings.min_free_scratch)
        # DatabaseError when a database is missing or invalid: the scanner must not start.
        self.keeper = DatabaseKeeper(
            self.settings.db_dir,
            update_from=self.settings.db_update_from,
            update_interval=self.settings.db_update_interval,
            proxy_url=self.settings.proxy_url,
            poll_interval=self.settings.db_poll_interval,
        )
        self.keeper.on_change = self.notify_databases_changed
        # One TLS context for every pull: loading the CA bundle costs tens of milliseconds,
        # more than a pull whose layers are all in the layer cache.
        try:
            self._tls = httpx.create_ssl_context(
                verify=str(self.settings.ca_file) if self.settings.ca_file else True
            )
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"CA bundle {self.settings.ca_file}: {exc}") from None
        # ValueError naming --layer-cache-dir when it cannot be written.
        self.layer_cache = (
            LayerCache(self.settings.layer_cache_dir, self.settings.layer_cache_size)
            if self.settings.layer_cache_dir is not None
            else None
        )
        self._credentials, grants = self._read_credentials()
        self.policy = self.settings.policy.with_grants(grants)
        # One guard for every job: it resolves the handler's address once.
        self.guard = self.policy.guard()

    @property
    def db(self) -> LoadedDatabases:
        """The databases in use now (a live update replaces them between jobs)."""
        return self.keeper.current

    def databases(self) -> Sequence[Database]:
        return self.db.versions()

    async def refresh_databases(self) -> bool:
        return await self.keeper.refresh()

    async def run_background(self) -> None:
        await self.keeper.run()

    # ---- the job ----------------------------------------------------------------------------

    async def scan(self, job: Job, progress: ProgressReporter) -> common_pb2.ScanResult:
        # Between jobs: a database replaced by `image-scanner db update` is taken into use.
        await self.keeper.refresh()
        root = self.scratch_root
        if job.kind is Kind.ARTIFACT and job.object.artifact.sbom:
            # An SBOM is matched as it is (a rematch of a stored one, at every database
            # update): nothing to download or unpack, so no scratch directory is made; a
            # scratch directory that vanished still stops the scanner (the next image could
            # not be scanned), as a failed mkdtemp would.
            if not os.path.isdir(root):  # noqa: ASYNC240 (one stat: a thread hop costs more)
                found = scratch_space.problem(root, self.settings.min_free_scratch)
                raise ScannerBroken(f"--scratch-dir {root} {found or 'is not a directory'}")
            self.policy.check_job(job)
            policies = frozenset(job.policies) or frozenset(Policy)
            return self._sbom_result(job.object.artifact, policies)
        try:
            workdir = Path(tempfile.mkdtemp(prefix="image-scanner-", dir=root))
        except OSError as exc:
            found = scratch_space.problem(root, self.settings.min_free_scratch)
            raise ScannerBroken(
                f"--scratch-dir {root} {found or f'refuses a scan directory: {exc.strerror}'}"
            ) from exc
        try:
            return await self._scan_in(workdir, job, progress)
        except (OSError, ScanFailure) as exc:
            if isinstance(exc, ScanFailure) and exc.permanent:
                raise  # the job's own fault
            # This scan's files are gone: what is wrong now is the scanner's, not the job's.
            found = await asyncio.to_thread(
                scratch_space.problem, root, self.settings.min_free_scratch
            )
            if found is not None:
                raise ScannerBroken(f"--scratch-dir {root} {found}") from exc
            raise

    async def _scan_in(
        self, scratch: Path, job: Job, progress: ProgressReporter
    ) -> common_pb2.ScanResult:
        policies = frozenset(job.policies) or frozenset(Policy)
        token = CancelToken()
        report = _ThreadProgress(asyncio.get_running_loop(), progress)
        # The job policy before anything is opened or connected to (HNDL-005 when refused).
        grant = self.policy.check_job(job)
        try:
            kind = job.kind
            if kind is Kind.IMAGE:
                result = await self._scan_image(
                    job.object.image, policies, token, report, scratch, grant
                )
            elif kind is Kind.NODE:
                result = await self._scan_node(job.object.node, policies, token, report)
            elif kind is Kind.ARTIFACT:
                result = await self._scan_artifact(
                    job.object.artifact, policies, token, report, scratch
                )
            else:
                raise ScanFailure("the job names no object", code="HNDL-005", permanent=True)
            progress.report("report", 100)
            return result
        finally:
            token.cancel()
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, scratch, True))

    async def _in_thread(self, token: CancelToken, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a worker thread; on cancellation, the token stops it and the
        thread is waited for (so that scratch space is not removed under it)."""
        task = asyncio.ensure_future(asyncio.to_thread(function, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            token.cancel()
            await asyncio.wait({task}, timeout=THREAD_STOP_WAIT)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: Cancelled is expected here
            raise
        except Cancelled:
            raise asyncio.CancelledError() from None

    # ---- images -----------------------------------------------------------------------------

    async def _scan_image(
        self,
        image: common_pb2.ImageObject,
        policies: frozenset[Policy],
        token: CancelToken,
        report: _ThreadProgress,
        scratch: Path,
        grant: Grant | None = None,
    ) -> common_pb2.ScanResult:
        proxy = image.proxy_url or self.settings.proxy_url
        check_proxy_url(proxy)
        registry = image.registry or "docker.io"
        repository = image.repository
        if registry == "docker.io" and "/" not in repository:
            repository = f"library/{repository}"
        reference = image.digest or image.tag or "latest"
        report("pull", 0, f"{registry}/{repository}:{reference}")

        def on_bytes(done: int, total: int) -> None:
            report("pull", 40 * done // max(total, 1))

        cache = self.layer_cache
        keys: list[str] = []
        records: dict[int, LayerRecord] = {}

        async def cached(digests: list[str]) -> frozenset[int]:
            """The layers the cache has (their records kept for the analysis)."""
            assert cache is not None
            profile = self._cache_profile(policies)
            keys.extend(cache.key(chain, profile) for chain in layer_cache.chain_ids(digests))

            def lookup() -> dict[int, LayerRecord]:
                found = {}
                for index, key in enumerate(keys):
                    record = cache.get(key)
                    if record is not None:
                        found[index] = record
                return found

            records.update(await asyncio.to_thread(lookup))
            return frozenset(records)

        async with RegistryClient(
            registry,
            credentials=self._credentials_for(image.credentials_ref),
            proxy=proxy,
            insecure=registry in self.settings.insecure_registries,
            limits=self.settings.limits,
            timeout=self.settings.registry_timeout,
            verify=self._tls,
            guard=self.guard,
            grant=grant,
            trusted_proxy=self.settings.proxy_url,
        ) as client:
            pulled = await client.pull(
                repository,
                reference,
                scratch / "blobs",
                self.platform,
                on_bytes,
                skip=cached if cache is not None else None,
            )
        subject = f"{registry}/{repository}" + (f":{image.tag}" if image.tag else "")
        subject += f"@{pulled.manifest_digest}"
        return await self._in_thread(
            token,
            self._analyse_image,
            pulled,
            subject,
            policies,
            token,
            report,
            scratch,
            keys,
            records,
        )

    def _cache_profile(self, policies: frozenset[Policy]) -> str:
        """What the layer cache's keys hold besides the layers: what is read and matched."""
        analyser = self._analyser(policies)
        rules = sorted(
            f"{entry.name}={entry.version}"
            for entry in self.db.entries.values()
            if entry.name != "vulnerabilities"
        )
        rules.append("secrets=" + hashlib.sha256(secrets.RULES.encode()).hexdigest()[:16])
        return layer_cache.profile(
            analyser.namespaces, ",".join(rules), self.settings.limits.max_match_bytes
        )

    def _analyse_image(
        self,
        pulled: PulledImage,
        subject: str,
        policies: frozenset[Policy],
        token: CancelToken,
        report: _ThreadProgress,
        scratch: Path,
        keys: Sequence[str] = (),
        records: dict[int, LayerRecord] | None = None,
    ) -> common_pb2.ScanResult:
        """The image's findings, its layers applied in order: a layer the cache had
        (``records``, by index) is replayed from its record, any other is read from its blob
        (and recorded under ``keys[index]`` when there is a cache)."""
        tree = ImageTree(self.settings.limits)
        analyser = self._analyser(policies)
        total = sum(layer.size for layer in pulled.layers) or 1
        done = 0
        records = records or {}
        cache = self.layer_cache if keys else None
        # (type, name, version) -> the layer that first had it, for OS packages.
        first_seen: dict[tuple[str, str, str], str] = {}
        for index, layer in enumerate(pulled.layers):
            token.check()
            base = done

            def on_bytes(position: int, base: int = base) -> None:
                report("unpack", 40 + 30 * (base + position) // total)

            record = records.get(index)
            if record is not None:
                try:
                    tree.replay(record, layer.digest, token, analyser)
                except StaleRecord as exc:
                    assert cache is not None
                    cache.drop(keys[index])
                    raise ScanFailure(
                        f"layer cache entry of {layer.digest} did not fit ({exc}): dropped, "
                        "the next run reads the layer",
                        code="HNDL-007",
                    ) from None
            else:
                fresh = LayerRecord() if cache is not None else None
                tree.apply(layer.path, layer.digest, token, analyser, on_bytes, record=fresh)
                if cache is not None and fresh is not None:
                    cache.put(keys[index], fresh)
            done += layer.size
            if layer.owned:
                layer.path.unlink(missing_ok=True)
            if any(files.os_database(rel) for rel in tree.changed):
                inventory = catalog.os_inventory(tree, catalog.distro_of(tree), owned=False)
                for package in inventory.packages:
                    first_seen.setdefault(
                        (package.type, package.name, package.version), layer.digest
                    )
        report("analyse", 70)
        facts = ((rel, node.layer, node.facts) for rel, node in tree.files() if node.facts)
        findings = self._findings(tree, facts, tree.origin, first_seen)
        if Policy.MISCONFIGURATIONS in policies:
            findings.misconfigurations.extend(image_misconfigurations(pulled.config))
            for skipped in tree.skipped:
                if skipped.escapes:
                    findings.misconfigurations.append(
                        common_pb2.Misconfiguration(
                            id="IH-LAYER-001",
                            title=f"Layer entry escapes the image root and was not written "
                            f"({skipped.reason}; layer {skipped.layer})",
                            severity=common_pb2.SEVERITY_HIGH,
                            path=skipped.path,
                        )
                    )
        if Policy.SECRETS in policies:
            findings.secrets.extend(self._config_secrets(pulled.config))
        return self._result(findings, subject, "image", policies)

    def _config_secrets(self, config: dict[str, Any]) -> list[common_pb2.Secret]:
        env = (config.get("config") or {}).get("Env") or []
        found = []
        for index, variable in enumerate(env if isinstance(env, list) else []):
            data = str(variable).encode()
            hits = self.db.signatures.match_data(data, frozenset({secrets.NAMESPACE}))
            for hit, _offset in malware.confirmed_secrets(hits, data):
                found.append(malware.secret_finding(hit, f"image config Env[{index}]", 1))
        return found

    # ---- nodes ------------------------------------------------------------------------------

    async def _scan_node(
        self,
        node: common_pb2.NodeObject,
        policies: frozenset[Policy],
        token: CancelToken,
        report: _ThreadProgress,
    ) -> common_pb2.ScanResult:
        if not node.root_path:
            # Not "/": that is this scanner's own filesystem, not the node's.
            raise ScanFailure(
                "node.root_path is empty: the job must name where the node's filesystem is "
                "mounted on this scanner",
                code="HNDL-005",
                permanent=True,
            )
        try:
            # The root with its links resolved, checked against --node-roots: that is what is
            # read, not the path as the job wrote it.
            root = resolved_path(self.policy.rules.node_roots, node.root_path, "node.root_path")
        except Refused as refused:
            raise policy_failure(refused) from None

        def analyse() -> common_pb2.ScanResult:
            if not root.is_absolute() or not root.is_dir():
                raise ScanFailure(
                    f"node root {str(root)!r} is not a directory on this scanner",
                    code="HNDL-005",
                    permanent=True,
                )
            rootfs = Rootfs(root, self.settings.limits)
            findings = self._analyse_root(rootfs, policies, token, report, skip=NODE_SKIP)
            if Policy.MISCONFIGURATIONS in policies:
                findings.misconfigurations.extend(node_misconfigurations(rootfs))
            subject = f"{node.cluster}/{node.node_name}" if node.cluster else node.node_name
            return self._result(findings, subject, "node", policies)

        report("analyse", 0, str(root))
        return await self._in_thread(token, analyse)

    # ---- artifacts --------------------------------------------------------------------------

    async def _scan_artifact(
        self,
        artifact: common_pb2.ArtifactObject,
        policies: frozenset[Policy],
        token: CancelToken,
        report: _ThreadProgress,
        scratch: Path,
    ) -> common_pb2.ScanResult:
        subject = artifact.path or artifact.url or f"{artifact.pipeline}/{artifact.job}"
        if artifact.sbom:
            return self._sbom_result(artifact, policies)
        if artifact.path:
            try:
                path = resolved_path(
                    self.policy.rules.artifact_roots, artifact.path, "artifact.path"
                )
            except Refused as refused:
                raise policy_failure(refused) from None
        elif artifact.url.startswith("oci://"):
            return await self._scan_image(_oci_url(artifact.url), policies, token, report, scratch)
        else:
            path = await self._download(artifact.url, scratch / "download", report)
        return await self._in_thread(
            token, self._analyse_path, path, subject, policies, token, report, scratch
        )

    def _sbom_result(
        self, artifact: common_pb2.ArtifactObject, policies: frozenset[Policy]
    ) -> common_pb2.ScanResult:
        subject = artifact.path or artifact.url or f"{artifact.pipeline}/{artifact.job}"
        if artifact.sbom_format not in ("", sbom.FORMAT, "cyclonedx"):
            raise ScanFailure(
                f"SBOM format {artifact.sbom_format!r} is not supported ({sbom.FORMAT})",
                code="HNDL-005",
                permanent=True,
            )
        packages = sbom.packages_from_cyclonedx(artifact.sbom)
        return self._result(Findings(packages=packages), subject, "artifact", policies, False)

    async def _download(self, url: str, dest: Path, report: _ThreadProgress) -> Path:
        if not url.startswith(("http://", "https://")):
            raise ScanFailure(
                f"artifact URL {url!r}: only http(s):// and oci:// are fetched",
                code="HNDL-005",
                permanent=True,
            )
        try:
            checked = self.policy.rules.egress.check_artifact_url(url)
            # What httpx will connect to must be what was checked.
            sent = httpx.URL(url)
            if (sent.scheme, sent.host.rstrip(".")) != (checked.scheme, checked.host.strip("[]")):
                raise Refused("url", f"artifact.url {url[:200]!r} parses ambiguously")
        except Refused as refused:
            raise policy_failure(refused) from None
        except httpx.InvalidURL as exc:
            raise ScanFailure(
                f"artifact URL {url!r}: {exc}", code="HNDL-005", permanent=True
            ) from None
        proxy = self.settings.proxy_url
        limit = self.settings.limits.max_layer_bytes
        report("pull", 0, url)
        try:
            async with (
                guarded_client(
                    self.guard,
                    proxy=proxy,
                    trusted_proxy=proxy,
                    timeout=self.settings.registry_timeout,
                ) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise ScanFailure(
                        f"artifact URL {url} answered {response.status_code}",
                        permanent=400 <= response.status_code < 500,
                    )
                written = 0
                out = await asyncio.to_thread(open, dest, "wb")
                try:
                    async for chunk in response.aiter_bytes(1 << 20):
                        written += len(chunk)
                        if written > limit:
                            raise too_large(f"artifact {url}", limit)
                        await asyncio.to_thread(out.write, chunk)
                finally:
                    await asyncio.to_thread(out.close)
        except Refused as refused:  # the URL, a redirect, or where either resolves
            raise policy_failure(refused) from None
        except httpx.TransportError as exc:
            raise ScanFailure(f"cannot fetch {url}: {exc}") from None
        return dest

    def _analyse_path(
        self,
        path: Path,
        subject: str,
        policies: frozenset[Policy],
        token: CancelToken,
        report: _ThreadProgress,
        scratch: Path,
    ) -> common_pb2.ScanResult:
        limits = self.settings.limits
        if not path.is_absolute() or not path.exists():
            raise ScanFailure(
                f"artifact path {str(path)!r} does not exist on this scanner",
                code="HNDL-005",
                permanent=True,
            )
        if images.is_oci_layout(path):
            pulled = images.read_oci_layout(path, self.platform, limits)
            return self._analyse_image(pulled, subject, policies, token, report, scratch)
        if path.is_dir():
            findings = self._analyse_root(Rootfs(path, limits), policies, token, report)
            return self._result(findings, subject, "artifact", policies)
        kind = images.archive_kind(path)
        if kind == "docker-archive":
            pulled = images.read_docker_archive(path, scratch / "archive", limits)
            return self._analyse_image(pulled, subject, policies, token, report, scratch)
        if kind == "oci-archive":
            layout = images.unpack_oci_archive(path, scratch / "layout", limits)
            pulled = images.read_oci_layout(layout, self.platform, limits)
            return self._analyse_image(pulled, subject, policies, token, report, scratch)
        digest = "sha256:" + malware.sha256_file(path)
        if kind == "tar" or path.name.endswith((".tar.zst", ".tzst")):
            tree = ImageTree(limits)
            tree.apply(path, digest, token, self._analyser(policies))
            facts = ((rel, node.layer, node.facts) for rel, node in tree.files() if node.facts)
            findings = self._findings(tree, facts, tree.origin)
            return self._result(findings, subject, "artifact", policies)
        size = path.stat().st_size
        if size <= limits.max_document_bytes:
            with open(path, "rb") as handle:
                head = handle.read(4096)
            if head.lstrip().startswith(b"{") and b'"bomFormat"' in head:
                packages = sbom.packages_from_cyclonedx(path.read_bytes())
                return self._result(
                    Findings(packages=packages), subject, "artifact", policies, False
                )
        # One file: scanned in a scratch directory that holds only a copy of it.
        single = scratch / "file"
        single.mkdir(parents=True)
        shutil.copyfile(path, single / path.name)
        findings = self._analyse_root(Rootfs(single, limits), policies, token, report)
        for found in findings.malware:
            found.path = str(path)
        for secret in findings.secrets:
            secret.path = str(path)
        return self._result(findings, subject, "artifact", policies)

    # ---- analysis of a root -----------------------------------------------------------------

    def _analyser(self, policies: frozenset[Policy]) -> FileAnalyser:
        namespaces = frozenset(
            namespace
            for policy, namespace in (
                (Policy.MALWARE, malware.MALWARE),
                (Policy.SECRETS, secrets.NAMESPACE),
            )
            if policy in policies
        )
        return FileAnalyser(self.db.signatures, namespaces, self.settings.limits)

    def _analyse_root(
        self,
        rootfs: Rootfs,
        policies: frozenset[Policy],
        token: CancelToken,
        report: _ThreadProgress,
        *,
        skip: frozenset[str] = frozenset(),
    ) -> Findings:
        """One pass over a directory's files: each file is read at most once, and only when
        the analyser wants it."""
        analyser = self._analyser(policies)
        report("analyse", 70)

        def facts() -> Iterator[tuple[str, str, FileFacts]]:
            for count, (rel, info) in enumerate(rootfs.walk(token, skip=skip)):
                if count % 256 == 0:
                    token.check()
                    report("analyse", min(95, 70 + count // 2000))
                if not analyser.wants(rel, info.st_size, info.st_mode) & files.READ:
                    continue
                data = rootfs.read(rel, catalog.MAX_CATALOG_BYTES)
                if data is not None:
                    found = analyser.analyse(rel, data)
                    if found:
                        yield rel, "", found

        return self._findings(rootfs, facts(), rootfs.origin)

    def _findings(
        self,
        tree: catalog.Tree,
        facts: Iterable[tuple[str, str, FileFacts]],
        origin: Callable[[str], str],
        first_seen: dict[tuple[str, str, str], str] | None = None,
    ) -> Findings:
        """The findings of a root: its OS packages (each with the layer that first had it),
        and the facts of its files (each with the layer of the file)."""
        findings = Findings(distro=catalog.distro_of(tree))
        inventory = catalog.os_inventory(tree, findings.distro)
        for note in inventory.notes:
            log.warning("inventory", problem=note)
        for package in inventory.packages:
            key = (package.type, package.name, package.version)
            layer = (first_seen or {}).get(key) or origin(package.path)
            findings.packages.append(package.with_layer(layer))
        language: list[Package] = []
        for rel, layer, found in facts:
            language += [p.with_layer(layer) for p in found.packages]
            for hit, digest in found.malware:
                findings.malware.append(malware.malware_finding(hit, "/" + rel, digest, layer))
            for hit, line in found.secrets:
                findings.secrets.append(malware.secret_finding(hit, "/" + rel, line))
        findings.packages += catalog.mark_os_owned(language, inventory.owned, tree)
        return findings

    # ---- the result -------------------------------------------------------------------------

    def _result(
        self,
        findings: Findings,
        subject: str,
        kind: str,
        policies: frozenset[Policy],
        with_sbom: bool = True,
    ) -> common_pb2.ScanResult:
        # One database for the whole result, even if an update lands meanwhile.
        db = self.db
        result = common_pb2.ScanResult(databases=[d.to_proto() for d in db.versions()])
        if Policy.VULNERABILITIES in policies:
            report = matcher.match(db.vulnerabilities, findings.packages)
            seen: set[tuple[str, tuple[str, str, str, str]]] = set()
            for found in report.findings:
                package = found.package
                if (found.id, package.key) in seen:
                    continue  # the same package listed twice (dpkg status and status.d)
                seen.add((found.id, package.key))
                result.vulnerabilities.append(
                    common_pb2.Vulnerability(
                        id=found.id,
                        aliases=found.aliases,
                        package=package.name,
                        installed_version=package.version,
                        fixed_version=found.fixed,
                        severity=found.severity,
                        path="/" + package.path
                        if not package.path.startswith("sbom:")
                        else package.path,
                        layer_digest=package.layer,
                        title=found.title,
                    )
                )
            result.notes.extend(note.to_proto() for note in report.notes)
        result.vulnerabilities.sort(key=lambda v: (-v.severity, v.id, v.package, v.path))
        result.malware.extend(sorted(findings.malware, key=lambda m: (m.path, m.name)))
        result.secrets.extend(sorted(findings.secrets, key=lambda s: (s.path, s.line, s.rule_id)))
        result.misconfigurations.extend(findings.misconfigurations)
        if with_sbom:
            result.sbom = sbom.build(subject, kind, findings.packages, findings.distro)
            result.sbom_format = sbom.FORMAT
        failing = (
            any(v.severity >= common_pb2.SEVERITY_HIGH for v in result.vulnerabilities)
            or bool(result.malware)
            or bool(result.secrets)
        )
        result.verdict = common_pb2.VERDICT_FAILED if failing else common_pb2.VERDICT_PASSED
        return result

    # ---- credentials ------------------------------------------------------------------------

    def _read_credentials(self) -> tuple[dict[str, Credentials], dict[str, Grant]]:
        """The credentials by ref, and their grants: each entry's own ``registries`` and
        ``allowed``, else the policy's --credential-grants entry. A credential without a grant
        stops the scanner: it would be usable by every submitter for every registry."""
        granted = dict(self.settings.policy.rules.grants.by_ref)
        path = self.settings.credentials_file
        if path is None:
            return {}, granted
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"credentials file {path}: {exc}") from None
        if not isinstance(document, dict):
            raise ValueError(f"credentials file {path}: expected an object of references")
        found = {}
        for ref, value in document.items():
            if not isinstance(value, dict):
                raise ValueError(f"credentials file {path}: {ref!r} must be an object")
            found[str(ref)] = Credentials(
                username=str(value.get("username", "")),
                password=str(value.get("password", "")),
                token=str(value.get("token", "")),
            )
            own = any(key in value for key in GRANT_KEYS)
            if own and ref in granted:
                raise ValueError(
                    f"credentials file {path}: {ref!r} is granted both here and in "
                    "--credential-grants; keep one"
                )
            if own:
                granted[str(ref)] = parse_grant(str(ref), value, f"credentials file {path}")
            elif ref not in granted:
                raise ValueError(
                    f"credentials file {path}: {ref!r} names no registries and allowed "
                    'callers: add "registries": [...] and "allowed": [...] (token names, '
                    '"role:ROLE" or "*") to it, or grant it in --credential-grants'
                )
        return found, granted

    def _credentials_for(self, ref: str) -> Credentials | None:
        if not ref:
            return None
        try:
            return self._credentials[ref]
        except KeyError:
            raise ScanFailure(
                f"credentials_ref {ref!r} is not known to this scanner (--credentials-file)",
                code="HNDL-005",
                permanent=True,
            ) from None


def _oci_url(url: str) -> common_pb2.ImageObject:
    """``oci://REGISTRY/REPOSITORY[:TAG][@DIGEST]`` as an image object."""
    rest = url.removeprefix("oci://")
    registry, _, name = rest.partition("/")
    name, _, digest = name.partition("@")
    repository, _, tag = name.rpartition(":") if ":" in name else (name, "", "")
    if not registry or not repository:
        raise ScanFailure(
            f"artifact URL {url!r} is not oci://REGISTRY/REPO[:TAG][@DIGEST]",
            code="HNDL-005",
            permanent=True,
        )
    return common_pb2.ImageObject(registry=registry, repository=repository, tag=tag, digest=digest)


def image_misconfigurations(config: dict[str, Any]) -> list[common_pb2.Misconfiguration]:
    settings = config.get("config") or {}
    found = []
    user = str(settings.get("User") or "")
    if user in ROOT_USERS:
        found.append(
            common_pb2.Misconfiguration(
                id="IH-IMG-001",
                title="The image runs as root: set a non-root USER",
                severity=common_pb2.SEVERITY_HIGH,
                path="image config User",
            )
        )
    if not settings.get("Healthcheck"):
        found.append(
            common_pb2.Misconfiguration(
                id="IH-IMG-002",
                title="The image has no HEALTHCHECK",
                severity=common_pb2.SEVERITY_LOW,
                path="image config Healthcheck",
            )
        )
    return found


def node_misconfigurations(rootfs: Rootfs) -> list[common_pb2.Misconfiguration]:
    found = []
    sshd = rootfs.read("etc/ssh/sshd_config")
    if sshd is not None:
        for line in sshd.decode("utf-8", "replace").splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].lower() == "permitrootlogin" and words[1] == "yes":
                found.append(
                    common_pb2.Misconfiguration(
                        id="IH-NODE-001",
                        title="sshd allows root to log in with a password (PermitRootLogin yes)",
                        severity=common_pb2.SEVERITY_HIGH,
                        path="/etc/ssh/sshd_config",
                    )
                )
                break
    shadow = rootfs.resolve("etc/shadow")
    if shadow:
        with contextlib.suppress(OSError):
            if os.lstat(rootfs.path(shadow)).st_mode & stat.S_IROTH:
                found.append(
                    common_pb2.Misconfiguration(
                        id="IH-NODE-002",
                        title="/etc/shadow is readable by every user",
                        severity=common_pb2.SEVERITY_HIGH,
                        path="/etc/shadow",
                    )
                )
    return found
