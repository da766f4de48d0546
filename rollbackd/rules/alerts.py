"""The alert state machine: one :class:`Alert` per (rule, deployment, variant), one step per eval.

Pure: :func:`step` takes the evaluation time and returns a new :class:`Alert`; it never reads a
clock, so a replay reaches the same states as the live run. The state is a handful of
timestamps (Prometheus' ``ActiveAt``/``FiredAt``/``ResolvedAt``/``KeepFiringSince``): ``for`` and
``keep_firing_for`` are comparisons of durations, and a persisted alert resumes after a restart
without resetting a pending alert or re-firing a firing one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal, Mapping

from rollbackd.detectors.base import Measurement
from rollbackd.rules.model import RuleSpec

__all__ = ["AlertState", "Alert", "Transition", "TransitionKind", "step", "verdict", "alert_id"]


class AlertState(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


# "inactive" is a pending alert cancelled before it fired; "resolved" ends a firing one.
TransitionKind = Literal["pending", "firing", "resolved", "inactive"]


def alert_id(rule: str, deployment: str, variant: str) -> str:
    """Same labels, same id: in a replay, after a restart, on another instance."""
    return hashlib.sha256(f"{rule}\0{deployment}\0{variant}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Alert:
    """The persisted state of one rule on one deployment × variant.

    ``active_at`` is the first breaching evaluation of the current episode; ``fired_at`` and
    ``resolved_at`` belong to the latest episode (a new episode clears them);
    ``keep_firing_since`` is when a firing alert first stopped holding; ``history`` holds the
    last ``n`` breach results of a k-of-n rule (empty otherwise). ``last_eval`` is the last
    evaluation that changed the alert: one that changes nothing else returns the same alert
    (:func:`step`), so a fleet of quiet deployments costs no copy per window and a checkpoint
    re-encodes no alert that did not move. Nothing decides on it; it is kept for a reader of a
    checkpoint (when this state was last new).
    """

    rule: str
    deployment: str
    variant: str
    state: AlertState = AlertState.INACTIVE
    active_at: float | None = None
    fired_at: float | None = None
    resolved_at: float | None = None
    keep_firing_since: float | None = None
    last_eval: float | None = None
    history: tuple[bool, ...] = ()

    @property
    def id(self) -> str:
        return alert_id(self.rule, self.deployment, self.variant)

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "deployment": self.deployment,
            "variant": self.variant,
            "state": self.state.value,
            "active_at": self.active_at,
            "fired_at": self.fired_at,
            "resolved_at": self.resolved_at,
            "keep_firing_since": self.keep_firing_since,
            "last_eval": self.last_eval,
            "history": list(self.history),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Alert:
        """Inverse of :meth:`to_record`; ``id`` is derived, so a stored one is ignored."""

        def ts(key: str) -> float | None:
            value = record.get(key)
            return None if value is None else float(value)

        return cls(
            rule=record["rule"],
            deployment=record["deployment"],
            variant=record["variant"],
            state=AlertState(record.get("state", AlertState.INACTIVE)),
            active_at=ts("active_at"),
            fired_at=ts("fired_at"),
            resolved_at=ts("resolved_at"),
            keep_firing_since=ts("keep_firing_since"),
            last_eval=ts("last_eval"),
            history=tuple(bool(b) for b in record.get("history") or ()),
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """A change worth telling someone about: ``alert`` is the state after it."""

    alert: Alert
    previous: AlertState
    new: TransitionKind


def _beyond(value: float, limit: float, direction: str) -> bool:
    return value > limit if direction == "above" else value < limit


def verdict(rule: RuleSpec, m: Measurement) -> bool | None:
    """Whether ``m`` breaches ``rule``; ``None`` when it allows no verdict.

    No verdict: the detector said the data was insufficient, gave no value (or NaN, which
    only a detector bug produces and must not resolve a real incident), or measured fewer
    than ``rule.min_samples`` samples.
    """
    if m.insufficient or m.value is None or m.sample_size < rule.min_samples:
        return None
    if math.isnan(m.value):
        return None
    if not _beyond(m.value, rule.threshold, rule.direction):
        return False
    return rule.alpha is None or m.p_value is None or m.p_value < rule.alpha


def step(
    rule: RuleSpec, alert: Alert, m: Measurement, now: float
) -> tuple[Alert, Transition | None]:
    """Advance ``alert`` by one evaluation of ``rule`` at event time ``now``.

    Returns the new alert and the transition it made, if any (``None`` when the state held).
    An evaluation that would change nothing but ``last_eval`` returns ``alert`` itself.
    """
    breaching = verdict(rule, m)
    if breaching is None:
        # Neither advance nor reset: a quiet minute is not evidence the fault went away.
        return alert, None
    assert m.value is not None  # verdict() returned a bool

    history = alert.history
    if rule.n > 1:
        history = (history + (breaching,))[-rule.n :]
    elif history:
        history = ()

    if alert.state is AlertState.INACTIVE:
        active = sum(history) >= rule.k if rule.n > 1 else breaching
    else:
        # Hysteresis: once active, the alert holds until the value is back past ``clear``
        # (and p-values no longer matter), so a value hovering at the threshold cannot flap.
        active = _beyond(m.value, rule.clear, rule.direction)

    state = alert.state
    if state is AlertState.INACTIVE:
        if not active:
            return _held(alert, now, history=history), None
        if rule.for_ <= 0:
            new = _episode(alert, now, history, AlertState.FIRING, fired_at=now)
            return new, Transition(new, state, "firing")
        new = _episode(alert, now, history, AlertState.PENDING, fired_at=None)
        return new, Transition(new, state, "pending")

    if state is AlertState.PENDING:
        if not active:
            # The k-of-n history ends with the episode: stale breaches must not reopen it.
            new = replace(
                alert, state=AlertState.INACTIVE, active_at=None, last_eval=now, history=()
            )
            return new, Transition(new, state, "inactive")
        active_at = now if alert.active_at is None else alert.active_at
        if now - active_at >= rule.for_:
            new = replace(
                alert,
                state=AlertState.FIRING,
                active_at=active_at,
                fired_at=now,
                last_eval=now,
                history=history,
            )
            return new, Transition(new, state, "firing")
        return _held(alert, now, active_at=active_at, history=history), None

    # FIRING: never re-fires; it holds, keeps firing for a while, or resolves.
    if active:
        return _held(alert, now, keep_firing_since=None, history=history), None
    since = alert.keep_firing_since
    if rule.keep_firing_for > 0 and (since is None or now - since < rule.keep_firing_for):
        return _held(alert, now, keep_firing_since=now if since is None else since, history=history), None
    new = replace(
        alert,
        state=AlertState.INACTIVE,
        active_at=None,
        resolved_at=now,
        keep_firing_since=None,
        last_eval=now,
        history=(),
    )
    return new, Transition(new, state, "resolved")


def _held(alert: Alert, now: float, **fields: Any) -> Alert:
    """``alert`` with ``fields`` (and ``last_eval`` = ``now``) when one of them differs, else
    ``alert`` itself: an evaluation that moves nothing makes no new alert."""
    if all(getattr(alert, name) == value for name, value in fields.items()):
        return alert
    return replace(alert, last_eval=now, **fields)


def _episode(
    alert: Alert, now: float, history: tuple[bool, ...], state: AlertState, fired_at: float | None
) -> Alert:
    """The first active evaluation of a new episode: the previous episode's timestamps go."""
    return replace(
        alert,
        state=state,
        active_at=now,
        fired_at=fired_at,
        resolved_at=None,
        keep_firing_since=None,
        last_eval=now,
        history=history,
    )
