"""Rules for fleets: a rule's ``deployments`` and ``variants`` by glob and by label (issue 14.6).

The fleet: 20 binary fraud models of team risk, 10 binary churn models of team growth, one
regression model of team risk. "Every binary classifier of team risk" is one rule.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.rules.budget import WEEK, allocate, estimate
from rollbackd.rules.loader import ConfigError, check_text, load_config_text, summarize
from rollbackd.rules.loading.scope import glob_problem, parse_matcher
from rollbackd.rules.model import LabelMatcher
from rollbackd.scenarios import Fault, Scenario, generate

FRAUD = [f"fraud-{i:02d}" for i in range(1, 21)]
CHURN = [f"churn-{i:02d}" for i in range(1, 11)]
FLEET_DEPLOYMENTS = "\n".join(
    [f"  {d}: {{labels: {{task: binary, team: risk}}}}" for d in FRAUD]
    + [f"  {d}: {{labels: {{task: binary, team: growth}}}}" for d in CHURN]
    + ["  price: {labels: {task: regression, team: risk}}"]
)
RULE = "detector: error_rate, threshold: 0.05, alpha: 0.01, window: {size: 1m}, for: 2m, min_samples: 50"


def fleet(rules: str, deployments: str = FLEET_DEPLOYMENTS) -> str:
    return (
        "version: 1\n"
        "settings: {lateness: 30s, join_horizon: 1h, notifier: {type: none}}\n"
        "grouping: {group_wait: 30s}\n"
        f"deployments:\n{deployments}\n"
        f"rules:\n{textwrap.dedent(rules).strip()}\n"
    )


FLEET_RULES = f"""
- {{name: risk-binary, {RULE}, deployments: {{labels: {{task: binary, team: risk}}}}}}
- {{name: churn-glob, {RULE}, deployments: [churn-*], variants: ["prim*"]}}
- {{name: not-regression, {RULE}, deployments: {{matchers: ['task!="regression"']}}}}
- {{name: risk-or-growth-fraud, {RULE},
    deployments: {{names: ["fraud-0?"], labels: {{team: [risk, growth]}}}}}}
- {{name: regex, {RULE}, deployments: {{matchers: ['team=~"ri.*"', 'task!~"bin.*"']}}}}
- {{name: listed, {RULE}, deployments: [price, fraud-01]}}
- {{name: everywhere, {RULE}}}
"""


def covered(config, rule: str) -> list[str]:
    r = next(r for r in config.rules if r.name == rule)
    return [d for d in config.deployments if r.covers(d)]


def test_globs_and_labels_choose_the_right_deployments_of_the_fleet() -> None:
    config, issues = check_text(fleet(FLEET_RULES))
    assert config is not None, issues
    assert [i for i in issues if i.severity == "error"] == []
    assert len(config.deployments) == 31
    assert config.deployments["price"].labels == {"task": "regression", "team": "risk"}
    assert covered(config, "risk-binary") == FRAUD
    assert covered(config, "churn-glob") == CHURN
    assert covered(config, "not-regression") == FRAUD + CHURN
    assert covered(config, "risk-or-growth-fraud") == FRAUD[:9]
    assert covered(config, "regex") == ["price"]
    assert covered(config, "listed") == ["fraud-01", "price"]
    assert covered(config, "everywhere") == FRAUD + CHURN + ["price"]

    rules = {r.name: r for r in config.rules}
    # Undeclared deployments have no labels: only a name glob (or no choice) takes them in.
    assert not rules["risk-binary"].applies_to("fraud-99", "primary")
    assert not rules["not-regression"].applies_to("fraud-99", "primary")
    assert rules["churn-glob"].applies_to("churn-99", "primary")
    assert rules["everywhere"].applies_to("anything", "primary")
    # Variants by glob; globs are case-sensitive.
    assert rules["churn-glob"].applies_to("churn-01", "primary")
    assert not rules["churn-glob"].applies_to("churn-01", "canary")
    assert not rules["churn-glob"].applies_to("Churn-01", "primary")
    assert not rules["churn-glob"].applies_to("churn-01", "Primary")
    # Existing files keep their meaning: a plain name is itself, not a prefix.
    assert not rules["listed"].applies_to("fraud-011", "primary")


def test_applies_to_decides_once_per_name() -> None:
    config = load_config_text(fleet(FLEET_RULES))
    rule = next(r for r in config.rules if r.name == "churn-glob")
    for _ in range(3):
        assert rule.applies_to("churn-03", "primary")
        assert not rule.applies_to("fraud-03", "primary")
    assert rule._verdicts == {("churn-03", "primary"): True, ("fraud-03", "primary"): False}


def test_label_matchers_follow_alertmanager() -> None:
    assert parse_matcher('team="risk"') == LabelMatcher("team", "=", "risk")
    assert parse_matcher(' team != "a\\"b" ') == LabelMatcher("team", "!=", 'a"b')
    m = parse_matcher('task=~"bin|multi"')
    assert isinstance(m, LabelMatcher)
    assert m.matches({"task": "bin"}) and not m.matches({"task": "binary"})  # anchored
    # A missing label is "": != matches it, = does not.
    assert parse_matcher('team!="risk"').matches({})  # type: ignore[union-attr]
    assert not parse_matcher('team="risk"').matches({})  # type: ignore[union-attr]
    assert parse_matcher('team=~""').matches({})  # type: ignore[union-attr]
    assert str(parse_matcher('team=~"r\\"x"')) == 'team=~"r\\"x"'


def test_glob_problems() -> None:
    assert glob_problem("fraud-*") is None
    assert glob_problem("fraud-[0-9][!x]?") is None
    assert glob_problem("[[]x") is None
    assert "never closed" in glob_problem("fraud-[0-9")  # type: ignore[operator]
    assert "empty" in glob_problem("fraud-[z-a]")  # type: ignore[operator]


# -- validate ----------------------------------------------------------------------------------


def rollbackd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "rollbackd.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, timeout=120)


def test_validate_lists_what_each_rule_covers(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(fleet(FLEET_RULES))
    out = rollbackd("validate", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    lines = text.splitlines()
    assert "  price: labels task=regression, team=risk, backend log," in text

    def covers(rule: str) -> str:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {rule}: "))
        return lines[at + 1]

    assert lines[next(i for i, x in enumerate(lines) if x.startswith("  risk-binary: "))].endswith(
        "; labels task=binary, team=risk"
    )
    assert covers("risk-binary") == "    covers 20 of 31 declared: " + ", ".join(FRAUD)
    assert covers("churn-glob") == (
        "    covers 10 of 31 declared: " + ", ".join(CHURN)
        + "; plus any undeclared deployment matching churn-*"
    )
    assert covers("not-regression") == "    covers 30 of 31 declared: " + ", ".join(FRAUD + CHURN)
    assert covers("regex") == "    covers 1 of 31 declared: price"
    assert covers("everywhere") == (
        "    covers 31 of 31 declared: " + ", ".join(FRAUD + CHURN + ["price"])
        + "; plus any undeclared deployment seen in the stream"
    )
    # A list of plain names says what it covers on the rule's own line.
    assert not covers("listed").startswith("    covers")
    assert "Traceback" not in out.stderr.decode()


ERRORS = [
    # (rules, path, message)
    (f"- {{name: r1, {RULE}, deployments: ['fraud-[0-9']}}",
     "rules[0].deployments[0]",
     "rule 'r1': invalid glob 'fraud-[0-9': `[` at position 7 is never closed (write `[[]` for a "
     "literal `[`)"),
    (f"- {{name: r2, {RULE}, variants: ['can[z-a]']}}",
     "rules[0].variants[0]",
     "rule 'r2': invalid glob 'can[z-a]': a character range in it is empty (e.g. `[z-a]`), so it "
     "matches nothing"),
    (f"- {{name: r3, {RULE}, deployments: {{matchers: ['team=risk']}}}}",
     "rules[0].deployments.matchers[0]",
     "rule 'r3': 'team=risk' is not a matcher: write label, one of = != =~ !~, then a "
     'double-quoted value, e.g. team="risk" or task=~"binary|multiclass"'),
    (f"- {{name: r4, {RULE}, deployments: {{matchers: ['team=~\"(risk\"']}}}}",
     "rules[0].deployments.matchers[0]",
     "rule 'r4': invalid regular expression '(risk' in 'team=~\"(risk\"': missing ), unterminated "
     "subpattern at position 0"),
    (f"- {{name: r5, {RULE}, deployments: {{labels: {{9team: risk}}}}}}",
     "rules[0].deployments.labels",
     "rule 'r5': a label name is a letter or _ then letters, digits or _, got '9team'"),
    (f"- {{name: r6, {RULE}, deployments: {{}}}}",
     "rules[0].deployments",
     "rule 'r6': name the deployments: names, labels, matchers (or leave the key out for all)"),
    (f"- {{name: r7, {RULE}, deployments: [fraud-1]}}",
     "rules[0].deployments[0]",
     "unknown deployment 'fraud-1'"),
]


@pytest.mark.parametrize("rules,path,message", ERRORS, ids=[e[1] + e[2][:8] for e in ERRORS])
def test_each_error_names_the_rule_and_its_place(rules: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config_text(fleet(rules))
    (error,) = exc.value.errors
    assert error.path == path
    assert error.message.startswith(message), error.message


def test_a_label_matcher_needs_labelled_deployments() -> None:
    text = fleet(
        f"- {{name: by-team, {RULE}, deployments: {{labels: {{team: risk}}}}}}",
        deployments="  fraud-01: {}\n  price: {cooldown: 1h}",
    )
    with pytest.raises(ConfigError) as exc:
        load_config_text(text)
    (error,) = exc.value.errors
    assert (error.path, error.line) == ("rules[0].deployments", 8)
    assert error.message == (
        "rule 'by-team': chooses deployments by label, but no deployment in `deployments:` has "
        "labels (a deployment seen only in the stream has none); give them some, e.g. "
        "`deployments: {fraud-eu: {labels: {task: binary, team: risk}}}`"
    )


def test_a_choice_that_matches_no_declared_deployment_is_a_warning() -> None:
    config, issues = check_text(fleet(f"""
        - {{name: typo, {RULE}, deployments: {{labels: {{tem: risk}}}}}}
        - {{name: nobody, {RULE}, deployments: {{labels: {{team: search}}}}}}
        - {{name: later, {RULE}, deployments: [search-*]}}
        - {{name: fine, {RULE}, deployments: [fraud-*]}}
        """))
    assert config is not None
    assert [(i.severity, i.path, i.message) for i in issues] == [
        ("warning", "rules[0].deployments",
         "rule 'typo': matches none of the 31 declared deployment(s), so it never applies; "
         "no deployment has label 'tem'; did you mean 'team'?"),
        ("warning", "rules[1].deployments",
         "rule 'nobody': matches none of the 31 declared deployment(s), so it never applies"),
        ("warning", "rules[2].deployments",
         "rule 'later': search-* matches none of the 31 declared deployment(s): the rule applies "
         "only to deployments seen in the stream whose name matches"),
    ]


def test_a_deployments_labels_are_checked() -> None:
    config, issues = check_text(fleet(
        f"- {{name: a, {RULE}}}",
        deployments="  fraud-01: {labels: {team: 7, 'bad-name': x}}\n  price: {labels: [x]}",
    ))
    assert config is None
    assert [(i.path, i.message) for i in issues] == [
        ("deployments.fraud-01.labels.team", "expected a string, got an integer (quote it)"),
        ("deployments.fraud-01.labels",
         "a label name is a letter or _ then letters, digits or _, got 'bad-name'"),
        ("deployments.price.labels", "expected a mapping of label to value, got a list"),
    ]


# -- what the budget and the false-alarm estimate count ---------------------------------------


def test_the_estimate_counts_the_deployments_a_pattern_rule_covers() -> None:
    listed = ", ".join(FRAUD)
    config = load_config_text(fleet(f"""
        - {{name: by-label, {RULE}, deployments: {{labels: {{task: binary, team: risk}}}}}}
        - {{name: by-list, {RULE}, deployments: [{listed}]}}
        - {{name: by-glob, {RULE}, deployments: [churn-*]}}
        - {{name: unseen-glob, {RULE}, deployments: [search-*]}}
        - {{name: one, {RULE}, deployments: [price]}}
        """))
    alerts = {r.name: estimate(r, config.deployments, WEEK).alerts for r in config.rules}  # type: ignore[union-attr]
    assert alerts["by-label"] == pytest.approx(alerts["by-list"])
    assert alerts["by-label"] == pytest.approx(20 * alerts["one"])
    assert alerts["by-glob"] == pytest.approx(10 * alerts["one"])
    # A glob that matches nothing declared still covers whatever the stream brings: one at least.
    assert alerts["unseen-glob"] == pytest.approx(alerts["one"])


def test_a_budget_is_spent_by_the_pattern_rules_that_cover_the_deployment() -> None:
    deployments = FLEET_DEPLOYMENTS.replace(
        "  price: {labels: {task: regression, team: risk}}",
        "  price: {labels: {task: regression, team: risk}, false_alarm_budget: {alerts: 1, per: 30d}}",
    ).replace(
        "  fraud-01: {labels: {task: binary, team: risk}}",
        "  fraud-01: {labels: {task: binary, team: risk}, false_alarm_budget: {alerts: 1, per: 30d}}",
    )
    config = load_config_text(fleet(FLEET_RULES, deployments=deployments))
    allocations, _ = allocate(config.deployments, config.rules)
    spent = {(a.deployment, a.rule) for a in allocations}
    assert {r for d, r in spent if d == "price"} == {"regex", "listed", "everywhere"}
    assert {r for d, r in spent if d == "fraud-01"} == {
        "risk-binary", "not-regression", "risk-or-growth-fraud", "listed", "everywhere",
    }


# -- a replay: only the chosen deployments alert ----------------------------------------------


def test_in_a_replay_only_the_chosen_deployments_alert(tmp_path: Path) -> None:
    # Every deployment in the stream fails; fraud-99 is not declared (no labels).
    stream = ("fraud-01", "fraud-02", "churn-01", "price", "fraud-99")
    scenario = Scenario(
        name="fleet", seed=5, deployments=stream, rate=8.0, duration=900.0,
        faults=(Fault("error_rate", start=300.0, magnitude=0.3),),
    )
    rec = tmp_path / "rec.jsonl"
    rec.write_bytes(b"\n".join(generate(scenario)) + b"\n")
    config = load_config_text(fleet(f"""
        - {{name: risk-binary, {RULE}, deployments: {{labels: {{task: binary, team: risk}}}}}}
        - {{name: churn-glob, {RULE}, deployments: [churn-*], variants: ["prim*"]}}
        - {{name: wrong-variant, {RULE}, deployments: [churn-*], variants: ["can*"]}}
        - {{name: fraud-glob, {RULE}, deployments: ["fraud-9?"]}}
        """))
    pipeline = build_pipeline(config, decisions=DecisionLog(tmp_path / "decisions.jsonl"),
                              dead_letter_path=tmp_path / "dead.jsonl",
                              notifier=ConsoleNotifier(stream=io.StringIO()))
    replay(open_recording(str(rec), config), pipeline)
    records = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    firing = {(r["rule"], r["deployment"]) for r in records
              if r.get("kind") == "alert" and r.get("state") == "firing"}
    assert firing == {
        ("risk-binary", "fraud-01"), ("risk-binary", "fraud-02"),
        ("churn-glob", "churn-01"),
        ("fraud-glob", "fraud-99"),
    }


def test_the_fleet_example_in_the_docs_is_valid() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "rules.md").read_text()
    section = doc[doc.index("### Choosing deployments"):doc.index("## How an alert moves")]
    example = section[section.index("```yaml\n") + 8:]
    example = example[:example.index("```")]
    config, issues = check_text(example)
    assert config is not None, issues
    assert [d for d in config.deployments if config.rules[0].covers(d)] == ["fraud-eu", "fraud-us"]
    assert [d for d in config.deployments if config.rules[1].covers(d)] == ["fraud-eu", "fraud-us", "churn-01"]
    assert config.rules[2].applies_to("churn-11", "canary")
    assert not config.rules[2].applies_to("churn-11", "primary")
    assert "covers 2 of 4 declared: fraud-eu, fraud-us" in summarize(config)


def test_a_silence_may_name_a_deployment_only_a_glob_covers(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(fleet(FLEET_RULES))
    common = ("--for", "1h", "--reason", "maintenance", "--by", "alice", "-c", str(path),
              "--db", str(tmp_path / "ledger.db"))
    ok = rollbackd("silence", "add", "--deployment", "churn-42", *common, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    # Not declared and no rule's glob takes it in ("everywhere" covers any name, but names none).
    refused = rollbackd("silence", "add", "--deployment", "search-01", *common, cwd=tmp_path)
    assert refused.returncode == 2
    assert "has no deployment 'search-01'" in refused.stderr.decode()


def test_with_nothing_declared_validate_says_a_glob_covers_the_stream() -> None:
    config = load_config_text(textwrap.dedent(f"""
        rules:
          - {{name: a, {RULE}, deployments: [fraud-*]}}
          - {{name: b, {RULE}}}
        """))
    lines = summarize(config).splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("  a: "))
    assert lines[at + 1] == "    covers any deployment seen in the stream matching fraud-*"
    assert lines[at + 2].startswith("  b: ") and lines[at + 2].endswith("; all deployments")
