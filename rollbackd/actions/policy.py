"""Safety rails for rollbacks: dry-run, a per-deployment cooldown, one rollback per intent.

Frozen settings (:class:`SafetyPolicy`) make a separate, persisted state
(:class:`SafetyState`); ``decide`` takes ``now`` and never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rollbackd.actions.base import RollbackPlan

__all__ = ["SafetyPolicy", "SafetyState", "Verdict"]

Verdict = Literal["run", "dry_run", "cooldown", "duplicate", "no_target"]


@dataclass(frozen=True, slots=True)
class SafetyPolicy:
    dry_run: bool = False
    cooldown: float = 1800.0

    def __post_init__(self) -> None:
        if self.cooldown < 0:
            raise ValueError(f"cooldown must be >= 0 seconds, got {self.cooldown}")

    def decide(self, state: "SafetyState", plan: RollbackPlan | None, now: float) -> tuple[Verdict, str]:
        if plan is None:
            return "no_target", "no known-good version to roll back to"
        if plan.idempotency_key in state.done:
            return "duplicate", f"already handled ({plan.idempotency_key})"
        last = state.last_rollback.get(plan.deployment)
        if last is not None and now - last < self.cooldown:
            return "cooldown", f"last rollback of {plan.deployment} at {last:.3f}, cooldown {self.cooldown:g}s"
        if self.dry_run:
            return "dry_run", f"dry run: would set {plan.deployment}/{plan.variant} to {plan.to_version}"
        return "run", ""


@dataclass(slots=True)
class SafetyState:
    last_rollback: dict[str, float] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    def record(self, plan: RollbackPlan, now: float, applied: bool) -> None:
        self.done.add(plan.idempotency_key)
        if applied:
            self.last_rollback[plan.deployment] = now

    def to_record(self) -> dict[str, Any]:
        return {"last_rollback": dict(sorted(self.last_rollback.items())), "done": sorted(self.done)}
