"""Version-aware judgement and slices (daemon/splits.py) through the real pipeline.

A rolling update serves versions 7 and 8 side by side; only 8 fails. The whole window dilutes
8's errors and is served mostly by 7, so judged whole the incident named 7 and found nothing
to roll back to. Judged per version's share, the incident names 8 and rolls back to 7.
"""

from __future__ import annotations

import numpy as np
import pytest

from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.replay import build_pipeline
from rollbackd.daemon.splits import adjust_parts, judge_slices, judge_versions, slice_windows, version_shares, where
from rollbackd.detectors.base import Measurement, Window
from rollbackd.events import Prediction
from rollbackd.rules.alerts import Alert, AlertState
from rollbackd.rules.loader import load_config_text
from rollbackd.rules.model import RuleSpec

T0 = 1_790_000_000.0  # a multiple of 60: minutes are window boundaries
RATE = 20  # predictions per second

RULES = """
version: 1
settings: {{lateness: 5s, notifier: {{type: none}}}}
grouping: {{group_by: [deployment, variant], group_wait: 0s, repeat_interval: 4h}}
deployments:
  fraud: {{backend: {{type: log}}, known_good_after: 10m, cooldown: 0s}}
rules:
  - {{name: errors, detector: error_rate, threshold: 0.02, alpha: 0.01, for: 2m,
     min_samples: {min_samples}, severity: critical, actions: [notify, rollback]{extra}}}
"""


def config(min_samples: int = 50, extra: str = ""):
    return load_config_text(RULES.format(min_samples=min_samples, extra=extra))


def stream(seconds: int, version_at, error_rate, seed: int = 1, attrs=None) -> list[Prediction]:
    """RATE predictions per second; ``version_at(t, u)`` picks each one's version from a
    uniform draw, ``error_rate(version, attrs)`` its chance of an error."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(seconds):
        for j in range(RATE):
            t = T0 + s + j / RATE
            version = version_at(s, rng.random())
            a = attrs(rng.random()) if attrs else {}
            err = "TIMEOUT" if rng.random() < error_rate(version, a) else None
            out.append(Prediction(id=f"p{s}-{j}", ts=t, deployment="fraud", model_version=version,
                                  score=0.5, error=err, attrs=a))
    return out


def run(cfg, events) -> list[dict]:
    decisions = MemoryDecisions()
    pipeline = build_pipeline(cfg, decisions=decisions)
    for i in range(0, len(events), 4096):
        pipeline.ingest(events[i:i + 4096])
        pipeline.advance(pipeline.watermark)
    pipeline.finish()
    pipeline.advance(pipeline.max_event_time + 3600)
    return decisions.records


def ramp(start: int, length: int):
    """Version 7 until ``start``, then 8's share grows linearly to all of it over ``length``."""
    def version_at(s: int, u: float) -> str:
        share = min(1.0, max(0.0, (s - start) / length))
        return "8" if u < share else "7"
    return version_at


def test_a_rolling_update_where_only_the_new_version_fails_rolls_back_to_the_old_one():
    start = 30 * 60
    events = stream(start + 20 * 60, ramp(start, 600), lambda v, a: 0.08 if v == "8" else 0.004)
    records = run(config(), events)
    opened = [r for r in records if r["kind"] == "incident" and r["state"] == "opened"]
    assert len(opened) == 1 and opened[0]["version"] == "8"
    rollbacks = [r for r in records if r.get("action") == "rollback"]
    assert rollbacks and rollbacks[0]["from_version"] == "8" and rollbacks[0]["to_version"] == "7"
    assert rollbacks[0]["status"] == "succeeded"
    # Within 15 minutes of the ramp's start, while 7 still served a share of the traffic.
    assert rollbacks[0]["ts"] - (T0 + start) <= 15 * 60
    firing = [r for r in records if r["kind"] == "alert" and r["state"] == "firing"][0]
    assert firing["version"] == "8"
    assert firing["measurement"]["evidence"]["version_share"] == "8"
    assert set(firing["measurement"]["evidence"]["version_shares"]) <= {"7", "8"}


def test_a_healthy_rolling_update_raises_nothing():
    start = 30 * 60
    events = stream(start + 20 * 60, ramp(start, 600), lambda v, a: 0.004)
    records = run(config(), events)
    assert [r for r in records if r["kind"] in ("alert", "incident", "action")] == []


def test_judged_per_version_the_rollback_comes_before_the_whole_window_would_breach(monkeypatch):
    """The same update with the split switched off for error_rate: 8's errors, diluted by 7,
    breach only once 8 serves most of the traffic."""
    import rollbackd.daemon.evaluation as pl

    start = 30 * 60
    events = stream(start + 20 * 60, ramp(start, 600), lambda v, a: 0.08 if v == "8" else 0.004)
    split = [r for r in run(config(), events) if r.get("action") == "rollback"]
    monkeypatch.setattr(pl, "WHOLE_WINDOW_DETECTORS", pl.WHOLE_WINDOW_DETECTORS | {"error_rate"})
    whole = [r for r in run(config(), events) if r.get("action") == "rollback"]
    assert split[0]["ts"] < whole[0]["ts"]
    # Judged whole, the alert names no version: the evidence has no split in it.
    assert "version_share" not in whole[0].get("measurement", {}).get("evidence", {})


def test_a_rollback_skipped_for_want_of_a_target_is_decided_again_when_the_versions_change():
    """Shares too small for min_samples: the whole window breaches, no version is named, 7 serves
    most and nothing came before it, so the rollback is skipped. Once 8 serves most, the same
    incident rolls back 8 -> 7."""
    start = 30 * 60

    def version_at(s: int, u: float) -> str:
        if s < start:
            return "7"
        if s < start + 10 * 60:
            return "8" if u < 0.4 else "7"
        return "8"

    events = stream(start + 25 * 60, version_at, lambda v, a: 0.3 if v == "8" else 0.004)
    records = run(config(min_samples=800), events)
    rollbacks = [r for r in records if r.get("action") == "rollback"]
    assert [r["status"] for r in rollbacks][:2] == ["skipped", "succeeded"]
    assert rollbacks[0]["reason"] == "no_target" and rollbacks[0]["from_version"] == "7"
    assert rollbacks[1]["from_version"] == "8" and rollbacks[1]["to_version"] == "7"
    assert rollbacks[0]["incident_id"] == rollbacks[1]["incident_id"]
    assert rollbacks[1]["ts"] >= T0 + start + 10 * 60


def test_one_region_failing_names_the_region_and_the_others_rate():
    regions = ["us-east", "us-west", "eu-west", "ap-south"]

    def attrs(u: float) -> dict:  # volumes 40, 30, 20 and 10 %: ap-south is pooled as "other"
        return {"region": regions[0 if u < 0.4 else 2 if u < 0.7 else 1 if u < 0.9 else 3]}

    events = stream(40 * 60, lambda s, u: "7",
                    lambda v, a: 0.09 if a["region"] == "eu-west" else 0.004, attrs=attrs)
    # eu-west fails from minute 20 only.
    events = [e if e.attrs["region"] != "eu-west" or e.ts >= T0 + 1200 or e.error is None
              else Prediction(id=e.id, ts=e.ts, deployment=e.deployment, model_version="7",
                              score=0.5, attrs=e.attrs) for e in events]
    records = run(config(extra=", slice_by: [attrs.region], slice_top_k: 3"), events)
    opened = [r for r in records if r["kind"] == "incident" and r["state"] == "opened"]
    assert len(opened) == 1
    firing = [r for r in records if r["kind"] == "alert" and r["state"] == "firing"][0]
    ev = firing["measurement"]["evidence"]
    assert ev["segment"] == "region=eu-west"
    assert [b["slice"] for b in ev["slices_breaching"]] == ["region=eu-west"]
    assert firing["ts"] >= T0 + 1200
    assert 0.0 <= ev["others_value"] < 0.01 and firing["measurement"]["value"] > 0.05
    text = where(firing["measurement"])
    assert text.startswith("in region=eu-west (others ") and text.endswith(")")


def test_healthy_regions_raise_nothing():
    regions = ["us-east", "us-west", "eu-west", "ap-south"]
    events = stream(30 * 60, lambda s, u: "7", lambda v, a: 0.004,
                    attrs=lambda u: {"region": regions[min(3, int(u * 4))]})
    records = run(config(extra=", slice_by: [attrs.region]"), events)
    assert [r for r in records if r["kind"] in ("alert", "incident")] == []


# The judging functions on their own -------------------------------------------------------
RULE = RuleSpec(name="r", detector="error_rate", threshold=0.02, alpha=0.01, min_samples=10,
                clear_threshold=0.01)


def m(value, p=None, n=100, insufficient=None):
    if insufficient:
        return Measurement.insufficient_data(0.02, n, insufficient)
    return Measurement(value, 0.02, n, p_value=p)


def test_a_breaching_share_steps_the_alert_and_is_named():
    chosen = judge_versions(RULE, None, m(0.015, 0.2), [("7", m(0.004, 0.9)), ("8", m(0.08, 1e-6))])
    assert chosen.value == 0.08 and chosen.evidence["version_share"] == "8"
    assert chosen.evidence["version_shares"]["7"] == {"value": 0.004, "n": 100}


def test_no_share_breaching_leaves_the_whole_window_to_judge():
    whole = m(0.03, 0.001, n=200)  # pooled: significant; each share alone: not
    chosen = judge_versions(RULE, None, whole, [("7", m(0.03, 0.05)), ("8", m(0.03, 0.05))])
    assert chosen.value == whole.value and "version_share" not in chosen.evidence
    assert set(chosen.evidence["version_shares"]) == {"7", "8"}
    insufficient = [("7", m(None, insufficient="few")), ("8", m(None, insufficient="few"))]
    assert judge_versions(RULE, None, whole, insufficient).value == whole.value


def test_an_active_alert_is_held_by_the_share_past_clear():
    firing = Alert("r", "d", "primary", state=AlertState.FIRING)
    whole = m(0.008, 0.9)  # below clear: judged whole the alert would resolve
    chosen = judge_versions(RULE, firing, whole, [("7", m(0.002, 0.9)), ("8", m(0.015, 0.1))])
    assert chosen.value == 0.015 and chosen.evidence["version_share"] == "8"
    # Not active: the same non-breaching share does not step it.
    idle = judge_versions(RULE, None, whole, [("7", m(0.002, 0.9)), ("8", m(0.015, 0.1))])
    assert idle.value == whole.value and "version_share" not in idle.evidence


def test_slice_p_values_are_holm_adjusted():
    # Four slices with raw p 0.004: alone each breaches at alpha 0.01; Holm multiplies the
    # smallest by 4 (0.016), so none does.
    slices = [(f"region={r}", m(0.05, 0.004)) for r in "abcd"]
    chosen = judge_slices(RULE, None, adjust_parts(slices))
    assert chosen.p_value == pytest.approx(0.016)
    assert chosen.evidence["slices_breaching"] == []
    one = [("region=a", m(0.09, 1e-6))] + [(f"region={r}", m(0.004, 0.9)) for r in "bcd"]
    chosen = judge_slices(RULE, None, adjust_parts(one))
    assert chosen.evidence["segment"] == "region=a" and chosen.p_value == pytest.approx(4e-6)
    assert chosen.evidence["others_value"] == pytest.approx(0.004)


def test_slices_beyond_top_k_are_pooled_as_other():
    preds = [Prediction(id=f"{i}", ts=T0 + i, deployment="d", model_version="1",
                        attrs={"region": r}) for i, r in enumerate("aaaabbbccd")]
    w = Window("d", "primary", T0, T0 + 60, preds)
    parts = slice_windows(w, [("attrs", "region")], 2)
    assert [(p.segment, p.n) for p in parts] == [("region=a", 4), ("region=b", 3), ("other", 3)]


def test_version_shares_split_predictions_and_labels_by_version():
    from rollbackd.detectors.base import Labeled

    preds = [Prediction(id=f"{i}", ts=T0 + i, deployment="d", model_version=v) for i, v in enumerate("7787")]
    outs = [Labeled(T0 - 100, T0 + 5, "primary", "6", 1, 0.9, 1)]
    w = Window("d", "primary", T0, T0 + 60, preds, outs)
    assert [(s.version, s.n) for s in version_shares(w, labels=False)] == [("7", 3), ("8", 1)]
    with_labels = version_shares(w, labels=True)
    assert [(s.version, s.n, len(s.outcomes)) for s in with_labels] == [("6", 0, 1), ("7", 3, 0), ("8", 1, 0)]
    single = Window("d", "primary", T0, T0 + 60, preds[:2])
    assert version_shares(single, labels=True) == []


def test_a_label_based_rule_is_sliced_by_the_prediction_s_attrs():
    """Recall per region: each label carries its prediction's slice through the join."""
    from rollbackd.events import Outcome

    cfg = load_config_text("""
version: 1
settings: {lateness: 5s, notifier: {type: none}}
grouping: {group_by: [deployment, variant], group_wait: 0s, repeat_interval: 4h}
deployments:
  fraud: {backend: {type: log}}
rules:
  - {name: recall, detector: model_quality, params: {metric: recall}, threshold: 0.6,
     direction: below, alpha: 0.01, for: 2m, min_samples: 50, slice_by: [attrs.region],
     severity: critical, actions: [notify]}
""")
    rng = np.random.default_rng(3)
    regions = ["us-east", "eu-west", "ap-south"]
    events = []
    for s in range(40 * 60):
        for j in range(5):
            t = T0 + s + j / 5
            region = regions[int(rng.random() * 3)]
            y = rng.random() < 0.3
            miss = 0.85 if region == "eu-west" and s >= 20 * 60 else 0.1
            yhat = (not y) if (y and rng.random() < miss) or (not y and rng.random() < 0.05) else y
            pid = f"p{s}-{j}"
            events.append(Prediction(id=pid, ts=t, deployment="fraud", model_version="1",
                                     prediction=bool(yhat), attrs={"region": region}))
            events.append(Outcome(id=pid, ts=t + 30, deployment="fraud", label=bool(y)))
    events.sort(key=lambda e: e.ts)
    records = run(cfg, events)
    fired = [r for r in records if r["kind"] == "alert" and r["state"] == "firing"]
    assert len(fired) == 1
    evidence = fired[0]["measurement"]["evidence"]
    assert evidence["segment"] == "region=eu-west"
    assert fired[0]["measurement"]["value"] < 0.4 and evidence["others_value"] > 0.8
    assert T0 + 20 * 60 <= fired[0]["ts"] <= T0 + 30 * 60
