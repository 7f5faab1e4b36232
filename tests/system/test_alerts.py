"""The alert rules (helm/image-handler/files/alerts.yaml) under Prometheus' own tool: promtool
checks them and runs their unit tests (tests/prometheus/alerts_test.yaml), and every alert has
a case where it fires and one where it stays quiet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.paths import ROOT

ALERTS = ROOT / "helm" / "image-handler" / "files" / "alerts.yaml"
UNIT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: apt-get install prometheus (make test-tools does)")
    return found


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = [r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(UNIT_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_threshold_fails_the_unit_tests(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: the same tests against rules with one threshold moved."""
    rules = tmp_path / "helm" / "image-handler" / "files"
    rules.mkdir(parents=True)
    (rules / "alerts.yaml").write_text(ALERTS.read_text().replace("> 3 * 86400", "> 4 * 86400"))
    tests = tmp_path / "tests" / "prometheus"
    tests.mkdir(parents=True)
    shutil.copy(UNIT_TESTS, tests)
    result = run(promtool, "test", "rules", UNIT_TESTS.name, cwd=tests)
    assert result.returncode != 0
    assert "ImageHandlerScannerDatabaseStale" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    cases: list[dict[str, Any]] = [
        case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]  # fmt: skip
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (fires | quiet) <= alerts, "tests of alerts that do not exist"


def test_every_alert_has_a_severity_summary_and_runbook() -> None:
    docs = (ROOT / "docs" / "operating" / "alerts-and-dashboard.md").read_text()
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            anchor = rule["annotations"]["runbook"].partition("#")[2]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert']}" in docs, f"{rule['alert']} is not documented"
