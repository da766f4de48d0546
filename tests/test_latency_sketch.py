"""The mergeable latency sketch, held to its relative-accuracy guarantee, and the detector's use."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollbackd.detectors import Latency, Window
from rollbackd.detectors.latency import LogSketch
from rollbackd.events import Prediction

FAST = settings(max_examples=150, deadline=None, derandomize=True)
QS = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0]

values = st.lists(
    st.one_of(st.floats(1e-6, 1e7), st.just(0.0)), min_size=1, max_size=400
).map(lambda v: np.array(v, dtype=float))


@FAST
@given(x=values, alpha=st.sampled_from([0.001, 0.01, 0.05, 0.2]))
def test_every_quantile_is_within_alpha_of_its_order_statistic(x: np.ndarray, alpha: float) -> None:
    s = LogSketch(alpha)
    s.add_many(x)
    xs = np.sort(x)
    for q, est in zip(QS, s.quantiles(QS)):
        exact = xs[math.floor(q * (x.shape[0] - 1))]
        # the guarantee, with room for the last bits of log/exp
        assert abs(est - exact) <= alpha * exact * (1 + 1e-9) + 1e-12, (q, est, exact)


@FAST
@given(a=values, b=values)
def test_a_merge_is_the_sketch_of_the_concatenation(a: np.ndarray, b: np.ndarray) -> None:
    left, right, whole = LogSketch(0.01), LogSketch(0.01), LogSketch(0.01)
    left.add_many(a)
    right.add_many(b)
    whole.add_many(np.concatenate([a, b]))
    left.merge(right)
    assert left.to_record() == whole.to_record()
    assert left.quantiles(QS) == whole.quantiles(QS)


def test_record_round_trip_and_validation() -> None:
    s = LogSketch(0.02)
    s.add_many(np.array([0.0, 1.0, 10.0, 100.0]))
    assert LogSketch.from_record(s.to_record()).to_record() == s.to_record()
    assert math.isnan(LogSketch(0.01).quantile(0.5))  # empty
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        LogSketch(0.0)
    with pytest.raises(ValueError, match="finite values >= 0"):
        s.add_many(np.array([-1.0]))
    with pytest.raises(ValueError, match="same alpha"):
        s.merge(LogSketch(0.01))
    with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\]"):
        s.quantile(1.5)


def predictions(rng: np.random.Generator, start: float, seconds: float, n: int) -> list[Prediction]:
    ts = start + np.sort(rng.random(n)) * seconds
    lat = rng.lognormal(3.0, 0.6, n)
    return [
        Prediction(id=f"{start}-{i}", ts=float(t), deployment="d", model_version="v1", latency_ms=float(l))
        for i, (t, l) in enumerate(zip(ts, lat))
    ]


def test_sketch_estimator_within_its_accuracy_of_the_exact_order_statistic() -> None:
    rng = np.random.default_rng(0)
    w = Window("d", "primary", 0.0, 60.0, predictions(rng, 0.0, 60.0, 5000))
    det = Latency(threshold=100.0, quantile=0.99, estimator="sketch", relative_accuracy=0.01)
    det.update(w)
    m = det.evaluate(60.0)
    xs = np.sort(w.latencies)
    exact = xs[math.floor(0.99 * 4999)]
    assert abs(m.value - exact) <= 0.01 * exact
    assert m.sample_size == 5000 and m.evidence["estimator"] == "sketch"
    assert m.evidence["max"] == float(xs[-1])


def test_sliding_windows_reuse_closed_panes() -> None:
    # 5-minute windows every minute, panes of a minute: after the first window, each
    # evaluation sketches one new pane and merges four old ones.
    rng = np.random.default_rng(1)
    panes = [predictions(rng, 60.0 * i, 60.0, 400) for i in range(9)]
    det = Latency(threshold=100.0, estimator="sketch", pane=60.0)
    reused = []
    for end in range(5, 10):
        preds = [p for pane in panes[end - 5 : end] for p in pane]
        w = Window("d", "primary", 60.0 * (end - 5), 60.0 * end, preds)
        det.update(w)
        m = det.evaluate(w.end)
        fresh = LogSketch(0.01)
        fresh.add_many(w.latencies)
        assert m.value == fresh.quantile(0.99) and m.sample_size == 2000
        reused.append(m.evidence["panes_reused"])
    assert reused == [0, 4, 4, 4, 4]
    assert sorted(det._panes) == [4, 5, 6, 7, 8]  # only the current window's panes are kept


def test_windows_not_aligned_to_panes_are_sketched_whole() -> None:
    rng = np.random.default_rng(2)
    preds = predictions(rng, 30.0, 60.0, 300)
    det = Latency(threshold=100.0, estimator="sketch", pane=60.0)
    det.update(Window("d", "primary", 30.0, 90.0, preds))
    m = det.evaluate(90.0)
    assert m.evidence["panes_reused"] == 0 and m.sample_size == 300 and det._panes == {}


def test_exact_stays_the_default_and_sketch_edge_cases() -> None:
    assert Latency(threshold=1.0).estimator == "exact"
    det = Latency(threshold=1.0, estimator="sketch", min_samples=10)
    assert det.evaluate(0.0).insufficient == "no window yet"
    det.update(Window("d", "primary", 0.0, 60.0, []))
    assert det.evaluate(60.0).insufficient == "no latencies in window"
    with pytest.raises(ValueError, match="estimator must be one of exact, sketch"):
        Latency(threshold=1.0, estimator="tdigest")
    with pytest.raises(ValueError, match=r"relative_accuracy must be in \(0, 0.5\)"):
        Latency(threshold=1.0, relative_accuracy=0.5)
    with pytest.raises(ValueError, match="pane must be > 0 seconds"):
        Latency(threshold=1.0, pane=0)
