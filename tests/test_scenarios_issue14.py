"""Issue 14's built-in scenarios: each generates deterministically and has the properties its
description states, measured from the generated events; its truth file is well-formed and
backtest takes it; its example rules file loads (or, until the detectors it needs are merged,
fails only on them)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
from importlib import resources
from pathlib import Path

import msgspec
import numpy as np
import pytest

from rollbackd.drills import backtest, load_truth, write_truth
from rollbackd.rules.loader import check_file, load_config
from rollbackd.scenarios import BUILTIN, Cycle, Fault, Ramp, Scenario, generate, scenario_truth, write_recording

NEW = ("recall_collapse", "bad_rolling_update", "healthy_rolling_update", "daily_cycle",
       "daily_cycle_shift", "one_region_fault")
DAY = 86_400.0
EXAMPLES = Path(str(resources.files("rollbackd") / "examples"))


@functools.lru_cache(maxsize=None)
def lines_of(name: str) -> tuple[bytes, ...]:
    return tuple(generate(BUILTIN[name]))


@functools.lru_cache(maxsize=None)
def events_of(name: str) -> tuple[list[dict], dict[str, int], list[dict]]:
    """(predictions, label by id, deploys) of a built-in scenario, as decoded dicts."""
    dec = msgspec.json.Decoder()
    evs = [dec.decode(line) for line in lines_of(name)]
    preds = [e for e in evs if e["type"] == "prediction"]
    labels = {e["id"]: e["label"] for e in evs if e["type"] == "outcome"}
    deploys = [e for e in evs if e["type"] == "deploy"]
    assert len(preds) + len(labels) + len(deploys) == len(evs)
    return preds, labels, deploys


def within(observed: float, expected: float, n: int, sds: float = 4.0) -> bool:
    """``observed`` share of ``n`` trials is within ``sds`` binomial sds of ``expected``."""
    return abs(observed - expected) <= sds * math.sqrt(expected * (1 - expected) / n)


# --- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_bytes(name):
    again = hashlib.sha256(b"\n".join(generate(BUILTIN[name]))).hexdigest()
    assert hashlib.sha256(b"\n".join(lines_of(name))).hexdigest() == again
    # and the seed matters: another one draws other traffic (first 500 lines, generated lazily)
    other = dataclasses.replace(BUILTIN[name], seed=99)
    assert list(itertools.islice(generate(other), 500)) != list(lines_of(name)[:500])


def test_paired_scenarios_share_their_traffic_outside_the_fault():
    """Same seed: the healthy and the bad rolling update have the same requests, versions and
    timestamps; the daily cycle with and without the day-3 shift are byte-identical before it."""
    bad, _, _ = events_of("bad_rolling_update")
    good, _, _ = events_of("healthy_rolling_update")
    assert [(p["id"], p["ts"], p["model_version"]) for p in bad] == [
        (p["id"], p["ts"], p["model_version"]) for p in good
    ]
    shift_at = BUILTIN["daily_cycle_shift"].start + 2 * DAY + 6 * 3600
    a = [line for line in lines_of("daily_cycle") if msgspec.json.decode(line)["ts"] < shift_at - 300]
    b = lines_of("daily_cycle_shift")[: len(a)]
    assert len(a) > 200_000 and list(b) == a


def test_a_signal_loss_of_zero_changes_nothing():
    base = dataclasses.replace(BUILTIN["recall_collapse"], duration=600.0, versions=((0.0, "3"),), faults=())
    zero = dataclasses.replace(base, faults=(Fault("signal_loss", start=0.0, magnitude=0.0),))
    assert list(generate(zero)) == list(generate(base))


# --- recall_collapse ---------------------------------------------------------------------------


def _labelled(version: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    preds, labels, _ = events_of("recall_collapse")
    rows = [(p["score"], p["prediction"], labels[p["id"]]) for p in preds
            if p["model_version"] == version and p["id"] in labels]
    score, pred, y = (np.array(c, dtype=float) for c in zip(*rows))
    return score, pred, y


def spiegelhalter_z(score: np.ndarray, y: np.ndarray) -> float:
    """Spiegelhalter's calibration z: Σ(y−p)(1−2p) / √Σ(1−2p)²p(1−p); Normal(0, 1) when the
    scores are the labels' probabilities."""
    return float(np.sum((y - score) * (1 - 2 * score)) / np.sqrt(np.sum((1 - 2 * score) ** 2 * score * (1 - score))))


def test_recall_collapse_rare_fraud_recall_falls_scores_stay_calibrated():
    s3, p3, y3 = _labelled("3")
    s4, p4, y4 = _labelled("4")
    assert len(y3) > 10_000 and len(y4) > 20_000
    for y in (y3, y4):
        assert 0.03 < y.mean() < 0.05  # about 4 % fraud, before and after
    recall3, recall4 = p3[y3 == 1].mean(), p4[y4 == 1].mean()
    assert 0.50 < recall3 < 0.67
    assert 0.15 < recall4 < 0.27  # the new version misses about 80 % of the fraud
    assert recall4 < 0.45 * recall3
    miss3, miss4 = (p3 != y3).mean(), (p4 != y4).mean()
    assert 0.005 < miss4 - miss3 < 0.02  # the misclassification rate moves about a point
    # calibrated before and after: mean score = fraud rate, and Spiegelhalter's z is small
    for s, y in ((s3, y3), (s4, y4)):
        assert within(float(s.mean()), float(y.mean()), len(y), 4.0)
        assert abs(spiegelhalter_z(s, y)) < 3.0


def test_recall_collapse_is_not_caught_by_calibration_or_misclassification(tmp_path):
    """The drills' calibration and model-error rules stay quiet: a recall rule must catch it."""
    rec = tmp_path / "rc.jsonl"
    write_recording(BUILTIN["recall_collapse"], rec)
    text = (EXAMPLES / "drills.yaml").read_text().replace("demo-scorer", "fraud-scorer")
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    result = backtest(str(rec), load_config(rules), truth=scenario_truth(BUILTIN["recall_collapse"])).to_record()
    assert result["a"]["fired"] == []
    scores = result["a"]["scores"]
    assert all(s["expected"] == 0 for s in scores.values())  # signal_loss is for model_quality


# --- rolling updates ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, error8", [("bad_rolling_update", 0.08), ("healthy_rolling_update", 0.005)])
def test_rolling_update_ramps_8_from_0_to_100_percent(name, error8):
    s = BUILTIN[name]
    preds, _, deploys = events_of(name)
    assert [(d["ts"] - s.start, d["model_version"]) for d in deploys] == [(0.0, "7"), (1200.0, "8")]
    t = np.array([p["ts"] for p in preds]) - s.start
    is8 = np.array([p["model_version"] == "8" for p in preds])
    err = np.array([p["error"] is not None for p in preds])
    assert not is8[t < 1200].any() and is8[t >= 1800].all()
    assert {p["model_version"] for p in preds} == {"7", "8"}
    for a in range(1200, 1800, 60):  # each minute of the ramp: 8's share at the minute's midpoint
        m = (t >= a) & (t < a + 60)
        assert within(float(is8[m].mean()), (a + 30 - 1200) / 600, int(m.sum()))
    # only 8 fails, during the ramp and after it
    n7, n8 = int((~is8 & (t >= 1200)).sum()), int(is8.sum())
    assert within(float(err[~is8].mean()), 0.005, int((~is8).sum()))
    assert within(float(err[is8].mean()), error8, n8)
    assert within(float(err[~is8 & (t >= 1200)].mean()), 0.005, n7)


# --- daily cycle -------------------------------------------------------------------------------


def _phase(ts: np.ndarray, peak: float = 14 * 3600.0) -> np.ndarray:
    return 2 * np.pi * np.mod(ts - peak, DAY) / DAY


def _harmonic_fit(phi: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Least squares y = c + A·cos φ + B·sin φ: (c, A, B, residual sd)."""
    X = np.column_stack([np.ones_like(phi), np.cos(phi), np.sin(phi)])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    return float(coef[0]), float(coef[1]), float(coef[2]), float(resid.std())


def test_daily_cycle_traffic_is_8x_at_14h_and_feature_swings_0_3_sd():
    s = BUILTIN["daily_cycle"]
    preds, _, _ = events_of("daily_cycle")
    ts = np.array([p["ts"] for p in preds])
    assert ts.min() >= s.start and ts.max() < s.start + 3 * DAY
    assert s.start % DAY == 0  # from midnight UTC
    # rate 1/s on average: the chunks' rates integrate the cycle exactly (Poisson, 4 sd)
    assert abs(len(ts) - 3 * DAY) < 4 * math.sqrt(3 * DAY)
    # counts per 10 minutes against c·(1 + a·cos φ): a = 7/9 gives peak/trough = 8
    bins = np.arange(s.start, s.start + 3 * DAY + 1, 600.0)
    counts, _ = np.histogram(ts, bins)
    c, A, B, _ = _harmonic_fit(_phase(bins[:-1] + 300.0), counts.astype(float))
    a = math.hypot(A, B) / c
    assert abs(a - 7 / 9) < 0.02 and 7.0 < (1 + a) / (1 - a) < 9.2
    assert abs(math.atan2(B, A)) < 2 * np.pi * 0.25 / 24  # peaks within 15 minutes of 14:00 UTC
    # num_0's mean: ±0.3 of its sd, with the traffic; num_1 does not cycle
    phi = _phase(ts)
    for feature, amplitude in (("num_0", 0.3), ("num_1", 0.0)):
        x = np.array([p["features"][feature] for p in preds])
        _, A, B, sd = _harmonic_fit(phi, x)
        assert abs(math.hypot(A, B) / sd - amplitude) < 0.015, feature
        if amplitude:
            assert A > 0 and abs(B) < 0.02 * sd


def test_daily_cycle_shift_moves_num_0_by_0_6_sd_from_day_3_06h_and_errors_jump_at_12h():
    s = BUILTIN["daily_cycle_shift"]
    preds, _, _ = events_of("daily_cycle_shift")
    ts = np.array([p["ts"] for p in preds])
    x = np.array([p["features"]["num_0"] for p in preds])
    after = ts >= s.start + 2 * DAY + 6 * 3600
    phi = _phase(ts)
    X = np.column_stack([np.ones_like(phi), np.cos(phi), np.sin(phi), after.astype(float)])
    coef, *_ = np.linalg.lstsq(X, x, rcond=None)
    sd = float((x - X @ coef).std())
    assert abs(coef[3] / sd - 0.6) < 0.03
    err = np.array([p["error"] is not None for p in preds])
    jump = ts >= s.start + 2 * DAY + 12 * 3600
    assert within(float(err[~jump].mean()), 0.005, int((~jump).sum()))
    assert within(float(err[jump].mean()), 0.05, int(jump.sum()))
    shift, errors = scenario_truth(s)
    assert shift["kind"] == "feature_shift" and shift["feature"] == "num_0"
    assert shift["start"] == s.start + 2 * DAY + 6 * 3600 and shift["end"] == s.end
    assert errors["kind"] == "error_rate" and errors["start"] == s.start + 2 * DAY + 12 * 3600


# --- one region --------------------------------------------------------------------------------


def test_one_region_fault_volumes_and_error_rates_by_region():
    s = BUILTIN["one_region_fault"]
    preds, _, _ = events_of("one_region_fault")
    assert all(set(p["attrs"]) == {"region"} for p in preds)
    region = np.array([p["attrs"]["region"] for p in preds])
    t = np.array([p["ts"] for p in preds]) - s.start
    err = np.array([p["error"] is not None for p in preds])
    n = len(region)
    for name, share in s.regions:
        m = region == name
        assert within(float(m.mean()), share, n)
        before, after = m & (t < 900), m & (t >= 900)
        assert within(float(err[before].mean()), 0.004, int(before.sum()))
        expected = 0.09 if name == "eu-west" else 0.004
        assert within(float(err[after].mean()), expected, int(after.sum())), name
    # the deployment as a whole stays under 3 %: only a per-region rule sees it
    assert float(err[t >= 900].mean()) < 0.03
    (truth,) = scenario_truth(s)
    assert truth["slice"] == {"attrs.region": "eu-west"} and truth["kind"] == "error_rate"


# --- truth files and rules files ---------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_truth_files_are_well_formed_and_load(name, tmp_path):
    s = BUILTIN[name]
    path = tmp_path / f"{name}.truth.yaml"
    entries = write_truth(s, path)
    faults = load_truth(path)
    assert len(faults) == len(entries) == len(s.faults)
    healthy = name in ("healthy_rolling_update", "daily_cycle")
    assert healthy == (faults == [])
    for f in faults:
        assert s.start <= f.start < (f.end if f.end is not None else s.end) <= s.end
    if name == "one_region_fault":
        assert faults[0].slice == (("attrs.region", "eu-west"),)
        assert "attrs.region=eu-west" in faults[0].describe(s.start)


@pytest.mark.parametrize("name, rules, caught", [
    ("bad_rolling_update", "rolling-update.yaml", True),
    ("healthy_rolling_update", "rolling-update.yaml", False),
    ("one_region_fault", "drills.yaml", False),  # the whole deployment stays under 5 % errors
])
def test_backtest_takes_the_truth_files(name, rules, caught, tmp_path):
    rec = tmp_path / f"{name}.jsonl"
    truth = tmp_path / f"{name}.truth.yaml"
    write_recording(BUILTIN[name], rec)
    write_truth(BUILTIN[name], truth)
    result = backtest(str(rec), load_config(EXAMPLES / rules), truth=str(truth)).to_record()
    scores = result["a"]["scores"]
    errors = scores["serving-errors"]
    assert errors["false_alerts"] == 0
    if name == "healthy_rolling_update":
        assert result["a"]["fired"] == [] and errors["expected"] == 0
    else:
        assert (errors["expected"], errors["detected"]) == (1, int(caught))


@pytest.mark.parametrize("rules", ["recall-collapse.yaml", "rolling-update.yaml", "daily-cycle.yaml",
                                   "one-region-fault.yaml"])
def test_example_rules_load_without_errors(rules):
    config, issues = check_file(EXAMPLES / rules)
    assert config is not None and [i for i in issues if i.severity == "error"] == []


# --- the options' validation -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"ramps": (Ramp("2", 100.0, 200.0),), "versions": ((0.0, "1"), (150.0, "2"))}, "no versions entry"),
    ({"faults": (Fault("error_rate", 0.0, region="mars"),), "regions": (("eu", 1.0),)}, "region"),
    ({"regions": (("eu", 1.0), ("eu", 2.0))}, "unique"),
    ({"regions": (("eu", 0.0),)}, "shares"),
    ({"cycle": Cycle(feature="num_7")}, "cycle feature"),
    ({"intercept": float("nan")}, "intercept"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scenario(name="x", **kwargs)


@pytest.mark.parametrize("make", [
    lambda: Ramp("2", 100.0, 100.0),
    lambda: Cycle(traffic_ratio=0.5),
    lambda: Cycle(feature="cat_0"),
    lambda: Cycle(period=0.0),
    lambda: Fault("signal_loss", 0.0, magnitude=1.5),
])
def test_bad_parts_are_refused(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("name", NEW)
def test_every_line_is_a_valid_contract_event(name):
    from rollbackd.events import EventDecoder, Rejected

    dec = EventDecoder()
    assert not any(isinstance(dec.decode(line), Rejected) for line in lines_of(name))
