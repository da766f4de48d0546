"""The default rollback backend: says what it would do, in the log, and does nothing else."""

from __future__ import annotations

import threading

import structlog

from rollbackd.actions.base import ActionResult, RollbackPlan

__all__ = ["LogBackend"]

log = structlog.get_logger("rollbackd.actions.log")


class LogBackend:
    """Records each plan once (``applied``) and logs ``rollback.logged``; repeats are skipped."""

    def __init__(self) -> None:
        self.applied: list[RollbackPlan] = []
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def apply(self, plan: RollbackPlan) -> ActionResult:
        key = plan.idempotency_key
        with self._lock:
            repeat = key in self._keys
            if not repeat:
                self._keys.add(key)
                self.applied.append(plan)
        if repeat:
            return ActionResult("skipped", "already applied", attempts=0)
        log.info(
            "rollback.logged",
            deployment=plan.deployment,
            variant=plan.variant,
            incident=plan.incident_id,
            from_version=plan.from_version,
            to_version=plan.to_version,
            idempotency_key=key,
        )
        return ActionResult("succeeded", f"logged: set {plan.deployment}/{plan.variant} to {plan.to_version}")
