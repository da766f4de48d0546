"""ops/prometheus-alerts.yaml under Prometheus' own tools: `promtool check rules` and `promtool
test rules ops/prometheus-alerts.test.yaml`, whose cases step every alert minute by minute
(including a failure counter that first appears at 1, which must alert).

promtool comes from Debian's `prometheus` package (.ci/run installs it). Outside CI a machine
without it skips these tests with the reason; under CI=true they fail.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ci import unavailable

OPS = Path(__file__).parent.parent / "ops"
RULES = OPS / "prometheus-alerts.yaml"
TESTS = OPS / "prometheus-alerts.test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        why = "promtool is not installed (apt-get install prometheus)"
        unavailable(why)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=OPS)


def test_promtool_checks_the_rules(promtool):
    done = run(promtool, "check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    n = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert f"SUCCESS: {n} rules found" in done.stdout


def test_promtool_unit_tests_pass(promtool):
    done = run(promtool, "test", "rules", TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    doc = yaml.safe_load(TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == alerts, alerts - fires
    assert quiet == alerts, alerts - quiet


def test_the_first_ever_failure_is_a_case():
    """The case the old rules missed: a failure counter whose series starts at 1."""
    doc = yaml.safe_load(TESTS.read_text())
    for alert in ("RollbackdRollbackFailed", "RollbackdNoticesFailing"):
        cases = [c for c in doc["tests"]
                 if [s["values"] for s in c["input_series"]] == ["_ _ _ 1 1"]
                 and any(t["alertname"] == alert and t["exp_alerts"] for t in c["alert_rule_test"])]
        assert len(cases) == 1, alert
