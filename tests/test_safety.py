"""Per-deployment policy (rollback / freeze / notify-only) and the loop guard: as a tick table
of the policy, then end to end through the pipeline on seeded recordings."""

from __future__ import annotations

import pytest

from rollbackd.actions.base import RollbackPlan
from rollbackd.actions.policy import SafetyPolicy, SafetyState
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.rules.loader import ConfigError, load_config_text
from rollbackd.scenarios import Fault, Scenario, write_recording

T0 = 1_790_000_000.0
HOUR = 3600.0


def plan(incident: str, frm: str = "v2", to: str = "v1") -> RollbackPlan:
    return RollbackPlan("fraud", "primary", frm, to, incident, "rule error-rate")


def test_freeze_and_notify_only_never_roll_back():
    state = SafetyState()
    assert SafetyPolicy(policy="freeze").decide(state, plan("i"), T0)[0] == "freeze"
    assert SafetyPolicy(policy="notify-only").decide(state, plan("i"), T0)[0] == "notify_only"
    # Even without a target: the policy is what is reported.
    assert SafetyPolicy(policy="freeze").decide(state, None, T0)[0] == "freeze"
    with pytest.raises(ValueError, match="rollback, freeze, notify-only"):
        SafetyPolicy(policy="undo")
    with pytest.raises(ValueError, match=">= 1"):
        SafetyPolicy(max_rollbacks=0)


# (seconds after T0, plan, serving_since offset or None, verdict). No cooldown, at most two
# rollbacks per hour; a "run" verdict is recorded as applied.
TABLE = [
    (0, plan("i1", "v2"), -900, "run"),
    (600, plan("i2", "v3"), 300, "run"),
    (1200, plan("i3", "v4"), 1000, "loop_guard"),  # a third within the hour
    (1300, plan("i4", "v2"), 1250, "redeployed"),  # v2 is serving again since after its rollback
    (1300, plan("i5", "v3"), 500, "loop_guard"),  # v3 never stopped: not a re-deploy
    (HOUR + 1, plan("i6", "v5"), HOUR, "run"),  # the first rollback left the window
    (2 * HOUR, plan("i7", "v2"), 2 * HOUR - 10, "run"),  # v2's rollback is older than the period
]


def test_loop_guard_as_a_tick_table():
    policy, state = SafetyPolicy(cooldown=0, max_rollbacks=2, loop_period=HOUR), SafetyState()
    for t, p, since, want in TABLE:
        state.prune(T0 + t - HOUR)
        verdict, why = policy.decide(state, p, T0 + t, serving_since=T0 + since)
        assert verdict == want, f"t={t}: {verdict} ({why})"
        if verdict == "run":
            state.record(p, T0 + t, applied=True)
    assert "deployed again" in policy.decide(state, plan("i8", "v2"), T0 + 2 * HOUR + 1,
                                             serving_since=T0 + 2 * HOUR + 1)[1]


# End to end ---------------------------------------------------------------------------------
RULES = """
version: 1
settings: {{lateness: 30s, notifier: {{type: none}}}}
grouping: {{group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}}
deployments:
  demo-scorer: {{backend: {{type: log}}, known_good_after: 5m, cooldown: 0s{extra}}}
rules:
  - {{name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, for: 2m, min_samples: 100, severity: critical, actions: [notify, rollback]}}
"""


def config(extra: str = ""):
    return load_config_text(RULES.format(extra=extra))


def rollbacks(path, cfg) -> list[dict]:
    d = MemoryDecisions()
    replay(open_recording(str(path), cfg), build_pipeline(cfg, decisions=d), batch_size=4096)
    return [r for r in d.records if r["kind"] == "action" and r["action"] == "rollback"]


def _bad(*versions: str) -> tuple[Fault, ...]:
    return tuple(Fault("error_rate", start=0.0, magnitude=0.25, version=v) for v in versions)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    # Three bad versions in a row, each rolled back to 1 by the deployer after a while.
    loop = root / "loop.jsonl.gz"
    write_recording(Scenario(
        name="three_bad", seed=5, duration=3000.0,
        versions=((0.0, "1"), (600.0, "2"), (1000.0, "1"), (1400.0, "3"), (1800.0, "1"),
                  (2200.0, "4"), (2600.0, "1")),
        faults=_bad("2", "3", "4"),
    ), loop)
    # A bad version, rolled back, then re-synced by GitOps: the same bad version again.
    resync = root / "resync.jsonl.gz"
    write_recording(Scenario(
        name="resync", seed=6, duration=2200.0,
        versions=((0.0, "1"), (600.0, "2"), (1000.0, "1"), (1400.0, "2"), (1900.0, "1")),
        faults=_bad("2"),
    ), resync)
    return {"loop": loop, "resync": resync}


def test_freeze_policy_pages_and_never_reverts(recordings):
    rb = rollbacks(recordings["resync"], config(", policy: freeze"))
    assert rb and {(r["status"], r["reason"]) for r in rb} == {("skipped", "freeze")}
    assert rb[0]["detail"].startswith("policy freeze: rollout not paused (backend cannot); not reverted")


def test_freeze_pauses_an_argo_rollout(recordings, tmp_path, k8s):
    """Two incidents of the same bad version, against the real API server: the first pauses the
    Rollout (spec.paused), the second finds it paused; nothing is aborted or reverted."""
    pytest.importorskip("kubernetes")
    from test_backend_kubernetes import NAME, ROLLOUT, rollout

    from rollbackd.daemon.ledger import Ledger

    ns = k8s.namespace("freeze")
    k8s.apply(rollout(), ns)
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    backend = f"{{type: kubernetes, kind: argo-rollout, namespace: {ns}, kubeconfig: '{k8s.kubeconfig()}'}}"
    cfg = load_config_text(RULES.format(extra=", policy: freeze").replace("{type: log}", backend))
    d = MemoryDecisions()
    replay(open_recording(str(recordings["resync"]), cfg),
           build_pipeline(cfg, decisions=d, recorder=ledger, env={}), batch_size=4096)
    pauses = [r for r in d.records if r.get("action") == "pause"]
    assert [(p["status"], p["result"]["paused"], p["backend"]) for p in pauses] == [
        ("succeeded", True, "kubernetes"), ("skipped", True, "kubernetes")]
    obj = k8s.get(*ROLLOUT, NAME, ns)
    assert obj["spec"]["paused"] is True and "abort" not in (obj.get("status") or {})
    assert obj["metadata"]["generation"] == 2  # one write of the spec: the pause
    rb = [r for r in d.records if r.get("action") == "rollback"]
    assert [(r["status"], r["detail"].split(";")[0]) for r in rb] == [
        ("skipped", "policy freeze: rollout paused"), ("skipped", "policy freeze: rollout already paused")]
    rows = ledger.rows("actions", action="pause")
    ledger.close()
    assert [r["phase"] for r in rows] == ["started", "finished", "started", "finished"]
    from test_cli import rollbackd

    out = rollbackd("incidents", "show", rb[0]["incident_id"], "--db", "l.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert f"pause     succeeded    demo-scorer/primary  (rollout {ns}/demo-scorer paused)" in text
    assert '"paused": true' in text


def test_a_rollback_refused_by_rbac_is_reported_in_the_api_servers_words(recordings, tmp_path, k8s):
    """The real daemon path with a token that has no rights: the rollback fails once, its detail
    names who may not do what, and ``incidents show`` prints it without a traceback."""
    pytest.importorskip("kubernetes")
    from test_backend_kubernetes import DEPLOY, NAME, deployment
    from test_cli import rollbackd

    from rollbackd.daemon.ledger import Ledger

    ns = k8s.namespace("denied")
    k8s.apply(deployment(), ns)
    backend = (f"{{type: kubernetes, kind: deployment, namespace: {ns}, container: model, "
               f"image_template: 'registry/demo:{{version}}', kubeconfig: '{k8s.kubeconfig(k8s.nobody_token)}', "
               "retry: {max_attempts: 1}}")
    cfg = load_config_text(RULES.format(extra="").replace("{type: log}", backend))
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    d = MemoryDecisions()
    replay(open_recording(str(recordings["resync"]), cfg), build_pipeline(cfg, decisions=d, recorder=ledger),
           batch_size=4096)
    ledger.close()
    rb = [r for r in d.records if r.get("action") == "rollback"]
    denied = (f'HTTP 403 Forbidden: deployments.apps "{NAME}" is forbidden: User "nobody" cannot get resource '
              f'"deployments" in API group "apps" in the namespace "{ns}"')
    assert rb and rb[0]["status"] == "failed"
    assert rb[0]["detail"] == f"read deployment {ns}/{NAME}: gave up: {denied}"
    assert k8s.get(*DEPLOY, NAME, ns)["metadata"]["generation"] == 1
    out = rollbackd("incidents", "show", rb[0]["incident_id"], "--db", "l.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = (out.stdout + out.stderr).decode()
    assert denied in " ".join(text.split()) and "Traceback" not in text


def test_notify_only_policy(recordings):
    rb = rollbacks(recordings["resync"], config(", policy: notify-only"))
    assert rb and {(r["status"], r["reason"]) for r in rb} == {("skipped", "notify_only")}


def test_loop_guard_stops_the_third_rollback(recordings):
    rb = rollbacks(recordings["loop"], config(", loop_guard: {max_rollbacks: 2, per: 1h}"))
    assert [(r["from_version"], r["status"], r.get("reason")) for r in rb] == [
        ("2", "succeeded", None), ("3", "succeeded", None), ("4", "skipped", "loop_guard"),
    ]
    unguarded = rollbacks(recordings["loop"], config(", loop_guard: false"))
    assert [r["status"] for r in unguarded] == ["succeeded"] * 3


def test_a_redeployed_version_is_not_fought(recordings):
    rb = rollbacks(recordings["resync"], config())
    assert [(r["from_version"], r["to_version"], r["status"], r.get("reason")) for r in rb] == [
        ("2", "1", "succeeded", None), ("2", "1", "skipped", "redeployed"),
    ]
    assert "deployed again" in rb[1]["detail"]


def test_policy_and_loop_guard_are_validated():
    with pytest.raises(ConfigError) as exc:
        config(", policy: undo, loop_guard: {max_rollbacks: 0, per: 0s}")
    text = str(exc.value)
    assert "deployments.demo-scorer.policy" in text and "'undo' is not one of" in text
    assert "loop_guard.max_rollbacks" in text and "loop_guard.per" in text
    cfg = config(", policy: notify-only, loop_guard: {max_rollbacks: 5, per: 2h}")
    dep = cfg.deployment("demo-scorer")
    assert (dep.policy, dep.max_rollbacks, dep.loop_period) == ("notify-only", 5, 7200.0)


# Post-rollback verification -------------------------------------------------------------------
def decisions(path, cfg) -> list[dict]:
    d = MemoryDecisions()
    replay(open_recording(str(path), cfg), build_pipeline(cfg, decisions=d), batch_size=4096)
    return d.records


def test_an_incident_resolves_only_after_its_rollback_is_verified(recordings):
    recs = decisions(recordings["resync"], config(", loop_guard: false, verify_within: 10m"))
    first = next(r["incident_id"] for r in recs if r["kind"] == "incident")
    states = [r["state"] for r in recs if r["kind"] == "incident" and r["incident_id"] == first]
    assert states == ["opened", "alert_resolved", "verified", "resolved"]
    rollback = next(r for r in recs if r.get("action") == "rollback" and r["incident_id"] == first)
    verified = next(r for r in recs if r.get("state") == "verified" and r["incident_id"] == first)
    assert verified["verify_by"] == rollback["ts"] + 600 and verified["ts"] <= verified["verify_by"]
    reasons = [r["reason"] for r in recs if r.get("action") == "notify" and r["incident_id"] == first]
    assert reasons.index("rollback verified") < reasons.index("all alerts resolved")


def test_a_rollback_that_does_not_take_escalates(tmp_path):
    # The log backend changes nothing: version 2 keeps serving and keeps failing.
    path = tmp_path / "stuck.jsonl.gz"
    write_recording(Scenario(name="stuck", seed=7, duration=1800.0,
                             versions=((0.0, "1"), (600.0, "2")), faults=_bad("2")), path)
    recs = decisions(path, config(", verify_within: 5m"))
    rollback = next(r for r in recs if r.get("action") == "rollback")
    assert rollback["status"] == "succeeded"
    inc = rollback["incident_id"]
    states = [r for r in recs if r["kind"] == "incident" and r["incident_id"] == inc]
    failed = [r for r in states if r["state"] == "verification_failed"]
    assert len(failed) == 1 and failed[0]["ts"] == rollback["ts"] + 300
    assert "resolved" not in [r["state"] for r in states]  # still open: on-call owns it now
    notice = next(r for r in recs if r.get("action") == "notify" and r["ts"] == failed[0]["ts"])
    assert notice["reason"].startswith("escalated: rollback not verified")
    assert "serving-error-rate" in notice["reason"]


# Known-good needs traffic ---------------------------------------------------------------------
def _served_by(path, version: str, before: float) -> int:
    from rollbackd.events import Prediction

    cfg = config()
    src, n = open_recording(str(path), cfg), 0
    while (b := src.read(4096)) is not None:
        n += sum(1 for e in b.events if type(e) is Prediction and e.model_version == version and e.ts < before)
    return n


def test_known_good_needs_a_minimum_of_predictions(recordings):
    """Version 1 served 10 minutes before the bad version 2: a target with as many predictions
    as it served as the minimum, none with one more."""
    first = rollbacks(recordings["resync"], config())[0]
    served = _served_by(recordings["resync"], "1", first["ts"])
    assert 10_000 < served < 14_000  # ~20/s for 600 s: the count is real, not the default
    at_min = rollbacks(recordings["resync"], config(f", known_good_min_predictions: {served}"))[0]
    assert (at_min["status"], at_min["to_version"]) == ("succeeded", "1")
    above = rollbacks(recordings["resync"], config(f", known_good_min_predictions: {served + 1}"))[0]
    assert (above["status"], above["reason"], above["to_version"]) == ("skipped", "no_target", None)
    assert config().deployment("demo-scorer").known_good_min_predictions == 1000  # the default


def test_known_good_min_predictions_is_validated():
    with pytest.raises(ConfigError) as exc:
        config(", known_good_min_predictions: -1")
    assert "deployments.demo-scorer.known_good_min_predictions" in str(exc.value)
    assert "must be >= 0" in str(exc.value) and ":6:" in str(exc.value)
    with pytest.raises(ConfigError, match="expected an integer"):
        config(", known_good_min_predictions: 1.5")


# Which incidents take a version's known-good status away ---------------------------------------
MARKS = """
version: 1
settings: {{lateness: 30s, notifier: {{type: none}}}}
grouping: {{group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}}
deployments:
  demo-scorer: {{backend: {{type: log}}, known_good_after: 5m, cooldown: 0s}}
rules:
  - {{name: errors-warning, detector: error_rate, threshold: 0.05, clear_threshold: 0.03, for: 2m,
     min_samples: 100, severity: warning, actions: [notify]{warn}}}
  - {{name: errors-critical, detector: error_rate, threshold: 0.25, clear_threshold: 0.15, for: 2m,
     min_samples: 100, severity: critical, actions: [notify, rollback]{crit}}}
"""


@pytest.fixture(scope="module")
def warned_then_broken(tmp_path_factory):
    """Version 1 raises a warning (10 % errors for ten minutes) and recovers; version 2 fails
    (40 % errors)."""
    path = tmp_path_factory.mktemp("marks") / "warned.jsonl.gz"
    write_recording(Scenario(
        name="warned_then_broken", seed=11, duration=2700.0, versions=((0.0, "1"), (1500.0, "2")),
        faults=(Fault("error_rate", start=300.0, end=900.0, magnitude=0.10, version="1"),
                Fault("error_rate", start=0.0, magnitude=0.40, version="2")),
    ), path)
    return path


@pytest.mark.parametrize("warn, crit, want", [
    ("", "", ("1", "succeeded")),  # a notify-only warning leaves version 1 a target
    (", marks_bad: true", "", (None, "skipped")),  # unless the rule says it marks bad
    ("", ", marks_bad: false", ("1", "succeeded")),  # a rollback rule may opt out; 1 was never bad
])
def test_only_rules_that_roll_back_mark_a_version_bad(warned_then_broken, warn, crit, want):
    cfg = load_config_text(MARKS.format(warn=warn, crit=crit))
    records = decisions(warned_then_broken, cfg)
    warned = [r for r in records if r["kind"] == "alert" and r["rule"] == "errors-warning"
              and r["state"] == "firing" and r["ts"] < T0 + 1500]
    assert warned, "version 1's warning must fire for the test to mean anything"
    rb = [r for r in records if r["kind"] == "action" and r["action"] == "rollback"]
    assert rb and (rb[0]["to_version"], rb[0]["status"]) == want, rb[0]
    assert rb[0]["from_version"] == "2"


def test_marks_bad_false_leaves_the_rolled_back_version_unmarked(warned_then_broken):
    """The version history after the replay: version 2 is marked bad by the rule that rolled it
    back, unless that rule says ``marks_bad: false``."""
    for crit, bad in (("", {"2"}), (", marks_bad: false", set())):
        cfg = load_config_text(MARKS.format(warn="", crit=crit))
        pipe = build_pipeline(cfg, decisions=MemoryDecisions())
        replay(open_recording(str(warned_then_broken), cfg), pipe, batch_size=4096)
        assert pipe.versions[("demo-scorer", "primary")].bad_versions() == bad
