"""Slack notifier against a local stand-in for the Web API (real HTTP on loopback)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from loopback import LoopbackServer, Reply, SlackAPI
from slack_sdk import WebClient
from slack_sdk.http_retry import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

from rollbackd.actions import AlertSummary, Notice, SlackNotifier, build_blocks, make_notifier
from rollbackd.actions.slack import BLOCKS_MAX, HEADER_MAX, SECTION_MAX
from rollbackd.rules.model import NotifierSpec

TOKEN = "xoxb-test-token"
T0 = 1704067200.0  # 2024-01-01T00:00:00Z

ALERT = AlertSummary(
    rule="psi_drift",
    severity="critical",
    state="firing",
    value=0.3141,
    threshold=0.2,
    sample_size=5000,
    window_start=T0,
    window_end=T0 + 300,
    p_value=0.0012,
    summary="Score distribution shifted",
)
NOTICE = Notice(
    incident_id="inc-7f3a",
    kind="opened",
    ts=T0 + 300,
    deployment="fraud",
    variant="canary",
    version="v43",
    title="Drift on fraud/canary",
    text="psi_drift firing on fraud/canary (v43)",
    alerts=(ALERT,),
    runbook="https://runbooks.example/fraud",
)


@pytest.fixture
def api():
    with LoopbackServer(SlackAPI(TOKEN)) as server:
        yield server


def notifier(server: LoopbackServer, **kw) -> SlackNotifier:
    return SlackNotifier(TOKEN, "#ml-alerts", base_url=server.url + "/api/", **kw)


def test_parent_then_threaded_reply(api):
    slack = notifier(api)
    first = slack.post(NOTICE)
    assert first.status == "succeeded"
    assert first.thread == "1700000000.000001"

    update = replace(NOTICE, kind="updated", thread=first.thread, text="still firing")
    second = slack.post(update)
    assert second.status == "succeeded" and second.thread == first.thread

    parent, reply = [r for r in api.requests if r.path.endswith("/chat.postMessage")]
    for req in (parent, reply):
        assert req.method == "POST" and req.path == "/api/chat.postMessage"
        assert req.header("Authorization") == f"Bearer {TOKEN}"
        assert req.header("Content-Type").startswith("application/json")  # slack_sdk sends JSON here
    body = parent.json()
    assert body["channel"] == "#ml-alerts"
    assert body["text"] == NOTICE.text
    assert "thread_ts" not in body
    assert body["blocks"] == build_blocks(NOTICE, buttons=True)
    assert reply.json()["thread_ts"] == "1700000000.000001"
    assert reply.json()["text"] == "still firing"


def test_notice_channel_overrides_default_and_drill_is_marked(api):
    drill = replace(NOTICE, channel="#fraud-oncall", drill=True)
    assert notifier(api).post(drill).status == "succeeded"
    body = api.requests[0].json()
    assert body["channel"] == "#fraud-oncall"
    assert body["text"].startswith("[DRILL] ")
    assert body["blocks"][0]["text"]["text"] == "[DRILL] Drift on fraud/canary"


def test_rate_limit_is_retried(api):
    api.reply(Reply(429, headers={"Retry-After": "0"}, body={"ok": False, "error": "ratelimited"}))
    started = time.monotonic()
    result = notifier(api).post(NOTICE)
    assert result.status == "succeeded" and result.thread == "1700000000.000001"
    assert len(api.requests) == 2
    assert api.requests[0].body == api.requests[1].body
    assert time.monotonic() - started < 3


def test_rate_limit_exhausted_fails_without_raising(api):
    limited = Reply(429, headers={"Retry-After": "0"}, body={"ok": False, "error": "ratelimited"})
    api.reply(limited, limited)
    result = notifier(api, max_rate_limit_retries=1).post(NOTICE)
    assert result.status == "failed"
    assert result.data["status_code"] == 429 and result.data["error"] == "ratelimited"
    assert len(api.requests) == 2


def test_server_error_fails_without_raising(api):
    api.reply(Reply(500, body="<html>upstream exploded</html>"))
    result = notifier(api).post(NOTICE)
    assert result.status == "failed" and result.data["status_code"] == 500
    assert "HTTP 500" in result.detail
    assert result.thread is None
    assert len(api.requests) == 1


def test_ok_false_fails_without_raising(api):
    api.reply(Reply(200, body={"ok": False, "error": "channel_not_found"}))
    reply_notice = replace(NOTICE, thread="1699999999.000001")
    result = notifier(api).post(reply_notice)
    assert result.status == "failed"
    assert "channel_not_found" in result.detail
    assert result.thread == "1699999999.000001"  # the caller keeps its thread reference


def test_wrong_token_fails(api):
    result = SlackNotifier("xoxb-wrong", "#ml-alerts", base_url=api.url + "/api/").post(NOTICE)
    assert result.status == "failed" and "invalid_auth" in result.detail


def test_unreachable_api_fails_without_raising():
    with LoopbackServer() as gone:
        url = gone.url
    client = WebClient(token=TOKEN, base_url=url + "/api/", retry_handlers=[])
    result = SlackNotifier(None, "#ml-alerts", client=client).post(NOTICE)
    assert result.status == "failed"
    assert "URLError" in result.detail or "Connection" in result.detail


def test_client_is_configured_with_retry_handlers(api):
    slack = notifier(api, max_rate_limit_retries=5)
    assert slack.client.base_url == api.url + "/api/"
    handlers = slack.client.retry_handlers
    assert any(isinstance(h, ConnectionErrorRetryHandler) for h in handlers)
    (rate,) = [h for h in handlers if isinstance(h, RateLimitErrorRetryHandler)]
    assert rate.max_retry_count == 5


def test_constructor_validation():
    with pytest.raises(ValueError, match="channel"):
        SlackNotifier(TOKEN, "")
    with pytest.raises(ValueError, match="token"):
        SlackNotifier(None, "#x")
    with pytest.raises(ValueError, match=r"max_rate_limit_retries must be in \[0, inf\)"):
        SlackNotifier(TOKEN, "#x", max_rate_limit_retries=-1)


# --- blocks ---------------------------------------------------------------------------------


def test_blocks_layout():
    blocks = build_blocks(NOTICE)
    assert [b["type"] for b in blocks] == ["header", "section", "section", "context"]
    assert blocks[0]["text"] == {"type": "plain_text", "text": "Drift on fraud/canary", "emoji": True}
    assert [f["text"] for f in blocks[1]["fields"]] == [
        "*Deployment*\nfraud",
        "*Variant*\ncanary",
        "*Version*\nv43",
        "*Incident*\ninc-7f3a",
    ]
    assert blocks[1]["text"]["text"] == "psi_drift firing on fraud/canary (v43)"
    assert blocks[2]["text"] == {
        "type": "mrkdwn",
        "text": "*psi_drift* (critical, firing): value 0.3141 vs threshold 0.2, "
        "window 2024-01-01 00:00:00–00:05:00 UTC, n=5000, p=0.0012\nScore distribution shifted",
    }
    assert blocks[3]["elements"] == [
        {"type": "mrkdwn", "text": "opened · 2024-01-01T00:05:00Z · rollbackd"},
        {"type": "mrkdwn", "text": "<https://runbooks.example/fraud|Runbook>"},
    ]


def test_blocks_escape_and_stay_within_limits():
    many = tuple(
        AlertSummary(f"rule<{i}>&", "warning", "firing", None, 1.0, 10, T0, T0 + 86400 * 2) for i in range(80)
    )
    notice = replace(NOTICE, title="T" * 400, text="x" * 5000, alerts=many, runbook=None, drill=True)
    blocks = build_blocks(notice)
    assert len(blocks) == BLOCKS_MAX
    assert len(blocks[0]["text"]["text"]) <= HEADER_MAX and blocks[0]["text"]["text"].startswith("[DRILL] ")
    assert all(len(b["text"]["text"]) <= SECTION_MAX for b in blocks if b["type"] == "section" and "text" in b)
    assert blocks[2]["text"]["text"].startswith("*rule&lt;0&gt;&amp;* (warning, firing): value n/a vs threshold 1,")
    assert "2024-01-01 00:00:00–2024-01-03 00:00:00 UTC" in blocks[2]["text"]["text"]
    assert "p=" not in blocks[2]["text"]["text"]
    assert blocks[-2]["text"]["text"] == "…and 34 more alerts"
    assert blocks[-1]["type"] == "context" and len(blocks[-1]["elements"]) == 1
    json.dumps(blocks)  # serialisable as sent


# --- factory --------------------------------------------------------------------------------


def test_factory_builds_slack_from_env_token(api):
    spec = NotifierSpec("slack", {"channel": "#ml-alerts", "base_url": api.url + "/api/", "max_rate_limit_retries": 2})
    slack = make_notifier(spec, env={"SLACK_BOT_TOKEN": TOKEN})
    assert isinstance(slack, SlackNotifier)
    assert slack.post(NOTICE).status == "succeeded"

    spec = NotifierSpec("slack", {"channel": "#ml-alerts", "base_url": api.url + "/api/", "token_env": "MY_TOKEN"})
    assert make_notifier(spec, env={"MY_TOKEN": TOKEN}).post(NOTICE).status == "succeeded"


@pytest.mark.parametrize(
    "options, env, fragment",
    [
        ({}, {"SLACK_BOT_TOKEN": TOKEN}, "option 'channel' is required"),
        ({"channel": "#x"}, {}, "no token"),
        ({"channel": "#x", "token_env": "NOPE"}, {}, "'NOPE' (token_env) is not set"),
        ({"channel": "#x", "token": "xoxb-inline"}, {}, "unknown option(s) 'token'"),
    ],
)
def test_factory_slack_errors(options, env, fragment):
    with pytest.raises(ValueError) as info:
        make_notifier(NotifierSpec("slack", options), env=env)
    assert fragment in str(info.value)
