"""Rollbacks confirmed against the system they changed (``actions/verification.py``).

The targets are real: a traffic file on disk, the command backend running real scripts, the
webhook backend against an HTTP server on loopback. Where a target must never converge, another
writer puts the old state back between looks (fault injection through the injected sleep).
Time is injected: a whole ``verify_within`` of 15 minutes runs in milliseconds.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from loopback import LoopbackServer

from rollbackd.actions.base import ActionResult, Notice, RollbackPlan, Verification
from rollbackd.actions.command import CommandBackend
from rollbackd.actions.delivery import Delivery
from rollbackd.actions.logbackend import LogBackend
from rollbackd.actions.trafficfile import TrafficFileBackend
from rollbackd.actions.verification import Confirmer, PollPolicy
from rollbackd.actions.webhook import WebhookBackend
from rollbackd.cli import main
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.executor import SyncExecutor
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.rules.loader import load_config_text
from rollbackd.scenarios import BUILTIN, write_recording

OLD = {"routes": {"demo-scorer": {"1": 0, "2": 100}}}


class FakeTime:
    """``sleep`` advances ``monotonic``; ``between`` runs at each sleep (another writer)."""

    def __init__(self, between: Callable[[], object] | None = None) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []
        self.between = between

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        if self.between is not None:
            self.between()

    def monotonic(self) -> float:
        return self.t

    def confirmer(self, policy: PollPolicy = PollPolicy()) -> Confirmer:
        return Confirmer(policy, sleep=self.sleep, monotonic=self.monotonic)


def expected_looks(within: float, policy: PollPolicy) -> tuple[int, list[float]]:
    """Looks and pauses of a target that never converges: a look at 0, then after each pause
    (``policy.interval(n)``, the last one cut to the bound), the last look at the bound."""
    t, n, pauses = 0.0, 1, []
    while t < within:
        pause = min(policy.interval(n), within - t)
        pauses.append(pause)
        t += pause
        n += 1
    return n, pauses


def plan(to: str = "1", frm: str = "2") -> RollbackPlan:
    return RollbackPlan("demo-scorer", "primary", frm, to, "inc-v-1", "rule serving-error-rate")


def write(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))


# The poll schedule --------------------------------------------------------------------------
def test_the_poll_interval_doubles_up_to_its_cap():
    policy = PollPolicy(first=1.0, multiplier=2.0, max_interval=30.0)
    assert [policy.interval(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert PollPolicy(first=5, multiplier=1, max_interval=5).interval(10_000) == 5
    assert PollPolicy().interval(10_000) == 30.0  # no overflow far out
    for bad in ({"first": 0}, {"multiplier": 0.5}, {"first": 10, "max_interval": 5}):
        with pytest.raises(ValueError):
            PollPolicy(**bad)


# Traffic file -------------------------------------------------------------------------------
def test_a_traffic_file_that_took_the_rollback_is_confirmed_at_the_first_look(tmp_path):
    path = tmp_path / "routes.json"
    write(path, OLD)
    backend = TrafficFileBackend(path)
    assert backend.apply(plan()).status == "succeeded"
    clock = FakeTime()
    v = clock.confirmer().confirm(backend, plan(), 900.0, "traffic-file")
    assert (v.verdict, v.observed, v.expected, v.polls, v.elapsed) == ("confirmed", "1", "1", 1, 0.0)
    assert clock.sleeps == []


def test_a_traffic_file_another_writer_keeps_resetting_is_unconfirmed_at_the_bound(tmp_path):
    path = tmp_path / "routes.json"
    write(path, OLD)
    backend = TrafficFileBackend(path)
    assert backend.apply(plan()).status == "succeeded"
    write(path, OLD)  # a deployer that keeps its own weights: at once, and again between looks
    clock = FakeTime(between=lambda: write(path, OLD))
    policy = PollPolicy()
    v = clock.confirmer(policy).confirm(backend, plan(), 900.0, "traffic-file")
    looks, pauses = expected_looks(900.0, policy)
    assert (v.verdict, v.observed, v.expected) == ("unconfirmed", "2", "1")
    assert (v.polls, clock.sleeps, v.elapsed) == (looks, pauses, 900.0)
    assert looks == 35 and sum(pauses) == 900.0  # 0, 1, 3, 7, 15, 31, then every 30 s; the last cut to 29 s
    assert "weights are" in v.detail
    assert v.describe().startswith("observed 2, expected 1 (weights are")


def test_a_traffic_file_that_converges_late_is_confirmed_when_it_does(tmp_path):
    path = tmp_path / "routes.json"
    write(path, OLD)
    backend = TrafficFileBackend(path)
    assert backend.apply(plan()).status == "succeeded"
    write(path, OLD)
    resets = iter([True, True, False])  # the other writer gives up after three resets

    def writer() -> None:
        if next(resets, False):
            write(path, OLD)
        else:
            write(path, {"routes": {"demo-scorer": {"1": 100, "2": 0}}})

    clock = FakeTime(between=writer)
    v = clock.confirmer().confirm(backend, plan(), 900.0, "traffic-file")
    assert (v.verdict, v.polls, clock.sleeps, v.elapsed) == ("confirmed", 4, [1.0, 2.0, 4.0], 7.0)


# Command backend, real scripts ----------------------------------------------------------------
def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_command_whose_current_argv_reports_the_target_is_confirmed(tmp_path):
    state = tmp_path / "serving"
    state.write_text("2\n")
    apply = script(tmp_path / "rollback.sh", f'echo "$1" > {state}\n')
    read = script(tmp_path / "current.sh", f"cat {state}\n")
    backend = CommandBackend([apply, "{to_version}"], current_argv=[read, "{deployment}"])
    assert backend.apply(plan()).status == "succeeded"
    v = FakeTime().confirmer().confirm(backend, plan(), 900.0, "command")
    assert (v.verdict, v.observed, v.polls) == ("confirmed", "1", 1)


def test_a_command_whose_current_argv_keeps_the_old_version_is_unconfirmed(tmp_path):
    apply = script(tmp_path / "rollback.sh", "exit 0\n")  # accepts, changes nothing
    read = script(tmp_path / "current.sh", "echo 2\n")
    backend = CommandBackend([apply, "{to_version}"], current_argv=[read])
    assert backend.apply(plan()).status == "succeeded"
    clock = FakeTime()
    v = clock.confirmer().confirm(backend, plan(), 60.0, "command")
    looks, pauses = expected_looks(60.0, PollPolicy())
    assert (v.verdict, v.observed, v.polls, clock.sleeps) == ("unconfirmed", "2", looks, pauses)
    assert "current version is '2', expected '1'" in v.detail


def test_a_command_without_current_argv_cannot_observe(tmp_path):
    backend = CommandBackend([script(tmp_path / "rollback.sh", "exit 0\n")])
    clock = FakeTime()
    v = clock.confirmer().confirm(backend, plan(), 900.0, "command")
    assert (v.verdict, v.detail, clock.sleeps) == ("cannot_observe", "no current_argv configured", [])
    assert v.describe() == "cannot observe: no current_argv configured"


# Backends without read-back, and a read that breaks ------------------------------------------
def test_log_and_webhook_backends_cannot_observe_and_cost_no_look():
    clock = FakeTime()
    with LoopbackServer() as server:
        for name, backend in (("log", LogBackend()), ("webhook", WebhookBackend(server.url))):
            v = clock.confirmer().confirm(backend, plan(), 900.0, name)
            assert (v.verdict, v.polls, v.detail) == ("cannot_observe", 0, f"{name} backend has no read-back")
        assert server.requests == []  # confirming asked the receiver nothing
    assert clock.sleeps == []


class BrokenRead:
    def apply(self, plan: RollbackPlan) -> ActionResult:
        return ActionResult("succeeded")

    def current(self, deployment: str, variant: str) -> str | None:
        raise OSError("no route to host")

    def verify(self, plan: RollbackPlan) -> ActionResult:
        raise OSError("no route to host")


def test_a_read_that_raises_is_a_look_that_saw_nothing():
    v = FakeTime().confirmer().confirm(BrokenRead(), plan(), 10.0, "custom")
    assert (v.verdict, v.observed, v.detail) == ("unconfirmed", None, "OSError: no route to host")


def test_a_verification_survives_the_ledger_round_trip():
    v = Verification("unconfirmed", "mlflow", "1", "2", 35, 900.0004, "alias at 2")
    assert Verification.from_record(json.loads(json.dumps(v.to_record()))) == Verification(
        "unconfirmed", "mlflow", "1", "2", 35, 900.0, "alias at 2")


# End to end: the engine escalates an unconfirmed rollback ------------------------------------
RULES = """
version: 1
settings: {{lateness: 30s, join_horizon: 1h, notifier: {{type: none}}}}
grouping: {{group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}}
deployments:
  demo-scorer:
    backend: {backend}
    cooldown: 30m
    known_good_after: 10m
    verify_within: 10m
rules:
  - {{name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, window: {{size: 1m}}, for: 2m, keep_firing_for: 5m, min_samples: 100,
     severity: critical, actions: [notify, rollback]}}
"""


@pytest.fixture(scope="module")
def sustained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "sustained.jsonl.gz"
    write_recording(BUILTIN["sustained_errors"], path)
    return path


class GitOpsFile(TrafficFileBackend):
    """The real traffic-file backend, with another writer that puts the old weights back as
    soon as rollbackd has written its own (fault injection)."""

    def apply(self, plan: RollbackPlan) -> ActionResult:
        result = super().apply(plan)
        write(self.path, OLD)
        return result


class Said(list):
    """A notifier that keeps the text of every notice (the words on-call reads)."""

    def post(self, notice: Notice) -> ActionResult:
        self.append(notice.text)
        return ActionResult("skipped", "kept", thread=notice.thread or notice.incident_id)


def run(recording: Path, backend: str, tmp_path: Path, clock: FakeTime,
        override: object = None, said: Said | None = None) -> tuple[list[dict], Ledger]:
    config = load_config_text(RULES.format(backend=backend), "verify.yaml")
    decisions = MemoryDecisions()
    ledger = Ledger(tmp_path / "ledger.db", run_id="verify")
    overrides = {"demo-scorer": override} if override is not None else None
    pipeline = build_pipeline(config, decisions=decisions, recorder=ledger, env={}, backend_overrides=overrides,
                              notifier=said)
    pipeline.executor = SyncExecutor(Delivery(pipeline.edges, clock.confirmer()), pipeline)
    replay(open_recording(str(recording), config), pipeline)
    ledger.commit()
    return decisions.records, ledger


def rollback_rows(ledger: Ledger, action: str = "rollback") -> list[dict]:
    return [json.loads(r["data"]) for r in ledger.rows("actions", action=action, phase="finished")]


def test_a_rollback_a_writer_keeps_undoing_escalates_after_verify_within(sustained, tmp_path):
    path = tmp_path / "routes.json"
    write(path, OLD)
    clock = FakeTime(between=lambda: write(path, OLD))
    said = Said()
    records, ledger = run(sustained, f"{{type: traffic-file, path: {path}}}", tmp_path, clock, GitOpsFile(path), said)
    (rb,) = [d for d in records if d.get("action") == "rollback"]
    assert rb["status"] == "succeeded"  # the file was written: apply itself went through
    assert "verification" not in rb  # the rollback's record is what it was before checks existed
    (check,) = [d for d in records if d.get("action") == "confirm"]
    looks, pauses = expected_looks(600.0, PollPolicy())
    verdict = {"verdict": "unconfirmed", "backend": "traffic-file", "expected": "1", "observed": "2",
               "polls": looks, "elapsed": 600.0, "detail": "weights are {'1': 0, '2': 100}"}
    described = f"observed 2, expected 1 (weights are {{'1': 0, '2': 100}}; {looks} polls in 600s)"
    assert check == {
        "ts": rb["ts"], "kind": "action", "action": "confirm", "incident_id": rb["incident_id"],
        "deployment": "demo-scorer", "variant": "primary", "rule": "serving-error-rate",
        "from_version": "2", "to_version": "1", "backend": "traffic-file",
        "idempotency_key": rb["idempotency_key"] + "/confirm",
        "status": "failed", "detail": described, "attempts": looks, "verification": verdict,
    }
    at = records.index(rb)
    (esc,) = [d for d in records if d.get("state") == "rollback_unconfirmed"]
    # Decided when each result came back: the check right after the rollback (a replay's
    # executor runs it at once), the escalation right after the check.
    assert (records.index(check), records.index(esc)) == (at + 1, at + 2)
    assert (esc["kind"], esc["incident_id"], esc["ts"]) == ("incident", rb["incident_id"], rb["ts"])
    assert esc["verification"] == verdict
    notices = [d for d in records[at:] if d.get("action") == "notify"]
    # The incident's first notice was decided in the same step, before the rollback's place;
    # the check's escalation comes after the rollback's own replies.
    assert [d["reason"] for d in notices[:4]] == [
        "incident opened", "rollback started", "rollback succeeded", "escalated: rollback not confirmed by traffic-file"]
    assert notices[3]["ts"] == rb["ts"]
    assert said[2] == "[CRITICAL] demo-scorer/primary: serving-error-rate — rollback succeeded: demo-scorer/primary 2 → 1"
    assert said[3] == ("[CRITICAL] demo-scorer/primary: serving-error-rate — escalated: rollback not confirmed by "
                       f"traffic-file: {described}")
    assert "verification" not in rollback_rows(ledger)[0]
    assert rollback_rows(ledger, "confirm")[0]["verification"]["verdict"] == "unconfirmed"
    (row,) = ledger.rows("incidents", change="rollback_unconfirmed")
    assert json.loads(row["data"])["verification"]["observed"] == "2"
    ledger.close()
    shown = CliRunner().invoke(main, ["incidents", "show", rb["incident_id"], "--db", str(tmp_path / "ledger.db")])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    confirm_line = next(i for i, line in enumerate(lines) if "  confirm   1  failed  demo-scorer/primary" in line)
    assert lines[confirm_line + 1] == f"      target NOT confirmed by traffic-file: {described}"
    assert "rollback_unconfirmed" in shown.output
    # The stream's own verdict is independent: the scenario's errors never stop, so the alerts'
    # verification fails at its deadline as well.
    assert [d["state"] for d in records if d.get("state") == "verification_failed"] == ["verification_failed"]


def test_a_rollback_the_file_took_is_confirmed_and_said_so(sustained, tmp_path):
    path = tmp_path / "routes.json"
    write(path, OLD)
    said = Said()
    records, ledger = run(sustained, f"{{type: traffic-file, path: {path}}}", tmp_path, FakeTime(), said=said)
    (rb,) = [d for d in records if d.get("action") == "rollback"]
    assert "verification" not in rb
    (check,) = [d for d in records if d.get("action") == "confirm"]
    assert (check["status"], check["verification"]["verdict"], check["verification"]["polls"]) == (
        "succeeded", "confirmed", 1)
    assert records.index(check) == records.index(rb) + 1
    # "succeeded" says the backend took the request, as before checks existed; the check's
    # reply follows it in the thread.
    assert said[2] == ("[CRITICAL] demo-scorer/primary: serving-error-rate — rollback succeeded: "
                       "demo-scorer/primary 2 → 1")
    assert said[3] == ("[CRITICAL] demo-scorer/primary: serving-error-rate — rollback confirmed by traffic-file: "
                       "observed 1, expected 1 (all traffic to 1; 1 poll in 0s)")
    assert not [d for d in records if d.get("state") == "rollback_unconfirmed"]
    (done,) = [d for d in records if d.get("reason") == "rollback succeeded"]
    assert done["notice"] == "updated"
    assert json.loads(path.read_text())["routes"]["demo-scorer"] == {"1": 100, "2": 0}
    ledger.close()


def test_a_webhook_rollback_says_cannot_observe_in_the_ledger_and_nothing_in_the_decision_log(sustained, tmp_path):
    with LoopbackServer() as server:
        hooked, ledger = run(sustained, f"{{type: webhook, url: '{server.url}/rollback'}}", tmp_path, FakeTime())
        assert [r.method for r in server.requests] == ["POST"]  # one call; confirming asked nothing
    (rb,) = [d for d in hooked if d.get("action") == "rollback"]
    assert "verification" not in rb
    assert not [d for d in hooked if d.get("state") == "rollback_unconfirmed" or d.get("action") == "confirm"]
    assert not ledger.rows("actions", action="confirm")  # no check was decided, none started
    (row,) = rollback_rows(ledger)
    assert row["verification"] == {"verdict": "cannot_observe", "backend": "webhook", "expected": "1",
                                   "observed": None, "polls": 0, "elapsed": 0.0,
                                   "detail": "webhook backend has no read-back"}
    # Beside the log backend's run, only the backend's own words differ.
    (tmp_path / "log").mkdir()
    logged, _ = run(sustained, "{type: log}", tmp_path / "log", FakeTime())
    assert len(logged) == len(hooked)
    differ = {k for a, b in zip(logged, hooked) for k in a if a[k] != b.get(k)}
    assert differ <= {"backend", "detail", "result"}


def test_a_rollback_still_in_flight_counts_for_the_cooldown(sustained, tmp_path):
    """Live, a slow backend keeps a rollback in flight: a second rollback of the deployment
    decided meanwhile is held to the cooldown from the first one's decision, as in a replay,
    where the first would have answered at once."""
    from rollbackd.actions.intents import Rollback

    config = load_config_text(RULES.format(backend="{type: log}"), "verify.yaml")
    decisions = MemoryDecisions()
    pipeline = build_pipeline(config, decisions=decisions, env={})
    start = BUILTIN["sustained_errors"].start
    earlier = plan()
    confirming = Rollback(earlier.idempotency_key, earlier,
                          {"ts": start + 900.0, "deployment": "demo-scorer"})

    class StillConfirming(SyncExecutor):
        def in_flight(self):
            return [confirming]

    pipeline.executor = StillConfirming(Delivery(pipeline.edges), pipeline)
    replay(open_recording(str(sustained), config), pipeline)
    (rb,) = [d for d in decisions.records if d.get("action") == "rollback"]
    assert (rb["status"], rb["reason"]) == ("skipped", "cooldown")
    assert rb["detail"] == f"last rollback of demo-scorer at {start + 900.0:.3f}, cooldown 1800s"


def test_a_checkpoint_taken_mid_check_resumes_the_check_and_applies_nothing_again(sustained, tmp_path):
    """The live executor, the real command backend: the rollback script counts its runs, the
    current_argv script reads what serves. A checkpoint is taken while the check waits between
    looks; the daemon stops (the wait ends at once, no verdict); a new pipeline restored from
    the checkpoint resumes the check, which the target now passes. The rollback ran once."""
    import time

    from rollbackd.actions.intents import Confirm, FollowUps
    from rollbackd.actions.verification import Confirmer
    from rollbackd.daemon.executor import LaneExecutor

    serving, runs = tmp_path / "serving", tmp_path / "runs"
    serving.write_text("2\n")  # another writer keeps 2 serving until after the restart
    apply = script(tmp_path / "rollback.sh", f'echo "$1" >> {runs}\n')
    read = script(tmp_path / "current.sh", f"cat {serving}\n")
    backend = f"{{type: command, argv: [{apply}, '{{to_version}}'], current_argv: [{read}]}}"
    config = load_config_text(RULES.format(backend=backend), "verify.yaml")
    ledger = Ledger(tmp_path / "ledger.db", run_id="verify")
    slow = PollPolicy(first=30.0, max_interval=30.0)

    def live(decisions: MemoryDecisions) -> tuple:
        pipeline = build_pipeline(config, decisions=decisions, recorder=ledger, env={})
        pool = LaneExecutor(Delivery(pipeline.edges, Confirmer(slow)))
        pipeline.executor = pool.bind(pipeline)
        return pipeline, pool

    def drain_until(pool: LaneExecutor, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, "not reached in time"
            pool.drain()
            time.sleep(0.01)

    first = MemoryDecisions()
    pipeline, pool = live(first)
    replay(open_recording(str(sustained), config), pipeline)
    drain_until(pool, lambda: any(isinstance(i, Confirm) for i in pool.in_flight()))
    time.sleep(0.2)  # the check's first look saw 2; it waits 30 s for the next
    checkpoint = pipeline.snapshot()
    started = time.monotonic()
    assert not pool.close(10.0)  # the check is left, in flight
    assert time.monotonic() - started < 2  # the stop did not wait out the pause
    (rb,) = [d for d in first.records if d.get("action") == "rollback"]
    assert rb["status"] == "succeeded" and not [d for d in first.records if d.get("action") == "confirm"]
    reasons = [d.get("reason") for d in first.records if d.get("action") == "notify"]
    assert reasons[:3] == ["incident opened", "rollback started", "rollback succeeded"]  # not waiting for it
    assert runs.read_text() == "1\n"

    serving.write_text("1\n")
    second = MemoryDecisions()
    pipeline2, pool2 = live(second)
    pipeline2.restore(checkpoint)
    assert [type(i).__name__ for i in pipeline2.restored_effects] == ["Confirm", "FollowUps"]
    key = rb["idempotency_key"] + "/confirm"
    assert [i.key for i in pipeline2.restored_effects if isinstance(i, (Confirm, FollowUps))] == [key, key]
    pool2.resubmit(pipeline2.restored_effects, pipeline2)
    drain_until(pool2, lambda: len(second.records) >= 2)
    assert pool2.close(5.0)
    ledger.close()
    check, said = second.records
    assert (check["action"], check["status"], check["idempotency_key"]) == ("confirm", "succeeded", key)
    assert (check["verification"]["verdict"], check["verification"]["observed"], check["verification"]["polls"]) == (
        "confirmed", "1", 1)
    assert (said["action"], said["reason"]) == ("notify", "rollback confirmed by command")
    assert runs.read_text() == "1\n"  # the rollback script ran once, before the checkpoint
    phases = [(r["action"], r["phase"]) for r in Ledger(tmp_path / "ledger.db", run_id="verify").rows("actions")
              if r["action"] in ("rollback", "confirm")]
    assert phases == [("rollback", "started"), ("rollback", "finished"), ("confirm", "started"),
                      ("confirm", "finished")]


def test_which_backends_are_checked_after_a_rollback(tmp_path):
    """A check is decided only for a backend that reads back; a command only with current_argv."""
    from rollbackd.actions.base import observes

    with LoopbackServer() as server:
        webhook = WebhookBackend(server.url)
    apply = script(tmp_path / "rollback.sh", "exit 0\n")
    assert [observes(b) for b in (LogBackend(), webhook, CommandBackend([apply]),
                                  CommandBackend([apply], current_argv=[apply]),
                                  TrafficFileBackend(tmp_path / "routes.json"), BrokenRead())] == [
        False, False, False, True, True, True]
