"""Sequential change detectors on per-event error streams, against river used directly."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from river import drift

from rollbackd.detectors import Labeled, Sequential, Window, make_detector
from rollbackd.events import Prediction


def errors(seed: int, rates: list[tuple[int, float]], n: int = 1000) -> list[np.ndarray]:
    """Per window, ``n`` 0/1 error indicators: ``rates`` is [(windows, error rate), ...]."""
    rng = np.random.default_rng(seed)
    return [(rng.random(n) < rate).astype(int) for count, rate in rates for _ in range(count)]


def window(i: int, bits: np.ndarray, shuffle: np.random.Generator | None = None) -> Window:
    n = bits.shape[0]
    preds = [
        Prediction(id=f"{i}-{j}", ts=60.0 * i + 60.0 * j / n, deployment="d", model_version="v1",
                   error="e" if b else None)
        for j, b in enumerate(bits.tolist())
    ]
    if shuffle is not None:  # arrival order differs from event order
        shuffle.shuffle(preds)
    return Window("d", "primary", 60.0 * i, 60.0 * (i + 1), preds)


def river_detector(method: str) -> Any:
    if method == "adwin":
        return drift.ADWIN(delta=0.002, clock=32)
    if method == "hddm_a":
        return drift.binary.HDDMA(drift_confidence=0.001, warning_confidence=0.005)
    return drift.binary.HDDMW(drift_confidence=0.001, warning_confidence=0.005, lambda_val=0.05)


METHODS = ["adwin", "hddm_a", "hddm_w"]
# 10% errors (a classifier's misses, say) for 30 windows of 1,000 events, then 25%
STREAM = [(30, 0.10), (10, 0.25)]


@pytest.mark.parametrize("method", METHODS)
def test_detections_are_rivers_own(method: str) -> None:
    bits = errors(17, STREAM)
    ref = river_detector(method)
    expected = []
    for k, x in enumerate(np.concatenate(bits).tolist()):
        ref.update(x)
        if ref.drift_detected:
            expected.append(k)
    det = Sequential(method=method)
    got = []
    shuffler = np.random.default_rng(0)
    for i, b in enumerate(bits):
        det.update(window(i, b, shuffler))
        m = det.evaluate(60.0 * (i + 1))
        assert m.value == (1.0 if m.evidence["detections"] else 0.0) and m.sample_size == 1000
        if m.value:
            got.append(m.evidence["first"]["event"])
    # one detection per window is reported as "first"; these streams have at most one
    assert got == expected


# Windows flagged, per method, for the stream above (the change is at window 30). river's
# HDDM-W restarts its weighted means from zero after a detection, so while the rate stays
# high it finds the "increase" again every few windows.
FLAGGED = {"adwin": [30], "hddm_a": [30], "hddm_w": [31, 33, 39]}


@pytest.mark.parametrize("method", METHODS)
def test_change_flagged_within_two_windows_and_never_before(method: str) -> None:
    det = Sequential(method=method)
    flagged = []
    for i, b in enumerate(errors(17, STREAM)):
        det.update(window(i, b))
        m = det.evaluate(60.0 * (i + 1))
        if m.value > 0.5:
            flagged.append(i)
            first = m.evidence["first"]
            assert first["mean_after"] > first["mean_before"]
            assert 60.0 * i <= first["ts"] < 60.0 * (i + 1)
    assert flagged == FLAGGED[method]


def test_a_long_stationary_stream_is_never_flagged() -> None:
    for method in METHODS:
        det = Sequential(method=method)
        for i, b in enumerate(errors(5, [(120, 0.10)])):
            det.update(window(i, b))
            assert det.evaluate(60.0 * (i + 1)).value == 0.0, (method, i)


def test_adwin_evidence_splits_its_window() -> None:
    det = Sequential(method="adwin")
    for i, b in enumerate(errors(17, STREAM)[:31]):
        det.update(window(i, b))
    first = det.evaluate(1860.0).evidence["first"]
    # ADWIN drops its older part at the cut: that part's mean is the "before"; it keeps some
    # old events next to the new ones, so its "after" lags the true 25%
    assert first["index"] == 239 and first["event"] == 30239
    assert first["mean_before"] == pytest.approx(0.10, abs=0.005)
    assert 0.11 < first["mean_after"] < 0.25


def test_model_error_signal_in_label_order() -> None:
    rng = np.random.default_rng(3)
    det = Sequential(method="adwin", signal="model_error")
    flagged = []
    for i in range(20):
        wrong = rng.random(500) < (0.1 if i < 12 else 0.3)
        outs = [
            Labeled(60.0 * i, 60.0 * i + j * 0.1, "primary", "v1", True, None, not w)
            for j, w in enumerate(wrong)
        ]
        det.update(Window("d", "primary", 60.0 * i, 60.0 * (i + 1), [], outs))
        m = det.evaluate(60.0 * (i + 1))
        assert m.sample_size == 500 and m.evidence["signal"] == "model_error"
        if m.value:
            flagged.append(i)
    assert flagged == [12]


def test_sliding_windows_feed_each_event_once() -> None:
    bits = errors(9, [(4, 0.02)])
    preds = [p for i, b in enumerate(bits) for p in window(i, b).predictions]
    det = Sequential()
    # 2-minute windows every minute: each event belongs to two windows
    fed = []
    for end in range(2, 5):
        w = Window("d", "primary", 60.0 * (end - 2), 60.0 * end,
                   [p for p in preds if 60.0 * (end - 2) <= p.ts < 60.0 * end])
        det.update(w)
        fed.append(det.evaluate(60.0 * end).sample_size)
    assert fed == [2000, 1000, 1000] and det.evaluate(240.0).evidence["events_seen"] == 4000


def test_empty_window_is_insufficient() -> None:
    det = Sequential(min_samples=10)
    assert det.evaluate(0.0).insufficient == "no window yet"
    det.update(Window("d", "primary", 0.0, 60.0, []))
    assert det.evaluate(60.0).insufficient == "no events in window"


def test_river_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "river", None)
    with pytest.raises(ValueError, match=r"pip install 'rollbackd\[river\]'"):
        Sequential()


def test_without_river_the_loader_points_at_the_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    from rollbackd.rules.loader import ConfigError, load_config_text

    monkeypatch.setitem(sys.modules, "river", None)
    text = "rules:\n  - {name: s, detector: sequential, params: {method: adwin}, threshold: 0.5}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "rules.yaml")
    (err,) = info.value.errors
    column = text.splitlines()[1].index("sequential") + 1
    assert (err.path, err.line, err.column) == ("rules[0].detector", 2, column)
    assert err.message.startswith("sequential needs the optional river package")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "ddm"}, "method must be one of adwin, hddm_a, hddm_w"),
        ({"signal": "latency"}, "signal must be one of serving_error, model_error"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"clock": 0}, "clock must be an integer >= 1"),
        ({"drift_confidence": 1.0}, r"drift_confidence must be in \(0, 1\)"),
        ({"threshold": 1.0}, r"threshold must be in \[0, 1\)"),
    ],
)
def test_bad_parameters_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sequential(**kwargs)


def test_registered() -> None:
    det = make_detector("sequential", threshold=0.5, min_samples=1, params={"method": "hddm_w"})
    assert isinstance(det, Sequential) and det.method == "hddm_w"


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpointed_detector_continues_exactly(method: str) -> None:
    # a checkpoint keeps the detector's declared state (river's as plain values), and a
    # restore sets it on a detector built afresh from the rule
    import msgspec

    from rollbackd.daemon.snapshot import from_plain, restore_detector, to_plain

    bits = errors(17, STREAM)
    det = Sequential(method=method)
    for i, b in enumerate(bits[:25]):
        det.update(window(i, b))
    copy = Sequential(method=method)
    restore_detector(copy, from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(det)))))
    for i, b in enumerate(bits[25:], start=25):
        det.update(window(i, b))
        copy.update(window(i, b))
        assert copy.evaluate(60.0 * (i + 1)) == det.evaluate(60.0 * (i + 1))
