"""The promotion gate, GET /v1/gate/{deployment}/{variant}, over a real HTTP server: 200 and a
JSON verdict per arm (a bad canary fails, the healthy stable arm passes, an arm without
measurements is inconclusive); ``?codes=1`` (and a POST) answer the verdict as a status code
(412 fail, 503 inconclusive); a shadow arm is judged the same way but never rolled back.
Argo's and Flagger's reading of these answers: tests/test_gate_argo.py, test_gate_flagger.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from gate_arms import gate_server, judged_arms


@pytest.fixture(scope="module")
def server():
    with gate_server() as srv:
        yield srv


def get(server, path: str, data: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_gate_verdicts_per_arm(server):
    canary = get(server, "/v1/gate/demo-scorer/canary")
    stable = get(server, "/v1/gate/demo-scorer/stable")
    shadow = get(server, "/v1/gate/demo-scorer/shadow")
    unknown = get(server, "/v1/gate/demo-scorer/blue")
    status, body = canary
    assert status == 200 and body["verdict"] == "fail" and body["fail"] is True
    (check,) = body["checks"]
    assert check["rule"] == "serving-error-rate" and check["state"] == "firing"
    assert check["measurement"]["value"] > 0.05 and check["measurement"]["sample_size"] >= 50
    assert body["reason"] == "serving-error-rate: alert firing"
    assert body["version"] == "2" and body["rollback"] is True
    (incident,) = body["incidents"]
    assert incident["rules"] == ["serving-error-rate"] and incident["id"].startswith("inc-")
    assert stable == (200, stable[1]) and stable[1]["verdict"] == "pass" and stable[1]["version"] == "1"
    assert stable[1]["incidents"] == [] and stable[1]["reason"] == "1 rule(s) within threshold"
    assert shadow[0] == 200 and shadow[1]["verdict"] == "fail" and shadow[1]["rollback"] is False
    assert unknown[0] == 200 and unknown[1]["verdict"] == "inconclusive"
    assert unknown[1]["checks"][0]["reason"] == "not measured yet"


def test_codes_answer_the_verdict_as_a_status(server):
    """For `curl --fail` gates; a POST (Flagger's webhooks, as configured before /v1/flagger)
    keeps the codes unless ?codes=0, so an old confirm-promotion hook still fails closed."""
    assert get(server, "/v1/gate/demo-scorer/canary?codes=1")[0] == 412
    assert get(server, "/v1/gate/demo-scorer/stable?codes=1")[0] == 200
    assert get(server, "/v1/gate/demo-scorer/blue?codes=true")[0] == 503
    assert get(server, "/v1/gate/demo-scorer/canary?codes=0")[0] == 200
    assert get(server, "/v1/gate/demo-scorer/canary", data=b"{}")[0] == 412
    assert get(server, "/v1/gate/demo-scorer/blue", data=b"")[0] == 503
    status, body = get(server, "/v1/gate/demo-scorer/stable", data=b"{}")
    assert (status, body["verdict"]) == (200, "pass")
    assert get(server, "/v1/gate/demo-scorer/canary?codes=0", data=b"{}")[0] == 200
    status, body = get(server, "/v1/gate/demo-scorer/canary?codes=maybe")
    assert status == 400 and "codes" in body["error"]
    assert get(server, "/v1/gate/demo-scorer")[0] == 404


def test_a_shadow_arm_is_never_rolled_back():
    records = judged_arms().records
    rollbacks = {r["variant"]: r for r in records if r.get("action") == "rollback"}
    assert rollbacks["canary"]["status"] == "succeeded"
    assert (rollbacks["shadow"]["status"], rollbacks["shadow"]["reason"]) == ("skipped", "shadow")
