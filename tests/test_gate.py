"""The promotion gate, GET /v1/gate/{deployment}/{variant}, over a real HTTP server: a bad
canary fails (412), the healthy stable arm passes (200), an arm without measurements is
inconclusive (503); a shadow arm is judged the same way but never rolled back."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.http import OpsServer
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.report import MeasurementTap
from rollbackd.rules.loader import load_config_text
from rollbackd.scenarios import Fault, Scenario, write_recording

RULES = """
version: 1
settings: {lateness: 30s, notifier: {type: none}}
grouping: {group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}
deployments:
  demo-scorer: {backend: {type: log}, known_good_after: 5m, cooldown: 0s}
rules:
  - {name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, for: 2m, min_samples: 50, severity: critical, actions: [notify, rollback]}
"""


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "arms.jsonl.gz"
    write_recording(Scenario(
        name="arms", seed=3, duration=1500.0,
        variants=(("stable", 0.6), ("canary", 0.2), ("shadow", 0.2)),
        versions=((0.0, "1"), (600.0, "2", "canary"), (600.0, "2", "shadow")),
        faults=(Fault("error_rate", start=600.0, magnitude=0.3, version="2"),),
    ), path)
    cfg = load_config_text(RULES)
    tap = MeasurementTap(cfg, profiles=False, max_points=1)
    d = MemoryDecisions()
    pipeline = build_pipeline(cfg, decisions=d, tap=tap)
    replay(open_recording(str(path), cfg), pipeline, batch_size=4096)
    return pipeline, tap, d.records


def get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_gate_verdicts_per_arm(judged):
    pipeline, tap, _ = judged
    with OpsServer(CollectorRegistry(), pipeline, port=0, measurements=tap.latest) as server:
        canary = get(server, "/v1/gate/demo-scorer/canary")
        stable = get(server, "/v1/gate/demo-scorer/stable")
        shadow = get(server, "/v1/gate/demo-scorer/shadow")
        unknown = get(server, "/v1/gate/demo-scorer/blue")
        req = urllib.request.Request(server.url + "/v1/gate/demo-scorer/stable", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:  # Flagger's webhook
            assert resp.status == 200 and json.loads(resp.read())["verdict"] == "pass"
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(server.url + "/v1/gate/demo-scorer", timeout=5)
    status, body = canary
    assert status == 412 and body["verdict"] == "fail" and body["fail"] is True
    (check,) = body["checks"]
    assert check["rule"] == "serving-error-rate" and check["state"] == "firing"
    assert check["measurement"]["value"] > 0.05 and check["measurement"]["sample_size"] >= 50
    assert body["version"] == "2" and body["rollback"] is True
    assert stable[0] == 200 and stable[1]["verdict"] == "pass" and stable[1]["version"] == "1"
    assert shadow[0] == 412 and shadow[1]["rollback"] is False
    assert unknown[0] == 503 and unknown[1]["verdict"] == "inconclusive"
    assert unknown[1]["checks"][0]["reason"] == "not measured yet"
    assert bad.value.code == 404


def test_a_shadow_arm_is_never_rolled_back(judged):
    _, _, records = judged
    rollbacks = {r["variant"]: r for r in records if r.get("action") == "rollback"}
    assert rollbacks["canary"]["status"] == "succeeded"
    assert (rollbacks["shadow"]["status"], rollbacks["shadow"]["reason"]) == ("skipped", "shadow")
