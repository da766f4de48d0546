"""The built-in detectors on seeded, hand-made windows, with exact expectations."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import pytest
from scipy import stats as sps

from rollbackd.detectors import (
    REGISTRY,
    Drift,
    ErrorRate,
    Labeled,
    Latency,
    Measurement,
    ModelError,
    Reference,
    Window,
    make_detector,
)
from rollbackd.detectors.model_error import binary_value
from rollbackd.events import Prediction

_ids = iter(range(10**9))


def pred(
    *,
    error: str | None = None,
    latency: float | None = None,
    features: dict[str, Any] | None = None,
    score: float | None = None,
    version: str = "v1",
) -> Prediction:
    i = next(_ids)
    return Prediction(
        id=str(i),
        ts=float(i),
        deployment="d",
        model_version=version,
        features=features or {},
        score=score,
        latency_ms=latency,
        error=error,
    )


def window(preds: Sequence[Prediction] = (), outcomes: Sequence[Labeled] = ()) -> Window:
    return Window("d", "primary", 0.0, 60.0, predictions=list(preds), outcomes=list(outcomes))


def label(prediction: Any, label_: Any, score: float | None = None) -> Labeled:
    return Labeled(0.0, 1.0, "primary", "v1", prediction, score, label_)


def measure(det: Any, *windows: Window) -> Measurement:
    for w in windows:
        det.update(w)
    return det.evaluate(60.0)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return mid - half, mid + half


def test_registry_and_factory() -> None:
    assert {"error_rate", "latency", "model_error", "drift"} <= set(REGISTRY)
    assert isinstance(make_detector("error_rate", threshold=0.1, min_samples=5, params={}), ErrorRate)
    det = make_detector("latency", threshold=200.0, min_samples=5, params={"quantile": 0.9})
    assert isinstance(det, Latency) and det.quantile == 0.9 and det.min_samples == 5
    assert isinstance(make_detector("model_error", threshold=0.1, min_samples=1, params={}), ModelError)
    ref = Reference("r.jsonl", {"x": [1.0, 2.0]})
    drift = make_detector("drift", threshold=0.1, min_samples=1, params={}, reference=ref)
    assert isinstance(drift, Drift) and drift.reference is ref
    assert isinstance(make_detector("drift", threshold=0.1, min_samples=1, params={}), Drift)


# -- error_rate ------------------------------------------------------------------------------


def test_error_rate_insufficient_below_min_samples() -> None:
    det = ErrorRate(threshold=0.05, min_samples=20)
    assert det.evaluate(0.0).insufficient == "no window yet"
    m = measure(det, window([pred(error="x")] * 19))
    assert m.value is None and m.p_value is None and m.sample_size == 19
    assert "min_samples" in (m.insufficient or "")
    assert measure(det, window([])).insufficient == "no predictions in window"


def test_error_rate_exact_small_window() -> None:
    errors = ["timeout", "oom", "timeout", "bad_input", "timeout", "oom", "e5", "e6", "e4"]
    preds = [pred(error=e) for e in errors] + [pred() for _ in range(21)]
    m = measure(ErrorRate(threshold=0.1, min_samples=30), window(preds))
    assert m.value == pytest.approx(9 / 30, rel=1e-15)
    assert m.sample_size == 30 and m.threshold == 0.1
    assert m.p_value == pytest.approx(
        sps.binomtest(9, 30, 0.1, alternative="greater").pvalue, rel=1e-12
    )
    lo, hi = wilson(9, 30)
    assert list(m.evidence) == ["errors", "n", "wilson_low", "wilson_high", "top_errors"]
    assert m.evidence["errors"] == 9 and m.evidence["n"] == 30
    assert m.evidence["wilson_low"] == pytest.approx(lo, rel=1e-12)
    assert m.evidence["wilson_high"] == pytest.approx(hi, rel=1e-12)
    # count desc, then code; at most five
    assert list(m.evidence["top_errors"].items()) == [
        ("timeout", 3), ("oom", 2), ("bad_input", 1), ("e4", 1), ("e5", 1),
    ]
    json.dumps(m.to_record())  # JSON-able


def test_error_rate_update_replaces_window() -> None:
    det = ErrorRate(threshold=0.5)
    det.update(window([pred(error="x")] * 4))
    m = measure(det, window([pred(), pred(), pred(), pred(error="y")]))
    assert m.value == 0.25 and m.evidence["top_errors"] == {"y": 1}


def test_error_rate_no_errors_is_not_significant() -> None:
    m = measure(ErrorRate(threshold=0.01), window([pred() for _ in range(50)]))
    assert m.value == 0.0 and m.p_value == 1.0 and m.evidence["top_errors"] == {}


def test_error_rate_baseline_mode() -> None:
    det = ErrorRate(threshold=0.02, mode="baseline", baseline_windows=3, min_samples=10)
    # 3 baseline windows: 1/100, 2/100, 0/100 errors -> p0 = 3/300; none of them is tested
    for k in (1, 2, 0):
        m = measure(det, window([pred(error="e")] * k + [pred()] * (100 - k)))
        assert m.insufficient == "building baseline" and m.value is None
    m = measure(det, window([]))  # an empty window is not part of the baseline
    assert m.insufficient == "no predictions in window"
    m = measure(det, window([pred(error="e")] * 8 + [pred()] * 92))
    assert m.value == pytest.approx(0.08 - 0.01, rel=1e-12)
    pooled = 11 / 400
    z = (0.08 - 0.01) / math.sqrt(pooled * (1 - pooled) * (1 / 100 + 1 / 300))
    assert m.evidence["z"] == pytest.approx(z, rel=1e-12)
    assert m.p_value == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=1e-9)
    assert m.evidence["baseline_rate"] == 0.01 and m.evidence["baseline_n"] == 300
    # the baseline stays fixed afterwards
    m = measure(det, window([pred()] * 50))
    assert m.value == pytest.approx(-0.01) and m.p_value > 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.5}, r"\[0, 1\]"),
        ({"threshold": -0.1}, r"\[0, 1\]"),
        ({"threshold": 0.1, "mode": "relative"}, "absolute, baseline"),
        ({"threshold": 0.1, "baseline_windows": 0}, ">= 1"),
        ({"threshold": 0.1, "confidence": 1.0}, r"\(0, 1\)"),
        ({"threshold": 0.1, "min_samples": -1}, ">= 0"),
    ],
)
def test_error_rate_invalid_params(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ErrorRate(**kwargs)


# -- latency ---------------------------------------------------------------------------------


def test_latency_exact_quantiles() -> None:
    lat = [float(x) for x in (5, 7, 7, 9, 10, 12, 15, 40, 41, 300)]
    preds = [pred(latency=x) for x in lat] + [pred(), pred(error="e")]  # no latency: ignored
    m = measure(Latency(threshold=100.0, quantile=0.9, min_samples=10), window(preds))
    assert m.value == pytest.approx(41 + 0.1 * (300 - 41), rel=1e-12)  # linear interpolation
    assert m.value == float(np.quantile(lat, 0.9))
    assert m.sample_size == 10 and m.p_value is None
    assert m.evidence == {
        "p50": 11.0,
        "p95": float(np.quantile(lat, 0.95)),
        "p99": float(np.quantile(lat, 0.99)),
        "max": 300.0,
        "n": 10,
    }


def test_latency_insufficient() -> None:
    det = Latency(threshold=100.0, min_samples=3)
    assert det.evaluate(0.0).insufficient == "no window yet"
    assert measure(det, window([pred(), pred()])).insufficient == "no latencies in window"
    m = measure(det, window([pred(latency=1.0), pred(latency=2.0), pred()]))
    assert m.value is None and m.sample_size == 2 and "min_samples" in (m.insufficient or "")


def test_latency_seeded_default_p99() -> None:
    rng = np.random.default_rng(3)
    lat = rng.lognormal(3.0, 0.5, 2000)
    m = measure(Latency(threshold=100.0), window([pred(latency=float(x)) for x in lat]))
    assert m.value == float(np.quantile(lat, 0.99)) == m.evidence["p99"]


@pytest.mark.parametrize("q", [0.0, 1.0, 1.5, -0.2])
def test_latency_invalid_quantile(q: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Latency(threshold=100.0, quantile=q)


# -- model_error -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (True, 1), (1, 1), (1.0, 1), ("1", 1), ("true", 1), (" Yes ", 1), ("TRUE", 1),
        (False, 0), (0, 0), (0.0, 0), ("0", 0), ("false", 0), ("no", 0),
        (None, None), (0.5, None), (2, None), ("cat", None), (float("nan"), None),
    ],
)
def test_binary_value(raw: Any, expected: int | None) -> None:
    assert binary_value(raw) == expected


def test_model_error_binary_exact() -> None:
    outcomes = [
        label(True, 1),  # tp
        label("yes", "false"),  # fp
        label(0, 0.0),  # tn
        label("0", "1"),  # fn
        label(None, "true", score=0.7),  # score >= 0.5 -> 1: tp
        label(None, 1, score=0.2),  # score < 0.5 -> 0: fn
        label(None, 0, score=None),  # no prediction, no score: unusable
        label("cat", 1),  # unusable prediction
        label(1, "maybe"),  # unusable label
    ]
    preds = [pred() for _ in range(18)]
    m = measure(ModelError(threshold=0.2, min_samples=6), window(preds, outcomes))
    assert m.value == pytest.approx(3 / 6, rel=1e-15)
    assert m.sample_size == 6
    assert m.p_value == pytest.approx(
        sps.binomtest(3, 6, 0.2, alternative="greater").pvalue, rel=1e-12
    )
    ev = m.evidence
    assert (ev["task"], ev["n"], ev["unusable"], ev["errors"]) == ("binary", 6, 3, 3)
    assert (ev["tp"], ev["fp"], ev["tn"], ev["fn"]) == (2, 1, 1, 2)
    assert ev["label_coverage"] == 0.5
    json.dumps(m.to_record())


def test_model_error_score_threshold() -> None:
    outcomes = [label(None, 1, score=0.6), label(None, 0, score=0.75)]
    assert measure(ModelError(threshold=0.1, score_threshold=0.5), window([], outcomes)).value == 0.5
    assert measure(ModelError(threshold=0.1, score_threshold=0.8), window([], outcomes)).value == 0.5
    assert measure(ModelError(threshold=0.1, score_threshold=0.7), window([], outcomes)).value == 1.0
    at_cut = [label(None, 1, score=0.5), label(None, 0, score=0.4999)]  # score >= cut is class 1
    assert measure(ModelError(threshold=0.1), window([], at_cut)).value == 0.0


def test_model_error_regression_and_auto() -> None:
    outcomes = [label(2.0, 3.0), label(5.0, 4.5), label(1.0, 1.0), label("x", 2.0), label(None, 2.0)]
    for task in ("regression", "auto"):
        m = measure(ModelError(threshold=1.0, task=task), window([pred()] * 5, outcomes))
        assert m.value == pytest.approx(0.5, rel=1e-15)  # (1 + 0.5 + 0) / 3
        assert m.p_value is None and m.sample_size == 3
        ev = m.evidence
        assert (ev["task"], ev["unusable"], ev["label_coverage"]) == ("regression", 2, 1.0)
        assert ev["bias"] == pytest.approx(-0.5 / 3)  # prediction - label and ev["rmse"] == pytest.approx(math.sqrt(1.25 / 3))


def test_model_error_auto_reads_binary_then_sticks_to_regression() -> None:
    det = ModelError(threshold=0.3)
    m = measure(det, window([], [label(1, 1), label(0, 1)]))
    assert m.evidence["task"] == "binary" and m.value == 0.5
    m = measure(det, window([], [label(0.5, 2.5)]))
    assert m.evidence["task"] == "regression" and m.value == 2.0
    m = measure(det, window([], [label(1.0, 1), label(0.25, 0)]))
    assert m.evidence["task"] == "regression" and m.value == pytest.approx(0.125)


def test_model_error_insufficient() -> None:
    det = ModelError(threshold=0.1, min_samples=3)
    assert det.evaluate(0.0).insufficient == "no window yet"
    m = measure(det, window([pred()] * 4, [label(1, 1), label(0, 1), label("x", 1)]))
    assert m.value is None and m.sample_size == 2 and "min_samples" in (m.insufficient or "")
    assert m.evidence["unusable"] == 1 and m.evidence["label_coverage"] == 0.75
    assert measure(det, window([pred()])).insufficient == "no usable labels in window"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0.1, "task": "multiclass"}, "auto, binary, regression"),
        ({"threshold": 1.5, "task": "binary"}, r"\[0, 1\]"),
        ({"threshold": -1.0}, ">= 0"),
        ({"threshold": 0.1, "score_threshold": 1.2}, r"\[0, 1\]"),
    ],
)
def test_model_error_invalid_params(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelError(**kwargs)


# -- drift -----------------------------------------------------------------------------------

CATS = ["a", "b", "c", "d"]


def drift_preds(
    rng: np.random.Generator,
    n: int,
    *,
    shift: float = 0.0,
    probs: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1),
    version: str = "v1",
) -> list[Prediction]:
    x0 = rng.normal(shift, 1.0, n).tolist()
    x1 = rng.normal(0.0, 1.0, n).tolist()
    cat = rng.choice(CATS, size=n, p=probs).tolist()
    score = rng.uniform(0, 1, n).tolist()
    return [
        pred(features={"x0": a, "x1": b, "cat": c}, score=s, version=version)
        for a, b, c, s in zip(x0, x1, cat, score)
    ]


def reference_of(preds: list[Prediction]) -> Reference:
    names = sorted({k for p in preds for k in p.features})
    cols: dict[str, list[Any]] = {k: [p.features.get(k) for p in preds] for k in names}
    cols["__score__"] = [p.score for p in preds]
    return Reference("test", cols)


def by_feature(m: Measurement) -> dict[str, dict[str, Any]]:
    return {f["feature"]: f for f in m.evidence["features"]}


def test_drift_numeric_shift_flagged_and_named() -> None:
    rng = np.random.default_rng(42)
    ref_preds = drift_preds(rng, 5000)
    win_preds = drift_preds(rng, 2000, shift=1.0)
    ref = reference_of(ref_preds)
    det = Drift(threshold=0.1, min_samples=100, reference=ref)
    m = measure(det, window(win_preds))
    assert m.evidence["drifted"] == ["x0"]
    assert m.evidence["tested"] == 3 and m.evidence["correction"] == "holm"
    x0 = np.array([p.features["x0"] for p in win_preds])
    ks = sps.ks_2samp(x0, ref.columns["x0"], method="asymp")
    assert m.value == m.effect_size == float(ks.statistic)
    feats = by_feature(m)
    assert feats["x0"]["test"] == "ks" and feats["x0"]["n"] == 2000
    assert feats["x0"]["p_value"] == pytest.approx(float(ks.pvalue), rel=1e-9, abs=1e-300)
    # the unshifted features are not flagged
    x1 = np.array([p.features["x1"] for p in win_preds])
    ks1 = sps.ks_2samp(x1, ref.columns["x1"], method="asymp")
    assert feats["x1"]["statistic"] == float(ks1.statistic)
    assert feats["x1"]["p_value"] == pytest.approx(float(ks1.pvalue), rel=1e-9)
    assert feats["x1"]["p_adjusted"] > 0.01 and feats["cat"]["p_adjusted"] > 0.01
    # Holm over three tests, written out
    raw = sorted((f["p_value"], name) for name, f in feats.items())
    running = 0.0
    for rank, (p, name) in enumerate(raw):
        running = max(running, min(1.0, (3 - rank) * p))
        assert feats[name]["p_adjusted"] == pytest.approx(running, rel=1e-12)
    assert m.p_value == min(f["p_adjusted"] for f in feats.values())
    assert m.sample_size == 2000
    # sorted by adjusted p-value, most significant first
    assert m.evidence["features"][0]["feature"] == "x0"
    json.dumps(m.to_record())


def test_drift_no_shift_reports_zero() -> None:
    rng = np.random.default_rng(7)
    det = Drift(threshold=0.1, reference=reference_of(drift_preds(rng, 5000)))
    m = measure(det, window(drift_preds(rng, 2000)))
    assert m.evidence["drifted"] == [] and m.value == 0.0 and m.effect_size == 0.0
    assert m.p_value is not None and m.p_value > 0.01


def test_drift_categorical_shift_flagged() -> None:
    rng = np.random.default_rng(5)
    ref = reference_of(drift_preds(rng, 5000))
    win_preds = drift_preds(rng, 2000, probs=(0.1, 0.2, 0.3, 0.4))
    m = measure(Drift(threshold=0.1, reference=ref), window(win_preds))
    assert m.evidence["drifted"] == ["cat"]
    cat = by_feature(m)["cat"]
    win_counts = [sum(p.features["cat"] == c for p in win_preds) for c in CATS]
    ref_counts = [sum(v == c for v in ref.columns["cat"]) for c in CATS]
    res = sps.chi2_contingency(np.array([win_counts, ref_counts]), correction=False)
    assert cat["test"] == "chi2" and cat["n"] == 2000
    assert cat["statistic"] == pytest.approx(float(res.statistic), rel=1e-12)
    assert cat["p_value"] == pytest.approx(float(res.pvalue), rel=1e-9, abs=1e-300)
    v = math.sqrt(float(res.statistic) / (7000 * 1))
    assert cat["effect"] == pytest.approx(v, rel=1e-12) and m.value == pytest.approx(v, rel=1e-12)


def test_drift_unseen_category_counts() -> None:
    ref = Reference("r", {"c": ["a"] * 60 + ["b"] * 40})
    win = [pred(features={"c": v}) for v in ["a"] * 30 + ["b"] * 20 + ["z"] * 10 + [None] * 5]
    m = measure(Drift(threshold=0.1, correction="none"), window([]))  # sanity: no reference yet
    assert m.insufficient == "no predictions in window"
    m = measure(Drift(threshold=0.1, correction="none", reference=ref), window(win))
    res = sps.chi2_contingency(np.array([[30, 20, 10], [60, 40, 0]]), correction=False)
    f = by_feature(m)["c"]
    assert f["n"] == 60  # None dropped
    assert f["statistic"] == pytest.approx(float(res.statistic), rel=1e-12)
    assert f["p_value"] == f["p_adjusted"] == pytest.approx(float(res.pvalue), rel=1e-9)
    assert m.sample_size == 65


def test_drift_feature_kind_comes_from_reference() -> None:
    ref = Reference("r", {"n": [1.0, 2.0, 3.0, "missing", None] * 20, "b": [True, False] * 50})
    win = [pred(features={"n": v, "b": b}) for v, b in zip([1.0, "x", 2.0, 2.5] * 10, [True] * 40)]
    m = measure(Drift(threshold=0.1, correction="none", reference=ref), window(win))
    feats = by_feature(m)
    assert feats["n"]["test"] == "ks" and feats["n"]["n"] == 30  # strings dropped
    xs = np.array([1.0, 2.0, 2.5] * 10)
    ks = sps.ks_2samp(xs, [1.0, 2.0, 3.0] * 20, method="asymp")
    assert feats["n"]["statistic"] == float(ks.statistic)
    assert feats["b"]["test"] == "chi2" and feats["b"]["n"] == 40


def test_drift_include_score_and_feature_selection() -> None:
    rng = np.random.default_rng(11)
    ref = reference_of(drift_preds(rng, 3000))
    win = drift_preds(rng, 1000)
    m = measure(Drift(threshold=0.1, features=["x1"], include_score=True, reference=ref), window(win))
    assert [f["feature"] for f in m.evidence["features"]] == sorted(
        ["x1", "__score__"], key=lambda n: (by_feature(m)[n]["p_adjusted"], n)
    )
    s = by_feature(m)["__score__"]
    ks = sps.ks_2samp([p.score for p in win], ref.columns["__score__"], method="asymp")
    assert s["statistic"] == float(ks.statistic)


def test_drift_score_named_in_features_uses_scores() -> None:
    rng = np.random.default_rng(4)
    det = Drift(threshold=0.1, features=["__score__"], reference_size=500)
    assert measure(det, window(drift_preds(rng, 500))).insufficient == "building reference"
    m = measure(det, window(drift_preds(rng, 500)))
    assert m.evidence["tested"] == 1 and by_feature(m)["__score__"]["n"] == 500


def test_drift_evidence_is_capped_and_sorted() -> None:
    rng = np.random.default_rng(2)
    cols = {f"f{i:02d}": rng.normal(0, 1, 500).tolist() for i in range(12)}
    shifts = {f"f{i:02d}": 0.1 * i for i in range(12)}
    win = [
        pred(features={k: float(rng.normal(shifts[k], 1)) for k in cols}) for _ in range(500)
    ]
    m = measure(Drift(threshold=0.1, max_evidence_features=4, reference=Reference("r", cols)), window(win))
    feats = m.evidence["features"]
    assert len(feats) == 4 and m.evidence["tested"] == 12
    keys = [(f["p_adjusted"], f["feature"]) for f in feats]
    assert keys == sorted(keys)
    assert {f["feature"] for f in feats} <= {f"f{i:02d}" for i in range(6, 12)}
    top_drifted = [f["feature"] for f in feats if f["p_adjusted"] < 0.01]
    assert top_drifted and m.evidence["drifted"][: len(top_drifted)] == top_drifted


def test_drift_corrections_differ_as_defined() -> None:
    rng = np.random.default_rng(9)
    ref = reference_of(drift_preds(rng, 2000))
    win = window(drift_preds(rng, 800, shift=0.1))
    got = {}
    for corr in ("none", "bonferroni", "holm", "bh"):
        got[corr] = by_feature(measure(Drift(threshold=0.1, correction=corr, reference=ref), win))
    raw = {k: v["p_value"] for k, v in got["none"].items()}
    assert {k: v["p_adjusted"] for k, v in got["none"].items()} == raw
    for k in raw:
        assert got["bonferroni"][k]["p_adjusted"] == pytest.approx(min(1.0, 3 * raw[k]))
    bh = sps.false_discovery_control(np.array(list(raw.values())), method="bh")
    assert [got["bh"][k]["p_adjusted"] for k in raw] == pytest.approx(bh.tolist())


def test_drift_min_samples_and_untestable() -> None:
    ref = Reference("r", {"x": [0.0, 1.0, 2.0] * 10, "empty": [None] * 5})
    det = Drift(threshold=0.1, min_samples=10, features=["x", "empty", "absent"], reference=ref)
    m = measure(det, window([pred(features={"x": 1.0})] * 9))
    assert m.value is None and m.sample_size == 9 and "min_samples" in (m.insufficient or "")
    m = measure(det, window([pred(features={"x": 1.0})] * 10))
    assert m.evidence["untested"] == ["empty", "absent"] and m.evidence["tested"] == 1
    m = measure(det, window([pred(features={"y": 1.0})] * 10))
    assert m.insufficient == "no testable features"


def test_drift_self_built_reference_equals_first_n_of_running_version() -> None:
    rng = np.random.default_rng(1)
    first = [drift_preds(rng, 1000) for _ in range(3)]  # 3000 v1 predictions
    det = Drift(threshold=0.1, reference_size=2500, include_score=True)
    for i, w in enumerate(first):
        m = measure(det, window(w))
        # the third window completes the reference (500 of its 1000) and is not tested
        assert m.insufficient == "building reference" and m.value is None
    test_win = window(drift_preds(rng, 1500, shift=1.0))
    got = measure(det, test_win)
    flat = [p for w in first for p in w]
    want = measure(Drift(threshold=0.1, include_score=True, reference=reference_of(flat[:2500])), test_win)
    assert got.to_record() == want.to_record()
    assert got.evidence["drifted"] == ["x0"]


def test_drift_reference_resets_on_version_change() -> None:
    rng = np.random.default_rng(3)
    det = Drift(threshold=0.1, reference_size=1000)
    assert measure(det, window(drift_preds(rng, 1000))).insufficient == "building reference"
    m = measure(det, window(drift_preds(rng, 1000)))
    assert m.insufficient is None and m.evidence["drifted"] == []
    # v2 becomes the running version (600 of 1000): its predictions alone start a new reference,
    # here shifted by one sd, so v1's old reference must not be what v2 is compared with.
    v2_a = drift_preds(rng, 600, shift=1.0, version="v2")
    mixed = drift_preds(rng, 400, version="v1") + v2_a
    m = measure(det, window(mixed))
    assert m.insufficient == "building reference" and m.evidence["reference_n"] == 600
    v2_b = drift_preds(rng, 700, shift=1.0, version="v2")
    assert measure(det, window(v2_b)).insufficient == "building reference"
    test_win = window(drift_preds(rng, 1000, shift=1.0, version="v2"))
    got = measure(det, test_win)
    want = measure(Drift(threshold=0.1, reference=reference_of((v2_a + v2_b)[:1000])), test_win)
    assert got.to_record() == want.to_record()
    assert got.evidence["drifted"] == []


def test_drift_is_deterministic() -> None:
    def run() -> str:
        rng = np.random.default_rng(8)
        det = Drift(threshold=0.05, reference_size=800, include_score=True)
        out = [measure(det, window(drift_preds(rng, 400, shift=0.3 * i))).to_record() for i in range(5)]
        return json.dumps(out)

    assert run() == run()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.5}, r"\[0, 1\]"),
        ({"threshold": 0.1, "correction": "fdr"}, "holm, bonferroni, bh, none"),
        ({"threshold": 0.1, "alpha": 0.0}, r"\(0, 1\)"),
        ({"threshold": 0.1, "alpha": 1.0}, r"\(0, 1\)"),
        ({"threshold": 0.1, "reference_size": 0}, ">= 1"),
        ({"threshold": 0.1, "max_evidence_features": -1}, ">= 0"),
        ({"threshold": 0.1, "features": "x0"}, "list of feature names"),
        ({"threshold": 0.1, "min_samples": -5}, ">= 0"),
    ],
)
def test_drift_invalid_params(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Drift(**kwargs)


# --- Skipping: a window too small for a verdict, taken unmeasured (issue 16) -------------------
def _skip_cases() -> list[tuple[str, Any, list[Window]]]:
    """Detectors that skip, and windows alternating big (tested) and small (skipped)."""

    def errors(n: int, k: int, code: str = "timeout") -> Window:
        return window([pred(error=code if i < k else None) for i in range(n)])

    err = [errors(20, 1), errors(3, 3, "oom"), errors(20, 2), errors(2, 0), errors(4, 4), errors(20, 9)]
    same_time = []
    for i, w in enumerate(err):  # one window a minute; a period of two minutes
        same_time.append(Window("d", "primary", 60.0 * i, 60.0 * (i + 1), w.predictions))
    # Sliding windows of two one-minute panes (the sketch reuses a pane's summary).
    panes = [[Prediction(id=f"{p}-{j}", ts=60.0 * p + j, deployment="d", model_version="v1",
                         latency_ms=float(j * (p + 1))) for j in range(m)]
             for p, m in enumerate((30, 1, 1, 25, 1, 0, 40))]
    lat = [Window("d", "primary", 60.0 * p, 60.0 * (p + 2), panes[p] + panes[p + 1]) for p in range(6)]
    big = [label(p, y) for p, y in [(1, 1), (0, 1), (1, 0), (0, 0)] * 5]
    me = [window(outcomes=big), window(outcomes=[label(1, 1)]), window(outcomes=big),
          window(outcomes=[label(2.0, 2.5)]), window(outcomes=[label(0.0, 1.0), label(1.0, 1.0)] * 10)]
    return [
        ("error_rate absolute", ErrorRate(threshold=0.05, min_samples=10), err),
        ("error_rate baseline", ErrorRate(threshold=0.05, min_samples=10, mode="baseline", baseline_windows=2), err),
        ("error_rate same_time", ErrorRate(threshold=0.05, min_samples=10, mode="same_time", period=120), same_time),
        ("latency exact", Latency(threshold=100.0, min_samples=10), lat),
        ("latency sketch", Latency(threshold=100.0, min_samples=10, estimator="sketch", pane=60.0), lat),
        ("model_error auto", ModelError(threshold=0.3, min_samples=10), me),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _skip_cases()])
def test_a_skipped_window_leaves_every_later_measurement_as_an_update_would(case):
    """The pipeline skips a window with fewer samples than min_samples when no tap reads its
    measurement (daemon/evaluation.py): every window measured afterwards must measure exactly
    as if each window had been updated."""
    from rollbackd.detectors.base import Skipping

    name, det, windows = _skip_cases()[case]
    assert isinstance(det, Skipping)
    updated = make_detector(name.split()[0], threshold=det.threshold, min_samples=det.min_samples,
                            params={k: getattr(det, k) for k in _params(name)})
    small = 0
    for i, w in enumerate(windows):
        n = len(w.outcomes) if name.startswith("model_error") else w.n
        updated.update(w)
        expected = updated.evaluate(60.0 * (i + 1))
        if n < det.min_samples:
            small += 1
            assert expected.insufficient  # what the pipeline relies on: no verdict
            det.skip(w)
            continue
        det.update(w)
        assert det.evaluate(60.0 * (i + 1)).to_record() == expected.to_record()
    assert small >= 2


def _params(name: str) -> tuple[str, ...]:
    return {
        "error_rate baseline": ("mode", "baseline_windows"),
        "error_rate same_time": ("mode", "period"),
        "latency sketch": ("estimator", "pane"),
    }.get(name, ())


def test_model_error_auto_resolves_regression_from_a_skipped_window():
    det = ModelError(threshold=0.3, min_samples=10)
    det.skip(window(outcomes=[label(2.0, 2.5)]))
    det.update(window(outcomes=[label(0.0, 1.0), label(1.0, 1.0)] * 5))  # 0/1 labels alone: binary
    m = det.evaluate(60.0)
    assert m.evidence["task"] == "regression" and m.value == pytest.approx(0.5)
