"""The Slack incident thread: replies edit the parent in place (chat.update); a silence written
to the ledger (Slack's button) applies by event time. The buttons' endpoint is tested in
tests/test_slack_interactions.py."""

from __future__ import annotations

import json
from dataclasses import replace

from loopback import LoopbackServer, Recorded, Reply, SlackAPI
from test_slack import NOTICE, TOKEN

from rollbackd.actions.slack import SlackNotifier
from rollbackd.daemon.ledger import Ledger


class SlackWithUpdate(SlackAPI):
    """The stand-in, also answering ``chat.update`` (or failing it with ``update_error``)."""

    def __init__(self, token: str, update_error: str | None = None) -> None:
        super().__init__(token)
        self.update_error = update_error

    def __call__(self, request: Recorded) -> Reply:
        if request.path.endswith("/chat.update"):
            if self.update_error:
                return Reply(200, body={"ok": False, "error": self.update_error})
            body = request.json()
            return Reply(200, body={"ok": True, "channel": body["channel"], "ts": body["ts"]})
        return super().__call__(request)


def test_a_reply_edits_the_parent_in_place():
    with LoopbackServer(SlackWithUpdate(TOKEN)) as api:
        n = SlackNotifier(TOKEN, "#ml-alerts", base_url=api.url + "/api/")
        first = n.post(NOTICE)
        second = n.post(replace(NOTICE, kind="updated", thread=first.thread, title="[RESOLVED] fraud",
                                text="rollback verified"))
        paths = [r.path.rsplit("/", 1)[1] for r in api.requests]
        update = api.requests[-1].json()
    assert paths == ["chat.postMessage", "chat.postMessage", "chat.update"]
    assert second.status == "succeeded" and second.data["parent_update"] == "ok"
    # The parent is addressed by the channel id Slack answered with, and its ts.
    assert update["channel"] == "C0LOOPBACK" and update["ts"] == first.thread
    assert update["text"] == "rollback verified"
    assert "[RESOLVED] fraud" in json.dumps(update["blocks"])
    buttons = update["blocks"][-1]
    assert buttons["type"] == "actions"
    # No rollback waits for approval: no Approve / Reject (tests/test_slack_interactions.py).
    assert [e["action_id"] for e in buttons["elements"]] == ["rollbackd_ack", "rollbackd_silence"]
    assert buttons["elements"][0]["value"] == "inc-7f3a|fraud"


def test_a_failed_edit_does_not_fail_the_reply():
    with LoopbackServer(SlackWithUpdate(TOKEN, update_error="message_not_found")) as api:
        n = SlackNotifier(TOKEN, "#ml-alerts", base_url=api.url + "/api/")
        result = n.post(replace(NOTICE, kind="updated", thread="1699999999.000001"))
    assert result.status == "succeeded" and result.data["parent_update"] == "message_not_found"


def test_a_resolved_parent_has_no_buttons():
    from rollbackd.actions.slack import build_blocks

    assert build_blocks(NOTICE, buttons=True)[-1]["type"] == "actions"
    assert build_blocks(replace(NOTICE, kind="resolved"), buttons=True)[-1]["type"] == "context"


def test_a_silence_written_to_the_ledger_applies_without_a_restart(tmp_path):
    """The pipeline reads the ledger's silences at each firing: one set while the daemon runs
    (the Slack button, `rollbackd silence add`) applies by event time."""
    from rollbackd.daemon.decisions import MemoryDecisions
    from rollbackd.daemon.replay import build_pipeline, open_recording, replay
    from rollbackd.rules.silences import Silence
    from test_approval import config

    cfg = config()
    path = tmp_path / "bad.jsonl.gz"
    from rollbackd.scenarios import Fault, Scenario, write_recording

    write_recording(Scenario(name="bad", seed=5, duration=1500.0, versions=((0.0, "1"), (600.0, "2")),
                             faults=(Fault("error_rate", start=0.0, magnitude=0.25, version="2"),)), path)
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    ledger.add_silence(Silence(id="sil-1", deployment="demo-scorer", starts_at=1_790_000_000.0,
                               ends_at=1_790_009_000.0, reason="slack", created_by="alice"), "now")
    d = MemoryDecisions()
    replay(open_recording(str(path), cfg), build_pipeline(cfg, decisions=d, recorder=ledger), batch_size=4096)
    ledger.close()
    firing = [r for r in d.records if r["kind"] == "alert" and r["state"] == "firing"]
    assert firing and all(r["suppressed"]["silence_id"] == "sil-1" for r in firing)
    assert not [r for r in d.records if r.get("action") == "rollback"]


def test_rollback_started_is_a_thread_reply_posted_after_the_backend_call(tmp_path):
    """One loopback server is the Slack Web API and the webhook backend, so its request log is
    the order of calls: the rollback goes out first (no Slack call can delay it), then the
    parent, the "rollback started" reply and the outcome's reply, both in the parent's thread."""
    from rollbackd.actions.webhook import WebhookBackend
    from rollbackd.daemon.decisions import MemoryDecisions
    from rollbackd.daemon.replay import build_pipeline, open_recording, replay
    from rollbackd.scenarios import Fault, Scenario, write_recording
    from test_safety import config

    path = tmp_path / "bad.jsonl.gz"
    write_recording(Scenario(name="bad", seed=5, duration=1500.0, versions=((0.0, "1"), (600.0, "2")),
                             faults=(Fault("error_rate", start=0.0, magnitude=0.25, version="2"),)), path)
    slack = SlackWithUpdate(TOKEN)

    def responder(req: Recorded) -> Reply:
        return Reply(200, body={"ok": True}) if req.path == "/rollback" else slack(req)

    cfg = config()
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    with LoopbackServer(responder) as server:
        pipeline = build_pipeline(
            cfg, decisions=MemoryDecisions(), recorder=ledger,
            notifier=SlackNotifier(TOKEN, "#ml-alerts", base_url=server.url + "/api/"),
            backend_overrides={"demo-scorer": WebhookBackend(server.url + "/rollback")},
        )
        replay(open_recording(str(path), cfg), pipeline, batch_size=4096)
        calls = list(server.requests)
    posts = [r.json() for r in calls if r.path.endswith("/chat.postMessage")]
    order = [r.path.rsplit("/", 1)[1] for r in calls]
    assert order[:6] == ["rollback", "chat.postMessage", "chat.postMessage", "chat.update",
                         "chat.postMessage", "chat.update"]
    parent, started, outcome = posts[:3]
    assert "thread_ts" not in parent and "incident opened" in parent["text"]
    parent_ts = "1700000000.000001"
    assert started["thread_ts"] == outcome["thread_ts"] == parent_ts
    assert "rollback started: demo-scorer/primary 2 → 1 via log" in started["text"]
    assert "rollback succeeded: demo-scorer/primary 2 → 1" in outcome["text"]
    rows = ledger.rows("actions", action="notify", phase="finished")
    ledger.close()
    assert [r["detail"] for r in rows][:3] == ["posted to #ml-alerts"] * 3
    assert [json.loads(r["data"])["reason"] for r in rows][:3] == [
        "incident opened", "rollback started", "rollback succeeded"]
