"""Notices to any HTTP receiver (``notifier: {type: webhook}``): the notice as JSON, signed.

Headers: ``Idempotency-Key`` (the notice's outbox key: a notice posted again after a crash has
the same one), ``X-Rollbackd-Timestamp`` (Unix seconds when it was signed) and
``X-Rollbackd-Signature``: ``sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``, the
webhook backend's :func:`~rollbackd.actions.webhook.sign` over the timestamp and the body, so a
receiver rejects a replayed old request (:func:`verify_notice`). Retried by classification.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import structlog

from rollbackd.actions.base import ActionResult, Notice
from rollbackd.actions.posting import JsonEndpoint, check_url, encode_json
from rollbackd.actions.retry import RetryPolicy
from rollbackd.actions.webhook import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign, verify_signature

__all__ = ["WebhookNotifier", "TIMESTAMP_HEADER", "notice_body", "sign_notice", "verify_notice"]

TIMESTAMP_HEADER = "X-Rollbackd-Timestamp"

log = structlog.get_logger("rollbackd.actions.noticehook")


def notice_body(notice: Notice) -> dict[str, Any]:
    body = dataclasses.asdict(notice)
    body["alerts"] = [dataclasses.asdict(a) for a in notice.alerts]
    return {"type": "rollbackd.notice", **body}


def _signed(timestamp: str, body: bytes) -> bytes:
    return timestamp.encode("ascii") + b"." + body


def sign_notice(secret: bytes, timestamp: str, body: bytes) -> str:
    return sign(secret, _signed(timestamp, body))


def verify_notice(secret: bytes, body: bytes, timestamp: str | None, header: str | None, *,
                  now: float, tolerance: float = 300.0) -> bool:
    """For receivers: signed with ``secret`` over exactly this body, within ``tolerance``
    seconds of ``now``."""
    if not timestamp or not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    return verify_signature(secret, _signed(timestamp, body), header)


class WebhookNotifier:
    """POSTs each notice as signed JSON; never raises. ``now`` stamps the signature."""

    def __init__(
        self,
        url: str,
        secret: bytes | None,
        *,
        now: Callable[[], float],
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.url = check_url("webhook notifier", url)
        self.secret = secret
        self.now = now
        self.endpoint = JsonEndpoint(dict(headers or {}), timeout=timeout, policy=policy, sleep=sleep)

    def post(self, notice: Notice) -> ActionResult:
        body = encode_json(notice_body(notice))
        key = notice.key or f"{notice.incident_id}:{notice.kind}:{notice.ts!r}"
        headers = {IDEMPOTENCY_HEADER: key}
        if self.secret is not None:
            stamp = str(int(self.now()))
            headers[TIMESTAMP_HEADER] = stamp
            headers[SIGNATURE_HEADER] = sign_notice(self.secret, stamp, body)
        bound = log.bind(incident=notice.incident_id, deployment=notice.deployment, kind=notice.kind, key=key)
        answer = self.endpoint.post(
            self.url, body, headers=headers,
            on_retry=lambda n, a, pause: bound.warning("notice.webhook.retry", attempt=n, error=a.describe(), delay=pause),
        )
        data = {"status_code": answer.status}
        if not answer.ok:
            bound.warning("notice.webhook", outcome="failed", status_code=answer.status, detail=answer.describe())
            return ActionResult("failed", f"webhook: {answer.describe()}", attempts=answer.retry.attempts, data=data)
        bound.info("notice.webhook", outcome="succeeded", status_code=answer.status)
        return ActionResult("succeeded", f"webhook: {answer.describe()}", attempts=answer.retry.attempts, data=data)
