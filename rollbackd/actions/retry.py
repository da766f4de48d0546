"""Retry by classification: one place decides success / retry / give up for every HTTP edge.

Modelled on Alertmanager's ``Retrier.Check``. Backends describe each try as an
:class:`Attempt`; :func:`retrying` runs tries under a frozen :class:`RetryPolicy`, sleeping
through an injected ``sleep`` so tests never wait on a wall clock.
"""

from __future__ import annotations

import threading

import email.utils
import http.client
import math
import ssl
import time
import urllib.error
from dataclasses import dataclass
from typing import Callable, Literal

__all__ = [
    "Outcome",
    "RETRY_STATUSES",
    "classify",
    "retry_after_seconds",
    "RetryPolicy",
    "Attempt",
    "RetryResult",
    "retrying",
]

Outcome = Literal["success", "retry", "give_up"]

# Besides 5xx: request timeout, too early, rate limited. Every other 4xx is the caller's fault.
RETRY_STATUSES = frozenset({408, 425, 429})


def classify(status: int | None, exc: BaseException | None) -> Outcome:
    """Sort one HTTP outcome into ``success``, ``retry`` or ``give_up``.

    ``status`` is the response status if one arrived; ``exc`` the error raised instead.
    Connection failures and timeouts are worth retrying; TLS verification failures,
    malformed URLs and programming errors are not.
    """
    if exc is not None:
        if isinstance(exc, urllib.error.HTTPError):
            return classify(exc.code, None)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return "give_up"
        if isinstance(exc, urllib.error.URLError):
            reason = exc.reason
            return classify(None, reason) if isinstance(reason, BaseException) else "give_up"
        if isinstance(exc, (TimeoutError, ConnectionError, http.client.HTTPException)):
            return "give_up" if isinstance(exc, http.client.InvalidURL) else "retry"
        if isinstance(exc, OSError):  # unreachable host/network, DNS failure
            return "retry"
        return "give_up"
    if status is None:
        raise ValueError("classify() needs a status or an exception")
    if 200 <= status < 300:
        return "success"
    if status in RETRY_STATUSES or 500 <= status < 600:
        return "retry"
    return "give_up"


def retry_after_seconds(value: str | float | None, now: float | None = None) -> float | None:
    """Seconds asked for by a ``Retry-After`` value, or ``None`` if absent or unusable.

    An HTTP-date needs ``now`` (time is an argument); without it the date is ignored and
    the policy's own backoff applies.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if now is None:
                return None
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:
                return None
            seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry. Deterministic exponential backoff, no jitter.

    ``delay(n)`` is the pause after the ``n``-th failed try: ``base_delay * multiplier**(n-1)``
    capped at ``max_delay``; a server's ``Retry-After`` replaces it (also capped).
    """

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts}")
        if not (math.isfinite(self.base_delay) and self.base_delay >= 0):
            raise ValueError(f"base_delay must be in [0, inf) seconds, got {self.base_delay}")
        if not (math.isfinite(self.max_delay) and self.max_delay >= self.base_delay):
            raise ValueError(
                f"max_delay must be in [base_delay={self.base_delay}, inf) seconds, got {self.max_delay}"
            )
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1.0):
            raise ValueError(f"multiplier must be in [1, inf), got {self.multiplier}")

    def delay(self, attempt: int, retry_after: str | float | None = None, *, now: float | None = None) -> float:
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        asked = retry_after_seconds(retry_after, now)
        if asked is not None:
            return min(self.max_delay, asked)
        # Compare in log space so a huge attempt number cannot overflow.
        exponent = attempt - 1
        if self.base_delay == 0:
            return 0.0
        if self.multiplier > 1 and exponent * math.log(self.multiplier) > math.log(self.max_delay / self.base_delay):
            return self.max_delay
        return min(self.max_delay, self.base_delay * self.multiplier**exponent)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one try produced: a status (with its ``Retry-After``) or an error."""

    status: int | None = None
    error: BaseException | None = None
    retry_after: str | None = None
    reason: str = ""

    @property
    def outcome(self) -> Outcome:
        return classify(self.status, self.error)

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status} {self.reason}".rstrip()
        err = self.error
        if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
            err = err.reason
        return f"{type(err).__name__}: {err}" if err is not None else "no response"


@dataclass(frozen=True, slots=True)
class RetryResult:
    """The last try, how it was classified, how many tries ran and the pauses between them."""

    outcome: Outcome
    last: Attempt
    attempts: int
    delays: tuple[float, ...]

    @property
    def ok(self) -> bool:
        return self.outcome == "success"


def retrying(
    send: Callable[[], Attempt],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], object] = time.sleep,
    on_retry: Callable[[int, Attempt, float], object] | None = None,
) -> RetryResult:
    """Call ``send`` until success, a give-up, or ``policy.max_attempts`` tries.

    An exception escaping ``send`` counts as that try's error, so it is classified like any
    other. The outcome of an exhausted run is ``retry`` (it would have been retried).
    """
    delays: list[float] = []
    attempt_no = 0
    while True:
        attempt_no += 1
        try:
            attempt = send()
        except Exception as exc:  # classified below, never lost
            attempt = Attempt(error=exc)
        outcome = attempt.outcome
        if outcome != "retry" or attempt_no >= policy.max_attempts:
            return RetryResult(outcome, attempt, attempt_no, tuple(delays))
        pause = policy.delay(attempt_no, attempt.retry_after)
        if on_retry is not None:
            on_retry(attempt_no, attempt, pause)
        delays.append(pause)
        sleep(pause)


class CountsAttempts:
    """Mixin for backends that make several HTTP calls per plan: ``attempts`` counts the
    tries of the plan the current thread is running. A thread applies one plan at a time,
    so one thread-local counter serves every backend."""

    _tries = threading.local()

    @property
    def attempts(self) -> int:
        return getattr(self._tries, "n", 0)

    @attempts.setter
    def attempts(self, n: int) -> None:
        self._tries.n = n
