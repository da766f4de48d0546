"""Slack, done right (issue 15): who may press which button (by Slack user id only), replayed
requests recorded once, Approve / Reject only while a rollback waits and then replaced by who
decided, Acknowledge stopping repeat notices. Against the daemon's own HTTP server on loopback
with requests signed as Slack signs them, and a loopback stand-in for the Slack Web API."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from loopback import LoopbackServer, Recorded, Reply
from prometheus_client import CollectorRegistry
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier
from test_approval import BAD_VERSION
from test_slack import TOKEN
from test_slack_thread import SlackWithUpdate

from rollbackd.actions.slack import SlackNotifier
from rollbackd.daemon.audit import verify_ledger as verify_chain
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.http import OpsServer
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.daemon.slack_actions import SeenRequests, SlackChannelMembers, SlackInteractions, slack_interactions
from rollbackd.rules.incidents import IncidentBook
from rollbackd.rules.loader import ConfigError, load_config_text
from rollbackd.rules.model import GroupingSpec, RuleSpec
from rollbackd.scenarios import write_recording

NOW = 1_790_000_000.0
CHANNEL = "C0LOOPBACK"
SECRET = b"8f742231b10e8888abcd99yyyzzz85a5"


class FixedClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


def sign(body: bytes, ts: float, secret: bytes = SECRET) -> dict[str, str]:
    """The headers Slack sends: its documented v0 signature, computed here by hand (not by the
    slack_sdk code under test)."""
    stamp = str(int(ts))
    sig = "v0=" + hmac.new(secret, f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": sig,
            "Content-Type": "application/x-www-form-urlencoded"}


class SlackWorkspace(SlackWithUpdate):
    """The Web API stand-in, also answering ``conversations.members`` (in pages of two, so the
    cursor is followed) with ``members`` for the channel ``C0LOOPBACK``."""

    def __init__(self, token: str, members: tuple[str, ...] = ()) -> None:
        super().__init__(token)
        self.members = members

    def __call__(self, request: Recorded) -> Reply:
        url = urlsplit(request.path)
        if url.path.endswith("/conversations.members"):
            if request.header("Authorization") != f"Bearer {self.token}":
                return Reply(200, body={"ok": False, "error": "invalid_auth"})
            q = {k: v[-1] for k, v in parse_qs(url.query or request.body.decode()).items()}
            if q.get("channel") != CHANNEL:
                return Reply(200, body={"ok": False, "error": "channel_not_found"})
            start = int(q.get("cursor") or 0)
            page = self.members[start:start + 2]
            more = start + 2 < len(self.members)
            return Reply(200, body={"ok": True, "members": list(page),
                                    "response_metadata": {"next_cursor": str(start + 2) if more else ""}})
        return super().__call__(request)


def payload(action: str, user: dict[str, str], incident: str = "inc-7f3a", deployment: str = "fraud",
            channel: str = CHANNEL, response_url: str | None = None) -> bytes:
    p = {"type": "block_actions", "user": user, "channel": {"id": channel, "name": "ml-alerts"},
         "container": {"type": "message", "channel_id": channel, "message_ts": "1700000000.000001"},
         "actions": [{"action_id": action, "value": f"{incident}|{deployment}"}]}
    if response_url is not None:
        p["response_url"] = response_url
    return urlencode({"payload": json.dumps(p)}).encode()


def post(server: OpsServer, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/v1/slack/interactions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def press(server: OpsServer, action: str, user: dict[str, str], at: float = NOW, **kw: str) -> tuple[int, dict]:
    body = payload(action, user, **kw)
    return post(server, body, sign(body, at))


def metric(server: OpsServer, action: str, outcome: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    line = f'rollbackd_slack_interactions_total{{action="{action}",outcome="{outcome}"}} '
    found = [ln for ln in text.splitlines() if ln.startswith(line)]
    assert found, f"no series {line}"  # every series exists from the start, at 0
    return float(found[0].split()[-1])


def rows(db, table: str) -> list[dict]:
    ledger = Ledger(db)
    try:
        return ledger.rows(table)
    finally:
        ledger.close()


ALICE = {"id": "U0ALICE", "username": "alice", "name": "alice"}
BOB = {"id": "U0BOB", "username": "bob", "name": "bob"}
CAROL = {"id": "U0CAROL", "username": "carol", "name": "carol"}  # in the channel, listed nowhere
MALLORY_AS_ALICE = {"id": "U0MALLORY", "username": "alice", "name": "alice"}


@pytest.fixture(scope="module")
def workspace():
    with LoopbackServer(SlackWorkspace(TOKEN, members=("U0ALICE", "U0BOB", "U0CAROL"))) as api:
        yield api


@pytest.fixture
def endpoint(tmp_path, workspace):
    """fraud: approvers alice (by id) and "bob" (a CLI name), responders bob; payments: no
    approval, no responders (anyone in the channel). A rollback of inc-7f3a waits."""
    db = tmp_path / "l.db"
    Ledger(db).close()
    clock = FixedClock(NOW)
    waiting = {"inc-7f3a"}
    slack = SlackInteractions(
        SECRET, str(db),
        approvers=lambda d: ("U0ALICE", "bob", "alice") if d == "fraud" else (),
        responders=lambda d: ("U0BOB",) if d == "fraud" else (),
        waiting=lambda incident: incident in waiting,
        members=SlackChannelMembers(WebClient(token=TOKEN, base_url=workspace.url + "/api/"), clock),
        clock=clock,
    )
    with OpsServer(CollectorRegistry(), None, port=0, slack=slack) as server:
        yield server, db, waiting
    assert server.errors == []


# Who may press what -------------------------------------------------------------------------
def test_acknowledge_and_silence_work_on_a_deployment_without_approval(endpoint):
    """Found: every button answered 403 to everyone on deployments without `approval`."""
    server, db, _ = endpoint
    status, answer = press(server, "rollbackd_ack", CAROL, deployment="payments")
    assert status == 200 and "acknowledged by <@U0CAROL>" in answer["text"]
    status, answer = press(server, "rollbackd_silence", ALICE, deployment="payments")
    assert status == 200 and "payments: silenced for 1h by <@U0ALICE>" in answer["text"]
    # Not a member of the channel the message is in: refused.
    status, answer = press(server, "rollbackd_ack", {"id": "U0STRANGER"}, deployment="payments")
    assert status == 403 and answer["text"] == "Only members of this channel may do that."
    assert [(r["incident_id"], r["by"], r["at"]) for r in rows(db, "acknowledgements")] == [
        ("inc-7f3a", "U0CAROL", NOW)]
    assert [(r["deployment"], r["created_by"], r["starts_at"], r["ends_at"]) for r in rows(db, "silences")] == [
        ("payments", "U0ALICE", NOW, NOW + 3600)]
    assert rows(db, "approvals") == []  # neither counts as an answer to a waiting rollback
    assert verify_chain(db).breaks == []
    # Nobody approves where nothing asks for approval.
    status, answer = press(server, "rollbackd_approve", CAROL, deployment="payments")
    assert status == 403 and "not an approver of payments" in answer["text"]
    assert metric(server, "acknowledge", "accepted") == 1 and metric(server, "acknowledge", "forbidden") == 1


def test_listed_responders_replace_the_channel(endpoint):
    server, db, _ = endpoint
    assert press(server, "rollbackd_ack", BOB)[0] == 200
    status, answer = press(server, "rollbackd_silence", CAROL)  # in the channel, not a responder
    assert status == 403 and answer["text"] == "You are not a responder of fraud."
    assert [r["by"] for r in rows(db, "acknowledgements")] == ["U0BOB"]
    assert rows(db, "silences") == []


def test_users_are_matched_by_id_never_by_name(endpoint):
    """Found: {"id": "U0MALLORY", "username": "alice"} approved as alice."""
    server, db, _ = endpoint
    status, answer = press(server, "rollbackd_approve", MALLORY_AS_ALICE)
    assert status == 403 and "not an approver of fraud" in answer["text"]
    status, _ = press(server, "rollbackd_reject", {"id": "U0BOBBY", "username": "bob", "name": "bob"})
    assert status == 403
    status, answer = press(server, "rollbackd_approve", {"id": "U0ALICE", "username": "someone-else"})
    assert status == 200 and "approved by <@U0ALICE>" in answer["text"]
    assert [(r["decision"], r["by"], r["source"]) for r in rows(db, "approvals")] == [("approve", "U0ALICE", "slack")]
    # A payload without a user id is not a Slack click; nor is an action rollbackd never sent.
    assert press(server, "rollbackd_ack", {"username": "bob"})[0] == 400
    assert press(server, "rollbackd_launch", ALICE)[0] == 400


def test_approve_and_reject_only_while_a_rollback_waits(endpoint):
    server, db, waiting = endpoint
    waiting.clear()  # the rollback ran (or was rejected, or timed out)
    status, answer = press(server, "rollbackd_approve", ALICE)
    assert status == 409 and answer["text"] == "No rollback of inc-7f3a waits for approval now."
    assert rows(db, "approvals") == []
    assert metric(server, "approve", "not_waiting") == 1


def test_the_person_who_pressed_is_told_through_the_response_url(endpoint):
    """Slack shows nothing of the HTTP answer to a button press: the verdict (refused and why,
    recorded) reaches the person as an ephemeral message posted to the payload's response_url,
    here a real HTTP server on loopback."""
    server, db, _ = endpoint
    with LoopbackServer() as hooks:
        status, _ = press(server, "rollbackd_approve", CAROL, response_url=hooks.url + "/actions/T0/1/refused")
        assert status == 403
        status, _ = press(server, "rollbackd_ack", BOB, response_url=hooks.url + "/actions/T0/2/ok")
        assert status == 200
        deadline = time.monotonic() + 5
        while len(hooks.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    said = {r.path: r.json() for r in hooks.requests}
    assert said == {
        "/actions/T0/1/refused": {"text": "You are not an approver of fraud.", "response_type": "ephemeral",
                                  "replace_original": False},
        "/actions/T0/2/ok": {"text": "inc-7f3a: acknowledged by <@U0BOB>; no repeat notices until it escalates.",
                             "response_type": "ephemeral", "replace_original": False},
    }


# Signatures and replays ---------------------------------------------------------------------
def test_a_replayed_request_is_recorded_once(endpoint):
    """Found: the same signed request sent three times within five minutes recorded three
    approvals."""
    server, db, _ = endpoint
    body = payload("rollbackd_approve", ALICE)
    headers = sign(body, NOW - 20)
    answers = [post(server, body, headers) for _ in range(3)]
    assert [status for status, _ in answers] == [200, 200, 200]  # Slack retries what it got no 200 for
    assert "approved by <@U0ALICE>" in answers[0][1]["text"]
    assert answers[1][1]["text"] == answers[2][1]["text"] == "Already recorded."
    assert [r["by"] for r in rows(db, "approvals")] == ["U0ALICE"]
    assert metric(server, "approve", "accepted") == 1 and metric(server, "approve", "replayed") == 2
    # The same click signed again (a new timestamp, a new signature) is a new request.
    assert post(server, body, sign(body, NOW - 10))[0] == 200
    assert len(rows(db, "approvals")) == 2
    assert verify_chain(db).breaks == []


def test_a_refused_request_is_not_taken_for_a_replay(endpoint):
    """Only requests that had an effect are remembered: the same signed request, refused
    while nothing waited, counts once a rollback waits."""
    server, db, waiting = endpoint
    body = payload("rollbackd_approve", ALICE)
    headers = sign(body, NOW)
    waiting.clear()
    assert post(server, body, headers)[0] == 409
    waiting.add("inc-7f3a")
    assert post(server, body, headers)[0] == 200
    assert len(rows(db, "approvals")) == 1


def test_signatures_are_checked_by_slack_sdk_on_the_daemons_clock(endpoint):
    server, db, _ = endpoint
    slack = server.slack
    assert isinstance(slack.verifier, SignatureVerifier) and slack.verifier.clock is slack.clock
    body = payload("rollbackd_approve", ALICE)
    # Signed now by the machine's clock, but five minutes off the daemon's: stale.
    assert abs(time.time() - NOW) > 300
    assert post(server, body, sign(body, time.time())) == (401, {"error": "stale request (older than five minutes)"})
    assert post(server, body, sign(body, NOW - 301)) == (401, {"error": "stale request (older than five minutes)"})
    assert post(server, body, sign(body, NOW, secret=b"not the secret")) == (401, {"error": "bad signature"})
    tampered = sign(body, NOW)
    assert post(server, payload("rollbackd_approve", BOB), tampered) == (401, {"error": "bad signature"})
    assert post(server, body, {**sign(body, NOW), "X-Slack-Request-Timestamp": "1e9"}) == (
        401, {"error": "bad timestamp"})
    assert post(server, body, {"Content-Type": "application/x-www-form-urlencoded"})[0] == 401
    junk = b"\xff\xfe payload"
    assert post(server, junk, sign(junk, NOW))[0] in (400, 401)
    assert rows(db, "approvals") == []
    assert metric(server, "unknown", "unsigned") >= 6


def test_seen_requests_expire_and_stay_bounded():
    seen = SeenRequests(window=300, capacity=3)
    assert seen.claim("a", NOW, NOW) and not seen.claim("a", NOW, NOW + 300)
    assert seen.claim("a", NOW, NOW + 302)  # past the window: the verifier refuses it as stale anyway
    for sig in "bcde":
        assert seen.claim(sig, NOW + 10, NOW + 10)
    assert len(seen) == 3
    seen.release("e")
    assert seen.claim("e", NOW + 10, NOW + 10)


def test_channel_members_are_read_once_per_ttl(workspace):
    clock = FixedClock(NOW)
    members = SlackChannelMembers(WebClient(token=TOKEN, base_url=workspace.url + "/api/"), clock, ttl=60)
    before = len(workspace.requests)
    assert members.is_member(CHANNEL, "U0CAROL") is True  # on the second page: the cursor is followed
    assert members.is_member(CHANNEL, "U0NOBODY") is False
    assert len(workspace.requests) - before == 2  # two pages, once
    clock.t += 61
    assert members.is_member(CHANNEL, "U0ALICE") is True and len(workspace.requests) - before == 4
    assert members.is_member("C0ELSEWHERE", "U0ALICE") is None  # channel_not_found: cannot tell
    wrong = SlackChannelMembers(WebClient(token="xoxb-wrong", base_url=workspace.url + "/api/"), clock)
    assert wrong.is_member(CHANNEL, "U0ALICE") is None


def test_the_daemons_endpoint_reads_members_with_the_slack_notifiers_token(workspace, tmp_path):
    cfg = load_config_text(
        "version: 1\nsettings: {notifier: {type: slack, channel: '#ml-alerts', token_env: TEAM_TOKEN, "
        f"base_url: '{workspace.url}/api/'}}}}\nrules: []\n")
    slack = slack_interactions(cfg, None, SECRET.decode(), str(tmp_path / "l.db"), env={"TEAM_TOKEN": TOKEN},
                               clock=FixedClock(NOW))
    assert isinstance(slack.members, SlackChannelMembers)
    assert slack.members.is_member(CHANNEL, "U0BOB") is True
    assert slack.responders("payments") == () and slack.approvers("payments") == ()
    assert slack_interactions(cfg, None, SECRET.decode(), str(tmp_path / "l.db"), env={}).members is None


# Configuration ------------------------------------------------------------------------------
def test_responders_must_be_slack_user_ids():
    base = "version: 1\ndeployments:\n  fraud:\n    slack_responders: {}\nrules: []\n"
    assert load_config_text(base.format("[U0BOB, W0GRID]")).deployment("fraud").slack_responders == ("U0BOB", "W0GRID")
    with pytest.raises(ConfigError) as err:
        load_config_text(base.format("[U0BOB, alice, '@bob']"))
    message = str(err.value)
    assert "deployments.fraud.slack_responders" in message
    assert "'alice', '@bob': not a Slack user id (U… or W…" in message and "never by name" in message
    with pytest.raises(ConfigError, match="must not be empty"):
        load_config_text(base.format("[]"))


# The parent message and the engine ----------------------------------------------------------
RULES = """
version: 1
settings: {{lateness: 30s, notifier: {{type: none}}}}
grouping: {{group_by: [deployment, variant], group_wait: 30s, repeat_interval: {repeat}}}
deployments:
  demo-scorer:
    backend: {{type: log}}
    known_good_after: 5m
    slack_responders: [U0BOB]
{approval}rules:
  - {{name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, for: 2m, min_samples: 100, severity: critical, actions: [{actions}]}}
"""
APPROVAL = "    approval: {approvers: [U0ALICE, bob], timeout: 10m, default: reject}\n"


def config(approval: str = APPROVAL, actions: str = "notify, rollback", repeat: str = "4h"):
    return load_config_text(RULES.format(approval=approval, actions=actions, repeat=repeat))


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("slack") / "bad.jsonl.gz"
    write_recording(BAD_VERSION, path)
    return path


def run(recording, cfg, db, api: LoopbackServer | None = None, run_id: str = "r"):
    ledger = Ledger(db, run_id=run_id)
    d = MemoryDecisions()
    notifier = SlackNotifier(TOKEN, "#ml-alerts", base_url=api.url + "/api/") if api is not None else None
    pipeline = build_pipeline(cfg, decisions=d, recorder=ledger, notifier=notifier)
    replay(open_recording(str(recording), cfg), pipeline, batch_size=4096)
    ledger.close()
    return d.records, pipeline


def parents(api: LoopbackServer) -> list[tuple[str, list[str], str]]:
    """Each version of the parent message: (Slack method, its buttons, its status line)."""
    out = []
    for r in api.requests:
        method = urlsplit(r.path).path.rsplit("/", 1)[1]
        if method not in ("chat.postMessage", "chat.update"):
            continue
        body = r.json()
        if body.get("thread_ts"):
            continue  # a reply: no buttons
        blocks = body["blocks"]
        buttons = [e["action_id"] for b in blocks if b["type"] == "actions" for e in b["elements"]]
        status = [b["text"]["text"] for b in blocks
                  if b["type"] == "section" and "text" in b and b["text"]["text"].startswith(":")]
        out.append((method, buttons, status[0] if status else ""))
    return out


def test_approve_shows_only_while_the_rollback_waits_and_then_who_decided(recording, tmp_path):
    """Found: Approve still showed after the rollback ran."""
    cfg = config()
    records, _ = run(recording, cfg, tmp_path / "probe.db")
    ask = next(r for r in records if r.get("status") == "pending_approval")
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    ledger.add_approval(ask["incident_id"], "approve", "U0ALICE", ask["ts"] + 95, "wall", source="slack")
    ledger.close()
    with LoopbackServer(SlackWorkspace(TOKEN)) as api:
        records, _ = run(recording, cfg, db, api)
        versions = parents(api)
    assert [r["status"] for r in records if r.get("action") == "rollback"] == ["pending_approval", "succeeded"]
    first, *updates = versions
    assert first == ("chat.postMessage", ["rollbackd_approve", "rollbackd_reject", "rollbackd_ack",
                                          "rollbackd_silence"], ":hourglass: The rollback waits for an approver.")
    decided = [v for v in updates if "approved" in v[2]]
    assert decided, updates
    # From the first update after the answer on, no Approve / Reject: who decided instead.
    at = updates.index(decided[0])
    assert all(v[1][:2] != ["rollbackd_approve", "rollbackd_reject"] for v in updates[at:])
    assert decided[0] == ("chat.update", ["rollbackd_ack", "rollbackd_silence"],
                          ":white_check_mark: Rollback approved by <@U0ALICE>.")


def test_a_timed_out_approval_says_nobody_answered(recording, tmp_path):
    with LoopbackServer(SlackWorkspace(TOKEN)) as api:
        records, _ = run(recording, config(), tmp_path / "l.db", api)
        versions = parents(api)
    assert [r["status"] for r in records if r.get("action") == "rollback"] == ["pending_approval", "skipped"]
    last = [v for v in versions if v[0] == "chat.update"][-1]
    assert last[2].startswith(":alarm_clock: Nobody answered in time: rollback rejected by default.")
    assert "rollbackd_approve" not in last[1]


def test_without_approval_the_parent_has_no_approve_button(recording, tmp_path):
    with LoopbackServer(SlackWorkspace(TOKEN)) as api:
        run(recording, config(approval=""), tmp_path / "l.db", api)
        versions = parents(api)
    assert versions and all("rollbackd_approve" not in v[1] and "rollbackd_reject" not in v[1] for v in versions)
    assert versions[0][1] == ["rollbackd_ack", "rollbackd_silence"]


def test_acknowledge_from_slack_stops_repeat_notices(recording, tmp_path):
    """Found: Acknowledge did not stop repeat notices. The press goes through the daemon's HTTP
    endpoint into the ledger; the pipeline reads it by event time."""
    cfg = config(approval="", actions="notify", repeat="5m")
    probe_records, probe = run(recording, cfg, tmp_path / "probe.db")
    opened = next(r for r in probe_records if r["kind"] == "incident" and r["state"] == "opened")
    repeats = [r["ts"] for r in probe_records if r.get("notice") == "repeat"]
    assert len(repeats) >= 4  # open for the rest of the recording: a repeat every 5 minutes
    acked_at = repeats[1] + 30.0
    db = tmp_path / "l.db"
    Ledger(db).close()
    slack = slack_interactions(cfg, probe, SECRET.decode(), str(db), env={}, clock=FixedClock(acked_at))
    with OpsServer(CollectorRegistry(), None, port=0, slack=slack) as server:
        stranger = press(server, "rollbackd_ack", ALICE, at=acked_at, incident=opened["incident_id"],
                         deployment="demo-scorer")
        status, answer = press(server, "rollbackd_ack", BOB, at=acked_at, incident=opened["incident_id"],
                               deployment="demo-scorer")
    assert stranger[0] == 403  # not among demo-scorer's slack_responders
    assert status == 200, answer
    with LoopbackServer(SlackWorkspace(TOKEN)) as api:
        records, _ = run(recording, cfg, db, api)
        versions = parents(api)
    got = [r["ts"] for r in records if r.get("notice") == "repeat"]
    assert got == [t for t in repeats if t < acked_at] == repeats[:2]
    (ack,) = [r for r in records if r["kind"] == "incident" and r["state"] == "acknowledged"]
    assert (ack["by"], ack["acknowledged_at"], ack["incident_id"]) == ("U0BOB", acked_at, opened["incident_id"])
    ledger = Ledger(db)
    in_ledger = ledger.rows("incidents", change="acknowledged")
    ledger.close()
    assert len(in_ledger) == 1 and json.loads(in_ledger[0]["data"])["by"] == "U0BOB"
    # The parent says who took it and drops its Acknowledge button.
    assert versions[-1] == ("chat.update", ["rollbackd_silence"],
                            ":eyes: Acknowledged by <@U0BOB>: no repeat notices until it escalates.")
    assert all("rollbackd_ack" in v[1] for v in versions[:-1])


# The incident book: an acknowledgement holds until the incident escalates -------------------
def _rule(name: str, severity: str, actions: tuple[str, ...]) -> RuleSpec:
    return RuleSpec(name=name, detector="error_rate", threshold=0.05, severity=severity, actions=actions)


def test_an_escalation_ends_the_acknowledgement():
    """Tick table, repeat_interval 60 s: repeats until acknowledged at t=150; none after; the
    more severe alert at t=400 escalates and repeats resume; an acknowledgement given before the
    escalation does not count again."""
    book = IncidentBook(GroupingSpec(group_by=("deployment",), group_wait=0.0, repeat_interval=60.0))
    warn, crit = _rule("drift", "warning", ("notify",)), _rule("errors", "critical", ("notify", "rollback"))
    book.alert_fired(warn, "a1", "d", "primary", 0.0, {}, (0.0, 1.0))
    (inc,) = book.open.values()

    def repeats(t0: float, t1: float) -> list[float]:
        out = []
        for t in range(int(t0), int(t1) + 1, 10):
            for e in book.tick(float(t)):
                if getattr(e, "kind", None) == "repeat":
                    out.append(e.ts)
                    book.noticed(inc, e.ts, None)
                elif getattr(e, "kind", None) == "opened":
                    book.noticed(inc, e.ts, None)
        return out

    assert repeats(0, 140) == [60.0, 120.0]
    effects = book.acknowledged(inc, "U0BOB", 150.0, 150.0)
    assert [type(e).__name__ for e in effects] == ["IncidentChange", "NoticeDue"]
    assert book.acknowledged(inc, "U0CAROL", 160.0, 160.0) == []  # already taken
    assert repeats(150, 390) == [] and book.next_deadline() is None
    escalation = book.alert_fired(crit, "a2", "d", "primary", 400.0, {}, (399.0, 400.0))
    assert "escalated" in [getattr(e, "change", None) for e in escalation]
    assert inc.acknowledged_by is None
    book.noticed(inc, 400.0, None)
    assert book.acknowledged(inc, "U0BOB", 150.0, 410.0) == []  # given before the escalation
    assert repeats(410, 530) == [460.0, 520.0]
    assert book.acknowledged(inc, "U0BOB", 535.0, 540.0) != []
    assert repeats(540, 700) == []


def test_the_live_daemons_endpoint_sees_what_waits(recording, tmp_path):
    """`rollbackd run` builds the endpoint on the daemon's pipelines (one per task) and clock."""
    from rollbackd.actions.base import NullNotifier
    from rollbackd.daemon.run import Daemon

    cfg = config()
    pipeline = build_pipeline(cfg, notifier=NullNotifier())
    daemon = Daemon(pipeline, open_recording(str(recording), cfg))
    slack = slack_interactions(cfg, daemon.pipeline, SECRET.decode(), str(tmp_path / "l.db"), env={},
                               clock=daemon.clock)
    assert not slack.waiting("inc-1")
    daemon.task(0)
    assert daemon.task(1).pipeline is not daemon.task(0).pipeline  # two partitions, two pipelines
    daemon.task(1).pipeline.awaiting["inc-1:primary"] = {"incident_id": "inc-1", "deadline": NOW}
    assert slack.waiting("inc-1") and not slack.waiting("inc-2")
    assert slack.approvers("demo-scorer") == ("U0ALICE", "bob") and slack.responders("demo-scorer") == ("U0BOB",)


@pytest.mark.parametrize("fields,buttons,status", [
    ({}, ["rollbackd_ack", "rollbackd_silence"], None),
    ({"approval": "waiting"}, ["rollbackd_approve", "rollbackd_reject", "rollbackd_ack", "rollbackd_silence"],
     ":hourglass: The rollback waits for an approver."),
    ({"approval": "approve", "approval_by": "U0ALICE"}, ["rollbackd_ack", "rollbackd_silence"],
     ":white_check_mark: Rollback approved by <@U0ALICE>."),
    ({"approval": "reject", "approval_by": "<bob>"}, ["rollbackd_ack", "rollbackd_silence"],
     ":no_entry: Rollback rejected by &lt;bob&gt;."),  # a name from `rollbackd approve`, escaped
    ({"approval": "approve"}, ["rollbackd_ack", "rollbackd_silence"],
     ":alarm_clock: Nobody answered in time: rollback approved by default."),
    ({"acknowledged_by": "W0GRID"}, ["rollbackd_silence"],
     ":eyes: Acknowledged by <@W0GRID>: no repeat notices until it escalates."),
])
def test_the_parent_shows_the_buttons_its_state_allows(fields, buttons, status):
    from dataclasses import replace

    from rollbackd.actions.slack import build_blocks
    from test_slack import NOTICE

    blocks = build_blocks(replace(NOTICE, **fields), buttons=True)
    assert [e["action_id"] for e in blocks[-1]["elements"]] == buttons
    said = [b["text"]["text"] for b in blocks if b["type"] == "section" and b["text"]["text"][:1] == ":"]
    assert said == ([status] if status else [])
    resolved = build_blocks(replace(NOTICE, kind="resolved", **fields), buttons=True)
    assert resolved[-1]["type"] == "context"  # no buttons on a resolved incident; what happened stays
    assert [b for b in resolved if b["type"] == "section" and b["text"]["text"][:1] == ":"] == (
        [{"type": "section", "text": {"type": "mrkdwn", "text": status}}] if status else [])
    late = build_blocks(replace(NOTICE, kind="updated", closed=True, **fields), buttons=True)
    assert late[-1]["type"] == "context"  # a reply after it resolved (a late result) adds none back
    reply = build_blocks(replace(NOTICE, kind="updated", **fields))
    assert all(b["type"] != "actions" for b in reply)
