"""Drills and backtests over the built-in scenarios, with real edges that must stay silent.

A drill runs against a rules file whose deployment has a real webhook backend and whose
notifier is Slack, both pointed at one loopback server: the drill must reach neither. The
backtest's expected numbers are derived from the decisions themselves (the first firing after
the labelled fault start, the firings outside every fault interval), never copied from output.
"""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest
from loopback import LoopbackServer

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.drills import (
    FaultInterval,
    backtest,
    diff_decisions,
    drill,
    episodes,
    load_truth,
    parse_speed,
    score_truth,
    write_truth,
)
from rollbackd.rules.durations import format_duration
from rollbackd.rules.loader import load_config
from rollbackd.rules.model import Config
from rollbackd.scenarios import BUILTIN, scenario_truth, write_recording

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"
FAULT_START = BUILTIN["sustained_errors"].start + 900.0


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("drills") / "sustained_errors.jsonl.gz"
    write_recording(BUILTIN["sustained_errors"], path)
    return path


def _rules_with_live_edges(tmp_path: Path, url: str) -> Config:
    """The e2e rules, with a real webhook backend and the Slack notifier, both at ``url``."""
    text = RULES.read_text()
    text = text.replace("notifier: {type: console}",
                        f"notifier: {{type: slack, channel: '#prod', base_url: '{url}/api/'}}")
    text = text.replace("backend: {type: log}", f"backend: {{type: webhook, url: '{url}/rollback'}}")
    path = tmp_path / "live-rules.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.deployments["demo-scorer"].backend.type == "webhook"
    assert config.settings.notifier.type == "slack"
    return config


def test_a_drill_rehearses_the_incident_and_touches_no_real_edge(recording, tmp_path, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-drill")
    seen = []
    with LoopbackServer() as server:
        config = _rules_with_live_edges(tmp_path, server.url)
        console = io.StringIO()
        result = drill(recording, config, out_dir=tmp_path / "out", notifier=ConsoleNotifier(console),
                       progress=seen.append)
        assert server.requests == [], "a drill called a real backend or Slack"

    kinds = [(d["kind"], d.get("state") or d.get("action")) for d in result.decisions]
    assert ("alert", "firing") in kinds and ("incident", "opened") in kinds
    assert [i["alerts"][0]["rule"] for i in result.incidents] == ["serving-error-rate"]
    (rollback,) = [d for d in result.decisions if d.get("action") == "rollback"]
    assert (rollback["status"], rollback["from_version"], rollback["to_version"]) == ("dry_run", "2", "1")
    assert rollback["backend"] == "webhook" and rollback["dry_run"] is True

    notices = console.getvalue()
    assert notices.count("[DRILL] ") == 2
    assert "[DRILL] OPENED inc-" in notices and "rollback dry_run" in notices

    assert seen[-1].done and seen[-1].incidents == 1 and seen[-1].rollbacks == 1
    assert any(not p.done for p in seen), "progress is reported while the drill runs"

    html = result.report_path.read_text()
    assert result.report_path == tmp_path / "out" / "report.html"
    assert result.report.plots >= 1 and "<svg" in html and 'class="rollback"' in html
    logged = [json.loads(line) for line in result.decisions_path.read_text().splitlines()]
    assert logged == result.decisions
    with sqlite3.connect(result.ledger_path) as db:
        assert db.execute("select mode from runs where run_id = ?", [result.run_id]).fetchone() == ("drill",)
    assert (tmp_path / "out" / "rejected.jsonl").read_bytes() == b"", "the dead-letter file, empty"


def test_a_drill_report_plots_every_evaluation_when_the_pipeline_feeds_the_tap(recording, tmp_path):
    config = load_config(RULES)
    result = drill(recording, config, out_dir=tmp_path, notifier=ConsoleNotifier(io.StringIO()))
    assert result.measured
    series = result.tap.by_rule()["serving-error-rate"]
    whole = [p for p in series if p["variant"] == "primary"]
    assert len(whole) == 30  # one 1-minute window per minute of the recording
    # The windows both versions served (the deploy) are also measured per version's share.
    shares = {p["variant"] for p in series} - {"primary"}
    assert shares == {"primary version=1", "primary version=2"}
    html = result.report_path.read_text()
    assert "every evaluation" in html and "alert transitions only" not in html


def test_drill_speed_paces_by_event_time(recording, tmp_path):
    class Clock:
        t = 1000.0

        def now(self):
            return self.t

    clock, slept = Clock(), []

    def sleep(seconds):
        slept.append(seconds)
        clock.t += seconds

    watermarks = []
    drill(recording, load_config(RULES), out_dir=tmp_path, speed=60.0, clock=clock, sleep=sleep,
          notifier=ConsoleNotifier(io.StringIO()), ledger=False,
          progress=lambda p: watermarks.append(p.event_time) if not p.done and p.event_time else None)
    # Event time ran 60 times faster than the (fake) wall clock, batch by batch.
    assert sum(slept) == pytest.approx((watermarks[-1] - watermarks[0]) / 60.0)
    assert len(slept) > 50


def test_parse_speed():
    assert parse_speed("max") is None and parse_speed(None) is None
    assert parse_speed("1x") == 1.0 and parse_speed("10X") == 10.0 and parse_speed("2.5") == 2.5
    for bad in ("fast", "0x", "-1x"):
        with pytest.raises(ValueError):
            parse_speed(bad)


# Backtests ------------------------------------------------------------------------------------


TWITCHY = """
  - name: twitchy-errors
    detector: error_rate
    threshold: 0.004
    window: {size: 1m}
    min_samples: 100
    severity: info
    actions: [notify]
"""


def _config(tmp_path: Path, name: str, text: str) -> Config:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def test_backtest_against_the_truth_gives_delays_and_false_alerts(recording, tmp_path):
    # A rule that fires on healthy traffic (base error rate 0.5 % > 0.4 %) next to the real one.
    config = _config(tmp_path, "a.yaml", RULES.read_text() + TWITCHY)
    truth = tmp_path / "truth.yaml"
    write_truth("sustained_errors", truth)
    result = backtest(recording, config, truth=truth)

    fired = [d for d in result.a.decisions if d["kind"] == "alert" and d["state"] == "firing"]
    first_real = min(d["ts"] for d in fired if d["rule"] == "serving-error-rate")
    delay = first_real - FAULT_START
    false_twitchy = [d for d in fired if d["rule"] == "twitchy-errors" and not FAULT_START <= d["ts"]]
    assert delay == 160.0 and false_twitchy, "the scenario's known answer"

    s = result.a.scores["serving-error-rate"]
    assert (s.expected, s.detected, s.delays, s.missed, s.false_alerts) == (1, 1, [delay], [], 0)
    t = result.a.scores["twitchy-errors"]
    assert t.expected == 1 and t.false_alerts == len(false_twitchy)
    first, last = result.span
    healthy = (FAULT_START - first) + max(0.0, last - (BUILTIN["sustained_errors"].end + 300.0))
    assert t.mtbfa == pytest.approx(healthy / len(false_twitchy))
    assert result.a.scores["p99-latency"].expected == 0  # a latency rule is not meant to catch errors

    text = result.format_text()
    assert "against the truth: 1 fault(s), grace 5m" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("serving-error-rate  "))
    assert row.split()[1:6] == ["1", "1", "0", "2m40s", "2m40s"]
    row = next(line for line in text.splitlines() if line.strip().startswith("twitchy-errors  "))
    assert row.split()[6] == str(len(false_twitchy))
    assert format_duration(round(healthy / len(false_twitchy))) in row
    assert "+17m40s  alert     firing   serving-error-rate" in text


def test_backtest_calls_no_backend_and_posts_nothing(recording, tmp_path, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-backtest")
    with LoopbackServer() as server:
        result = backtest(recording, _rules_with_live_edges(tmp_path, server.url))
        assert server.requests == []
    (rb,) = result.a.rollbacks()
    assert rb["status"] == "succeeded" and rb["detail"].startswith("backtest: would set")
    assert "+18m10s  rollback  demo-scorer/primary  2 → 1 succeeded" in result.format_text()


def test_against_shows_the_decisions_a_changed_threshold_changes(recording, tmp_path):
    a = load_config(RULES)
    b = _config(tmp_path, "b.yaml", RULES.read_text().replace(
        "threshold: 0.05\n    clear_threshold: 0.03", "threshold: 0.5\n    clear_threshold: 0.3"))
    result = backtest(recording, a, b)
    only_a = {(d["kind"], d.get("rule"), d.get("state") or d.get("action")) for d in result.diff.only_a}
    assert {("alert", "serving-error-rate", "pending"), ("alert", "serving-error-rate", "firing"),
            ("incident", "serving-error-rate", "opened"), ("action", "serving-error-rate", "rollback")} <= only_a
    assert result.diff.only_b == [] and result.b.fired() == []
    text = result.format_text()
    assert "difference: " in text and "only under A" in text
    minus = [line for line in text.splitlines() if line.startswith("  - A ")]
    assert any("firing   serving-error-rate" in line for line in minus)
    assert any("rollback" in line and "2 → 1" in line for line in minus)
    # The same rules twice: no difference.
    assert diff_decisions(result.a.decisions, result.a.decisions).empty


def test_truth_files_round_trip_and_accept_offsets(tmp_path):
    entries = write_truth(BUILTIN["sustained_errors"], tmp_path / "t.yaml")
    assert entries[0]["start"] == scenario_truth(BUILTIN["sustained_errors"])[0]["start"] == FAULT_START
    (f,) = load_truth(tmp_path / "t.yaml")
    assert (f.start, f.kind, f.deployment) == (FAULT_START, "error_rate", None)
    (tmp_path / "h.yaml").write_text(
        "- {deployment: demo-scorer, start: +15m, end: '2026-09-21T14:40:00Z', rule: serving-error-rate}\n"
        "- {start: 1790001000, kind: latency, active: false}\n"
    )
    (g,) = load_truth(tmp_path / "h.yaml", origin=1_790_000_000.0)
    assert (g.start, g.end, g.rule) == (FAULT_START, 1_790_001_600.0, "serving-error-rate")
    with pytest.raises(ValueError, match="offset"):
        load_truth(tmp_path / "h.yaml")
    (tmp_path / "bad.yaml").write_text("- {start: 5, colour: red}\n")
    with pytest.raises(ValueError, match="colour"):
        load_truth(tmp_path / "bad.yaml")


def test_scoring_edges():
    """Tick table: fault [100, 200], grace 50; span [0, 1000]."""
    config = load_config(RULES)
    rules = [r for r in config.rules if r.name == "serving-error-rate"]

    def fire(ts, resolved=None):
        out = [{"kind": "alert", "rule": "serving-error-rate", "deployment": "d", "variant": "v", "state": "firing", "ts": ts}]
        if resolved is not None:
            out.append({**out[0], "state": "resolved", "ts": resolved})
        return out

    fault = [FaultInterval(100.0, 200.0, deployment="d")]
    cases = [
        (fire(150), 50.0, 0),           # fires inside: detected after 50 s
        (fire(240), 140.0, 0),          # inside the grace: detected, not false
        (fire(260), None, 1),           # after end + grace: missed, and a false alert
        (fire(50, 400), 0.0, 1),        # already firing at the start: delay 0, but fired falsely
        (fire(10, 20) + fire(150), 50.0, 1),
    ]
    for decisions, delay, false in cases:
        s = score_truth(decisions, fault, rules, (0.0, 1000.0), grace=50.0)["serving-error-rate"]
        assert (s.delays[0] if s.delays else None, s.false_alerts) == (delay, false), decisions
        assert s.healthy_seconds == 1000.0 - 150.0
    assert [e.fired for e in episodes(fire(10, 20) + fire(150))] == [10, 150]
    other = [FaultInterval(100.0, 200.0, deployment="elsewhere")]
    s = score_truth(fire(150), other, rules, (0.0, 1000.0), grace=50.0)["serving-error-rate"]
    assert (s.detected, s.false_alerts) == (0, 1)
