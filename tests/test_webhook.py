"""Webhook backend and retry classification, against a real HTTP server on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error

import pytest
import structlog
from loopback import LoopbackServer, Reply

from rollbackd.actions import RollbackPlan, WebhookBackend, make_backend, verify_signature
from rollbackd.actions.retry import Attempt, RetryPolicy, classify, retry_after_seconds, retrying
from rollbackd.actions.webhook import canonical_body, sign
from rollbackd.rules.model import BackendSpec

SECRET = b"s3cret-for-tests"
PLAN = RollbackPlan(
    deployment="fraud",
    variant="canary",
    from_version="v43",
    to_version="v42",
    incident_id="inc-7f3a",
    reason="psi_drift firing",
)
EXPECTED_BODY = (
    b'{"action":"set_version","deployment":"fraud","from_version":"v43",'
    b'"idempotency_key":"inc-7f3a:rollback:canary:v42","incident_id":"inc-7f3a",'
    b'"reason":"psi_drift firing","to_version":"v42","variant":"canary"}'
)


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


def backend(server: LoopbackServer, sleep: FakeSleep, **kw) -> WebhookBackend:
    kw.setdefault("policy", RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=8.0))
    return WebhookBackend(server.url + "/rollback", SECRET, sleep=sleep, **kw)


# --- classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, outcome",
    [
        (200, "success"), (201, "success"), (204, "success"), (299, "success"),
        (408, "retry"), (425, "retry"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"), (599, "retry"),
        (301, "give_up"), (400, "give_up"), (401, "give_up"), (403, "give_up"), (404, "give_up"),
        (409, "give_up"), (422, "give_up"), (100, "give_up"),
    ],
)
def test_classify_status(status, outcome):
    assert classify(status, None) == outcome


@pytest.mark.parametrize(
    "exc, outcome",
    [
        (ConnectionRefusedError(), "retry"),
        (ConnectionResetError(), "retry"),
        (TimeoutError(), "retry"),
        (socket.timeout(), "retry"),
        (http.client.RemoteDisconnected("closed"), "retry"),
        (http.client.IncompleteRead(b""), "retry"),
        (socket.gaierror(-3, "temporary failure in name resolution"), "retry"),
        (OSError(113, "No route to host"), "retry"),
        (urllib.error.URLError(ConnectionRefusedError()), "retry"),
        (urllib.error.URLError(TimeoutError()), "retry"),
        (urllib.error.URLError("unknown url type: ftpx"), "give_up"),
        (urllib.error.HTTPError("http://x", 503, "Unavailable", {}, None), "retry"),
        (urllib.error.HTTPError("http://x", 404, "Not Found", {}, None), "give_up"),
        (ssl.SSLCertVerificationError("bad cert"), "give_up"),
        (urllib.error.URLError(ssl.SSLCertVerificationError("bad cert")), "give_up"),
        (http.client.InvalidURL("bad"), "give_up"),
        (ValueError("bug"), "give_up"),
    ],
)
def test_classify_errors(exc, outcome):
    assert classify(None, exc) == outcome


def test_classify_needs_something():
    with pytest.raises(ValueError):
        classify(None, None)


# --- policy ---------------------------------------------------------------------------------


def test_policy_delays_are_exponential_and_capped():
    p = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=8.0, multiplier=2.0)
    assert [p.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert p.delay(10_000) == 8.0  # no overflow


def test_policy_honours_retry_after_capped():
    p = RetryPolicy(base_delay=0.5, max_delay=8.0)
    assert p.delay(1, "3") == 3.0
    assert p.delay(1, "0") == 0.0
    assert p.delay(3, "120") == 8.0
    assert p.delay(1, "garbage") == 0.5
    assert p.delay(1, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.5  # a date needs `now`
    assert p.delay(1, "Wed, 21 Oct 2015 07:28:00 GMT", now=1445412478.0) == 2.0


def test_retry_after_seconds():
    assert retry_after_seconds(None) is None
    assert retry_after_seconds(" 7 ") == 7.0
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        ({"max_attempts": 2.5}, "max_attempts must be an integer >= 1"),
        ({"base_delay": -1}, "base_delay must be in [0, inf)"),
        ({"base_delay": 2.0, "max_delay": 1.0}, "max_delay must be in [base_delay=2.0, inf)"),
        ({"multiplier": 0.5}, "multiplier must be in [1, inf)"),
        ({"max_delay": float("inf")}, "max_delay must be in"),
    ],
)
def test_policy_validation_names_the_range(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        RetryPolicy(**kwargs)
    assert fragment in str(info.value)


def test_retrying_counts_exceptions_as_attempts():
    sleep = FakeSleep()
    script = iter([ConnectionResetError("reset"), Attempt(status=503, retry_after="2"), Attempt(status=200)])

    def send() -> Attempt:
        item = next(script)
        if isinstance(item, BaseException):
            raise item
        return item

    result = retrying(send, RetryPolicy(max_attempts=5), sleep=sleep)
    assert result.ok and result.attempts == 3
    assert result.delays == (0.5, 2.0) and sleep.calls == [0.5, 2.0]


# --- the backend on a real server -----------------------------------------------------------


def test_body_headers_and_signature(server):
    sleep = FakeSleep()
    result = backend(server, sleep, headers={"X-Team": "ml-platform"}).apply(PLAN)

    assert result.status == "succeeded" and result.attempts == 1
    assert result.data == {"status_code": 200}
    (req,) = server.requests
    assert req.method == "POST" and req.path == "/rollback"
    assert req.body == EXPECTED_BODY == canonical_body(PLAN)
    assert req.json() == {"action": "set_version", **PLAN.to_record()}
    assert req.header("Content-Type") == "application/json"
    assert req.header("Idempotency-Key") == "inc-7f3a:rollback:canary:v42"
    assert req.header("X-Team") == "ml-platform"
    assert req.header("X-Rollbackd-Timestamp") is None
    assert verify_signature(SECRET, req.body, req.header("X-Rollbackd-Signature"))
    assert not verify_signature(b"other", req.body, req.header("X-Rollbackd-Signature"))
    assert not verify_signature(SECRET, req.body + b" ", req.header("X-Rollbackd-Signature"))
    assert sleep.calls == []


def test_no_secret_no_signature(server):
    WebhookBackend(server.url, None, sleep=FakeSleep()).apply(PLAN)
    assert server.requests[0].header("X-Rollbackd-Signature") is None


def test_verify_signature_rejects_malformed():
    body = canonical_body(PLAN)
    good = sign(SECRET, body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify_signature(SECRET, body, good)
    for bad in (None, "", good[7:], "sha1=" + good[7:], good[:-1], "sha256=zz\u00e9"):
        assert not verify_signature(SECRET, body, bad)


def test_503_then_200_succeeds_with_two_attempts_and_identical_bodies(server):
    sleep = FakeSleep()
    server.reply(Reply(503), Reply(200))
    result = backend(server, sleep).apply(PLAN)

    assert result.status == "succeeded" and result.attempts == 2
    assert result.data == {"status_code": 200}
    assert sleep.calls == [0.5]
    first, second = server.requests
    assert first.body == second.body == EXPECTED_BODY
    assert first.header("Idempotency-Key") == second.header("Idempotency-Key")
    assert first.header("X-Rollbackd-Signature") == second.header("X-Rollbackd-Signature")


def test_400_gives_up_after_one_attempt(server):
    sleep = FakeSleep()
    server.reply(Reply(400, body="bad request"))
    result = backend(server, sleep).apply(PLAN)

    assert result.status == "failed" and result.attempts == 1
    assert result.data == {"status_code": 400}
    assert "400" in result.detail and "gave up" in result.detail
    assert len(server.requests) == 1 and sleep.calls == []


def test_persistent_5xx_backs_off_exponentially_then_fails(server):
    sleep = FakeSleep()
    server.reply(*[Reply(502)] * 4)
    result = backend(server, sleep).apply(PLAN)

    assert result.status == "failed" and result.attempts == 4
    assert result.data == {"status_code": 502}
    assert "after 4 attempts" in result.detail and "502" in result.detail
    assert sleep.calls == [0.5, 1.0, 2.0]
    assert len(server.requests) == 4


def test_429_retry_after_is_honoured(server):
    sleep = FakeSleep()
    server.reply(Reply(429, headers={"Retry-After": "3"}), Reply(429, headers={"Retry-After": "60"}), Reply(200))
    result = backend(server, sleep).apply(PLAN)
    assert result.status == "succeeded" and result.attempts == 3
    assert sleep.calls == [3.0, 8.0]


def test_timeout_is_retried_then_fails(server):
    sleep = FakeSleep()
    server.reply(Reply(200, delay=1.0), Reply(200, delay=1.0))
    wb = backend(server, sleep, timeout=0.2, policy=RetryPolicy(max_attempts=2, base_delay=0.25))
    result = wb.apply(PLAN)

    assert result.status == "failed" and result.attempts == 2
    assert result.data == {"status_code": None}
    assert "timed out" in result.detail.lower() or "timeout" in result.detail.lower()
    assert sleep.calls == [0.25]
    assert len(server.requests) == 2


def test_connection_refused_is_retried_then_fails():
    with LoopbackServer() as gone:
        url = gone.url
    sleep = FakeSleep()
    result = WebhookBackend(url, SECRET, policy=RetryPolicy(max_attempts=3), sleep=sleep).apply(PLAN)
    assert result.status == "failed" and result.attempts == 3
    assert "ConnectionRefusedError" in result.detail
    assert sleep.calls == [0.5, 1.0]


def test_redirect_is_not_followed(server):
    server.reply(Reply(302, headers={"Location": "/elsewhere"}))
    result = backend(server, FakeSleep()).apply(PLAN)
    assert result.status == "failed" and result.data == {"status_code": 302}
    assert [r.path for r in server.requests] == ["/rollback"]


def test_repeat_apply_is_skipped(server):
    wb = backend(server, FakeSleep())
    assert wb.apply(PLAN).status == "succeeded"
    again = wb.apply(PLAN)
    assert again.status == "skipped" and again.detail == "already applied" and again.attempts == 0
    assert len(server.requests) == 1


def test_failed_apply_is_not_remembered(server):
    wb = backend(server, FakeSleep())
    server.reply(Reply(400))
    assert wb.apply(PLAN).status == "failed"
    assert wb.apply(PLAN).status == "succeeded"
    assert len(server.requests) == 2


def test_logs_one_canonical_event_without_payload(server):
    server.reply(Reply(503), Reply(200))
    with structlog.testing.capture_logs() as logs:
        backend(server, FakeSleep()).apply(PLAN)
    events = [e["event"] for e in logs]
    assert events == ["rollback.webhook.retry", "rollback.webhook"]
    final = logs[-1]
    assert final["outcome"] == "succeeded" and final["attempts"] == 2 and final["incident"] == "inc-7f3a"
    assert "psi_drift firing" not in json.dumps(logs, default=str)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"url": "ftp://example.com/x"}, "http:// or https://"),
        ({"url": "not a url"}, "http:// or https://"),
        ({"url": "http://x", "timeout": 0}, "timeout must be in (0, inf)"),
    ],
)
def test_constructor_validation(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        WebhookBackend(secret=None, **kwargs)
    assert fragment in str(info.value)


# --- factory --------------------------------------------------------------------------------


def test_factory_builds_webhook_with_env_secret(server):
    sleep = FakeSleep()
    spec = BackendSpec(
        "webhook",
        {
            "url": server.url + "/hook",
            "secret_env": "HOOK_SECRET",
            "timeout": 2,
            "headers": {"X-Env": "prod"},
            "retry": {"max_attempts": 2, "base_delay": 0.1},
        },
    )
    wb = make_backend(spec, sleep=sleep, env={"HOOK_SECRET": "abc"})
    assert isinstance(wb, WebhookBackend)
    assert wb.policy == RetryPolicy(max_attempts=2, base_delay=0.1) and wb.timeout == 2.0
    server.reply(Reply(500))
    assert wb.apply(PLAN).status == "succeeded"
    assert sleep.calls == [0.1]
    req = server.requests[-1]
    assert req.path == "/hook" and req.header("X-Env") == "prod"
    assert verify_signature(b"abc", req.body, req.header("X-Rollbackd-Signature"))


@pytest.mark.parametrize(
    "options, env, fragment",
    [
        ({}, {}, "option 'url' is required"),
        ({"url": "http://x", "secret_env": "MISSING"}, {}, "'MISSING' (secret_env) is not set"),
        ({"url": "http://x", "secret": "inline"}, {}, "unknown option(s) 'secret'"),
        ({"url": "http://x", "retry": {"tries": 3}}, {}, "unknown retry option(s) 'tries'"),
        ({"url": "http://x", "retry": {"max_attempts": 0}}, {}, "max_attempts must be"),
    ],
)
def test_factory_webhook_errors(options, env, fragment):
    with pytest.raises(ValueError) as info:
        make_backend(BackendSpec("webhook", options), env=env)
    assert fragment in str(info.value)
