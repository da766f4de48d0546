"""Multi-window multi-burn-rate SLO alerts, on one-minute windows, with exact expectations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rollbackd.detectors import BurnRate, Window, make_detector
from rollbackd.events import Prediction
from rollbackd.rules.alerts import Alert, step
from rollbackd.rules.loader import load_config_text

OK = Prediction(id="ok", ts=0.0, deployment="d", model_version="v1", latency_ms=10.0)
BAD = Prediction(id="bad", ts=0.0, deployment="d", model_version="v1", error="unavailable")
SLOW = Prediction(id="slow", ts=0.0, deployment="d", model_version="v1", latency_ms=900.0)


def minute(i: int, bad: int, n: int = 1000, slow: int = 0) -> Window:
    preds = [BAD] * bad + [SLOW] * slow + [OK] * (n - bad - slow)
    return Window("d", "primary", 60.0 * i, 60.0 * (i + 1), preds)


def feed(det: BurnRate, windows: list[Window]) -> list[Any]:
    out = []
    for w in windows:
        det.update(w)
        out.append(det.evaluate(w.end))
    return out


def test_value_is_the_largest_pair_score() -> None:
    det = BurnRate(threshold=1.0, slo=0.99, windows=[["10m", "2m", 2.0], ["30m", "5m", 1.0]])
    # 30 minutes: 1% errors (burn 1), then 5 minutes at 4% (burn 4)
    ms = feed(det, [minute(i, 10) for i in range(30)] + [minute(30 + i, 40) for i in range(5)])
    m = ms[-1]
    long10 = (5 * 10 + 5 * 40) / 10_000 / 0.01  # last 10 minutes: 5 at 1%, 5 at 4%
    short2 = 4.0
    long30 = (25 * 10 + 5 * 40) / 30_000 / 0.01
    short5 = 4.0
    expected = max(min(long10, short2) / 2.0, min(long30, short5) / 1.0)
    assert m.value == pytest.approx(expected, rel=1e-12)
    first, second = m.evidence["pairs"]
    assert first["long"] == "10m" and first["short"] == "2m" and first["factor"] == 2.0
    assert first["long_burn"] == pytest.approx(long10) and first["short_burn"] == pytest.approx(short2)
    assert first["long_n"] == 10_000 and first["long_bad"] == 250 and first["long_covered"] == 600.0
    assert second["long_burn"] == pytest.approx(long30) and second["breaching"] is True
    assert m.sample_size == 30_000 and m.p_value is None


def outage(minutes_before: int, minutes_bad: int, minutes_after: int, rate: float) -> list[Window]:
    # background: 0.05% errors, half the budget's burn (0.5 at SLO 99.9%)
    ws = [minute(i, 0 if i % 2 else 1) for i in range(minutes_before)]
    t = minutes_before
    ws += [minute(t + i, int(rate * 1000)) for i in range(minutes_bad)]
    t += minutes_bad
    ws += [minute(t + i, 0 if i % 2 else 1) for i in range(minutes_after)]
    return ws


def test_an_outage_pages_and_the_page_resets_with_the_short_window() -> None:
    # 6 h of background, a 30-minute outage at 10% errors (burn 100), 2 h of background
    windows = outage(360, 30, 120, 0.10)
    det = BurnRate(threshold=1.0, slo=0.999)  # the workbook's 1h/5m x14.4 and 6h/30m x6
    ms = feed(det, windows)
    breaching = [i for i, m in enumerate(ms) if m.value is not None and m.value > 1.0]
    # 1h x14.4 needs 14.4/100 of an hour at burn 100: 8.6 minutes, so the 9th bad minute (368)
    first = breaching[0]
    assert first == 368
    # the 1h/5m pair resets 5 minutes after the outage; the 6h/30m pair (breaching from
    # minute 22 of the outage) holds while its 30-minute short window burns faster than 6x:
    # until 28 minutes after the outage (minute 417)
    assert breaching == list(range(368, 418))
    assert max(m.value for m in ms[:360]) < 1.0  # the background never pages
    worst = ms[389].evidence["pairs"]
    assert worst[0]["short_burn"] == pytest.approx(100.0) and worst[1]["breaching"] is True


def test_through_the_alert_state_machine() -> None:
    config = load_config_text(
        """
version: 1
rules:
  - name: slo-burn
    detector: burn_rate
    params: {slo: 0.999, windows: [[1h, 5m, 14.4], [6h, 30m, 6]]}
    threshold: 1
    window: {size: 1m}
    for: 0s
    severity: critical
    actions: [notify]
"""
    )
    rule = config.rules[0]
    det = make_detector("burn_rate", threshold=rule.threshold, min_samples=rule.min_samples, params=rule.params)
    alert = Alert(rule.name, "d", "primary")
    events = []
    for w in outage(60, 20, 60, 0.5):
        det.update(w)
        alert, tr = step(rule, alert, det.evaluate(w.end), w.end)
        if tr is not None:
            events.append((int(w.end // 60) - 1, tr.new))
    # burn 500, one hour into the stream: the 6h window holds only the 61 minutes seen so far,
    # so the 6h/30m pair already breaches on the first bad minute (60); it holds the alert
    # while its 30-minute window still holds a bad minute: resolved at minute 109
    assert events == [(60, "firing"), (109, "resolved")]


def test_latency_objective_counts_slow_requests_as_bad() -> None:
    det = BurnRate(threshold=1.0, slo=0.99, windows=[["5m", "1m", 2.0]], latency_ms=500.0)
    ms = feed(det, [minute(i, 5, slow=25) for i in range(5)])
    assert ms[-1].evidence["pairs"][0]["short_burn"] == pytest.approx(3.0)
    plain = BurnRate(threshold=1.0, slo=0.99, windows=[["5m", "1m", 2.0]])
    assert feed(plain, [minute(0, 5, slow=25)])[0].evidence["pairs"][0]["short_burn"] == pytest.approx(0.5)


def test_memory_is_bounded_and_overlaps_are_ignored() -> None:
    det = BurnRate(threshold=1.0, windows=[["10m", "1m", 2.0]])
    feed(det, [minute(i, 0) for i in range(100)])
    assert len(det._buckets) == 10  # the longest lookback's worth
    det.update(Window("d", "primary", 99 * 60.0 + 30.0, 100 * 60.0 + 30.0, [BAD] * 10))
    assert len(det._buckets) == 10 and det.evaluate(6000.0).value == 0.0


def test_insufficient_data() -> None:
    det = BurnRate(threshold=1.0, min_samples=100, windows=[["10m", "1m", 2.0]])
    assert det.evaluate(0.0).insufficient == "no window yet"
    ms = feed(det, [minute(0, 0, n=50)])
    assert ms[0].insufficient == "fewer than 100 requests in every short window"
    assert ms[0].evidence["pairs"][0]["breaching"] is None
    empty = feed(BurnRate(threshold=1.0), [minute(0, 0, n=0)])[0]
    assert empty.insufficient and empty.evidence["pairs"][0]["short_burn"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slo": 1.0}, r"slo must be in \(0, 1\)"),
        ({"windows": []}, "windows must be a non-empty list"),
        ({"windows": [["5m", "1h", 14.4]]}, r"windows\[0\]: need 0 < short < long"),
        ({"windows": [["1h", "5m"]]}, r"windows\[0\] must be \[long, short, factor\]"),
        ({"windows": [["1h", "5x", 2]]}, r"windows\[0\]: invalid duration '5x'"),
        ({"windows": [["1h", "5m", 0]]}, "the burn factor must be a number > 0"),
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"latency_ms": -1}, "latency_ms must be >= 0"),
    ],
)
def test_bad_parameters_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    args = {"threshold": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        BurnRate(**args)


def test_numbers_are_seconds() -> None:
    det = BurnRate(threshold=1.0, windows=[[3600, 300, 14.4]])
    assert det._pairs == ((3600.0, 300.0, 14.4),)
    assert np.isclose(det.slo, 0.999)
