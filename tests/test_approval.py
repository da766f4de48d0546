"""Approval mode end to end: a rollback waits for a listed approver; the answer comes from the
ledger by event time (as the CLI or the Slack button writes it), or the timeout's default
applies. Replays of the same ledger reach the same decisions."""

from __future__ import annotations

import pytest

from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.rules.loader import load_config_text
from rollbackd.scenarios import Fault, Scenario, write_recording
from test_cli import rollbackd

RULES = """
version: 1
settings: {{lateness: 30s, notifier: {{type: none}}}}
grouping: {{group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}}
deployments:
  demo-scorer:
    backend: {{type: log}}
    known_good_after: 5m
    approval: {{approvers: [alice, bob], timeout: {timeout}, default: {default}}}
rules:
  - {{name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, for: 2m, min_samples: 100, severity: critical, actions: [notify, rollback]}}
"""


def config(timeout: str = "10m", default: str = "reject"):
    return load_config_text(RULES.format(timeout=timeout, default=default))


# A 40-minute stream whose version 2, deployed at 10 minutes, fails a quarter of its requests:
# its rollback waits for approval (also the Slack buttons' tests, test_slack_interactions.py).
BAD_VERSION = Scenario(
    name="bad", seed=5, duration=2400.0, versions=((0.0, "1"), (600.0, "2")),
    faults=(Fault("error_rate", start=0.0, magnitude=0.25, version="2"),),
)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("approval") / "bad.jsonl.gz"
    write_recording(BAD_VERSION, path)
    return path


def run(recording, cfg, db, run_id="r") -> list[dict]:
    ledger = Ledger(db, run_id=run_id)
    d = MemoryDecisions()
    replay(open_recording(str(recording), cfg), build_pipeline(cfg, decisions=d, recorder=ledger),
           batch_size=4096)
    ledger.close()
    return [r for r in d.records if r.get("action") == "rollback"]


def pending(recording, tmp_path, cfg) -> dict:
    rb = run(recording, cfg, tmp_path / "probe.db")
    assert rb[0]["status"] == "pending_approval" and "alice, bob" in rb[0]["detail"]
    return rb[0]


def test_approved_rollback_runs_at_the_next_boundary_after_the_answer(recording, tmp_path):
    cfg = config()
    wait = pending(recording, tmp_path, cfg)
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    ledger.add_approval(wait["incident_id"], "approve", "alice", wait["ts"] + 95, "wall")
    ledger.close()
    rb = run(recording, cfg, db)
    assert [r["status"] for r in rb] == ["pending_approval", "succeeded"]
    done = rb[1]
    assert done["approval"] == {"decision": "approve", "by": "alice", "at": wait["ts"] + 95,
                                "timed_out": False}
    assert wait["ts"] + 95 <= done["ts"] < wait["ts"] + 95 + 60
    assert (done["from_version"], done["to_version"]) == ("2", "1")
    # The same ledger replayed again: the same decisions.
    assert run(recording, cfg, db, run_id="r2") == rb


def test_rejected_rollback_is_skipped(recording, tmp_path):
    cfg = config()
    wait = pending(recording, tmp_path, cfg)
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    ledger.add_approval(wait["incident_id"], "reject", "bob", wait["ts"] + 10, "wall", reason="known")
    ledger.close()
    rb = run(recording, cfg, db)
    assert [(r["status"], r.get("reason")) for r in rb] == [
        ("pending_approval", "approval"), ("skipped", "rejected")]
    assert rb[1]["detail"] == "rejected by bob"


@pytest.mark.parametrize("default,status", [("reject", "skipped"), ("approve", "succeeded")])
def test_the_default_applies_at_the_timeout(recording, tmp_path, default, status):
    cfg = config(timeout="5m", default=default)
    db = tmp_path / "l.db"
    wait = pending(recording, tmp_path, cfg)
    # Someone not among the approvers answers: recorded, but it does not count.
    ledger = Ledger(db)
    ledger.add_approval(wait["incident_id"], "approve", "mallory", wait["ts"] + 1, "wall")
    ledger.close()
    rb = run(recording, cfg, db)
    assert [r["status"] for r in rb] == ["pending_approval", status]
    assert rb[1]["ts"] == wait["ts"] + 300
    assert rb[1]["approval"] == {"decision": default, "by": None, "at": wait["ts"] + 300,
                                 "timed_out": True}


def test_an_answer_given_before_the_request_counts(recording, tmp_path):
    cfg = config()
    wait = pending(recording, tmp_path, cfg)
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    ledger.add_approval(wait["incident_id"], "approve", "alice", wait["ts"] - 1, "wall")
    ledger.close()
    rb = run(recording, cfg, db)
    assert [r["status"] for r in rb] == ["succeeded"] and rb[0]["ts"] == wait["ts"]


def test_approve_command_writes_a_chained_row(recording, tmp_path):
    inc = pending(recording, tmp_path, config())["incident_id"]  # the command needs a waiting rollback
    out = rollbackd("approve", inc, "--by", "alice", "--at", "1790000000", "--db", "probe.db",
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{inc}: approved by alice".encode() in out.stdout
    out = rollbackd("approve", inc, "--reject", "--by", "bob", "--db", "probe.db", cwd=tmp_path)
    assert out.returncode == 0 and b"rejected by bob" in out.stdout
    ledger = Ledger(tmp_path / "probe.db")
    rows = ledger.approvals(inc)
    ledger.close()
    assert [(r["decision"], r["by"]) for r in rows] == [("approve", "alice"), ("reject", "bob")]
    assert rollbackd("audit", "verify", "--db", "probe.db", cwd=tmp_path).returncode == 0


def test_a_wait_survives_a_checkpoint(recording, tmp_path):
    """Snapshot while the rollback waits, restore into a fresh pipeline: the same decisions as
    without the restart."""
    from rollbackd.daemon.clock import EventTimeClock

    cfg = config()
    wait = pending(recording, tmp_path, cfg)
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    ledger.add_approval(wait["incident_id"], "approve", "bob", wait["ts"] + 200, "wall")
    ledger.close()
    expected = run(recording, cfg, db, run_id="ref")

    def feed(pipeline, src, clock, stop=None):
        while (b := src.read(500)) is not None:
            pipeline.ingest(b.events)
            clock.observe(pipeline.max_event_time)
            pipeline.advance(clock.now())
            if stop is not None and stop(pipeline):
                return True
        pipeline.advance(clock.flush())
        return False

    led = Ledger(db, run_id="cut")
    d1 = MemoryDecisions()
    first = build_pipeline(cfg, decisions=d1, recorder=led)
    src = open_recording(str(recording), cfg)
    clock = EventTimeClock(first.lateness)
    assert feed(first, src, clock, stop=lambda p: bool(p.awaiting))
    blob = first.snapshot()
    d2 = MemoryDecisions()
    second = build_pipeline(cfg, decisions=d2, recorder=led)
    second.restore(blob)
    assert second.awaiting == first.awaiting
    feed(second, src, clock)
    led.close()
    got = [r for r in d1.records + d2.records if r.get("action") == "rollback"]
    assert got == expected
