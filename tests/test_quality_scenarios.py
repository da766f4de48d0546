"""Issue 14's checks, end to end: each new built-in scenario replayed under its example rules.

- a recall collapse with calibrated scores is rolled back by the recall rule within 20 minutes,
  without a calibration rule firing;
- a rolling update where only the new version fails is rolled back to the old version within
  15 minutes of the ramp's start; a healthy one raises nothing;
- a daily cycle over three days raises no alert with same_time, and does without it;
- one region failing opens an incident that names the region, the others unaffected;
- backtest scores each against the scenario's truth, a region fault only when the slice is named.
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import pytest

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.drills import load_truth, score_truth
from rollbackd.rules.loader import load_config, load_config_text
from rollbackd.scenarios import BUILTIN, scenario_truth, write_recording

EXAMPLES = Path(str(resources.files("rollbackd") / "examples"))
MIN = 60.0


def run(name: str, rules_text: str | None = None, rules: str | None = None, tmp: Path | None = None):
    assert tmp is not None
    rec = tmp / f"{name}.jsonl.gz"
    if not rec.exists():
        write_recording(BUILTIN[name], rec)
    config = load_config_text(rules_text) if rules_text is not None else load_config(EXAMPLES / rules)
    decisions = MemoryDecisions()
    pipeline = build_pipeline(config, decisions=decisions, notifier=ConsoleNotifier(stream=io.StringIO()))
    replay(open_recording(str(rec), config), pipeline)
    return config, decisions.records


def firing(records):
    return [r for r in records if r["kind"] == "alert" and r["state"] == "firing"]


def rollbacks(records):
    return [r for r in records if r.get("action") == "rollback" and r.get("status") == "succeeded"]


def fault_start(name: str) -> float:
    s = BUILTIN[name]
    starts = [f.start for f in s.faults] + [r.start for r in getattr(s, "ramps", ())]
    return s.start + min(starts)


def test_a_recall_collapse_is_rolled_back_by_the_recall_rule(tmp_path):
    _, records = run("recall_collapse", rules="recall-collapse.yaml", tmp=tmp_path)
    fired = firing(records)
    assert {r["rule"] for r in fired} == {"fraud-recall"}  # neither calibration nor model_error
    rb = rollbacks(records)[0]
    assert rb["rule"] == "fraud-recall" and (rb["from_version"], rb["to_version"]) == ("4", "3")
    assert rb["ts"] - fault_start("recall_collapse") <= 20 * MIN


def test_a_bad_rolling_update_is_rolled_back_to_the_old_version_while_it_ramps(tmp_path):
    _, records = run("bad_rolling_update", rules="rolling-update.yaml", tmp=tmp_path)
    opened = [r for r in records if r["kind"] == "incident" and r["state"] == "opened"]
    assert [r["version"] for r in opened] == ["8"]
    rb = rollbacks(records)[0]
    assert (rb["from_version"], rb["to_version"]) == ("8", "7")
    assert rb["ts"] - fault_start("bad_rolling_update") <= 15 * MIN
    # Before the ramp ends (at 30 minutes): both versions still served the window that fired.
    fired = firing(records)[0]
    assert set(fired["measurement"]["evidence"]["version_shares"]) == {"7", "8"}


def test_a_healthy_rolling_update_raises_nothing(tmp_path):
    _, records = run("healthy_rolling_update", rules="rolling-update.yaml", tmp=tmp_path)
    assert [r for r in records if r["kind"] in ("alert", "incident", "action")] == []


def test_a_daily_cycle_raises_nothing_with_same_time_and_drift_alerts_without(tmp_path):
    _, records = run("daily_cycle", rules="daily-cycle.yaml", tmp=tmp_path)
    assert [r for r in records if r["kind"] == "alert"] == []
    text = (EXAMPLES / "daily-cycle.yaml").read_text()
    assert "params: {baseline: same_time, period: 1d}" in text
    naive = text.replace("params: {baseline: same_time, period: 1d}", "params: {baseline: first_n}")
    _, records = run("daily_cycle", rules_text=naive, tmp=tmp_path)
    assert {r["rule"] for r in firing(records)} >= {"input-drift-daily"}


def test_one_region_failing_names_the_region(tmp_path):
    config, records = run("one_region_fault", rules="one-region-fault.yaml", tmp=tmp_path)
    opened = [r for r in records if r["kind"] == "incident" and r["state"] == "opened"]
    assert len(opened) == 1
    fired = firing(records)
    assert len(fired) == 1
    evidence = fired[0]["measurement"]["evidence"]
    assert evidence["segment"] == "region=eu-west"
    assert [b["slice"] for b in evidence["slices_breaching"]] == ["region=eu-west"]
    assert evidence["others_value"] < 0.01 < fired[0]["measurement"]["value"]
    assert fired[0]["ts"] >= fault_start("one_region_fault")


@pytest.mark.parametrize("name, rules", [
    ("recall_collapse", "recall-collapse.yaml"),
    ("bad_rolling_update", "rolling-update.yaml"),
    ("one_region_fault", "one-region-fault.yaml"),
    ("daily_cycle_shift", "daily-cycle.yaml"),
])
def test_backtest_scores_each_fault_as_caught(name, rules, tmp_path):
    config, records = run(name, rules=rules, tmp=tmp_path)
    truth = tmp_path / "truth.yaml"
    import yaml

    truth.write_text(yaml.safe_dump({"faults": scenario_truth(BUILTIN[name])}))
    faults = load_truth(truth)
    s = BUILTIN[name]
    scores = score_truth(records, faults, config.rules, (s.start, s.start + s.duration))
    expected = sum(sc.expected for sc in scores.values())
    assert expected >= 1
    assert sum(sc.detected for sc in scores.values()) == expected, {k: v.missed for k, v in scores.items()}
    assert sum(sc.false_alerts for sc in scores.values()) == 0


def test_a_region_fault_is_not_caught_by_an_episode_naming_another_region(tmp_path):
    config, records = run("one_region_fault", rules="one-region-fault.yaml", tmp=tmp_path)
    for r in records:
        if r["kind"] == "alert" and r["state"] == "firing":
            r["measurement"]["evidence"]["segment"] = "region=us-east"
    truth = tmp_path / "truth.yaml"
    import yaml

    truth.write_text(yaml.safe_dump({"faults": scenario_truth(BUILTIN["one_region_fault"])}))
    s = BUILTIN["one_region_fault"]
    scores = score_truth(records, load_truth(truth), config.rules, (s.start, s.start + s.duration))
    assert sum(sc.detected for sc in scores.values()) == 0
