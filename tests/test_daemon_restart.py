"""The live loop's restart guarantees, on the file source (the Kafka tests repeat them on a
real broker): a crash after a checkpoint, at any point, ends with the same decision log as an
uninterrupted run, no duplicate and no lost rollback in the ledger or at the webhook server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from loopback import LoopbackServer
from live_reference import live_reference

from rollbackd.actions.webhook import WebhookBackend
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.replay import build_pipeline
from rollbackd.daemon.run import Checkpoint, Daemon, RunSettings
from rollbackd.daemon.sources import RecordingSource
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"
BATCH = 1000


class ManualClock:
    def __init__(self) -> None:
        # After the recording, as a live wall clock is (the reference for future timestamps).
        self.t = 1_790_010_000.0

    def now(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("daemon") / "sustained.jsonl"
    write_recording(BUILTIN["sustained_errors"], path)
    return path


@pytest.fixture(scope="module")
def config():
    return load_config(RULES)


def reference_log(recording: Path, config, tmp_path: Path) -> bytes:
    """A replay's decisions, up to the watermark a live run reaches, with its own webhook server
    so the outcome of the rollback reads the same."""
    return live_reference(recording, config, tmp_path / "ref.jsonl", webhook_deployments=["demo-scorer"],
                          secret=b"k", batch=BATCH)


def live(recording, config, tmp_path, hook_url, *, crash_after: int | None, checkpoint_at: set[int]):
    """Run the daemon over the file, checkpointing after the given batches; with crash_after,
    stop dead after that batch (no final checkpoint), as a SIGKILL would."""
    cp = Checkpoint.load(str(tmp_path / "state.ckpt"))
    start = cp.position if cp is not None else None
    source = RecordingSource(str(recording), start=start)
    ledger = Ledger(tmp_path / "ledger.db", run_id="live-test")
    decisions = DecisionLog(tmp_path / "decisions.jsonl", append=True)
    backend = WebhookBackend(hook_url, secret=b"k")
    pipeline = build_pipeline(config, decisions=decisions, recorder=ledger,
                              backend_overrides={"demo-scorer": backend})
    daemon = Daemon(pipeline, source, ledger=ledger, decisions=decisions, clock=ManualClock(),
                    settings=RunSettings(checkpoint_path=str(tmp_path / "state.ckpt"),
                                         checkpoint_every=1e9, batch_size=BATCH, idle_after=1e9))
    daemon.restore()
    i = 0
    while (batch := source.read(BATCH)) is not None:
        daemon.step(batch)
        i += 1
        if i in checkpoint_at:
            daemon.checkpoint()
            daemon.flush_checkpoint()  # durable (the writer's thread) before the crash
        if crash_after is not None and i == crash_after:
            decisions.close()
            ledger.close()
            return False
    daemon.checkpoint()
    daemon.flush_checkpoint()
    decisions.close()
    ledger.close()
    return True


@pytest.mark.parametrize(
    "crash_after,checkpoint_at",
    [
        (20, {10}),  # crash long before the fault
        (36, {30}),  # checkpoint before the incident, crash after the rollback ran
        (40, {35, 38}),  # crash right after a checkpoint that followed the rollback
        (5, set()),  # crash before any checkpoint: start over from the beginning
    ],
)
def test_a_crash_and_restart_gives_the_uninterrupted_decisions_and_one_rollback(
    recording, config, tmp_path, crash_after, checkpoint_at
):
    expected = reference_log(recording, config, tmp_path)
    assert b'"action":"rollback"' in expected
    with LoopbackServer() as hook:
        finished = live(recording, config, tmp_path, hook.url + "/rollback",
                        crash_after=crash_after, checkpoint_at=checkpoint_at)
        assert not finished
        assert live(recording, config, tmp_path, hook.url + "/rollback", crash_after=None, checkpoint_at=set())
        keys = [r.header("Idempotency-Key") for r in hook.requests]
    assert (tmp_path / "decisions.jsonl").read_bytes() == expected
    assert len(set(keys)) == 1, "one rollback intent"
    # The crash in case 2 happened after the rollback finished: the restart found it in the
    # outbox and did not call the backend again.
    assert len(keys) == 1
    ledger = Ledger(tmp_path / "ledger.db", run_id="live-test")
    finished_rows = [r for r in ledger.rows("actions", action="rollback", run_id="live-test") if r["phase"] == "finished"]
    assert [(r["status"], r["to_version"]) for r in finished_rows] == [("succeeded", "1")]
    firing = [r for r in ledger.rows("alert_transitions", run_id="live-test") if r["state"] == "firing"]
    assert len(firing) == 1, "re-derived rows after the checkpoint are not duplicated"
    ledger.close()


def test_idle_stream_lets_event_time_follow_the_wall_clock(recording, config, tmp_path):
    pipeline = build_pipeline(config)
    clock = ManualClock()
    source = RecordingSource(str(recording))
    daemon = Daemon(pipeline, source, clock=clock,
                    settings=RunSettings(checkpoint_path=str(tmp_path / "c"), idle_after=10.0))
    batch = source.read(100)
    daemon.step(batch)
    wm = pipeline.max_event_time - pipeline.lateness
    assert daemon.event_now(clock.t) == wm
    clock.t += 9.0
    assert daemon.event_now(clock.t) == wm  # not idle yet
    clock.t += 51.0  # 60 s without an event: event time moved on by 60 s
    assert daemon.event_now(clock.t) == pytest.approx(wm + 60.0)


def test_the_daemons_dead_letter_file_exists_from_the_start(config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    dead = tmp_path / "rollbackd.rejected.jsonl"
    pipeline = build_pipeline(config, dead_letter_path=dead)
    daemon = Daemon(pipeline, RecordingSource(str(empty)), clock=ManualClock(),
                    settings=RunSettings(checkpoint_path=str(tmp_path / "c")))
    daemon.run()  # no event at all: no checkpoint, and still the (empty) file
    assert dead.read_bytes() == b""


def test_the_last_checkpoints_duration_and_size_are_exported(recording, config, tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from rollbackd.daemon.http import MetricsCollector

    class TickingClock(ManualClock):
        def now(self) -> float:  # every reading is 0.25 s after the one before
            self.t += 0.25
            return self.t

    source = RecordingSource(str(recording))
    pipeline = build_pipeline(config)
    daemon = Daemon(pipeline, source, clock=TickingClock(),
                    settings=RunSettings(checkpoint_path=str(tmp_path / "state.ckpt"), checkpoint_every=1e9,
                                         batch_size=BATCH, idle_after=1e9))
    daemon.restore()
    for _ in range(5):
        daemon.step(source.read(BATCH))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(daemon.pipeline, daemon=daemon, clock=ManualClock()))

    def exported() -> dict[str, float]:
        text = generate_latest(registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    assert "rollbackd_checkpoint_duration_seconds" not in exported()  # none written yet
    daemon.checkpoint()
    # two clock readings a tick apart, the start and the end: the loop only froze the state
    assert exported()["rollbackd_checkpoint_duration_seconds"] == 0.25
    assert "rollbackd_checkpoint_bytes" not in exported()  # the writer has not reported yet
    daemon.flush_checkpoint()
    written = [tmp_path / "state.ckpt", *(tmp_path / "state.ckpt.refs").glob("*")]
    assert exported()["rollbackd_checkpoint_bytes"] == sum(p.stat().st_size for p in written) > 0


def test_the_checkpoint_is_written_off_the_loop_and_offsets_committed_once_it_is_durable(
        recording, config, tmp_path, monkeypatch):
    """The loop only freezes the state: while the writer's thread is still saving, the loop goes
    on and the source's offsets stay uncommitted; once the file is durable they are committed."""
    import threading

    from rollbackd.daemon.checkpoints import Checkpoint as FileCheckpoint

    gate, saving = threading.Event(), threading.Event()
    save = FileCheckpoint.save

    def slow_save(self, path: str) -> int:
        saving.set()
        assert gate.wait(30), "the test never opened the gate"
        return save(self, path)

    monkeypatch.setattr(FileCheckpoint, "save", slow_save)

    class Committing(RecordingSource):
        commits: list = []

        def commit(self, position) -> None:
            self.commits.append(position)

    source = Committing(str(recording))
    daemon = Daemon(build_pipeline(config), source, clock=ManualClock(),
                    settings=RunSettings(checkpoint_path=str(tmp_path / "state.ckpt"), checkpoint_every=1e9,
                                         batch_size=BATCH, idle_after=1e9))
    daemon.restore()
    for _ in range(5):
        daemon.step(source.read(BATCH))
    daemon.checkpoint()  # returns at once: the writer is held at the gate
    frozen_at = daemon._position
    assert saving.wait(30) and not (tmp_path / "state.ckpt").exists()
    for _ in range(3):
        daemon.step(source.read(BATCH))  # the loop goes on meanwhile
    assert source.commits == [], "nothing committed before the checkpoint is durable"
    gate.set()
    daemon.flush_checkpoint(30)
    assert source.commits == [frozen_at] and frozen_at != daemon._position
    assert Checkpoint.load(str(tmp_path / "state.ckpt")).position == frozen_at
