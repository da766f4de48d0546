"""IncidentBook as tick tables (Prometheus' TestKeepFiringFor style).

Each table steps one book from the fixed epoch ``T0``. A row is
``(seconds after T0, event, expected effects, expected next_deadline)``. Effects are written
compactly, with incidents named A, B, ... in the order they first appear:

- ``(inc, change, rule)``: an IncidentChange (``rule`` is None when it names no alert),
- ``(inc, "notice", kind, t)``: a NoticeDue stamped ``T0 + t``,
- ``(inc, "act", rule, actions, t, escalation)``: an ActionsDue.

The runner plays the caller's part: every notice due is "posted" and reported back with
``noticed`` (unless a table says notices are not posted), as the pipeline does.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import pytest

from rollbackd.rules.incidents import (
    ActionsDue,
    IncidentBook,
    IncidentChange,
    NoticeDue,
    incident_id,
)
from rollbackd.rules.model import GroupingSpec, RuleSpec

T0 = 1_790_000_000.0
DEP = "fraud-scorer"

WARN = RuleSpec(name="error-rate", detector="error_rate", threshold=0.05, severity="warning")
CRIT = RuleSpec(
    name="latency", detector="latency", threshold=500.0, severity="critical",
    actions=("notify", "rollback"),
)
CRIT2 = RuleSpec(
    name="drift", detector="drift", threshold=0.2, severity="critical",
    actions=("notify", "rollback"),
)
INFO_RB = RuleSpec(
    name="calibration", detector="calibration", threshold=0.1, severity="info",
    actions=("rollback",),
)

BY_DEPLOYMENT = GroupingSpec(group_by=("deployment",), group_wait=30.0, repeat_interval=3600.0)
BY_VARIANT = GroupingSpec(group_by=("deployment", "variant"), group_wait=30.0, repeat_interval=3600.0)


def fire(rule: RuleSpec, variant: str = "canary") -> tuple[Any, ...]:
    return ("fire", rule, variant)


def resolve(rule: RuleSpec, variant: str = "canary") -> tuple[Any, ...]:
    return ("resolve", rule, variant)


TICK = ("tick",)

Row = tuple[float, tuple[Any, ...], list[tuple[Any, ...]], float | None]


class Runner:
    def __init__(self, grouping: GroupingSpec, post_notices: bool = True) -> None:
        self.book = IncidentBook(grouping)
        self.post_notices = post_notices
        self.names: dict[str, str] = {}
        self.effects: list[list[Any]] = []

    def name(self, inc) -> str:
        return self.names.setdefault(inc.id, "ABCDEFGH"[len(self.names)])

    def summary(self, e: Any) -> tuple[Any, ...]:
        n = self.name(e.incident)
        if isinstance(e, IncidentChange):
            return (n, e.change, e.alert.rule if e.alert else None)
        if isinstance(e, NoticeDue):
            return (n, "notice", e.kind, e.ts - T0)
        assert isinstance(e, ActionsDue)
        return (n, "act", e.alert.rule, e.actions, e.ts - T0, e.escalation)

    def run(self, rows: Sequence[Row]) -> "Runner":
        for t, event, want, deadline in rows:
            now = T0 + t
            if event[0] == "fire":
                _, rule, variant = event
                got = self.book.alert_fired(
                    rule, f"{rule.name}/{DEP}/{variant}", DEP, variant, now,
                    {"value": 1.0, "threshold": rule.threshold, "sample_size": 100}, (now - 60, now),
                )
            elif event[0] == "resolve":
                _, rule, variant = event
                got = self.book.alert_resolved(f"{rule.name}/{DEP}/{variant}", DEP, now)
            else:
                got = self.book.tick(now)
            self.effects.append(got)
            assert [self.summary(e) for e in got] == want, f"t={t} {event[0]}"
            for e in got:
                if isinstance(e, NoticeDue) and self.post_notices:
                    self.book.noticed(e.incident, e.ts, f"thread-{self.name(e.incident)}")
            nd = self.book.next_deadline()
            assert (None if nd is None else nd - T0) == deadline, f"t={t}: next_deadline"
        return self


def test_the_first_notice_waits_for_group_wait_and_lists_every_alert_joined_meanwhile():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(WARN), [("A", "opened", "error-rate")], 30),
        (10, fire(CRIT), [("A", "alert_joined", "latency")], 30),
        (29, TICK, [], 30),
        # The most severe rule's actions run once, at the end of group_wait.
        (30, TICK, [("A", "notice", "opened", 30), ("A", "act", "latency", ("rollback",), 30, False)], 3630),
    ])
    (notice, _) = r.effects[-1]
    inc = notice.incident
    assert [(a.rule, a.state) for a in inc.alerts.values()] == [("error-rate", "firing"), ("latency", "firing")]
    assert (inc.severity, inc.lead_alert().rule, inc.thread) == ("critical", "latency", "thread-A")
    r.run([
        (31, TICK, [], 3630),
        (3629, TICK, [], 3630),
        (3630, TICK, [("A", "notice", "repeat", 3630)], 7230),
        (4000, resolve(CRIT), [("A", "alert_resolved", "latency"), ("A", "notice", "updated", 4000)], 7600),
        # All alerts resolved: the incident resolves, with one last notice.
        (4100, resolve(WARN), [
            ("A", "alert_resolved", "error-rate"), ("A", "resolved", None), ("A", "notice", "resolved", 4100),
        ], None),
        (9000, TICK, [], None),
    ])
    assert r.book.open == {} and r.book.closed == [inc]
    assert (inc.resolved_at, inc.actions_done) == (T0 + 4100, ["rollback:canary"])


def test_a_more_severe_alert_after_the_flush_escalates_without_a_second_incident():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(WARN), [("A", "opened", "error-rate")], 30),
        (30, TICK, [("A", "notice", "opened", 30)], 3630),  # warning: notify only, nothing to act
        (60, fire(CRIT), [
            ("A", "alert_joined", "latency"), ("A", "notice", "updated", 60),
            ("A", "escalated", "latency"), ("A", "act", "latency", ("rollback",), 60, True),
        ], 3660),
        # As severe as what already acted, and its rollback already ran: no second rollback.
        (90, fire(CRIT2), [("A", "alert_joined", "drift"), ("A", "notice", "updated", 90)], 3690),
        (120, TICK, [], 3690),
    ])
    (inc,) = r.book.open.values()
    assert (inc.severity, inc.actions_done, r.book.closed) == ("critical", ["rollback:canary"], [])


def test_a_less_severe_alert_after_the_flush_only_joins():
    Runner(BY_DEPLOYMENT).run([
        (0, fire(WARN), [("A", "opened", "error-rate")], 30),
        (30, TICK, [("A", "notice", "opened", 30)], 3630),
        # An info rule that would roll back: below what already acted, so it does not.
        (60, fire(INFO_RB), [("A", "alert_joined", "calibration"), ("A", "notice", "updated", 60)], 3660),
    ])


def test_escalation_runs_only_the_actions_not_run_yet():
    warn_rb = RuleSpec(
        name="error-rate", detector="error_rate", threshold=0.05, severity="warning",
        actions=("notify", "rollback"),
    )
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(warn_rb), [("A", "opened", "error-rate")], 30),
        (30, TICK, [("A", "notice", "opened", 30), ("A", "act", "error-rate", ("rollback",), 30, False)], 3630),
        # More severe, but its only action already ran: the severity rises, nothing runs twice.
        (60, fire(CRIT), [("A", "alert_joined", "latency"), ("A", "notice", "updated", 60)], 3660),
    ])
    (inc,) = r.book.open.values()
    assert (inc.severity, inc.acted_rank, inc.actions_done) == ("critical", 2, ["rollback:canary"])


def test_an_incident_resolved_inside_group_wait_runs_no_action_and_says_so_once():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(CRIT), [("A", "opened", "latency")], 30),
        (10, fire(WARN), [("A", "alert_joined", "error-rate")], 30),
        (15, resolve(CRIT), [("A", "alert_resolved", "latency")], 30),  # nobody was told yet
        (20, resolve(WARN), [
            ("A", "alert_resolved", "error-rate"), ("A", "resolved", None), ("A", "notice", "resolved", 20),
        ], None),
        (30, TICK, [], None),
        (60, TICK, [], None),
    ])
    (inc,) = r.book.closed
    assert (inc.actions_done, inc.resolved_at, r.book.open) == ([], T0 + 20, {})


def test_an_alert_that_resolves_and_fires_again_rejoins_and_acts_no_more():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(CRIT), [("A", "opened", "latency")], 30),
        (0, fire(WARN), [("A", "alert_joined", "error-rate")], 30),
        (30, TICK, [("A", "notice", "opened", 30), ("A", "act", "latency", ("rollback",), 30, False)], 3630),
        (100, resolve(CRIT), [("A", "alert_resolved", "latency"), ("A", "notice", "updated", 100)], 3700),
        (160, fire(CRIT), [("A", "alert_joined", "latency"), ("A", "notice", "updated", 160)], 3760),
    ])
    (inc,) = r.book.open.values()
    assert [(a.rule, a.fired_at) for a in inc.firing] == [("latency", T0 + 160), ("error-rate", T0)]
    assert inc.actions_done == ["rollback:canary"]


def test_a_rule_without_notify_still_acts_and_nothing_repeats_unposted():
    # The caller posts nothing (no rule asks for notify), so it never reports a notice back:
    # no repeat is ever due.
    r = Runner(BY_DEPLOYMENT, post_notices=False).run([
        (0, fire(INFO_RB), [("A", "opened", "calibration")], 30),
        (30, TICK, [("A", "notice", "opened", 30), ("A", "act", "calibration", ("rollback",), 30, False)], None),
        (100_000, TICK, [], None),
    ])
    assert r.book.open[(("deployment", DEP),)].last_notice_at is None


def test_repeats_catch_up_one_due_time_per_tick():
    Runner(BY_DEPLOYMENT).run([
        (0, fire(WARN), [("A", "opened", "error-rate")], 30),
        (30, TICK, [("A", "notice", "opened", 30)], 3630),
        # A tick long after: one repeat, stamped when it was due; the next is due from there.
        (20_000, TICK, [("A", "notice", "repeat", 3630)], 7230),
        (20_000, TICK, [("A", "notice", "repeat", 7230)], 10830),
    ])


def test_grouping_by_variant_keeps_variants_apart_and_ticks_in_opening_order():
    r = Runner(BY_VARIANT).run([
        (0, fire(WARN, "canary"), [("A", "opened", "error-rate")], 30),
        (5, fire(WARN, "primary"), [("B", "opened", "error-rate")], 30),
        (10, fire(CRIT, "canary"), [("A", "alert_joined", "latency")], 30),
        (35, TICK, [
            ("A", "notice", "opened", 30), ("A", "act", "latency", ("rollback",), 30, False),
            ("B", "notice", "opened", 35),
        ], 3630),
    ])
    a, b = (r.book.open[k] for k in sorted(r.book.open))
    assert (a.group, b.group) == ({"deployment": DEP, "variant": "canary"}, {"deployment": DEP, "variant": "primary"})
    assert r.book.incident_for(DEP, "primary") is b and r.book.incident_for(DEP, "canary") is a
    assert r.book.incident_for(DEP, "shadow") is None


def test_grouping_by_deployment_puts_every_variant_in_one_incident():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(WARN, "canary"), [("A", "opened", "error-rate")], 30),
        (5, fire(WARN, "primary"), [("A", "alert_joined", "error-rate")], 30),
    ])
    (inc,) = r.book.open.values()
    assert [a.variant for a in inc.alerts.values()] == ["canary", "primary"]
    assert r.book.incident_for(DEP, "primary") is r.book.incident_for(DEP, "canary") is inc


def test_grouping_by_severity_splits_an_incident():
    g = GroupingSpec(group_by=("deployment", "severity"), group_wait=30.0)
    Runner(g).run([
        (0, fire(WARN), [("A", "opened", "error-rate")], 30),
        (5, fire(CRIT), [("B", "opened", "latency")], 30),
        (6, fire(CRIT2), [("B", "alert_joined", "drift")], 30),
    ])


def test_incident_ids_hash_the_group_labels_and_the_opening_time():
    want = "inc-" + hashlib.sha256(f"deployment={DEP}\0variant=canary\0{T0:.3f}".encode()).hexdigest()[:12]
    assert incident_id({"variant": "canary", "deployment": DEP}, T0) == want
    assert incident_id({"deployment": DEP, "variant": "canary"}, T0) == want
    assert incident_id({"deployment": DEP, "variant": "canary"}, T0 + 1) != want
    assert incident_id({"deployment": DEP, "variant": "primary"}, T0) != want
    # The book uses exactly that id, so a replay or a restart reaches the same one.
    ids = []
    for _ in range(2):
        book = IncidentBook(BY_VARIANT)
        (opened,) = book.alert_fired(WARN, "a", DEP, "canary", T0, {}, (T0 - 60, T0))
        ids.append(opened.incident.id)
    assert ids == [want, want]


def test_a_new_episode_of_the_same_group_gets_a_new_id():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(WARN), [("A", "opened", "error-rate")], 30),
        (100, resolve(WARN), [
            ("A", "alert_resolved", "error-rate"), ("A", "resolved", None), ("A", "notice", "resolved", 100),
        ], None),
        (200, fire(WARN), [("B", "opened", "error-rate")], 230),
    ])
    (first,) = r.book.closed
    (second,) = r.book.open.values()
    assert (first.opened_at, second.opened_at) == (T0, T0 + 200)
    assert second.id == incident_id({"deployment": DEP}, T0 + 200) != first.id


@pytest.mark.parametrize("group_by", [("variant",), ("deployment", "team"), ()])
def test_group_by_must_name_the_deployment_and_known_labels_only(group_by):
    with pytest.raises(ValueError, match="group_by must include 'deployment'"):
        IncidentBook(GroupingSpec(group_by=group_by))


def test_the_record_carries_the_alerts_and_what_was_done():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(CRIT), [("A", "opened", "latency")], 30),
        (30, TICK, [("A", "notice", "opened", 30), ("A", "act", "latency", ("rollback",), 30, False)], 3630),
    ])
    (inc,) = r.book.open.values()
    rec = inc.to_record()
    keys = ("group", "deployment", "opened_at", "resolved_at", "severity", "actions_done", "thread")
    assert {k: rec[k] for k in keys} == {
        "group": {"deployment": DEP}, "deployment": DEP, "opened_at": T0, "resolved_at": None,
        "severity": "critical", "actions_done": ["rollback:canary"], "thread": "thread-A",
    }
    (alert,) = rec["alerts"]
    assert alert == {
        "alert_id": f"latency/{DEP}/canary", "rule": "latency", "severity": "critical",
        "deployment": DEP, "variant": "canary", "fired_at": T0, "resolved_at": None,
        "actions": ["notify", "rollback"],
        "measurement": {"value": 1.0, "threshold": 500.0, "sample_size": 100},
        "window": [T0 - 60, T0], "summary": None,
    }


def test_a_resolved_alert_keeps_the_measurement_that_resolved_it():
    r = Runner(BY_DEPLOYMENT).run([
        (0, fire(CRIT), [("A", "opened", "latency")], 30),
        (0, fire(WARN), [("A", "alert_joined", "error-rate")], 30),
    ])
    cleared = {"value": 120.0, "threshold": 500.0, "sample_size": 900}
    effects = r.book.alert_resolved(f"latency/{DEP}/canary", DEP, T0 + 10, cleared)
    assert [r.summary(e) for e in effects] == [("A", "alert_resolved", "latency")]
    (inc,) = r.book.open.values()
    assert inc.alerts[f"latency/{DEP}/canary"].measurement == cleared
    assert inc.alerts[f"error-rate/{DEP}/canary"].measurement["value"] == 1.0  # untouched


WARN_RB = RuleSpec(
    name="model-error", detector="model_error", threshold=0.2, severity="warning",
    actions=("notify", "rollback"),
)


def test_tied_most_severe_rules_all_act_at_the_flush():
    Runner(BY_DEPLOYMENT).run([
        (0, fire(CRIT), [("A", "opened", "latency")], 30),
        (5, fire(CRIT2, "primary"), [("A", "alert_joined", "drift")], 30),
        (30, TICK, [
            ("A", "notice", "opened", 30),
            ("A", "act", "latency", ("rollback",), 30, False),
            ("A", "act", "drift", ("rollback",), 30, False),  # another variant: its own rollback
        ], 3630),
    ])


def test_a_same_severity_alert_with_new_actions_escalates_after_the_flush():
    Runner(BY_DEPLOYMENT).run([
        (0, fire(WARN), [("A", "opened", "error-rate")], 30),
        (30, TICK, [("A", "notice", "opened", 30)], 3630),  # notify-only: nothing to run
        (60, fire(WARN_RB), [
            ("A", "alert_joined", "model-error"), ("A", "notice", "updated", 60),
            ("A", "escalated", "model-error"), ("A", "act", "model-error", ("rollback",), 60, True),
        ], 3660),
        # A second alert of the same variant asking for a rollback again: already done.
        (90, fire(CRIT), [("A", "alert_joined", "latency"), ("A", "notice", "updated", 90)], 3690),
    ])
