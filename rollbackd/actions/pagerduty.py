"""PagerDuty notices through the Events API v2 (``POST /v2/enqueue``): an incident triggers a
PagerDuty alert under a ``dedup_key`` stable per incident, its confirmed rollback acknowledges
it, its resolution resolves it (``actions/paging.py`` says which step is which).

PagerDuty answers 202 ``{"status": "success", "dedup_key": ...}``; 400 is an invalid event
(given up: sending it again cannot help), 429 and 5xx are retried with backoff.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import structlog

from rollbackd.actions.base import ActionResult, Notice
from rollbackd.actions.console import utc_iso
from rollbackd.actions.paging import PageKeys, PageStep, clip, describe_notice, title_of
from rollbackd.actions.posting import Answer, JsonEndpoint, check_url, encode_json
from rollbackd.actions.retry import RetryPolicy

__all__ = ["PagerDutyNotifier", "DEFAULT_EVENTS_URL", "pd_severity"]

DEFAULT_EVENTS_URL = "https://events.pagerduty.com"
SUMMARY_MAX = 1024
DEDUP_MAX = 255

log = structlog.get_logger("rollbackd.actions.pagerduty")


def pd_severity(notice: Notice) -> str:
    """PagerDuty's severities are critical, error, warning, info: an escalation is critical
    (a human must act), rollbackd's own severities map to themselves."""
    if notice.escalation:
        return "critical"
    return notice.severity if notice.severity in ("critical", "warning", "info") else "error"


class PagerDutyNotifier:
    """Sends each notice as Events API v2 events; never raises."""

    def __init__(
        self,
        routing_key: str,
        *,
        url: str = DEFAULT_EVENTS_URL,
        source: str = "rollbackd",
        client_url: str | None = None,
        timeout: float = 10.0,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if not routing_key:
            raise ValueError("pagerduty notifier: routing_key must be non-empty")
        self.routing_key = routing_key
        self.url = check_url("pagerduty notifier", url) + "/v2/enqueue"
        self.source = source
        self.client_url = client_url
        self.endpoint = JsonEndpoint({}, timeout=timeout, policy=policy, sleep=sleep)
        self.keys = PageKeys()

    def event(self, notice: Notice, step: PageStep) -> dict[str, Any]:
        """The Events API v2 body of one step."""
        body: dict[str, Any] = {
            "routing_key": self.routing_key,
            "event_action": step.action,
            "dedup_key": step.key[:DEDUP_MAX],
        }
        if step.action != "trigger":
            return body
        alert = notice.alerts[0] if notice.alerts else None
        body["payload"] = {
            "summary": clip(title_of(notice) + (" — escalated" if notice.escalation else ""), SUMMARY_MAX),
            "source": self.source,
            "severity": pd_severity(notice),
            "timestamp": utc_iso(notice.ts),
            "component": notice.deployment,
            "group": f"{notice.deployment}/{notice.variant}",
            "class": alert.rule if alert is not None else notice.kind,
            "custom_details": {
                "incident": notice.incident_id,
                "notice": notice.kind,
                "version": notice.version,
                "escalation": notice.escalation,
                "drill": notice.drill,
                "details": describe_notice(notice),
            },
        }
        body["client"] = "rollbackd"
        if self.client_url:
            body["client_url"] = self.client_url
        if notice.runbook:
            body["links"] = [{"href": notice.runbook, "text": "Runbook"}]
        return body

    def post(self, notice: Notice) -> ActionResult:
        bound = log.bind(incident=notice.incident_id, deployment=notice.deployment, kind=notice.kind)
        done: list[str] = []
        attempts = 0
        for step in self.keys.steps(notice):
            answer = self.endpoint.post(
                self.url, encode_json(self.event(notice, step)),
                on_retry=lambda n, a, pause: bound.warning("notice.pagerduty.retry", attempt=n,
                                                          error=a.describe(), delay=pause),
            )
            attempts += answer.retry.attempts
            refused = _refused(answer)
            if refused is not None:
                bound.warning("notice.pagerduty", outcome="failed", action=step.action, dedup_key=step.key,
                              status_code=answer.status, detail=refused)
                return ActionResult("failed", f"pagerduty {step.action}: {refused}", attempts=attempts,
                                    data={"status_code": answer.status, "dedup_key": step.key})
            bound.info("notice.pagerduty", outcome="succeeded", action=step.action, dedup_key=step.key,
                       attempts=answer.retry.attempts)
            done.append(f"{step.action} {step.key}")
        return ActionResult("succeeded", "pagerduty: " + ", ".join(done), attempts=attempts,
                            data={"events": done})


def _refused(answer: Answer) -> str | None:
    """Why PagerDuty did not take the event, or None when it did."""
    if not answer.ok:
        return answer.describe()
    if isinstance(answer.body, dict) and answer.body.get("status") not in (None, "success"):
        return f"HTTP {answer.status}: {answer.body.get('status')}: {answer.body.get('message')}"
    return None
