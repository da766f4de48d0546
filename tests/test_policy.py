"""SafetyPolicy / SafetyState: the rails every rollback passes, stepped at a fixed epoch."""

from __future__ import annotations

import pytest

from rollbackd.actions.base import RollbackPlan
from rollbackd.actions.policy import SafetyPolicy, SafetyState

T0 = 1_790_000_000.0
COOLDOWN = 1800.0


def plan(
    incident: str = "inc-1", to: str = "v1", deployment: str = "fraud", variant: str = "primary"
) -> RollbackPlan:
    return RollbackPlan(deployment, variant, "v2", to, incident, "rule error-rate")


def test_a_negative_cooldown_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        SafetyPolicy(cooldown=-1)


def test_no_plan_means_no_target():
    assert SafetyPolicy().decide(SafetyState(), None, T0) == (
        "no_target", "no known-good version to roll back to"
    )


def test_a_clean_state_runs():
    assert SafetyPolicy().decide(SafetyState(), plan(), T0) == ("run", "")


def test_dry_run_says_what_it_would_do_and_arms_no_cooldown():
    policy, state = SafetyPolicy(dry_run=True), SafetyState()
    p = plan(variant="canary")
    assert policy.decide(state, p, T0) == ("dry_run", "dry run: would set fraud/canary to v1")
    state.record(p, T0, applied=False)
    assert state.last_rollback == {}
    # The same intent is not planned twice; another incident's plan is still considered.
    assert policy.decide(state, p, T0 + 1)[0] == "duplicate"
    assert policy.decide(state, plan(incident="inc-2"), T0 + 1)[0] == "dry_run"


# (seconds after T0, plan, applied?, expected verdict); record() runs after "run" verdicts.
TABLE = [
    (0, plan("inc-1"), True, "run"),
    (0, plan("inc-1"), None, "duplicate"),  # at-least-once delivery of the same intent
    (60, plan("inc-2"), None, "cooldown"),  # another incident, same deployment
    (60, plan("inc-c", deployment="churn"), True, "run"),  # the cooldown is per deployment
    (COOLDOWN - 1, plan("inc-3"), None, "cooldown"),
    (COOLDOWN, plan("inc-3"), False, "run"),  # the cooldown has passed; the backend failed
    (COOLDOWN + 1, plan("inc-4"), True, "run"),  # a failed rollback arms no cooldown
    (COOLDOWN + 2, plan("inc-3"), None, "duplicate"),  # nor is a failed intent retried
    (2 * COOLDOWN, plan("inc-5"), None, "cooldown"),  # counted from inc-4's rollback
]


def test_cooldown_and_duplicates_as_a_tick_table():
    policy, state = SafetyPolicy(cooldown=COOLDOWN), SafetyState()
    for t, p, applied, want in TABLE:
        verdict, why = policy.decide(state, p, T0 + t)
        assert verdict == want, f"t={t}: {verdict} ({why})"
        if verdict == "run":
            state.record(p, T0 + t, applied=bool(applied))
    assert state.to_record() == {
        "last_rollback": {"churn": T0 + 60, "fraud": T0 + COOLDOWN + 1},
        "done": [f"inc-{i}:rollback:primary:v1" for i in ("1", "3", "4", "c")],
        "applied": {"churn": [T0 + 60], "fraud": [T0, T0 + COOLDOWN + 1]},
        "reverted": {"churn/primary": {"v2": T0 + 60}, "fraud/primary": {"v2": T0 + COOLDOWN + 1}},
    }


def test_the_cooldown_reason_names_the_last_rollback():
    policy, state = SafetyPolicy(cooldown=600), SafetyState()
    state.record(plan("inc-1"), T0, applied=True)
    assert policy.decide(state, plan("inc-2"), T0 + 10) == (
        "cooldown", f"last rollback of fraud at {T0:.3f}, cooldown 600s"
    )


def test_a_zero_cooldown_never_blocks():
    policy, state = SafetyPolicy(cooldown=0), SafetyState()
    state.record(plan("inc-1"), T0, applied=True)
    assert policy.decide(state, plan("inc-2"), T0)[0] == "run"


def test_duplicate_is_checked_before_cooldown_and_dry_run():
    state = SafetyState()
    state.record(plan("inc-1"), T0, applied=True)
    assert SafetyPolicy(dry_run=True).decide(state, plan("inc-1"), T0 + 1)[0] == "duplicate"
    assert SafetyPolicy(dry_run=True).decide(state, plan("inc-2"), T0 + 1)[0] == "cooldown"
