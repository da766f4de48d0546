"""One JSON request to a service, retried by classification: what the webhook backend and the
Alertmanager, PagerDuty, Opsgenie and webhook notifiers share.

The body is encoded once, so every retry sends the same bytes (a signature over them stays
valid); 429, 408 and 5xx and connection failures are retried under the notifier's
:class:`~rollbackd.actions.retry.RetryPolicy` (a ``Retry-After`` is honoured, capped); any other
4xx is the request's fault and is given up at once (``actions/retry.py``: ``classify``).
Redirects are not followed: a POST must not turn into a GET.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable
from urllib.parse import urlsplit

from rollbackd.actions.retry import Attempt, RetryPolicy, RetryResult, retrying

__all__ = ["JsonEndpoint", "Answer", "encode_json", "check_url", "finite"]

_MAX_RESPONSE_BYTES = 64 * 1024


class NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib turns a redirected POST into a body-less GET; a rollback or a page must not
    # "succeed" that way.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None


def encode_json(body: Any) -> bytes:
    """Compact, key-sorted JSON: the same notice always makes the same bytes. A non-finite
    number (a threshold that is not set) is ``null``, which every JSON parser reads; a numpy
    scalar is its Python value."""
    return json.dumps(finite(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_scalar).encode("utf-8")


def finite(x: Any) -> Any:
    """``x`` with every non-finite float (NaN, ±inf) as None and every mapping key a string: what
    strict JSON (``allow_nan=False``) can write."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _scalar(x: Any) -> Any:
    if isinstance(x, SupportsItem):
        return finite(x.item())
    raise TypeError(f"{type(x).__name__} is not JSON")


@runtime_checkable
class SupportsItem(Protocol):
    """A numpy scalar (``np.int64``, ``np.float32``): ``item()`` is its Python value."""

    def item(self) -> Any: ...


def check_url(kind: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{kind}: url must be an absolute http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of a request after its retries, with the last response's body (parsed JSON
    when it was JSON, else ``None``)."""

    retry: RetryResult
    body: Any = None

    @property
    def ok(self) -> bool:
        return self.retry.ok

    @property
    def status(self) -> int | None:
        return self.retry.last.status

    def describe(self) -> str:
        last = self.retry.last.describe()
        if self.ok:
            return last
        why = "gave up" if self.retry.outcome == "give_up" else f"gave up after {self.retry.attempts} attempts"
        said = _said(self.body)
        return f"{why}: {last}" + (f" ({said})" if said else "")


def _said(body: Any) -> str:
    """The service's own words about a refusal (PagerDuty ``message``/``errors``, Opsgenie
    ``message``), short."""
    if not isinstance(body, Mapping):
        return ""
    parts = [str(body[k]) for k in ("message", "error") if isinstance(body.get(k), str)]
    errors = body.get("errors")
    if isinstance(errors, list):
        parts.extend(str(e) for e in errors[:3])
    return "; ".join(parts)[:300]


class JsonEndpoint:
    """POSTs JSON to one service with fixed headers; never raises."""

    def __init__(
        self,
        headers: Mapping[str, str],
        *,
        timeout: float,
        policy: RetryPolicy,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be in (0, inf) seconds, got {timeout}")
        self.headers = {**headers, "Content-Type": "application/json"}
        self.timeout = float(timeout)
        self.policy = policy
        self.sleep = sleep
        self._opener = urllib.request.build_opener(NoRedirect())

    def post(
        self,
        url: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        on_retry: Callable[[int, Attempt, float], object] | None = None,
    ) -> Answer:
        sent = {**self.headers, **(headers or {})}
        answered: list[bytes] = []

        def send() -> Attempt:
            answered.clear()
            req = urllib.request.Request(url, data=body, headers=sent, method="POST")
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    answered.append(resp.read(_MAX_RESPONSE_BYTES))
                    return Attempt(status=resp.status, reason=resp.reason or "")
            except urllib.error.HTTPError as err:
                with err:
                    answered.append(err.read(_MAX_RESPONSE_BYTES))
                    return Attempt(status=err.code, retry_after=err.headers.get("Retry-After"),
                                   reason=err.reason or "")

        result = retrying(send, self.policy, sleep=self.sleep, on_retry=on_retry)
        parsed: Any = None
        if answered and answered[0]:
            try:
                parsed = json.loads(answered[0])
            except ValueError:
                parsed = None
        return Answer(result, parsed)
