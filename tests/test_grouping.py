"""One incident per episode: grouping, inhibition and silences, end to end through the pipeline.

Recordings come from seeded scenarios; the pipeline runs exactly as in a replay. Notices are
counted at a real HTTP server standing in for the Slack Web API.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from loopback import LoopbackServer, SlackAPI

from rollbackd.actions.base import ActionResult, Notice
from rollbackd.actions.slack import SlackNotifier
from rollbackd.daemon.decisions import DecisionLog, MemoryDecisions
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.events import Prediction
from rollbackd.rules.loader import load_config_text
from rollbackd.rules.silences import Silence
from rollbackd.scenarios import Fault, Scenario, write_recording

T0 = 1_789_999_980.0  # a whole minute: windows are aligned to the epoch

RULES = """
version: 1
settings: {{lateness: 30s, join_horizon: 1h, notifier: {{type: none}}}}
grouping: {{group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}}
deployments:
  demo-scorer: {{backend: {{type: log}}, known_good_after: 10m, cooldown: 30m{reference}}}
rules:
  - {{name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, for: 2m, min_samples: 100, severity: critical, actions: [notify, rollback]}}
  - {{name: p99-latency, detector: latency, params: {{quantile: 0.99}}, threshold: 500, for: 2m,
     min_samples: 100, severity: warning, actions: [notify]}}
  - {{name: feature-drift, detector: drift, threshold: 0.15, alpha: 0.01, for: 2m,
     min_samples: 200, severity: warning, actions: [notify]}}
{extra}
"""


def config(tmp_path: Path, extra: str = "", reference: Path | None = None):
    ref = f", reference: {reference}" if reference else ""
    return load_config_text(RULES.format(extra=extra, reference=ref), base_dir=tmp_path)


BAD_VERSION = Scenario(
    name="bad_version_everything",
    seed=11,
    duration=1500.0,
    versions=((0.0, "1"), (900.0, "2")),
    faults=(
        Fault("error_rate", start=900.0, magnitude=0.25, version="2"),
        Fault("latency", start=900.0, magnitude=40.0, version="2"),
        Fault("feature_shift", start=900.0, magnitude=2.0, version="2"),  # every numeric feature
    ),
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouping")
    bad = root / "bad.jsonl.gz"
    write_recording(BAD_VERSION, bad)
    # Reference data for drift: healthy traffic of version 1 (a file, as users supply it).
    ref = root / "reference.jsonl"
    # Same seed, no fault, first 5 minutes: the same feature distributions as version 1.
    write_recording(Scenario(name="ref", seed=11, duration=300.0), ref)
    late = root / "late_drift.jsonl.gz"
    write_recording(
        Scenario(
            name="late_drift", seed=11, duration=1800.0, versions=((0.0, "1"), (900.0, "2")),
            faults=(
                Fault("error_rate", start=900.0, magnitude=0.25, version="2"),
                Fault("feature_shift", start=1200.0, magnitude=2.0, feature="num_0"),
            ),
        ),
        late,
    )
    return {"bad": bad, "ref": ref, "late": late}


def run(path: Path, cfg, **kw):
    d = kw.pop("decisions", None) or MemoryDecisions()
    batch_size = kw.pop("batch_size", 4096)
    pipeline = build_pipeline(cfg, decisions=d, **kw)
    result = replay(open_recording(str(path), cfg), pipeline, batch_size=batch_size)
    return result, d


def kind(d, k, **match):
    return [r for r in d.records if r["kind"] == k and all(r.get(a) == b for a, b in match.items())]


def replay_scenario(tmp_path: Path, scenario: Scenario, config_text: str):
    """Record ``scenario``, replay it through a pipeline built from ``config_text``: (pipeline,
    decisions)."""
    rec = tmp_path / f"{scenario.name}.jsonl"
    write_recording(scenario, rec)
    cfg = load_config_text(config_text)
    d = MemoryDecisions()
    pipeline = build_pipeline(cfg, decisions=d)
    replay(open_recording(str(rec), cfg), pipeline)
    return pipeline, d


CANARY_ERRORS = """
  - {name: canary-errors, detector: error_rate, threshold: 0.05, alpha: 0.01, for: 2m,
     min_samples: 100, severity: critical, actions: [notify, rollback], variants: [canary]}
"""


def test_a_bad_version_breaking_five_signals_is_one_incident_one_rollback_one_thread(files, tmp_path):
    cfg = config(tmp_path, reference=files["ref"])
    with LoopbackServer(SlackAPI("xoxb-t")) as server:
        notifier = SlackNotifier("xoxb-t", "#oncall", base_url=server.url + "/api/")
        result, d = run(files["bad"], cfg, notifier=notifier)
        posts = [r.json() for r in server.requests if r.path.endswith("/chat.postMessage")]
    firing = kind(d, "alert", state="firing")
    assert {f["rule"] for f in firing} == {"serving-error-rate", "p99-latency", "feature-drift"}
    drift = next(f for f in firing if f["rule"] == "feature-drift")
    assert drift["measurement"]["evidence"]["drifted"] == ["num_0", "num_1", "num_2"]
    incidents = {f["incident_id"] for f in firing}
    assert len(incidents) == 1 and None not in incidents
    assert len(kind(d, "incident", state="opened")) == 1
    rollbacks = kind(d, "action", action="rollback")
    assert [(r["from_version"], r["to_version"], r["status"]) for r in rollbacks] == [("2", "1", "succeeded")]
    # One Slack thread: a single parent message, every other notice a reply to it.
    parents = [p for p in posts if not p.get("thread_ts")]
    assert len(parents) == 1
    assert all(p["thread_ts"] == "1700000000.000001" for p in posts[1:])
    # Alerts firing together within group_wait land in the first notice.
    first = str(parents[0]["blocks"])
    assert all(rule in first for rule in ("serving-error-rate", "p99-latency", "feature-drift"))
    notices = kind(d, "action", action="notify")
    assert notices[0]["notice"] == "opened" and len(notices) == len(posts)


def test_rollback_in_progress_inhibits_later_warning_alerts(files, tmp_path):
    extra = """inhibit_rules:
  - {name: rollback-quiets-warnings, source: {rollback_in_progress: true},
     target: {severity: warning}, equal: [deployment, variant]}"""
    cfg = config(tmp_path, extra=extra, reference=files["ref"])
    _, d = run(files["late"], cfg)
    (drift,) = kind(d, "alert", rule="feature-drift", state="firing")
    assert drift["suppressed"]["by"] == "inhibit"
    assert drift["suppressed"]["inhibit_rule"] == "rollback-quiets-warnings"
    assert drift["incident_id"] is None
    (err,) = kind(d, "alert", rule="serving-error-rate", state="firing")
    assert drift["suppressed"]["source"] == err["incident_id"]
    notices = kind(d, "action", action="notify")
    assert notices and all(n["rule"] == "serving-error-rate" for n in notices)
    assert not any("feature-drift" in n["reason"] for n in notices)
    # Without the inhibit rule the same drift alert joins the incident and is notified.
    _, plain = run(files["late"], config(tmp_path, reference=files["ref"]))
    (drift2,) = kind(plain, "alert", rule="feature-drift", state="firing")
    assert "suppressed" not in drift2 and drift2["incident_id"] == err["incident_id"]
    assert any(n["reason"] == "alert feature-drift joined" for n in kind(plain, "action", action="notify"))


def test_a_firing_source_alert_inhibits_its_targets_in_the_same_window(files, tmp_path):
    # The error-rate rule comes first in the file, latency and drift later: order must not matter.
    extra = """inhibit_rules:
  - {name: errors-explain-the-rest, source: {rule: serving-error-rate},
     target: {detector: [latency, drift]}, equal: [deployment]}"""
    cfg = config(tmp_path, extra=extra, reference=files["ref"])
    _, d = run(files["bad"], cfg)
    by_rule = {f["rule"]: f for f in kind(d, "alert", state="firing")}
    assert "suppressed" not in by_rule["serving-error-rate"]
    for rule in ("p99-latency", "feature-drift"):
        assert by_rule[rule]["suppressed"]["inhibit_rule"] == "errors-explain-the-rest"
    assert {n["rule"] for n in kind(d, "action", action="notify")} == {"serving-error-rate"}


def test_a_silence_mutes_notices_and_actions_but_the_alert_is_recorded(files, tmp_path):
    cfg = config(tmp_path, reference=files["ref"])
    start = BAD_VERSION.start
    silence = Silence("sil-1", "demo-scorer", start + 600, start + 3600, "planned test of v2", "alice")
    logs = []
    for i in range(2):
        out = tmp_path / f"d{i}.jsonl"
        run(files["bad"], cfg, silences=[silence], decisions=DecisionLog(out), batch_size=[4096, 101][i])
        logs.append(out.read_bytes())
    assert logs[0] == logs[1], "a silence on event time applies identically in every replay"
    d = MemoryDecisions()
    run(files["bad"], cfg, silences=[silence], decisions=d)
    firing = kind(d, "alert", state="firing")
    assert len(firing) == 3
    assert all(f["suppressed"] == {
        "by": "silence", "silence_id": "sil-1", "reason": "planned test of v2",
        "created_by": "alice", "until": start + 3600,
    } for f in firing)
    assert kind(d, "action") == [] and kind(d, "incident") == []


class Recorder:
    def __init__(self) -> None:
        self.notices: list[Notice] = []

    def post(self, notice: Notice) -> ActionResult:
        self.notices.append(notice)
        return ActionResult("succeeded", thread=notice.thread or "t1")


def minute_of_traffic(minute: int, error_rate: float, n: int = 200) -> list[Prediction]:
    """n predictions spread over one minute, the first error_rate*n of them failed."""
    bad = int(round(error_rate * n))
    base = T0 + 60 * minute
    return [
        Prediction(id=f"m{minute}-{i}", ts=base + i * 60 / n, deployment="d", model_version="1",
                   error="TIMEOUT" if i < bad else None, latency_ms=10.0)
        for i in range(n)
    ]


TICK_RULES = """
version: 1
settings: {notifier: {type: console}, lateness: 0s}
grouping: {group_wait: 0s}
rules:
  - {name: errors, detector: error_rate, threshold: 0.05, clear_threshold: 0.03, for: 1m,
     min_samples: 50, severity: critical, actions: [notify]}
"""


def test_silence_tick_table_expires_on_its_own(tmp_path):
    """Minute by minute: errors from minute 2 to 9; a silence covers minutes 0-5 only.

    Pending after minute 2's window, firing (muted) after minute 3's; it stays firing
    through the muted episode and resolves muted. After the silence has ended, a new episode
    from minute 12 notifies when it fires and when it resolves.
    """
    cfg = load_config_text(TICK_RULES)
    sil = Silence("sil-t", "d", T0, T0 + 6 * 60, "maintenance", "bob")
    rec = Recorder()
    d = MemoryDecisions()
    pipeline = build_pipeline(cfg, decisions=d, notifier=rec, silences=[sil])
    errors = {2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14}
    table = []
    for minute in range(17):
        pipeline.ingest(minute_of_traffic(minute, 0.2 if minute in errors else 0.0))
        pipeline.advance(T0 + 60 * minute + 59.999)
    for r in kind(d, "alert"):
        table.append((int((r["ts"] - T0) // 60), r["state"], (r.get("suppressed") or {}).get("by")))
    assert table == [
        (3, "pending", None),
        (4, "firing", "silence"),
        (11, "resolved", "muted episode"),
        (13, "pending", None),
        (14, "firing", None),
        (16, "resolved", None),
    ]
    assert [(n.kind, n.ts) for n in rec.notices] == [("opened", T0 + 14 * 60), ("resolved", T0 + 16 * 60)]


def test_a_new_canary_without_history_rolls_back_to_the_stable_arms_version(tmp_path):
    scenario = Scenario(
        name="bad_canary", seed=21, duration=1500.0,
        variants=(("stable", 0.8), ("canary", 0.2)),
        versions=((0.0, "1", "stable"), (900.0, "2", "canary")),
        faults=(Fault("error_rate", start=900.0, magnitude=0.3, version="2", variant="canary"),),
    )
    rec = tmp_path / "canary.jsonl"
    write_recording(scenario, rec)
    cfg = load_config_text("""
version: 1
settings: {notifier: {type: none}}
rules:
  - {name: canary-errors, detector: error_rate, threshold: 0.05, alpha: 0.01, for: 2m,
     min_samples: 100, severity: critical, actions: [notify, rollback], variants: [canary]}
""")
    _, d = run(rec, cfg)
    (rb,) = kind(d, "action", action="rollback")
    assert (rb["variant"], rb["from_version"], rb["to_version"], rb["status"]) == ("canary", "2", "1", "succeeded")
    assert {a["variant"] for a in kind(d, "alert")} == {"canary"}


def test_a_gap_in_traffic_raises_the_no_data_alert_in_a_replay_too():
    cfg = load_config_text("""
version: 1
settings: {notifier: {type: none}, lateness: 0s}
grouping: {group_wait: 0s}
rules:
  - {name: no-traffic, detector: traffic, threshold: 1, direction: below, for: 1m,
     severity: warning, actions: [notify]}
""")
    d = MemoryDecisions()
    pipeline = build_pipeline(cfg, decisions=d)
    events = [p for m in range(15) if not 5 <= m < 10 for p in minute_of_traffic(m, 0.0)]
    pipeline.ingest(events)
    pipeline.advance(T0 + 15 * 60)
    table = [(int((r["ts"] - T0) // 60), r["state"]) for r in kind(d, "alert")]
    assert table == [(6, "pending"), (7, "firing"), (11, "resolved")]


def test_the_stable_arms_version_is_a_target_before_it_is_known_good(tmp_path):
    """The known-good rule (time and traffic) is not applied to the stable arm's version: it
    is serving now, judged by the same rules, and rollbackd's history starts with its stream.
    Here both arms already serve when the stream starts and the canary is bad from the start:
    the stable arm never reaches 10m or 1000 predictions, yet the canary goes back to it."""
    scenario = Scenario(
        name="bad_canary_at_start", seed=5, duration=450.0, rate=4.0,
        variants=(("stable", 0.5), ("canary", 0.5)),
        versions=((0.0, "1", "stable"), (0.0, "2", "canary")),
        faults=(Fault("error_rate", start=0.0, magnitude=0.3, version="2", variant="canary"),),
    )
    pipeline, d = replay_scenario(tmp_path, scenario, """
version: 1
settings: {notifier: {type: none}}
deployments:
  demo-scorer: {backend: {type: log}, known_good_after: 10m, known_good_min_predictions: 1000}
rules:""" + CANARY_ERRORS)
    (rb,) = kind(d, "action", action="rollback")
    assert (rb["variant"], rb["from_version"], rb["to_version"], rb["status"]) == ("canary", "2", "1", "succeeded")
    stable = pipeline.versions[("demo-scorer", "stable")].current
    # the stable arm's span, even at the end of the stream, meets neither half of the rule
    assert stable.version == "1" and stable.served_for(pipeline.max_event_time) < 600.0
    assert stable.predictions is not None and 0 < stable.predictions < 1000


def test_a_version_marked_bad_as_a_canary_is_not_the_fallback_once_the_stable_arm_serves_it(tmp_path):
    """A version marked bad is never a target, wherever it was marked: version 2 fails as a
    canary and is rolled back; later the stable arm serves 2 (promoted anyway) and a new canary,
    3, fails. 2's span on the stable arm is clean and no incident is open there, but 2 was
    marked bad on the canary arm, so the canary is not sent back to it: no target."""
    scenario = Scenario(
        name="bad_canary_promoted", seed=21, duration=1500.0,
        variants=(("stable", 0.8), ("canary", 0.2)),
        versions=((0.0, "1", "stable"), (0.0, "2", "canary"), (900.0, "2", "stable"), (900.0, "3", "canary")),
        faults=(
            Fault("error_rate", start=0.0, end=300.0, magnitude=0.3, version="2", variant="canary"),
            Fault("error_rate", start=900.0, magnitude=0.3, version="3", variant="canary"),
        ),
    )
    pipeline, d = replay_scenario(tmp_path, scenario, """
version: 1
settings: {notifier: {type: none}}
deployments:
  demo-scorer: {backend: {type: log}, cooldown: 0s}
rules:""" + CANARY_ERRORS)
    opened = [(r["variant"], r["version"]) for r in kind(d, "incident", state="opened")]
    assert opened == [("canary", "2"), ("canary", "3")]
    first, second = kind(d, "action", action="rollback")
    assert (first["from_version"], first["to_version"], first["status"]) == ("2", "1", "succeeded")
    assert (second["from_version"], second["to_version"], second["status"], second.get("reason")) == (
        "3", None, "skipped", "no_target"
    )
    # what the old fallback looked at was clean: 2 serves the stable arm, whose span of it never
    # saw an incident, and no incident is open there
    stable = pipeline.versions[("demo-scorer", "stable")]
    assert stable.current is not None and (stable.current.version, stable.current.bad) == ("2", False)
    assert pipeline.book.incident_for("demo-scorer", "stable") is None


def test_a_version_marked_bad_as_a_canary_is_not_the_stable_arms_known_good_target(tmp_path):
    """The same invariant for the known-good target: version 2 fails as a canary; later the
    stable arm serves 2 healthily for 10 minutes (promoted anyway), then 3, which fails. 2 is
    the stable arm's most recent healthy version, but it was marked bad on the canary arm, so
    the stable arm goes back to 1."""
    scenario = Scenario(
        name="bad_canary_promoted_then_replaced", seed=22, duration=2400.0,
        variants=(("stable", 0.8), ("canary", 0.2)),
        versions=((0.0, "1", "stable"), (0.0, "2", "canary"), (900.0, "2", "stable"), (1500.0, "3", "stable")),
        faults=(
            Fault("error_rate", start=0.0, end=300.0, magnitude=0.3, version="2", variant="canary"),
            Fault("error_rate", start=1500.0, magnitude=0.3, version="3", variant="stable"),
        ),
    )
    pipeline, d = replay_scenario(tmp_path, scenario, """
version: 1
settings: {notifier: {type: none}}
deployments:
  demo-scorer: {backend: {type: log}, cooldown: 0s, known_good_after: 5m, known_good_min_predictions: 100}
rules:
  - {name: errors, detector: error_rate, threshold: 0.05, alpha: 0.01, for: 2m,
     min_samples: 100, severity: critical, actions: [notify, rollback]}
""")
    opened = [(r["variant"], r["version"]) for r in kind(d, "incident", state="opened")]
    assert opened == [("canary", "2"), ("stable", "3")]
    rollbacks = [(r["variant"], r["from_version"], r["to_version"], r["status"])
                 for r in kind(d, "action", action="rollback")]
    assert rollbacks == [("canary", "2", "1", "succeeded"), ("stable", "3", "1", "succeeded")]
    # without the deployment-wide rule, the stable arm's own history offers 2: healthy there
    stable = pipeline.versions[("demo-scorer", "stable")]
    assert stable.known_good(pipeline.max_event_time, 300.0, 100) == "2"


def test_a_silence_expired_in_the_ledger_stops_muting_once_pushed_in(tmp_path):
    """The ledger's silences are pushed into the pipeline (every second live); an early expiry
    (`rollbackd silence expire`, Slack) is honoured from the next push: no copy taken at start
    keeps it muting."""
    from rollbackd.daemon.ledger import Ledger
    from rollbackd.daemon.replay import push_human_input
    from rollbackd.rules.silences import first_match

    config = load_config_text("""
version: 1
rules:
  - {name: errors, detector: error_rate, threshold: 0.1, window: {size: 1m}, severity: warning, actions: [notify]}
""")
    ledger = Ledger(tmp_path / "l.db", run_id="live-t")
    ledger.add_silence(Silence("sil-1", "demo-scorer", T0, T0 + 7200, "migration", "alice"), "wall")
    pipeline = build_pipeline(config, recorder=ledger)
    labels = {"rule": "errors", "deployment": "demo-scorer", "variant": "primary", "severity": "warning"}

    def muted(at: float) -> bool:
        return first_match(pipeline.silences + pipeline.recorded_silences, labels, at) is not None

    assert muted(T0 + 120)
    ledger.expire_silence("sil-1", T0 + 60, "bob", "wall")
    push_human_input(pipeline)
    assert muted(T0 + 30) and not muted(T0 + 120)
    ledger.close()
