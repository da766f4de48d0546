"""The rules-file loader: every error in one pass, each at its line; defaults; the example."""

from __future__ import annotations

import os
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from rollbackd.detectors.base import REGISTRY, Measurement
from rollbackd.rules import loader
from rollbackd.rules.alerts import Alert, step
from rollbackd.rules.durations import format_duration, parse_duration
from rollbackd.rules.loader import (
    FALLBACK_DETECTORS,
    ConfigError,
    ConfigIssue,
    check_text,
    known_detectors,
    load_config,
    load_config_text,
    summarize,
    validate_file,
)
from rollbackd.rules.model import RuleSpec, WindowSpec


def text(s: str) -> str:
    return textwrap.dedent(s).lstrip("\n")


def errors_of(yaml_text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text(yaml_text), "rules.yaml")
    return info.value.errors


def places(issues: list[ConfigIssue]) -> list[tuple[int, int, str]]:
    return [(i.line, i.column, i.path) for i in issues]


MINIMAL = """
deployments:
  fraud-scorer: {}
rules:
  - name: errors
    detector: error_rate
    threshold: 0.05
"""


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("1w", 604800.0),
        ("1h30m", 5400.0), ("250ms", 0.25), ("1m30s", 90.0), ("1.5h", 5400.0),
        ("2h0m5s", 7205.0), ("0", 0.0), (0, 0.0), (45, 45.0), (2.5, 2.5), (" 10s ", 10.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["", "30", "5 m", "m", "1x", "30m1h", "1m1m", "5m-", "-5m", -1, float("inf"), True, None, [1]],
)
def test_parse_duration_rejects_with_the_accepted_forms(value):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert "30s" in str(info.value) or ">= 0" in str(info.value)


@pytest.mark.parametrize("value", ["-5s", " -1h30m", -5])
def test_a_negative_duration_is_told_it_must_not_be(value):
    with pytest.raises(ValueError, match="must be (finite and )?>= 0"):
        parse_duration(value)


@pytest.mark.parametrize("seconds", [0.0, 0.25, 30.0, 90.0, 5400.0, 86400.0 + 61.5, 604800.0])
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_spelling():
    assert [format_duration(s) for s in (0, 90, 5400, 0.25)] == ["0s", "1m30s", "1h30m", "250ms"]


# --------------------------------------------------------------------------- all errors, placed

SEVERAL_ERRORS = """
version: 1
settings:
  lateness: 30 seconds
  notifer: {type: console}
deployments:
  fraud-scorer:
    backend: {type: webhook, timeout: 5s}
    cooldwn: 30m
rules:
  - name: a
    detector: error_rat
    threshold: 0.05
    clear_threshold: 0.08
    k_of_n: [5, 3]
    deployments: [fraud-scorr]
    window: {size: 1m, step: 2m}
  - name: a
    detector: latency
    threshold: high
    params: {quantle: 0.5}
    for: 2 minutes
    severity: urgent
    actions: [notify, page]
  - detector: drift
    threshold: 0.2
    direction: sideways
"""


def test_every_error_is_reported_at_its_line():
    errors = errors_of(SEVERAL_ERRORS)
    assert places(errors) == [
        (3, 13, "settings.lateness"),
        (4, 3, "settings.notifer"),
        (7, 14, "deployments.fraud-scorer.backend"),
        (8, 5, "deployments.fraud-scorer.cooldwn"),
        (11, 15, "rules[0].detector"),
        (13, 22, "rules[0].clear_threshold"),
        (14, 13, "rules[0].k_of_n"),
        (15, 19, "rules[0].deployments[0]"),
        (16, 30, "rules[0].window.step"),
        (17, 11, "rules[1].name"),
        (19, 16, "rules[1].threshold"),
        (20, 14, "rules[1].params.quantle"),
        (21, 10, "rules[1].for"),
        (22, 15, "rules[1].severity"),
        (23, 23, "rules[1].actions[1]"),
        (24, 5, "rules[2]"),
        (26, 16, "rules[2].direction"),
    ]
    messages = [e.message for e in errors]
    assert "30s" in messages[0]
    assert "did you mean 'notifier'?" in messages[1]
    assert "requires `url`" in messages[2]
    assert "did you mean 'cooldown'?" in messages[3]
    assert "did you mean 'error_rate'?" in messages[4]
    assert "clear_threshold must be <= threshold" in messages[5]
    assert "k must be <= n" in messages[6]
    assert "unknown deployment 'fraud-scorr'; did you mean 'fraud-scorer'?" in messages[7]
    assert "must be <= size" in messages[8]
    assert "duplicate rule name 'a' (first on line 10)" in messages[9]
    assert "expected a number" in messages[10]
    assert "did you mean 'quantile'?" in messages[11]
    assert "N windows" in messages[12]
    assert "'urgent' is not one of info, warning, critical" in messages[13]
    assert "'page' is not one of notify, rollback" in messages[14]
    assert "missing required key 'name'" in messages[15]
    assert "'sideways' is not one of above, below" in messages[16]


def test_error_text_lists_every_issue_as_file_line_col_path_message():
    with pytest.raises(ConfigError) as info:
        load_config_text(text(SEVERAL_ERRORS), "conf/rules.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 17
    assert lines[0].startswith(
        "conf/rules.yaml:3:13: settings.lateness: invalid duration '30 seconds'"
    )
    assert lines[1] == (
        "conf/rules.yaml:4:3: settings.notifer: unknown key 'notifer'; did you mean 'notifier'?"
    )


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(text(SEVERAL_ERRORS))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:3:13: ")
    assert [i for i in validate_file(path) if i.severity == "error"] == info.value.errors


def test_unknown_key_without_a_close_match_has_no_suggestion():
    (err,) = errors_of(MINIMAL + "    colour: blue\n")
    assert (err.line, err.path) == (7, "rules[0].colour")
    assert err.message == "unknown key 'colour'"


def test_unknown_top_level_key():
    (err,) = errors_of("rule:\n  - name: x\n")
    assert (err.line, err.column, err.path) == (1, 1, "rule")
    assert "did you mean 'rules'?" in err.message


def test_yaml_syntax_error_is_reported_with_its_line():
    (err,) = errors_of("""
        rules:
          - name: a
            detector: [error_rate
            threshold: 0.05
        """)
    assert err.line == 4 and err.path == ""
    assert err.message.startswith("YAML syntax error:")
    assert "started on line 3" in err.message


def test_a_tab_is_a_syntax_error_at_its_line():
    (err,) = errors_of("rules:\n\t- name: a\n")
    assert err.line == 2 and "YAML syntax error" in err.message


def test_empty_file_and_wrong_top_level_type():
    (err,) = errors_of("")
    assert (err.line, err.message.startswith("the file is empty")) == (1, True)
    (err,) = errors_of("- a\n- b\n")
    assert "expected a mapping" in err.message


def test_duplicate_keys_are_errors():
    (err,) = errors_of(MINIMAL + "    threshold: 0.1\n")
    assert (err.line, err.path) == (7, "rules[0].threshold")
    assert "duplicate key (first set on line 6)" in err.message


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    (err,) = info.value.errors
    assert err.line == 0
    assert str(info.value).startswith(f"{tmp_path / 'missing.yaml'}: cannot read the rules file")


# --------------------------------------------------------------------------- cross-references


def test_clear_threshold_must_be_on_the_clearing_side():
    (err,) = errors_of("""
        rules:
          - {name: a, detector: error_rate, threshold: 0.05, clear_threshold: 0.03}
          - {name: b, detector: error_rate, threshold: 0.5, clear_threshold: 0.6, direction: below}
          - {name: c, detector: error_rate, threshold: 0.5, clear_threshold: 0.4, direction: below}
        """)
    assert (err.line, err.path) == (4, "rules[2].clear_threshold")
    assert "with direction: below, clear_threshold must be >= threshold" in err.message


def test_rule_deployments_must_be_configured():
    errors = errors_of("""
        rules:
          - name: a
            detector: error_rate
            threshold: 0.05
            deployments: [fraud-scorer, fraud-scorer]
        """)
    assert places(errors) == [(5, 33, "rules[0].deployments[1]")]
    assert "listed twice" in errors[0].message
    (err,) = errors_of(MINIMAL + "    deployments: [fraud-scorer, search-ranker]\n")
    assert (err.line, err.path) == (7, "rules[0].deployments[1]")
    assert "unknown deployment 'search-ranker'" in err.message
    assert "configured: fraud-scorer" in err.message


def test_an_invalid_deployment_still_counts_as_configured():
    errors = errors_of("""
        deployments:
          fraud-scorer: {cooldown: soon}
        rules:
          - {name: a, detector: error_rate, threshold: 0.05, deployments: [fraud-scorer]}
        """)
    assert places(errors) == [(2, 28, "deployments.fraud-scorer.cooldown")]


def test_types_of_backends_and_notifiers():
    errors = errors_of("""
        settings:
          notifier: {type: slack, token_env: SLACK_BOT_TOKEN}
        deployments:
          a: {backend: {type: helmfile}}
          b: {backend: {type: webhook, url: "ftp://x", max_attempts: 0}}
          c: {backend: {type: log, url: "https://x"}}
        rules: []
        """)
    assert places(errors) == [
        (2, 13, "settings.notifier"),
        (4, 23, "deployments.a.backend.type"),
        (5, 37, "deployments.b.backend.url"),
        (5, 62, "deployments.b.backend.max_attempts"),
        (6, 28, "deployments.c.backend.url"),
    ]
    assert "type slack requires `channel`" in errors[0].message
    assert "'helmfile' is not one of log, webhook, mlflow, kubernetes, command, traffic-file" in errors[1].message
    assert "http:// or https://" in errors[2].message
    assert "must be >= 1" in errors[3].message
    assert "unknown key 'url'" in errors[4].message


def test_for_and_for_windows_are_exclusive():
    (err,) = errors_of(MINIMAL + "    for: 2m\n    for_windows: 3\n")
    assert (err.line, err.path) == (8, "rules[0].for_windows")


def test_scalar_type_errors():
    errors = errors_of("""
        settings:
          dry_run: "yes"
          max_event_bytes: 1.5
        rules:
          - name: 7
            detector: error_rate
            threshold: .nan
            alpha: 1
            min_samples: -1
            k_of_n: [3]
            variants: []
            window: 1m
        """)
    assert places(errors) == [
        (2, 12, "settings.dry_run"),
        (3, 20, "settings.max_event_bytes"),
        (5, 11, "rules[0].name"),
        (7, 16, "rules[0].threshold"),
        (8, 12, "rules[0].alpha"),
        (9, 18, "rules[0].min_samples"),
        (10, 13, "rules[0].k_of_n"),
        (11, 15, "rules[0].variants"),
        (12, 13, "rules[0].window"),
    ]
    assert "(quote it)" in errors[2].message
    assert "must be < 1" in errors[4].message


def test_detector_names_come_from_the_registry(monkeypatch):
    class Fake:
        def __init__(self, threshold: float, min_samples: int = 1, span: int = 3) -> None:
            if span < 1:
                raise ValueError(f"span must be >= 1, got {span}")

    monkeypatch.setitem(REGISTRY, "fake", Fake)
    config = load_config_text(text("""
        rules:
          - {name: a, detector: fake, threshold: 1, params: {span: 5}}
        """))
    assert config.rules[0].params == {"span": 5}
    errors = errors_of("""
        rules:
          - {name: a, detector: fake, threshold: 1, params: {spam: 5}}
          - {name: b, detector: fake, threshold: 1, params: {span: 0}}
          - {name: c, detector: fake, threshold: 1, params: {threshold: 2}}
        """)
    assert places(errors) == [
        (2, 54, "rules[0].params.spam"),
        (3, 54, "rules[1].params.span"),
        (4, 54, "rules[2].params.threshold"),
    ]
    assert "no parameter 'spam'; did you mean 'span'? (it takes: span)" in errors[0].message
    assert "detector fake rejects this: span must be >= 1, got 0" in errors[1].message
    assert "set by the rule itself" in errors[2].message


def test_every_parameter_a_detector_rejects_is_reported_with_the_rules_other_errors():
    """A constructor stops at its first complaint; the loader still reports each rejected
    parameter, and does so even when another key of the same rule is wrong too."""
    errors = errors_of("""
        rules:
          - name: a
            detector: drift
            threshold: 0.1
            for: soon
            params: {correction: holmes, alpha: 2, test: ks}
        """)
    assert places(errors) == [
        (5, 10, "rules[0].for"),
        (6, 14, "rules[0].params.correction"),
        (6, 34, "rules[0].params.alpha"),
    ]
    assert "got 'holmes'" in errors[1].message and "alpha must be in (0, 1)" in errors[2].message


def test_a_misspelt_parameter_does_not_hide_a_bad_value_of_another():
    errors = errors_of("""
        rules:
          - {name: p99, detector: latency, threshold: 500, params: {quantile: 1.5, estimatr: sketch}}
        """)
    assert [e.path for e in errors] == ["rules[0].params.quantile", "rules[0].params.estimatr"]
    assert "quantile must be in (0, 1)" in errors[0].message and "did you mean 'estimator'" in errors[1].message


def test_a_bad_threshold_is_reported_once_not_again_by_the_detector():
    # the detector is not built without a valid threshold: its complaint would repeat ours
    (err,) = errors_of("rules:\n  - {name: a, detector: calibration, threshold: lots, params: {metric: ece}}\n")
    assert err.path == "rules[0].threshold"


def test_a_detectors_own_range_check_points_at_the_threshold():
    (err,) = errors_of("rules:\n  - {name: a, detector: error_rate, threshold: 2}\n")
    assert (err.line, err.path) == (2, "rules[0].threshold")
    assert "detector error_rate rejects this: threshold must be in [0, 1]" in err.message


def test_fallback_detector_names_when_the_registry_is_empty(monkeypatch):
    import rollbackd.detectors.base as base

    monkeypatch.setattr(base, "REGISTRY", {})
    assert tuple(known_detectors()) == FALLBACK_DETECTORS
    config = load_config_text("rules:\n- {name: a, detector: drift, threshold: 9, params: {x: 1}}")
    assert config.rules[0].detector == "drift"  # names only: parameters cannot be checked


# --------------------------------------------------------------------------- mapping and defaults


def test_defaults_are_applied():
    config = load_config_text(text(MINIMAL))
    (r,) = config.rules
    assert r == RuleSpec(name="errors", detector="error_rate", threshold=0.05)
    assert r.window == WindowSpec(60.0, 60.0, 0) and r.for_ == 0 and (r.k, r.n) == (1, 1)
    assert r.actions == ("notify",) and r.severity == "warning" and r.deployments is None
    dep = config.deployments["fraud-scorer"]
    assert dep.backend.type == "log" and dep.cooldown == 1800.0 and dep.dry_run is None
    assert config.settings.notifier.type == "console" and config.settings.lateness == 30.0
    assert config.grouping.group_by == ("deployment", "variant")
    assert config.source == "<string>"


def test_the_documented_file_maps_onto_the_model(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "fraud.jsonl").write_text("")
    path = tmp_path / "rules.yaml"
    path.write_text(text("""
        version: 1
        settings:
          dry_run: true
          lateness: 1m
          join_horizon: 12h
          max_pending_labels: 1000
          max_event_bytes: 65536
          notifier: {type: slack, token_env: MY_TOKEN, base_url: "http://127.0.0.1:9", channel: "#ml-alerts"}
        grouping: {group_by: [deployment], group_wait: 10s, repeat_interval: 1h}
        deployments:
          fraud-scorer:
            backend: {type: webhook, url: "https://deploy.example/rollback", secret_env: SECRET, timeout: 5s, max_attempts: 4}
            slack_channel: "#fraud-oncall"
            runbook: https://runbooks.example/fraud-scorer
            reference: ref/fraud.jsonl
            reference_size: 100
            cooldown: 1h
            known_good_after: 10m
            dry_run: false
        rules:
          - name: serving-error-rate
            detector: error_rate
            params: {mode: absolute}
            threshold: 0.05
            clear_threshold: 0.03
            direction: above
            alpha: 0.01
            window: {size: 2m, step: 1m, min_count: 500}
            for: 3 windows
            keep_firing_for: 5m
            k_of_n: [3, 5]
            min_samples: 200
            severity: critical
            actions: [notify, rollback]
            deployments: [fraud-scorer]
            variants: [canary]
            dry_run: false
            summary: "Serving errors above 5%"
            runbook: https://runbooks.example/errors
          - name: p99
            detector: latency
            threshold: 250
            window: {size: 1m}
            for_windows: 1
    """))
    config = load_config(path)
    s = config.settings
    assert (s.dry_run, s.lateness, s.join_horizon, s.max_pending_labels, s.max_event_bytes) == (
        True, 60.0, 43200.0, 1000, 65536,
    )
    assert s.notifier.type == "slack"
    assert dict(s.notifier.options) == {
        "token_env": "MY_TOKEN", "base_url": "http://127.0.0.1:9", "channel": "#ml-alerts",
    }
    g = config.grouping
    assert (g.group_by, g.group_wait, g.repeat_interval) == (("deployment",), 10.0, 3600.0)
    d = config.deployments["fraud-scorer"]
    assert d.backend.type == "webhook"
    assert dict(d.backend.options) == {
        "url": "https://deploy.example/rollback",
        "secret_env": "SECRET",
        "timeout": 5.0,
        "retry": {"max_attempts": 4},  # the shorthand, moved to where the backend reads it
    }
    assert d.reference == os.path.abspath(tmp_path / "ref" / "fraud.jsonl")
    assert (d.slack_channel, d.reference_size, d.cooldown, d.known_good_after, d.dry_run) == (
        "#fraud-oncall", 100, 3600.0, 600.0, False,
    )
    r, p99 = config.rules
    assert r == RuleSpec(
        name="serving-error-rate", detector="error_rate", threshold=0.05,
        params={"mode": "absolute"},
        clear_threshold=0.03, direction="above", alpha=0.01, window=WindowSpec(120.0, 60.0, 500),
        for_=120.0, keep_firing_for=300.0, k=3, n=5, min_samples=200, severity="critical",
        actions=("notify", "rollback"), deployments=("fraud-scorer",), variants=("canary",),
        dry_run=False, summary="Serving errors above 5%", runbook="https://runbooks.example/errors",
    )
    assert p99.for_ == 0.0 and p99.threshold == 250.0
    assert config.source == str(path)
    assert [i for i in validate_file(path)] == []


def test_backend_and_notifier_options_are_what_the_action_factory_reads():
    from rollbackd.actions.factory import make_backend, make_notifier

    config = load_config_text(text("""
        settings:
          notifier: {type: slack, channel: "#x", timeout: 3s, max_rate_limit_retries: 2}
        deployments:
          a:
            backend:
              type: webhook
              url: https://deploy.example/hook
              secret_env: HOOK_SECRET
              timeout: 2s
              headers: {X-Team: ml}
              retry: {max_attempts: 3, base_delay: 250ms, max_delay: 2s, multiplier: 2}
          b: {backend: {type: webhook, url: "http://127.0.0.1:9", max_attempts: 2}}
          c: {}
        rules: []
        """))
    env = {"HOOK_SECRET": "s3cret", "SLACK_BOT_TOKEN": "xoxb-test"}
    a = config.deployments["a"].backend
    assert a.options["retry"] == {
        "max_attempts": 3, "base_delay": 0.25, "max_delay": 2.0, "multiplier": 2.0,
    }
    assert a.options["headers"] == {"X-Team": "ml"}
    for dep in config.deployments.values():
        make_backend(dep.backend, env=env)
    make_notifier(config.settings.notifier, env=env)
    assert "token_env" not in config.settings.notifier.options  # the factory's default applies


def test_retry_options_are_checked():
    errors = errors_of("""
        deployments:
          a:
            backend:
              type: webhook
              url: https://x
              retry: {max_attempts: 3, base_delay: 2s, max_delay: 1s, jitter: true}
          b:
            backend: {type: webhook, url: https://x, max_attempts: 2, retry: {max_attempts: 3}}
        rules: []
        """)
    assert places(errors) == [
        (6, 59, "deployments.a.backend.retry.max_delay"),
        (6, 63, "deployments.a.backend.retry.jitter"),
        (8, 14, "deployments.b.backend.max_attempts"),
    ]
    assert "must be >= base_delay" in errors[0].message
    assert "not both" in errors[2].message


def test_for_windows_counts_steps_between_windows():
    base = "rules:\n- {name: a, detector: error_rate, threshold: 0.05, window: {size: 5m, step: 1m}, "
    assert load_config_text(base + "for: 3 windows}\n").rules[0].for_ == 120.0
    assert load_config_text(base + "for: 1 window}\n").rules[0].for_ == 0.0
    assert load_config_text(base + "for_windows: 6}\n").rules[0].for_ == 300.0
    assert load_config_text(base + "for: 90}\n").rules[0].for_ == 90.0
    (err,) = errors_of(base + "for: 0 windows}\n")
    assert "must be >= 1" in err.message


def test_relative_reference_without_a_file_stays_as_written():
    config = load_config_text("deployments:\n  d: {reference: ref.jsonl}\nrules: []\n")
    assert config.deployments["d"].reference == "ref.jsonl"
    config = load_config_text(
        "deployments:\n  d: {reference: ref.jsonl}\nrules: []\n", base_dir="/srv/conf"
    )
    assert config.deployments["d"].reference == "/srv/conf/ref.jsonl"


def test_yaml_merge_keys_share_rule_defaults():
    config = load_config_text(text("""
        rules:
          - &defaults
            name: a
            detector: error_rate
            threshold: 0.05
            for: 2m
            severity: critical
          - <<: *defaults
            name: b
            threshold: 0.1
        """))
    a, b = config.rules
    assert (b.name, b.threshold, b.for_, b.severity) == ("b", 0.1, 120.0, "critical")


# --------------------------------------------------------------------------- warnings


def test_zero_rules_is_valid_with_a_warning():
    config, issues = check_text("deployments:\n  d: {}\n")
    assert config is not None and config.rules == ()
    (warning,) = issues
    assert (warning.severity, warning.path) == ("warning", "rules")
    assert "never alert" in warning.message
    assert warning.format("r.yaml").startswith("r.yaml:1:1: rules: warning: ")
    config, issues = check_text("rules: []\n")
    assert config is not None and issues[0].line == 1


def test_warnings_for_odd_but_valid_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(text("""
        deployments:
          d: {reference: nowhere.jsonl}
        rules:
          - {name: a, detector: error_rate, threshold: 0.05, for: 90s, actions: []}
        """))
    config = load_config(path)
    assert config.rules[0].for_ == 90.0
    issues = validate_file(path)
    assert [(i.severity, i.line, i.path) for i in issues] == [
        ("warning", 2, "deployments.d.reference"),
        ("warning", 4, "rules[0].for"),
        ("warning", 4, "rules[0].actions"),
    ]
    assert "acts as 2m" in issues[1].message


# --------------------------------------------------------------------------- the example


def example_path() -> Path:
    return Path(str(resources.files("rollbackd") / "examples" / "demo.yaml"))


def test_the_example_loads_cleanly():
    path = example_path()
    assert validate_file(path) == []
    config = load_config(path)
    assert list(config.deployments) == ["demo-scorer"]
    assert {r.detector for r in config.rules} == {"error_rate", "latency", "model_error", "drift"}
    assert [r.name for r in config.rules if "rollback" in r.actions] == ["serving-error-rate"]
    assert all(r.window.size == 60.0 and r.window.tumbling for r in config.rules)


def transitions(r: RuleSpec, values: list[float]) -> list[str]:
    """Step a fresh alert of ``r`` through one value per minute, with ample samples."""
    alert, kinds = Alert(r.name, "demo-scorer", "primary"), []
    n = max(r.min_samples, 1) * 10
    for i, v in enumerate(values):
        alert, tr = step(r, alert, Measurement(v, r.threshold, n, p_value=0.0), 60.0 * i)
        kinds.append(tr.new if tr else "")
    return kinds


def test_the_example_ignores_a_blip_and_fires_on_a_sustained_fault():
    for r in load_config(example_path()).rules:
        bad = r.threshold * 2 + 1 if r.direction == "above" else r.threshold / 2
        good = r.clear * 0.5 if r.direction == "above" else r.clear * 2
        assert "firing" not in transitions(r, [good, bad] + [good] * 6), r.name
        assert "firing" not in transitions(r, [good, bad, bad] + [good] * 5), r.name
        sustained = [good] + [bad] * 5 + [good] * 9
        assert transitions(r, sustained).count("firing") == 1, r.name


def test_the_documented_example_loads(tmp_path):
    doc = (Path(__file__).parent.parent / "docs" / "rules.md").read_text()
    example = doc.split("## A complete example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config, issues = check_text(example, "rules.md")
    assert [i for i in issues if i.severity == "error"] == []
    assert [r.name for r in config.rules] == ["serving-error-rate", "p99-latency"]
    assert config.deployments["fraud-scorer"].backend.options["retry"] == {"max_attempts": 4}


def test_summary_names_rules_and_deployments():
    out = summarize(load_config(example_path()))
    assert "1 deployment(s), 4 rule(s)" in out
    assert "serving-error-rate: error_rate > 0.05 (clears at 0.03); for 2m" in out
    assert "critical → notify, rollback" in out
    assert "demo-scorer: backend log" in out


def test_module_all_is_importable():
    for name in loader.__all__:
        assert hasattr(loader, name)


def test_summary_lists_each_deployments_backend_and_safety_rails():
    config = load_config_text(textwrap.dedent("""
        version: 1
        settings:
          dry_run: true
          notifier: {type: console, digest: {cron: "0 9 * * *", timezone: Europe/Berlin}}
        deployments:
          fraud:
            backend: {type: kubernetes, kind: argo-rollout, api_url: "https://k8s.example"}
            policy: freeze
            cooldown: 1h
            loop_guard: {max_rollbacks: 2, per: 6h}
            approval: {approvers: [alice, bob], timeout: 10m, default: approve}
            verify_within: 20m
            known_good_after: 30m
            known_good_min_predictions: 5000
            dry_run: false
          quiet:
            loop_guard: false
        rules: []
    """))
    lines = summarize(config).splitlines()
    assert lines[0].endswith("notifier console (digest '0 9 * * *' Europe/Berlin); lateness 30s")
    assert lines[2] == (
        "  fraud: backend kubernetes (argo-rollout), policy freeze, cooldown 1h, loop guard 2 per 6h, "
        "approval by alice/bob within 10m else approve, verify within 20m, "
        "known-good after 30m and 5000 predictions, dry run off"
    )
    assert lines[3] == (
        "  quiet: backend log, policy rollback, cooldown 30m, no loop guard, no approval, "
        "verify within 15m, known-good after 10m and 1000 predictions, dry run on (global)"
    )


def test_a_rule_that_rolls_back_without_notify_is_warned_about():
    config, issues = check_text(text("""
        rules:
          - {name: quiet, detector: error_rate, threshold: 0.1, actions: [rollback]}
          - {name: loud, detector: error_rate, threshold: 0.1, actions: [notify, rollback]}
        """))
    assert config is not None  # a warning, not an error
    (warning,) = issues
    assert (warning.severity, warning.path) == ("warning", "rules[0].actions")
    assert "posts no notice" in warning.message


def test_a_window_without_a_size_takes_the_default_one_minute():
    """``window: {min_count: 5}`` and ``{step: 30s}`` once gave an internal error (the frozen slots
    class's descriptor taken for the default size)."""
    text = """
version: 1
rules:
  - {name: r, detector: error_rate, threshold: 0.1, window: {min_count: 5}, severity: warning, actions: [notify]}
  - {name: s, detector: error_rate, threshold: 0.1, window: {step: 30s}, for: 1m, severity: warning, actions: [notify]}
"""
    config = load_config_text(text)
    assert [(r.window.size, r.window.step) for r in config.rules] == [(60.0, 60.0), (60.0, 30.0)]



def test_one_list_of_backend_and_notifier_types():
    """The loader's option schemas cover exactly the types in rules.model, the list the
    factory (actions/factory.py) checks against."""
    from rollbackd.rules.loading.backends import BackendReader
    from rollbackd.rules.loading.reader import NodeReader
    from rollbackd.rules.model import BACKEND_TYPES, NOTIFIER_TYPES

    assert tuple(BackendReader(NodeReader()).schema()) == BACKEND_TYPES
    required = {"slack": "channel: c", "alertmanager": "url: 'http://127.0.0.1:9093'",
                "webhook": "url: 'http://127.0.0.1:9/x'"}
    for t in NOTIFIER_TYPES:
        cfg = loader.load_config_text(
            f"version: 1\nsettings: {{notifier: {{type: {t}, {required.get(t, '')}}}}}\n")
        assert cfg.settings.notifier.type == t


@pytest.mark.parametrize("backend, where", [
    # A secret header given twice (HTTP names are case-insensitive) would send only the second.
    ("{type: webhook, url: 'http://127.0.0.1:9/x', headers: {X-Token: a, x-token: b}}", "headers.x-token"),
    ("{type: command, argv: [/bin/true], env: {TOKEN: a, TOKEN: b}}", "env.TOKEN"),
])
def test_a_name_given_twice_in_headers_or_env_is_an_error(backend, where):
    errors = errors_of(f"version: 1\ndeployments:\n  d:\n    backend: {backend}\n")
    assert [e.message for e in errors if "duplicate key" in e.message], errors
    assert any(e.path.endswith(where) and "first set on line 4" in e.message for e in errors), errors


def test_a_merged_header_is_overridden_by_an_explicit_one():
    cfg = load_config_text(
        "version: 1\ndeployments:\n  d:\n    backend:\n      type: webhook\n"
        "      url: 'http://127.0.0.1:9/x'\n      headers: {<<: {X-A: '1', X-B: '3'}, X-A: '2'}\n"
    )
    assert dict(cfg.deployment("d").backend.options["headers"]) == {"X-A": "2", "X-B": "3"}
