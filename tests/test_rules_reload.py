"""Reloading the rules of a running daemon (SIGHUP, or the file changing): a broken file changes
nothing and raises a notice; a good one keeps the state of the unchanged rules, restarts a
changed rule, drops a removed one, and evaluates a new one from the next window. The live loop
runs on the file source (as tests/test_daemon_restart.py) and is sent a real SIGHUP."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from rollbackd.actions.base import ActionResult, Notice
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.reload import RulesReload
from rollbackd.daemon.replay import build_pipeline
from rollbackd.daemon.run import Daemon, RunSettings
from rollbackd.daemon.sources import RecordingSource
from rollbackd.rules.alerts import AlertState
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"
BATCH = 1000
NEW_RULE = {"name": "p50-latency", "detector": "latency", "params": {"quantile": 0.5}, "threshold": 1e9,
            "window": {"size": "1m"}, "min_samples": 10, "severity": "info", "actions": ["notify"]}


class ManualClock:
    def __init__(self) -> None:
        self.t = 1_790_010_000.0  # after the recording, as a live wall clock is

    def now(self) -> float:
        return self.t


class Notices:
    """The daemon's own notifier: keeps what it is sent (posted from an effect lane's thread)."""

    def __init__(self) -> None:
        self.sent: list[Notice] = []
        self.lock = threading.Lock()

    def post(self, notice: Notice) -> ActionResult:
        with self.lock:
            self.sent.append(notice)
        return ActionResult("succeeded")

    def wait(self, n: int) -> list[Notice]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.sent) >= n:
                    return list(self.sent)
            time.sleep(0.01)
        raise AssertionError(f"{n} notice(s) expected, got {self.sent}")


class Tap:
    """Every evaluation: (event time, rule)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []

    def measure(self, now, rule, deployment, variant, m, window) -> None:
        self.seen.append((now, rule))


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("reload") / "sustained.jsonl"
    write_recording(BUILTIN["sustained_errors"], path)
    return path


@pytest.fixture
def sighup():
    saved = signal.getsignal(signal.SIGHUP)
    yield lambda: os.kill(os.getpid(), signal.SIGHUP)
    signal.signal(signal.SIGHUP, saved)


def rules_text(edit=None) -> str:
    doc = yaml.safe_load(RULES.read_text())
    if edit is not None:
        edit(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def start(recording, rules: Path, tmp_path, *, watch_every=None):
    clock = ManualClock()
    ledger = Ledger(tmp_path / "ledger.db", run_id="live-test")
    decisions, tap, notices = MemoryDecisions(), Tap(), Notices()
    pipeline = build_pipeline(load_config(rules), decisions=decisions, recorder=ledger, tap=tap)
    source = RecordingSource(str(recording))
    reloads = RulesReload(str(rules), load_config, clock, watch_every=watch_every)
    daemon = Daemon(pipeline, source, ledger=ledger, decisions=decisions, clock=clock, notifier=notices,
                    reloads=reloads, settings=RunSettings(checkpoint_path=str(tmp_path / "c"),
                                                          checkpoint_every=1e9, batch_size=BATCH, idle_after=1e9))
    daemon.restore()
    return daemon, source, decisions, tap, notices, ledger, clock


def steps(daemon, source, n: int | None) -> bool:
    """``n`` batches (None: to the end); False at the end of the recording."""
    i = 0
    while n is None or i < n:
        batch = source.read(BATCH)
        if batch is None:
            return False
        daemon.step(batch)
        i += 1
    return True


def test_sighup_with_a_broken_file_keeps_the_rules_and_raises_a_notice(recording, tmp_path, sighup):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text())
    daemon, source, decisions, tap, notices, ledger, _ = start(recording, rules, tmp_path)
    daemon.reloads.install()
    steps(daemon, source, 20)
    pipeline = daemon.tasks[0].pipeline
    config, detectors, alerts = pipeline.config, dict(pipeline.detectors), dict(pipeline.alerts)
    assert detectors and alerts

    rules.write_text(rules_text(lambda d: d["rules"].append({"name": "bad", "detector": "nope", "threshold": "x"})))
    sighup()
    daemon.step(_empty())  # the loop's next turn reloads
    assert pipeline.config is config
    assert pipeline.detectors == detectors and all(pipeline.detectors[k] is d for k, d in detectors.items())
    assert daemon.reloads.counts == {"failed": 1}
    (notice,) = notices.wait(1)
    assert notice.kind == "opened" and notice.incident_id == "rules-rollbackd"
    assert "reload of" in notice.title and "the running rules are kept" in notice.title
    assert "unknown detector 'nope'" in notice.text or "nope" in notice.text
    (row,) = ledger.rows("rule_reloads")
    assert (row["result"], row["trigger"], row["source"]) == ("failed", "SIGHUP", str(rules))
    assert "nope" in row["detail"]

    # The run goes on as if nothing happened: the same decisions as a run without the signal.
    steps(daemon, source, None)
    other = tmp_path / "other"
    other.mkdir()
    again = start(recording, RULES, other)
    steps(again[0], again[1], None)
    assert decisions.records == again[2].records
    ledger.close()
    again[5].close()


def _empty():
    from rollbackd.daemon.sources import Batch

    return Batch([], [], None)


def test_sighup_with_a_good_file_keeps_unchanged_rules_and_evaluates_a_new_one_next_window(
        recording, tmp_path, sighup):
    def edit(doc):
        doc["rules"] = [r for r in doc["rules"] if r["name"] != "feature-drift"]  # removed
        for r in doc["rules"]:
            if r["name"] == "p99-latency":
                r["threshold"] = 600  # changed
        doc["rules"].append(NEW_RULE)  # added

    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text())
    daemon, source, decisions, tap, notices, ledger, _ = start(recording, rules, tmp_path)
    daemon.reloads.install()
    steps(daemon, source, 12)
    pipeline = daemon.tasks[0].pipeline
    before = dict(pipeline.detectors)
    alerts = dict(pipeline.alerts)
    assert {k[0] for k in before} == {"serving-error-rate", "p99-latency", "model-error", "feature-drift"}
    closed = pipeline._closed

    rules.write_text(rules_text(edit))
    sighup()
    daemon.step(_empty())
    assert daemon.reloads.counts == {"ok": 1}
    assert [r.name for r in pipeline.config.rules] == ["serving-error-rate", "p99-latency", "model-error", "p50-latency"]
    for k, det in before.items():
        if k[0] in ("serving-error-rate", "model-error"):  # unchanged: the same detectors and alerts
            assert pipeline.detectors[k] is det
            assert pipeline.alerts[k] == alerts[k]
        else:  # changed or removed: gone (a changed rule starts afresh)
            assert k not in pipeline.detectors and k not in pipeline.alerts
    (row,) = ledger.rows("rule_reloads")
    assert (row["result"], row["added"], row["changed"], row["removed"]) == \
        ("ok", "p50-latency", "p99-latency", "feature-drift")
    assert notices.sent == []  # a good reload after no failure: nothing to tell on-call

    seen_before = len(tap.seen)
    steps(daemon, source, None)
    new = sorted(t for t, rule in tap.seen[seen_before:] if rule == "p50-latency")
    g = pipeline.assembler.granularity
    assert new and new[0] == closed + g  # the next window boundary after the reload
    assert not any(rule == "feature-drift" for _, rule in tap.seen[seen_before:])
    assert any(rule == "p99-latency" for _, rule in tap.seen[seen_before:])
    # The unchanged critical rule decides exactly as without the reload.
    other = tmp_path / "other"
    other.mkdir()
    again = start(recording, RULES, other)
    steps(again[0], again[1], None)

    def fired(records):
        return [(r.get("ts"), r.get("state")) for r in records
                if r.get("kind") == "alert" and r.get("rule") == "serving-error-rate"]

    assert fired(decisions.records) == fired(again[2].records)
    assert any(state == "firing" for _, state in fired(decisions.records))
    ledger.close()
    again[5].close()


def test_a_firing_alert_of_a_removed_rule_is_resolved_and_a_good_reload_resolves_the_notice(
        recording, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text())
    daemon, source, decisions, tap, notices, ledger, clock = start(recording, rules, tmp_path, watch_every=5.0)
    steps(daemon, source, 1)
    pipeline = daemon.tasks[0].pipeline
    while not any(a.state == AlertState.FIRING and k[0] == "serving-error-rate" for k, a in pipeline.alerts.items()):
        assert steps(daemon, source, 1)
    (inc,) = pipeline.book.open.values()

    rules.write_text("version: 1\nrules: [\n")  # broken: found by the watch, not a signal
    clock.t += 5.0
    daemon.step(_empty())
    assert daemon.reloads.counts == {"failed": 1}
    assert notices.wait(1)[0].kind == "opened"
    clock.t += 5.0
    daemon.step(_empty())
    assert daemon.reloads.counts == {"failed": 1}  # the same broken file is not reloaded again

    rules.write_text(rules_text(lambda d: d.__setitem__("rules", [r for r in d["rules"]
                                                                  if r["name"] != "serving-error-rate"])))
    clock.t += 5.0
    daemon.step(_empty())
    assert daemon.reloads.counts == {"failed": 1, "ok": 1}
    assert not any(k[0] == "serving-error-rate" for k in pipeline.alerts)
    assert inc.id not in {i.id for i in pipeline.book.open.values()}  # its only alert resolved
    resolved = notices.wait(2)[1]
    assert resolved.kind == "resolved" and resolved.incident_id == "rules-rollbackd"
    assert [r["result"] for r in ledger.rows("rule_reloads")] == ["failed", "ok"]
    assert [r["trigger"] for r in ledger.rows("rule_reloads")] == ["file changed", "file changed"]
    metrics = scrape(daemon)
    assert metrics['rollbackd_rules_reloads_total{result="ok"}'] == 1.0
    assert metrics['rollbackd_rules_reloads_total{result="failed"}'] == 1.0
    assert metrics["rollbackd_rules_last_reload_success_timestamp_seconds"] == clock.t
    assert metrics["rollbackd_rules_last_reload_failure_timestamp_seconds"] == clock.t - 10.0
    ledger.close()


def scrape(daemon) -> dict[str, float]:
    """/metrics as Prometheus reads it: sample name with labels -> value."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from rollbackd.daemon.http import MetricsCollector

    registry = CollectorRegistry()
    registry.register(MetricsCollector(daemon.pipeline, daemon=daemon))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_a_reload_that_changes_settings_is_refused(recording, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text())
    daemon, source, decisions, tap, notices, ledger, _ = start(recording, rules, tmp_path)
    steps(daemon, source, 3)
    config = daemon.tasks[0].pipeline.config
    rules.write_text(rules_text(lambda d: d["settings"].__setitem__("lateness", "1m")))
    daemon.reloads.request()
    daemon.step(_empty())
    assert daemon.tasks[0].pipeline.config is config
    assert daemon.reloads.counts == {"failed": 1}
    assert "settings changed: a reload applies rules and inhibit rules only" in ledger.rows("rule_reloads")[0]["detail"]
    ledger.close()


def test_a_reload_needing_other_panes_is_refused_and_changes_nothing(recording, tmp_path):
    pipeline = build_pipeline(load_config(RULES))
    source = RecordingSource(str(recording))
    for _ in range(5):
        batch = source.read(BATCH)
        pipeline.ingest(batch.events)
        pipeline.advance(pipeline.watermark)
    source.close()
    state = (pipeline.config, dict(pipeline.detectors), dict(pipeline.alerts), pipeline.assembler)
    text = rules_text(lambda d: d["rules"].append({**NEW_RULE, "window": {"size": "30s"}}))
    rules = tmp_path / "r.yaml"
    rules.write_text(text)
    with pytest.raises(ValueError, match="panes of 30s, the running ones 60s: restart"):
        pipeline.replace_rules(load_config(rules), pipeline.watermark)
    assert (pipeline.config, pipeline.detectors, pipeline.alerts, pipeline.assembler) == state
