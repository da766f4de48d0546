"""Argo Rollouts reading rollbackd's gate: deploy/argo/analysis-template.yaml, as written, measured
against the gate's real HTTP server by Argo Rollouts' own code.

argo-eval (tests/argo_eval/main.go, ours) is glue around the published Go module
github.com/argoproj/argo-rollouts v1.10.1: it decodes the template into Argo's types, validates its
metrics, builds the AnalysisRun with our args and resolves ``{{args.NAME}}`` as the controller
does, and takes one measurement of the web metric with Argo's webmetric provider (the HTTP GET,
the status check, the jsonPath, successCondition / failureCondition). .ci/run builds it; outside
CI a machine without ``go`` skips these tests with the reason; under CI=true they fail.

How Argo turns a run of measurements into the metric's phase (failureLimit, inconclusiveLimit,
consecutiveErrorLimit, consecutiveSuccessLimit, count) lives in unexported functions of Argo's
``analysis`` package, so argo-eval cannot call it: ``assess`` below is written from Argo's
documentation instead (see its docstring).
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import math
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ci import unavailable
from prometheus_client import CollectorRegistry

from gate_arms import DEPLOYMENT, FAILING, PASSING, UNMEASURED, gate_server, judged_arms
from rollbackd.daemon.http import OpsServer

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "argo" / "analysis-template.yaml"
ROLLOUT = ROOT / "deploy" / "argo" / "rollout.yaml"


@pytest.fixture(scope="module")
def argo_eval() -> Path:
    spec = importlib.util.spec_from_file_location("argo_eval_build", ROOT / "tests" / "argo_eval" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        return build.build()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        unavailable(f"argo-eval unavailable (.ci/run builds it): {exc}")


@pytest.fixture(scope="module")
def metric() -> dict[str, Any]:
    (template,) = yaml.safe_load_all(TEMPLATE.read_text())
    assert template["kind"] == "AnalysisTemplate"
    (m,) = template["spec"]["metrics"]
    return m


@pytest.fixture(scope="module")
def server():
    with gate_server() as srv:
        yield srv


def run_argo_eval(argo_eval: Path, args: dict[str, str], query: str = "",
                  template: Path = TEMPLATE) -> subprocess.CompletedProcess[str]:
    cmd = [str(argo_eval), "-template", str(template)]
    for name, value in args.items():
        cmd += ["-arg", f"{name}={value}"]
    if query:
        cmd += ["-query", query]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def measure(argo_eval: Path, url: str, variant: str, query: str = "") -> dict[str, str]:
    """Argo's one measurement of the template's metric, for the arm ``variant`` of rollbackd at
    ``url``: the args a Rollout's analysis step passes (deploy/argo/rollout.yaml)."""
    proc = run_argo_eval(argo_eval, {"rollbackd-url": url, "deployment": DEPLOYMENT, "variant": variant}, query)
    assert proc.returncode == 0, proc.stderr
    (m,) = json.loads(proc.stdout)["measurements"]
    return m


def test_the_templates_conditions_tell_pass_fail_and_inconclusive_apart(argo_eval, server):
    got = {v: measure(argo_eval, server.url, v) for v in (FAILING, PASSING, UNMEASURED)}
    assert [got[v]["url"] for v in got] == [f"{server.url}/v1/gate/{DEPLOYMENT}/{v}" for v in got]
    assert [got[v]["phase"] for v in got] == ["Failed", "Successful", "Inconclusive"], got
    assert [got[v]["value"] for v in got] == ['"fail"', '"pass"', '"inconclusive"']


def test_status_codes_are_errors_to_argo(argo_eval, server):
    """Why the gate answers 200 by default: with ?codes=1 a failing canary is only an Error,
    the same as rollbackd being down, and the analysis errors after consecutiveErrorLimit."""
    failing = measure(argo_eval, server.url, FAILING, "codes=1")
    unmeasured = measure(argo_eval, server.url, UNMEASURED, "codes=1")
    assert failing["url"].endswith("?codes=1")
    assert (failing["phase"], unmeasured["phase"]) == ("Error", "Error")
    assert "non 2xx response code: 412" in failing["message"]
    assert "non 2xx response code: 503" in unmeasured["message"]


def test_rollbackd_down_is_an_error(argo_eval):
    with socket.socket() as sock:  # a loopback port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    got = measure(argo_eval, url, FAILING)
    assert got["phase"] == "Error" and "connection refused" in got["message"], got


@pytest.fixture()
def fixed_body() -> Iterator[tuple[list[bytes], str]]:
    """A stand-in server on loopback answering 200 with whatever body the test puts in the list:
    fault injection (a body the gate never writes)."""
    bodies: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(bodies[-1])

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield bodies, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def test_a_non_finite_measurement_still_fails_the_canary(argo_eval, fixed_body):
    """Python's json writes inf and NaN as bare words, which Go cannot parse; Argo v1.10 then
    takes the body as a *successful* measurement. The gate writes them as null."""
    arms = judged_arms()
    latest = arms.tap.latest()
    key = next(k for k in latest if k[1:] == (DEPLOYMENT, FAILING))
    ts, m = latest[key]
    poisoned = {**latest, key: (ts, {**m, "p_value": math.inf, "effect": -math.inf, "note": math.nan})}
    with OpsServer(CollectorRegistry(), arms.pipeline, port=0, measurements=lambda: poisoned) as srv:
        got = measure(argo_eval, srv.url, FAILING)
        with urllib.request.urlopen(f"{srv.url}/v1/gate/{DEPLOYMENT}/{FAILING}", timeout=5) as resp:
            body = json.loads(resp.read())
    assert body["checks"][0]["measurement"]["p_value"] is None
    assert got["phase"] == "Failed", got
    bodies, url = fixed_body
    bodies.append(json.dumps(body).replace("null", "NaN").encode())
    assert measure(argo_eval, url, FAILING)["phase"] == "Successful"  # what a NaN would do


def test_argo_requires_the_args_without_defaults(argo_eval, server):
    proc = run_argo_eval(argo_eval, {"rollbackd-url": server.url})
    assert proc.returncode == 2 and "args.deployment was not resolved" in proc.stderr, proc.stderr
    default = json.loads(run_argo_eval(argo_eval, {"rollbackd-url": server.url, "deployment": DEPLOYMENT}).stdout)
    assert default["measurements"][0]["url"].endswith(f"/v1/gate/{DEPLOYMENT}/canary")  # the template's default


def test_the_templates_limits_are_valid_for_argo(argo_eval, server, metric, tmp_path):
    """argo-eval decodes every template strictly into Argo's types and runs Argo's ValidateMetrics
    on it (the other tests pass, so the shipped one is valid); a bad one is refused."""
    def refused(edit) -> str:
        (template,) = yaml.safe_load_all(TEMPLATE.read_text())
        edit(template["spec"]["metrics"][0])
        bad = tmp_path / "analysis-template.yaml"
        bad.write_text(yaml.safe_dump(template))
        proc = run_argo_eval(argo_eval, {"rollbackd-url": server.url, "deployment": DEPLOYMENT}, template=bad)
        assert proc.returncode == 2 and not proc.stdout, proc
        return proc.stderr

    too_few = int(metric["failureLimit"]) + int(metric["consecutiveSuccessLimit"]) - 1
    assert "must be >= failureLimit + consecutiveSuccessLimit" in refused(lambda m: m.update(count=too_few))
    misspelt = refused(lambda m: m.update(consecutiveSucessLimit=m.pop("consecutiveSuccessLimit")))
    assert 'unknown field "consecutiveSucessLimit"' in misspelt
    assert metric["interval"] and int(metric["count"]) > 1


def assess(metric: dict[str, Any], measured: list[str]) -> tuple[str, int]:
    """The metric's phase after the measurements in ``measured`` (Argo phases) and how many were
    taken to get there (Argo stops measuring once the metric completes).

    Argo computes this in unexported code, so this follows Argo Rollouts' documentation instead
    (https://argo-rollouts.readthedocs.io/en/stable/features/analysis/ and the field descriptions
    of the published AnalysisTemplate CRD, tests/k8s_crds.py):
      - failureLimit: the most Failed measurements allowed; one more and the metric is Failed
        (-1 disables it);
      - inconclusiveLimit: the most Inconclusive measurements allowed; one more: Inconclusive;
      - consecutiveErrorLimit (default 4): the most Errors allowed in succession; one more: Error;
      - consecutiveSuccessLimit (0 disables it): that many Successful in a row: Successful;
      - count reached: Failed if failureLimit is violated, else Successful if
        consecutiveSuccessLimit is satisfied or disabled, else Inconclusive.
    The documentation does not say whether an Error counts toward ``count``; no test here depends
    on it (the error cases end before count is reached)."""
    failure_limit = int(metric.get("failureLimit", 0))
    inconclusive_limit = int(metric.get("inconclusiveLimit", 0))
    error_limit = int(metric.get("consecutiveErrorLimit", 4))
    success_limit = int(metric.get("consecutiveSuccessLimit", 0))
    count = int(metric["count"])
    failed = inconclusive = errors_in_a_row = successes_in_a_row = taken = 0
    for n, phase in enumerate(measured, 1):
        errors_in_a_row = errors_in_a_row + 1 if phase == "Error" else 0
        successes_in_a_row = successes_in_a_row + 1 if phase == "Successful" else 0
        failed += phase == "Failed"
        inconclusive += phase == "Inconclusive"
        taken += phase != "Error"
        if failure_limit >= 0 and failed > failure_limit:
            return "Failed", n
        if inconclusive > inconclusive_limit:
            return "Inconclusive", n
        if errors_in_a_row > error_limit:
            return "Error", n
        if success_limit > 0 and successes_in_a_row >= success_limit:
            return "Successful", n
        if taken >= count:
            return ("Inconclusive" if success_limit > 0 else "Successful"), n
    return "Running", len(measured)


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
