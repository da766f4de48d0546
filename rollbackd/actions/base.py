"""The edges that act: rollback backends and notifiers, one small protocol each.

Actions are declarative ("set deployment D, variant V to version X"), so running the same
plan twice is harmless: backends must treat a repeated ``idempotency_key`` as a no-op.
Backends and notifiers are chosen by name from the config through :func:`make_backend`
and :func:`make_notifier`; each kind has a null version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, runtime_checkable

__all__ = [
    "RollbackPlan",
    "ActionResult",
    "AlertSummary",
    "Notice",
    "Verification",
    "RollbackBackend",
    "ObservableBackend",
    "PausableBackend",
    "ConfiguredObservable",
    "observes",
    "current_version",
    "verify_plan",
    "pause_rollout",
    "Notifier",
    "ResumableNotifier",
    "ClosableNotifier",
    "NullNotifier",
]

Status = Literal["succeeded", "failed", "skipped", "dry_run"]
# What the target system said after a rollback was applied: it reports the target
# (``confirmed``), it never did within the bound (``unconfirmed``), or the backend has no way to
# read the system back (``cannot_observe``: not a failure).
Verdict = Literal["confirmed", "unconfirmed", "cannot_observe"]


@dataclass(frozen=True, slots=True)
class RollbackPlan:
    """Set ``deployment``/``variant`` to ``to_version``. ``idempotency_key`` names the intent."""

    deployment: str
    variant: str
    from_version: str | None
    to_version: str
    incident_id: str
    reason: str

    @property
    def idempotency_key(self) -> str:
        return f"{self.incident_id}:rollback:{self.variant}:{self.to_version}"

    def to_record(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "variant": self.variant,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "incident_id": self.incident_id,
            "reason": self.reason,
            "idempotency_key": self.idempotency_key,
        }


@dataclass(frozen=True, slots=True)
class Verification:
    """A rollback checked against the system it changed, after ``apply`` answered.

    ``observed`` is the version (or state) the backend last read, ``polls`` how many reads it
    took and ``elapsed`` how long (seconds, processing time: it schedules, it decides nothing)."""

    verdict: Verdict
    backend: str
    expected: str
    observed: str | None = None
    polls: int = 0
    elapsed: float = 0.0
    detail: str = ""

    @property
    def observes(self) -> bool:
        return self.verdict != "cannot_observe"

    def describe(self) -> str:
        """One line for a notice or a log: what was seen against what was wanted."""
        if self.verdict == "cannot_observe":
            return f"cannot observe: {self.detail}"
        seen = f"observed {self.observed}, expected {self.expected}"
        took = f"{self.polls} poll{'s' if self.polls != 1 else ''} in {self.elapsed:.0f}s"
        return f"{seen} ({self.detail}; {took})" if self.detail else f"{seen} ({took})"

    def to_record(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "backend": self.backend, "expected": self.expected,
            "observed": self.observed, "polls": self.polls, "elapsed": round(self.elapsed, 3),
            "detail": self.detail,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Verification":
        return cls(
            rec["verdict"], str(rec.get("backend", "")), str(rec.get("expected", "")),
            None if rec.get("observed") is None else str(rec["observed"]),
            int(rec.get("polls") or 0), float(rec.get("elapsed") or 0.0), str(rec.get("detail") or ""),
        )


@dataclass(frozen=True, slots=True)
class ActionResult:
    status: Status
    detail: str = ""
    attempts: int = 1
    # Notifiers return the thread reference (Slack: the parent message ``ts``) here.
    thread: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    # A rollback's check against its target, made by the executor after ``apply`` answered.
    verification: Verification | None = None


@dataclass(frozen=True, slots=True)
class AlertSummary:
    """One alert inside an incident, as a notice shows it."""

    rule: str
    severity: str
    state: str  # pending | firing | resolved | inhibited | silenced
    value: float | None
    threshold: float
    sample_size: int
    window_start: float
    window_end: float
    p_value: float | None = None
    summary: str | None = None
    # Where the value was found when not in the whole window: "in region=eu-west (others
    # 0.004)", "in version 8 (window served 7, 8)".
    where: str | None = None
    variant: str | None = None  # the alert's own (an incident may group several variants)


@dataclass(frozen=True, slots=True)
class Notice:
    """One message about an incident. ``thread`` is ``None`` for the incident's first notice."""

    incident_id: str
    kind: Literal["opened", "updated", "action", "resolved", "repeat", "digest"]
    ts: float  # event time it refers to (Unix seconds)
    deployment: str
    variant: str
    version: str | None
    title: str
    text: str
    alerts: tuple[AlertSummary, ...] = ()
    runbook: str | None = None
    channel: str | None = None
    thread: str | None = None
    drill: bool = False
    # A rollback of the incident that needs an approver: "waiting" while it waits (only then
    # may it be approved or rejected), then the answer, "approve" or "reject", and who gave
    # it (None: nobody answered in time and the configured default applied).
    approval: str | None = None
    approval_by: str | None = None
    acknowledged_by: str | None = None  # who took the incident (its repeat notices stopped)
    closed: bool = False  # the incident has resolved: a late reply puts no buttons back on its parent
    # The incident's severity (None for a notice about rollbackd itself or a digest), every
    # severity it has had (least severe first), and whether it has escalated to a human (this
    # notice or an earlier one): what routing to several notifiers reads, so an incident's later
    # notices, its resolution included, reach every route an earlier one reached.
    severity: str | None = None
    escalation: bool = False
    severities: tuple[str, ...] = ()
    # The target system confirmed the rollback: a pager may acknowledge the incident.
    handled: bool = False
    # The notice's idempotency key (the outbox key), set by delivery as it goes out: a
    # receiver dedupes a notice posted again after a crash on it.
    key: str | None = None


class RollbackBackend(Protocol):
    """Moves a deployment to a version. Must be idempotent per ``plan.idempotency_key``.

    ``apply`` is the whole required protocol. Backends that can also *read* the system they
    act on implement :class:`ObservableBackend` as well, and those that can stop a rollout
    :class:`PausableBackend`; callers test for them with ``isinstance``.
    """

    def apply(self, plan: RollbackPlan) -> ActionResult: ...


@runtime_checkable
class ObservableBackend(Protocol):
    """The optional read-back half of the backend protocol: read the current version, verify a
    plan. The executor polls ``verify`` after each applied rollback (``actions/verification.py``).

    ``current(deployment, variant)`` is the version the target system serves now, or ``None``
    when it cannot tell. ``verify(plan)`` checks, once and without waiting, that the system
    reflects the plan: ``succeeded`` when it does, ``failed`` (``data["pending"]`` true when a
    rollout is still converging; ``data["current"]`` the version seen, where there is one) when
    not, ``skipped`` when this instance cannot check (a ``command`` without ``current_argv``).
    Neither method changes anything.
    """

    def current(self, deployment: str, variant: str) -> str | None: ...

    def verify(self, plan: RollbackPlan) -> ActionResult: ...


@runtime_checkable
class ConfiguredObservable(Protocol):
    """An :class:`ObservableBackend` whose read-back depends on how it is configured (a
    ``command`` without ``current_argv`` has none): ``observes`` says whether this one has it."""

    @property
    def observes(self) -> bool: ...


def observes(backend: RollbackBackend) -> bool:
    """Whether ``backend`` can read back the system it changes (so a rollback through it is
    confirmed against its target)."""
    if not isinstance(backend, ObservableBackend):
        return False
    return backend.observes if isinstance(backend, ConfiguredObservable) else True


@runtime_checkable
class PausableBackend(Protocol):
    """The optional freeze half: stop a rollout in progress where it stands, reverting nothing
    (the ``freeze`` policy). ``succeeded`` when it paused it now, ``skipped`` when there was
    nothing to do, ``failed`` when the call failed; ``data["paused"]`` says whether the rollout
    is paused afterwards."""

    def pause(self, deployment: str, variant: str, incident_id: str) -> ActionResult: ...


def current_version(backend: RollbackBackend, deployment: str, variant: str) -> str | None:
    """``backend.current(...)`` if the backend can read back, else ``None``."""
    return backend.current(deployment, variant) if isinstance(backend, ObservableBackend) else None


def verify_plan(backend: RollbackBackend, plan: RollbackPlan) -> ActionResult:
    """``backend.verify(plan)`` if the backend can read back, else ``skipped``."""
    if not isinstance(backend, ObservableBackend):
        return ActionResult("skipped", f"{type(backend).__name__} cannot read back", attempts=0)
    return backend.verify(plan)


def pause_rollout(backend: RollbackBackend, deployment: str, variant: str, incident_id: str) -> ActionResult | None:
    """``backend.pause(...)``, or ``None`` when the backend has no way to pause a rollout."""
    return backend.pause(deployment, variant, incident_id) if isinstance(backend, PausableBackend) else None


class Notifier(Protocol):
    """Posts a notice; returns the thread reference to pass with the incident's next notices."""

    def post(self, notice: Notice) -> ActionResult: ...


@runtime_checkable
class ClosableNotifier(Protocol):
    """A notifier with work of its own to stop when the daemon stops (Alertmanager's
    re-sending thread)."""

    def post(self, notice: Notice) -> ActionResult: ...

    def close(self) -> None: ...


@runtime_checkable
class ResumableNotifier(Protocol):
    """A notifier that keeps what it sent alive (Alertmanager's alerts expire unless re-sent):
    after a restart it is handed each open incident's state with ``resume``, posts nothing then,
    and goes on keeping it alive as if this process had sent it."""

    def post(self, notice: Notice) -> ActionResult: ...

    def resume(self, notice: Notice) -> None: ...


class NullNotifier:
    """Says nothing (``notifier: none``)."""

    def post(self, notice: Notice) -> ActionResult:
        return ActionResult("skipped", "notifier disabled", thread=notice.thread or notice.incident_id)
