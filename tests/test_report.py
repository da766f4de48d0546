"""The incident report: one self-contained HTML file with its plots, from decisions alone or with
every evaluation from the measurement tap; distributions for drift and calibration incidents.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rollbackd.actions.base import NullNotifier
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.detectors.base import Labeled, Measurement, Window
from rollbackd.events import Prediction
from rollbackd.report import (
    MeasurementTap,
    decisions_from_ledger,
    load_decisions,
    select_incident,
    write_report,
)
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"
T0 = 1_790_000_000.0


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory):
    """The sustained_errors scenario replayed into a decision log and a ledger."""
    root = tmp_path_factory.mktemp("report")
    rec = root / "sustained_errors.jsonl.gz"
    write_recording(BUILTIN["sustained_errors"], rec)
    config = load_config(RULES)
    ledger = Ledger(root / "ledger.db", run_id="replay-test")
    ledger.start_run("replay", str(rec), config.source, "2026-01-01T00:00:00+00:00")
    decisions = MemoryDecisions()
    pipeline = build_pipeline(config, decisions=decisions, recorder=ledger, notifier=NullNotifier())
    replay(open_recording(str(rec), config), pipeline)
    ledger.close()
    return config, decisions.records, root / "ledger.db"


def _no_network(html: str) -> None:
    """Nothing in the page can make the browser fetch anything."""
    assert "<script" not in html.lower()
    for pattern in (r"\bsrc\s*=", r"\bhref\s*=", r"url\(", r"@import", r"<link\b", r"<iframe\b", r"<object\b"):
        assert not re.search(pattern, html, re.I), pattern
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_a_report_from_transitions_alone_is_self_contained_and_marks_the_incident(replayed, tmp_path):
    config, decisions, _ = replayed
    report = write_report(decisions, tmp_path / "r.html", title="sustained errors <drill>", config=config)
    html = report.html.read_text()
    _no_network(html)
    assert "<title>sustained errors &lt;drill&gt;</title>" in html
    assert report.plots == 1 and html.count("<svg") == 1
    svg = html[html.index("<svg"):html.index("</svg>")]
    for part in ('class="threshold"', 'class="clear-threshold"', 'class="mark pending"', 'class="mark firing"',
                 'class="rollback"', 'class="deploy"'):
        assert part in svg, part
    assert "threshold 0.05" in svg and "clears at 0.03" in svg and "rollback 2→1 succeeded" in svg
    assert "alert transitions only" in html
    # The timeline, the incident card.
    assert html.count('<span class="badge alert">') == 2 and "inc-2cc2bbac8759" in html
    assert "version serving" in html and "2 → 1: succeeded" in html
    # Same decisions, same bytes.
    again = write_report(decisions, tmp_path / "r2.html", title="sustained errors <drill>", config=config)
    assert again.html.read_bytes() == report.html.read_bytes()


def test_every_evaluation_from_the_tap_is_plotted(replayed, tmp_path):
    config, decisions, _ = replayed
    tap = MeasurementTap(config)
    for i in range(30):  # one evaluation a minute, breaching from minute 15
        ts = T0 + 60.0 * (i + 1)
        value = 0.005 if i < 15 else 0.2
        tap.measure(ts, "serving-error-rate", "demo-scorer", "primary", Measurement(value, 0.05, 1200))
    tap.measure(T0 + 60, "serving-error-rate", "demo-scorer", "canary", {"value": None, "threshold": 0.05, "sample_size": 3})
    assert tap.latest()[("serving-error-rate", "demo-scorer", "primary")][1]["value"] == 0.2
    report = write_report(decisions, tmp_path / "r.html", title="t", config=config,
                          measurements_by_rule=tap.by_rule())
    html = report.html.read_text()
    polyline = re.search(r'<polyline class="value" points="([^"]+)"', html)
    assert polyline and len(polyline.group(1).split()) == 30
    assert "every evaluation" in html


def _window(start: float, shift: float, n: int = 300) -> Window:
    preds = [
        Prediction(id=f"{start}-{i}", ts=start + i * 0.1, deployment="d", model_version="1",
                   features={"num_0": shift + ((i * 0.618) % 1.0) * 2 - 1, "cat_0": "US" if i % 3 else "DE"},
                   score=0.5, prediction=1)
        for i in range(n)
    ]
    outcomes = [
        Labeled(start, start + 1, "v", "1", 1, ((i * 0.618) % 1.0), int(((i * 0.618) % 1.0) > (0.5 if shift == 0 else 0.8)))
        for i in range(n)
    ]
    return Window("d", "v", start, start + 60.0, preds, outcomes)


def _drift_decisions(rule: str, evidence: dict) -> list[dict]:
    base = {"kind": "alert", "rule": rule, "deployment": "d", "variant": "v", "severity": "warning"}
    return [
        {**base, "ts": T0 + 660, "previous": "inactive", "state": "pending", "window": [T0 + 600, T0 + 660],
         "measurement": {"value": 0.4, "threshold": 0.15, "sample_size": 300, "evidence": evidence}},
        {**base, "ts": T0 + 780, "previous": "pending", "state": "firing", "window": [T0 + 720, T0 + 780],
         "measurement": {"value": 0.5, "threshold": 0.15, "sample_size": 300, "evidence": evidence}},
    ]


def test_drift_incidents_show_feature_distributions_before_and_after(tmp_path):
    tap = MeasurementTap()
    evidence = {"drifted": ["num_0", "cat_0"], "tested": 2, "features": [
        {"feature": "num_0", "test": "ks", "effect": 0.5, "p_adjusted": 1e-9},
        {"feature": "cat_0", "test": "chi2", "effect": 0.01, "p_adjusted": 0.9}]}
    for i in range(20):
        start = T0 + 60.0 * i
        tap.measure(start + 60, "feature-drift", "d", "v", {"value": 0.0, "threshold": 0.15, "sample_size": 300,
                                                            "evidence": evidence}, _window(start, 0.0 if i < 10 else 3.0))
    decisions = _drift_decisions("feature-drift", evidence)
    report = write_report(decisions, tmp_path / "r.html", title="drift", profiles=tap.profiles(),
                          measurements_by_rule=tap.by_rule())
    html = report.html.read_text()
    assert html.count('class="plot histogram"') == 2  # num_0 (histogram), cat_0 (category shares)
    assert 'class="bar before"' in html and 'class="bar after"' in html
    assert 'class="plot effects"' in html
    # Without the tap: the per-feature evidence of the firing measurement.
    bare = write_report(decisions, tmp_path / "b.html", title="drift").html.read_text()
    assert 'class="plot histogram"' not in bare and 'class="plot effects"' in bare
    assert "need the measurement tap" in bare


def test_calibration_incidents_show_the_reliability_diagram(tmp_path):
    tap = MeasurementTap()
    ev = {"ece": 0.1, "brier": 0.2, "mean_score": 0.5, "positive_rate": 0.4}
    for i in range(20):
        start = T0 + 60.0 * i
        tap.measure(start + 60, "calib", "d", "v", {"value": 0.1, "threshold": 0.08, "sample_size": 300,
                                                     "evidence": ev}, _window(start, 0.0 if i < 10 else 3.0))
    decisions = _drift_decisions("calib", ev)
    html = write_report(decisions, tmp_path / "r.html", title="c", profiles=tap.profiles()).html.read_text()
    assert 'class="plot reliability"' in html
    assert html.count('<polyline class="reliability') == 2 and 'class="diagonal"' in html
    bare = write_report(decisions, tmp_path / "b.html", title="c").html.read_text()
    assert 'class="plot reliability"' not in bare and "<th>ECE</th>" in bare


def test_tap_memory_is_bounded():
    tap = MeasurementTap(max_points=5, max_profiles=2, sample_size=10)
    for i in range(50):
        tap.measure(T0 + i, "r", "d", "v", {"value": float(i), "threshold": 1.0, "sample_size": 1,
                                            "evidence": {"drifted": [], "features": []}}, _window(T0 + i, 0.0))
    assert [p["value"] for p in tap.by_rule()["r"]] == [45.0, 46.0, 47.0, 48.0, 49.0]
    (profiles,) = tap.profiles().values()
    assert len(profiles) == 2 and all(len(v) <= 10 for p in profiles for v in p.numeric.values())


def test_one_incident_from_the_ledger(replayed, tmp_path):
    config, decisions, db = replayed
    run_id, from_ledger = decisions_from_ledger(db, incident_id="inc-2cc2bbac8759")
    assert run_id == "replay-test"

    def essentials(ds):
        return [(d["kind"], d["ts"], d.get("state") or d.get("action"), d.get("status"),
                 (d.get("measurement") or {}).get("value")) for d in ds]

    assert essentials(from_ledger) == essentials(select_incident(decisions, "inc-2cc2bbac8759"))
    states = [(d["kind"], d.get("state") or d.get("action")) for d in from_ledger]
    assert states[:3] == [("alert", "pending"), ("alert", "firing"), ("incident", "opened")]
    assert ("action", "rollback") in states
    html = write_report(from_ledger, tmp_path / "inc.html", title="inc-2cc2bbac8759", config=config).html.read_text()
    assert 'class="rollback"' in html and "<svg" in html
    with pytest.raises(LookupError):
        decisions_from_ledger(db, incident_id="inc-000000000000")
    with pytest.raises(LookupError):
        select_incident(decisions, "inc-000000000000")


def test_load_decisions_reads_a_decision_log(replayed, tmp_path):
    from rollbackd.daemon.decisions import DecisionLog

    _, decisions, _ = replayed
    log = DecisionLog(tmp_path / "d.jsonl")
    for d in decisions:
        log.write(d)
    log.close()
    assert load_decisions(tmp_path / "d.jsonl") == decisions


def test_pngs_are_written_beside_the_report_when_matplotlib_is_there(replayed, tmp_path):
    pytest.importorskip("matplotlib")
    config, decisions, _ = replayed
    report = write_report(decisions, tmp_path / "r.html", title="t", config=config)
    (png,) = report.pngs
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_png_shows_the_deploy_and_labels_each_tick_once(replayed, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import rollbackd.report as report_module

    figures = []
    real = report_module._png_figure

    def keep(plt, data):
        fig = real(plt, data)
        figures.append(fig)
        return fig

    monkeypatch.setattr(report_module, "_png_figure", keep)
    config, decisions, _ = replayed
    write_report(decisions, tmp_path / "r.html", title="t", config=config)
    (fig,) = figures
    (ax,) = fig.axes
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
    labels = {line.get_label() for line in ax.get_lines()}
    assert any(label.endswith(" deployed") for label in labels), labels
