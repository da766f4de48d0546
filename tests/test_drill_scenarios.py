"""Every built-in drill scenario is caught by the rule meant for it, and by nothing else, with
the example rules a team would start from (rollbackd/examples/drills.yaml): a backtest against
each scenario's own truth file."""

from __future__ import annotations

from importlib import resources

import pytest

from rollbackd.drills import backtest
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, scenario_truth, write_recording

# scenario -> (rule expected to catch it, the most detection delay allowed in seconds)
CASES = {
    "sustained_errors": ("serving-errors", 4 * 60),
    "bad_canary": ("canary-vs-stable", 3 * 60),
    "feature_shift": ("input-drift", 4 * 60),
    "calibration_decay": ("calibration", 8 * 60),
    "label_delay": ("model-error", 35 * 60),  # labels arrive 10-30 minutes late
    "traffic_stop": ("no-traffic", 3 * 60),
    "stationary": (None, 0),
}


@pytest.fixture(scope="module")
def config():
    with resources.as_file(resources.files("rollbackd") / "examples" / "drills.yaml") as path:
        return load_config(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_scenario_is_caught_by_its_rule_without_false_alerts(name, config, tmp_path):
    rec = tmp_path / f"{name}.jsonl"
    write_recording(BUILTIN[name], rec)
    result = backtest(str(rec), config, truth=scenario_truth(BUILTIN[name])).to_record()
    scores = result["a"]["scores"]
    rule, max_delay = CASES[name]
    assert {r: s["false_alerts"] for r, s in scores.items() if s["false_alerts"]} == {}
    if rule is None:
        assert result["a"]["fired"] == []
        return
    s = scores[rule]
    assert (s["expected"], s["detected"], s["missed"]) == (1, 1, 0)
    assert 0 < s["delays"][0] <= max_delay
