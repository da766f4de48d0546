"""The daily digest: the pure builder over ledger rows (a table of incidents around a period),
the ledger query, the rules-file setting, and the scheduler wiring with a real APScheduler
BackgroundScheduler posting to the loopback Slack Web API."""

from __future__ import annotations

import io
import json
import threading
from zoneinfo import ZoneInfo

import pytest
from loopback import LoopbackServer
from test_slack import TOKEN
from test_slack_thread import SlackWithUpdate

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.actions.digest import DigestScheduler, build_digest, summarize_incidents
from rollbackd.actions.slack import SlackNotifier, build_blocks
from rollbackd.daemon.clock import WallClock
from rollbackd.daemon.ledger import Ledger, digest_rows
from rollbackd.rules.loader import ConfigError, load_config_text
from rollbackd.rules.model import DigestSpec

T0 = 1_790_035_200.0  # 2026-09-22T00:00:00Z
HOUR, DAY = 3600.0, 86400.0
UTC = ZoneInfo("UTC")


def inc(incident_id, change, ts, rule="serving-error-rate", severity="critical", deployment="fraud"):
    return {"incident_id": incident_id, "change": change, "ts": ts, "rule": rule, "severity": severity,
            "deployment": deployment, "variant": "primary"}


def rollback(incident_id, ts, status, frm="2", to="1"):
    return {"incident_id": incident_id, "action": "rollback", "ts": ts, "status": status,
            "from_version": frm, "to_version": to}


# The period is [T0, T0 + DAY). Each incident tests one rule of what a digest includes.
INCIDENTS = [
    inc("inc-before", "opened", T0 - 5 * HOUR), inc("inc-before", "resolved", T0 - 4 * HOUR),  # over before
    inc("inc-carried", "opened", T0 - 2 * HOUR, severity="warning", rule="feature-drift"),  # still open
    inc("inc-day", "opened", T0 + 9 * HOUR), inc("inc-day", "alert_joined", T0 + 9 * HOUR + 60, rule="p99"),
    inc("inc-day", "verified", T0 + 9.5 * HOUR, rule=None), inc("inc-day", "resolved", T0 + 9.5 * HOUR, rule=None),
    inc("inc-late", "opened", T0 + 23 * HOUR), inc("inc-late", "resolved", T0 + DAY),  # resolves at the end
    inc("inc-after", "opened", T0 + DAY),  # the end is exclusive
]
ROLLBACKS = [
    rollback("inc-day", T0 + 9 * HOUR, "pending_approval"), rollback("inc-day", T0 + 9.1 * HOUR, "succeeded"),
    rollback("inc-late", T0 + 23 * HOUR, "failed"), rollback("inc-late", T0 + DAY, "succeeded"),
]


def test_a_period_holds_changed_and_still_open_incidents():
    got = summarize_incidents(INCIDENTS, ROLLBACKS, T0, T0 + DAY)
    assert [(i.incident_id, i.state, i.is_open, i.rollbacks) for i in got] == [
        ("inc-carried", "opened", True, ()),
        ("inc-day", "resolved", False, ("2 → 1 succeeded",)),
        ("inc-late", "opened", True, ("2 → 1 failed",)),
    ]
    day = got[1]
    assert (day.rules, day.severity, day.opened_at, day.changed_at) == (
        ("serving-error-rate", "p99"), "critical", T0 + 9 * HOUR, T0 + 9.5 * HOUR)
    # A day later, only what is still open carries over; what resolved at the end shows then.
    nxt = summarize_incidents(INCIDENTS, ROLLBACKS, T0 + DAY, T0 + 2 * DAY)
    assert [(i.incident_id, i.state, i.rollbacks) for i in nxt] == [
        ("inc-carried", "opened", ()), ("inc-late", "resolved", ("2 → 1 succeeded",)),
        ("inc-after", "opened", ())]


def test_digest_text_in_the_configured_time_zone():
    items = summarize_incidents(INCIDENTS, ROLLBACKS, T0, T0 + DAY)
    notice = build_digest(items, T0, T0 + DAY, ZoneInfo("Europe/Berlin"))  # UTC+2 in September
    assert notice.kind == "digest" and notice.incident_id == "digest-2026-09-23T0200"
    assert notice.title == ("rollbackd digest 2026-09-22 02:00 – 2026-09-23 02:00 Europe/Berlin: "
                            "3 incident(s)")
    assert notice.text.splitlines() == [
        "3 incident(s), 2 still open; 2 rollback(s) (1 failed, 1 succeeded)",
        "• inc-carried fraud/primary warning feature-drift: opened 2026-09-22 00:00, still open "
        "(last: opened 2026-09-22 00:00)",
        "• inc-day fraud/primary critical serving-error-rate (+1): opened 2026-09-22 11:00, resolved "
        "(last: resolved 2026-09-22 11:30); rollback 2 → 1 succeeded",
        "• inc-late fraud/primary critical serving-error-rate: opened 2026-09-23 01:00, still open "
        "(last: opened 2026-09-23 01:00); rollback 2 → 1 failed",
    ]
    quiet = build_digest([], T0, T0 + DAY, UTC)
    assert quiet.text == "No incidents." and quiet.title.endswith("UTC: 0 incident(s)")


def test_a_digest_renders_without_incident_fields_or_buttons():
    notice = build_digest(summarize_incidents(INCIDENTS, ROLLBACKS, T0, T0 + DAY), T0, T0 + DAY, UTC)
    blocks = build_blocks(notice, buttons=True)
    assert [b["type"] for b in blocks] == ["header", "section", "context"]
    assert "fields" not in blocks[1] and "inc-day" in blocks[1]["text"]["text"]
    out = io.StringIO()
    assert ConsoleNotifier(out).post(notice).status == "succeeded"
    assert out.getvalue().splitlines()[:2] == [
        f"DIGEST {notice.incident_id} at 2026-09-23T00:00:00Z: {notice.title}",
        "  3 incident(s), 2 still open; 2 rollback(s) (1 failed, 1 succeeded)",
    ]


def _ledger(path, run_id="live-g"):
    ledger = Ledger(path, run_id=run_id)
    for row in INCIDENTS:
        ledger.incident({**row, "state": row["change"]})
    for row in ROLLBACKS:
        ledger.action({**row, "variant": "primary", "deployment": "fraud"}, "started")
        ledger.action({**row, "variant": "primary", "deployment": "fraud"}, "finished")
    ledger.close()


def test_the_ledger_query_gives_the_same_digest(tmp_path):
    db = tmp_path / "l.db"
    _ledger(db)
    _ledger(db, run_id="replay-x")  # another run in the same file is not this daemon's
    incidents, actions = digest_rows(db, "live-g", T0, T0 + DAY)
    assert {r["incident_id"] for r in incidents} == {"inc-carried", "inc-day", "inc-late"}
    assert {r["phase"] for r in actions} == {"finished"}
    assert summarize_incidents(incidents, actions, T0, T0 + DAY) == summarize_incidents(
        INCIDENTS, ROLLBACKS, T0, T0 + DAY)


# The setting ----------------------------------------------------------------------------------
def notifier_yaml(digest: str) -> str:
    return f"version: 1\nsettings:\n  notifier: {{type: console, digest: {digest}}}\nrules: []\n"


def test_the_digest_setting_is_validated_with_its_place():
    spec = load_config_text(notifier_yaml('"0 9 * * *"')).settings.notifier
    assert (spec.digest, dict(spec.options)) == (DigestSpec("0 9 * * *", "UTC"), {})
    spec = load_config_text(notifier_yaml('{cron: "30 8 * * mon-fri", timezone: Europe/Berlin}')).settings.notifier
    assert spec.digest == DigestSpec("30 8 * * mon-fri", "Europe/Berlin")
    for bad, where, message in [
        ('"0 25 * * *"', "settings.notifier.digest", "not a cron expression"),
        ('{cron: "0 9 * *"}', "settings.notifier.digest.cron", "Wrong number of fields"),
        ('{cron: "0 9 * * *", timezone: Mars/Olympus}', "settings.notifier.digest.timezone", "unknown time zone"),
        ("{timezone: UTC}", "settings.notifier.digest", "missing `cron`"),
    ]:
        with pytest.raises(ConfigError) as exc:
            load_config_text(notifier_yaml(bad))
        assert ":3:" in str(exc.value) and where in str(exc.value) and message in str(exc.value), bad
    with pytest.raises(ConfigError, match="unknown key 'digest'"):
        load_config_text("version: 1\nsettings:\n  notifier: {type: none, digest: '0 9 * * *'}\nrules: []\n")


def test_weekday_numbers_are_warned_about():
    from rollbackd.rules.loader import check_text

    _, issues = check_text(notifier_yaml('"0 9 * * 1-5"'))
    (warning,) = [i for i in issues if i.path == "settings.notifier.digest"]
    assert warning.severity == "warning" and "0 = Monday" in warning.message


# The scheduler ----------------------------------------------------------------------------------
def test_the_scheduler_posts_the_digest_on_its_trigger(tmp_path):
    """A real BackgroundScheduler with a cron trigger firing every second posts through the
    Slack notifier to the loopback Web API; the second digest covers only what came after the
    first."""
    from apscheduler.triggers.cron import CronTrigger

    now = WallClock().now()
    db = tmp_path / "l.db"
    ledger = Ledger(db, run_id="live-g")
    ledger.incident({**inc("inc-live", "opened", now - HOUR), "state": "opened"})
    ledger.action({**rollback("inc-live", now - HOUR, "succeeded"), "deployment": "fraud"}, "finished")
    ledger.close()
    posted = threading.Event()
    slack = SlackWithUpdate(TOKEN)

    def responder(req):
        reply = slack(req)
        if len(server.requests) >= 2:
            posted.set()
        return reply

    with LoopbackServer(responder) as server:
        digest = DigestScheduler(
            DigestSpec("0 9 * * *", "Europe/Berlin"),
            SlackNotifier(TOKEN, "#ml-digest", base_url=server.url + "/api/"),
            lambda start, end: digest_rows(db, "live-g", start, end), WallClock().now,
            trigger=CronTrigger(second="*", timezone=ZoneInfo("Europe/Berlin")),
        )
        digest.start()
        try:
            assert posted.wait(6), "no digest within 6 s"
        finally:
            digest.stop()
        posts = [r.json() for r in server.requests if r.path.endswith("/chat.postMessage")]
    first, second = posts[:2]
    assert first["channel"] == "#ml-digest" and "thread_ts" not in first
    assert "1 incident(s), 1 still open; 1 rollback(s) (1 succeeded)" in first["text"]
    assert "inc-live fraud/primary critical serving-error-rate" in first["text"]
    assert "rollbackd digest" in json.dumps(first["blocks"]) and first["blocks"][-1]["type"] == "context"
    # Still open, so it carries over; no new rollback in the second's one-second period.
    assert "1 incident(s), 1 still open; 0 rollback(s)" in second["text"]
    assert digest.last is not None and not digest.scheduler.running


def test_a_failing_digest_never_raises_and_is_retried_over_the_same_period(tmp_path):
    class Broken:
        def post(self, notice):
            raise RuntimeError("boom")

    digest = DigestScheduler(DigestSpec("0 9 * * *"), Broken(), lambda s, e: ([], []), WallClock().now)
    result = digest.post(T0)
    assert (result.status, result.detail) == ("failed", "RuntimeError: boom")
    assert digest.last is None  # the next digest covers this period too
    digest.notifier = ConsoleNotifier(io.StringIO())
    assert digest.post(T0 + HOUR).status == "succeeded" and digest.last == T0 + HOUR


def test_run_starts_the_digest_only_when_configured(tmp_path):
    from rollbackd.cli import _start_digest

    cfg = load_config_text(notifier_yaml('{cron: "0 9 * * *", timezone: Europe/Berlin}'))
    digest = _start_digest(cfg, ConsoleNotifier(io.StringIO()), str(tmp_path / "l.db"), "live-g")
    try:
        job = digest.scheduler.get_job("digest")
        assert (job.next_run_time.hour, job.next_run_time.minute) == (9, 0)
        assert job.next_run_time.tzinfo.key == "Europe/Berlin"
    finally:
        digest.stop()
    assert not digest.scheduler.running
    assert _start_digest(load_config_text(notifier_yaml("null")), None, "l.db", "live-g") is None


def test_live_the_digest_goes_through_the_daemons_executor(tmp_path):
    """In `rollbackd run` the scheduler hands the digest to the daemon: posted from its lanes to
    the real Slack API stand-in, recorded in the ledger (started, finished) like any notice, and
    the period moves on only once Slack has answered."""
    from pathlib import Path

    from rollbackd.daemon.replay import build_pipeline
    from rollbackd.daemon.run import Daemon, RunSettings
    from rollbackd.daemon.sources import Batch, RecordingSource
    from rollbackd.rules.loader import load_config

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    ledger = Ledger(tmp_path / "l.db", run_id="live-g")
    with LoopbackServer(SlackWithUpdate(TOKEN)) as server:
        notifier = SlackNotifier(TOKEN, "#ml-digest", base_url=server.url + "/api/")
        config = load_config(Path(__file__).parent / "data" / "e2e-rules.yaml")
        daemon = Daemon(build_pipeline(config, recorder=ledger), RecordingSource(str(empty)), ledger=ledger,
                        notifier=notifier, settings=RunSettings(checkpoint_path=str(tmp_path / "c")))
        digest = DigestScheduler(DigestSpec("0 9 * * *"), notifier, lambda s, e: ([], []), WallClock().now,
                                 deliver=daemon.post_from_thread)
        thread = threading.Thread(target=digest.post, args=(T0,))
        thread.start()
        thread.join(5)
        assert digest.last is None and server.requests == []  # handed over, not posted by the scheduler
        daemon.step(Batch([], [], None))
        assert daemon.effects.close(5.0)
    rows = [(r["phase"], r["status"]) for r in ledger.rows("actions", action="notify")]
    ledger.close()
    posts = [r.json() for r in server.requests if r.path.endswith("/chat.postMessage")]
    assert len(posts) == 1 and "rollbackd digest" in json.dumps(posts[0]["blocks"])
    assert rows == [("started", "started"), ("finished", "succeeded")]
    assert digest.last == T0
