"""Every evaluation as data: ``--measurements-out`` on replay and drill, read back by ``report``;
the trailing partial window of a recording accounted for; repeat notices folded on the console.

The built-in ``sustained_errors`` scenario (30 minutes of demo-scorer, version 2 with 20 %
errors from minute 15) under the demo rules, with ``repeat_interval: 1m`` and a notify-only
error rule so that its incident stays open and repeats every minute of event time.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from rollbackd.actions.base import Notice
from rollbackd.actions.console import ConsoleNotifier, RepeatFolding
from rollbackd.daemon.clock import iso
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.drills import drill
from rollbackd.measurements import (
    FIELDS,
    MeasurementWriter,
    ParquetUnavailable,
    check_measurements_path,
    load_measurements,
    open_measurements,
)
from rollbackd.report import MeasurementTap
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

STEP = 60.0  # every demo rule: 1-minute tumbling windows


def rollbackd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "rollbackd.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("measurements")
    rec = root / "sustained_errors.jsonl.gz"
    write_recording(BUILTIN["sustained_errors"], rec)
    demo = Path(str(resources.files("rollbackd") / "examples" / "demo.yaml")).read_text()
    assert "repeat_interval: 4h" in demo and "actions: [notify, rollback]" in demo
    rules = root / "rules.yaml"
    rules.write_text(demo.replace("repeat_interval: 4h", "repeat_interval: 1m")
                     .replace("actions: [notify, rollback]", "actions: [notify]"))
    events = [json.loads(line) for line in gzip.open(rec, "rt")]
    return {"root": root, "rec": rec, "rules": rules, "events": events}


@pytest.fixture(scope="module")
def replayed(scenario: dict) -> dict:
    """Two CLI replays into JSON Lines, one into Parquet."""
    root = scenario["root"]
    outs = []
    for name in ("a.jsonl", "b.jsonl", "c.parquet"):
        work = root / name.split(".")[0]
        work.mkdir()
        out = rollbackd("replay", str(scenario["rec"]), "-c", str(scenario["rules"]), "--db", "r.db",
                        "--decisions-out", "decisions.jsonl", "--measurements-out", name, cwd=work)
        assert out.returncode == 0, out.stderr.decode()
        outs.append((work / name, out.stdout.decode(), work / "decisions.jsonl"))
    return {"runs": outs}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mixed_windows(events: list[dict], labels: bool) -> int:
    """Version shares of the minute windows more than one version served, counted from the
    recording: each such window is also evaluated per version's share. A rule on labels also
    counts the version of each label's prediction (a label for version 1 after the deploy)."""
    versions: dict[float, set] = {}
    served = {}
    for e in events:
        if e.get("type") == "prediction":
            served[e["id"]] = e["model_version"]
            versions.setdefault(math.floor(e["ts"] / STEP), set()).add(e["model_version"])
        elif labels and e.get("type") == "outcome" and e["id"] in served:
            versions.setdefault(math.floor(e["ts"] / STEP), set()).add(served[e["id"]])
    return sum(len(v) for v in versions.values() if len(v) > 1)


# ---------------------------------------------------------------------------------------------
# The file


def test_one_line_per_evaluation_as_the_tap_counts_them(scenario, tmp_path):
    config = load_config(scenario["rules"])
    tap = MeasurementTap(config)
    writer = open_measurements(tmp_path / "m.jsonl", config, tee=tap)
    pipeline = build_pipeline(config, decisions=DecisionLog(tmp_path / "d.jsonl"), tap=writer,
                              notifier=ConsoleNotifier(stream=io.StringIO()))
    result = replay(open_recording(str(scenario["rec"]), config), pipeline)
    writer.not_evaluated(result.not_evaluated)
    writer.close()
    records = _lines(tmp_path / "m.jsonl")
    evaluated = [r for r in records if r["verdict"] != "not_evaluated"]
    assert len(evaluated) == tap.evaluations == writer.evaluations
    # Independently of the engine: one window per rule closes at every minute boundary after
    # the first event up to the last one (all four rules apply to the one deployment × variant).
    ts = [e["ts"] for e in scenario["events"]]
    boundaries = math.floor(max(ts) / STEP) - math.floor(min(ts) / STEP)
    assert boundaries == 30
    whole = [r for r in evaluated if r["share"] is None]
    shares = [r for r in evaluated if r["share"] is not None]
    assert len(whole) == len(config.rules) * boundaries == 120
    assert len(shares) == sum(_mixed_windows(scenario["events"], r.needs_labels) for r in config.rules) > 0
    assert {r["share"] for r in shares} == {"version"}
    assert writer.written == len(records) == len(evaluated) + len(result.not_evaluated)
    assert Counter(r["rule"] for r in whole) == {r.name: boundaries for r in config.rules}


def test_the_same_replay_writes_the_same_bytes(replayed):
    (a, _, _), (b, _, _), _ = replayed["runs"]
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size > 10_000


def test_every_record_has_the_fields_and_a_verdict_the_rule_draws(replayed, scenario):
    config = load_config(scenario["rules"])
    rules = {r.name: r for r in config.rules}
    path, _, _ = replayed["runs"][0]
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert list(rec) == sorted(FIELDS)  # every field, keys sorted
        assert line == json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert rec["window_start"] == iso(rec["window_start_epoch"])
        assert rec["window_end"] == iso(rec["window_end_epoch"])
        assert rec["window_end_epoch"] - rec["window_start_epoch"] == STEP
        rule = rules[rec["rule"]]
        assert rec["detector"] == rule.detector and rec["slice"] is None
        if rec["verdict"] == "not_evaluated":
            continue
        assert rec["ts"] == rec["window_end_epoch"]
        if rec["verdict"] == "insufficient":
            assert rec["insufficient"]
            continue
        assert rec["insufficient"] is None and rec["sample_size"] >= rule.min_samples
        beyond = rec["value"] > rule.threshold if rule.direction == "above" else rec["value"] < rule.threshold
        significant = rule.alpha is None or rec["p_value"] is None or rec["p_value"] < rule.alpha
        assert (rec["verdict"] == "breach") == (beyond and significant), rec


def test_the_version_is_the_one_serving_most_of_the_window(replayed, scenario):
    """Counted here from the recording itself: version 1, then 2 from its deploy at minute 15."""
    path, _, _ = replayed["runs"][0]
    served: dict[float, Counter] = {}
    labelled: dict[float, set] = {}  # versions of the predictions whose labels came in a window
    of = {}
    for e in scenario["events"]:
        if e["type"] == "prediction":
            served.setdefault(math.floor(e["ts"] / STEP) * STEP, Counter())[e["model_version"]] += 1
            of[e["id"]] = e["model_version"]
        elif e["type"] == "outcome" and e["id"] in of:
            labelled.setdefault(math.floor(e["ts"] / STEP) * STEP, set()).add(of[e["id"]])
    versions = Counter()
    for rec in _lines(path):
        if rec["verdict"] == "not_evaluated":
            assert rec["version"] is None
            continue
        counts = served[rec["window_start_epoch"]]
        if rec["share"] == "version":  # a version's share of a mixed window: that version
            assert rec["version"] in set(counts) | labelled.get(rec["window_start_epoch"], set())
        else:
            assert rec["version"] == max(counts, key=lambda v: (counts[v], v))
        versions[rec["version"]] += 1
    assert set(versions) == {"1", "2"}


def test_the_breaches_are_where_the_decision_log_says_the_alert_moved(replayed):
    path, _, decisions = replayed["runs"][0]
    breaches = {(r["rule"], r["ts"]) for r in _lines(path) if r["verdict"] == "breach"}
    moved = [(d["rule"], d["ts"]) for d in _lines(decisions)
             if d["kind"] == "alert" and d["state"] in ("pending", "firing")]
    assert moved and set(moved) <= breaches
    # serving errors breach in every window from the one after the deploy on
    errors = sorted(ts for rule, ts in breaches if rule == "serving-error-rate")
    assert errors == [1790000940.0 + STEP * i for i in range(len(errors))] and len(errors) == 15


def test_parquet_holds_the_same_records_as_json_lines(replayed):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (jsonl, _, _), _, (parquet, stdout, _) = replayed["runs"]
    n = len(_lines(jsonl))
    assert f"measurements: {n} records ({n - 4} evaluations)" in stdout
    table = pq.read_table(parquet)
    assert table.column_names == list(FIELDS)
    assert table.schema.field("window_start").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("evidence").type == pa.string()
    assert table.num_rows == n
    assert load_measurements(parquet).records == load_measurements(jsonl).records
    first = table.slice(0, 1).to_pylist()[0]
    assert first["window_start"].timestamp() == first["window_start_epoch"]
    assert json.loads(first["evidence"]) == _lines(jsonl)[0]["evidence"]


def test_parquet_without_pyarrow_is_refused_at_start_naming_the_extra(scenario, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ParquetUnavailable, match=r"rollbackd\[parquet\]"):
        check_measurements_path(tmp_path / "m.parquet")
    check_measurements_path(tmp_path / "m.jsonl")  # JSON Lines needs nothing
    from rollbackd.cli import main

    result = CliRunner().invoke(main, ["replay", str(scenario["rec"]), "-c", str(scenario["rules"]),
                                       "--db", str(tmp_path / "r.db"), "--measurements-out",
                                       str(tmp_path / "m.parquet")])
    assert result.exit_code == 2
    assert "pip install 'rollbackd[parquet]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.db").exists()  # refused before the run's first ledger row


def test_a_failing_write_is_logged_and_counted_and_the_replay_decides_the_same(scenario, tmp_path):
    """/dev/full refuses every write (ENOSPC): the writer stops, the engine does not notice."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    config = load_config(scenario["rules"])
    writer = open_measurements("/dev/full", config, buffer_size=16)
    pipeline = build_pipeline(config, decisions=DecisionLog(tmp_path / "d.jsonl"), tap=writer,
                              notifier=ConsoleNotifier(stream=io.StringIO()))
    replay(open_recording(str(scenario["rec"]), config), pipeline)
    writer.close()
    assert writer.errors == 1 and writer.stopped and writer.written == 0
    assert writer.evaluations > 120  # every evaluation still went through the tap (and the shares)
    reference = tmp_path / "ref.jsonl"
    pipeline = build_pipeline(config, decisions=DecisionLog(reference),
                              notifier=ConsoleNotifier(stream=io.StringIO()))
    replay(open_recording(str(scenario["rec"]), config), pipeline)
    assert (tmp_path / "d.jsonl").read_bytes() == reference.read_bytes()


def test_a_live_writer_flushes_as_event_time_passes(scenario, tmp_path):
    from rollbackd.detectors.base import Measurement, Window

    config = load_config(scenario["rules"])
    path = tmp_path / "live.jsonl"
    writer = open_measurements(path, config, append=True, flush_every=60.0)
    assert isinstance(writer, MeasurementWriter)
    m = Measurement(0.01, 0.05, 100, p_value=0.9)
    on_disk = []
    for t in (60.0, 90.0, 120.0, 150.0):
        writer.measure(t, "serving-error-rate", "demo-scorer", "primary", m, Window("demo-scorer", "primary", t - 60, t))
        on_disk.append(len(path.read_text().splitlines()))
    assert on_disk == [1, 1, 3, 3]  # flushed at 60 and at 120 of event time, buffered between
    writer.close()
    assert [r["ts"] for r in _lines(path)] == [60.0, 90.0, 120.0, 150.0]
    assert {(r["verdict"], r["version"]) for r in _lines(path)} == {("ok", None)}  # no predictions: no version


# ---------------------------------------------------------------------------------------------
# The report


def test_report_plots_each_series_from_the_file(replayed, scenario, tmp_path):
    path, _, decisions = replayed["runs"][0]
    records = _lines(path)
    out = rollbackd("report", "--measurements", str(path), "--decisions", str(decisions),
                    "-c", str(scenario["rules"]), "--out", "r.html", cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert f"and {len(records)} measurements" in out.stdout.decode()
    html = (tmp_path / "r.html").read_text()
    series = {(r["rule"], r["deployment"], r["variant"], r["version"], r["slice"])
              for r in records if r["verdict"] != "not_evaluated"}
    assert len(series) == 8  # four rules × versions 1 and 2
    assert html.count('<figure class="series">') == len(series)
    assert html.count('class="breach"') == sum(r["verdict"] == "breach" for r in records)
    for rule, dep, var, version, _ in series:
        assert f"{rule} on {dep}/{var} · version {version}" in html
    # the trailing window, shaded on the series still evaluated at the end (version 2's)
    assert html.count('class="not-evaluated"') == 4
    # a threshold drawn with every series, and the breached alert's plot from every evaluation
    assert html.count('class="threshold"') >= len(series)
    assert "value over time (every evaluation)" in html
    assert "<script" not in html.lower()


def test_report_from_the_file_alone_and_from_parquet(replayed, tmp_path):
    pytest.importorskip("pyarrow")
    _, _, (parquet, _, _) = replayed["runs"]
    out = rollbackd("report", "--measurements", str(parquet), "--out", "p.html", cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert "from 0 decisions" in out.stdout.decode()
    assert (tmp_path / "p.html").read_text().count('<figure class="series">') == 8


def test_report_skips_and_counts_lines_that_are_not_records(replayed, tmp_path):
    path, _, _ = replayed["runs"][0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + "not json\n" + json.dumps({"rule": "x"}) + "\n")
    loaded = load_measurements(bad)
    assert loaded.skipped == 2 and len(loaded.records) == len(_lines(path))
    out = rollbackd("report", "--measurements", str(bad), "--out", "b.html", cwd=tmp_path)
    assert out.returncode == 0 and b"2 line(s) that are not measurement records skipped" in out.stderr


# ---------------------------------------------------------------------------------------------
# The trailing window


def test_the_trailing_partial_window_is_reported_with_its_span(replayed, scenario):
    path, stdout, _ = replayed["runs"][0]
    last = max(e["ts"] for e in scenario["events"])
    start = math.floor(last / STEP) * STEP
    preds = sum(1 for e in scenario["events"] if e["type"] == "prediction" and e["ts"] >= start)
    trailing = [r for r in _lines(path) if r["verdict"] == "not_evaluated"]
    assert sorted(r["rule"] for r in trailing) == sorted(["serving-error-rate", "p99-latency", "model-error",
                                                          "feature-drift"])
    for r in trailing:
        assert (r["window_start_epoch"], r["window_end_epoch"]) == (start, start + STEP)
        assert r["evidence"]["data_until"] == last and r["evidence"]["data_from"] == start
        assert r["evidence"]["predictions"] == r["sample_size"] == preds > 0
        assert r["value"] is None and "were not evaluated" in r["insufficient"]
    assert "not evaluated: 4 window(s) the recording ended inside" in stdout
    assert re.search(r"serving-error-rate\s+demo-scorer/primary  window 2026-09-21 14:43:00 to "
                     rf"2026-09-21 14:44:00: {preds} predictions", stdout)


def test_the_replay_summary_lists_the_trailing_windows(scenario, tmp_path):
    out = rollbackd("replay", str(scenario["rec"]), "-c", str(scenario["rules"]), "--db", "r.db",
                    "--notifier", "none", "--summary-json", cwd=tmp_path)
    summary = json.loads(out.stdout)
    assert [w["rule"] for w in summary["not_evaluated"]] == ["serving-error-rate", "p99-latency",
                                                             "model-error", "feature-drift"]
    assert summary["not_evaluated"][0]["window_start"] == "2026-09-21T14:43:00Z"


# ---------------------------------------------------------------------------------------------
# Repeat notices


def test_repeat_notices_are_printed_once_then_summarised(replayed):
    _, stdout, decisions = replayed["runs"][0]
    repeats = [d for d in _lines(decisions) if d["kind"] == "action" and d.get("notice") == "repeat"]
    assert len(repeats) == 11  # the decision log keeps every one
    assert stdout.count("REPEAT inc-") == 2  # the first in full, then one summary line
    first = repeats[0]
    assert f"REPEAT {first['incident_id']} at {iso(first['ts'])}" in stdout
    summary = (f"REPEAT {first['incident_id']}: repeated 10 more times between {iso(repeats[1]['ts'])} "
               f"and {iso(repeats[-1]['ts'])} (not printed one by one)")
    assert summary in stdout


def test_repeat_folding_tick_table():
    def notice(kind: str, ts: float, incident: str = "inc-a") -> Notice:
        return Notice(incident, kind, ts, "d", "v", "1", "t", "t")  # type: ignore[arg-type]

    stream = io.StringIO()
    console = ConsoleNotifier(stream=stream, summarize_repeats=True)
    steps = [
        (notice("opened", 0), 1), (notice("repeat", 60), 1), (notice("repeat", 120), 0),
        (notice("repeat", 60, "inc-b"), 1), (notice("repeat", 180), 0), (notice("resolved", 200), 2),
        (notice("repeat", 300), 1),
    ]
    heads = re.compile(r"^(?:OPENED|REPEAT|RESOLVED) inc-", re.M)
    for n, printed in steps:
        before = len(heads.findall(stream.getvalue()))
        result = console.post(n)
        assert (result.status, result.detail) == ("succeeded", "printed")  # what the log records
        assert len(heads.findall(stream.getvalue())) - before == printed, n
    text = stream.getvalue()
    assert ("REPEAT inc-a: repeated 2 more times between 1970-01-01T00:02:00Z and 1970-01-01T00:03:00Z "
            "(not printed one by one)\nRESOLVED inc-a") in text
    console.post(notice("repeat", 360, "inc-b"))  # folded into inc-b's run
    assert stream.getvalue() == text
    console.end()  # inc-b's run has one folded; inc-a's new one none: one line
    assert stream.getvalue().endswith("REPEAT inc-b: repeated 1 more time between 1970-01-01T00:06:00Z and "
                                      "1970-01-01T00:06:00Z (not printed one by one)\n")
    assert stream.getvalue().count("not printed one by one") == 2
    # without summarize_repeats every repeat is printed
    plain = io.StringIO()
    ConsoleNotifier(stream=plain).post(notice("repeat", 60))
    ConsoleNotifier(stream=plain).post(notice("repeat", 120))
    assert plain.getvalue().count("REPEAT inc-a at") == 2
    assert RepeatFolding().end() == ""


# ---------------------------------------------------------------------------------------------
# Drill


def test_a_drill_writes_the_file_and_its_decisions_do_not_change(scenario, tmp_path):
    config = load_config(scenario["rules"])
    plain = drill(scenario["rec"], config, out_dir=tmp_path / "plain", notifier=ConsoleNotifier(stream=io.StringIO()),
                  ledger=False)
    stream = io.StringIO()
    writer = open_measurements(tmp_path / "drill.jsonl", config)
    measured = drill(scenario["rec"], config, out_dir=tmp_path / "measured", ledger=False, measurements=writer,
                     notifier=ConsoleNotifier(stream=stream, summarize_repeats=True))
    assert (tmp_path / "plain" / "decisions.jsonl").read_bytes() == \
        (tmp_path / "measured" / "decisions.jsonl").read_bytes()
    records = _lines(tmp_path / "drill.jsonl")
    assert measured.tap is not None and measured.tap.evaluations == plain.tap.evaluations
    assert sum(r["verdict"] != "not_evaluated" for r in records) == plain.tap.evaluations
    assert sum(r["verdict"] != "not_evaluated" and r["share"] is None for r in records) == 120
    assert sum(r["verdict"] == "not_evaluated" for r in records) == 4
    assert measured.summary["not_evaluated"] and writer.closed
    assert stream.getvalue().count("REPEAT inc-") == 2 and "repeated 10 more times" in stream.getvalue()


# ---------------------------------------------------------------------------------------------
# The live daemon


def _live(scenario: dict, tmp_path: Path, path: str | Path) -> tuple[MeasurementWriter, MeasurementTap, Path]:
    """The daemon's loop (``Daemon.run``, as ``rollbackd run`` drives it) over the recording,
    with a writer as ``run --measurements-out`` attaches it (appending, flushed by event time)."""
    from rollbackd.daemon.run import Daemon, RunSettings

    config = load_config(scenario["rules"])
    decisions = tmp_path / "live-decisions.jsonl"
    pipeline = build_pipeline(config, decisions=DecisionLog(decisions), notifier=ConsoleNotifier(stream=io.StringIO()))
    tap = MeasurementTap(config, profiles=False, max_points=1)  # as serve_daemon's
    writer = open_measurements(path, config, tee=tap, append=True, flush_every=60.0, buffer_size=16)
    pipeline.edges.tap = writer
    daemon = Daemon(pipeline, open_recording(str(scenario["rec"]), config),
                    settings=RunSettings(checkpoint_path=str(tmp_path / "ckpt"), checkpoint_every=60))
    daemon.run()  # a finite source: returns at its end
    writer.close()
    return writer, tap, decisions


def test_the_live_loop_writes_one_line_per_evaluation(scenario, tmp_path):
    writer, tap, _ = _live(scenario, tmp_path, tmp_path / "live.jsonl")
    records = _lines(tmp_path / "live.jsonl")
    assert writer.errors == 0 and tap.evaluations > 0
    assert len(records) == writer.written == writer.evaluations == tap.evaluations


def test_a_live_write_error_is_logged_and_the_daemon_goes_on(scenario, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        writer, tap, decisions = _live(scenario, tmp_path, "/dev/full")
    assert writer.errors == 1 and writer.stopped and writer.written == 0
    assert writer.evaluations == tap.evaluations > 0  # evaluations went on after the failure
    failed = [e for e in logs if e["event"] == "measurements.write_failed"]
    assert len(failed) == 1 and "No space left on device" in failed[0]["error"]
    reference = tmp_path / "ref"
    reference.mkdir()
    _, _, same = _live(scenario, reference, reference / "ok.jsonl")
    assert decisions.read_bytes() == same.read_bytes()


def test_run_refuses_a_parquet_measurements_file(tmp_path, scenario):
    out = rollbackd("run", "-c", str(scenario["rules"]), "--bootstrap-servers", "127.0.0.1:1",
                    "--measurements-out", "m.parquet", "--db", "r.db", cwd=tmp_path)
    assert out.returncode == 2
    assert b"run writes JSON Lines" in out.stderr and b"Traceback" not in out.stderr
    assert not (tmp_path / "r.db").exists()


def test_the_printed_timeline_of_a_replay_folds_repeats(replayed):
    from rollbackd.cli import _folded_timeline

    _, _, decisions = replayed["runs"][0]
    lines = list(_folded_timeline(_lines(decisions)))
    assert sum("notify    repeat" in line for line in lines) == 1
    assert sum("repeated 10 more times" in line for line in lines) == 1
    assert len(lines) == len(_lines(decisions)) - 10 + 1


def test_the_same_replay_writes_the_same_parquet_bytes(scenario, tmp_path):
    pytest.importorskip("pyarrow")
    config = load_config(scenario["rules"])
    for name in ("a.parquet", "b.parquet"):
        writer = open_measurements(tmp_path / name, config)
        pipeline = build_pipeline(config, tap=writer, notifier=ConsoleNotifier(stream=io.StringIO()))
        result = replay(open_recording(str(scenario["rec"]), config), pipeline)
        writer.not_evaluated(result.not_evaluated)
        writer.close()
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert len(load_measurements(tmp_path / "a.parquet").records) == writer.written
