"""The calibration detector and its statistics, against formulas written out by hand."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from rollbackd.detectors import Calibration, Labeled, Window, make_detector
from rollbackd.detectors.calibration import usable_pairs
from rollbackd.detectors.model_error import binary_value
from rollbackd.detectors.stats import (
    brier_score,
    calibration_bins,
    ece_resampled,
    expected_calibration_error,
    spiegelhalter_z,
)
from rollbackd.events import Prediction

FAST = settings(max_examples=150, deadline=None, derandomize=True)


# -- reference formulas, written out -----------------------------------------------------------


def ece_width_reference(p: Sequence[float], y: Sequence[int], bins: int) -> float:
    groups: dict[int, list[int]] = {}
    for i, pi in enumerate(p):
        b = min(int(pi * bins), bins - 1)  # [b/B, (b+1)/B), the last bin closed at 1
        groups.setdefault(b, []).append(i)
    n = len(p)
    total = 0.0
    for members in groups.values():
        conf = sum(p[i] for i in members) / len(members)
        acc = sum(y[i] for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


def ece_mass_reference(p: Sequence[float], y: Sequence[int], bins: int) -> float:
    order = np.argsort(np.asarray(p), kind="stable")
    n = len(p)
    total = 0.0
    for members in np.array_split(order, bins):
        if len(members) == 0:
            continue
        conf = sum(p[i] for i in members) / len(members)
        acc = sum(y[i] for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


def spiegelhalter_reference(p: Sequence[float], y: Sequence[int]) -> tuple[float, float]:
    num = sum((yi - pi) * (1 - 2 * pi) for pi, yi in zip(p, y))
    den = math.sqrt(sum((1 - 2 * pi) ** 2 * pi * (1 - pi) for pi in p))
    z = num / den
    return z, 2 * sps.norm.sf(abs(z))


pairs = st.lists(
    st.tuples(st.floats(0.0, 1.0), st.integers(0, 1)), min_size=1, max_size=300
)


@FAST
@given(data=pairs, bins=st.integers(1, 20))
def test_ece_equal_width_matches_the_formula(data: list[tuple[float, int]], bins: int) -> None:
    p = np.array([d[0] for d in data])
    y = np.array([d[1] for d in data], dtype=float)
    expected = ece_width_reference(p.tolist(), y.tolist(), bins)
    assert math.isclose(expected_calibration_error(p, y, bins, "width"), expected, rel_tol=1e-9, abs_tol=1e-12)


@FAST
@given(data=pairs, bins=st.integers(1, 20))
def test_ece_equal_mass_matches_the_formula(data: list[tuple[float, int]], bins: int) -> None:
    p = np.array([d[0] for d in data])
    y = np.array([d[1] for d in data], dtype=float)
    expected = ece_mass_reference(p.tolist(), y.tolist(), bins)
    assert math.isclose(expected_calibration_error(p, y, bins, "mass"), expected, rel_tol=1e-9, abs_tol=1e-12)


@FAST
@given(data=pairs)
def test_brier_matches_the_formula(data: list[tuple[float, int]]) -> None:
    p = np.array([d[0] for d in data])
    y = np.array([d[1] for d in data], dtype=float)
    expected = sum((pi - yi) ** 2 for pi, yi in data) / len(data)
    assert math.isclose(brier_score(p, y), expected, rel_tol=1e-9, abs_tol=1e-15)


@FAST
@given(data=st.lists(st.tuples(st.floats(0.01, 0.99), st.integers(0, 1)), min_size=2, max_size=300))
def test_spiegelhalter_matches_the_formula(data: list[tuple[float, int]]) -> None:
    p = np.array([d[0] for d in data])
    y = np.array([d[1] for d in data], dtype=float)
    if float(np.dot((1 - 2 * p) ** 2, p * (1 - p))) < 1e-12:
        return  # every score at 1/2: no test (covered below)
    z_ref, p_ref = spiegelhalter_reference(p.tolist(), y.tolist())
    z, pv = spiegelhalter_z(p, y)
    assert math.isclose(z, z_ref, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(pv, p_ref, rel_tol=1e-9, abs_tol=1e-300)


def test_spiegelhalter_without_power_is_no_evidence() -> None:
    assert spiegelhalter_z(np.array([0.5, 0.5, 0.0, 1.0]), np.array([1.0, 0.0, 0.0, 1.0])) == (0.0, 1.0)


def test_bins_validation_and_batched_ece() -> None:
    with pytest.raises(ValueError, match="bins must be >= 1"):
        calibration_bins(np.array([0.1]), 0)
    with pytest.raises(ValueError, match="binning must be one of width, mass"):
        calibration_bins(np.array([0.1]), 3, "quantile")
    rng = np.random.default_rng(3)
    p = rng.random(50)
    ys = (rng.random((4, 50)) < p).astype(float)
    idx = calibration_bins(p, 7, "width")
    batched = ece_resampled(idx, p, ys, 7)
    for row, y in zip(batched, ys):
        assert math.isclose(row, expected_calibration_error(p, y, 7, "width"), rel_tol=1e-12)


# Every spelling a label can have on the wire (msgspec: float | str | bool), the usual ones often.
label_values = st.one_of(
    st.booleans(),
    st.sampled_from([0, 1, 2, -1, 255, 256, 2**70, 0.0, 1.0, -0.0, 0.5, math.nan, math.inf]),
    st.sampled_from(["1", "0", "yes", "no", " True ", "1.0", "+1", "01", "nan", ""]),
    st.floats(allow_nan=True),
    st.integers(),
)


# A window's labels are usually all of one kind: all bools, all small ints, or a mix.
label_columns = st.one_of(
    st.lists(st.booleans(), max_size=60),
    st.lists(st.one_of(st.booleans(), st.sampled_from([0, 1, 2, 255, 256, -1])), max_size=60),
    st.lists(label_values, max_size=60),
)


@FAST
@given(
    labels=label_columns,
    scores=st.lists(st.one_of(st.floats(0.0, 1.0), st.none(), st.just(math.nan)), min_size=60, max_size=60),
    with_versions=st.booleans(),
)
def test_usable_pairs_read_labels_as_binary_value_does(
    labels: list[Any], scores: list[float | None], with_versions: bool
) -> None:
    rows = list(zip(scores, labels))
    outcomes = [
        Labeled(float(i), i + 1.0, "primary", f"v{i % 3}", None, s, lab)
        for i, (s, lab) in enumerate(rows)
    ]
    kept = [
        (s, binary_value(lab), f"v{i % 3}")
        for i, (s, lab) in enumerate(rows)
        if s is not None and not math.isnan(s) and binary_value(lab) is not None
    ]
    p, y, versions, unusable = usable_pairs(outcomes, with_versions=with_versions)
    assert p.tolist() == [k[0] for k in kept]
    assert y.tolist() == [float(k[1]) for k in kept]
    assert versions == ([k[2] for k in kept] if with_versions else [])
    assert unusable == len(rows) - len(kept)


# -- the detector ------------------------------------------------------------------------------


def predictions(n: int, version: str = "v1") -> list[Prediction]:
    return [Prediction(id=str(i), ts=float(i), deployment="d", model_version=version) for i in range(n)]


def labels(p: np.ndarray, y: np.ndarray, version: str = "v1", t0: float = 0.0) -> list[Labeled]:
    return [
        Labeled(t0 + i, t0 + i + 1.0, "primary", version, None, float(pi), bool(yi))
        for i, (pi, yi) in enumerate(zip(p, y))
    ]


def window(outcomes: Sequence[Labeled], n_predictions: int, i: int = 0) -> Window:
    return Window("d", "primary", 60.0 * i, 60.0 * (i + 1), predictions(n_predictions), list(outcomes))


def draw(rng: np.random.Generator, n: int, overconfident: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels; ``overconfident`` pulls the true probability towards 1/2."""
    p = rng.random(n)
    truth = 0.5 + (1.0 - overconfident) * (p - 0.5)
    return p, (rng.random(n) < truth).astype(float)


def test_ece_detector_reports_every_statistic_and_label_coverage() -> None:
    rng = np.random.default_rng(11)
    p, y = draw(rng, 400)
    outs = labels(p, y)
    # unusable: a label that is not binary, and an outcome without a score
    outs.append(Labeled(0.0, 1.0, "primary", "v1", None, 0.3, "maybe"))
    outs.append(Labeled(0.0, 1.0, "primary", "v1", True, None, True))
    det = Calibration(threshold=0.1, metric="ece", bins=10, binning="mass", min_samples=100)
    det.update(window(outs, 1000))
    m = det.evaluate(60.0)
    assert m.value == pytest.approx(ece_mass_reference(p.tolist(), y.tolist(), 10), rel=1e-12)
    assert m.sample_size == 400 and m.p_value is None
    ev = m.evidence
    assert ev["label_coverage"] == pytest.approx(402 / 1000) and ev["unusable"] == 2
    assert ev["brier"] == pytest.approx(float(np.mean((p - y) ** 2)), rel=1e-12)
    z, pz = spiegelhalter_reference(p.tolist(), y.tolist())
    assert ev["spiegelhalter_z"] == pytest.approx(z, rel=1e-9)
    assert ev["spiegelhalter_p"] == pytest.approx(pz, rel=1e-9)

    brier = Calibration(threshold=0.3, metric="brier")
    brier.update(window(outs, 1000))
    assert brier.evaluate(60.0).value == pytest.approx(float(np.mean((p - y) ** 2)), rel=1e-12)
    sp = Calibration(threshold=1.96, metric="spiegelhalter")
    sp.update(window(outs, 1000))
    m = sp.evaluate(60.0)
    assert m.value == pytest.approx(abs(z), rel=1e-9) and m.p_value == pytest.approx(pz, rel=1e-9)


def test_insufficient_labels_still_report_coverage() -> None:
    det = Calibration(threshold=0.1, min_samples=30)
    assert det.evaluate(0.0).insufficient == "no window yet"
    det.update(window([], 500))
    m = det.evaluate(60.0)
    assert m.insufficient == "no usable labels in window" and m.evidence["label_coverage"] == 0.0
    rng = np.random.default_rng(1)
    det.update(window(labels(*draw(rng, 10)), 500))
    m = det.evaluate(60.0)
    assert "min_samples=30" in (m.insufficient or "") and m.evidence["label_coverage"] == 0.02
    det.update(window([], 0))
    assert det.evaluate(60.0).evidence["label_coverage"] is None  # no predictions at all


def test_spiegelhalter_flags_an_overconfident_model() -> None:
    rng = np.random.default_rng(5)
    det = Calibration(threshold=1.96, metric="spiegelhalter", min_samples=100)
    det.update(window(labels(*draw(rng, 1000, overconfident=0.4)), 1000))
    m = det.evaluate(60.0)
    assert m.value > 5 and m.p_value < 1e-6


def run_drift(det: Calibration, windows: list[list[Labeled]]) -> list[Any]:
    out = []
    for i, outs in enumerate(windows):
        det.update(window(outs, 1000, i))
        out.append(det.evaluate(60.0 * (i + 1)))
    return out


def test_ece_drift_flags_the_change_within_one_window_and_never_before() -> None:
    # 10 baseline windows, 40 stationary windows, then an overconfident model: a breach is
    # value > 0.02 and p < 0.005 (as the rule would have it).
    rng = np.random.default_rng(2024)
    wins = [labels(*draw(rng, 500)) for _ in range(50)]
    wins += [labels(*draw(rng, 500, overconfident=0.5)) for _ in range(5)]
    det = Calibration(threshold=0.02, metric="ece_drift", baseline_windows=10, min_samples=100)
    ms = run_drift(det, wins)
    assert all(m.insufficient == "building baseline" for m in ms[:10])
    breaching = [i for i, m in enumerate(ms) if m.value is not None and m.value > 0.02 and m.p_value < 0.005]
    assert breaching == [50, 51, 52, 53, 54]
    m = ms[50]
    assert m.evidence["baseline_n"] == 5000 and m.evidence["resamples"] == 200
    assert m.evidence["drift_lower"] > 0.0 and m.p_value == pytest.approx(1 / 201)
    stationary = [m.value for m in ms[10:50]]
    # bias-corrected: calibrated windows drift by ~0 on average (a plain ECE difference would
    # sit at the small-sample bias, here about +0.04)
    assert abs(float(np.mean(stationary))) < 0.005


def test_ece_drift_is_deterministic() -> None:
    rng = np.random.default_rng(8)
    base = [labels(*draw(rng, 300)) for _ in range(2)]
    probe = labels(*draw(rng, 300, overconfident=0.2))
    results = []
    for _ in range(2):
        det = Calibration(threshold=0.02, metric="ece_drift", baseline_windows=2, seed=7)
        results.append(run_drift(det, base + [probe])[-1].to_record())
    assert results[0] == results[1]


def test_ece_drift_against_the_previous_version() -> None:
    rng = np.random.default_rng(99)
    det = Calibration(
        threshold=0.02, metric="ece_drift", baseline="previous_version", min_samples=100
    )
    v1 = [labels(*draw(rng, 500), version="v1", t0=1000.0 * i) for i in range(3)]
    ms = run_drift(det, v1)
    assert [m.insufficient for m in ms] == ["no previous version yet"] * 3
    # v2 is overconfident; some v1 labels still arrive in its first window
    first = labels(*draw(rng, 100), version="v1", t0=3000.0) + labels(
        *draw(rng, 500, overconfident=0.5), version="v2", t0=3500.0
    )
    m = run_drift(det, [first])[0]
    assert m.evidence["version"] == "v2" and m.evidence["baseline_version"] == "v1"
    assert m.sample_size == 500 and m.evidence["baseline_n"] == 1600
    assert m.value > 0.05 and m.p_value < 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "auc"}, "metric must be one of ece, brier, spiegelhalter, ece_drift"),
        ({"bins": 0}, r"bins must be an integer in \[1, 1000\]"),
        ({"binning": "quantile"}, "binning must be one of width, mass"),
        ({"baseline": "rolling"}, "baseline must be one of first_windows, previous_version"),
        ({"resamples": 5}, r"resamples must be an integer in \[10, 10000\]"),
        ({"confidence": 1.0}, r"confidence must be in \(0, 1\)"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"threshold": 2.0}, r"threshold must be in \[0, 1\] for metric ece"),
        ({"metric": "spiegelhalter", "threshold": -1.0}, "threshold must be >= 0"),
    ],
)
def test_bad_parameters_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    args = {"threshold": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        Calibration(**args)


def test_registered() -> None:
    det = make_detector("calibration", threshold=0.05, min_samples=10, params={"metric": "brier"})
    assert isinstance(det, Calibration) and det.metric == "brier" and det.min_samples == 10
