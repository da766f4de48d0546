"""Incidents: firing alerts grouped into one episode per group key (Alertmanager-style).

Pure and clock-free: every method takes ``now`` (event time). The book decides *what* should
happen — a notice is due, a rollback is due — and the caller carries it out and reports back.

- An incident opens when the first alert of its group fires; its id is a hash of the group
  labels and the opening time, so a replay and a restart agree on it.
- Alerts that fire while it is open join it. After ``group_wait`` the first notice lists every
  alert so far and the actions of the most severe firing rule run, once. A later, more severe
  alert escalates (its actions that have not run yet run) without a second incident.
- It resolves when all its alerts have resolved.
- After a rollback it is *verifying*: the alerts that breached must resolve by ``verify_by``.
  When they do, it is ``verified`` and then resolves; at ``verify_by`` with alerts still firing
  the verification fails and the incident escalates (it stays open until they resolve).
- Someone *acknowledges* it (Slack's Acknowledge button): no more repeat notices until it
  escalates (a more severe alert's actions run, or its verification fails); then they resume
  until it is acknowledged again. A new incident starts unacknowledged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from rollbackd.rules.model import GROUP_LABELS, GroupingSpec, RuleSpec, severity_rank

__all__ = [
    "IncidentAlert",
    "Incident",
    "NoticeDue",
    "ActionsDue",
    "IncidentChange",
    "IncidentBook",
    "incident_id",
    "ESCALATED",
    "CONFIRMED",
]

# How a notice's reason begins when it escalates to a human, and when the target system confirmed
# the rollback: routing to pagers reads these (daemon/notices.py), so every writer uses them.
ESCALATED = "escalated: "
CONFIRMED = "rollback confirmed by "

def incident_id(group: Mapping[str, str], opened_at: float) -> str:
    key = "\0".join(f"{k}={v}" for k, v in sorted(group.items())) + f"\0{opened_at:.3f}"
    return "inc-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(slots=True)
class IncidentAlert:
    alert_id: str
    rule: str
    severity: str
    deployment: str
    variant: str
    fired_at: float
    actions: tuple[str, ...]
    measurement: dict[str, Any]  # the measurement that fired it (value, threshold, ...)
    window: tuple[float, float]
    resolved_at: float | None = None
    summary: str | None = None

    @property
    def state(self) -> str:
        return "firing" if self.resolved_at is None else "resolved"

    def to_record(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "rule": self.rule,
            "severity": self.severity,
            "deployment": self.deployment,
            "variant": self.variant,
            "fired_at": self.fired_at,
            "resolved_at": self.resolved_at,
            "actions": list(self.actions),
            "measurement": self.measurement,
            "window": list(self.window),
            "summary": self.summary,
        }


@dataclass(slots=True)
class Incident:
    id: str
    group: dict[str, str]
    deployment: str
    opened_at: float
    notify_at: float  # end of group_wait
    alerts: dict[str, IncidentAlert] = field(default_factory=dict)
    resolved_at: float | None = None
    flushed: bool = False  # the first notice went out (or was due)
    acted_rank: int = -1  # severity rank whose actions have run
    actions_done: list[str] = field(default_factory=list)
    last_notice_at: float | None = None
    thread: str | None = None
    notices_sent: int = 0  # numbers each notice, for its idempotency key
    verify_by: float | None = None  # a rollback ran: its alerts must resolve by then
    verification: str | None = None  # None | "pending" | "verified" | "failed"
    # Someone took it (event time, who): repeat notices stop until it escalates again.
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    escalated_at: float | None = None  # an acknowledgement older than this is spent
    # The answer to its rollback that waited for approval: decision, by, at, timed_out.
    approval: dict[str, Any] | None = None

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None

    @property
    def firing(self) -> list[IncidentAlert]:
        return [a for a in self.alerts.values() if a.resolved_at is None]

    def lead_alert(self) -> IncidentAlert:
        """The most severe alert (firing ones first; earliest, then rule name, breaks ties)."""
        pool = self.firing or list(self.alerts.values())
        return min(pool, key=lambda a: (-severity_rank(a.severity), a.fired_at, a.rule, a.variant))

    @property
    def severity(self) -> str:
        return self.lead_alert().severity

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": dict(sorted(self.group.items())),
            "deployment": self.deployment,
            "opened_at": self.opened_at,
            "resolved_at": self.resolved_at,
            "severity": self.severity,
            "alerts": [a.to_record() for a in self.alerts.values()],
            "actions_done": list(self.actions_done),
            "thread": self.thread,
            "verify_by": self.verify_by,
            "verification": self.verification,
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at,
        }


@dataclass(frozen=True, slots=True)
class NoticeDue:
    incident: Incident
    kind: Literal["opened", "updated", "resolved", "repeat"]
    ts: float
    reason: str


@dataclass(frozen=True, slots=True)
class ActionsDue:
    """Run ``actions`` (other than notify) for ``alert``'s rule in this incident."""

    incident: Incident
    alert: IncidentAlert
    actions: tuple[str, ...]
    ts: float
    escalation: bool


@dataclass(frozen=True, slots=True)
class IncidentChange:
    incident: Incident
    change: Literal[
        "opened", "alert_joined", "alert_resolved", "resolved", "escalated", "verified",
        "verification_failed", "acknowledged",
    ]
    ts: float
    alert: IncidentAlert | None = None


Effect = NoticeDue | ActionsDue | IncidentChange


class IncidentBook:
    def __init__(self, grouping: GroupingSpec) -> None:
        bad = [g for g in grouping.group_by if g not in GROUP_LABELS]
        if bad or "deployment" not in grouping.group_by:
            raise ValueError(
                f"group_by must include 'deployment' and only use {GROUP_LABELS}, got {grouping.group_by}"
            )
        self.grouping = grouping
        self.open: dict[tuple[tuple[str, str], ...], Incident] = {}
        self.closed: list[Incident] = []

    def _group(self, rule: RuleSpec, deployment: str, variant: str) -> dict[str, str]:
        labels = {"deployment": deployment, "variant": variant, "rule": rule.name, "severity": rule.severity}
        return {k: labels[k] for k in self.grouping.group_by}

    def incident_for(self, deployment: str, variant: str) -> Incident | None:
        for inc in self.open.values():
            if inc.deployment == deployment and any(a.variant == variant for a in inc.alerts.values()):
                return inc
        return None

    def alert_fired(
        self,
        rule: RuleSpec,
        alert_id: str,
        deployment: str,
        variant: str,
        now: float,
        measurement: dict[str, Any],
        window: tuple[float, float],
    ) -> list[Effect]:
        group = self._group(rule, deployment, variant)
        key = tuple(sorted(group.items()))
        effects: list[Effect] = []
        inc = self.open.get(key)
        alert = IncidentAlert(
            alert_id, rule.name, rule.severity, deployment, variant, now,
            rule.actions, measurement, window, summary=rule.summary,
        )
        if inc is None:
            inc = Incident(
                incident_id(group, now), group, deployment, now, now + self.grouping.group_wait
            )
            self.open[key] = inc
            inc.alerts[alert_id] = alert
            effects.append(IncidentChange(inc, "opened", now, alert))
            return effects
        inc.alerts[alert_id] = alert  # a re-fired alert replaces its resolved entry
        effects.append(IncidentChange(inc, "alert_joined", now, alert))
        if inc.flushed:
            effects.append(NoticeDue(inc, "updated", now, f"alert {rule.name} joined"))
            # As severe as what has acted, or more: its actions that have not run yet run now
            # (a notify-only warning followed by a warning rule that rolls back escalates).
            if severity_rank(rule.severity) >= inc.acted_rank:
                effects.extend(self._act(inc, alert, now, escalation=True))
        return effects

    def alert_resolved(
        self, alert_id: str, deployment: str, now: float, measurement: dict[str, Any] | None = None
    ) -> list[Effect]:
        """``measurement``: the one that resolved it, so notices show the current numbers."""
        effects: list[Effect] = []
        for key, inc in list(self.open.items()):
            alert = inc.alerts.get(alert_id)
            if alert is None or alert.resolved_at is not None:
                continue
            alert.resolved_at = now
            if measurement is not None:
                alert.measurement = measurement
            effects.append(IncidentChange(inc, "alert_resolved", now, alert))
            if inc.firing:
                if inc.flushed:
                    effects.append(NoticeDue(inc, "updated", now, f"alert {alert.rule} resolved"))
                continue
            if inc.verification == "pending":
                inc.verification = "verified"
                effects.append(IncidentChange(inc, "verified", now))
                effects.append(NoticeDue(inc, "updated", now, "rollback verified"))
            inc.resolved_at = now
            del self.open[key]
            self.closed.append(inc)
            effects.append(IncidentChange(inc, "resolved", now))
            # Resolved inside group_wait: one notice says it all; no action runs.
            effects.append(NoticeDue(inc, "resolved", now, "all alerts resolved"))
            inc.flushed = True
        return effects

    def rolled_back(self, inc: Incident, now: float, verify_within: float) -> None:
        """A rollback of ``inc`` was applied at ``now``: verification starts (once; a second
        rollback of the same incident keeps the first deadline)."""
        if inc.is_open and inc.verification is None:
            inc.verification = "pending"
            inc.verify_by = now + verify_within

    def next_deadline(self) -> float | None:
        times = []
        for inc in self.open.values():
            if inc.verification == "pending" and inc.verify_by is not None:
                times.append(inc.verify_by)
            if not inc.flushed:
                times.append(inc.notify_at)
            elif inc.last_notice_at is not None and inc.acknowledged_at is None:
                times.append(inc.last_notice_at + self.grouping.repeat_interval)
        return min(times) if times else None

    def tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for inc in sorted(self.open.values(), key=lambda i: (i.opened_at, i.id)):
            if inc.verification == "pending" and inc.verify_by is not None and now >= inc.verify_by:
                inc.verification = "failed"
                self.escalated(inc, inc.verify_by)
                still = ", ".join(sorted({a.rule for a in inc.firing}))
                effects.append(IncidentChange(inc, "verification_failed", inc.verify_by))
                effects.append(NoticeDue(
                    inc, "updated", inc.verify_by,
                    f"{ESCALATED}rollback not verified, still firing after the deadline: {still}",
                ))
            if not inc.flushed and now >= inc.notify_at:
                inc.flushed = True
                effects.append(NoticeDue(inc, "opened", inc.notify_at, "incident opened"))
                # The most severe rules' actions run: with a tie in severity, each of them.
                top = severity_rank(inc.lead_alert().severity)
                for a in sorted(inc.firing, key=lambda a: (a.fired_at, a.rule, a.variant)):
                    if severity_rank(a.severity) == top:
                        effects.extend(self._act(inc, a, inc.notify_at, escalation=False))
            elif (
                inc.flushed
                and inc.acknowledged_at is None
                and inc.last_notice_at is not None
                and now >= inc.last_notice_at + self.grouping.repeat_interval
            ):
                at = inc.last_notice_at + self.grouping.repeat_interval
                effects.append(NoticeDue(inc, "repeat", at, "still open"))
        return effects

    def acknowledged(self, inc: Incident, by: str, at: float, now: float) -> list[Effect]:
        """``by`` took ``inc`` at event time ``at`` (applied at ``now``): its repeat notices
        stop. Nothing when it is closed, already acknowledged, or escalated after ``at``."""
        if not inc.is_open or inc.acknowledged_at is not None:
            return []
        if inc.escalated_at is not None and at < inc.escalated_at:
            return []
        inc.acknowledged_at, inc.acknowledged_by = at, by
        return [IncidentChange(inc, "acknowledged", now),
                NoticeDue(inc, "updated", now, f"acknowledged by {by}")]

    def escalated(self, inc: Incident, now: float) -> None:
        """``inc`` now needs a human more than before: a more severe alert's actions ran, its
        rollback was not verified or could not run. Its later notices page as escalations
        (routing reads ``escalated_at``, which a checkpoint keeps)."""
        # An acknowledgement covers what the incident was when it was given, not what it became.
        inc.escalated_at = now
        inc.acknowledged_at = inc.acknowledged_by = None

    def noticed(self, inc: Incident, at: float, thread: str | None) -> None:
        inc.last_notice_at = at
        if thread is not None:
            inc.thread = thread

    def _act(self, inc: Incident, alert: IncidentAlert, now: float, escalation: bool) -> list[Effect]:
        inc.acted_rank = max(inc.acted_rank, severity_rank(alert.severity))
        # Done-ness is per action and variant: rolling back the canary does not stand in for
        # a rollback of the primary arm that a later alert of the same incident asks for.
        todo = tuple(
            a for a in alert.actions if a != "notify" and f"{a}:{alert.variant}" not in inc.actions_done
        )
        inc.actions_done.extend(f"{a}:{alert.variant}" for a in todo)
        effects: list[Effect] = []
        if escalation and todo:
            self.escalated(inc, now)
            effects.append(IncidentChange(inc, "escalated", now, alert))
        if todo:
            effects.append(ActionsDue(inc, alert, todo, now, escalation))
        return effects
