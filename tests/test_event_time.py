"""Event time that one bad clock cannot move (daemon/admission.py, Pipeline.ingest/advance).

Every case replays a built-in recording with something wrong in it and compares the decision
log, byte for byte, with the clean run's: one event stamped ahead or long ago, a producer whose
clock runs fast, a whole stream that jumps a week, and more names than the caps allow.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.admission import JUMP_RUN, WARM_UP
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.events import EventDecoder, Prediction, Rejected
from rollbackd.rules.loader import load_config, load_config_text
from rollbackd.scenarios import BUILTIN, Fault, Scenario, generate

HERE = Path(__file__).parent
E2E = HERE / "data" / "e2e-rules.yaml"
DRILLS = Path(str(resources.files("rollbackd") / "examples" / "drills.yaml"))
DAY = 86400.0


def run(lines: list[bytes], rules, work: Path, batch_size: int = 4096):
    """Replays ``lines``: (decision log bytes, pipeline, dead-letter records, seconds)."""
    work.mkdir(parents=True, exist_ok=True)
    rec = work / "rec.jsonl"
    rec.write_bytes(b"\n".join(lines) + b"\n")
    config = rules if not isinstance(rules, Path) else load_config(rules)
    pipeline = build_pipeline(config, decisions=DecisionLog(work / "decisions.jsonl"),
                              dead_letter_path=work / "dead.jsonl",
                              notifier=ConsoleNotifier(stream=io.StringIO()))
    t0 = time.perf_counter()
    replay(open_recording(str(rec), config), pipeline, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    dead = [json.loads(x) for x in (work / "dead.jsonl").read_text().splitlines()]
    return (work / "decisions.jsonl").read_bytes(), pipeline, dead, seconds


@pytest.fixture(scope="module")
def lines() -> list[bytes]:
    return list(generate(BUILTIN["sustained_errors"]))


@pytest.fixture(scope="module")
def clean(lines, tmp_path_factory):
    out = {}
    for name, rules in (("e2e", E2E), ("drills", DRILLS)):
        out[name] = run(lines, rules, tmp_path_factory.mktemp(f"clean-{name}"))
    return out


def bogus(lines: list[bytes], ts: float) -> bytes:
    """A valid prediction like the recording's, stamped ``ts``."""
    first = next(json.loads(x) for x in lines if b'"prediction"' in x and b'"outcome"' not in x)
    first.update(id="bogus-clock", ts=ts)
    return json.dumps(first).encode()


def start_of(lines: list[bytes]) -> float:
    return json.loads(lines[0])["ts"]


# A day, 30 days and 10 years ahead, 1970, and the extremes a double can carry.
STAMPS = {
    "a day ahead": lambda t0: t0 + DAY,
    "30 days ahead": lambda t0: t0 + 30 * DAY,
    "10 years ahead": lambda t0: t0 + 3652 * DAY,
    "1970": lambda t0: 86400.0,
    "1e300": lambda t0: 1e300,
    "-1e300": lambda t0: -1e300,
}
WHERE = {"start": 0.0, "middle": 0.6, "end": 1.0}  # 0.6: while sustained_errors' incident is open


def inserted(lines, stamp, where):
    at = int(len(lines) * WHERE[where])
    return lines[:at] + [bogus(lines, STAMPS[stamp](start_of(lines)))] + lines[at:]


@pytest.mark.parametrize("where", sorted(WHERE))
@pytest.mark.parametrize("stamp", sorted(STAMPS))
def test_one_event_stamped_far_off_changes_no_decision(lines, clean, stamp, where, tmp_path):
    expected, clean_pipeline, clean_dead, clean_seconds = clean["e2e"]
    got, pipeline, dead, seconds = run(inserted(lines, stamp, where), E2E, tmp_path)
    assert got == expected
    assert len(dead) == len(clean_dead) + 1
    (extra,) = [d for d in dead if "bogus-clock" in d["raw"]]
    # future_timestamp / too_old here; the decoder may refuse the extremes first.
    if abs(STAMPS[stamp](0.0)) < 1e12:
        assert extra["reason"] == ("too_old" if stamp == "1970" else "future_timestamp")
    assert pipeline.counters["late"] == clean_pipeline.counters["late"]
    assert seconds < clean_seconds * 3 + 5.0, "no walk over empty boundaries"


@pytest.mark.parametrize("stamp", ["a day ahead", "10 years ahead", "1e300"])
def test_with_a_no_data_rule_and_an_open_incident_too(lines, clean, stamp, tmp_path):
    expected, _, clean_dead, clean_seconds = clean["drills"]
    got, _, dead, seconds = run(inserted(lines, stamp, "middle"), DRILLS, tmp_path)
    assert got == expected
    assert len(dead) == len(clean_dead) + 1
    assert seconds < clean_seconds * 3 + 5.0


def test_bad_stamps_give_the_same_decisions_whatever_the_batch_size(lines, tmp_path):
    t0 = start_of(lines)
    mixed = list(lines)
    for k, ts in enumerate([t0 + DAY, 86400.0, t0 + 400.0, t0 + 30 * DAY]):
        at = (k + 1) * len(lines) // 5
        mixed.insert(at, bogus(lines, ts).replace(b"bogus-clock", f"bogus-{k}".encode()))
    runs = [run(mixed, E2E, tmp_path / str(b), batch_size=b) for b in (7, 97, 4096)]
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert [d["raw"] for d in runs[0][2]] == [d["raw"] for d in runs[1][2]] == [d["raw"] for d in runs[2][2]]
    assert runs[0][1].summary() == runs[1][1].summary() == runs[2][1].summary()


# A fast producer ---------------------------------------------------------------------------

TWO = """
version: 1
settings: {lateness: 30s, join_horizon: 1h, notifier: {type: none}}
grouping: {group_wait: 30s}
rules:
  - {name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, window: {size: 1m}, for: 2m, min_samples: 50, severity: critical,
     actions: [notify, rollback]}
"""


def shifted(lines: list[bytes], deployment: str, by: float) -> list[bytes]:
    out = []
    for raw in lines:
        ev = json.loads(raw)
        if ev.get("deployment") == deployment:
            ev["ts"] += by
            raw = json.dumps(ev).encode()
        out.append(raw)
    return out


def records(log: bytes, deployment: str) -> list[dict]:
    return [r for r in map(json.loads, log.splitlines()) if r.get("deployment") == deployment]


def test_a_producer_four_minutes_fast_makes_no_other_deployments_events_late(tmp_path):
    scenario = Scenario(
        name="two", seed=11, deployments=("alpha", "beta"), rate=20.0,
        versions=((0.0, "1"), (900.0, "2")),
        faults=(Fault("error_rate", start=900.0, magnitude=0.2, version="2", deployment="alpha"),),
    )
    lines = list(generate(scenario))
    config = load_config_text(TWO)
    clean_log, clean, _, _ = run(lines, config, tmp_path / "clean")
    fast_log, fast, dead, _ = run(shifted(lines, "beta", 240.0), config, tmp_path / "fast")
    assert clean.counters["late"] == 0
    assert fast.counters["late"] == 0, "alpha's events are not late behind beta's clock"
    alpha, expected = records(fast_log, "alpha"), records(clean_log, "alpha")
    assert alpha[: len(expected)] == expected
    # Beta's clock runs on past the end of alpha's data: the flush at the end of the stream
    # reaches deadlines of alpha's incident that the clean stream ended before.
    end = scenario.start + scenario.duration
    assert [r["ts"] > end for r in alpha[len(expected):]] == [True] * (len(alpha) - len(expected))
    assert [r["state"] for r in alpha if r.get("kind") == "alert"] == ["pending", "firing"]
    assert dead == []
    # The watermark follows the slowest active deployment (alpha), not beta's clock.
    assert fast.event_time.deployments["beta"].max_ts - fast.event_time.deployments["alpha"].max_ts == pytest.approx(240.0, abs=5.0)


def test_a_producer_beyond_the_skew_is_dead_lettered_and_moves_nothing(tmp_path):
    scenario = Scenario(name="two", seed=12, deployments=("alpha", "beta"), rate=10.0, duration=900.0)
    lines = list(generate(scenario))
    config = load_config_text(TWO)
    clean_log, clean, _, _ = run(lines, config, tmp_path / "clean")
    log, pipeline, dead, _ = run(shifted(lines, "beta", 600.0), config, tmp_path / "fast")
    beta = sum(1 for x in lines if b'"beta"' in x)
    assert {d["reason"] for d in dead} == {"future_timestamp"}
    assert len(dead) == beta
    assert records(log, "alpha") == records(clean_log, "alpha")
    assert pipeline.counters["late"] == 0


# A jump of the whole stream ----------------------------------------------------------------

def test_a_whole_stream_that_jumps_a_week_is_followed(lines, tmp_path):
    week = 7 * DAY
    second_scenario = replace(BUILTIN["sustained_errors"], name="later", deployments=("later-scorer",),
                              start=BUILTIN["sustained_errors"].start + week)
    second = list(generate(second_scenario))
    both_log, both, dead, seconds = run(lines + second, DRILLS, tmp_path / "both")
    # The events of the second recording seen before the jump was recognised: dead-lettered.
    lost = JUMP_RUN - 1
    assert [d["reason"] for d in dead] == ["future_timestamp"] * lost
    decode = EventDecoder().decode
    assert [decode(d["raw"].encode()) for d in dead] == [decode(x) for x in second[:lost]]
    alone_log, _, _, _ = run(second[lost:], DRILLS, tmp_path / "alone")
    assert records(both_log, "later-scorer") == records(alone_log, "later-scorer")
    assert records(alone_log, "later-scorer"), "the second recording decides something"
    # The first recording's own decisions are those of replaying it alone, up to its end.
    first_log, _, _, _ = run(lines, DRILLS, tmp_path / "first")
    firsts = records(first_log, "demo-scorer")
    assert records(both_log, "demo-scorer")[: len(firsts) - 2] == firsts[: len(firsts) - 2]
    assert both.counters["late"] == 0


def test_crossing_a_week_without_data_costs_rules_times_deployments_not_the_gap(lines, tmp_path, monkeypatch):
    from rollbackd.daemon.pipeline import Pipeline

    calls = []
    real = Pipeline._boundary
    monkeypatch.setattr(Pipeline, "_boundary", lambda self, t: (calls.append(t), real(self, t))[1])
    week = 7 * DAY
    later = [ln for ln in generate(replace(BUILTIN["sustained_errors"], start=BUILTIN["sustained_errors"].start + week))]
    # The whole-stream jump brings a silence of a week with a no-data rule and an open incident.
    log, pipeline, _, _ = run(lines + later, DRILLS, tmp_path)
    minutes = 2 * 1800 / 60
    assert len(calls) < 3 * minutes, f"{len(calls)} boundaries evaluated across a week's gap"
    no_data = [r for r in map(json.loads, log.splitlines())
               if r.get("kind") == "alert" and r.get("rule") == "no-traffic" and r["state"] == "firing"]
    gap_start = BUILTIN["sustained_errors"].start + 1800
    assert [r["ts"] for r in no_data if gap_start < r["ts"] < gap_start + week] != []
    assert len([r for r in no_data if gap_start < r["ts"] < gap_start + week]) == 1


# Cardinality ---------------------------------------------------------------------------------

CAPS = """
version: 1
settings: {notifier: {type: none}, max_deployments: 100, max_variants_per_deployment: 4,
           max_features_per_deployment: 100}
deployments:
  configured: {backend: {type: log}}
rules:
  - {name: errors, detector: error_rate, threshold: 0.5, window: {size: 1m}, severity: warning,
     actions: [notify]}
"""
T0 = 1_790_000_000.0


def pred(i: int, deployment: str = "d", variant: str = "primary", features: dict | None = None) -> bytes:
    return json.dumps({"type": "prediction", "id": f"p{i}", "ts": T0 + i * 0.05, "deployment": deployment,
                       "model_version": "1", "variant": variant, "features": features or {}}).encode()


def test_distinct_deployment_names_beyond_the_cap_are_dead_lettered(tmp_path):
    # 1000 s of event time: the refused events move the stream's time too (none is "future").
    lines = [pred(i, deployment=f"dep-{i}") for i in range(20_000)] + [pred(20_000, deployment="configured")]
    _, pipeline, dead, seconds = run(lines, load_config_text(CAPS), tmp_path)
    assert len(pipeline.event_time.deployments) == 101  # 100 unnamed + the configured one
    assert len(dead) == 20_000 - 100 and {d["reason"] for d in dead} == {"cardinality"}
    assert "max_deployments (100)" in dead[0]["detail"]
    assert pipeline.counters["predictions"] == 101
    assert len(pipeline.assembler.panes) <= 101
    # one notice says so, however many names were refused; it is not a decision
    printed = pipeline.edges.notifier.stream.getvalue()
    assert printed.count("[CARDINALITY]") == 1 and "too many distinct deployments" in printed
    assert "max_deployments (100)" in printed


def test_variants_and_feature_names_per_deployment_are_capped(tmp_path):
    variants = [pred(i, variant=f"v{i}") for i in range(10)]
    # 400 predictions naming 50 new feature names each: 20,000 names against a cap of 100.
    features = [pred(100 + i, variant="v0", features={f"f{i}_{k}": 1.0 for k in range(50)}) for i in range(400)]
    known = [pred(1000 + i, variant="v1", features={"f0_1": 2.0}) for i in range(10)]
    _, pipeline, dead, _ = run(variants + features + known, load_config_text(CAPS), tmp_path)
    seen = pipeline.event_time.deployments["d"]
    assert seen.variants == 4 and len([k for k in pipeline._known_keys if k[0] == "d"]) == 4
    assert len(seen.features) == 100
    reasons = [d["detail"].split("settings.")[1].split(" ")[0] for d in dead]
    assert reasons.count("max_variants_per_deployment") == 6
    assert reasons.count("max_features_per_deployment") == 398
    assert pipeline.counters["predictions"] == 4 + 2 + 10
    printed = pipeline.edges.notifier.stream.getvalue()
    assert printed.count("[CARDINALITY] d: too many distinct variants") == 1
    assert printed.count("[CARDINALITY] d: too many distinct features") == 1


def test_the_warm_up_holds_a_count_not_a_time(tmp_path):
    # A short recording (fewer events than the warm-up) still goes in, at the end of the stream.
    lines = [pred(i) for i in range(WARM_UP // 2)]
    _, pipeline, dead, _ = run(lines, load_config_text(CAPS), tmp_path)
    assert dead == [] and pipeline.counters["predictions"] == WARM_UP // 2


def test_a_bogus_first_event_does_not_anchor_the_reference(tmp_path):
    lines = [pred(0).replace(str(T0).encode(), str(T0 + 3 * DAY).encode())] + [pred(i) for i in range(1, 500)]
    assert json.loads(lines[0])["ts"] == T0 + 3 * DAY
    _, pipeline, dead, _ = run(lines, load_config_text(CAPS), tmp_path)
    assert [d["reason"] for d in dead] == ["future_timestamp"]
    assert pipeline.counters["predictions"] == 499 and pipeline.counters["late"] == 0


def test_live_an_old_recording_is_judged_against_itself():
    """A recording published for a drill has times long past: live, it goes in (the warm-up
    ends once all there is has been read), and an outlier a day ahead of it is refused although
    it is still in the wall clock's past."""
    pipeline = build_pipeline(load_config_text(CAPS))
    old = [Prediction(id=f"o{i}", ts=T0 - 365 * DAY + i, deployment="d", model_version="1") for i in range(10)]
    outlier = Prediction(id="x", ts=T0 - 364 * DAY, deployment="d", model_version="1")
    pipeline.ingest(old, wall_now=T0)
    assert pipeline.counters["predictions"] == 0  # held: the warm-up
    pipeline.finish(T0)  # the daemon read everything there was
    pipeline.ingest([outlier], wall_now=T0 + 1)
    assert pipeline.counters["predictions"] == 10
    assert dict(pipeline.rejects) == {"future_timestamp": 1}


def test_live_the_wall_clock_bounds_the_future():
    pipeline = build_pipeline(load_config_text(CAPS))
    now = [Prediction(id=f"n{i}", ts=T0 - 10 + i, deployment="d", model_version="1") for i in range(10)]
    pipeline.ingest(now, wall_now=T0)
    pipeline.finish(T0)
    ahead = Prediction(id="ahead", ts=T0 + 301.0, deployment="d", model_version="1")
    near = Prediction(id="near", ts=T0 + 299.0, deployment="e", model_version="1")
    pipeline.ingest([ahead, near], wall_now=T0)
    assert pipeline.counters["predictions"] == 11
    assert dict(pipeline.rejects) == {"future_timestamp": 1}


def test_a_checkpoint_carries_event_time(lines, tmp_path):
    config = load_config(E2E)
    a = build_pipeline(config)
    events = [e for e in map(EventDecoder().decode, lines[:3000]) if not isinstance(e, Rejected)]
    a.ingest(events)
    a.advance(a.watermark)
    b = build_pipeline(config)
    b.restore(a.snapshot())
    assert b.watermark == a.watermark and b.max_event_time == a.max_event_time
    assert {k: s.max_ts for k, s in b.event_time.deployments.items()} == {
        k: s.max_ts for k, s in a.event_time.deployments.items()}
    assert not b.admission.warming and b.admission.anchor == a.admission.anchor


def test_a_silent_deployment_holds_no_one_back_and_its_no_data_rule_fires_on_time(tmp_path):
    scenario = Scenario(
        name="two", seed=13, deployments=("alpha", "beta"), rate=10.0, duration=1800.0,
        faults=(Fault("traffic_stop", start=900.0, deployment="beta"),),
    )
    rules = load_config_text(TWO + """
  - {name: no-traffic, detector: traffic, threshold: 1, direction: below, for: 1m,
     severity: warning, actions: [notify]}
""")
    log, pipeline, dead, _ = run(list(generate(scenario)), rules, tmp_path)
    stop = scenario.start + 900.0
    fired = [r["ts"] for r in records(log, "beta")
             if r.get("kind") == "alert" and r["rule"] == "no-traffic" and r["state"] == "firing"]
    # The first empty one-minute window ends at the first boundary a minute after the stop;
    # `for: 1m` fires it one boundary later: as with beta alone, not at the end of the stream.
    assert fired == [(stop // 60 + 2) * 60 + 60]
    # alpha's windows kept closing: the watermark is alpha's, not beta's last event.
    assert pipeline.watermark > stop + 600
    assert dead == [] and pipeline.counters["late"] == 0
