"""End-to-end replays of generated recordings through real detectors, rules and actions.

The recordings come from the built-in scenarios (seeded, byte-identical on every run); the
rules are tests/data/e2e-rules.yaml. These are the foundation's acceptance checks: no rollback
for stationary traffic or a blip, one rollback to the previous version for a sustained fault,
a drift alert for a shifted feature, malformed lines counted and dead-lettered, identical
decision logs across runs and batch sizes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import LoopbackServer, SlackAPI

from rollbackd.actions.slack import SlackNotifier
from rollbackd.actions.webhook import WebhookBackend, verify_signature
from rollbackd.daemon.decisions import DecisionLog, MemoryDecisions
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"
SCENARIOS = ("stationary", "error_blip", "sustained_errors", "feature_shift", "malformed")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("recordings")
    out = {}
    for name in SCENARIOS:
        path = root / f"{name}.jsonl.gz"
        out[name] = (path, write_recording(BUILTIN[name], path))
    return out


@pytest.fixture(scope="module")
def config():
    return load_config(RULES)


def run(recording: Path, config, *, batch_size: int = 4096, **kwargs):
    decisions = kwargs.pop("decisions", None) or MemoryDecisions()
    pipeline = build_pipeline(config, decisions=decisions, **kwargs)
    result = replay(open_recording(str(recording), config), pipeline, batch_size=batch_size)
    return result, decisions


def of_kind(decisions: MemoryDecisions, kind: str, **match) -> list[dict]:
    return [
        d for d in decisions.records
        if d["kind"] == kind and all(d.get(k) == v for k, v in match.items())
    ]


def test_stationary_traffic_raises_nothing(recordings, config):
    result, d = run(recordings["stationary"][0], config)
    assert of_kind(d, "alert", state="firing") == []
    assert of_kind(d, "action") == []
    assert result.summary["incidents_open"] == result.summary["incidents_closed"] == []
    # The run really evaluated windows: 30 one-minute windows of ~1200 predictions each.
    assert result.summary["events"]["predictions"] > 30_000


def test_error_blip_is_pending_but_never_fires(recordings, config):
    _, d = run(recordings["error_blip"][0], config)
    pending = of_kind(d, "alert", rule="serving-error-rate", state="pending")
    assert len(pending) == 1, "the blip is seen..."
    assert of_kind(d, "alert", state="firing") == [], "...but a 60 s blip never fires"
    assert of_kind(d, "action", action="rollback") == []


def test_sustained_errors_roll_back_once_to_the_previous_version(recordings, config):
    result, d = run(recordings["sustained_errors"][0], config)
    firing = of_kind(d, "alert", rule="serving-error-rate", state="firing")
    assert len(firing) == 1
    rollbacks = of_kind(d, "action", action="rollback")
    assert len(rollbacks) == 1
    rb = rollbacks[0]
    assert (rb["from_version"], rb["to_version"], rb["status"]) == ("2", "1", "succeeded")
    assert rb["incident_id"] == firing[0]["incident_id"]
    # Version 2 was deployed 900 s in; the rollback comes after `for` (2 windows) + group_wait.
    start = BUILTIN["sustained_errors"].start
    assert start + 900 < rb["ts"] <= start + 900 + 5 * 60
    opened = of_kind(d, "incident", state="opened")
    assert len(opened) == 1 and opened[0]["version"] == "2"
    assert opened[0]["provenance"]["git_sha"]  # the deploy event's provenance annotates it
    assert len(result.summary["incidents_open"]) == 1


def test_shifted_feature_raises_a_drift_alert_naming_it(recordings, config):
    _, d = run(recordings["feature_shift"][0], config)
    firing = of_kind(d, "alert", rule="feature-drift", state="firing")
    assert len(firing) == 1
    evidence = firing[0]["measurement"]["evidence"]
    assert evidence["drifted"] == ["num_0"]
    start = BUILTIN["feature_shift"].start
    assert start + 900 < firing[0]["ts"] <= start + 900 + 4 * 60
    assert of_kind(d, "action", action="rollback") == [], "drift rule only notifies"
    assert of_kind(d, "alert", rule="serving-error-rate", state="firing") == []


def test_malformed_lines_are_counted_and_dead_lettered_without_changing_decisions(
    recordings, config, tmp_path
):
    path, stats = recordings["malformed"]
    dead = tmp_path / "dead.jsonl"
    result, d = run(path, config, dead_letter_path=dead)
    assert stats.malformed > 0
    assert sum(result.summary["rejected"].values()) == stats.malformed
    lines = [json.loads(x) for x in dead.read_text().splitlines()]
    assert len(lines) == stats.malformed
    assert {x["reason"] for x in lines} >= {"invalid_json", "missing_field", "wrong_type", "unknown_type"}
    assert all(x["raw"] and x["position"]["line"] >= 1 for x in lines)
    # The malformed scenario is the stationary one plus bad lines: same decisions (none).
    _, clean = run(recordings["stationary"][0], config)
    assert d.records == clean.records


def test_the_dead_letter_file_is_created_empty_when_nothing_is_rejected(recordings, config, tmp_path):
    dead = tmp_path / "dead.jsonl"
    result, _ = run(recordings["stationary"][0], config, dead_letter_path=dead)
    assert sum(result.summary["rejected"].values()) == 0
    assert dead.read_bytes() == b"", "on-call scripts read this file after every run"


def test_replay_and_demo_leave_the_documented_dead_letter_files(recordings, tmp_path):
    """The CLI's defaults: `<recording>.rejected.jsonl` in the current directory after `replay`,
    `rejected.jsonl` in `demo --out-dir`; both exist though nothing was rejected. In a
    subprocess: the CLI configures structlog for the whole process."""
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "rollbackd.cli"]

    def cli(*args: str) -> None:
        out = subprocess.run([*cmd, *args], cwd=tmp_path, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr

    cli("replay", str(recordings["stationary"][0]), "-c", str(RULES), "--db", "x.db", "--notifier", "none")
    assert (tmp_path / "stationary.jsonl.gz.rejected.jsonl").read_bytes() == b""
    cli("demo", "--out-dir", "demo", "--db", "demo.db")
    assert (tmp_path / "demo" / "rejected.jsonl").read_bytes() == b""


@pytest.mark.parametrize("scenario", ["sustained_errors", "feature_shift"])
def test_decision_logs_are_byte_identical_across_runs_and_batch_sizes(recordings, config, tmp_path, scenario):
    logs = []
    for i, batch in enumerate((4096, 4096, 97)):
        out = tmp_path / f"{i}.jsonl"
        run(recordings[scenario][0], config, batch_size=batch, decisions=DecisionLog(out))
        logs.append(out.read_bytes())
    assert logs[0] and logs[0].count(b"\n") >= 4
    assert logs[0] == logs[1] == logs[2]


def test_ledger_records_transitions_incident_and_the_rollback_before_and_after(recordings, config, tmp_path):
    ledger = Ledger(tmp_path / "l.db", run_id="t1")
    run(recordings["sustained_errors"][0], config, recorder=ledger)
    actions = ledger.rows("actions", action="rollback")
    assert [a["phase"] for a in actions] == ["started", "finished"]
    assert actions[1]["status"] == "succeeded" and actions[1]["to_version"] == "1"
    states = [r["state"] for r in ledger.rows("alert_transitions", rule="serving-error-rate")]
    assert states[:2] == ["pending", "firing"]
    inc = ledger.rows("incidents", change="opened")
    assert len(inc) == 1 and inc[0]["incident_id"] == actions[0]["incident_id"]
    ledger.close()


def test_dry_run_records_the_plan_and_calls_no_backend(recordings, tmp_path):
    text = RULES.read_text().replace("lateness: 30s", "lateness: 30s\n  dry_run: true")
    cfg_path = tmp_path / "dry.yaml"
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    import structlog

    with LoopbackServer() as server, structlog.testing.capture_logs() as logs:
        backend = WebhookBackend(server.url + "/rollback", secret=b"s3cret")
        _, d = run(recordings["sustained_errors"][0], cfg, backend_overrides={"demo-scorer": backend})
        assert server.requests == []
    (rb,) = of_kind(d, "action", action="rollback")
    assert (rb["status"], rb["dry_run"], rb["to_version"]) == ("dry_run", True, "1")
    # asked for, so logged as information, not as a warning (a drill logs one per rollback)
    assert [e["log_level"] for e in logs if e["event"] == "rollback.dry_run"] == ["info"]


def test_a_forced_dry_run_overrides_a_deployment_and_a_rule_that_say_dry_run_false(recordings, tmp_path):
    """settings.force_dry_run (the command line's --dry-run) is an operator's override: a
    deployment or rule with dry_run: false, which overrides the file's own settings.dry_run,
    does not override it."""
    import dataclasses

    text = (RULES.read_text()
            .replace("    cooldown: 30m", "    cooldown: 30m\n    dry_run: false")
            .replace("    actions: [notify, rollback]", "    actions: [notify, rollback]\n    dry_run: false", 1))
    cfg_path = tmp_path / "real.yaml"
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    assert cfg.deployments["demo-scorer"].dry_run is False and cfg.rules[0].dry_run is False
    forced = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, dry_run=True, force_dry_run=True))
    with LoopbackServer() as server:
        backend = WebhookBackend(server.url + "/rollback", secret=b"s3cret")
        _, d = run(recordings["sustained_errors"][0], forced, backend_overrides={"demo-scorer": backend})
        assert server.requests == []
    (rb,) = of_kind(d, "action", action="rollback")
    assert (rb["status"], rb["dry_run"]) == ("dry_run", True)
    # the file's own settings.dry_run does not override them (their documented precedence)
    own = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, dry_run=True))
    with LoopbackServer() as server:
        backend = WebhookBackend(server.url + "/rollback", secret=b"s3cret")
        _, d = run(recordings["sustained_errors"][0], own, backend_overrides={"demo-scorer": backend})
        assert len(server.requests) == 1


def test_rollback_reaches_a_real_webhook_server_signed_and_once(recordings, config):
    with LoopbackServer() as server:
        backend = WebhookBackend(server.url + "/rollback", secret=b"s3cret")
        _, d = run(recordings["sustained_errors"][0], config, backend_overrides={"demo-scorer": backend})
        assert len(server.requests) == 1
        req = server.requests[0]
    body = req.json()
    assert (body["deployment"], body["variant"], body["from_version"], body["to_version"]) == (
        "demo-scorer", "primary", "2", "1",
    )
    assert verify_signature(b"s3cret", req.body, req.header("X-Rollbackd-Signature"))
    assert req.header("Idempotency-Key") == body["idempotency_key"]
    (rb,) = of_kind(d, "action", action="rollback")
    assert rb["status"] == "succeeded" and rb["attempts"] == 1


def test_slack_notices_are_threaded_per_incident(recordings, config):
    with LoopbackServer(SlackAPI("xoxb-t")) as server:
        notifier = SlackNotifier("xoxb-t", "#ml-oncall", base_url=server.url + "/api/")
        _, d = run(recordings["sustained_errors"][0], config, notifier=notifier)
        posts = [r.json() for r in server.requests if r.path.endswith("/chat.postMessage")]
    assert len(posts) == 3  # incident opened, then "rollback started" and "succeeded" in its thread
    parent, started, reply = posts
    assert "thread_ts" not in parent or parent["thread_ts"] is None
    assert started["thread_ts"] == reply["thread_ts"] == "1700000000.000001"
    assert "serving-error-rate" in json.dumps(parent["blocks"])
    assert "rollback started" in started["text"] and "rollback succeeded" in reply["text"]
    assert [n["status"] for n in of_kind(d, "action", action="notify")] == ["succeeded"] * 3


def test_a_failing_notifier_never_blocks_the_rollback(recordings, config):
    with LoopbackServer() as server:  # answers 200 with an empty body: not the Slack API
        server.reply()
        notifier = SlackNotifier("xoxb-t", "#ml-oncall", base_url=server.url + "/api/")
        with LoopbackServer() as hook:
            backend = WebhookBackend(hook.url + "/rollback")
            _, d = run(recordings["sustained_errors"][0], config, notifier=notifier,
                       backend_overrides={"demo-scorer": backend})
            assert len(hook.requests) == 1
    assert [n["status"] for n in of_kind(d, "action", action="notify")] == ["failed"] * 3
    assert of_kind(d, "action", action="rollback")[0]["status"] == "succeeded"
