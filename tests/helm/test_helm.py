"""The Helm chart, fully offline: Helm v4 as a library (helm-python-sdk) lints and renders it for
the default values and several realistic value sets, and kubernetes-validate checks every
rendered manifest against the Kubernetes 1.30 schemas in strict mode (unknown fields fail).

The settings a value set gives must reach the containers: the test reads each container's
effective environment (its ConfigMap through envFrom, then env) and hands it to the handler's
and the scanner's own argument parsers, so a misspelt variable or a value the program cannot
read fails here, not in a cluster.
"""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from imagehandler.jobpolicy import parse_grants
from scanner_client import cli as scanner_cli
from scanner_client.engine import Kind
from scanner_client.engine import Policy as ScannerPolicy
from server import config as handler_config
from server.core.model import Policy
from tests.paths import ROOT

CHART = ROOT / "helm" / "image-handler"
KUBE_VERSION = "1.30.0"
RELEASE = "ih"
NAMESPACE = "scans"
FULLNAME = "ih-image-handler"
DIGEST = "sha256:" + "ab" * 32

Manifest = dict[str, Any]

PRODUCTION: dict[str, Any] = {
    "image": {"repository": "registry.example.com/sec/image-handler", "digest": DIGEST},
    "imagePullSecrets": [{"name": "registry-pull"}],
    "commonLabels": {"team": "security"},
    "handler": {
        "resultWorkers": 25,
        "queueLimit": 1_000_000,
        "maxRuns": 5,
        "timeouts": {
            "defaultMaxRunTime": 3600,
            "resultWait": 120.5,
            "heartbeatInterval": 2,
            "heartbeatTimeout": 10,
            "gracePeriod": 120,
        },
        "lanes": {"interactiveShare": 0.6},
        "defaultPolicies": ["vulnerabilities", "secrets"],
        "timezone": "Europe/Moscow",
        "logLevel": "warning",
        "storage": {"fsync": "always", "snapshotInterval": 60, "snapshotJournalMb": 128},
        "retention": {"days": 30},
        "extraConfig": {"max_result_bytes": 67108864, "token_reload_interval": 2.5},
        "extraArgs": ["--max-batch", "500"],
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "persistence": {"size": "20Gi", "storageClassName": "fast-ssd"},
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "podDisruptionBudget": {"enabled": True},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "scan"}],
        "priorityClassName": "high",
        "podAnnotations": {"example.com/owner": "security"},
    },
    "scanner": {
        "replicaCount": 5,
        "slots": 8,
        "kinds": ["image", "artifact"],
        "policies": ["vulnerabilities", "malware"],
        "proxyUrl": "http://proxy.internal:3128",
        "logLevel": "debug",
        "tmpSizeLimit": "10Gi",
        "layerCache": {"enabled": True, "sizeMiB": 4096},
        "podDisruptionBudget": {"maxUnavailable": "25%"},
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {
                                "matchLabels": {"app.kubernetes.io/component": "scanner"}
                            },
                        },
                    }
                ]
            }
        },
    },
    "jobPolicy": {
        "allowedRegistries": ["*", "harbor.scans.svc:8443"],
        "allowedArtifactUrls": ["https://artifacts.example.com/ci/"],
        "allowedNetworks": ["10.96.0.0/12"],
        "artifactRoots": ["/artifacts"],
        "nodeRoots": ["/host"],
        "credentialGrants": {
            "team-a-harbor": {
                "registries": ["harbor.scans.svc:8443"],
                "allowed": ["ci-team-a", "role:admin"],
            }
        },
        "credentialsSecret": "ih-pull-credentials",
    },
    "secrets": {
        "handlerEnv": {"IMAGE_HANDLER_RECEIVER_SECRET": {"name": "ih-webhook", "key": "secret"}},
        "scannerEnv": {"IMAGE_SCANNER_TOKEN": {"name": "ih-tokens", "key": "scanner"}},
        "handlerFiles": [{"name": "ih-tokens", "mountPath": "/etc/image-handler/tokens"}],
    },
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    },
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "production": PRODUCTION,
    "autoscaled-scanners": {
        "scanner": {
            "autoscaling": {
                "enabled": True,
                "minReplicas": 3,
                "maxReplicas": 30,
                "targetMemoryUtilizationPercentage": 80,
            }
        },
        "handler": {"grpcPort": 6000},
        "metrics": {"port": 9100, "service": {"scrapeAnnotations": False}},
    },
    "tls-with-health-port": {
        "handler": {
            "healthPort": 50052,
            "extraConfig": {
                "tls_cert": "/etc/image-handler/tls/tls.crt",
                "tls_key": "/etc/image-handler/tls/tls.key",
                "client_ca": "/etc/image-handler/tls/ca.crt",
                "token_file": "/etc/image-handler/tokens/tokens",
            },
        },
        "secrets": {
            "handlerFiles": [
                {"name": "image-handler-tls", "mountPath": "/etc/image-handler/tls"},
                {"name": "image-handler-tokens", "mountPath": "/etc/image-handler/tokens"},
            ],
        },
    },
    "handler-only-in-memory": {
        "fullnameOverride": "scanq",
        "handler": {
            "storage": {"backend": "memory"},
            "persistence": {"enabled": False},
            "tmpSizeLimit": "",
            "reflection": False,
            "defaultPolicies": [],
            "logFormat": "console",
        },
        "metrics": {"enabled": False},
        "scanner": {"enabled": False},
        "serviceAccount": {"create": False, "name": "scanners"},
        "networkPolicy": {"enabled": True, "grpcFrom": []},
    },
}


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def container(workload: Manifest) -> Manifest:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def environment(docs: list[Manifest], workload: Manifest) -> dict[str, str]:
    """The container's plain environment: its ConfigMaps (envFrom), then env values."""
    c = container(workload)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, manifests(render(VALUE_SETS[request.param]))


@pytest.fixture(scope="module")
def production() -> list[Manifest]:
    return manifests(render(PRODUCTION))


@pytest.fixture(scope="module")
def defaults() -> list[Manifest]:
    return manifests(render())


# ----- lint and validate -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_strict(name: str) -> None:
    report = helm.lint(
        CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION
    )
    # Severity 1 is information (Helm suggests an icon); warnings (2) and errors (3) fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems
    assert report["errors"] == []
    assert report["total_charts_linted"] == 1


def test_every_manifest_validates_strictly(value_set: tuple[str, list[Manifest]]) -> None:
    name, docs = value_set
    assert docs, name
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_validator_is_strict(defaults: list[Manifest]) -> None:
    """A field Kubernetes does not know must fail, or the test above proves nothing."""
    statefulset = copy.deepcopy(find(defaults, "StatefulSet", FULLNAME))
    container(statefulset)["livenessProbe"]["grpc"]["portt"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBE_VERSION, strict=True)


def test_default_objects(defaults: list[Manifest]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in defaults)
    assert kinds == [
        ("ConfigMap", FULLNAME),
        ("ConfigMap", f"{FULLNAME}-scanner"),
        ("Deployment", f"{FULLNAME}-scanner"),
        ("NetworkPolicy", FULLNAME),
        ("NetworkPolicy", f"{FULLNAME}-scanner"),
        ("PodDisruptionBudget", f"{FULLNAME}-scanner"),
        ("Service", FULLNAME),
        ("Service", f"{FULLNAME}-headless"),
        ("Service", f"{FULLNAME}-metrics"),
        ("ServiceAccount", FULLNAME),
        ("StatefulSet", FULLNAME),
    ]
    for doc in defaults:
        assert doc["metadata"]["namespace"] == NAMESPACE


# ----- the handler: one replica, its volume, its probes ------------------------------------


def test_handler_is_one_replica_with_a_data_volume(defaults: list[Manifest]) -> None:
    statefulset = find(defaults, "StatefulSet", FULLNAME)
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    assert spec["serviceName"] == f"{FULLNAME}-headless"
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    mounts = {m["name"]: m["mountPath"] for m in container(statefulset)["volumeMounts"]}
    assert mounts == {"data": "/data", "tmp": "/tmp"}
    assert environment(defaults, statefulset)["IMAGE_HANDLER_DATA_DIR"] == "/data"


def test_more_handler_replicas_are_refused_with_the_reason() -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render({"handler": {"replicaCount": 3}})
    message = str(caught.value)
    assert "handler.replicaCount is 3" in message
    assert "ONE replica" in message
    assert "shared (PostgreSQL) backend" in message


POSTGRES = {
    "handler": {
        "replicaCount": 3,
        "storage": {"backend": "postgres", "database": {"urlSecret": "handler-db"}},
    }
}


def test_postgres_makes_the_handler_a_deployment_of_replicas() -> None:
    docs = manifests(render(POSTGRES))
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    deployment = find(docs, "Deployment", FULLNAME)
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert "volumeClaimTemplates" not in spec
    pod = spec["template"]["spec"]
    assert all("persistentVolumeClaim" not in volume for volume in pod["volumes"])
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (url,) = [e for e in container(deployment)["env"] if e["name"] == "IMAGE_HANDLER_DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "handler-db", "key": "url"}
    env = environment(docs, deployment)
    assert env["IMAGE_HANDLER_STORAGE"] == "postgres"
    assert env["IMAGE_HANDLER_DATABASE_SCHEMA"] == "imagehandler"
    budget = find(docs, "PodDisruptionBudget", FULLNAME)
    assert budget["spec"]["minAvailable"] == 1
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_postgres_needs_the_url_secret() -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render({"handler": {"storage": {"backend": "postgres"}}})
    assert "handler.storage.database.urlSecret" in str(caught.value)


def test_notes_say_one_replica_and_how_to_reach_it() -> None:
    notes = render()["image-handler/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{FULLNAME} 50051:50051" in notes
    assert "grpcurl -plaintext localhost:50051 list" in notes
    assert "grpc.health.v1.Health/Check" in notes
    assert "imagehandler.v1.JobService/SubmitJob" in notes
    assert f"{FULLNAME}.{NAMESPACE}.svc:50051" in notes
    assert "ONE replica" in notes
    assert "shared (PostgreSQL) backend" in notes


@pytest.mark.parametrize("name", ["defaults", "autoscaled-scanners"])
def test_probes_are_native_grpc_on_the_grpc_port(name: str) -> None:
    docs = manifests(render(VALUE_SETS[name]))
    statefulset = find(docs, "StatefulSet", FULLNAME)
    c = container(statefulset)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    grpc_port = VALUE_SETS[name].get("handler", {}).get("grpcPort", 50051)
    assert ports["grpc"] == grpc_port
    assert c["readinessProbe"]["grpc"] == {
        "port": grpc_port,
        "service": "imagehandler.v1.JobService",
    }
    assert c["livenessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    # The startup probe holds liveness off while recovery replays the journal.
    assert c["startupProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert environment(docs, statefulset)["IMAGE_HANDLER_LISTEN"] == f"0.0.0.0:{grpc_port}"
    service = find(docs, "Service", FULLNAME)
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (grpc_port, "grpc")
    scanner_env = environment(docs, find(docs, "Deployment", f"{FULLNAME}-scanner"))
    assert scanner_env["IMAGE_SCANNER_HANDLER"] == f"{FULLNAME}.{NAMESPACE}.svc:{grpc_port}"


def test_pods_run_non_root_on_a_read_only_root(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    for workload in (d for d in docs if d["kind"] in ("StatefulSet", "Deployment")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        context = container(workload)["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert "/tmp" in mounts


# ----- values reach the containers --------------------------------------------------------


def test_handler_settings_reach_the_handler(production: list[Manifest]) -> None:
    statefulset = find(production, "StatefulSet", FULLNAME)
    env = environment(production, statefulset)
    assert env["IMAGE_HANDLER_RESULT_WORKERS"] == "25"
    assert env["IMAGE_HANDLER_QUEUE_LIMIT"] == "1000000"  # not 1e+06
    assert env["IMAGE_HANDLER_RESULT_WAIT"] == "120.5"
    assert env["IMAGE_HANDLER_MAX_RESULT_BYTES"] == "67108864"  # not 6.7108864e+07
    assert env["IMAGE_HANDLER_TOKEN_RELOAD_INTERVAL"] == "2.5"
    assert env["TZ"] == "UTC"
    assert container(statefulset)["args"] == ["serve", "--max-batch", "500"]

    # The handler's own parser reads every variable, extraConfig's too.
    known = {k: v for k, v in env.items() if k.startswith("IMAGE_HANDLER_")}
    config = handler_config.parse(container(statefulset)["args"][1:], environ=known)
    assert config.max_result_bytes == 67_108_864
    assert config.token_reload_interval == 2.5
    assert config.result_workers == 25
    assert config.queue_limit == 1_000_000
    assert config.max_runs == 5
    assert config.max_batch == 500
    assert config.default_max_run_time == 3600
    assert config.result_wait == 120.5
    assert config.heartbeat_interval == 2
    assert config.heartbeat_timeout == 10
    assert config.grace_period == 120
    assert config.interactive_share == 0.6
    assert config.default_policies == (Policy.VULNERABILITIES, Policy.SECRETS)
    assert config.timezone == "Europe/Moscow"
    assert config.log_format == "json"
    assert config.log_level == "warning"
    assert config.fsync == "always"
    assert config.snapshot_interval == 60
    assert config.snapshot_journal_mb == 128
    assert config.retention_days == 30
    assert config.metrics_listen == "0.0.0.0:9090"
    assert str(config.data_dir) == "/data"
    assert config.listen == "0.0.0.0:50051"
    config.check()
    # SIGTERM's grace period fits in the pod's.
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.grace_period


# Read by the handler from its environment, not flags: secrets that must not sit in a ConfigMap.
ENVIRONMENT_ONLY = {"IMAGE_HANDLER_RECEIVER_SECRET"}


def test_every_handler_variable_is_a_handler_flag(value_set: tuple[str, list[Manifest]]) -> None:
    """No misspelt IMAGE_HANDLER_* variable, extraConfig and Secret-sourced ones included:
    each names a field of server.config.Config (or a secret the handler reads)."""
    _, docs = value_set
    statefulset = find(docs, "StatefulSet", docs_fullname(docs))
    env = environment(docs, statefulset)
    from_secrets = {item["name"] for item in container(statefulset).get("env", [])}
    flags = {"IMAGE_HANDLER_" + f.name.upper() for f in fields(handler_config.Config)}
    named = {k for k in {*env, *from_secrets} if k.startswith("IMAGE_HANDLER_")}
    assert not named - flags - ENVIRONMENT_ONLY
    plain = {k: v for k, v in env.items() if k.startswith("IMAGE_HANDLER_")}
    config = handler_config.parse([], environ=plain)
    if not config.tls_cert:  # TLS settings name files that exist only in the pod
        config.check()


def test_with_tls_the_probes_ask_a_plaintext_health_port() -> None:
    docs = manifests(render(VALUE_SETS["tls-with-health-port"]))
    statefulset = find(docs, "StatefulSet", FULLNAME)
    c = container(statefulset)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "health": 50052, "metrics": 9090}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == 50052, probe
    env = environment(docs, statefulset)
    config = handler_config.parse([], environ=env)
    assert config.health_listen == "0.0.0.0:50052"
    assert config.listen == "0.0.0.0:50051"
    assert config.tls_cert == "/etc/image-handler/tls/tls.crt"
    assert config.client_ca == "/etc/image-handler/tls/ca.crt"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/image-handler/tls", "/etc/image-handler/tokens"} <= mounts
    metrics = find(docs, "Service", f"{FULLNAME}-metrics")
    assert metrics["metadata"]["annotations"]["prometheus.io/scheme"] == "https"


def docs_fullname(docs: list[Manifest]) -> str:
    (statefulset,) = (d for d in docs if d["kind"] == "StatefulSet")
    return statefulset["metadata"]["name"]  # type: ignore[no-any-return]


def test_defaults_match_the_handlers_defaults(defaults: list[Manifest]) -> None:
    """The chart's defaults are the handler's, apart from what a pod needs."""
    env = environment(defaults, find(defaults, "StatefulSet", FULLNAME))
    config = handler_config.parse([], environ=env)
    built_in = handler_config.Config()
    differ = {
        f.name
        for f in fields(handler_config.Config)
        if getattr(config, f.name) != getattr(built_in, f.name)
    }
    assert differ == {"listen", "metrics_listen", "data_dir", "log_format"}


def test_scanner_settings_reach_the_scanners(production: list[Manifest]) -> None:
    deployment = find(production, "Deployment", f"{FULLNAME}-scanner")
    assert deployment["spec"]["replicas"] == 5
    c = container(deployment)
    assert c["command"] == ["image-scanner"]
    assert c["image"] == f"registry.example.com/sec/image-handler@{DIGEST}"
    env = environment(production, deployment)
    assert env["IMAGE_SCANNER_SLOTS"] == "8"
    settings = scanner_cli.parse_args([], env=env)
    assert settings.handler == f"{FULLNAME}.{NAMESPACE}.svc:50051"
    assert settings.engine == "noop"
    assert settings.slots == 8
    assert settings.kinds == frozenset({Kind.IMAGE, Kind.ARTIFACT})
    assert settings.policies == (ScannerPolicy.VULNERABILITIES, ScannerPolicy.MALWARE)
    assert settings.proxy_url == "http://proxy.internal:3128"
    assert settings.log_level == "debug"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "10Gi"}
    # The layer cache: a volume of its own, mounted where the flag points, room above its size.
    assert (settings.layer_cache_dir, settings.layer_cache_size) == (
        "/var/cache/image-scanner/layers",
        4096.0,
    )
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["layer-cache"] == settings.layer_cache_dir
    assert volumes["layer-cache"]["emptyDir"] == {"sizeLimit": "5120Mi"}


def test_the_layer_cache_is_off_by_default(defaults: list[Manifest]) -> None:
    deployment = find(defaults, "Deployment", f"{FULLNAME}-scanner")
    settings = scanner_cli.parse_args([], env=environment(defaults, deployment))
    assert settings.layer_cache_dir == ""
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "layer-cache" not in volumes


def test_the_job_policy_reaches_the_handler_and_the_scanners_alike(
    production: list[Manifest], defaults: list[Manifest]
) -> None:
    """One set of rules, parsed by the handler's and the scanner's own flag parsers; the grants
    in a ConfigMap both mount, the pull secrets on the scanners only."""
    statefulset = find(production, "StatefulSet", FULLNAME)
    deployment = find(production, "Deployment", f"{FULLNAME}-scanner")
    config = handler_config.parse([], environ=environment(production, statefulset))
    settings = scanner_cli.parse_args([], env=environment(production, deployment))
    for name in (
        "allowed_registries",
        "allowed_artifact_urls",
        "allowed_networks",
        "artifact_roots",
        "node_roots",
        "credential_grants",
    ):
        assert getattr(config, name) == getattr(settings, name), name
    assert config.allowed_registries == "*,harbor.scans.svc:8443"
    assert config.node_roots == "/host"
    assert config.credential_grants == "/etc/image-handler/grants/grants.json"
    assert settings.credentials_file == "/etc/image-handler/credentials/credentials.json"
    grants = find(production, "ConfigMap", f"{FULLNAME}-credential-grants")
    parsed = parse_grants(json.loads(grants["data"]["grants.json"]), "grants.json")
    assert parsed["team-a-harbor"].is_for("harbor.scans.svc:8443")
    assert parsed["team-a-harbor"].allowed == {"ci-team-a", "role:admin"}
    handler_mounts = {m["mountPath"] for m in container(statefulset)["volumeMounts"]}
    scanner_mounts = {m["mountPath"] for m in container(deployment)["volumeMounts"]}
    assert "/etc/image-handler/grants" in handler_mounts & scanner_mounts
    assert "/etc/image-handler/credentials" in scanner_mounts - handler_mounts
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"]["secretName"] == "ih-pull-credentials"
    # The defaults: any public registry, nothing else; the same on both sides.
    scanner_defaults = scanner_cli.parse_args(
        [], env=environment(defaults, find(defaults, "Deployment", f"{FULLNAME}-scanner"))
    )
    assert (scanner_defaults.allowed_registries, scanner_defaults.allowed_networks) == ("*", "")
    assert (scanner_defaults.artifact_roots, scanner_defaults.node_roots) == ("", "")
    assert not [d for d in defaults if d["metadata"]["name"].endswith("credential-grants")]


def test_secrets_are_referenced_never_embedded(production: list[Manifest]) -> None:
    assert not [d for d in production if d["kind"] == "Secret"]
    handler = container(find(production, "StatefulSet", FULLNAME))
    by_name = {e["name"]: e for e in handler["env"]}
    assert by_name["IMAGE_HANDLER_RECEIVER_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "ih-webhook", "key": "secret"}
    }
    (mount,) = [m for m in handler["volumeMounts"] if m["name"].startswith("secret-")]
    assert mount == {"name": "secret-0", "mountPath": "/etc/image-handler/tokens", "readOnly": True}
    scanner = container(find(production, "Deployment", f"{FULLNAME}-scanner"))
    assert scanner["env"] == [
        {
            "name": "IMAGE_SCANNER_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "ih-tokens", "key": "scanner"}},
        }
    ]


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any], kind: str, name: str) -> str:
        docs = manifests(render(values))
        annotations = find(docs, kind, name)["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/config"]  # type: ignore[no-any-return]

    handler = ("StatefulSet", FULLNAME)
    scanner = ("Deployment", f"{FULLNAME}-scanner")
    more_workers = {"handler": {"resultWorkers": 11}}
    assert checksum({}, *handler) != checksum(more_workers, *handler)
    assert checksum({}, *scanner) == checksum(more_workers, *scanner)
    assert checksum({}, *scanner) != checksum({"scanner": {"slots": 2}}, *scanner)
    # The job policy goes to both, its grants too (read at start).
    nodes = {"jobPolicy": {"nodeRoots": ["/host"]}}
    assert checksum({}, *handler) != checksum(nodes, *handler)
    assert checksum({}, *scanner) != checksum(nodes, *scanner)
    grant = {"registries": ["ghcr.io"], "allowed": ["ci"]}
    one, two = ({"jobPolicy": {"credentialGrants": {ref: grant}}} for ref in ("a", "b"))
    for kind, name in (handler, scanner):
        first = find(manifests(render(one)), kind, name)["spec"]["template"]["metadata"]
        second = find(manifests(render(two)), kind, name)["spec"]["template"]["metadata"]
        assert (
            first["annotations"]["checksum/credential-grants"]
            != second["annotations"]["checksum/credential-grants"]
        )


def test_metrics_port_service_and_annotations(production: list[Manifest]) -> None:
    statefulset = find(production, "StatefulSet", FULLNAME)
    ports = {p["name"]: p["containerPort"] for p in container(statefulset)["ports"]}
    assert ports["metrics"] == 9090
    service = find(production, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert "prometheus.io/scheme" not in service["metadata"]["annotations"]  # plaintext: http


def test_metrics_off_removes_port_service_and_variable() -> None:
    docs = manifests(render(VALUE_SETS["handler-only-in-memory"]))
    statefulset = find(docs, "StatefulSet", "scanq")
    assert [p["name"] for p in container(statefulset)["ports"]] == ["grpc"]
    assert "IMAGE_HANDLER_METRICS_LISTEN" not in environment(docs, statefulset)
    assert not [d for d in docs if d["metadata"]["name"].endswith("-metrics")]
    assert not [d for d in docs if d["kind"] == "Deployment"]
    # No persistence: an emptyDir, no claim.
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}


def test_scanner_autoscaling() -> None:
    docs = manifests(render(VALUE_SETS["autoscaled-scanners"]))
    deployment = find(docs, "Deployment", f"{FULLNAME}-scanner")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    hpa = find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-scanner")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-scanner",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 30)
    targets = {m["resource"]["name"] for m in hpa["spec"]["metrics"]}
    assert targets == {"cpu", "memory"}


def test_disruption_budgets_and_network_policies(production: list[Manifest]) -> None:
    handler_pdb = find(production, "PodDisruptionBudget", FULLNAME)
    assert handler_pdb["spec"]["minAvailable"] == 1
    scanner_pdb = find(production, "PodDisruptionBudget", f"{FULLNAME}-scanner")
    assert scanner_pdb["spec"]["maxUnavailable"] == "25%"
    policy = find(production, "NetworkPolicy", FULLNAME)
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    # The release's scanners may always connect; then what grpcFrom allows.
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "scanner"
    )
    assert grpc_rule["from"][1] == {"podSelector": {}}
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    scanners = find(production, "NetworkPolicy", f"{FULLNAME}-scanner")
    assert scanners["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in scanners["spec"]


# ----- the schema refuses wrong values ----------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where", "what"),
    [
        ({"handler": {"queueLimit": -1}}, "/handler/queueLimit", "minimum: got -1, want 0"),
        (
            {"handler": {"verdict": {"failSeverity": "severe"}}},
            "/handler/verdict/failSeverity",
            "value must be one of",
        ),
        (
            {"handler": {"receiver": {"url": "ftp://mdw"}}},
            "/handler/receiver/url",
            "does not match pattern",
        ),
        ({"handler": {"resultWorkers": 0}}, "/handler/resultWorkers", "minimum: got 0, want 1"),
        ({"handler": {"logFormat": "xml"}}, "/handler/logFormat", "value must be one of"),
        ({"handler": {"resultWorker": 25}}, "/handler", "'resultWorker' not allowed"),
        ({"handler": {"grpcPort": 70000}}, "/handler/grpcPort", "maximum"),
        ({"handler": {"healthPort": -1}}, "/handler/healthPort", "minimum"),
        (
            {"handler": {"lanes": {"interactiveShare": 1.5}}},
            "/handler/lanes/interactiveShare",
            "maximum",
        ),
        (
            {"handler": {"timeouts": {"resultWait": 0}}},
            "/handler/timeouts/resultWait",
            "exclusiveMinimum",
        ),
        (
            {"handler": {"defaultPolicies": ["virus"]}},
            "/handler/defaultPolicies/0",
            "value must be one of",
        ),
        (
            {"handler": {"storage": {"fsync": "sometimes"}}},
            "/handler/storage/fsync",
            "value must be one of",
        ),
        (
            {"handler": {"persistence": {"size": "lots"}}},
            "/handler/persistence/size",
            "does not match pattern",
        ),
        ({"scanner": {"slots": "4"}}, "/scanner/slots", "got string, want integer"),
        ({"scanner": {"kinds": ["vm"]}}, "/scanner/kinds/0", "value must be one of"),
        ({"image": {"digest": "latest"}}, "/image/digest", "does not match pattern"),
        (
            {"secrets": {"handlerEnv": {"X": {"name": "s"}}}},
            "/secrets/handlerEnv/X",
            "missing property 'key'",
        ),
        ({"jobPolicy": {"nodeRoots": ["host"]}}, "/jobPolicy/nodeRoots/0", "does not match"),
        (
            {"jobPolicy": {"allowedRegistries": ["https://ghcr.io"]}},
            "/jobPolicy/allowedRegistries/0",
            "does not match",
        ),
        (
            {"jobPolicy": {"credentialGrants": {"team-a": {"registries": ["ghcr.io"]}}}},
            "/jobPolicy/credentialGrants/team-a",
            "missing property 'allowed'",
        ),
    ],
)
def test_the_schema_refuses_wrong_values(values: dict[str, Any], where: str, what: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    message = str(caught.value)
    assert f"at '{where}'" in message
    assert what in message
    # An install (a render) refuses them the same way.
    with pytest.raises(helm.HelmValuesError):
        render(values)


@pytest.mark.parametrize(
    ("values", "what"),
    [
        (
            {"handler": {"timeouts": {"heartbeatInterval": 20, "heartbeatTimeout": 15}}},
            "handler.timeouts.heartbeatTimeout (15 s) must exceed",
        ),
        ({"metrics": {"port": 50051}}, "metrics.port and handler.grpcPort are both 50051"),
        ({"handler": {"healthPort": 9090}}, "handler.healthPort 9090 is taken"),
        ({"handler": {"healthPort": 50051}}, "handler.healthPort 50051 is taken"),
        (
            {"scanner": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            "scanner.autoscaling.minReplicas (5) is above",
        ),
        ({"scanner": {"backoff": {"initial": 5, "max": 1}}}, "scanner.backoff.max (1 s) is below"),
        (
            {"jobPolicy": {"credentialsSecret": "pull"}},
            "jobPolicy.credentialGrants grants none of them",
        ),
    ],
)
def test_rules_across_values_fail_with_what_to_change(values: dict[str, Any], what: str) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(values)
    assert what in str(caught.value)


def test_values_yaml_is_what_the_chart_loads() -> None:
    """values.yaml parses and passes its own schema (helm lint checks this too)."""
    with helm.Chart.load(CHART) as chart:
        on_disk = yaml.safe_load((CHART / "values.yaml").read_text())
        assert chart.values == on_disk
        chart.validate_schema(on_disk)
