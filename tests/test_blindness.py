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
    assert opened.text == "not watching since 2023-11-14T22:13:21Z (15 s): cannot read events: consumer: _ALL_BROKERS_DOWN"
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
    from rollbackd.daemon.snapshot import frame, unframe

    saved = unframe("checkpoint", frame("checkpoint", b.state.to_dict()))  # as a checkpoint keeps it

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


# -- The daemon: the check runs on a timer, the state is checkpointed, shutdown is bounded ------

import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from rollbackd.actions.base import ActionResult  # noqa: E402
from rollbackd.daemon.blindness import SourceHealth  # noqa: E402
from rollbackd.daemon.replay import build_pipeline  # noqa: E402
from rollbackd.daemon.run import Checkpoint, Daemon, RunSettings  # noqa: E402
from rollbackd.daemon.sources import Batch  # noqa: E402
from rollbackd.errors import Recoverable  # noqa: E402
from rollbackd.rules.loader import load_config  # noqa: E402

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"


class SteppedClock:
    """Wall time that moves only when the daemon waits (its injected ``wait``)."""

    def __init__(self) -> None:
        self.t = T0

    def now(self) -> float:
        return self.t

    def wait(self, seconds: float) -> bool:
        self.t += seconds
        return False


class Notices:
    def __init__(self) -> None:
        self.posted: list = []

    def post(self, notice):
        self.posted.append(notice)
        return ActionResult("succeeded", "kept", thread=f"thread-{len(self.posted)}")


class Outage:
    """A stand-in source for fault injection: reads fail while ``down``; health() says what a
    Kafka source would (reachable, lag)."""

    def __init__(self, clock: SteppedClock, daemon_stop=None, down_until: float = float("inf"),
                 lag: int = 0, stop_after: float | None = None) -> None:
        self.clock = clock
        self.down_until = down_until
        self.lag_now = lag
        self.stop_after = stop_after
        self.daemon: Daemon | None = None
        self.reads = 0

    def read(self, max_events: int) -> Batch:
        self.reads += 1
        if self.stop_after is not None and self.clock.t >= self.stop_after:
            self.daemon.stop()
        if self.clock.t < self.down_until:
            raise Recoverable("consumer: _ALL_BROKERS_DOWN: 1/1 brokers are down")
        self.clock.t += 0.5  # a poll that brought nothing
        return Batch([], [], {"t:0": 0})

    def health(self) -> SourceHealth:
        up = self.clock.t >= self.down_until
        return SourceHealth(reachable=up, silent_for=0.0, detail="" if up else "down",
                            lag=self.lag_now, lag_age=0.0 if up else 99.0)

    def commit(self, position) -> None:
        pass

    def close(self) -> None:
        pass


def daemon_for(source, clock, tmp_path, notifier, **settings) -> Daemon:
    config = load_config(RULES)
    d = Daemon(build_pipeline(config), source, clock=clock, wait=clock.wait, notifier=notifier,
               settings=RunSettings(checkpoint_path=str(tmp_path / "state.ckpt"), **settings))
    source.daemon = d
    return d


def test_backoff_does_not_postpone_the_notice(tmp_path):
    """Reads fail from T0 with backoff growing to 10 s: the notice still comes at 15 s, not at
    the end of the backoff wait that spans it (main raised it at ~20 s)."""
    clock = SteppedClock()
    notices = Notices()
    source = Outage(clock, down_until=T0 + 40, lag=0, stop_after=T0 + 45)
    daemon = daemon_for(source, clock, tmp_path, notices, blind_after=15, backoff_max=10)
    daemon.run()
    opened, resolved = notices.posted
    assert opened.kind == "opened" and T0 + 15 <= opened.ts <= T0 + 16  # looked at every second
    assert opened.title.startswith("[BLIND] rollbackd: not watching since 2023-11-14T22:13:20Z (")
    assert opened.title.endswith("s): cannot read events: consumer: _ALL_BROKERS_DOWN: 1/1 brokers are down")
    assert resolved.kind == "resolved" and resolved.thread == "thread-1"
    # Seen at the first read after the outage: at most one backoff (10 s) after it ended.
    assert T0 + 40 <= resolved.ts <= T0 + 51
    assert "consumer lag 0" in resolved.title and "blind (since 2023-11-14T22:13:20Z)" in resolved.title
    assert daemon.lag == 0


def test_a_restart_while_blind_keeps_the_notice_and_resolves_it(tmp_path):
    clock = SteppedClock()
    first = Notices()
    d1 = daemon_for(Outage(clock, stop_after=T0 + 20), clock, tmp_path, first, blind_after=5)
    d1._position = {"t:0": 0}  # a source that has been read: checkpoints are written
    d1.run()
    assert [n.kind for n in first.posted] == ["opened"]
    assert Checkpoint.load(str(tmp_path / "state.ckpt")).blind["notified"] is True

    # Restarted, still blind: no second notice. Then the brokers come back: resolved in the
    # first notice's thread, counting the whole spell.
    second = Notices()
    clock.t += 60  # the daemon was down a minute
    d2 = daemon_for(Outage(clock, down_until=clock.t + 10, lag=7, stop_after=clock.t + 15), clock, tmp_path,
                    second, blind_after=5)
    d2.restore()
    assert d2.blind_notified and d2.blind_since == T0
    d2.run()
    (resolved,) = second.posted
    assert resolved.kind == "resolved" and resolved.thread == "thread-1"
    assert resolved.ts >= T0 + 90
    assert (f"watching again after {round(resolved.ts - T0)} s blind (since 2023-11-14T22:13:20Z); "
            "consumer lag 7") in resolved.title


def test_a_pickled_checkpoint_from_before_schema_3_is_refused_and_runs_nothing(tmp_path):
    import rollbackd.daemon.run as run_module
    from rollbackd.daemon.snapshot import StateError

    class Creates:  # what a forged checkpoint carries: loading it would create a file
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"pipelines": {0: b""}, "x": Creates()}))
    with pytest.raises(StateError, match=r"old.ckpt: a pickled checkpoint written by a rollbackd "
                       r"before schema 3: refused .*Move the file \(and .*old.ckpt.refs\) away to start afresh"):
        run_module.Checkpoint.load(str(path))
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_round_trips_with_its_blind_state(tmp_path):
    import rollbackd.daemon.run as run_module

    path = tmp_path / "state.ckpt"
    run_module.Checkpoint({0: b"x"}, {"t:0": 1}, 3, {"alerts": 2}, {"since": 1.5}).save(str(path))
    loaded = run_module.Checkpoint.load(str(path))
    assert (loaded.pipelines, loaded.position, loaded.decisions_offset, loaded.ledger_marks, loaded.blind) == (
        {0: b"x"}, {"t:0": 1}, 3, {"alerts": 2}, {"since": 1.5})


def test_stop_returns_within_the_stop_timeout_when_close_hangs(tmp_path):
    class Hung(Outage):
        released = threading.Event()

        def close(self) -> None:  # a consumer leaving a group whose coordinator is gone
            self.released.wait(60)

    clock = SteppedClock()
    source = Hung(clock, stop_after=T0 + 2)
    daemon = daemon_for(source, clock, tmp_path, Notices(), blind_after=30, stop_timeout=1.0)
    t = time.monotonic()
    try:
        daemon.run()
        took = time.monotonic() - t
    finally:
        Hung.released.set()
    assert took < 2.0, took


def test_metrics_read_the_kept_lag_without_asking_the_source(tmp_path):
    from rollbackd.daemon.http import MetricsCollector

    class Counting(Outage):
        asked = 0

        def lag(self) -> int:
            Counting.asked += 1
            raise AssertionError("a scrape must not ask the source")

    clock = SteppedClock()
    source = Counting(clock, down_until=T0, lag=12, stop_after=T0 + 3)
    daemon = daemon_for(source, clock, tmp_path, Notices())
    daemon.run()
    collector = MetricsCollector(daemon.pipeline, daemon=daemon, clock=clock)
    names = {m.name: m for m in collector.collect()}
    assert names["rollbackd_consumer_lag"].samples[0].value == 12
    assert Counting.asked == 0
    assert daemon.lag_at is not None


def test_the_resolution_says_the_lag_measured_after_the_outage_not_before(tmp_path):
    """A lag measured a moment before the outage looks recent when reads resume; the notice
    waits for one measured since, so it says how far behind the daemon is now."""

    class Recovering(Outage):
        def health(self) -> SourceHealth:
            up = self.clock.t >= self.down_until
            if not up:  # the pre-outage value, one second old when the outage began
                return SourceHealth(False, 0.0, "down", lag=500, lag_age=self.clock.t - (T0 - 1))
            if self.clock.t < self.down_until + 2:  # back, not yet measured again
                return SourceHealth(True, 0.0, "", lag=500, lag_age=self.clock.t - (T0 - 1))
            return SourceHealth(True, 0.0, "", lag=3, lag_age=0.0)

    clock = SteppedClock()
    notices = Notices()
    source = Recovering(clock, down_until=T0 + 4, stop_after=T0 + 12)
    daemon = daemon_for(source, clock, tmp_path, notices, blind_after=2, backoff_max=1, lag_every=5)
    daemon.run()
    opened, resolved = notices.posted
    assert resolved.ts >= T0 + 6 and "consumer lag 3" in resolved.title
