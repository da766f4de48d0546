"""model_quality with ``baseline: same_time`` (issue 14 item 4): each window against the window
that ended one period earlier, kept compactly (counts for a rate, at most ``same_time_size``
evenly spaced outcomes otherwise); the validate warning on a direction that points away from
the p-value, and the summary line naming the metric.

The tests' numbers are checked against scipy on the earlier window's outcomes; a seeded three
days of labels whose recall is worse every night (0.9 at noon, 0.6 at midnight) raise no breach
with same_time and many against a reference taken at noon, while a real recall collapse on day 3
still breaches with same_time.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from scipy import stats as sps

from rollbackd.daemon.snapshot import frame, from_plain, restore_detector, to_plain, unframe
from rollbackd.detectors import Labeled, Window
from rollbackd.detectors import metrics as M
from rollbackd.detectors.model_quality import ModelQuality
from rollbackd.detectors.model_quality_measure import Tally, keep_rows
from rollbackd.rules.loader import check_text, summarize

DAY = 86400.0
HOUR = 3600.0
T0 = 1_790_035_200.0  # a midnight (UTC)
assert T0 % DAY == 0


def _window(end: float, outcomes: list[Labeled], step: float = HOUR) -> Window:
    return Window("d", "primary", end - step, end, [], outcomes)


def _binary(tp: int, fn: int, fp: int, tn: int) -> list[Labeled]:
    rows = [(1, 1)] * tp + [(1, 0)] * fn + [(0, 1)] * fp + [(0, 0)] * tn
    return [Labeled(0.0, 1.0, "primary", "1", p, None, y) for y, p in rows]


# -- against the window one period earlier, by the test's formula ------------------------------


def test_recall_against_the_window_a_day_earlier_is_fishers_exact_test() -> None:
    det = ModelQuality(threshold=0.1, metric="recall", baseline="same_time", period="1d", min_samples=30)
    det.update(_window(T0 + 10 * HOUR, _binary(tp=34, fn=6, fp=6, tn=54)))
    first = det.evaluate(T0 + 10 * HOUR)
    assert first.insufficient == "no window one period earlier (same_time, period 1d)"
    det.update(_window(T0 + 11 * HOUR, _binary(tp=10, fn=10, fp=0, tn=20)))  # another hour: not compared
    det.update(_window(T0 + DAY + 10 * HOUR, _binary(tp=22, fn=18, fp=5, tn=55)))
    m = det.evaluate(T0 + DAY + 10 * HOUR)
    assert m.insufficient is None
    assert m.value == pytest.approx(34 / 40 - 22 / 40, abs=1e-12)
    expected = sps.fisher_exact([[22, 18], [34, 6]], alternative="less")[1]
    assert m.p_value == pytest.approx(expected, rel=1e-9)
    assert m.evidence["baseline_end"] == T0 + 10 * HOUR
    assert (m.evidence["baseline_value"], m.evidence["baseline_n"], m.evidence["test"]) == (0.85, 100, "fisher")
    # what was kept of each window: the counts, nothing per outcome
    assert det._source._store.get(T0 + DAY + 10 * HOUR) == (T0 + DAY + 10 * HOUR, Tally(100, 22, 40, 40, 60))


def test_mae_against_the_window_a_day_earlier_is_welchs_test_on_the_kept_outcomes() -> None:
    rng = np.random.default_rng(7)

    def regression(n: int, noise: float) -> tuple[list[Labeled], np.ndarray]:
        y = rng.normal(size=n)
        p = y + rng.normal(scale=noise, size=n)
        return [Labeled(0.0, 1.0, "primary", "1", float(b), None, float(a)) for a, b in zip(y, p)], np.abs(p - y)

    det = ModelQuality(threshold=0.0, metric="mae", baseline="same_time", period=DAY, same_time_size=200,
                       min_samples=30)
    before, _ = regression(500, 1.0)
    det.update(_window(T0 + HOUR, before))
    now, errors = regression(150, 1.3)
    det.update(_window(T0 + DAY + HOUR, now))
    m = det.evaluate(T0 + DAY + HOUR)
    # the earlier window is kept as 200 of its 500 outcomes: evenly spaced in (prediction,
    # label) order, the same rows keep_rows picks
    y0 = np.array([o.label for o in before])
    p0 = np.array([o.prediction for o in before])
    ky, kp = keep_rows((y0, p0), 200)
    assert ky.shape == (200,)
    np.testing.assert_array_equal(kp, np.sort(p0)[((np.arange(200) + 0.5) * 2.5).astype(int)])
    kept_errors = np.abs(kp - ky)
    assert m.value == pytest.approx(errors.mean() - kept_errors.mean(), abs=1e-12)
    welch = sps.ttest_ind(errors, kept_errors, equal_var=False, alternative="greater").pvalue
    assert m.p_value == pytest.approx(welch, rel=1e-9)
    assert m.evidence["baseline_n"] == 200 and m.evidence["test"] == "welch"


def test_kept_rows_keep_every_confusion_cell_to_within_one() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(5000) < 0.07).astype(np.int8)
    yhat = np.where(y == 1, rng.random(5000) < 0.8, rng.random(5000) < 0.05).astype(np.int8)
    ky, kx = keep_rows((y, yhat), 1000)
    full, kept = np.array(M.confusion(y, yhat)), np.array(M.confusion(ky, kx))
    assert kept.sum() == 1000
    assert np.all(np.abs(kept - full * 1000 / 5000) <= 1.0)
    # deterministic: the same rows every time
    again = keep_rows((y, yhat), 1000)
    assert np.array_equal(again[0], ky) and np.array_equal(again[1], kx)


def test_no_verdict_in_the_first_period_after_a_gap_or_on_a_thin_earlier_window() -> None:
    det = ModelQuality(threshold=0.1, metric="recall", baseline="same_time", period="1d", min_samples=30,
                       min_positives=10)
    reasons = []
    for k in range(1, 25):  # the first day, hour by hour
        det.update(_window(T0 + k * HOUR, _binary(tp=30, fn=10, fp=5, tn=55)))
        reasons.append(det.evaluate(T0 + k * HOUR).insufficient)
    assert set(reasons) == {"no window one period earlier (same_time, period 1d)"}
    # hour 25 compares with hour 1: fine
    det.update(_window(T0 + 25 * HOUR, _binary(tp=30, fn=10, fp=5, tn=55)))
    assert det.evaluate(T0 + 25 * HOUR).insufficient is None
    # an hour missing a day earlier (a gap): no verdict; the store holds a day and a step
    del_end = T0 + 26 * HOUR
    store = det._source._store
    i = store._ends.index(T0 + 2 * HOUR)
    del store._ends[i], store._summaries[i]
    det.update(_window(del_end, _binary(tp=30, fn=10, fp=5, tn=55)))
    assert det.evaluate(del_end).insufficient == "no window one period earlier (same_time, period 1d)"
    # an earlier window with too few labels, or too few positives: named as such
    thin = ModelQuality(threshold=0.1, metric="recall", baseline="same_time", period="1d", min_samples=30)
    thin.update(_window(T0 + HOUR, _binary(tp=5, fn=3, fp=2, tn=10)))
    thin.update(_window(T0 + 2 * HOUR, _binary(tp=6, fn=2, fp=5, tn=50)))
    thin.update(_window(T0 + DAY + HOUR, _binary(tp=30, fn=10, fp=5, tn=55)))
    m = thin.evaluate(T0 + DAY + HOUR)
    assert m.insufficient == ("the window one period earlier (same_time, period 1d): "
                              "20 usable labels < min_samples=30")
    assert m.evidence["baseline_n"] == 20
    thin.update(_window(T0 + DAY + 2 * HOUR, _binary(tp=30, fn=10, fp=5, tn=55)))
    assert thin.evaluate(0.0).insufficient == (
        "the window one period earlier (same_time, period 1d): 8 positives < min_positives=10: "
        "a recall on 8 positives is not a verdict"
    )


@pytest.mark.parametrize("params, message", [
    ({"baseline": "same_time"}, "period is required with baseline: same_time"),
    ({"baseline": "reference", "period": "1d"}, "period needs baseline: same_time"),
    ({"baseline": "same_time", "period": "1d", "same_time_size": 1}, "same_time_size must be an integer"),
    ({"baseline": "same_time", "period": "1d", "same_time_size": 20, "metric": "roc_auc"},
     "same_time_size must be >= min_samples"),
])
def test_same_time_parameters_are_checked(params, message) -> None:
    with pytest.raises(ValueError, match=message):
        ModelQuality(threshold=0.1, min_samples=30, **{"metric": "recall", **params})


# -- a daily cycle in label quality over three days --------------------------------------------


def _recall(end: float) -> float:
    """0.9 at noon, 0.6 at midnight."""
    hour = (end % DAY) / HOUR
    return 0.75 - 0.15 * math.cos(2 * math.pi * hour / 24)


def _days(det: ModelQuality, *, seed: int, collapse_at: float | None = None) -> list[tuple[float, object]]:
    """Three days of hourly windows from noon on day 1: 1,500 outcomes each, 30 % positives,
    recall following the time of day (and 0.35 from ``collapse_at`` on), 10 % false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(1, 73):
        end = T0 + 12 * HOUR + k * HOUR
        recall = 0.35 if collapse_at is not None and end > collapse_at else _recall(end)
        y = rng.random(1500) < 0.3
        yhat = np.where(y, rng.random(1500) < recall, rng.random(1500) < 0.1)
        det.update(_window(end, [Labeled(0.0, 1.0, "primary", "1", int(b), None, int(a)) for a, b in zip(y, yhat)]))
        out.append((end, det.evaluate(end)))
    return out


def _breaches(measured, threshold: float = 0.1, alpha: float = 0.01) -> list[float]:
    """Window ends where the rule (direction above, alpha) breaches."""
    return [end for end, m in measured if m.insufficient is None and m.value > threshold and m.p_value < alpha]


@pytest.mark.parametrize("seed", [14, 15])
def test_a_nightly_dip_in_recall_breaches_nothing_with_same_time_and_often_against_a_reference(seed) -> None:
    same = _days(ModelQuality(threshold=0.1, metric="recall", baseline="same_time", period="1d",
                              min_samples=100), seed=seed)
    ref = _days(ModelQuality(threshold=0.1, metric="recall", baseline="reference", reference_size=1000,
                             min_samples=100), seed=seed)
    judged = [end for end, m in same if m.insufficient is None]
    assert len(judged) == 48  # the first day has no window a day earlier
    assert _breaches(same) == []
    nights = _breaches(ref)
    # the reference is noon's recall: every night is a breach, every noon is not
    assert len(nights) >= 20
    assert all(_recall(end) < 0.8 for end in nights)


def test_a_recall_collapse_on_day_3_still_breaches_with_same_time() -> None:
    collapse = T0 + 2 * DAY + 15 * HOUR
    same = _days(ModelQuality(threshold=0.1, metric="recall", baseline="same_time", period="1d",
                              min_samples=100), seed=14, collapse_at=collapse)
    hits = _breaches(same)
    assert hits and hits[0] == collapse + HOUR
    assert all(end > collapse for end in hits)


# -- a checkpoint with a filled store ----------------------------------------------------------


@pytest.mark.parametrize("metric, size", [("recall", 1000), ("roc_auc", 60), ("macro_f1", 60)])
def test_a_detector_restored_from_its_checkpoint_measures_as_without_the_restart(metric, size) -> None:
    rng = np.random.default_rng(5)
    names = ["cat", "dog", "owl"]

    def outcomes(end: float) -> list[Labeled]:
        if metric == "macro_f1":
            pairs = rng.integers(0, 3, (150, 2))
            return [Labeled(0.0, 1.0, "primary", "1", names[b] if rng.random() < 0.6 else names[a], None,
                            names[a]) for a, b in pairs]
        y = rng.random(150) < 0.4
        s = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(scale=0.3, size=150), 0, 1)
        return [Labeled(0.0, 1.0, "primary", "1", int(v >= 0.5), float(v), int(a)) for a, v in zip(y, s)]

    def make() -> ModelQuality:
        return ModelQuality(threshold=0.0, metric=metric, baseline="same_time", period="1d",
                            same_time_size=size, min_samples=30)

    step = 2 * HOUR
    windows = [_window(T0 + k * step, outcomes(T0 + k * step), step) for k in range(1, 25)]
    steady = make()
    for w in windows[:18]:  # a day and a half
        steady.update(w)
    steady.evaluate(0.0)
    assert len(steady._source._store) == 14  # a day and a step: 12 + 2 ends
    restored = make()
    restore_detector(restored, unframe("checkpoint", frame("checkpoint", steady)))
    plain = make()
    restore_detector(plain, from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(steady)))))
    for copy in (restored, plain):
        assert copy._source._store.ends == steady._source._store.ends
        assert copy._source._store.step == step
    for w in windows[18:]:
        for det in (steady, restored, plain):
            det.update(w)
        a = steady.evaluate(w.end)
        assert a.insufficient is None
        assert restored.evaluate(w.end).to_record() == a.to_record() == plain.evaluate(w.end).to_record()


# -- validate ----------------------------------------------------------------------------------

RULES = """\
version: 1
deployments: {fraud: {backend: {type: log}}}
rules:
  - {name: recall-floor, detector: model_quality, params: {metric: recall}, threshold: 0.6,
     direction: below, alpha: 0.01, actions: [notify]}
  - {name: recall-upside-down, detector: model_quality, params: {metric: recall}, threshold: 0.6,
     alpha: 0.01, actions: [notify]}
  - {name: loss-upside-down, detector: model_quality, params: {metric: log_loss}, threshold: 0.4,
     direction: below, actions: [notify]}
  - {name: recall-vs-previous, detector: model_quality, params: {metric: recall, baseline: previous_version},
     threshold: 0.1, alpha: 0.01, actions: [notify]}
  - {name: recall-daily, detector: model_quality, window: {size: 1h},
     params: {metric: recall, baseline: same_time, period: 1d}, threshold: 0.1, actions: [notify]}
  - {name: mae-vs-stable, detector: model_quality, params: {metric: mae, baseline: stable},
     threshold: 0.2, direction: below, actions: [notify]}
  - {name: share, detector: model_quality, params: {metric: positive_rate}, threshold: 0.3,
     direction: below, actions: [notify]}
"""


def test_validate_warns_when_the_direction_points_away_from_the_p_value() -> None:
    config, issues = check_text(RULES)
    assert config is not None
    warned = {i.path: i.message for i in issues if i.severity == "warning" and "direction" in i.message}
    assert set(warned) == {"rules[1].threshold", "rules[2].direction", "rules[5].direction"}, warned
    assert "recall is higher-is-better" in warned["rules[1].threshold"]
    assert "tests recall < 0.6; for a floor write direction: below" in warned["rules[1].threshold"]
    assert "tests log_loss > 0.4; for a ceiling write direction: above" in warned["rules[2].direction"]
    assert "degradation of mae" in warned["rules[5].direction"] and "write direction: above" in warned["rules[5].direction"]


def test_the_summary_line_names_the_metric_and_what_it_is_compared_with() -> None:
    config, _ = check_text(RULES)
    text = summarize(config)
    assert "recall-floor: model_quality recall < 0.6, p < 0.01;" in text
    assert "recall-vs-previous: model_quality recall (previous_version − window) > 0.1, p < 0.01;" in text
    assert "recall-daily: model_quality recall (same_time 1d − window) > 0.1;" in text
    assert "mae-vs-stable: model_quality mae (window − stable) < 0.2;" in text
    assert "share: model_quality positive_rate < 0.3;" in text
