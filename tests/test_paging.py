"""PagerDuty, Opsgenie and the signed webhook notifier against loopback servers that check the
documented request contract (tests/paging_services.py), retry by classification, and routing
by severity and escalation end to end: a drill of the ``error_blip`` scenario through the
rules file's ``settings.notifiers``, its notices reaching Slack, PagerDuty and Opsgenie as the
routes say.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from loopback import LoopbackServer, Reply, SlackAPI
from paging_services import OpsgenieAlerts, PagerDutyEvents

from rollbackd.actions.base import AlertSummary, Notice
from rollbackd.actions.factory import make_notifier, make_notifiers
from rollbackd.actions.noticehook import TIMESTAMP_HEADER, verify_notice
from rollbackd.actions.routing import NoticeRouter
from rollbackd.actions.webhook import SIGNATURE_HEADER
from rollbackd.drills import drill
from rollbackd.rules.loader import load_config_text
from rollbackd.rules.model import NotifierSpec
from rollbackd.scenarios import BUILTIN, write_recording

PD_KEY = "R0UTINGKEY0123456789abcdef012345"  # 32 characters, as an integration key is
OG_KEY = "6f1c9b2e-0000-4000-8000-0123456789ab"
RETRY = {"max_attempts": 3, "base_delay": 0.0, "max_delay": 0.0}


def notice(kind: str = "opened", *, severity: str = "critical", escalation: bool = False,
           handled: bool = False, incident: str = "inc-0123456789ab", drill: bool = False) -> Notice:
    alert = AlertSummary("serving-error-rate", severity, "resolved" if kind == "resolved" else "firing",
                         0.2, 0.05, 1160, 1_790_000_000.0, 1_790_000_060.0, 0.001, None, None, "primary")
    return Notice(incident, kind, 1_790_000_060.0, "demo-scorer", "primary", "2",
                  f"[{severity.upper()}] demo-scorer/primary: serving-error-rate",
                  f"[{severity.upper()}] demo-scorer/primary: serving-error-rate — {kind}",
                  (alert,), runbook="https://runbooks.example/demo-scorer", drill=drill,
                  severity=severity, escalation=escalation, handled=handled,
                  key=f"{incident}:notice:{kind}")


# PagerDuty ---------------------------------------------------------------------------------
def pagerduty(url: str, **options):
    spec = NotifierSpec("pagerduty", {"url": url, "routing_key_env": "PD_KEY", "retry": RETRY, **options})
    return make_notifier(spec, env={"PD_KEY": PD_KEY}, sleep=lambda s: None)


def test_pagerduty_triggers_acknowledges_and_resolves_under_one_dedup_key_per_incident():
    service = PagerDutyEvents(PD_KEY)
    with LoopbackServer(service) as server:
        pd = pagerduty(server.url)
        for n in (notice("opened"), notice("repeat"), notice("updated", handled=True), notice("resolved")):
            result = pd.post(n)
            assert result.status == "succeeded", result.detail
        # A second incident, and a drill of the same incident: keys of their own.
        assert pd.post(notice("opened", incident="inc-ffffffffffff")).status == "succeeded"
        assert pd.post(notice("opened", drill=True)).status == "succeeded"
    assert service.violations == []
    key = "rollbackd:inc-0123456789ab"
    assert service.events == [("trigger", key), ("trigger", key), ("acknowledge", key), ("resolve", key),
                              ("trigger", "rollbackd:inc-ffffffffffff"),
                              ("trigger", "rollbackd:drill:inc-0123456789ab")]
    assert service.state[key] == "resolved"
    first = server.requests[0].json()
    assert first["payload"]["severity"] == "critical" and first["payload"]["component"] == "demo-scorer"
    assert first["links"] == [{"href": "https://runbooks.example/demo-scorer", "text": "Runbook"}]
    assert server.requests[3].json() == {"routing_key": PD_KEY, "event_action": "resolve", "dedup_key": key}


def test_an_escalation_is_a_page_of_its_own_and_the_resolution_resolves_both():
    """A trigger under the first key would fold into an acknowledged page and wake nobody."""
    service = PagerDutyEvents(PD_KEY)
    with LoopbackServer(service) as server:
        pd = pagerduty(server.url)
        # once escalated, every later notice of the incident says so (daemon/notices.py)
        for n in (notice("opened"), notice("updated", handled=True), notice("updated", escalation=True),
                  notice("repeat", escalation=True), notice("resolved", escalation=True)):
            assert pd.post(n).status == "succeeded"
    key, esc = "rollbackd:inc-0123456789ab", "rollbackd:inc-0123456789ab:escalation"
    assert service.violations == []
    assert service.events == [("trigger", key), ("acknowledge", key), ("trigger", esc), ("trigger", esc),
                              ("resolve", key), ("resolve", esc)]
    assert service.state == {key: "resolved", esc: "resolved"}
    assert server.requests[2].json()["payload"]["severity"] == "critical"


def test_pagerduty_retries_429_and_5xx_and_gives_up_on_an_invalid_event_at_once():
    service = PagerDutyEvents(PD_KEY)
    slept: list[float] = []
    with LoopbackServer(service) as server:
        pd = make_notifier(NotifierSpec("pagerduty", {"url": server.url, "routing_key_env": "PD_KEY",
                                                      "retry": {"max_attempts": 4, "base_delay": 0.5}}),
                           env={"PD_KEY": PD_KEY}, sleep=slept.append)
        server.reply(Reply(429, body={"status": "throttled"}), Reply(502))
        ok = pd.post(notice())
        assert (ok.status, ok.attempts) == ("succeeded", 3)
        assert slept == [0.5, 1.0]
        server.reply(*[Reply(503)] * 4)
        down = pd.post(notice("repeat"))
        assert down.status == "failed" and down.attempts == 4 and "gave up after 4 attempts: HTTP 503" in down.detail
    with LoopbackServer(PagerDutyEvents("another-integration-key-00000000")) as server:
        slept.clear()
        refused = make_notifier(NotifierSpec("pagerduty", {"url": server.url}), env={"PAGERDUTY_ROUTING_KEY": PD_KEY},
                                sleep=slept.append).post(notice())
        assert refused.status == "failed" and refused.attempts == 1 and slept == []
        assert "gave up: HTTP 400" in refused.detail and "routing_key" in refused.detail
        assert len(server.requests) == 1


def test_pagerduty_needs_a_routing_key_from_the_environment():
    with pytest.raises(ValueError, match="no routing key"):
        make_notifier(NotifierSpec("pagerduty"), env={})
    with pytest.raises(ValueError, match="'PD' \\(routing_key_env\\) is not set"):
        make_notifier(NotifierSpec("pagerduty", {"routing_key_env": "PD"}), env={})


# Opsgenie ----------------------------------------------------------------------------------
def test_opsgenie_creates_acknowledges_and_closes_by_alias():
    service = OpsgenieAlerts(OG_KEY)
    with LoopbackServer(service) as server:
        og = make_notifier(NotifierSpec("opsgenie", {"url": server.url, "api_key_env": "OG",
                                                     "responders": [{"type": "team", "name": "ml-oncall"}],
                                                     "retry": RETRY}), env={"OG": OG_KEY}, sleep=lambda s: None)
        for n in (notice("opened"), notice("updated", handled=True), notice("updated", escalation=True),
                  notice("resolved", escalation=True)):
            result = og.post(n)
            assert result.status == "succeeded", result.detail
    alias, esc = "rollbackd:inc-0123456789ab", "rollbackd:inc-0123456789ab:escalation"
    assert service.violations == []
    assert service.events == [("create", alias), ("acknowledge", alias), ("create", esc), ("close", alias),
                              ("close", esc)]
    assert service.state == {alias: "closed", esc: "closed"}
    create = server.requests[0].json()
    assert create["priority"] == "P1" and create["responders"] == [{"type": "team", "name": "ml-oncall"}]
    assert create["details"]["incident"] == "inc-0123456789ab" and "serving-error-rate" in create["description"]
    assert server.requests[3].path == "/v2/alerts/rollbackd%3Ainc-0123456789ab/close?identifierType=alias"


def test_opsgenie_with_a_wrong_key_fails_without_retrying():
    with LoopbackServer(OpsgenieAlerts(OG_KEY)) as server:
        og = make_notifier(NotifierSpec("opsgenie", {"url": server.url}), env={"OPSGENIE_API_KEY": "wrong"},
                           sleep=lambda s: pytest.fail("a 401 is not retried"))
        result = og.post(notice())
    assert result.status == "failed" and "HTTP 401" in result.detail and "Could not authenticate" in result.detail
    assert len(server.requests) == 1


# The signed webhook ------------------------------------------------------------------------
def test_the_webhook_notifier_signs_timestamp_and_body_and_keeps_them_on_retries():
    now = 1_800_000_000.0
    with LoopbackServer() as server:
        hook = make_notifier(NotifierSpec("webhook", {"url": server.url + "/notices", "secret_env": "HOOK",
                                                      "headers": {"X-Team": "ml"}, "retry": RETRY}),
                             env={"HOOK": "s3cret"}, sleep=lambda s: None, now=lambda: now)
        server.reply(Reply(500), Reply(204))
        result = hook.post(notice("updated", escalation=True))
    assert result.status == "succeeded" and result.attempts == 2
    first, second = server.requests
    assert (first.body, first.headers) == (second.body, second.headers), "a retry sends the same bytes"
    body = json.loads(first.body)
    assert body["type"] == "rollbackd.notice" and body["escalation"] is True and body["severity"] == "critical"
    assert body["alerts"][0]["rule"] == "serving-error-rate" and body["key"] == "inc-0123456789ab:notice:updated"
    assert first.header("Idempotency-Key") == "inc-0123456789ab:notice:updated"
    assert first.header(TIMESTAMP_HEADER) == "1800000000" and first.header("X-Team") == "ml"
    sig = first.header(SIGNATURE_HEADER)
    assert verify_notice(b"s3cret", first.body, "1800000000", sig, now=now + 60)
    assert not verify_notice(b"s3cret", first.body, "1800000000", sig, now=now + 3600), "too old: a replay"
    assert not verify_notice(b"other", first.body, "1800000000", sig, now=now)
    assert not verify_notice(b"s3cret", first.body + b" ", "1800000000", sig, now=now)


def test_a_4xx_from_the_webhook_receiver_is_not_retried():
    with LoopbackServer() as server:
        server.reply(Reply(422, body={"error": "unknown deployment"}))
        hook = make_notifier(NotifierSpec("webhook", {"url": server.url}), sleep=lambda s: pytest.fail("retried"),
                             now=lambda: 0.0)
        result = hook.post(notice())
    assert result.status == "failed" and "gave up: HTTP 422" in result.detail and "unknown deployment" in result.detail


# Routing, end to end -----------------------------------------------------------------------
ROUTED_RULES = """
version: 1
settings:
  lateness: 30s
  join_horizon: 1h
  notifiers:
    - type: slack
      channel: "#ml-alerts"
      base_url: "{slack}/api/"
    - type: pagerduty
      url: "{pd}"
      retry: {{max_attempts: 2, base_delay: 0s, max_delay: 0s}}
      match: {{severities: [critical], escalation: true}}
    - type: opsgenie
      url: "{og}"
      match: {{escalation: true, deployments: ["demo-*"]}}
grouping: {{group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}}
deployments:
  demo-scorer:
    backend: {{type: log}}
    runbook: https://runbooks.example/demo-scorer
    policy: {policy}
rules:
  - name: serving-error-rate
    detector: error_rate
    threshold: 0.05
    clear_threshold: 0.03
    window: {{size: 1m}}
    for: 0s
    min_samples: 100
    severity: {severity}
    actions: [notify, rollback]
"""


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An error-rate blip that fires (``for: 0s``) for two minutes, then resolves."""
    path = tmp_path_factory.mktemp("paging") / "error_blip.jsonl.gz"
    write_recording(BUILTIN["error_blip"], path)
    return path


@pytest.mark.parametrize("severity, policy, slack, paged", [
    # critical: the freeze refused the rollback before the first notice went out (group_wait), so
    # the incident pages as an escalation from its first notice (PagerDuty dedups the second
    # trigger); the resolution resolves both keys (the first never triggered: harmless)
    ("critical", "freeze", ["opened", "updated", "resolved"],
     {"pd": [("trigger", ":escalation"), ("trigger", ":escalation"), ("resolve", ""), ("resolve", ":escalation")],
      "og": [("create", ":escalation"), ("create", ":escalation"), ("close", ""), ("close", ":escalation")]}),
    # a warning without escalation (notify-only: nothing to escalate): Slack only
    ("warning", "notify-only", ["opened", "updated", "resolved"], {"pd": [], "og": []}),
    # a warning that escalates pages only from the escalation, which its resolution follows
    ("warning", "freeze", ["opened", "updated", "resolved"],
     {"pd": [("trigger", ":escalation"), ("trigger", ":escalation"), ("resolve", ""), ("resolve", ":escalation")],
      "og": [("create", ":escalation"), ("create", ":escalation"), ("close", ""), ("close", ":escalation")]}),
])
def test_routing_by_severity_and_escalation_end_to_end(blip, tmp_path, severity, policy, slack, paged):
    pd, og = PagerDutyEvents(PD_KEY), OpsgenieAlerts(OG_KEY)
    slack_api = SlackAPI("xoxb-routing")
    with LoopbackServer(slack_api) as slack_server, LoopbackServer(pd) as pd_server, \
            LoopbackServer(og) as og_server:
        config = load_config_text(ROUTED_RULES.format(slack=slack_server.url, pd=pd_server.url, og=og_server.url,
                                                      policy=policy, severity=severity))
        env = {"SLACK_BOT_TOKEN": "xoxb-routing", "PAGERDUTY_ROUTING_KEY": PD_KEY, "OPSGENIE_API_KEY": OG_KEY}
        router = make_notifiers(config.settings, env=env)
        assert isinstance(router, NoticeRouter)
        result = drill(blip, config, out_dir=tmp_path, notifier=router, ledger=False)
    (incident,) = {d["incident_id"] for d in result.decisions if d.get("kind") == "incident"}
    key = f"rollbackd:drill:{incident}"
    assert pd.violations == [] and og.violations == []
    assert pd.events == [(action, key + suffix) for action, suffix in paged["pd"]]
    assert og.events == [(action, key + suffix) for action, suffix in paged["og"]]
    assert all(state in ("resolved", "closed") for state in {**pd.state, **og.state}.values())
    posts = [r.json() if r.body.startswith(b"{") else r.form() for r in slack_server.requests
             if r.path.endswith("/chat.postMessage")]  # (each reply also edits the parent: chat.update)
    assert len(posts) == len(slack), "Slack gets every notice"
    assert [p.get("thread_ts") for p in posts][1:] == ["1700000000.000001"] * (len(slack) - 1), \
        "the incident's later notices reply in its Slack thread"
    notices = [d for d in result.decisions if d.get("action") == "notify"]
    assert [n["notice"] for n in notices] == slack
    assert all(n["status"] == "succeeded" for n in notices), notices


# At least once -----------------------------------------------------------------------------
def test_a_notice_is_posted_again_after_a_crash_under_the_same_keys(tmp_path):
    """The outbox runs each notice once per key; one that started but never finished (a crash
    between the call and its record) is posted again after the restart, with the same dedup key
    and Idempotency-Key, so PagerDuty keeps one alert and a receiver can drop the copy."""
    from rollbackd.actions.delivery import Delivery, perform
    from rollbackd.actions.intents import Notify
    from rollbackd.daemon.decisions import MemoryDecisions
    from rollbackd.daemon.ledger import Ledger
    from rollbackd.daemon.pipeline import Edges
    from rollbackd.rules.model import RouteSpec, Settings

    def call(kind: str, n: int) -> Notify:
        note = replace(notice(kind), key=None)  # delivery gives it its key
        rec = {"ts": note.ts, "kind": "action", "action": "notify", "incident_id": note.incident_id,
               "deployment": note.deployment, "variant": note.variant, "status": "started",
               "idempotency_key": f"{note.incident_id}:notice:{n}"}
        return Notify(f"{note.incident_id}:notice:{n}", note, rec, kind)

    service = PagerDutyEvents(PD_KEY)
    with LoopbackServer(service) as pd_server, LoopbackServer() as hook_server:
        settings = Settings(notifiers=(
            RouteSpec(NotifierSpec("pagerduty", {"url": pd_server.url})),
            RouteSpec(NotifierSpec("webhook", {"url": hook_server.url})),
        ))
        env = {"PAGERDUTY_ROUTING_KEY": PD_KEY}
        ledger = Ledger(tmp_path / "ledger.db", run_id="r")

        def delivery() -> Delivery:  # a process: its own notifiers, the one ledger
            return Delivery(Edges(notifier=make_notifiers(settings, env=env, now=lambda: 1.8e9),
                                  backend_for=lambda d: pytest.fail("no backend"),
                                  decisions=MemoryDecisions(), recorder=ledger))

        first, second = call("opened", 0), call("repeat", 1)
        before = delivery()
        perform(before, first, lambda c, r: None)
        before.started(second)
        assert before.call(before.prepare(second)).status == "succeeded"  # ... and the process dies here
        after = delivery()
        outcomes: list[str] = []
        for c in (first, second):  # both in the checkpoint's in-flight list
            perform(after, c, lambda c, r: outcomes.append(r.status))
        ledger.close()
    assert outcomes == ["succeeded", "succeeded"]
    key = "rollbackd:inc-0123456789ab"
    assert service.violations == [] and service.events == [("trigger", key)] * 3 and service.state == {key: "triggered"}
    keys = [r.header("Idempotency-Key") for r in hook_server.requests]
    assert keys == ["inc-0123456789ab:notice:0", "inc-0123456789ab:notice:1", "inc-0123456789ab:notice:1"]


def test_the_documented_notifier_examples_load_and_build():
    from rollbackd.rules.loader import check_text

    doc = (Path(__file__).parent.parent / "docs" / "notifiers.md").read_text()
    examples = [block.split("```", 1)[0] for block in doc.split("```yaml\n")[1:]]
    examples = [e for e in examples if e.startswith("settings:")]
    assert len(examples) == 5
    env = {"PAGERDUTY_ROUTING_KEY": PD_KEY, "OPSGENIE_API_KEY": OG_KEY, "SLACK_BOT_TOKEN": "xoxb",
           "NOTICE_HOOK_SECRET": "s"}
    built = []
    for example in examples:
        config, issues = check_text("version: 1\n" + example, "notifiers.md")
        assert [i for i in issues if i.severity == "error"] == [], example
        built.append(make_notifiers(config.settings, env=env, now=lambda: 0.0))
    router = built[0]
    assert isinstance(router, NoticeRouter) and [r.name for r in router.routes] == ["slack", "pagerduty", "opsgenie"]
    slack, pd, og = router.routes
    assert slack.takes(notice(severity="warning")) and not pd.takes(notice(severity="warning"))
    assert pd.takes(notice(severity="critical")) and pd.takes(notice(severity="info", escalation=True))
    assert og.takes(notice(escalation=True)) is False, "demo-scorer is not a fraud-* deployment"
    assert og.takes(replace(notice(escalation=True), deployment="fraud-eu"))


class Recording:
    def __init__(self, status: str = "succeeded", threads: bool = False) -> None:
        self.status, self.threads, self.seen = status, threads, []

    def post(self, n: Notice):
        from rollbackd.actions.base import ActionResult

        self.seen.append(n)
        if self.status == "raise":
            raise RuntimeError("broken notifier")
        return ActionResult(self.status, "said", thread=(n.thread or f"ts-{len(self.seen)}") if self.threads else None)


def test_the_router_keeps_threads_to_their_route_and_survives_a_broken_one():
    from rollbackd.actions.routing import Route
    from rollbackd.rules.model import RouteMatch

    slack, pager, broken = Recording(threads=True), Recording(), Recording("raise")
    router = NoticeRouter([Route("slack", slack), Route("pagerduty", pager, RouteMatch(severities=("critical",))),
                           Route("webhook", broken, RouteMatch(escalation=True))])
    first = router.post(notice("opened", severity="warning"))
    assert (first.status, first.thread) == ("succeeded", "ts-1") and pager.seen == [] and broken.seen == []
    second = router.post(replace(notice("updated", severity="warning", escalation=True), thread=first.thread))
    assert second.status == "failed" and "webhook: failed (RuntimeError: broken notifier)" in second.detail
    assert second.thread == "ts-1" and slack.seen[-1].thread == "ts-1" and broken.seen[-1].thread is None
    third = router.post(replace(notice("resolved", severity="warning", escalation=True), thread="ts-1"))
    assert [n.kind for n in broken.seen] == ["updated", "resolved"], "the escalation's route hears the resolution"
    assert pager.seen == [] and third.status == "failed"
    system = Notice("blind-x", "opened", 0.0, "*", "*", None, "blind", "blind")
    assert router.post(system).status == "succeeded" and slack.seen[-1] is not None and pager.seen == []
    assert len(broken.seen) == 2, "a notice without severity goes to the routes without match only"


def test_a_threshold_that_is_not_set_goes_out_as_null_not_nan():
    """``NaN`` is not JSON: a strict receiver (PagerDuty's, a webhook's) would refuse the body."""
    import math

    n = notice()
    n = replace(n, alerts=(replace(n.alerts[0], threshold=math.nan),))
    with LoopbackServer() as server:
        make_notifier(NotifierSpec("webhook", {"url": server.url}), now=lambda: 0.0).post(n)
    body = json.loads(server.requests[0].body, parse_constant=lambda c: pytest.fail(f"{c} in the body"))
    assert body["alerts"][0]["threshold"] is None


def test_validate_reports_every_routing_mistake_with_its_place():
    from rollbackd.rules.loader import check_text

    text = """version: 1
settings:
  notifier: {type: console}
  notifiers:
    - type: pagerduty
      routing_key: abc
      match: {severities: [urgent], escalate: true}
    - type: alertmanager
      labels: {bad-name: x}
    - type: webhook
      url: ftp://x
    - type: opsgenie
      responders: [{type: team}]
      match: {escalation: false}
    - {type: slack, channel: x, digest: "0 9 * * *"}
"""
    _, issues = check_text(text, "r.yaml")
    found = {(i.path, i.line, i.message) for i in issues if i.severity == "error"}
    assert found == {
        ("settings.notifiers", 4, "set either `notifier` (one) or `notifiers` (several, routed), not both"),
        ("settings.notifiers[0].routing_key", 6, "unknown key 'routing_key'; did you mean 'routing_key_env'?"),
        ("settings.notifiers[0].match.severities[0]", 7, "'urgent' is not one of info, warning, critical"),
        ("settings.notifiers[0].match.escalate", 7, "unknown key 'escalate'; did you mean 'escalation'?"),
        ("settings.notifiers[1]", 8, "type alertmanager requires `url`"),
        ("settings.notifiers[1].labels.bad-name", 9, "'bad-name' is not a label name ([A-Za-z_][A-Za-z0-9_]*)"),
        ("settings.notifiers[2].url", 11, "expected an http:// or https:// URL, got 'ftp://x'"),
        ("settings.notifiers[3].responders[0]", 13, "a responder needs `type` and one of `id`, `name`, `username`"),
        ("settings.notifiers[3].match", 14, "matches nothing: give `severities`, `escalation: true` or both"),
        ("settings.notifiers[4].digest", 15, "unknown key 'digest'"),
    }
    _, issues = check_text("version: 1\nsettings:\n  notifiers:\n    - {type: pagerduty, match: {escalation: true}}\n")
    assert [i.message for i in issues if i.severity == "warning" and i.path == "settings.notifiers"] == [
        "no route matches every notice: notices about rollbackd itself (blind, queue full) and digests go nowhere; "
        "add a route without `match` (e.g. slack)"]
