"""A rollback checked against the system it changed: poll the backend until it reports the target.

A backend's ``apply`` answering "succeeded" says the request was accepted, not that the system
serves the target: a registry behind a proxy, a rollout that never converges, a second writer
that puts the old weights back. So once a rollback has been applied, the engine decides a
:class:`~rollbackd.actions.intents.Confirm` call of its own, and the executor asks the backend
itself (:class:`~rollbackd.actions.base.ObservableBackend` ``verify``) until it reports the
target or the bound (the deployment's ``verify_within``) has passed. The check runs in the
deployment's act lane (a worker live, the caller in a replay), never on the processing thread,
and after the rollback's own outcome was recorded and said: the engine only sees its result, a
:class:`~rollbackd.actions.base.Verification`, and escalates an ``unconfirmed`` one. The event
stream's own verdict (the alerts resolving within ``verify_within``) stays a second,
independent check.

A backend that cannot read back (``log``, ``webhook``, a ``command`` without ``current_argv``)
gets no check at all: no call, no wait, no escalation (:func:`~rollbackd.actions.base.observes`).

A daemon that stops mid-check (:meth:`Confirmer.stop`) ends the wait between two looks at
once; the check gives no verdict and stays in flight, and resumes after the restart.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import structlog

from rollbackd.actions.base import (
    ActionResult,
    ConfiguredObservable,
    ObservableBackend,
    RollbackBackend,
    RollbackPlan,
    Verification,
    observes,
)

__all__ = ["PollPolicy", "Confirmer", "unobserved"]

log = structlog.get_logger("rollbackd.actions.verification")


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """How often to ask: ``first`` seconds after the first look, then ``multiplier`` times longer
    each time, at most ``max_interval``; the last look is at the bound itself."""

    first: float = 1.0
    multiplier: float = 2.0
    max_interval: float = 30.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.first) and self.first > 0):
            raise ValueError(f"first must be in (0, inf) seconds, got {self.first}")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1.0):
            raise ValueError(f"multiplier must be in [1, inf), got {self.multiplier}")
        if not (math.isfinite(self.max_interval) and self.max_interval >= self.first):
            raise ValueError(f"max_interval must be in [first={self.first}, inf) seconds, got {self.max_interval}")

    def interval(self, n: int) -> float:
        """The pause after the ``n``-th look (``n >= 1``)."""
        if self.multiplier > 1 and (n - 1) * math.log(self.multiplier) > math.log(self.max_interval / self.first):
            return self.max_interval
        return min(self.max_interval, self.first * self.multiplier ** (n - 1))


def _look(backend: ObservableBackend, plan: RollbackPlan) -> ActionResult:
    try:
        return backend.verify(plan)
    except Exception as exc:  # a read that breaks is a look that saw nothing, not a crash
        return ActionResult("failed", f"{type(exc).__name__}: {exc}", attempts=0)


def _observed(backend: ObservableBackend, plan: RollbackPlan, look: ActionResult) -> str | None:
    """The version the last look saw: the one ``verify`` reported, else ``current()``'s."""
    if "current" in look.data:
        seen = look.data["current"]
        return None if seen is None else str(seen)
    try:
        return backend.current(plan.deployment, plan.variant)
    except Exception:  # the verdict stands on verify's answer; the version is only a detail
        return None


def unobserved(backend: RollbackBackend, plan: RollbackPlan, name: str) -> Verification | None:
    """The ``cannot_observe`` verdict on a rollback through a backend without read-back (kept
    in the ledger beside the rollback), or ``None`` when the backend can read back: then the
    engine decides a check of its own."""
    if observes(backend):
        return None
    configured = isinstance(backend, ConfiguredObservable)
    return Verification("cannot_observe", name, plan.to_version,
                        detail=f"{name} backend has no read-back{' configured' if configured else ''}")


class Confirmer:
    """Polls a backend's ``verify`` after an applied rollback; time is injected (``sleep``,
    ``monotonic``), so tests run the whole bound without waiting for it. The default ``sleep``
    waits on the stop event, so :meth:`stop` cuts a pause short."""

    def __init__(
        self,
        policy: PollPolicy = PollPolicy(),
        *,
        sleep: Callable[[float], object] | None = None,
        monotonic: Callable[[], float] = time.monotonic,  # durations only: nothing is decided on it
    ) -> None:
        self.policy = policy
        self.stopping = threading.Event()
        self.sleep = sleep if sleep is not None else self.stopping.wait
        self.monotonic = monotonic

    def stop(self) -> None:
        """End every check in progress (and any started later) at its next pause, without a
        verdict: the daemon is stopping, and the check resumes after the restart."""
        self.stopping.set()

    def confirm(self, backend: RollbackBackend, plan: RollbackPlan, within: float, name: str) -> Verification | None:
        """Ask ``backend`` until it reports ``plan.to_version`` or ``within`` seconds have
        passed; ``name`` (the backend's type) goes into the record and the notice. ``None``
        when :meth:`stop` ended it before a verdict. Never raises."""
        if not isinstance(backend, ObservableBackend):
            return Verification("cannot_observe", name, plan.to_version,
                                detail=f"{name} backend has no read-back")
        bound = log.bind(deployment=plan.deployment, variant=plan.variant, incident=plan.incident_id,
                         to_version=plan.to_version, backend=name)
        start = self.monotonic()
        polls = 0
        while True:
            polls += 1
            look = _look(backend, plan)
            elapsed = self.monotonic() - start
            if look.status == "skipped":
                return Verification("cannot_observe", name, plan.to_version, polls=polls, elapsed=elapsed,
                                    detail=look.detail or f"{name} backend cannot check")
            if look.status == "succeeded":
                seen = look.data.get("current")
                bound.info("rollback.confirmed", polls=polls, elapsed=round(elapsed, 3))
                return Verification("confirmed", name, plan.to_version,
                                    observed=plan.to_version if seen is None else str(seen),
                                    polls=polls, elapsed=elapsed, detail=look.detail)
            left = within - elapsed
            if left <= 0:
                observed = _observed(backend, plan, look)
                bound.error("rollback.unconfirmed", polls=polls, elapsed=round(elapsed, 3), observed=observed,
                            detail=look.detail)
                return Verification("unconfirmed", name, plan.to_version, observed=observed, polls=polls,
                                    elapsed=elapsed, detail=look.detail)
            pause = min(self.policy.interval(polls), left)
            bound.debug("rollback.confirming", polls=polls, detail=look.detail, next_in=pause)
            self.sleep(pause)
            if self.stopping.is_set():
                bound.info("rollback.confirm_interrupted", polls=polls, elapsed=round(elapsed, 3))
                return None
