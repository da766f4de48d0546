"""A digest of the incidents of a period, posted on a cron schedule (``settings.notifier.digest``).

Two parts: :func:`summarize_incidents` and :func:`build_digest` are pure (ledger rows and a
time range in, a :class:`Notice` out); :class:`DigestScheduler` runs them on APScheduler 3's
``BackgroundScheduler`` in the live daemon (``rollbackd run``). A digest is a wall-clock job:
it reports decisions, it never takes part in them, so detection never runs on this scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Callable, Iterable, Mapping
from zoneinfo import ZoneInfo

import structlog

from rollbackd.actions.base import ActionResult, Notice, Notifier
from rollbackd.rules.model import SEVERITIES, DigestSpec, severity_rank

__all__ = ["DigestIncident", "summarize_incidents", "build_digest", "DigestScheduler"]

log = structlog.get_logger("rollbackd.actions.digest")

DAY = 86400.0
Rows = Iterable[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class DigestIncident:
    """One incident as the digest shows it, as it stood at the end of the period."""

    incident_id: str
    deployment: str
    variant: str
    severity: str
    rules: tuple[str, ...]
    opened_at: float | None
    state: str  # the last change before the end: opened, alert_joined, ..., resolved
    changed_at: float
    rollbacks: tuple[str, ...] = ()  # in the period: "2 → 1 succeeded", in order

    @property
    def is_open(self) -> bool:
        return self.state != "resolved"


def summarize_incidents(incident_rows: Rows, action_rows: Rows, start: float, end: float) -> list[DigestIncident]:
    """The incidents of ``[start, end)`` from ledger rows (``incidents`` and finished ``actions``
    rows): those with a change in the period, and those opened before it that are still open at
    its end, with the rollbacks that finished in the period. Ordered by opening time."""
    changes: dict[str, list[Mapping[str, Any]]] = {}
    for row in incident_rows:
        if row["ts"] < end:
            changes.setdefault(row["incident_id"], []).append(row)
    rollbacks: dict[str, list[str]] = {}
    for row in sorted(action_rows, key=lambda r: r["ts"]):
        if row.get("action") == "rollback" and start <= row["ts"] < end and row.get("status") != "pending_approval":
            rollbacks.setdefault(row["incident_id"], []).append(
                f"{row.get('from_version')} → {row.get('to_version')} {row.get('status')}"
            )
    out = []
    for inc_id, rows in changes.items():
        rows = sorted(rows, key=lambda r: r["ts"])
        last = rows[-1]
        if last["ts"] < start and last["change"] == "resolved":
            continue  # over before the period began
        opened = [r["ts"] for r in rows if r["change"] == "opened"]
        rules = tuple(dict.fromkeys(r["rule"] for r in rows if r.get("rule")))
        out.append(DigestIncident(
            incident_id=inc_id, deployment=rows[0]["deployment"], variant=rows[0].get("variant") or "*",
            severity=max((r["severity"] for r in rows if r.get("severity") in SEVERITIES),
                         key=severity_rank, default="-"),
            rules=rules,
            opened_at=opened[0] if opened else None, state=last["change"], changed_at=last["ts"],
            rollbacks=tuple(rollbacks.get(inc_id, ())),
        ))
    return sorted(out, key=lambda i: (i.opened_at if i.opened_at is not None else i.changed_at, i.incident_id))


def _local(ts: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M")


def build_digest(incidents: Iterable[DigestIncident], start: float, end: float, tz: tzinfo) -> Notice:
    """The digest notice: a summary line, then one line per incident (times in ``tz``)."""
    items = list(incidents)
    tz_name = getattr(tz, "key", None) or str(tz)
    still_open = sum(1 for i in items if i.is_open)
    outcomes = [r.rsplit(" ", 1)[1] for i in items for r in i.rollbacks]
    counts = ", ".join(f"{outcomes.count(s)} {s}" for s in dict.fromkeys(sorted(outcomes)))
    title = f"rollbackd digest {_local(start, tz)} – {_local(end, tz)} {tz_name}: {len(items)} incident(s)"
    summary = f"{len(items)} incident(s), {still_open} still open; {len(outcomes)} rollback(s)"
    if counts:
        summary += f" ({counts})"
    lines = [summary if items else "No incidents."]
    for i in items:
        rules = i.rules[0] + (f" (+{len(i.rules) - 1})" if len(i.rules) > 1 else "") if i.rules else "-"
        when = f"opened {_local(i.opened_at, tz)}" if i.opened_at is not None else "opened earlier"
        state = "still open" if i.is_open else "resolved"
        line = (f"• {i.incident_id} {i.deployment}/{i.variant} {i.severity} {rules}: {when}, "
                f"{state} (last: {i.state} {_local(i.changed_at, tz)})")
        if i.rollbacks:
            line += "; rollback " + ", ".join(i.rollbacks)
        lines.append(line)
    return Notice(
        incident_id=f"digest-{datetime.fromtimestamp(end, tz):%Y-%m-%dT%H%M}", kind="digest", ts=end,
        deployment="*", variant="*", version=None, title=title, text="\n".join(lines),
    )


class DigestScheduler:
    """Posts the digest at each time ``spec.cron`` names in ``spec.timezone``, from a background
    thread. The period is from the previous digest (the first: a day back) to the firing time.

    ``read(start, end)`` returns ``(incident_rows, action_rows)`` from the ledger, opening its
    own connection (it runs on the scheduler's thread); ``now`` is the wall clock; ``trigger``
    replaces the cron trigger (tests fire every second). With ``deliver`` (the live daemon's
    ``post_from_thread``), the notice is handed to the daemon's executor, which posts it like
    every other notice (outbox, ledger rows) and reports the result back; without it, the
    digest posts through ``notifier`` itself.
    """

    def __init__(
        self,
        spec: DigestSpec,
        notifier: Notifier,
        read: Callable[[float, float], tuple[Rows, Rows]],
        now: Callable[[], float],
        trigger: Any = None,
        deliver: Callable[[Notice, Callable[[ActionResult], None]], None] | None = None,
    ) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        self.spec = spec
        self.tz = ZoneInfo(spec.timezone)
        self.notifier = notifier
        self.deliver = deliver
        self.read = read
        self.now = now
        self.trigger = trigger if trigger is not None else CronTrigger.from_crontab(spec.cron, timezone=self.tz)
        self.scheduler = BackgroundScheduler(timezone=self.tz)
        self.last: float | None = None

    def start(self) -> None:
        # One digest at a time; after a stall, one digest for everything missed, not several.
        self.scheduler.add_job(self._fire, self.trigger, id="digest", max_instances=1, coalesce=True,
                               misfire_grace_time=3600)
        self.scheduler.start()
        log.info("digest.scheduled", cron=self.spec.cron, timezone=self.spec.timezone)

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _fire(self) -> None:
        self.post(self.now())

    def post(self, end: float) -> ActionResult | None:
        """Build and post the digest of the period ending at ``end``; never raises. Returns the
        result, or None when the notice was handed to ``deliver`` (the result comes later)."""
        start = self.last if self.last is not None else end - DAY
        try:
            incident_rows, action_rows = self.read(start, end)
            notice = build_digest(summarize_incidents(incident_rows, action_rows, start, end), start, end, self.tz)
            if self.deliver is not None:
                self.deliver(notice, lambda result: self._posted(start, end, result))
                return None
            result = self.notifier.post(notice)
        except Exception as exc:  # a digest is a courtesy: it never takes the daemon down
            result = ActionResult("failed", f"{type(exc).__name__}: {exc}")
        self._posted(start, end, result)
        return result

    def _posted(self, start: float, end: float, result: ActionResult) -> None:
        (log.info if result.status != "failed" else log.warning)(
            "digest.posted", outcome=result.status, detail=result.detail, start=start, end=end
        )
        if result.status != "failed":  # a failed one: the next digest covers this period too
            self.last = end
