"""Rule unit tests (``rollbackd test-rules``): a correct file passes, a wrong one fails with a
clear expected-against-got diff, an invalid one is refused with every error and its line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rollbackd.events import Deploy, Outcome, Prediction
from rollbackd.ruletests import (
    RuleTestError,
    exit_code,
    format_results,
    run_rule_tests,
    series_events,
)

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"

GOOD = """\
rule_files: [rules.yaml]
tests:
  - name: sustained errors fire within three minutes of the bad deploy
    input: {scenario: sustained_errors}
    expect:
      - {rule: serving-error-rate, deployment: demo-scorer, variant: primary, state: firing, after: 15m, at_or_before: 18m}
      - {rule: feature-drift, deployment: demo-scorer, state: none}
  - name: a one-minute blip is seen but never fires
    input: {scenario: error_blip}
    expect:
      - {rule: serving-error-rate, deployment: demo-scorer, state: pending, at_or_before: 16m}
      - {rule: serving-error-rate, deployment: demo-scorer, state: none}
  - name: a synthetic series with a bad version 2
    input:
      series:
        - deployment: fraud-scorer
          rate: 20
          version: "1 x15 2 x10"
          error_rate: "0.005 x15 0.3 x10"
          latency_ms: 20
    expect:
      - {rule: serving-error-rate, deployment: fraud-scorer, state: firing, after: 15m, at_or_before: 19m}
      - {rule: serving-error-rate, deployment: fraud-scorer, state: none, at_or_before: 15m}
      - {rule: p99-latency, deployment: fraud-scorer, state: none}
"""

WRONG = """\
rule_files: [rules.yaml]
tests:
  - name: expects the error alert too early and a latency alert that never comes
    input: {scenario: sustained_errors}
    expect:
      - {rule: serving-error-rate, deployment: demo-scorer, state: firing, at_or_before: 16m}
      - {rule: p99-latency, deployment: demo-scorer, variant: primary, state: firing}
      - {rule: feature-drift, deployment: demo-scorer, state: none}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(RULES, tmp_path / "rules.yaml")
    return tmp_path


def test_a_correct_test_file_passes(folder):
    (folder / "good.yaml").write_text(GOOD)
    results = run_rule_tests(folder / "good.yaml")
    assert [r.ok for r in results] == [True, True, True], format_results(results)
    assert exit_code(results) == 0
    text = format_results(results, folder / "good.yaml")
    assert text.count("  PASS  ") == 3 and text.endswith("3 passed, 0 failed\n")


def test_a_wrong_test_file_fails_with_a_clear_diff(folder):
    (folder / "wrong.yaml").write_text(WRONG)
    results = run_rule_tests(folder / "wrong.yaml")
    (r,) = results
    assert not r.ok and exit_code(results) == 1
    assert [c.ok for c in r.checks] == [False, False, True]
    text = format_results(results)
    assert "  FAIL  expects the error alert too early" in text and "(2 of 3 expectation(s) failed" in text
    lines = text.splitlines()
    i = lines.index("        - expected: serving-error-rate demo-scorer/* firing at or before +16m   (line 6)")
    assert lines[i + 1] == (
        # pending on the window of the deploy: version 2's share of it (its errors alone)
        "        + got:      serving-error-rate demo-scorer/primary pending at +15m40s (value 0.199), "
        "firing at +17m40s (value 0.2086)"
    )
    i = lines.index("        - expected: p99-latency demo-scorer/primary firing at any time   (line 7)")
    assert lines[i + 1] == "        + got:      p99-latency demo-scorer/primary never pending, never fired"
    assert text.endswith("0 passed, 1 failed\n")


def test_an_invalid_file_is_refused_with_every_error_and_its_line(folder):
    (folder / "bad.yaml").write_text(
        "rule_files: [rules.yaml]\n"
        "tests:\n"
        "  - name: bad\n"
        "    input: {scenario: nope}\n"
        "    expect:\n"
        "      - {rule: serving-error-rate, deployment: d, state: burning}\n"
        "      - {rule: no-such-rule, deployment: d, state: firing, at_or_before: soon}\n"
        "  - input: {series: [{deployment: d, error_rate: '0.1 x3', rate: '1 x2'}]}\n"
        "    expect: [{rule: serving-error-rate, deployment: d, state: none}]\n"
    )
    with pytest.raises(RuleTestError) as exc:
        run_rule_tests(folder / "bad.yaml")
    errors = "\n".join(exc.value.errors)
    bad = folder / "bad.yaml"
    assert f"{bad}:4: tests[0].input.scenario: unknown scenario 'nope'" in errors
    assert f"{bad}:6: tests[0].expect[0].state: 'burning' is not one of firing, pending, resolved, none" in errors
    assert f"{bad}:7: tests[0].expect[1].at_or_before: expected an offset" in errors
    assert f"{bad}:8: tests[1].name: required" in errors
    assert "rate has 2 steps, others 3" in errors
    # Once the file is well-formed, unknown rules are named too.
    (folder / "bad2.yaml").write_text(
        "rule_files: [rules.yaml]\ntests:\n  - name: x\n    input: {scenario: stationary}\n"
        "    expect: [{rule: no-such-rule, deployment: d, state: none}]\n"
    )
    with pytest.raises(RuleTestError, match="rule 'no-such-rule' is not in the rule files"):
        run_rule_tests(folder / "bad2.yaml")
    with pytest.raises(RuleTestError, match="rules-missing.yaml"):
        (folder / "bad3.yaml").write_text("rule_files: [rules-missing.yaml]\ntests: [{name: x, input: {scenario: stationary}, expect: [{rule: a, deployment: d, state: none}]}]\n")
        run_rule_tests(folder / "bad3.yaml")


def test_a_missing_recording_fails_that_test_only(folder):
    (folder / "t.yaml").write_text(
        "rule_files: [rules.yaml]\ntests:\n"
        "  - name: gone\n    input: {recording: nowhere.jsonl}\n"
        "    expect: [{rule: serving-error-rate, deployment: d, state: none}]\n"
    )
    (r,) = run_rule_tests(folder / "t.yaml")
    assert not r.ok and "nowhere.jsonl" in r.error
    assert "FAIL  gone: FileNotFoundError" in format_results([r])


def test_series_are_deterministic_and_exact():
    series = [{"deployment": "d", "variant": "canary", "interval": "1m", "rate": 10, "version": "1 x2 2",
               "error_rate": "0 0.5 x2", "model_error": 0.25, "label_fraction": 0.5, "label_delay": "10s"}]
    events = series_events(series, start=0.0)
    assert events == series_events(series, start=0.0)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    preds = [e for e in events if type(e) is Prediction]
    assert len(preds) == 3 * 600
    errors_per_step = [sum(1 for p in preds if p.error and k * 60 <= p.ts < (k + 1) * 60) for k in range(3)]
    assert errors_per_step == [0, 300, 300]
    deploys = [(e.ts, e.model_version) for e in events if type(e) is Deploy]
    assert deploys == [(0.0, "1"), (120.0, "2")]
    by_id = {p.id: p for p in preds}
    outcomes = [e for e in events if type(e) is Outcome]
    assert len(outcomes) == 300 + 150 + 150  # half of each step's successful predictions
    wrong = sum(1 for o in outcomes if o.label != by_id[o.id].prediction)
    assert wrong == 300 // 4 + 150 // 4 + 150 // 4
    assert all(o.ts == by_id[o.id].ts + 10.0 for o in outcomes)
    assert {p.variant for p in preds} == {"canary"}
