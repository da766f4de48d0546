"""Slack notices through the Web API: an incident's first notice is a parent message, the rest
go into its thread, and each reply also edits the parent in place (``chat.update``) so the
channel shows the incident's current state: Approve / Reject only while a rollback waits for an
approver (then who decided), Acknowledge until someone has, Silence 1h while it is open. The
buttons are handled by the daemon's ``/v1/slack/interactions`` endpoint
(``daemon/slack_actions.py``). Failures come back as a failed
:class:`ActionResult`, never as an exception; a failed edit never fails the reply.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import structlog
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

from rollbackd.actions.base import ActionResult, AlertSummary, Notice
from rollbackd.actions.console import fmt_number, utc_iso
from rollbackd.rules.model import SLACK_USER_ID

__all__ = ["SlackNotifier", "build_blocks", "HEADER_MAX", "SECTION_MAX", "BLOCKS_MAX"]

# Block Kit limits.
HEADER_MAX = 150
SECTION_MAX = 3000
FIELD_MAX = 2000
BLOCKS_MAX = 50
TEXT_MAX = 4000

log = structlog.get_logger("rollbackd.actions.slack")


def _escape(text: str) -> str:
    # The three characters Slack's mrkdwn requires escaped in user-supplied text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _window(start: float, end: float) -> str:
    try:
        s = datetime.fromtimestamp(start, tz=timezone.utc)
        e = datetime.fromtimestamp(end, tz=timezone.utc)
    except (OverflowError, OSError, ValueError, TypeError):
        return f"{utc_iso(start)}–{utc_iso(end)}"
    tail = "%H:%M:%S" if s.date() == e.date() else "%Y-%m-%d %H:%M:%S"
    return f"{s:%Y-%m-%d %H:%M:%S}–{e.strftime(tail)} UTC"


def _alert_text(a: AlertSummary) -> str:
    parts = [
        f"value {fmt_number(a.value)}{' ' + _escape(a.where) if a.where else ''} vs threshold {fmt_number(a.threshold)}",
        f"window {_window(a.window_start, a.window_end)}",
        f"n={a.sample_size}",
    ]
    if a.p_value is not None:
        parts.append(f"p={fmt_number(a.p_value, 3)}")
    text = f"*{_escape(a.rule)}* ({_escape(a.severity)}, {_escape(a.state)}): {', '.join(parts)}"
    if a.summary:
        text += "\n" + _escape(a.summary)
    return _clip(text, SECTION_MAX)


def _field(label: str, value: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": _clip(f"*{label}*\n{_escape(value)}", FIELD_MAX)}


def _who(by: str | None) -> str:
    """A Slack user id as a mention (Slack shows the name); a name from the CLI as it is."""
    if by is None:
        return "nobody"
    return f"<@{by}>" if SLACK_USER_ID.fullmatch(by) else _escape(by)


def _status(notice: Notice) -> str | None:
    """What people did about the incident, for its parent message: the approval, who took it."""
    lines = []
    if notice.approval == "waiting":
        lines.append(":hourglass: The rollback waits for an approver.")
    elif notice.approval in ("approve", "reject"):
        verb, mark = ("approved", ":white_check_mark:") if notice.approval == "approve" else ("rejected", ":no_entry:")
        lines.append(f"{mark} Rollback {verb} by {_who(notice.approval_by)}." if notice.approval_by
                     else f":alarm_clock: Nobody answered in time: rollback {verb} by default.")
    if notice.acknowledged_by:
        lines.append(f":eyes: Acknowledged by {_who(notice.acknowledged_by)}: no repeat notices "
                     "until it escalates.")
    return "\n".join(lines) or None


def _buttons(notice: Notice) -> dict[str, Any]:
    """Approve / Reject only while a rollback waits for an approver; Acknowledge until someone
    has; Silence while the incident is open."""
    value = f"{notice.incident_id}|{notice.deployment}"
    elements: list[dict[str, Any]] = []
    if notice.approval == "waiting":
        elements += [
            {"type": "button", "action_id": "rollbackd_approve", "style": "primary", "value": value,
             "text": {"type": "plain_text", "text": "Approve rollback"}},
            {"type": "button", "action_id": "rollbackd_reject", "style": "danger", "value": value,
             "text": {"type": "plain_text", "text": "Reject rollback"}},
        ]
    if not notice.acknowledged_by:
        elements.append({"type": "button", "action_id": "rollbackd_ack", "value": value,
                         "text": {"type": "plain_text", "text": "Acknowledge"}})
    elements.append({"type": "button", "action_id": "rollbackd_silence", "value": value,
                     "text": {"type": "plain_text", "text": "Silence 1h"}})
    return {"type": "actions", "block_id": "rollbackd_actions", "elements": elements}


def build_blocks(notice: Notice, buttons: bool = False) -> list[dict[str, Any]]:
    """Block Kit for a notice: header, facts, one section per alert, context. For the
    incident's parent message (``buttons``), what people did about it (approval, acknowledgement)
    and, while it is open, the buttons they may press. Within Slack limits."""
    title = ("[DRILL] " if notice.drill else "") + notice.title
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(title, HEADER_MAX), "emoji": True}}
    ]
    facts: dict[str, Any] = {
        "type": "section",
        "fields": [
            _field("Deployment", notice.deployment),
            _field("Variant", notice.variant),
            _field("Version", notice.version or "unknown"),
            _field("Incident", notice.incident_id),
        ],
    }
    if notice.kind == "digest":  # about many incidents: the text is all there is
        del facts["fields"]
    if notice.text:
        facts["text"] = {"type": "mrkdwn", "text": _clip(_escape(notice.text), SECTION_MAX)}
    if "fields" in facts or "text" in facts:
        blocks.append(facts)

    parent = buttons and notice.kind != "digest"
    buttons = parent and notice.kind != "resolved" and not notice.closed
    status = _status(notice) if parent else None
    # Keep one for the context block, and one each for the status line and the buttons.
    room = BLOCKS_MAX - len(blocks) - 1 - int(buttons) - int(status is not None)
    alerts = list(notice.alerts)
    shown = alerts if len(alerts) <= room else alerts[: room - 1]
    for a in shown:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _alert_text(a)}})
    if len(shown) < len(alerts):
        more = len(alerts) - len(shown)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"…and {more} more alerts"}})

    context = [{"type": "mrkdwn", "text": f"{notice.kind} · {utc_iso(notice.ts)} · rollbackd"}]
    if notice.runbook:
        url = notice.runbook.replace("|", "%7C").replace(">", "%3E").replace("<", "%3C")
        context.append({"type": "mrkdwn", "text": _clip(f"<{url}|Runbook>", SECTION_MAX)})
    if status is not None:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(status, SECTION_MAX)}})
    blocks.append({"type": "context", "elements": context})
    if buttons:
        blocks.append(_buttons(notice))
    return blocks


class SlackNotifier:
    """Posts notices with ``chat.postMessage``; rate limits are retried by slack_sdk's handler."""

    def __init__(
        self,
        token: str | None,
        channel: str,
        base_url: str = "https://slack.com/api/",
        client: WebClient | None = None,
        max_rate_limit_retries: int = 3,
        timeout: int = 10,
    ) -> None:
        if not channel:
            raise ValueError("channel must be a non-empty Slack channel name or id")
        if max_rate_limit_retries < 0:
            raise ValueError(f"max_rate_limit_retries must be in [0, inf), got {max_rate_limit_retries}")
        if client is None:
            if not token:
                raise ValueError("token is required when no client is given")
            client = WebClient(token=token, base_url=base_url, timeout=timeout)
            # Replace the shared module-level default handler with our own instances.
            client.retry_handlers = [
                ConnectionErrorRetryHandler(),
                RateLimitErrorRetryHandler(max_retry_count=max_rate_limit_retries),
            ]
        self.channel = channel
        self.client = client
        # Parent ts -> the channel id Slack answered with: chat.update wants the id. After a
        # restart it is not known and the configured channel is used.
        self._parents: dict[str, str] = {}

    def post(self, notice: Notice) -> ActionResult:
        channel = notice.channel or self.channel
        thread = notice.thread
        bound = log.bind(incident=notice.incident_id, deployment=notice.deployment, kind=notice.kind, channel=channel)
        text = ("[DRILL] " if notice.drill else "") + (notice.text or notice.title)
        try:
            response = self.client.chat_postMessage(
                channel=channel,
                text=_clip(text, TEXT_MAX),
                blocks=build_blocks(notice, buttons=thread is None),
                thread_ts=thread,
            )
        except SlackApiError as err:
            status = getattr(err.response, "status_code", None)
            data = getattr(err.response, "data", None)
            error = data.get("error") if isinstance(data, dict) else None
            detail = f"slack: {error or 'error'} (HTTP {status})"
            bound.warning("notice.slack", outcome="failed", status_code=status, error=error)
            return ActionResult("failed", detail, thread=thread, data={"status_code": status, "error": error})
        except Exception as err:  # network, TLS, bad URL: a notice never blocks a rollback
            detail = f"slack: {type(err).__name__}: {err}"
            bound.warning("notice.slack", outcome="failed", error=detail)
            return ActionResult("failed", detail, thread=thread, data={"status_code": None, "error": str(err)})
        ts = response.get("ts")
        bound.info("notice.slack", outcome="succeeded", ts=ts, reply=thread is not None)
        data: dict[str, Any] = {"status_code": response.status_code, "ts": ts, "channel": response.get("channel")}
        if thread is None:
            if ts and response.get("channel"):
                self._parents[ts] = response["channel"]
        else:
            data["parent_update"] = self._update_parent(notice, thread, channel, text, bound)
        return ActionResult("succeeded", f"posted to {channel}", thread=thread or ts, data=data)

    def _update_parent(self, notice: Notice, thread: str, channel: str, text: str, bound: Any) -> str:
        """Edit the parent message to the incident's current state; 'ok' or why not."""
        try:
            self.client.chat_update(
                channel=self._parents.get(thread, channel),
                ts=thread,
                text=_clip(text, TEXT_MAX),
                blocks=build_blocks(notice, buttons=True),
            )
        except SlackApiError as err:
            data = getattr(err.response, "data", None)
            error = (data.get("error") if isinstance(data, dict) else None) or "error"
            bound.warning("notice.slack_update", outcome="failed", error=error)
            return error
        except Exception as err:  # the reply went out; a stale parent is not worth failing it
            bound.warning("notice.slack_update", outcome="failed", error=f"{type(err).__name__}: {err}")
            return f"{type(err).__name__}: {err}"
        return "ok"
