"""Slack's interactivity endpoint (``POST /v1/slack/interactions``): the buttons of an incident's
parent message (``actions/slack.py``), served by the daemon's HTTP server (``daemon/http.py``).

Who may press what, matched by Slack user id only (a user name is chosen by its owner and is
not unique; a display name even less):

- **Approve / Reject**: the deployment's ``approval.approvers``, and only while a rollback of
  the incident waits for an answer. An answer to nothing would otherwise stand, recorded, for a
  later rollback of the same incident.
- **Acknowledge / Silence 1h**: the deployment's ``slack_responders`` when it lists any, else
  anyone who is a member of the channel the message was posted in (``conversations.members``).

A request counts only if slack_sdk's :class:`~slack_sdk.signature.SignatureVerifier` accepts its
signature, on the daemon's clock (within five minutes of ``clock.now()``). Slack retries a
request it got no answer for, and a captured one could be sent again: a signature seen within
the window is answered 200 and has no effect, counted as ``replayed``.

An answer becomes a ledger row (its own connection: this runs on the HTTP thread) that the
pipeline reads by event time: ``approvals`` (like ``rollbackd approve``), ``silences``,
``acknowledgements`` (the incident's repeat notices stop until it escalates).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import queue
import os
import re
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping, Protocol
from urllib.parse import parse_qs

import structlog
from prometheus_client.core import CounterMetricFamily, Metric
from slack_sdk.signature import SignatureVerifier

from rollbackd.daemon.clock import Clock, WallClock
from rollbackd.rules.model import SLACK_USER_ID

__all__ = [
    "SLACK_MAX_AGE",
    "ChannelMembers",
    "SeenRequests",
    "SlackChannelMembers",
    "SlackInteractions",
    "slack_interactions",
]

log = structlog.get_logger("rollbackd.slack")

SLACK_MAX_AGE = 300.0  # Slack's advice, and SignatureVerifier's: refuse requests signed earlier
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
OUTCOMES = ("accepted", "replayed", "unsigned", "bad_request", "forbidden", "not_waiting")


class ChannelMembers(Protocol):
    """Whether a Slack user is a member of a channel; None when it cannot tell now."""

    def is_member(self, channel: str, user: str) -> bool | None: ...


class SlackChannelMembers:
    """``conversations.members`` through slack_sdk (scopes ``channels:read``, ``groups:read``),
    each channel's member list kept for ``ttl`` seconds of ``clock``: a burst of clicks costs
    one call. At most ``max_channels`` lists are kept."""

    def __init__(self, client: Any, clock: Clock, ttl: float = 60.0, max_channels: int = 100) -> None:
        if not ttl >= 0:
            raise ValueError(f"ttl must be >= 0 seconds, got {ttl}")
        self.client = client
        self.clock = clock
        self.ttl = ttl
        self.max_channels = max_channels
        self._lists: dict[str, tuple[float, frozenset[str]]] = {}  # channel -> (read at, members)
        self._lock = threading.Lock()

    def is_member(self, channel: str, user: str) -> bool | None:
        now = self.clock.now()
        with self._lock:
            kept = self._lists.get(channel)
        if kept is None or now - kept[0] > self.ttl:
            members = self._read(channel)
            if members is None:
                return None
            kept = (now, members)
            with self._lock:
                if len(self._lists) >= self.max_channels:
                    self._lists.pop(min(self._lists, key=lambda c: self._lists[c][0]))
                self._lists[channel] = kept
        return user in kept[1]

    def _read(self, channel: str) -> frozenset[str] | None:
        members: set[str] = set()
        cursor = None
        try:
            for _page in range(100):  # 100 pages of 1000: a bound, not a limit anyone meets
                answer = self.client.conversations_members(channel=channel, limit=1000, cursor=cursor)
                members.update(answer.get("members") or ())
                cursor = (answer.get("response_metadata") or {}).get("next_cursor")
                if not cursor:
                    return frozenset(members)
        except Exception as exc:  # API error, network: cannot tell, so the click is refused
            log.warning("slack.members_failed", channel=channel, error=f"{type(exc).__name__}: {exc}")
            return None
        return frozenset(members)


class SeenRequests:
    """The signatures of the requests acted on, each kept until its timestamp is past the
    window (after that the verifier refuses a replay as stale). Bounded: past ``capacity`` the
    entry that expires first goes (replaying a flood of validly signed requests needs the
    signing secret)."""

    def __init__(self, window: float = SLACK_MAX_AGE, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.window = window
        self.capacity = capacity
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def claim(self, signature: str, signed_at: float, now: float) -> bool:
        """True the first time ``signature`` is seen within the window (it is claimed), False
        for a replay."""
        with self._lock:
            while self._heap and (self._heap[0][0] < now or len(self._until) >= self.capacity):
                until, old = heapq.heappop(self._heap)
                if self._until.get(old) == until:
                    del self._until[old]
            if signature in self._until:
                return False
            # +1: the verifier accepts a timestamp up to the window's edge, inclusive.
            until = signed_at + self.window + 1.0
            self._until[signature] = until
            heapq.heappush(self._heap, (until, signature))
            return True

    def release(self, signature: str) -> None:
        """The claimed request failed before it had an effect: a retry must be acted on."""
        with self._lock:
            self._until.pop(signature, None)

    def __len__(self) -> int:
        return len(self._until)


class SlackInteractions:
    """Handles one interaction request: :meth:`handle` returns (HTTP status, JSON answer).

    ``approvers(deployment)`` and ``responders(deployment)`` are Slack user ids;
    ``waiting(incident_id)`` says whether a rollback of the incident waits for approval now;
    ``members`` checks channel membership when a deployment lists no responders (None: then
    only listed responders may acknowledge or silence). Also a Prometheus collector:
    ``rollbackd_slack_interactions_total{action, outcome}``.

    Slack shows the person who pressed a button nothing of the HTTP answer: what they should
    read (recorded, refused and why, already recorded) goes to the payload's ``response_url`` as
    an ephemeral message, posted by ``respond`` off the request thread (Slack wants the answer
    within three seconds).
    """

    ACTIONS = {"rollbackd_approve": "approve", "rollbackd_reject": "reject",
               "rollbackd_ack": "acknowledge", "rollbackd_silence": "silence"}
    SILENCE_FOR = 3600.0

    def __init__(
        self,
        signing_secret: str | bytes,
        ledger_path: str,
        *,
        approvers: Callable[[str], tuple[str, ...]],
        responders: Callable[[str], tuple[str, ...]],
        waiting: Callable[[str], bool],
        members: ChannelMembers | None = None,
        clock: Clock | None = None,
        ledger_key: bytes | None = None,
        seen: SeenRequests | None = None,
        respond: Callable[[str, str], None] | None = None,
    ) -> None:
        secret = signing_secret.decode() if isinstance(signing_secret, bytes) else signing_secret
        if not secret or not secret.strip():
            raise ValueError("signing_secret must not be empty")
        self.clock = clock or WallClock()
        self.verifier = SignatureVerifier(secret, clock=self.clock)  # the daemon's clock, not time.time()
        self.ledger_path = ledger_path
        self.ledger_key = ledger_key  # the daemon's: the ledger chains these rows under it
        self.approvers = approvers
        self.responders = responders
        self.waiting = waiting
        self.members = members
        self.seen = seen or SeenRequests()
        self.respond = respond or EphemeralReplies().send
        # Every series from the start, at 0: an alert on increase() needs it before the first one.
        self.counts: dict[tuple[str, str], int] = {
            (action, outcome): 0 for action in self.ACTIONS.values() for outcome in OUTCOMES if outcome != "unsigned"}
        self.counts.update({("unknown", "unsigned"): 0, ("unknown", "bad_request"): 0})
        self._count_lock = threading.Lock()

    # Prometheus ------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "rollbackd_slack_interactions",
            "Slack button presses by action and outcome (accepted, replayed: a signature seen "
            "before, unsigned, bad_request, forbidden, not_waiting: nothing waits for approval).",
            labels=["action", "outcome"])
        with self._count_lock:
            counts = dict(self.counts)
        for (action, outcome), n in sorted(counts.items()):
            c.add_metric([action, outcome], n)
        yield c

    def _count(self, action: str, outcome: str) -> None:
        with self._count_lock:
            self.counts[(action, outcome)] = self.counts.get((action, outcome), 0) + 1

    # The request -----------------------------------------------------------------------
    def verify(self, body: bytes, timestamp: str | None, signature: str | None) -> str | None:
        """Why the request is refused, or None."""
        if not timestamp or not signature:
            return "missing signature headers"
        if not _TIMESTAMP.fullmatch(timestamp):
            return "bad timestamp"
        try:
            valid = self.verifier.is_valid(body, timestamp, signature)
        except (UnicodeDecodeError, ValueError):  # it decodes the body as UTF-8 to sign it
            valid = False
        if valid:
            return None
        if abs(self.clock.now() - int(timestamp)) > SLACK_MAX_AGE:
            return "stale request (older than five minutes)"
        return "bad signature"

    def handle(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        timestamp, signature = headers.get("X-Slack-Request-Timestamp"), headers.get("X-Slack-Signature")
        refused = self.verify(body, timestamp, signature)
        if refused is not None:
            self._count("unknown", "unsigned")
            log.warning("slack.refused", reason=refused)
            return 401, {"error": refused}
        assert timestamp is not None and signature is not None
        try:
            payload = json.loads(parse_qs(body.decode())["payload"][0])
            action = payload["actions"][0]
            incident_id, deployment = str(action["value"]).split("|", 1)
            user = payload["user"]["id"]
            channel = (payload.get("channel") or {}).get("id") or (payload.get("container") or {}).get("channel_id")
            response_url = payload.get("response_url")
        except (KeyError, IndexError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            self._count("unknown", "bad_request")
            return 400, {"error": "not a Slack block_actions payload from rollbackd"}
        decision = self.ACTIONS.get(action.get("action_id"))
        if decision is None:
            self._count("unknown", "bad_request")
            return 400, {"error": f"unknown action {action.get('action_id')!r}"}
        if not isinstance(user, str) or not SLACK_USER_ID.fullmatch(user):
            self._count(decision, "bad_request")
            return 400, {"error": "the payload's user has no Slack user id"}
        now = self.clock.now()
        if not self.seen.claim(signature, int(timestamp), now):
            self._count(decision, "replayed")
            log.warning("slack.replayed", action=decision, incident=incident_id, user=user)
            # Slack's own retry of a press already answered: the person was told then.
            return 200, {"response_type": "ephemeral", "replace_original": False,
                         "text": "Already recorded."}
        try:
            status, answer = self._act(decision, incident_id, deployment, user, channel, now)
        except BaseException:
            self.seen.release(signature)  # nothing recorded: Slack's retry must count
            raise
        if status != 200:
            self.seen.release(signature)
        if isinstance(response_url, str) and response_url.startswith(("https://", "http://")):
            self.respond(response_url, answer["text"])
        return status, answer

    def _may(self, decision: str, incident_id: str, deployment: str, user: str,
             channel: str | None) -> tuple[str, str] | None:
        """(outcome, why) when ``user`` may not do ``decision`` now, else None."""
        if decision in ("approve", "reject"):
            if user not in self.approvers(deployment):
                return "forbidden", f"You are not an approver of {deployment}."
            if not self.waiting(incident_id):
                return "not_waiting", f"No rollback of {incident_id} waits for approval now."
            return None
        listed = self.responders(deployment)
        if listed:
            return None if user in listed else ("forbidden", f"You are not a responder of {deployment}.")
        member = self.members.is_member(channel, user) if self.members is not None and channel else None
        if member is None:
            return "forbidden", (f"Cannot check that you are in this channel; ask for `slack_responders` "
                                 f"on {deployment}.")
        return None if member else ("forbidden", "Only members of this channel may do that.")

    def _act(self, decision: str, incident_id: str, deployment: str, user: str, channel: str | None,
             now: float) -> tuple[int, dict[str, Any]]:
        refused = self._may(decision, incident_id, deployment, user, channel)
        if refused is not None:
            outcome, why = refused
            self._count(decision, outcome)
            log.warning("slack.refused", action=decision, incident=incident_id, user=user, reason=outcome)
            return (403 if outcome == "forbidden" else 409), {
                "response_type": "ephemeral", "replace_original": False, "text": why}
        from rollbackd.daemon.ledger import Ledger

        wall = datetime.fromtimestamp(now, timezone.utc).isoformat()
        ledger = Ledger(self.ledger_path, run_id="slack", key=self.ledger_key)
        try:
            if decision == "acknowledge":
                ledger.acknowledge(incident_id, user, now, wall)
                text = f"{incident_id}: acknowledged by <@{user}>; no repeat notices until it escalates."
            elif decision == "silence":
                from rollbackd.rules.silences import Silence

                sil = Silence(id="sil-" + hashlib.sha256(f"{incident_id}|{user}|{now}".encode()).hexdigest()[:10],
                              deployment=deployment, starts_at=now, ends_at=now + self.SILENCE_FOR,
                              reason=f"silenced from Slack during {incident_id}", created_by=user)
                ledger.add_silence(sil, wall)
                text = f"{deployment}: silenced for 1h by <@{user}> ({sil.id})."
            else:
                ledger.add_approval(incident_id, decision, user, now, wall, source="slack")
                text = f"{incident_id}: {decision}d by <@{user}>; rollbackd acts at its next window boundary."
        finally:
            ledger.close()
        self._count(decision, "accepted")
        log.info("slack.accepted", action=decision, incident=incident_id, deployment=deployment, user=user)
        return 200, {"response_type": "ephemeral", "replace_original": False, "text": text}


class EphemeralReplies:
    """Posts "only you can see this" replies to interactions' ``response_url`` with slack_sdk's
    ``WebhookClient``, on one worker thread behind a bounded queue: a slow or failing Slack
    never holds a request (Slack wants its answer within three seconds); when the queue is full
    a reply is dropped and logged, never waited for."""

    def __init__(self, limit: int = 100, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue(maxsize=limit)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, url: str, text: str) -> None:
        try:
            self._queue.put_nowait((url, text))
        except queue.Full:
            log.warning("slack.reply_dropped", reason="queue full")
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rollbackd-slack-replies", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        from slack_sdk.webhook import WebhookClient

        while True:
            url, text = self._queue.get()
            try:
                answer = WebhookClient(url, timeout=int(self.timeout)).send(
                    text=text, response_type="ephemeral", replace_original=False)
                if answer.status_code != 200:
                    log.warning("slack.reply_failed", status=answer.status_code, body=answer.body[:200])
            except Exception as exc:  # noqa: BLE001  one reply's failure never stops the next
                log.warning("slack.reply_failed", error=f"{type(exc).__name__}: {exc}")


def slack_interactions(
    config: Any, pipeline: Any, signing_secret: str, ledger_path: str, *,
    ledger_key: bytes | None = None, env: Mapping[str, str] | None = None, clock: Clock | None = None,
) -> SlackInteractions:
    """The endpoint for a live daemon: who may press what from ``config``, what waits from
    ``pipeline.awaiting``, channel membership through the Slack notifier's token (when there is one)."""
    clock = clock or WallClock()
    env = os.environ if env is None else env

    def approvers(deployment: str) -> tuple[str, ...]:
        spec = config.deployment(deployment).approval
        return spec.approvers if spec is not None else ()

    def responders(deployment: str) -> tuple[str, ...]:
        return config.deployment(deployment).slack_responders

    def waiting(incident_id: str) -> bool:
        return any(w["incident_id"] == incident_id for w in dict(pipeline.awaiting).values())

    return SlackInteractions(signing_secret, ledger_path, approvers=approvers, responders=responders,
                             waiting=waiting, members=_members(config, env, clock), clock=clock,
                             ledger_key=ledger_key)


def _members(config: Any, env: Mapping[str, str], clock: Clock) -> ChannelMembers | None:
    from slack_sdk import WebClient

    from rollbackd.actions.factory import secret_option, slack_spec

    spec = slack_spec(config.settings)
    options: Mapping[str, Any] = spec.options if spec is not None else {}
    try:
        token = secret_option("slack notifier", options, "token", env, "SLACK_BOT_TOKEN")
    except ValueError:  # the notifier itself refuses to start on this; the buttons then check no membership
        token = None
    if not token:
        return None
    # A short timeout: Slack wants the answer to a button press within three seconds.
    client = WebClient(token=token, base_url=str(options.get("base_url") or "https://slack.com/api/"), timeout=2)
    return SlackChannelMembers(client, clock)
