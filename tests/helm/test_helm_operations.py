"""What operators expect around the chart: alerts, a ServiceMonitor, a Grafana dashboard, scanner
probes, TLS and tokens from named values, and a clean bill from checkov (a policy scanner that
platform teams run), all on manifests rendered by Helm itself (helm-python-sdk, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from scanner_client import cli as scanner_cli
from scanner_client.health import STREAM_SERVICE
from server import config as handler_config
from tests.helm.test_helm import (
    CHART,
    DIGEST,
    FULLNAME,
    NAMESPACE,
    container,
    environment,
    find,
    manifests,
    render,
)
from tests.paths import ROOT

ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
MONITORING: dict[str, Any] = {
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Security"}},
}
TLS_AND_TOKENS: dict[str, Any] = {
    "handler": {
        "healthPort": 50052,
        "tls": {"certSecret": "ih-tls"},
        "tokens": {"secret": "ih-tokens", "key": "tokens"},
    },
    "scanner": {"token": {"secret": "ih-scanner-token", "key": "token"}},
}


def file_rules() -> list[dict[str, Any]]:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    return group["rules"]  # type: ignore[no-any-return]


# ----- alerts ---------------------------------------------------------------------------


def test_the_prometheus_rule_carries_the_plain_files_rules() -> None:
    docs = manifests(render(MONITORING))
    rule = find(docs, "PrometheusRule", FULLNAME)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    # The alert templates reach the object as Prometheus reads them, not rendered by Helm.
    assert "{{ $labels.instance }}" in json.dumps(rule["spec"])


def test_rules_can_be_disabled_overridden_and_labelled() -> None:
    values = {
        "prometheusRule": {
            "enabled": True,
            "disabled": ["ImageHandlerScannerDatabaseStale"],
            "overrides": {
                "ImageHandlerNotReady": {"for": "20m", "labels": {"severity": "page"}},
                "ImageHandlerQueueNearLimit": {
                    "expr": "sum without (lane) (imagehandler_queue_depth)"
                    " / (imagehandler_queue_limit > 0) > 0.75"
                },
            },
            "ruleLabels": {"team": "security", "severity": "ignored"},
        }
    }
    (group,) = find(manifests(render(values)), "PrometheusRule", FULLNAME)["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == {r["alert"] for r in file_rules()} - {"ImageHandlerScannerDatabaseStale"}
    assert rules["ImageHandlerNotReady"]["for"] == "20m"
    assert rules["ImageHandlerNotReady"]["labels"] == {"severity": "page", "team": "security"}
    assert rules["ImageHandlerQueueNearLimit"]["expr"].endswith("> 0.75")
    assert rules["ImageHandlerNoFreeScanner"]["labels"] == {
        "severity": "warning",
        "team": "security",
    }


def test_monitoring_objects_are_off_by_default() -> None:
    kinds = {d["kind"] for d in manifests(render())}
    assert not kinds & {"PrometheusRule", "ServiceMonitor"}
    names = {d["metadata"]["name"] for d in manifests(render())}
    assert f"{FULLNAME}-dashboard" not in names


# ----- ServiceMonitor and dashboard -----------------------------------------------------


def test_the_service_monitor_scrapes_the_metrics_service_alone() -> None:
    docs = manifests(render(MONITORING))
    monitor = find(docs, "ServiceMonitor", FULLNAME)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "scheme": "http",
        "interval": "30s",
        "scrapeTimeout": "10s",
    }
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == [f"{FULLNAME}-metrics"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # The Service's annotations say the same path for Prometheus without the operator.
    annotations = services[0]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == endpoint["path"]


def test_with_tls_the_service_monitor_scrapes_https() -> None:
    values = {**TLS_AND_TOKENS, "serviceMonitor": {"enabled": True, "tlsConfig": {"ca": {}}}}
    (endpoint,) = find(manifests(render(values)), "ServiceMonitor", FULLNAME)["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"ca": {}}


def test_the_dashboard_config_map_carries_the_sidecar_label_and_the_json() -> None:
    docs = manifests(render(MONITORING))
    config_map = find(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Security"}
    assert json.loads(config_map["data"]["image-handler.json"]) == json.loads(DASHBOARD.read_text())
    other = {"dashboard": {"enabled": True, "label": "dashboards", "labelValue": "image-handler",
                           "namespace": "monitoring"}}  # fmt: skip
    moved = find(manifests(render(other)), "ConfigMap", f"{FULLNAME}-dashboard")
    assert moved["metadata"]["labels"]["dashboards"] == "image-handler"
    assert moved["metadata"]["namespace"] == "monitoring"


# ----- scanner probes -------------------------------------------------------------------


def test_the_scanners_have_liveness_and_readiness_probes() -> None:
    docs = manifests(render())
    deployment = find(docs, "Deployment", f"{FULLNAME}-scanner")
    c = container(deployment)
    assert c["livenessProbe"]["grpc"] == {"port": 8081, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": 8081, "service": STREAM_SERVICE}
    assert c["ports"] == [{"name": "health", "containerPort": 8081, "protocol": "TCP"}]
    settings = scanner_cli.parse_args([], env=environment(docs, deployment))
    assert settings.health_listen == "0.0.0.0:8081"


# ----- TLS and tokens from named values -------------------------------------------------


def test_tls_and_tokens_from_named_values() -> None:
    docs = manifests(render(TLS_AND_TOKENS))
    statefulset = find(docs, "StatefulSet", FULLNAME)
    env = environment(docs, statefulset)
    config = handler_config.parse([], environ=env)
    assert config.tls_cert == "/etc/image-handler/tls/tls.crt"
    assert config.tls_key == "/etc/image-handler/tls/tls.key"
    assert config.token_file == "/etc/image-handler/tokens/tokens"
    assert config.client_ca == ""
    mounts = {m["name"]: m for m in container(statefulset)["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/image-handler/tls", "readOnly": True}
    assert mounts["tokens"]["mountPath"] == "/etc/image-handler/tokens"
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"] == {"secretName": "ih-tls"}
    assert volumes["tokens"]["secret"] == {"secretName": "ih-tokens"}
    # The probes ask the plaintext health port; metrics are scraped over HTTPS.
    assert container(statefulset)["livenessProbe"]["grpc"]["port"] == 50052
    metrics = find(docs, "Service", f"{FULLNAME}-metrics")
    assert metrics["metadata"]["annotations"]["prometheus.io/scheme"] == "https"

    # The scanners connect with TLS, trusting the certificate Secret's CA, with their token.
    deployment = find(docs, "Deployment", f"{FULLNAME}-scanner")
    scanner_env = environment(docs, deployment)
    assert scanner_env["IMAGE_SCANNER_TLS"] == "true"
    assert scanner_env["IMAGE_SCANNER_TLS_CA"] == "/etc/image-handler/tls-ca/ca.crt"
    assert scanner_env["IMAGE_SCANNER_TOKEN_FILE"] == "/etc/image-handler/token/token"
    scanner_volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert scanner_volumes["tls-ca"]["secret"] == {
        "secretName": "ih-tls",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert scanner_volumes["token"]["secret"]["secretName"] == "ih-scanner-token"


def test_mutual_tls_without_the_charts_scanners() -> None:
    values = {
        "handler": {
            "healthPort": 50052,
            "tls": {
                "certSecret": "ih-tls",
                "clientCASecret": "ih-clients",
                "clientCAKey": "ca.pem",
            },
        },
        "scanner": {"enabled": False},
    }
    docs = manifests(render(values))
    env = environment(docs, find(docs, "StatefulSet", FULLNAME))
    assert env["IMAGE_HANDLER_CLIENT_CA"] == "/etc/image-handler/client-ca/ca.pem"


@pytest.mark.parametrize(
    ("values", "what"),
    [
        (
            {"handler": {"tls": {"certSecret": "ih-tls"}}},
            "set handler.healthPort (for example 50052)",
        ),
        (
            {"handler": {"healthPort": 50052, "tls": {"clientCASecret": "ca"}}},
            "needs the handler's own certificate: set handler.tls.certSecret",
        ),
        (
            {"handler": {"healthPort": 50052, "tls": {"certSecret": "t", "clientCASecret": "ca"}}},
            "each scanner's certificate must name its own scanner id",
        ),
        (
            {"handler": {"tokens": {"secret": "ih-tokens"}}},
            "set scanner.token.secret",
        ),
        (
            {
                "handler": {
                    "healthPort": 50052,
                    "tls": {"certSecret": "t"},
                    "extraConfig": {"tls_cert": "/x", "tls_key": "/y"},
                }
            },
            "keep one",
        ),
    ],
)
def test_tls_mistakes_fail_with_what_to_change(values: dict[str, Any], what: str) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError) as caught:
        render(values)
    assert what in str(caught.value)


# ----- checkov ----------------------------------------------------------------------------

CHECKOV_VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "pinned": {"image": {"digest": DIGEST}},
    "tls-tokens-monitoring": {**TLS_AND_TOKENS, **MONITORING, "image": {"digest": DIGEST}},
    "autoscaled-with-cpu-limits": {
        "scanner": {
            "autoscaling": {"enabled": True},
            "resources": {"limits": {"cpu": "2", "memory": "2Gi"}},
        },
        "image": {"pullPolicy": "Always"},
    },
}
# The checks the chart skips on purpose, while they apply (reasons in the manifests and in
# docs/operating/helm.md).
SKIPPED = {"CKV_K8S_11", "CKV_K8S_15", "CKV_K8S_43"}


def checkov_command() -> list[str]:
    found = os.environ.get("CHECKOV") or shutil.which("checkov")
    local = ROOT / ".venv-checkov" / "bin" / "checkov"
    if not found and local.exists():
        found = str(local)
    if not found:
        pytest.skip("checkov is not installed: make checkov (its own venv, .venv-checkov)")
    return [found]


def run_checkov(values: dict[str, Any], directory: Path) -> dict[str, Any]:
    for path, text in render(values).items():
        if path.endswith(".yaml") and text.strip():
            (directory / path.replace("/", "_")).write_text(text)
    result = subprocess.run(
        [
            *checkov_command(),
            "--directory",
            str(directory),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            # Offline: no guideline download.
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(CHECKOV_VALUE_SETS))
def test_checkov_passes_the_rendered_chart(name: str, tmp_path: Path) -> None:
    values = CHECKOV_VALUE_SETS[name]
    report = run_checkov(values, tmp_path)
    failed = [
        (c["check_id"], c["check_name"], c["resource"]) for c in report["results"]["failed_checks"]
    ]
    assert failed == [], failed
    summary = report["summary"]
    assert summary["passed"] >= 150, summary
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert skipped <= SKIPPED, skipped
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    # The probes, network policies and non-root settings are checked and pass.
    assert {"CKV_K8S_8", "CKV_K8S_9", "CKV2_K8S_6", "CKV_K8S_40", "CKV_K8S_22"} <= passed
    # A skip is there only while it applies: pinned images pass the digest check, CPU limits
    # and Always pass theirs.
    if values.get("image", {}).get("digest"):
        assert "CKV_K8S_43" in passed
        assert "CKV_K8S_43" not in skipped
    if name == "autoscaled-with-cpu-limits":
        assert {"CKV_K8S_15"} <= passed
        scanner_skips = {
            c["check_id"] for c in report["results"]["skipped_checks"] if "scanner" in c["resource"]
        }
        assert "CKV_K8S_11" not in scanner_skips


def test_every_skip_says_why(tmp_path: Path) -> None:
    report = run_checkov({}, tmp_path)
    skips = report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skips} == SKIPPED
    for check in skips:
        assert len(check["check_result"]["suppress_comment"]) > 30, check
