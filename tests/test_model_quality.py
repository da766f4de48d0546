"""model_quality: each metric against scikit-learn, each test's error rates by seeded simulation,
the baselines (reference, previous version, the other arm), no verdict on too few labels, and
the state through a checkpoint.

Every metric is checked end to end through the detector (outcomes in, ``value`` out) against
scikit-learn's function on the same pairs, to 1e-9. The tests' levels are checked by drawing
window and baseline from one distribution: the rejection rate at alpha 0.05 stays within three
standard errors of 0.05; their power by a real drop.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from sklearn import metrics as skm

from rollbackd.daemon.snapshot import from_plain, restore_detector, to_plain
from rollbackd.detectors import Labeled, Window, make_detector
from rollbackd.detectors import metrics as M
from rollbackd.detectors.model_quality import METRICS, ModelQuality
from rollbackd.detectors.stats import (
    binomial_pvalue_less,
    fisher_pvalue,
    t_pvalue,
    welch_pvalue,
)

HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALPHA = 0.05


def outcome(label: Any, score: float | None = None, prediction: Any = None, version: str = "1",
            variant: str = "primary", ts: float = 0.0) -> Labeled:
    return Labeled(ts, ts + 1.0, variant, version, prediction, score, label)


def window(outcomes: Sequence[Labeled], variant: str = "primary", **attrs: Any) -> Window:
    w = Window("d", variant, 0.0, 60.0, [], list(outcomes))
    for k, v in attrs.items():
        setattr(w, k, v)
    return w


def measure(metric: str, outcomes: Sequence[Labeled], threshold: float = 0.5, **params: Any):
    params = {"min_positives": 0, "min_negatives": 0, **params}
    det = make_detector("model_quality", threshold=threshold, min_samples=1,
                        params={"metric": metric, **params})
    det.update(window(outcomes))
    return det.evaluate(60.0)


# -- every metric against scikit-learn ----------------------------------------------------------

# Scores on a coarse grid half the time, so ties (the hard case for AUC and AP) are common.
scores = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False),
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]),
)
binary_rows = st.lists(st.tuples(st.booleans(), scores, st.sampled_from([None, 0, 1, True, "yes", "no"])),
                       min_size=2, max_size=120)


def both_classes(rows: list[tuple[bool, float, Any]]) -> bool:
    return len({r[0] for r in rows}) == 2


@HYPO
@given(binary_rows.filter(both_classes), st.sampled_from([0.3, 0.5, 0.7]))
def test_binary_metrics_match_sklearn(rows, cut) -> None:
    outs = [outcome(y, s, p) for y, s, p in rows]
    y = np.array([int(r[0]) for r in rows])
    s = np.array([r[1] for r in rows])
    # the predicted class: the prediction when there is one, else score >= cut
    from rollbackd.detectors.model_error import binary_value
    yhat = np.array([binary_value(p) if p is not None else int(sc >= cut) for _, sc, p in rows])

    def value(metric: str) -> float:
        m = measure(metric, outs, score_threshold=cut)
        assert m.insufficient is None, m.insufficient
        return m.value

    assert value("roc_auc") == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
    assert value("pr_auc") == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
    assert value("log_loss") == pytest.approx(skm.log_loss(y, s, labels=[0, 1]), abs=1e-9)
    assert value("brier") == pytest.approx(skm.brier_score_loss(y, s), abs=1e-9)
    assert value("recall") == pytest.approx(skm.recall_score(y, yhat), abs=1e-9)
    assert value("tpr") == pytest.approx(skm.recall_score(y, yhat), abs=1e-9)
    assert value("f1") == pytest.approx(skm.f1_score(y, yhat, zero_division=0), abs=1e-9)
    assert value("positive_rate") == pytest.approx(yhat.mean(), abs=1e-9)
    tn, fp, fn, tp = skm.confusion_matrix(y, yhat, labels=[0, 1]).ravel()
    assert value("fpr") == pytest.approx(fp / (fp + tn), abs=1e-9)
    if yhat.sum():
        assert value("precision") == pytest.approx(skm.precision_score(y, yhat), abs=1e-9)
    else:
        assert measure("precision", outs, score_threshold=cut).insufficient


@HYPO
@given(st.lists(st.tuples(st.sampled_from(["cat", "dog", "owl", 3, 3.0]),
                          st.sampled_from(["cat", "dog", "owl", "3", "bee"])), min_size=1, max_size=150))
def test_multiclass_metrics_match_sklearn(rows) -> None:
    outs = [outcome(y, None, p) for y, p in rows]
    norm = lambda v: str(int(v)) if isinstance(v, (int, float)) else v  # noqa: E731  3, 3.0 and "3" are one class
    y = [norm(a) for a, _ in rows]
    yhat = [norm(b) for _, b in rows]
    assert measure("accuracy", outs).value == pytest.approx(skm.accuracy_score(y, yhat), abs=1e-9)
    assert measure("macro_f1", outs).value == pytest.approx(
        skm.f1_score(y, yhat, average="macro", zero_division=0), abs=1e-9
    )
    for cls in ("cat", "3"):
        m = measure("class_recall", outs, **{"class": cls})
        if cls in y:
            assert m.value == pytest.approx(
                skm.recall_score(y, yhat, labels=[cls], average=None)[0], abs=1e-9
            )
        else:
            assert m.insufficient and f"class {cls!r}" in m.insufficient


finite = st.floats(-1e6, 1e6, allow_nan=False)


@HYPO
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=150))
def test_regression_metrics_match_sklearn(rows) -> None:
    outs = [outcome(y, None, p) for y, p in rows]
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows])
    tol = lambda x: 1e-9 * max(1.0, abs(x))  # noqa: E731  (relative for large errors)
    for metric, want in (
        ("mae", skm.mean_absolute_error(y, p)),
        ("rmse", math.sqrt(skm.mean_squared_error(y, p))),
        ("mape", skm.mean_absolute_percentage_error(y, p)),
        ("bias", float(np.mean(p - y))),
    ):
        assert measure(metric, outs, threshold=1.0).value == pytest.approx(want, abs=tol(want)), metric


def test_a_label_vocabulary_is_bounded() -> None:
    from rollbackd.detectors.model_quality import MAX_CLASSES

    det = ModelQuality(threshold=0.5, metric="accuracy")
    det.update(window([outcome(f"id-{i}", None, f"id-{i}") for i in range(MAX_CLASSES + 50)]))
    m = det.evaluate(60.0)
    assert (m.sample_size, m.evidence["unusable"], len(det._classes)) == (MAX_CLASSES, 50, MAX_CLASSES)


def test_outcomes_the_metric_cannot_use_are_counted_not_measured() -> None:
    outs = [outcome(True, 0.9), outcome(False, 0.2), outcome("maybe", 0.5), outcome(True, None),
            outcome(False, 1.7)]
    m = measure("roc_auc", outs)
    assert (m.sample_size, m.evidence["unusable"]) == (3, 2)  # 1.7 is a score, not a probability
    m = measure("brier", outs)
    assert (m.sample_size, m.evidence["unusable"]) == (2, 3)
    m = measure("mae", [outcome(1.0, None, 2.0), outcome("x", None, 1.0), outcome(2.0, None, True),
                        outcome(float("nan"), None, 1.0), outcome(3, None, 5)], threshold=1.0)
    assert (m.sample_size, m.evidence["unusable"], m.value) == (2, 3, 1.5)


# -- the statistics against their definitions ------------------------------------------------


def _brute_placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


@HYPO
@given(binary_rows.filter(both_classes))
def test_delong_placements_and_variance_are_the_written_out_formula(rows) -> None:
    y = np.array([int(r[0]) for r in rows])
    s = np.array([r[1] for r in rows])
    v10, v01 = M.delong_placements(y, s)
    b10, b01 = _brute_placements(y, s)
    np.testing.assert_allclose(v10, b10, atol=1e-12)
    np.testing.assert_allclose(v01, b01, atol=1e-12)
    assert v10.mean() == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    m, n = len(b10), len(b01)
    s10 = sum((v - b10.mean()) ** 2 for v in b10) / (m - 1) if m > 1 else 0.0
    s01 = sum((v - b01.mean()) ** 2 for v in b01) / (n - 1) if n > 1 else 0.0
    assert M.delong_variance(v10, v01) == pytest.approx(s10 / m + s01 / n, abs=1e-12)


def test_delong_variance_of_a_textbook_example() -> None:
    # Two positives {0.8, 0.4}, three negatives {0.1, 0.4, 0.6}: psi rows (1, 1, 1) and
    # (1, .5, 0): V10 = (1, .5); V01 = (1, .75, .5); AUC 0.75;
    # Var = var(1, .5)/2 + var(1, .75, .5)/3 = .125/2 + .0625/3.
    y = np.array([1, 1, 0, 0, 0])
    s = np.array([0.8, 0.4, 0.1, 0.4, 0.6])
    v10, v01 = M.delong_placements(y, s)
    assert v10.tolist() == [1.0, 0.5] and v01.tolist() == [1.0, 0.75, 0.5]
    assert M.delong_variance(v10, v01) == pytest.approx(0.125 / 2 + 0.0625 / 3, abs=1e-15)


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.3), (3, 10, 0.3), (10, 10, 0.3), (40, 100, 0.5), (7, 50, 0.05)])
def test_binomial_less_is_scipys(k, n, p) -> None:
    assert binomial_pvalue_less(k, n, p) == pytest.approx(
        sps.binomtest(k, n, p, alternative="less").pvalue, rel=1e-12
    )


@pytest.mark.parametrize("k1,n1,k0,n0", [(3, 20, 15, 20), (0, 5, 5, 5), (50, 100, 50, 100), (1, 3, 90, 100)])
@pytest.mark.parametrize("alternative", ["less", "greater"])
def test_fisher_is_scipys(k1, n1, k0, n0, alternative) -> None:
    want = sps.fisher_exact([[k1, n1 - k1], [k0, n0 - k0]], alternative=alternative).pvalue
    assert fisher_pvalue(k1, n1, k0, n0, alternative) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("alternative", ["less", "greater", "two-sided"])
def test_t_tests_are_scipys(alternative) -> None:
    rng = np.random.default_rng(5)
    x, y = rng.exponential(1.0, 40), rng.exponential(1.3, 70)
    t, p = welch_pvalue(x, y, alternative)
    ref = sps.ttest_ind(x, y, equal_var=False, alternative=alternative)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-10)
    t, p = t_pvalue(x, 0.9, alternative)
    ref = sps.ttest_1samp(x, 0.9, alternative=alternative)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-10)


# -- the tests' levels and power, by seeded simulation -----------------------------------------


def draw(rng: np.random.Generator, n: int, prevalence: float = 0.3, separation: float = 1.0,
         miss: float = 0.0, variant: str = "primary", version: str = "1") -> list[Labeled]:
    """Scores from a binormal model (positives shifted by ``separation``), squashed to (0, 1);
    ``miss``: share of positives scored as negatives (a model that stopped seeing them)."""
    y = rng.random(n) < prevalence
    shift = np.where(y & (rng.random(n) >= miss), separation, 0.0)
    s = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + shift - separation / 2)))
    return [outcome(bool(a), float(b), None, version, variant) for a, b in zip(y, s)]


def rejection_rate(metric: str, draws: int, seed: int, n: int = 200, separation: float = 1.0,
                   **alt: Any) -> float:
    """Share of ``draws`` where the canary arm is judged worse than the stable arm at ALPHA;
    the canary is drawn like the stable arm unless ``alt`` says otherwise."""
    rng = np.random.default_rng(seed)
    det = ModelQuality(threshold=-1.0, metric=metric, baseline="stable", bootstrap=200)
    rejected = 0
    for _ in range(draws):
        stable = window(draw(rng, n, separation=separation, variant="stable"), variant="stable")
        canary = window(draw(rng, n, separation=separation, variant="canary", **alt), variant="canary")
        canary.siblings = stable.siblings = {"stable": stable, "canary": canary}
        det.update(canary)
        m = det.evaluate(60.0)
        assert m.insufficient is None, m.insufficient
        rejected += m.p_value < ALPHA
    return rejected / draws


def level_bound(draws: int) -> float:
    return ALPHA + 3.0 * math.sqrt(ALPHA * (1.0 - ALPHA) / draws)


@pytest.mark.parametrize(
    "metric,draws",
    [("recall", 2000), ("fpr", 2000), ("precision", 2000), ("roc_auc", 2000), ("log_loss", 2000),
     ("brier", 2000), ("f1", 1000), ("pr_auc", 800)],
)
def test_on_stationary_data_the_tests_reject_no_more_than_alpha(metric, draws) -> None:
    rate = rejection_rate(metric, draws, seed=11)
    assert rate <= level_bound(draws), f"{metric}: {rate:.4f} > {level_bound(draws):.4f}"


@pytest.mark.parametrize("metric", ["recall", "roc_auc", "f1", "pr_auc", "log_loss"])
def test_the_tests_see_a_real_drop(metric) -> None:
    # the canary scores half the positives as negatives: recall 0.84 -> 0.5, and AUC, F1, AP
    # and log loss all worsen
    assert rejection_rate(metric, 100, seed=12, n=400, separation=2.0, miss=0.5) >= 0.95


def test_the_absolute_binomial_level_by_simulation() -> None:
    # recall exactly at the threshold (0.8): "recall below 0.8" is rejected at most alpha of the time
    rng = np.random.default_rng(13)
    det = ModelQuality(threshold=0.8, metric="recall", min_positives=10)
    rejected = 0
    for _ in range(2000):
        hit = rng.random(50) < 0.8
        det.update(window([outcome(True, None, bool(h)) for h in hit] + [outcome(False, None, False)] * 10))
        rejected += det.evaluate(60.0).p_value < ALPHA
    assert rejected / 2000 <= level_bound(2000)


# -- baselines ------------------------------------------------------------------------------


def test_recall_collapse_with_calibrated_scores_is_a_recall_drop_against_the_previous_version() -> None:
    """The issue's fraud model: 4 % positives; version 2 misses 80 % of them. The
    misclassification rate moves by about three points; recall falls from ~0.7 to ~0.15."""
    rng = np.random.default_rng(3)
    det = ModelQuality(threshold=0.2, metric="recall", baseline="previous_version")
    for _ in range(3):
        det.update(window(draw(rng, 2000, prevalence=0.04, separation=3.0, version="1")))
    # the version judged is the newest prediction's: here every prediction is at ts 0, so the
    # last outcome's (ties go to the later one)
    m = det.evaluate(60.0)
    assert m.insufficient == "no outcomes of a version other than '1' yet"
    det.update(window(draw(rng, 2000, prevalence=0.04, separation=3.0, miss=0.8, version="2")))
    m = det.evaluate(60.0)
    assert m.evidence["version"] == "2" and m.evidence["baseline_version"] == "1"
    assert m.evidence["baseline_n"] == 5000  # the last baseline_size outcomes of version 1
    assert m.value > 0.4 and m.p_value < 1e-6 and m.evidence["test"] == "fisher"


def test_previous_version_judges_the_newest_version_and_prefers_the_known_good_one() -> None:
    det = ModelQuality(threshold=0.0, metric="accuracy", baseline="previous_version",
                       baseline_size=3)
    right = lambda v, k, ts: [outcome("a", None, "a", v, ts=ts)] * k  # noqa: E731
    wrong = lambda v, k, ts: [outcome("a", None, "b", v, ts=ts)] * k  # noqa: E731
    det.update(window(right("1", 5, 1.0)))
    det.update(window(wrong("2", 4, 2.0)))
    m = det.evaluate(60.0)
    assert (m.value, m.evidence["baseline_value"], m.evidence["baseline_n"]) == (1.0, 1.0, 3)
    # most labels of this window are 2's late ones; the newest prediction is 3's: 3 is judged,
    # on its own labels, against 2's last three (all wrong): this window's labels of 2 join
    # them only afterwards
    det.update(window(right("2", 6, 2.5) + wrong("3", 2, 3.0)))
    m = det.evaluate(60.0)
    assert m.evidence["version"] == "3" and m.evidence["baseline_version"] == "2"
    assert m.sample_size == 2 and m.evidence["baseline_value"] == 0.0
    y2, yhat2 = det._buffers["2"]
    assert float((y2 == yhat2).mean()) == 1.0
    # late labels of 2 only: 3 is still the version judged (none of its labels here)
    det.update(window(right("2", 3, 2.9)))
    assert det.evaluate(60.0).insufficient == "no usable labels in window"
    # the pipeline says 1 is known good, and hands the window of version 3 alone
    det.update(window(wrong("3", 2, 4.0) + right("1", 2, 0.5), known_good="1", version="3"))
    m = det.evaluate(60.0)
    assert (m.evidence["baseline_version"], m.evidence["baseline_value"], m.sample_size) == ("1", 1.0, 2)
    assert all(b[0].shape[0] <= 3 for b in det._buffers.values())


def test_the_previous_version_is_the_one_with_the_newest_predictions_not_the_last_name() -> None:
    det = ModelQuality(threshold=0.0, metric="mae", baseline="previous_version")
    det.update(window([outcome(1.0, None, 2.0, "z", ts=1.0)] * 3 + [outcome(1.0, None, 1.5, "a", ts=2.0)] * 3))
    det.update(window([outcome(1.0, None, 1.0, "m", ts=3.0)] * 3))
    m = det.evaluate(60.0)
    assert (m.evidence["version"], m.evidence["baseline_version"], m.evidence["baseline_value"]) == ("m", "a", 0.5)


def test_previous_version_keeps_at_most_a_few_versions() -> None:
    from rollbackd.detectors.model_quality import MAX_VERSIONS

    det = ModelQuality(threshold=0.0, metric="mae", baseline="previous_version")
    for v in range(MAX_VERSIONS + 3):
        det.update(window([outcome(1.0, None, 2.0, str(v))] * 3))
    assert len(det._buffers) == MAX_VERSIONS
    assert det._recent == [str(v) for v in range(3, MAX_VERSIONS + 3)]


def test_reference_is_the_first_labels_and_no_verdict_while_it_fills() -> None:
    det = ModelQuality(threshold=0.05, metric="mae", baseline="reference", reference_size=5)
    det.update(window([outcome(1.0, None, 1.5)] * 3))
    assert det.evaluate(60.0).insufficient == "building the reference (3 of reference_size=5 usable labels)"
    det.update(window([outcome(1.0, None, 1.5)] * 3))  # completes it: still part of it
    assert det.evaluate(60.0).insufficient.startswith("building the reference (5 of")
    det.update(window([outcome(1.0, None, 3.0)] * 4 + [outcome(1.0, None, 2.0)]))
    m = det.evaluate(60.0)
    assert (m.value, m.evidence["baseline_value"], m.evidence["baseline_n"]) == (pytest.approx(1.3), 0.5, 5)
    assert m.evidence["test"] == "welch" and m.p_value < 0.01


def test_stable_baseline_is_the_other_arm_in_the_same_window() -> None:
    det = ModelQuality(threshold=0.05, metric="fpr", baseline="stable", min_negatives=1)
    stable = window([outcome(False, 0.1, variant="stable")] * 20, variant="stable")
    canary = window([outcome(False, 0.9, variant="canary")] * 5 + [outcome(False, 0.1, variant="canary")] * 15,
                    variant="canary")
    det.update(canary)
    assert det.evaluate(60.0).insufficient == "no baseline arm 'stable' in this window"
    canary.siblings = stable.siblings = {"stable": stable, "canary": canary}
    det.update(stable)
    assert det.evaluate(60.0).insufficient == "this is the baseline arm 'stable'"
    det.update(canary)
    m = det.evaluate(60.0)
    assert (m.value, m.evidence["baseline_variant"], m.evidence["fp"]) == (0.25, "stable", 5)
    assert m.p_value == pytest.approx(sps.fisher_exact([[5, 15], [0, 20]], alternative="greater").pvalue)


# -- too little data ----------------------------------------------------------------------------


def test_too_few_positives_is_no_verdict_with_the_reason() -> None:
    outs = [outcome(True, 0.9)] * 5 + [outcome(False, 0.1)] * 100
    m = measure("recall", outs, min_positives=10)
    assert m.value is None
    assert m.insufficient == "5 positives < min_positives=10: a recall on 5 positives is not a verdict"
    assert m.evidence["n"] == 105
    assert make_detector("model_quality", threshold=0.5, min_samples=1,
                         params={"metric": "roc_auc"}).min_negatives == 10
    m = measure("fpr", [outcome(False, 0.9)] * 3 + [outcome(True, 0.9)] * 50, min_negatives=10)
    assert m.insufficient.startswith("3 negatives < min_negatives=10")
    m = measure("precision", [outcome(True, 0.1)] * 50, min_positives=1)
    assert m.insufficient.startswith("0 predicted positives < min_positives=1")
    det = ModelQuality(threshold=0.5, min_samples=20, metric="brier")
    assert det.evaluate(0.0).insufficient == "no window yet"
    det.update(window([outcome(True, 0.8)] * 19))
    assert det.evaluate(60.0).insufficient == "19 usable labels < min_samples=20"
    det.update(window([outcome("?", 0.8)] * 19))
    m = det.evaluate(60.0)
    assert (m.insufficient, m.evidence["unusable"]) == ("no usable labels in window", 19)


def test_a_baseline_with_too_few_positives_is_no_verdict() -> None:
    det = ModelQuality(threshold=0.0, metric="recall", baseline="previous_version")
    det.update(window([outcome(True, None, True, "1")] * 4 + [outcome(False, None, False, "1")] * 40))
    det.update(window([outcome(True, None, False, "2")] * 30))
    m = det.evaluate(60.0)
    assert m.insufficient.startswith("the baseline: 4 positives < min_positives=10")
    assert m.evidence["baseline_n"] == 44


# -- determinism, checkpoints, parameters ------------------------------------------------------


def test_the_bootstrap_is_seeded_from_the_data() -> None:
    rng = np.random.default_rng(9)
    a, b = draw(rng, 300), draw(rng, 300, miss=0.2)
    ps = []
    for _ in range(2):
        det = ModelQuality(threshold=0.0, metric="pr_auc", baseline="previous_version")
        det.update(window([msgspec.structs.replace(o, model_version="1") for o in a]))
        det.update(window([msgspec.structs.replace(o, model_version="2") for o in b]))
        ps.append(det.evaluate(60.0))
    assert ps[0] == ps[1] and 0.0 < ps[0].p_value < 1.0


@pytest.mark.parametrize("metric,baseline", [("recall", "previous_version"), ("macro_f1", "reference"),
                                             ("roc_auc", "reference"), ("rmse", "previous_version")])
def test_state_survives_a_checkpoint(metric, baseline) -> None:
    rng = np.random.default_rng(4)

    def batch(i: int) -> Window:
        if METRICS[metric].task == "regression":
            outs = [outcome(float(x), None, float(x + rng.normal()), str(i // 3)) for x in rng.normal(size=80)]
        elif METRICS[metric].task == "multiclass":
            outs = [outcome(str(a), None, str(b), str(i // 3)) for a, b in rng.integers(0, 3, (80, 2))]
        else:
            outs = [msgspec.structs.replace(o, model_version=str(i // 3)) for o in draw(rng, 80)]
        return window(outs)

    params = {"metric": metric, "baseline": baseline, "reference_size": 150, "baseline_size": 200}
    det = ModelQuality(threshold=0.0, **params)
    windows = [batch(i) for i in range(10)]
    for w in windows[:4]:
        det.update(w)
    copy = ModelQuality(threshold=0.0, **params)
    restore_detector(copy, from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(det)))))
    assert copy.evaluate(60.0) == det.evaluate(60.0)
    for w in windows[4:]:
        det.update(w)
        copy.update(w)
        assert copy.evaluate(60.0) == det.evaluate(60.0)
        # and between windows, after the evaluation (when the pipeline checkpoints)
        copy = ModelQuality(threshold=0.0, **params)
        restore_detector(copy, from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(det)))))
        assert copy.evaluate(60.0) == det.evaluate(60.0)
    assert det.evaluate(60.0).insufficient is None
    assert det._win is None and det._base is None  # not kept once measured


@pytest.mark.parametrize(
    "params,match",
    [
        ({}, "metric must be one of"),
        ({"metric": "auc"}, "metric must be one of"),
        ({"metric": "recall", "baseline": "yesterday"}, "baseline must be one of"),
        ({"metric": "recall", "threshold": 1.5}, r"threshold must be in \[0, 1\] for recall"),
        ({"metric": "mae", "threshold": -1.0}, "threshold must be >= 0 for mae"),
        ({"metric": "recall", "baseline": "reference", "threshold": 2.0}, r"threshold must be in \[-1, 1\]"),
        ({"metric": "recall", "score_threshold": 2}, "score_threshold must be in"),
        ({"metric": "recall", "min_positives": -1}, "min_positives must be an integer >= 0"),
        ({"metric": "f1", "bootstrap": 10}, "bootstrap must be an integer >= 100"),
        ({"metric": "class_recall"}, "class must name the class"),
        ({"metric": "recall", "class": "a"}, "class is for metric: class_recall"),
        ({"metric": "recall", "baseline_variant": "b"}, "baseline_variant needs baseline: stable"),
        ({"metric": "recall", "metirc": "x"}, "metirc is not a parameter of model_quality .did you mean 'metric'"),
    ],
)
def test_invalid_params(params, match) -> None:
    threshold = params.pop("threshold", 0.5)
    with pytest.raises(ValueError, match=match):
        make_detector("model_quality", threshold=threshold, min_samples=1, params=params)


RULES = """\
version: 1
deployments:
  fraud:
    backend: {type: log}
rules:
  - name: recall-floor
    detector: model_quality
    params: {metric: recall, score_threshold: 0.4}
    threshold: 0.6
    direction: below
    alpha: 0.01
    actions: [notify]
  - name: recall-vs-previous
    detector: model_quality
    params: {metric: recall, baseline: previous_version}
    threshold: 0.1
    alpha: 0.01
    actions: [notify, rollback]
  - name: auc-vs-reference
    detector: model_quality
    params: {metric: roc_auc, baseline: reference, reference_size: 2000}
    threshold: 0.03
    alpha: 0.01
    actions: [notify]
  - name: canary-f1
    detector: model_quality
    params: {metric: f1, baseline: stable, baseline_variant: stable}
    threshold: 0.05
    alpha: 0.01
    variants: [canary]
    actions: [notify]
  - name: class-recall
    detector: model_quality
    params: {metric: class_recall, class: fraud_ring}
    threshold: 0.5
    direction: below
    actions: [notify]
"""


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rollbackd.cli", "validate", str(path)],
                          capture_output=True, timeout=120)


def test_a_rules_file_using_it_validates_and_a_bad_one_is_located(tmp_path) -> None:
    good = tmp_path / "rules.yaml"
    good.write_text(RULES)
    out = _validate(good)
    assert out.returncode == 0, out.stderr.decode()
    assert b"recall-vs-previous" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULES.replace("metric: roc_auc,", "metric: auroc,").replace("class: fraud_ring", "klass: x"))
    out = _validate(bad)
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert "rules[2].params.metric" in err and "metric must be one of" in err
    assert "rules[4].params.klass" in err and "klass is not a parameter of model_quality" in err


_REPLAY = """
import numpy as np
from rollbackd.detectors import Labeled, Window
from rollbackd.detectors.model_quality import ModelQuality
rng = np.random.default_rng(0)
names = ["cat", "dog", "owl", "bee", "ant"]
def w(v):
    return Window("d", "primary", 0, 60, [], [
        Labeled(0.0, 1.0, "primary", v, names[b] if rng.random() < 0.7 else names[a], None, names[a])
        for a, b in rng.integers(0, 5, (300, 2))])
d = ModelQuality(threshold=0.0, metric="macro_f1", baseline="previous_version")
d.update(w("1")); d.update(w("2"))
m = d.evaluate(0.0)
print(repr(m.value), repr(m.p_value))
"""


def test_multiclass_measurements_do_not_depend_on_the_hash_seed() -> None:
    # class codes follow first appearance, not a set's order: the bootstrap's cells (and so its
    # p-value) are the same in every process, as a byte-identical replay needs
    import os

    outs = {
        subprocess.run([sys.executable, "-c", _REPLAY], capture_output=True, timeout=120, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and outs.pop().strip()
