"""Safety rails for rollbacks: the deployment's policy, dry-run, a cooldown, a loop guard, and
one rollback per intent.

Frozen settings (:class:`SafetyPolicy`) make a separate, persisted state
(:class:`SafetyState`); ``decide`` takes ``now`` and never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rollbackd.actions.base import RollbackPlan
from rollbackd.rules.model import DEPLOYMENT_POLICIES as POLICIES

__all__ = ["SafetyPolicy", "SafetyState", "Verdict", "POLICIES"]

Verdict = Literal[
    "run", "dry_run", "cooldown", "duplicate", "no_target", "freeze", "notify_only",
    "loop_guard", "redeployed",
]


@dataclass(frozen=True, slots=True)
class SafetyPolicy:
    """``policy``: ``rollback`` acts; ``freeze`` never reverts (a schema change may make the old
    version unsafe) and escalates instead; ``notify-only`` only tells.

    Loop guard: at most ``max_rollbacks`` applied rollbacks of a deployment within
    ``loop_period`` (``None``: no limit); and a version that was rolled back from within
    ``loop_period`` and started serving again since was deployed again on purpose (a GitOps re-sync, a
    human): rollbackd notifies instead of fighting it.
    """

    dry_run: bool = False
    cooldown: float = 1800.0
    policy: str = "rollback"
    max_rollbacks: int | None = None
    loop_period: float = 86400.0

    def __post_init__(self) -> None:
        if self.cooldown < 0:
            raise ValueError(f"cooldown must be >= 0 seconds, got {self.cooldown}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.max_rollbacks is not None and self.max_rollbacks < 1:
            raise ValueError(f"max_rollbacks must be >= 1, got {self.max_rollbacks}")
        if self.loop_period <= 0:
            raise ValueError(f"loop_period must be > 0 seconds, got {self.loop_period}")

    def decide(
        self, state: "SafetyState", plan: RollbackPlan | None, now: float,
        serving_since: float | None = None,
    ) -> tuple[Verdict, str]:
        """``serving_since``: when ``plan.from_version`` last started serving, as observed. Only
        a start after rollbackd reverted that version is a re-deploy: a version that never
        stopped serving is a rollback that did not take, which the cooldown governs."""
        if self.policy == "notify-only":
            return "notify_only", "policy notify-only: no rollback"
        if self.policy == "freeze":
            return "freeze", "policy freeze: not reverted; escalating to a human"
        if plan is None:
            return "no_target", "no known-good version to roll back to"
        if plan.idempotency_key in state.done:
            return "duplicate", f"already handled ({plan.idempotency_key})"
        since = now - self.loop_period
        reverted_at = state.reverted.get(f"{plan.deployment}/{plan.variant}", {}).get(plan.from_version or "")
        if (
            reverted_at is not None and reverted_at > since
            and serving_since is not None and serving_since > reverted_at
        ):
            return "redeployed", (
                f"version {plan.from_version} was rolled back at {reverted_at:.3f} and is deployed "
                "again: not fighting the deployer"
            )
        last = state.last_rollback.get(plan.deployment)
        if last is not None and now - last < self.cooldown:
            return "cooldown", f"last rollback of {plan.deployment} at {last:.3f}, cooldown {self.cooldown:g}s"
        if self.max_rollbacks is not None:
            recent = [t for t in state.applied.get(plan.deployment, ()) if t > since]
            if len(recent) >= self.max_rollbacks:
                return "loop_guard", (
                    f"{len(recent)} rollbacks of {plan.deployment} within {self.loop_period:g}s "
                    f"(at most {self.max_rollbacks}): escalating instead"
                )
        if self.dry_run:
            return "dry_run", f"dry run: would set {plan.deployment}/{plan.variant} to {plan.to_version}"
        return "run", ""


@dataclass(slots=True)
class SafetyState:
    last_rollback: dict[str, float] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    applied: dict[str, list[float]] = field(default_factory=dict)  # deployment -> rollback times
    reverted: dict[str, dict[str, float]] = field(default_factory=dict)  # "dep/variant" -> {from: at}

    def record(self, plan: RollbackPlan, now: float, applied: bool) -> None:
        self.done.add(plan.idempotency_key)
        if applied:
            self.last_rollback[plan.deployment] = now
            self.applied.setdefault(plan.deployment, []).append(now)
            if plan.from_version is not None:
                self.reverted.setdefault(f"{plan.deployment}/{plan.variant}", {})[plan.from_version] = now

    def prune(self, before: float) -> None:
        """Forget rollbacks older than ``before``: the loop guard looks back one period only."""
        for dep, times in self.applied.items():
            self.applied[dep] = [t for t in times if t > before]
        for key, versions in self.reverted.items():
            self.reverted[key] = {v: t for v, t in versions.items() if t > before}

    def to_record(self) -> dict[str, Any]:
        return {
            "last_rollback": dict(sorted(self.last_rollback.items())),
            "done": sorted(self.done),
            "applied": {k: list(v) for k, v in sorted(self.applied.items())},
            "reverted": {k: dict(sorted(v.items())) for k, v in sorted(self.reverted.items())},
        }
