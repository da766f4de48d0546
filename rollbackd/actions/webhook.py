"""Rollback by HTTP webhook: POST "set deployment D, variant V to version X" to a receiver.

The body is canonical JSON and byte-identical on every retry, so a receiver can dedupe on
the ``Idempotency-Key`` header and verify ``X-Rollbackd-Signature`` with
:func:`verify_signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import structlog

from rollbackd.actions.base import ActionResult, RollbackPlan
from rollbackd.actions.posting import JsonEndpoint
from rollbackd.actions.retry import Attempt, RetryPolicy

__all__ = [
    "SIGNATURE_HEADER",
    "IDEMPOTENCY_HEADER",
    "WebhookBackend",
    "canonical_body",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Rollbackd-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"

log = structlog.get_logger("rollbackd.actions.webhook")


def canonical_body(plan: RollbackPlan) -> bytes:
    body: dict[str, Any] = {"action": "set_version", **plan.to_record()}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Rollbackd-Signature`` value: ``sha256=<hex HMAC-SHA256(secret, body)>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """For receivers: does ``header`` carry the HMAC of exactly these body bytes?"""
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body).encode("ascii"), header.strip().encode("ascii", "replace"))


class WebhookBackend:
    """POSTs each :class:`RollbackPlan` once per process; retries by classification."""

    def __init__(
        self,
        url: str,
        secret: bytes | None = None,
        timeout: float = 5.0,
        policy: RetryPolicy = RetryPolicy(),
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be an absolute http:// or https:// URL, got {url!r}")
        if secret is not None and not isinstance(secret, bytes):
            raise ValueError("secret must be bytes or None")
        self.url = url
        self.secret = secret
        self.timeout = float(timeout)
        self.policy = policy
        self.headers = dict(headers or {})
        self.sleep = sleep
        # Checks the timeout; sends the body as it is on every retry, never follows a redirect.
        self._endpoint = JsonEndpoint(self.headers, timeout=self.timeout, policy=policy, sleep=sleep)
        self._applied: set[str] = set()
        self._lock = threading.Lock()

    def apply(self, plan: RollbackPlan) -> ActionResult:
        key = plan.idempotency_key
        bound = log.bind(
            deployment=plan.deployment,
            variant=plan.variant,
            incident=plan.incident_id,
            to_version=plan.to_version,
            idempotency_key=key,
        )
        with self._lock:
            seen = key in self._applied
        if seen:
            bound.info("rollback.webhook", outcome="skipped", attempts=0)
            return ActionResult("skipped", "already applied", attempts=0)

        body = canonical_body(plan)
        request_headers = {IDEMPOTENCY_HEADER: key}
        if self.secret is not None:
            request_headers[SIGNATURE_HEADER] = sign(self.secret, body)

        def on_retry(n: int, attempt: Attempt, pause: float) -> None:
            bound.warning("rollback.webhook.retry", attempt=n, error=attempt.describe(), delay=pause)

        result = self._endpoint.post(self.url, body, headers=request_headers, on_retry=on_retry).retry
        status_code = result.last.status
        data = {"status_code": status_code}
        if result.ok:
            with self._lock:
                self._applied.add(key)
            bound.info("rollback.webhook", outcome="succeeded", attempts=result.attempts, status_code=status_code)
            return ActionResult("succeeded", result.last.describe(), attempts=result.attempts, data=data)

        why = "gave up" if result.outcome == "give_up" else f"gave up after {result.attempts} attempts"
        detail = f"{why}: {result.last.describe()}"
        bound.error("rollback.webhook", outcome="failed", attempts=result.attempts, status_code=status_code, detail=detail)
        return ActionResult("failed", detail, attempts=result.attempts, data=data)
