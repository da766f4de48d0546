"""Opsgenie notices through the Alert API v2: an incident creates an alert whose ``alias`` is
stable per incident (Opsgenie folds a create with the alias of an open alert into it), its
confirmed rollback acknowledges it and its resolution closes it, both by alias
(``identifierType=alias``). Steps as in ``actions/paging.py``.

Authorization is ``GenieKey <key>`` (an API integration's key). Opsgenie answers 202 with a
``requestId`` and processes the request asynchronously; 4xx but 429 are given up, 429 and 5xx
retried.
"""

from __future__ import annotations

import time
from typing import Any, Callable
from urllib.parse import quote

import structlog

from rollbackd.actions.base import ActionResult, Notice
from rollbackd.actions.paging import PageKeys, PageStep, clip, describe_notice, title_of
from rollbackd.actions.posting import JsonEndpoint, check_url, encode_json
from rollbackd.actions.retry import RetryPolicy

__all__ = ["OpsgenieNotifier", "DEFAULT_API_URL", "og_priority"]

DEFAULT_API_URL = "https://api.opsgenie.com"  # EU accounts: https://api.eu.opsgenie.com
MESSAGE_MAX = 130
ALIAS_MAX = 512
DESCRIPTION_MAX = 15000
TAG_MAX = 50

log = structlog.get_logger("rollbackd.actions.opsgenie")


def og_priority(notice: Notice) -> str:
    if notice.escalation or notice.severity == "critical":
        return "P1"
    return {"warning": "P3", "info": "P5"}.get(notice.severity or "", "P3")


class OpsgenieNotifier:
    """Creates, acknowledges and closes Opsgenie alerts; never raises."""

    def __init__(
        self,
        api_key: str,
        *,
        url: str = DEFAULT_API_URL,
        responders: tuple[dict[str, str], ...] = (),
        tags: tuple[str, ...] = (),
        timeout: float = 10.0,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if not api_key:
            raise ValueError("opsgenie notifier: api_key must be non-empty")
        self.url = check_url("opsgenie notifier", url) + "/v2/alerts"
        self.responders = responders
        self.tags = tags
        self.endpoint = JsonEndpoint({"Authorization": f"GenieKey {api_key}"}, timeout=timeout,
                                     policy=policy, sleep=sleep)
        self.keys = PageKeys()

    def request(self, notice: Notice, step: PageStep) -> tuple[str, dict[str, Any]]:
        """The URL and body of one step."""
        alias = step.key[:ALIAS_MAX]
        if step.action != "trigger":
            verb = "close" if step.action == "resolve" else "acknowledge"
            url = f"{self.url}/{quote(alias, safe='')}/{verb}?identifierType=alias"
            return url, {"source": "rollbackd", "user": "rollbackd", "note": clip(notice.text or notice.title, 25000)}
        tags = ["rollbackd", notice.deployment, notice.severity or "none"]
        tags += ["escalation"] * notice.escalation + ["drill"] * notice.drill + list(self.tags)
        body: dict[str, Any] = {
            "message": clip(title_of(notice) + (" — escalated" if notice.escalation else ""), MESSAGE_MAX),
            "alias": alias,
            "description": clip(describe_notice(notice), DESCRIPTION_MAX),
            "tags": list(dict.fromkeys(clip(t, TAG_MAX) for t in tags)),
            "details": {
                "incident": notice.incident_id, "deployment": notice.deployment, "variant": notice.variant,
                "version": notice.version or "unknown", "notice": notice.kind,
                **({"runbook": notice.runbook} if notice.runbook else {}),
            },
            "entity": notice.deployment,
            "source": "rollbackd",
            "priority": og_priority(notice),
        }
        if self.responders:
            body["responders"] = [dict(r) for r in self.responders]
        return self.url, body

    def post(self, notice: Notice) -> ActionResult:
        bound = log.bind(incident=notice.incident_id, deployment=notice.deployment, kind=notice.kind)
        done: list[str] = []
        attempts = 0
        for step in self.keys.steps(notice):
            url, body = self.request(notice, step)
            answer = self.endpoint.post(
                url, encode_json(body),
                on_retry=lambda n, a, pause: bound.warning("notice.opsgenie.retry", attempt=n,
                                                          error=a.describe(), delay=pause),
            )
            attempts += answer.retry.attempts
            if not answer.ok:
                detail = answer.describe()
                bound.warning("notice.opsgenie", outcome="failed", action=step.action, alias=step.key,
                              status_code=answer.status, detail=detail)
                return ActionResult("failed", f"opsgenie {step.action}: {detail}", attempts=attempts,
                                    data={"status_code": answer.status, "alias": step.key})
            request_id = answer.body.get("requestId") if isinstance(answer.body, dict) else None
            bound.info("notice.opsgenie", outcome="succeeded", action=step.action, alias=step.key,
                       request_id=request_id, attempts=answer.retry.attempts)
            done.append(f"{step.action} {step.key}")
        return ActionResult("succeeded", "opsgenie: " + ", ".join(done), attempts=attempts, data={"requests": done})
