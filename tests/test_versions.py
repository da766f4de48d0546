"""VersionHistory: which version serves since when, which were bad, which is the rollback target.

Histories are built from (minute, version) steps at a fixed epoch; ``known_good_after`` is
10 minutes throughout, as in the deployment default.
"""

from __future__ import annotations

import pytest

from rollbackd.daemon.versions import VersionHistory, VersionSpan

T0 = 1_790_000_000.0
MIN = 60.0
KGA = 600.0  # known_good_after


def at(minute: float) -> float:
    return T0 + minute * MIN


def history(*steps: tuple[float, str]) -> VersionHistory:
    """(minute, version) observes; (minute, "bad") marks the running version bad."""
    h = VersionHistory()
    for minute, what in steps:
        if what == "bad":
            h.mark_bad()
        else:
            h.observe(what, at(minute))
    return h


def test_observe_opens_a_span_on_change_only():
    h = VersionHistory()
    assert h.current is None
    assert h.observe("v1", at(0), {"commit": "abc"}) is True
    assert h.observe("v1", at(5), {"pipeline": "42"}) is False  # same version: provenance merges
    assert h.observe("v2", at(12)) is True
    assert [s.to_record() for s in h.spans] == [
        {"version": "v1", "started": at(0), "ended": at(12), "bad": False,
         "provenance": {"commit": "abc", "pipeline": "42"}, "predictions": 0},
        {"version": "v2", "started": at(12), "ended": None, "bad": False, "provenance": {},
         "predictions": 0},
    ]
    assert h.current.version == "v2"


def test_provenance_is_copied_not_shared():
    prov = {"commit": "abc"}
    h = VersionHistory()
    h.observe("v1", at(0), prov)
    prov["commit"] = "changed"
    assert h.current.provenance == {"commit": "abc"}


def test_served_for_counts_to_now_while_running_and_to_the_end_after():
    span = VersionSpan("v1", at(0))
    assert span.served_for(at(7)) == 7 * MIN
    span.ended = at(3)
    assert span.served_for(at(7)) == 3 * MIN


def test_mark_bad_on_an_empty_history_is_a_no_op():
    h = VersionHistory()
    h.mark_bad()
    assert h.spans == [] and h.known_good(at(100), KGA) is None


@pytest.mark.parametrize(
    "steps, now, target",
    [
        # Only one version ever: nothing to go back to.
        ([(0, "v1")], 60, None),
        # v1 served 10 min (exactly known_good_after): it qualifies.
        ([(0, "v1"), (10, "v2")], 12, "v1"),
        # v1 served 9 min: too short, however long ago.
        ([(0, "v1"), (9, "v2")], 600, None),
        # The most recent qualifying version wins over an older one.
        ([(0, "v1"), (20, "v2"), (40, "v3")], 41, "v2"),
        # A version too short to qualify is skipped for an older one that did.
        ([(0, "v1"), (20, "v2"), (25, "v3")], 26, "v1"),
        # A version an incident opened on is never a target...
        ([(0, "v1"), (20, "v2"), (30, "bad"), (40, "v3")], 41, "v1"),
        # ...not even through an earlier healthy span of the same version.
        ([(0, "v1"), (20, "v2"), (25, "v1"), (26, "bad"), (30, "v3")], 31, None),
        # The running version is never its own target, even if it once ran healthy.
        ([(0, "v1"), (20, "v2"), (40, "v1")], 41, "v2"),
        # After a rollback to v1 (bad v2), nothing else is left to roll back to.
        ([(0, "v1"), (20, "v2"), (21, "bad"), (22, "v1")], 30, None),
    ],
)
def test_known_good_is_the_latest_healthy_long_enough_other_version(steps, now, target):
    assert history(*steps).known_good(at(now), KGA) == target


def test_mark_bad_marks_the_running_span():
    h = history((0, "v1"), (20, "v2"), (21, "bad"))
    assert [(s.version, s.bad) for s in h.spans] == [("v1", False), ("v2", True)]


def test_served_counts_toward_each_versions_latest_span():
    h = history((0, "v1"), (10, "v2"), (20, "v1"))
    h.served({"v1": 5, "v2": 3})
    h.served({"v1": 2, "v3": 9})  # a version with no span is not counted anywhere
    assert [(s.version, s.predictions) for s in h.spans] == [("v1", 0), ("v2", 3), ("v1", 7)]


# (predictions v1 served, minimum, target): v1 ran 20 min, long enough; traffic decides.
@pytest.mark.parametrize(
    "served, minimum, target",
    [(999, 1000, None), (1000, 1000, "v1"), (0, 0, "v1"), (5000, 1000, "v1")],
)
def test_known_good_needs_a_minimum_of_traffic(served, minimum, target):
    h = history((0, "v1"), (20, "v2"))
    h.spans[0].predictions = served
    assert h.known_good(at(25), KGA, minimum) == target


def test_a_short_busy_span_does_not_qualify_and_an_older_one_does():
    h = history((0, "v1"), (20, "v2"), (25, "v3"))
    h.spans[0].predictions, h.spans[1].predictions = 2000, 10**6  # v2: busy but only 5 min
    assert h.known_good(at(26), KGA, 1000) == "v1"
    h.spans[0].predictions = 10
    assert h.known_good(at(26), KGA, 1000) is None


def test_an_uncounted_span_round_trips_through_a_snapshot_and_stays_judged_by_time():
    import msgspec

    from rollbackd.daemon.snapshot import from_plain, to_plain

    h = history((0, "v1"), (20, "v2"))
    for span in h.spans:
        span.predictions = None  # judged by time alone
    old = from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(h))))
    assert old == h and [s.predictions for s in old.spans] == [None, None]
    assert old.known_good(at(25), KGA, 10**9) == "v1"
