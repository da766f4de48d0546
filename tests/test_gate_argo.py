"""Argo Rollouts reading rollbackd's gate: deploy/argo/analysis-template.yaml's conditions, as
written, applied to real answers of the gate's HTTP server by Argo's own code and libraries.

argo-eval (tests/argo_eval/main.go) is a copy of Argo's web metric provider (status check, JSON
parse, jsonPath with k8s.io/client-go) and condition evaluation (``utils/evaluate``), built
with the expr library of the latest release (antonmedv/expr v1.15.5, Argo v1.9.1) and of main
(expr-lang/expr v1.17.8). .ci/run builds it; outside CI a machine without ``go`` skips these
tests with the reason; under CI=true they fail.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gate_arms import DEPLOYMENT, FAILING, PASSING, UNMEASURED, judged_arms
from rollbackd.daemon.http import OpsServer

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "argo" / "analysis-template.yaml"
ROLLOUT = ROOT / "deploy" / "argo" / "rollout.yaml"
ARGO_VERSIONS = ("v1.9.1", "main")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def argo_eval() -> Path:
    spec = importlib.util.spec_from_file_location("argo_eval_build", ROOT / "tests" / "argo_eval" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        return build.build()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        if _in_ci():
            pytest.fail(f"argo-eval is needed under CI (.ci/run builds it): {exc}")
        pytest.skip(f"argo-eval unavailable: {exc}")


@pytest.fixture(scope="module")
def metric() -> dict[str, Any]:
    (template,) = yaml.safe_load_all(TEMPLATE.read_text())
    assert template["kind"] == "AnalysisTemplate"
    (m,) = template["spec"]["metrics"]
    m["args"] = {a["name"]: a.get("value") for a in template["spec"]["args"]}
    return m


@pytest.fixture(scope="module")
def server():
    arms = judged_arms()
    with OpsServer(CollectorRegistry(), arms.pipeline, port=0, measurements=arms.tap.latest) as srv:
        yield srv
    assert srv.errors == []


def url_of(metric: dict[str, Any], server: OpsServer, variant: str, query: str = "") -> str:
    """The metric's URL with its args substituted as Argo does (``{{args.NAME}}``)."""
    args = {**metric["args"], "rollbackd-url": server.url, "deployment": DEPLOYMENT, "variant": variant}
    url = metric["provider"]["web"]["url"]
    for name, value in args.items():
        url = url.replace("{{args.%s}}" % name, value)
    assert "{{" not in url, url
    return url + query


def answer(url: str) -> dict[str, Any]:
    """What Argo's provider gets: a GET (the template sets no method), the status and the body."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return {"status": resp.status, "body": resp.read().decode()}
    except urllib.error.HTTPError as err:
        return {"status": err.code, "body": err.read().decode()}


def judge(argo_eval: Path, metric: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, list[dict]]:
    request = {"jsonPath": metric["provider"]["web"].get("jsonPath", ""),
               "successCondition": metric.get("successCondition", ""),
               "failureCondition": metric.get("failureCondition", ""), "answers": answers}
    proc = subprocess.run([str(argo_eval)], input=json.dumps(request), capture_output=True, text=True,
                          timeout=30, check=True)
    return json.loads(proc.stdout)


def phases(judged: dict[str, list[dict]], version: str) -> list[str]:
    return [m["phase"] for m in judged[version]]


def test_the_templates_conditions_tell_pass_fail_and_inconclusive_apart(argo_eval, metric, server):
    assert metric["provider"]["web"].get("method", "GET") == "GET"
    answers = [answer(url_of(metric, server, v)) for v in (FAILING, PASSING, UNMEASURED)]
    assert [a["status"] for a in answers] == [200, 200, 200]
    judged = judge(argo_eval, metric, answers)
    for version in ARGO_VERSIONS:
        assert phases(judged, version) == ["Failed", "Successful", "Inconclusive"], judged[version]
        assert [m["value"] for m in judged[version]] == ['"fail"', '"pass"', '"inconclusive"']


def test_status_codes_are_errors_to_argo(argo_eval, metric, server):
    """Why the gate answers 200 by default: with ?codes=1 a failing canary is only an Error,
    the same as rollbackd being down, and the analysis errors after consecutiveErrorLimit."""
    answers = [answer(url_of(metric, server, v, "?codes=1")) for v in (FAILING, UNMEASURED)]
    judged = judge(argo_eval, metric, answers)
    for version in ARGO_VERSIONS:
        assert phases(judged, version) == ["Error", "Error"]
        assert "non 2xx response code: 412" in judged[version][0]["error"]


def test_a_non_finite_measurement_still_fails_the_canary(argo_eval, metric):
    """Python's json writes inf and NaN as bare words, which Go cannot parse; Argo v1.9 then
    takes the body as a *successful* measurement. The gate writes them as null."""
    arms = judged_arms()
    latest = arms.tap.latest()
    key = next(k for k in latest if k[1:] == (DEPLOYMENT, FAILING))
    ts, m = latest[key]
    poisoned = {**latest, key: (ts, {**m, "p_value": math.inf, "effect": -math.inf, "note": math.nan})}
    with OpsServer(CollectorRegistry(), arms.pipeline, port=0, measurements=lambda: poisoned) as srv:
        got = answer(url_of(metric, srv, FAILING))
    body = json.loads(got["body"])
    assert body["checks"][0]["measurement"]["p_value"] is None
    judged = judge(argo_eval, metric, [got, {"status": 200, "body": got["body"].replace("null", "NaN")}])
    assert phases(judged, "v1.9.1") == ["Failed", "Successful"]  # the second: what a NaN would do
    assert phases(judged, "main") == ["Failed", "Inconclusive"]


# Argo's assessment of a metric from its measurements: a port of analysis/analysis.go
# (v1.9.1) assessMetricStatus / assessMetricFailureInconclusiveOrError, and of the limits
# utils/analysis/factory.go ValidateMetric accepts, to check the template's numbers.
def assess(metric: dict[str, Any], measured: list[str]) -> tuple[str, int]:
    """The metric's phase after the measurements in ``measured`` (Argo phases) and how many were
    taken to get there: Argo stops measuring once the metric completes."""
    failure_limit = int(metric.get("failureLimit", 0))
    inconclusive_limit = int(metric.get("inconclusiveLimit", 0))
    error_limit = int(metric.get("consecutiveErrorLimit", 4))
    success_limit = int(metric.get("consecutiveSuccessLimit", 0))
    count = int(metric["count"])
    failed = inconclusive = consecutive_error = consecutive_success = taken = 0
    for n, phase in enumerate(measured, 1):
        if phase == "Successful":
            taken, consecutive_error, consecutive_success = taken + 1, 0, consecutive_success + 1
        elif phase == "Failed":
            failed, taken, consecutive_error, consecutive_success = failed + 1, taken + 1, 0, 0
        elif phase == "Inconclusive":
            inconclusive, taken, consecutive_error, consecutive_success = inconclusive + 1, taken + 1, 0, 0
        else:
            consecutive_error, consecutive_success = consecutive_error + 1, 0
        verdict = ""
        if failure_limit >= 0 and failed > failure_limit:
            verdict = "Failed"
        if inconclusive > inconclusive_limit:
            verdict = "Inconclusive"
        if consecutive_error > error_limit:
            verdict = "Error"
        if verdict:
            return verdict, n
        if success_limit > 0 and consecutive_success >= success_limit:
            return "Successful", n
        if taken >= count:
            return ("Inconclusive" if success_limit > 0 else "Successful"), n
    return "Running", len(measured)


def test_the_templates_limits_are_valid_for_argo(metric):
    count, failure, success = int(metric["count"]), int(metric["failureLimit"]), int(metric["consecutiveSuccessLimit"])
    assert count >= failure + success and count >= int(metric["inconclusiveLimit"])
    assert metric["interval"] and count > 1


def test_the_first_failed_measurement_aborts(metric):
    assert assess(metric, ["Failed"]) == ("Failed", 1)
    assert assess(metric, ["Inconclusive", "Successful", "Failed"]) == ("Failed", 3)


def test_inconclusive_keeps_measuring_until_passes_in_a_row(metric):
    needed = int(metric["consecutiveSuccessLimit"])
    early = ["Inconclusive"] * 4 + ["Successful"] * needed
    assert assess(metric, early) == ("Successful", 4 + needed)
    flapping = ["Successful", "Inconclusive"] * 10
    assert assess(metric, flapping) == ("Inconclusive", int(metric["count"]))
    assert assess(metric, ["Inconclusive"] * 20) == ("Inconclusive", int(metric["count"]))


def test_rollbackd_unreachable_is_an_error_after_the_limit(metric):
    limit = int(metric["consecutiveErrorLimit"])
    assert assess(metric, ["Error"] * (limit + 1)) == ("Error", limit + 1)
    assert assess(metric, ["Error"] * limit + ["Failed"]) == ("Failed", limit + 1)


def test_the_example_rollout_uses_the_template():
    (rollout,) = yaml.safe_load_all(ROLLOUT.read_text())
    (template,) = yaml.safe_load_all(TEMPLATE.read_text())
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    (analysis,) = [s["analysis"] for s in steps if "analysis" in s]
    assert analysis["templates"] == [{"templateName": template["metadata"]["name"]}]
    required = {a["name"] for a in template["spec"]["args"] if "value" not in a}
    assert required <= {a["name"] for a in analysis["args"]}
