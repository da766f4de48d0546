"""Alertmanager notices through its API v2 (``POST /api/v2/alerts``), so its routing, grouping,
inhibition, silences and receivers page the on-call.

Each alert of an incident is one Alertmanager alert, identified by its labels ``alertname``
(the rule), ``rule``, ``deployment``, ``variant``, ``severity``, ``incident``,
``source="rollbackd"`` (and ``drill="true"`` in a drill, so a drill never resolves a real
alert); an escalation adds an ``alertname="RollbackdEscalation"`` alert (``severity`` critical)
that an Alertmanager route can send to the pager. Annotations carry ``summary``,
``description`` and ``runbook_url``. ``startsAt`` is the notice's event time.

Alertmanager expects a client to re-send an active alert (Prometheus does every minute, with
``endsAt`` four resend intervals ahead): an alert not heard of by its ``endsAt`` (or, without
one, for ``resolve_timeout``) is resolved. So firing alerts are sent with
``endsAt = now + 4 × resend_interval`` and re-sent every ``resend_interval`` by a background
thread while their incident is open: should rollbackd stop, they resolve by themselves within
four intervals. When the incident resolves they are sent with ``endsAt = now`` (resolved) and
no longer re-sent. ``resend_interval: 0`` sends no ``endsAt`` and never re-sends: Alertmanager's
``resolve_timeout`` (5m by default) then ends every alert unless a repeat notice comes sooner.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import structlog

from rollbackd.actions.base import ActionResult, AlertSummary, Notice
from rollbackd.actions.paging import alert_line, clip, title_of
from rollbackd.actions.posting import JsonEndpoint, check_url, encode_json
from rollbackd.actions.retry import RetryPolicy

__all__ = ["AlertmanagerNotifier", "ESCALATION_ALERT", "rfc3339"]

ESCALATION_ALERT = "RollbackdEscalation"
_FIRING = ("firing",)

log = structlog.get_logger("rollbackd.actions.alertmanager")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class AlertmanagerNotifier:
    """Posts an incident's alerts to Alertmanager and keeps the firing ones fresh; never raises
    from ``post``. ``now`` is the wall clock (``endsAt`` is Alertmanager's processing time)."""

    def __init__(
        self,
        url: str,
        *,
        now: Callable[[], float],
        resend_interval: float = 60.0,
        labels: Mapping[str, str] | None = None,
        generator_url: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if resend_interval < 0:
            raise ValueError(f"resend_interval must be in [0, inf) seconds, got {resend_interval}")
        self.url = check_url("alertmanager notifier", url) + "/api/v2/alerts"
        self.now = now
        self.resend_interval = float(resend_interval)
        self.labels = dict(labels or {})
        self.generator_url = generator_url
        self.endpoint = JsonEndpoint(dict(headers or {}), timeout=timeout, policy=policy, sleep=sleep)
        # incident -> alert identity -> the alert as last sent (startsAt kept from its first send)
        self._firing: dict[str, dict[tuple[tuple[str, str], ...], dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # re-send now (resumed alerts), not at the next interval
        self._thread: threading.Thread | None = None

    # What is sent -------------------------------------------------------------------------
    def _labels(self, notice: Notice, **own: str) -> dict[str, str]:
        labels = {**self.labels, **own, "deployment": notice.deployment, "incident": notice.incident_id,
                  "source": "rollbackd"}
        if notice.drill:
            labels["drill"] = "true"
        return labels

    def _alert(self, notice: Notice, a: AlertSummary) -> dict[str, Any]:
        labels = self._labels(notice, alertname=a.rule, rule=a.rule, severity=a.severity,
                              variant=a.variant or notice.variant)
        annotations = {
            "summary": clip(a.summary or title_of(notice), 1000),
            "description": clip(f"{alert_line(a)}\n{('[DRILL] ' if notice.drill else '') + notice.text}", 8000),
        }
        return self._finish(notice, labels, annotations)

    def _escalation(self, notice: Notice) -> dict[str, Any]:
        labels = self._labels(notice, alertname=ESCALATION_ALERT, severity="critical", variant=notice.variant)
        annotations = {"summary": clip(title_of(notice) + " — escalated", 1000),
                       "description": clip(notice.text, 8000)}
        return self._finish(notice, labels, annotations)

    def _finish(self, notice: Notice, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
        if notice.runbook:
            annotations["runbook_url"] = notice.runbook
        alert: dict[str, Any] = {"labels": labels, "annotations": annotations, "startsAt": notice.ts}
        if self.generator_url:
            alert["generatorURL"] = self.generator_url
        return alert

    def _wire(self, alert: Mapping[str, Any], ends: float | None) -> dict[str, Any]:
        """The alert as Alertmanager reads it: RFC 3339 times, ``endsAt`` never before
        ``startsAt`` (a live notice's event time may be a little ahead of this clock)."""
        out = {k: v for k, v in alert.items() if k != "startsAt"}
        out["startsAt"] = rfc3339(alert["startsAt"])
        if ends is not None:
            out["endsAt"] = rfc3339(max(ends, alert["startsAt"]))
        return out

    # Posting ------------------------------------------------------------------------------
    def post(self, notice: Notice) -> ActionResult:
        now = self.now()
        hold = now + 4 * self.resend_interval if self.resend_interval else None
        with self._lock:
            known = self._firing.setdefault(notice.incident_id, {})
            escalated = notice.escalation  # once escalated, every later notice of the incident is
            firing: list[dict[str, Any]] = []
            resolved: list[dict[str, Any]] = []
            current = [self._alert(notice, a) for a in notice.alerts]
            states = [a.state for a in notice.alerts]
            if escalated:
                current.append(self._escalation(notice))
                states.append("firing")
            for alert, state in zip(current, states):
                key = _key(alert["labels"])
                first = known.get(key)
                if first is not None:  # keep when it started
                    alert["startsAt"] = min(first["startsAt"], alert["startsAt"])
                if notice.kind != "resolved" and state in _FIRING:
                    known[key] = alert
                    firing.append(alert)
                else:
                    known.pop(key, None)
                    resolved.append(alert)
            if notice.kind == "resolved":  # whatever was sent for it before ends too
                resolved.extend(known.values())
                del self._firing[notice.incident_id]
        body = [self._wire(a, hold) for a in firing] + [self._wire(a, now) for a in resolved]
        if not body:
            return ActionResult("skipped", "alertmanager: no alert to send", attempts=0)
        bound = log.bind(incident=notice.incident_id, deployment=notice.deployment, kind=notice.kind)
        answer = self.endpoint.post(
            self.url, encode_json(body),
            on_retry=lambda n, a, pause: bound.warning("notice.alertmanager.retry", attempt=n,
                                                      error=a.describe(), delay=pause),
        )
        data = {"status_code": answer.status, "firing": len(firing), "resolved": len(resolved)}
        if not answer.ok:
            bound.warning("notice.alertmanager", outcome="failed", status_code=answer.status, detail=answer.describe())
            return ActionResult("failed", f"alertmanager: {answer.describe()}", attempts=answer.retry.attempts, data=data)
        bound.info("notice.alertmanager", outcome="succeeded", firing=len(firing), resolved=len(resolved))
        if firing:
            self._keep_fresh()
        return ActionResult("succeeded", f"alertmanager: {len(firing)} firing, {len(resolved)} resolved",
                            attempts=answer.retry.attempts, data=data)

    def resume(self, notice: Notice) -> None:
        """An incident still open after a restart: its firing alerts (and its escalation's)
        are re-sent at once by the re-sending thread, then every interval, with the labels
        they had, so Alertmanager keeps the same alerts instead of letting them expire as
        resolved while the incident is open. Nothing is posted on the caller's thread."""
        if notice.kind == "resolved" or not self.resend_interval:
            return
        current = [(self._alert(notice, a), a.state) for a in notice.alerts]
        if notice.escalation:
            current.append((self._escalation(notice), "firing"))
        with self._lock:
            known = self._firing.setdefault(notice.incident_id, {})
            for alert, state in current:
                if state in _FIRING:
                    known.setdefault(_key(alert["labels"]), alert)
        self._keep_fresh()
        self._wake.set()

    # Re-sending ---------------------------------------------------------------------------
    def resend(self) -> int:
        """Send every firing alert again with a fresh ``endsAt``; how many (0 when none or the
        request failed: the next interval tries again, and ``endsAt`` leaves four)."""
        now = self.now()
        with self._lock:
            alerts = [a for known in self._firing.values() for a in known.values()]
        if not alerts:
            return 0
        hold = now + 4 * self.resend_interval if self.resend_interval else None
        answer = self.endpoint.post(self.url, encode_json([self._wire(a, hold) for a in alerts]))
        if not answer.ok:
            log.warning("notice.alertmanager.resend", outcome="failed", alerts=len(alerts), detail=answer.describe())
            return 0
        return len(alerts)

    def _keep_fresh(self) -> None:
        if not self.resend_interval or self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._resending, name="rollbackd-alertmanager", daemon=True)
        self._thread.start()

    def _resending(self) -> None:
        while True:
            self._wake.wait(self.resend_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.resend()
            except Exception as exc:  # a resend never kills the thread; the next one tries again
                log.error("notice.alertmanager.resend", outcome="failed", error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop re-sending (the alerts still firing end at their ``endsAt``)."""
        self._stop.set()
        self._wake.set()
