"""The alert state machine as tick tables (Prometheus' TestKeepFiringFor style).

Each table steps one alert minute by minute from a fixed epoch; a row is
``(minute, measurement, expected state, expected transition)`` where the measurement is a
value (enough samples, no p-value), ``None`` (insufficient data) or a full ``Measurement``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any, Sequence

import pytest

from rollbackd.detectors.base import Measurement
from rollbackd.rules.alerts import Alert, AlertState, Transition, alert_id, step, verdict
from rollbackd.rules.model import RuleSpec

T0 = 1_700_000_000.0  # a fixed epoch: the machine under test never reads a clock
STEP = 60.0

I, P, F = AlertState.INACTIVE, AlertState.PENDING, AlertState.FIRING  # noqa: E741

Row = tuple[int, Any, AlertState, str | None]


def rule(**kw: Any) -> RuleSpec:
    base: dict[str, Any] = dict(name="r", detector="error_rate", threshold=0.05, min_samples=100)
    base.update(kw)
    return RuleSpec(**base)


def measurement(r: RuleSpec, m: Any) -> Measurement:
    if isinstance(m, Measurement):
        return m
    if m is None:
        return Measurement.insufficient_data(r.threshold, 3, "too few predictions")
    return Measurement(float(m), r.threshold, 1000)


def run(
    r: RuleSpec, rows: Sequence[Row], alert: Alert | None = None
) -> tuple[Alert, list[Transition]]:
    alert = alert or Alert("r", "fraud-scorer", "canary")
    transitions: list[Transition] = []
    for minute, m, state, kind in rows:
        now = T0 + minute * STEP
        before = alert
        alert, tr = step(r, alert, measurement(r, m), now)
        got = (alert.state, tr.new if tr else None)
        assert got == (state, kind), f"minute {minute}: got {got}, want {(state, kind)}"
        # An evaluation that moves nothing returns the alert itself (last_eval not touched);
        # any other is a new alert evaluated now.
        if alert is not before:
            assert alert.last_eval == now and alert != replace(before, last_eval=now)
        if tr is not None:
            assert tr.alert is alert
            transitions.append(tr)
    return alert, transitions


def test_a_one_window_blip_never_fires():
    r = rule(for_=120.0)
    _, trs = run(r, [
        (0, 0.01, I, None),
        (1, 0.20, P, "pending"),
        (2, 0.01, I, "inactive"),
        (3, 0.01, I, None),
        # Two windows (a blip straddling a window boundary) still fall short of 2m.
        (4, 0.20, P, "pending"),
        (5, 0.20, P, None),
        (6, 0.01, I, "inactive"),
        (7, 0.01, I, None),
    ])
    assert [t.new for t in trs] == ["pending", "inactive", "pending", "inactive"]


def test_a_sustained_breach_fires_exactly_once():
    r = rule(for_=120.0)
    alert, trs = run(r, [
        (0, 0.01, I, None),
        (1, 0.20, P, "pending"),
        (2, 0.20, P, None),
        (3, 0.20, F, "firing"),
        (4, 0.30, F, None),
        (5, 0.20, F, None),
        (6, 0.20, F, None),
        (7, 0.01, I, "resolved"),
        (8, 0.01, I, None),
    ])
    assert [t.new for t in trs].count("firing") == 1
    fired = trs[1]
    assert fired.previous is P
    assert (fired.alert.active_at, fired.alert.fired_at) == (T0 + 60, T0 + 180)
    resolved = trs[2]
    assert resolved.previous is F
    assert resolved.alert.resolved_at == T0 + 7 * 60
    assert resolved.alert.fired_at == T0 + 180  # kept, so the resolved notice can say when it began
    assert resolved.alert.active_at is None and alert.keep_firing_since is None


def test_flapping_around_the_threshold_neither_refires_nor_resolves():
    r = rule(threshold=0.05, clear_threshold=0.03)
    _, trs = run(r, [
        (0, 0.06, F, "firing"),
        (1, 0.04, F, None),  # below threshold, above clear: holds
        (2, 0.06, F, None),
        (3, 0.031, F, None),
        (4, 0.051, F, None),
        (5, 0.049, F, None),
        (6, 0.03, I, "resolved"),  # at clear ends the hold
        (7, 0.04, I, None),  # between clear and threshold does not start a new episode
        (8, 0.06, F, "firing"),
    ])
    assert [t.new for t in trs] == ["firing", "resolved", "firing"]


def test_without_hysteresis_the_same_flapping_resolves_and_refires():
    r = rule(threshold=0.05)
    _, trs = run(r, [
        (0, 0.06, F, "firing"),
        (1, 0.04, I, "resolved"),
        (2, 0.06, F, "firing"),
    ])
    assert len(trs) == 3


def test_a_pending_alert_holds_between_clear_and_threshold():
    r = rule(threshold=0.05, clear_threshold=0.03, for_=120.0)
    run(r, [
        (0, 0.06, P, "pending"),
        (1, 0.04, P, None),
        (2, 0.04, F, "firing"),
        (3, 0.02, I, "resolved"),
    ])


def test_keep_firing_for_holds_then_resolves():
    r = rule(keep_firing_for=300.0)
    alert, _ = run(r, [
        (0, 0.10, F, "firing"),
        (1, 0.01, F, None),  # keep_firing_since = minute 1
        (2, 0.01, F, None),
        (3, 0.01, F, None),
        (4, 0.01, F, None),
        (5, 0.01, F, None),
        (6, 0.01, I, "resolved"),  # 5m after the first clean evaluation
    ])
    assert alert.resolved_at == T0 + 360 and alert.keep_firing_since is None


def test_a_breach_during_keep_firing_for_restarts_the_hold():
    r = rule(keep_firing_for=180.0)
    run(r, [
        (0, 0.10, F, "firing"),
        (1, 0.01, F, None),
        (2, 0.01, F, None),
        (3, 0.10, F, None),  # active again: keep_firing_since cleared, no second "firing"
        (4, 0.01, F, None),
        (5, 0.01, F, None),
        (6, 0.01, F, None),
        (7, 0.01, I, "resolved"),
    ])


def test_keep_firing_since_is_the_first_clean_evaluation():
    r = rule(keep_firing_for=300.0)
    alert, _ = run(r, [(0, 0.10, F, "firing"), (1, 0.01, F, None), (2, 0.01, F, None)])
    assert alert.keep_firing_since == T0 + 60


def test_k_of_n_three_of_five():
    r = rule(k=3, n=5)
    alert, _ = run(r, [
        (0, 0.10, I, None),  # T        1 of 1
        (1, 0.01, I, None),  # T F
        (2, 0.10, I, None),  # T F T    2
        (3, 0.01, I, None),  # T F T F
        (4, 0.10, F, "firing"),  # T F T F T: 3 of 5
        (5, 0.01, I, "resolved"),  # once active, hysteresis (here: threshold) decides
        (6, 0.10, I, None),  # history starts over after the episode
        (7, 0.10, I, None),
        (8, 0.10, F, "firing"),
    ])
    assert alert.history == (True, True, True)


def test_k_of_n_spread_out_breaches_stay_inactive():
    r = rule(k=3, n=5)
    alert, _ = run(r, [
        (0, 0.10, I, None),  # T
        (1, 0.01, I, None),
        (2, 0.01, I, None),
        (3, 0.01, I, None),
        (4, 0.10, I, None),  # T F F F T: 2
        (5, 0.01, I, None),  # F F F T F
        (6, 0.10, I, None),  # F F T F T: 2
        (7, 0.01, I, None),  # F T F T F: 2
        (8, 0.01, I, None),
    ])
    assert alert.history == (True, False, True, False, False)


def test_k_of_n_history_ends_with_a_cancelled_pending():
    # With stale history kept, minute 3 would count 2 of 3 and reopen the episode.
    r = rule(k=2, n=3, for_=120.0)
    alert, _ = run(r, [
        (0, 0.10, I, None),
        (1, 0.10, P, "pending"),
        (2, 0.01, I, "inactive"),
        (3, 0.01, I, None),
        (4, 0.10, I, None),
        (5, 0.10, P, "pending"),
    ])
    assert alert.active_at == T0 + 300


def test_insufficient_data_neither_advances_nor_resets():
    r = rule(for_=120.0, k=1, n=1)
    alert, _ = run(r, [
        (0, None, I, None),
        (1, 0.20, P, "pending"),
        (2, None, P, None),
        (3, 0.20, F, "firing"),  # 2m after active_at: the quiet minute did not reset it
        (4, None, F, None),  # no data is not a recovery
        (5, None, F, None),
        (6, 0.20, F, None),
    ])
    assert alert.active_at == T0 + 60 and alert.keep_firing_since is None


@pytest.mark.parametrize(
    "no_verdict",
    [
        Measurement(None, 0.05, 1000),
        Measurement(0.5, 0.05, 99),  # below min_samples=100
        Measurement(0.5, 0.05, 1000, insufficient="labels not joined yet"),
        Measurement(float("nan"), 0.05, 1000),
    ],
    ids=["value-none", "few-samples", "insufficient", "nan"],
)
def test_no_verdict_changes_nothing(no_verdict):
    r = rule(k=2, n=3, keep_firing_for=60.0)
    alert = Alert(
        "r", "d", "v", state=F, active_at=T0, fired_at=T0, keep_firing_since=None,
        last_eval=T0, history=(True, False),
    )
    assert verdict(r, no_verdict) is None
    new, tr = step(r, alert, no_verdict, T0 + 60)
    assert tr is None
    assert new is alert  # not even last_eval: no copy of an alert per quiet window


def test_a_verdict_that_moves_nothing_returns_the_same_alert():
    r = rule(for_=120.0)
    quiet = Measurement(0.01, 0.05, 1000)
    alert = Alert("r", "d", "v", last_eval=T0)
    new, tr = step(r, alert, quiet, T0 + 60)
    assert new is alert and tr is None
    breach = Measurement(0.5, 0.05, 1000)
    pending, tr = step(r, alert, breach, T0 + 120)
    assert tr is not None and pending.state is AlertState.PENDING and pending.last_eval == T0 + 120
    held, tr = step(r, pending, breach, T0 + 180)  # still pending, nothing moved
    assert held is pending and tr is None


def test_direction_below():
    r = rule(threshold=0.80, clear_threshold=0.85, direction="below", for_=60.0)
    run(r, [
        (0, 0.90, I, None),
        (1, 0.80, I, None),  # strictly below
        (2, 0.70, P, "pending"),
        (3, 0.82, F, "firing"),  # above threshold but below clear: still holds
        (4, 0.84, F, None),
        (5, 0.85, I, "resolved"),
    ])


def test_threshold_is_strict_above():
    r = rule(threshold=0.05)
    run(r, [(0, 0.05, I, None), (1, 0.0500001, F, "firing")])


def test_alpha_gates_breaches_by_p_value():
    r = rule(alpha=0.01)

    def m(value: float, p: float | None) -> Measurement:
        return Measurement(value, 0.05, 1000, p_value=p)

    run(r, [
        (0, m(0.08, 0.20), I, None),  # beyond the threshold, but could be noise
        (1, m(0.08, 0.01), I, None),  # p must be strictly below alpha
        (2, m(0.09, 0.001), F, "firing"),
        (3, m(0.07, 0.30), F, None),  # once firing, only the value (vs clear) matters
        (4, m(0.01, 0.90), I, "resolved"),
        (5, m(0.08, None), F, "firing"),  # a detector without p-values is not gated
    ])


def test_for_zero_fires_on_the_first_breach():
    r = rule(for_=0.0)
    _, trs = run(r, [(0, 0.01, I, None), (1, 0.5, F, "firing"), (2, 0.5, F, None)])
    assert trs[0].previous is I and trs[0].alert.active_at == trs[0].alert.fired_at == T0 + 60


def test_a_new_episode_forgets_the_previous_one():
    r = rule(for_=60.0)
    alert, _ = run(r, [
        (0, 0.5, P, "pending"),
        (1, 0.5, F, "firing"),
        (2, 0.0, I, "resolved"),
        (3, 0.5, P, "pending"),
    ])
    assert (alert.active_at, alert.fired_at, alert.resolved_at) == (T0 + 180, None, None)


def test_a_restart_neither_resets_pending_nor_refires():
    r = rule(for_=180.0, keep_firing_for=120.0)
    rows: list[Row] = [
        (0, 0.5, P, "pending"),
        (1, 0.5, P, None),
        (2, 0.5, P, None),
        (3, 0.5, F, "firing"),
        (4, 0.0, F, None),
        (5, 0.5, F, None),
        (6, 0.0, F, None),
        (7, 0.0, F, None),
        (8, 0.0, I, "resolved"),
    ]
    straight, _ = run(r, rows)
    for cut in range(1, len(rows)):
        alert, _ = run(r, rows[:cut])
        restored = Alert.from_record(json.loads(json.dumps(alert.to_record())))
        assert restored == alert
        resumed, _ = run(r, rows[cut:], restored)
        assert resumed == straight


def test_record_round_trip():
    alert = Alert(
        "serving-error-rate", "fraud-scorer", "canary", state=F, active_at=T0,
        fired_at=T0 + 120, resolved_at=None, keep_firing_since=T0 + 300, last_eval=T0 + 360,
        history=(True, False, True),
    )
    record = alert.to_record()
    assert record["state"] == "firing" and record["id"] == alert.id
    assert json.loads(json.dumps(record)) == record
    assert Alert.from_record(json.loads(json.dumps(record))) == alert
    bare = {"rule": "r", "deployment": "d", "variant": "v"}
    assert Alert.from_record(bare) == Alert("r", "d", "v")


def test_ids_are_deterministic_hashes_of_the_labels():
    a = Alert("serving-error-rate", "fraud-scorer", "canary")
    expected = hashlib.sha256(b"serving-error-rate\0fraud-scorer\0canary").hexdigest()[:16]
    assert a.id == expected == alert_id("serving-error-rate", "fraud-scorer", "canary")
    assert replace(a, state=F, fired_at=T0).id == a.id  # state is not identity
    assert Alert("ab", "c", "d").id != Alert("a", "bc", "d").id
    assert len({Alert("r", "d", v).id for v in ("primary", "canary", "shadow")}) == 3


def test_states_are_strings():
    assert AlertState("pending") is P and f"{F}" == "firing"
