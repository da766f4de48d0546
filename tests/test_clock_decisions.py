"""The event-time clock, the timer queue, and the byte-stable decision encoding."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from rollbackd.daemon.clock import EventTimeClock, TimerQueue
from rollbackd.daemon.decisions import DecisionLog, MemoryDecisions, encode_decision

T0 = 1_790_000_000.0


# EventTimeClock ------------------------------------------------------------------------


def test_the_watermark_is_minus_infinity_until_an_event_is_seen():
    clock = EventTimeClock(lateness=30.0)
    assert clock.now() == -math.inf


def test_the_watermark_trails_the_latest_event_by_the_lateness_and_never_goes_back():
    clock = EventTimeClock(lateness=30.0)
    for ts, want in [(T0, T0 - 30), (T0 + 10, T0 - 20), (T0 + 5, T0 - 20), (T0 + 100, T0 + 70)]:
        clock.observe(ts)
        assert clock.now() == want, ts


def test_flush_drops_the_lateness_at_the_end_of_a_finite_stream():
    clock = EventTimeClock(lateness=30.0)
    clock.observe(T0)
    assert clock.flush() == T0
    assert clock.now() == T0


def test_a_negative_lateness_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        EventTimeClock(lateness=-1)


# TimerQueue ----------------------------------------------------------------------------


def test_timers_fire_in_due_order_and_ties_in_insertion_order():
    q: TimerQueue[str] = TimerQueue()
    assert (len(q), q.next_due(), q.pop_due(T0)) == (0, None, None)
    for at, item in [(T0 + 30, "flush"), (T0 + 10, "boundary-1"), (T0 + 30, "repeat"),
                     (T0 + 10, "boundary-2"), (T0 + 20, "expire")]:
        q.schedule(at, item)
    assert (len(q), q.next_due()) == (5, T0 + 10)
    assert q.pop_due(T0 + 9) is None  # nothing is due before its time
    fired = []
    while (due := q.pop_due(T0 + 30)) is not None:  # due exactly at now counts
        fired.append((due[0] - T0, due[1]))
    assert fired == [(10, "boundary-1"), (10, "boundary-2"), (20, "expire"), (30, "flush"), (30, "repeat")]
    assert len(q) == 0


def test_tied_timers_are_never_compared_by_their_items():
    q: TimerQueue[object] = TimerQueue()
    q.schedule(T0, {"a": 1})  # dicts do not order: a tie must not fall through to them
    q.schedule(T0, {"b": 2})
    assert [q.pop_due(T0)[1], q.pop_due(T0)[1]] == [{"a": 1}, {"b": 2}]


# Decisions -----------------------------------------------------------------------------


def test_keys_are_sorted_at_every_depth_and_floats_round_trip_shortest():
    rec = {"ts": T0 + 0.1, "b": {"z": 1, "a": [{"y": 2, "x": 1}]}, "a": 1 / 3}
    assert encode_decision(rec) == (
        b'{"a":0.3333333333333333,"b":{"a":[{"x":1,"y":2}],"z":1},"ts":1790000000.1}'
    )


def test_insertion_order_does_not_change_the_bytes():
    a = {"kind": "alert", "ts": T0, "measurement": {"value": 0.2, "threshold": 0.05}}
    b = {"measurement": {"threshold": 0.05, "value": 0.2}, "ts": T0, "kind": "alert"}
    assert encode_decision(a) == encode_decision(b)


def test_numpy_scalars_encode_as_the_plain_numbers_they_hold():
    rec = {
        "f64": np.float64(0.1), "f32": np.float32(0.5), "i64": np.int64(7), "u8": np.uint8(255),
        "yes": np.bool_(True), "nan": np.float64("nan"), "tags": {"b", "a"},
    }
    assert encode_decision(rec) == (
        b'{"f32":0.5,"f64":0.1,"i64":7,"nan":null,"tags":["a","b"],"u8":255,"yes":true}'
    )
    assert encode_decision(rec) == encode_decision(
        {"f64": 0.1, "f32": 0.5, "i64": 7, "u8": 255, "yes": True, "nan": None, "tags": ["a", "b"]}
    )


def test_an_unknown_type_is_an_error_not_a_guess():
    with pytest.raises(NotImplementedError, match="cannot encode object"):
        encode_decision({"x": object()})


def test_the_log_writes_one_line_per_decision_and_closes_only_what_it_opened(tmp_path):
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    log.write({"ts": T0, "kind": "alert"})
    log.write({"kind": "incident", "ts": T0 + 1})
    log.close()
    assert path.read_bytes() == b'{"kind":"alert","ts":1790000000.0}\n{"kind":"incident","ts":1790000001.0}\n'

    buf = io.BytesIO()
    log = DecisionLog(buf)
    log.write({"ts": T0})
    log.close()
    assert not buf.closed and buf.getvalue() == b'{"ts":1790000000.0}\n'


def test_memory_decisions_hold_what_the_file_would():
    mem = MemoryDecisions()
    mem.write({"v": np.int64(3), "ts": T0, "s": {2, 1}})
    assert mem.records == [{"s": [1, 2], "ts": T0, "v": 3}]
    assert list(mem.records[0]) == ["s", "ts", "v"]
