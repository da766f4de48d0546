"""What a paging service (PagerDuty, Opsgenie) is told about an incident's notice, and under
which key: the part the two share, with no HTTP in it.

One incident is one page, under a key stable across retries, restarts and instances (the
incident id is a hash of its labels): ``rollbackd:<incident>``, ``rollbackd:drill:<incident>``
in a drill (so a drill never touches the page of a real incident with the same labels). An
escalation ("escalated: rollback not verified", a freeze, no target) is a page of its own,
``<key>:escalation``: a trigger under the first key would be folded into a page that is already
acknowledged (the rollback was confirmed) or was never sent (only escalations page), and would
wake nobody. Once an incident escalated, all its later notices go to the escalation key
(``Notice.escalation`` stays true). A resolved incident resolves both.

- ``trigger``: the incident's notices (opened, updated, repeat), under the escalation key once
  it escalated;
- ``acknowledge``: the rollback was confirmed by the target system (rollbackd has it in hand;
  the page stays open until the alerts resolve);
- ``resolve``: the incident resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rollbackd.actions.base import AlertSummary, Notice
from rollbackd.actions.console import fmt_number, utc_iso

__all__ = ["PageStep", "PageKeys", "incident_key", "describe_notice", "alert_line"]

PageAction = Literal["trigger", "acknowledge", "resolve"]


@dataclass(frozen=True, slots=True)
class PageStep:
    action: PageAction
    key: str


def incident_key(notice: Notice) -> str:
    return f"rollbackd:{'drill:' if notice.drill else ''}{notice.incident_id}"


class PageKeys:
    """Which steps a notice is. Nothing is remembered: a notice says whether its incident has
    escalated (``Notice.escalation``, from the incident's checkpointed state), so the keys are
    the same before and after a restart. A resolution resolves the first key, and the
    escalation's too when the incident escalated; resolving a key that was never triggered (an
    incident paged only by its escalation) is harmless at both services."""

    def steps(self, notice: Notice) -> list[PageStep]:
        base = incident_key(notice)
        escalation = base + ":escalation"
        if notice.kind == "resolved":
            return [PageStep("resolve", k) for k in ([base, escalation] if notice.escalation else [base])]
        key = escalation if notice.escalation else base
        if notice.handled and not notice.escalation:
            return [PageStep("acknowledge", key)]
        return [PageStep("trigger", key)]


def alert_line(a: AlertSummary) -> str:
    where = f" {a.where}" if a.where else ""
    line = (f"{a.rule} ({a.severity}, {a.state}): value {fmt_number(a.value)}{where} vs threshold "
            f"{fmt_number(a.threshold)}, n={a.sample_size}, window {utc_iso(a.window_start)}–{utc_iso(a.window_end)}")
    if a.p_value is not None:
        line += f", p={fmt_number(a.p_value, 3)}"
    return line + (f"\n  {a.summary}" if a.summary else "")


def describe_notice(notice: Notice) -> str:
    """The notice as plain text: its text, then one line per alert."""
    lines = [("[DRILL] " if notice.drill else "") + (notice.text or notice.title)]
    lines.extend(alert_line(a) for a in notice.alerts)
    if notice.runbook:
        lines.append(f"Runbook: {notice.runbook}")
    return "\n".join(lines)


def title_of(notice: Notice) -> str:
    return ("[DRILL] " if notice.drill else "") + notice.title


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
