"""The blind state machine as tick tables (as Prometheus tests ``for``): a fixed epoch stepped
second by second, the expected state and notice at each step."""

from __future__ import annotations

import pickle

import pytest

from rollbackd.daemon.blindness import BlindState, Blindness

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
SINCE = "2023-11-14T22:13:20Z"

# (seconds after T0, read_ok, lag, expected notice kind or None, expected blind after the step)
Tick = tuple[float, bool, "int | None", "str | None", bool]


def run(b: Blindness, ticks: list[Tick]) -> list:
    out = []
    for at, ok, lag, kind, blind in ticks:
        change = b.observe(T0 + at, ok, lag, "consumer: _ALL_BROKERS_DOWN")
        assert (change.kind if change else None) == kind, f"t={at}: {change}"
        assert b.blind == blind, f"t={at}"
        out.append(change)
    return [c for c in out if c is not None]


def test_a_read_outage_opens_at_the_bound_and_resolves_with_the_lag():
    b = Blindness(blind_after=15, lag_measured=True)
    changes = run(b, [
        (0, True, 0, None, False),
        (1, False, None, None, False),  # the spell starts
        (10, False, None, None, False),
        (15.9, False, None, None, False),  # 14.9 s
        (16, False, None, "opened", True),  # 15 s: exactly at the bound
        (17, False, None, None, True),  # opened once
        (40, True, None, None, True),  # reads again, lag not yet measured: held
        (41, True, 1234, "resolved", False),
        (42, True, 0, None, False),
    ])
    opened, resolved = changes
    assert opened.text == f"not watching since 2023-11-14T22:13:21Z (15 s): cannot read events: consumer: _ALL_BROKERS_DOWN"
    assert opened.since == T0 + 1
    assert resolved.text == "watching again after 40 s blind (since 2023-11-14T22:13:21Z); consumer lag 1234"
    assert resolved.lag == 1234


def test_a_short_outage_raises_nothing_and_the_next_one_starts_afresh():
    b = Blindness(blind_after=15, lag_measured=True)
    run(b, [
        (0, False, None, None, False),
        (14, False, None, None, False),
        (14.5, True, None, None, False),  # a spell without a notice ends even with the lag unknown
        (20, False, None, None, False),  # a new spell: the clock starts again
        (34, False, None, None, False),
        (35, False, None, "opened", True),
    ])
    assert b.state.since == T0 + 20


def test_lag_over_the_limit_is_blind_and_continuous_with_read_failures():
    b = Blindness(blind_after=10, lag_limit=20_000, lag_measured=True)
    changes = run(b, [
        (0, True, 5_000, None, False),
        (1, False, None, None, False),  # reads fail ...
        (6, True, 517_794, None, False),  # ... then read, far behind: the same spell
        (10, True, 400_000, None, False),
        (11, True, 300_000, "opened", True),  # 10 s since t=1
        (12, True, None, None, True),  # lag unknown: no change
        (30, True, 103_915, None, True),  # reading but still behind: still blind
        (40, True, 20_000, "resolved", False),  # at the limit is not over it
    ])
    assert changes[0].text.endswith("consumer lag 300000 > limit 20000")
    assert "since 2023-11-14T22:13:21Z (10 s)" in changes[0].text
    assert changes[1].text == ("watching again after 39 s blind (since 2023-11-14T22:13:21Z); "
                               "consumer lag 20000 (limit 20000)")


def test_without_a_lag_limit_lag_never_blinds_and_is_reported():
    b = Blindness(blind_after=5, lag_measured=True)
    changes = run(b, [
        (0, True, 10**9, None, False),
        (10, True, 10**9, None, False),
        (11, False, None, None, False),
        (16, False, None, "opened", True),
        (20, True, 103_915, "resolved", False),
    ])
    assert changes[1].text.endswith("consumer lag 103915")


def test_a_source_that_measures_no_lag_resolves_at_once():
    b = Blindness(blind_after=5, lag_measured=False)
    changes = run(b, [
        (0, False, None, None, False),
        (5, False, None, "opened", True),
        (6, True, None, "resolved", False),
    ])
    assert changes[1].text.endswith("consumer lag not measured")


def test_a_spell_is_backdated_to_when_the_brokers_last_answered():
    b = Blindness(blind_after=15)
    assert b.observe(T0 + 5, False, None, "partition leaders silent for 5 s", since=T0) is None
    change = b.observe(T0 + 15, False, None, "partition leaders silent for 15 s", since=T0)
    assert change is not None and change.kind == "opened" and change.since == T0
    assert change.text.startswith(f"not watching since {SINCE} (15 s):")
    # A later, later-starting hint does not move the start of a spell already running.
    b2 = Blindness(blind_after=15)
    b2.observe(T0, False, None)
    b2.observe(T0 + 5, False, None, since=T0 + 4)
    assert b2.state.since == T0
    # Nor does a hint from the future.
    b3 = Blindness(blind_after=15)
    b3.observe(T0, False, None, since=T0 + 100)
    assert b3.state.since == T0


def test_the_state_survives_a_restart_and_the_notice_is_resolved_in_its_thread():
    b = Blindness(blind_after=5, lag_measured=True)
    b.observe(T0, False, None, "down")
    assert b.observe(T0 + 5, False, None, "down").kind == "opened"
    b.noticed("1700000005.000100")  # the Slack thread of the [BLIND] message
    saved = pickle.loads(pickle.dumps(b.state.to_dict()))  # as a checkpoint keeps it

    after = Blindness(blind_after=5, lag_measured=True)
    assert not after.blind
    after.adopt(BlindState.from_dict(saved))
    assert after.blind and after.state.since == T0
    # Still failing after the restart: the open notice stays open, no second one.
    assert after.observe(T0 + 60, False, None, "down") is None and after.blind
    change = after.observe(T0 + 70, True, 42)
    assert change is not None and change.kind == "resolved" and change.thread == "1700000005.000100"
    assert change.text == "watching again after 70 s blind (since 2023-11-14T22:13:20Z); consumer lag 42"


def test_a_restart_keeps_a_spell_without_notice_running():
    b = Blindness(blind_after=30)
    b.observe(T0, False, None)
    after = Blindness(blind_after=30)
    after.adopt(BlindState.from_dict(b.state.to_dict()))
    assert after.observe(T0 + 29, False, None) is None
    assert after.observe(T0 + 30, False, None).kind == "opened"


def test_saved_state_is_read_defensively():
    assert BlindState.from_dict(None) == BlindState()
    assert BlindState.from_dict({}) == BlindState()
    # notified without a start cannot be resolved truthfully: dropped
    assert BlindState.from_dict({"notified": True, "since": None}) == BlindState()
    assert BlindState.from_dict({"since": 5, "notified": 1, "thread": 7}).thread is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="blind_after"):
        Blindness(blind_after=0)
    with pytest.raises(ValueError, match="lag_limit"):
        Blindness(blind_after=1, lag_limit=-1)
