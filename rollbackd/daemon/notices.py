"""The words of an incident's notice: title, text, the alerts' values, where they were found.

Pure: builds the :class:`~rollbackd.actions.intents.Notify` intent the responder hands to the
executor; nothing here posts anything.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rollbackd.actions.base import AlertSummary, Notice, ResumableNotifier
from rollbackd.actions.intents import Notify
from rollbackd.daemon.splits import blamed_version, where
from rollbackd.rules.incidents import CONFIRMED, ESCALATED, Incident
from rollbackd.rules.model import severity_rank

if TYPE_CHECKING:
    from rollbackd.daemon.pipeline import Pipeline

__all__ = ["build_notice"]


def build_notice(p: "Pipeline", inc: Incident, kind: str, ts: float, reason: str, extra: str = "") -> Notify | None:
    """The intent to post the notice of ``kind`` about ``inc`` (see :func:`notice_of`), or None
    when none of its rules notifies. Numbers it (its idempotency key) and starts the incident's
    repeat clock from this decision."""
    notice = notice_of(p, inc, kind, ts, reason, extra)
    if notice is None:
        return None
    lead = inc.lead_alert()
    key = f"{inc.id}:notice:{inc.notices_sent}"
    inc.notices_sent += 1
    rec: dict[str, Any] = {
        "ts": ts,
        "kind": "action",
        "action": "notify",
        "notice": kind,
        "incident_id": inc.id,
        "deployment": inc.deployment,
        "variant": lead.variant,
        "rule": lead.rule,
        "status": "started",
        "idempotency_key": key,
    }
    p.book.noticed(inc, ts, None)  # the repeat clock runs from the decision, not the answer
    return Notify(key, notice, rec, reason)


def notice_of(p: "Pipeline", inc: Incident, kind: str, ts: float, reason: str, extra: str = "") -> Notice | None:
    """The notice of ``kind`` about ``inc``, worded from its alerts (the lead one first), or
    None when none of its rules notifies. Changes nothing."""
    if not any("notify" in a.actions for a in inc.alerts.values()):
        return None
    lead = inc.lead_alert()
    spec = p.config.deployment(inc.deployment)
    rule = p._rule_index.get(lead.rule)
    version = blamed_version(lead.measurement) or p._current_version((inc.deployment, lead.variant))
    state = "RESOLVED" if kind == "resolved" else lead.severity.upper()
    title = f"[{state}] {inc.deployment}/{lead.variant}: {lead.rule}"
    if len(inc.alerts) > 1:
        title += f" (+{len(inc.alerts) - 1} more)"
    alerts = tuple(
        AlertSummary(
            rule=a.rule,
            severity=a.severity,
            state=a.state,
            value=a.measurement.get("value"),
            threshold=a.measurement.get("threshold", math.nan),
            sample_size=a.measurement.get("sample_size", 0),
            window_start=a.window[0],
            window_end=a.window[1],
            p_value=a.measurement.get("p_value"),
            summary=a.summary,
            where=where(a.measurement),
            variant=a.variant,
        )
        for a in inc.alerts.values()
    )
    text = f"{title} — {reason}" + (f": {extra}" if extra else "")
    decided = inc.approval
    approval = "waiting" if any(w["incident_id"] == inc.id for w in p.awaiting.values()) else (
        decided["decision"] if decided else None)
    notice = Notice(
        incident_id=inc.id,
        kind=kind,  # type: ignore[arg-type]
        ts=ts,
        deployment=inc.deployment,
        variant=lead.variant,
        version=version,
        title=title,
        text=text,
        alerts=alerts,
        runbook=(rule.runbook if rule and rule.runbook else spec.runbook),
        channel=spec.slack_channel,
        thread=inc.thread,
        drill=p.edges.drill,
        approval=approval,
        approval_by=decided["by"] if decided and approval != "waiting" else None,
        acknowledged_by=inc.acknowledged_by,
        closed=not inc.is_open,
        severity=inc.severity,
        # Once escalated, every later notice of the incident is (its pages stay where they went,
        # across restarts: the incident's state is checkpointed, a notifier's memory is not).
        escalation=(reason.startswith(ESCALATED) or inc.escalated_at is not None
                    or inc.verification == "failed"),
        severities=tuple(sorted({a.severity for a in inc.alerts.values()}, key=severity_rank)),
        handled=reason.startswith(CONFIRMED),
    )
    return notice


def resume_open(notifier: object, p: "Pipeline") -> int:
    """After a restart (a checkpoint restored, a task assigned): each open incident that has
    been noticed is handed to a notifier that keeps what it sent alive (``ResumableNotifier``:
    Alertmanager), so its alerts do not expire as resolved while the incident is still open.
    Nothing is decided or recorded. Returns how many incidents were handed over."""
    if not isinstance(notifier, ResumableNotifier):
        return 0
    handed = 0
    for inc in sorted(p.book.open.values(), key=lambda i: (i.opened_at, i.id)):
        if not inc.flushed:
            continue
        notice = notice_of(p, inc, "repeat", inc.notify_at, "still open (rollbackd restarted)")
        if notice is not None:
            notifier.resume(notice)
            handed += 1
    return handed
