"""Checkpoints and state records without pickle (rollbackd/daemon/snapshot.py).

A snapshot is a frame of an explicit schema: a pipeline restored from one mid-stream reaches
byte-identical decisions (the golden digests of every built-in scenario); a frame that is
corrupt, truncated, of another schema or a pickle is refused with a clear message, and a pickle
that would run code runs none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from golden_decisions import GOLDEN, cases, rules_files
from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.pipeline import Pipeline
from rollbackd.daemon.replay import build_pipeline, open_recording, push_human_input
from rollbackd.daemon.snapshot import SCHEMA, StateError, frame, from_plain, to_plain, unframe
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording


class _Creates:
    """A pickle payload that creates a file when loaded: what a forged record would carry."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _restarted(p: Pipeline, way: str = "snapshot") -> Pipeline:
    """``p`` snapshotted (``snapshot(external=True)``, or ``freeze()`` then encoded) and restored
    into a new pipeline on the same edges, as after a restart."""
    if way == "freeze":
        frozen = p.freeze()
        blobs = p.new_blobs()
        blob = frozen.encode()
    else:
        blob, blobs = p.snapshot(external=True), p.new_blobs()
    # every blob it names, not only the new ones: the new pipeline starts with none persisted
    named = {**_kept, **blobs}
    _kept.clear()
    _kept.update({d: named[d] for d in p.blob_digests()})
    q = Pipeline(p.config, p.edges, p.silences)
    q.restore(blob, dict(_kept))
    return q


_kept: dict[str, bytes] = {}


def _digest_with_restarts(recording: Path, rules: Path, work: Path, every: int, way: str = "snapshot") -> str:
    """tests/golden_decisions.replay_digest, the pipeline restored from its snapshot after every
    ``every`` batches."""
    config = load_config(rules)
    out = work / "decisions.jsonl"
    ledger = Ledger(work / "ledger.db", run_id="golden")
    pipeline = build_pipeline(config, decisions=DecisionLog(out), recorder=ledger,
                              notifier=ConsoleNotifier(stream=io.StringIO()))
    source = open_recording(str(recording), config)
    _kept.clear()
    i = 0
    while (batch := source.read(4096)) is not None:
        if batch.rejects:
            pipeline.reject(batch.rejects)
        push_human_input(pipeline)
        pipeline.ingest(batch.events)
        pipeline.advance(pipeline.watermark)
        i += 1
        if i % every == 0:
            pipeline = _restarted(pipeline, way)
    pipeline = _restarted(pipeline, way)
    pipeline.finish()
    pipeline.advance(pipeline.max_event_time)
    source.close()
    pipeline.edges.decisions.close()
    ledger.close()
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("way", ["snapshot", "freeze"])
@pytest.mark.parametrize("scenario", sorted(BUILTIN))
def test_a_pipeline_restored_mid_stream_decides_byte_for_byte_as_the_golden_replay(scenario, way, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    rec = tmp_path / f"{scenario}.jsonl.gz"
    write_recording(BUILTIN[scenario], rec)
    for rname, rules in sorted(cases(scenario).items()):
        case = tmp_path / rname
        case.mkdir()
        assert _digest_with_restarts(rec, rules, case, every=2, way=way) == golden[f"replay/{scenario}/{rname}"], rname


@pytest.mark.parametrize("scenario", sorted(BUILTIN))
def test_frozen_snapshots_encoded_long_after_restore_the_state_at_each_freeze(scenario, tmp_path):
    """A freeze after every batch, none encoded until the end of the stream (in the order
    frozen): each restores to exactly the state at its freeze. Between a freeze and its encoding
    detectors were updated (their state owed to several snapshots at once), alerts replaced,
    labels joined and expired, references made (written inline, then named)."""
    rec = tmp_path / "rec.jsonl.gz"
    write_recording(BUILTIN[scenario], rec)
    config = load_config(rules_files()["demo"])
    p = build_pipeline(config, notifier=ConsoleNotifier(stream=io.StringIO()))
    p.joiner.note_changes()  # as the live daemon does: the join buffer's changes are noted
    source = open_recording(str(rec), config)
    taken = []
    kept: dict[str, bytes] = {}
    while (batch := source.read(2048)) is not None:
        p.ingest(batch.events)
        p.advance(p.watermark)
        frozen = p.freeze()
        kept.update(p.new_blobs())
        named = set(p.blob_digests())
        taken.append((frozen, named, p.snapshot()))  # snapshot(): whole, on this thread, now
    source.close()
    assert len(taken) > 3
    for frozen, named, whole in taken:
        a, b = Pipeline(config, p.edges), Pipeline(config, p.edges)
        a.restore(frozen.encode(), {d: kept[d] for d in named})
        b.restore(whole)
        assert a.snapshot() == b.snapshot()
    with pytest.raises(RuntimeError, match="in the order frozen"):
        taken[0][0].encode()


def run_for(work: Path, scenario: str, batches: int) -> tuple[Pipeline, Any]:
    """A pipeline (demo rules) after ``batches`` batches of a built-in scenario, and the open
    source of the rest."""
    rec = work / "rec.jsonl.gz"
    write_recording(BUILTIN[scenario], rec)
    config = load_config(rules_files()["demo"])
    p = build_pipeline(config, notifier=ConsoleNotifier(stream=io.StringIO()))
    source = open_recording(str(rec), config)
    for _ in range(batches):
        batch = source.read(4096)
        p.ingest(batch.events)
        p.advance(p.watermark)
    return p, source


@pytest.fixture(scope="module")
def midway(tmp_path_factory) -> Pipeline:
    """A pipeline half way through calibration_decay: detectors, references, incidents, panes."""
    p, source = run_for(tmp_path_factory.mktemp("midway"), "calibration_decay", 6)
    source.close()
    assert p.detectors and p.assembler.panes
    return p


def test_a_pickled_pipeline_snapshot_is_refused_and_runs_nothing(midway, tmp_path):
    target = tmp_path / "pwned"
    forged = pickle.dumps({"snapshot_version": 2, "x": _Creates(str(target))})
    fresh = Pipeline(midway.config, midway.edges)
    with pytest.raises(StateError, match="pickled pipeline written by a rollbackd before schema 3"):
        fresh.restore(forged)
    assert not target.exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty", "schema", "kind"])
def test_a_damaged_snapshot_is_refused_with_the_reason(midway, damage):
    blob = midway.snapshot()
    blobs = midway.new_blobs()
    header = struct.Struct(">4sBHI")
    if damage == "truncated":
        bad, reason = blob[: len(blob) // 2], "corrupt or truncated"
    elif damage == "flipped":
        i = len(blob) // 3
        bad, reason = blob[:i] + bytes([blob[i] ^ 0x40]) + blob[i + 1:], "corrupt or truncated"
    elif damage == "garbage":
        bad, reason = os.urandom(4096), "no RBDS header"
    elif damage == "empty":
        bad, reason = b"", "no RBDS header"
    elif damage == "schema":
        magic, kind, _, crc = header.unpack_from(blob)
        bad, reason = header.pack(magic, kind, SCHEMA + 1, crc) + blob[header.size:], f"schema {SCHEMA + 1}"
    else:
        bad, reason = frame("checkpoint", {"a": 1}), "a checkpoint record, not a pipeline"
    fresh = Pipeline(midway.config, midway.edges)
    with pytest.raises(StateError, match=reason):
        fresh.restore(bad, blobs)
    assert fresh.detectors == {} and fresh.assembler.panes == {}


def test_a_record_with_a_valid_checksum_but_an_unknown_type_is_refused():
    payload = msgspec.msgpack.encode(["o", "os.system", "command", "touch /tmp/x"])
    forged = struct.pack(">4sBHI", b"RBDS", 1, SCHEMA, zlib.crc32(payload)) + payload
    with pytest.raises(StateError, match="'os.system' is not one a snapshot may hold"):
        unframe("pipeline", forged)
    payload = msgspec.msgpack.encode(["a", "|O", [1], b"\x00" * 8])
    forged = struct.pack(">4sBHI", b"RBDS", 1, SCHEMA, zlib.crc32(payload)) + payload
    with pytest.raises(StateError, match="dtype '|O' is not allowed"):
        unframe("pipeline", forged)


def test_references_are_blobs_written_once_and_a_snapshot_missing_one_is_refused(midway):
    whole = midway.snapshot()
    blob = midway.snapshot(external=True)
    digests = midway.blob_digests()
    assert digests and set(midway.new_blobs()) == digests  # the first: every reference is new
    assert len(blob) < len(whole)
    again = midway.snapshot(external=True)
    assert midway.new_blobs() == {} and midway.blob_digests() == digests  # written once
    assert again == blob
    fresh = Pipeline(midway.config, midway.edges)
    with pytest.raises(StateError, match="is missing"):
        fresh.restore(blob, {})
    digest = sorted(digests)[0]
    with pytest.raises(StateError, match="does not match its digest"):
        fresh.restore(blob, {digest: frame("blob", [1, 2, 3])})
    Pipeline(midway.config, midway.edges).restore(whole)  # self-contained


def test_values_round_trip_with_their_types():
    values = {
        ("a", "b"): [1, 2.5, None, True, "x", b"\x00"],
        "set": {1, 2}, "frozen": frozenset({"a"}), "big": 2**70, "neg": -(2**70),
        "arr": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.float64(0.1),
        "objarr": np.array(["a", 1, None], dtype=object), "inf": float("-inf"),
    }
    back = from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(values))))
    assert back.keys() == values.keys()
    for k, v in values.items():
        if isinstance(v, np.ndarray):
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and (back[k] == v).all()
        else:
            assert back[k] == v and type(back[k]) is type(v)


def test_every_intent_an_executor_holds_in_flight_round_trips():
    """A checkpoint carries the calls in flight: each kind of intent must come back as itself
    (a rollback's check among them, so a restart resumes it instead of re-applying)."""
    import typing

    from rollbackd.actions import intents
    from rollbackd.actions.base import Notice, RollbackPlan

    plan = RollbackPlan("d", "primary", "2", "1", "inc-1", "rule r")
    rec = {"ts": 1.0, "kind": "action", "deployment": "d"}
    notice = intents.Notify("inc-1:notice:0", Notice("inc-1", "opened", 1.0, "d", "primary", "2", "t", "x"),
                            rec, "incident opened")
    made = [
        intents.Record(rec, "action"), notice, intents.Rollback(plan.idempotency_key, plan, rec, {"verify_within": 900.0}),
        intents.Pause("inc-1:pause:primary", "d", "primary", "inc-1", rec),
        intents.Confirm(intents.confirm_key(plan.idempotency_key), plan, rec,
                        {"verify_within": 900.0, "backend": "command"}),
        intents.FollowUps(plan.idempotency_key, "d"), intents.Fill(plan.idempotency_key, "d", (notice,)),
    ]
    assert {type(i) for i in made} == set(typing.get_args(intents.Intent))
    back = from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(made))))
    assert back == made and [type(i) for i in back] == [type(i) for i in made]
    assert back[4].key == "inc-1:rollback:primary:1/confirm"


@pytest.mark.parametrize("damage", ["pickle", "truncated", "schema", "garbage", "no pipeline"])
def test_a_state_record_that_is_not_one_is_refused_and_runs_nothing(damage, tmp_path):
    from rollbackd.daemon.snapshot import decode_state, encode_state
    from rollbackd.errors import Fatal

    target = tmp_path / "pwned"
    good = encode_state({"pipeline": b"snapshot", "position": {"in:0": 5}, "decisions_offset": 2,
                         "blind": None})
    assert decode_state(good, "state/0")["position"] == {"in:0": 5}
    if damage == "pickle":
        bad = pickle.dumps({"format": 1, "pipeline": _Creates(str(target))})
        reason = "state/0: a pickled state written by a rollbackd before schema 3: refused"
    elif damage == "truncated":
        bad, reason = good[:-3], "corrupt or truncated"
    elif damage == "schema":
        bad, reason = good[:5] + struct.pack(">H", 2) + good[7:], "state of schema 2; this rollbackd reads schema 3"
    elif damage == "garbage":
        bad, reason = b"\x00" * 64, "no RBDS header"
    else:
        bad, reason = encode_state({"position": {"in:0": 5}}), "without a pipeline snapshot"
    with pytest.raises(StateError, match=reason) as exc:
        decode_state(bad, "state/0")
    assert isinstance(exc.value, Fatal)  # the daemon stops: the partition never starts empty
    assert not target.exists()


def test_a_detector_state_naming_a_field_its_class_does_not_declare_is_refused():
    from rollbackd.daemon.snapshot import Declared, restore_detector
    from rollbackd.detectors.error_rate import ErrorRate

    det = ErrorRate(threshold=0.1)
    with pytest.raises(StateError, match="ErrorRate has no field 'threshold'"):
        restore_detector(det, Declared(["S", "threshold", 0.9]))
    with pytest.raises(StateError, match="ErrorRate has no field '__class__'"):
        restore_detector(det, Declared(["S", "__class__", ["o", "Alert"]]))
    assert det.threshold == 0.1


def test_river_state_that_does_not_decode_is_refused():
    pytest.importorskip("river")
    from rollbackd.daemon.snapshot import Declared, restore_detector
    from rollbackd.detectors.sequential import Sequential

    det = Sequential(method="adwin")
    with pytest.raises(ValueError, match="saved state does not decode"):
        restore_detector(det, Declared(["S", "_river", ["d", "_helper", b"garbage"]]))
    with pytest.raises(ValueError, match="has no attribute '__class__'"):
        restore_detector(det, Declared(["S", "_river", ["d", "__class__", "x"]]))


def test_a_frozen_snapshot_encodes_later_what_the_pipeline_was_when_frozen(tmp_path):
    """freeze() on the processing thread, encode() after the pipeline moved on (as the writer
    thread does): it restores to the state at the freeze, not a mix."""
    p, source = run_for(tmp_path, "feature_shift", 3)
    frozen = p.freeze()
    blobs = p.new_blobs()
    at_freeze = p.snapshot()
    for _ in range(2):  # the pipeline goes on: windows close, detectors and the join move
        batch = source.read(4096)
        p.ingest(batch.events)
        p.advance(p.watermark)
    source.close()
    assert p.snapshot() != at_freeze
    a, b = Pipeline(p.config, p.edges), Pipeline(p.config, p.edges)
    a.restore(frozen.encode(), blobs)
    b.restore(at_freeze)
    assert a.snapshot() == b.snapshot()


def test_the_checkpoint_writer_keeps_references_beside_the_file_written_once(midway, tmp_path):
    from rollbackd.daemon.checkpoints import CheckpointWriter
    from rollbackd.daemon.run import Checkpoint

    from rollbackd.daemon.snapshot import Blobs

    midway.checkpointing.blobs = Blobs()  # as a new process: no reference written yet
    path = str(tmp_path / "state.ckpt")
    writer = CheckpointWriter(path)

    def checkpoint(position):
        frozen = midway.freeze()
        blobs = {d: None for d in midway.blob_digests()}
        blobs.update(midway.new_blobs())
        writer.submit(Checkpoint({0: frozen}, position, 0, {}, blobs=blobs))
        return writer.wait()

    # The first names none: the references are new, written inline by the writer thread (never
    # hashed on the processing thread), which keeps their digests for the next one.
    first = checkpoint({"in:0": 1})
    assert first.position == {"in:0": 1} and not midway.blob_digests()
    inline = Checkpoint.load(path)
    fresh, whole = Pipeline(midway.config, midway.edges), Pipeline(midway.config, midway.edges)
    fresh.restore(inline.pipelines[0], inline.blobs)
    whole.restore(midway.snapshot())
    assert fresh.snapshot() == whole.snapshot()
    second = checkpoint({"in:0": 2})
    refs = sorted(os.listdir(path + ".refs"))
    assert refs and refs == sorted(midway.blob_digests())
    assert second.bytes_written == os.path.getsize(path) + sum(
        os.path.getsize(os.path.join(path + ".refs", r)) for r in refs)
    third = checkpoint({"in:0": 3})
    assert third.bytes_written == os.path.getsize(path)  # the main file only
    assert os.path.getsize(path) < first.bytes_written  # the references are not in it any more
    writer.close()
    cp = Checkpoint.load(path)
    assert cp.position == {"in:0": 3} and set(cp.blobs) == set(refs)
    fresh = Pipeline(midway.config, midway.edges)
    fresh.restore(cp.pipelines[0], cp.blobs)
    assert len(fresh.detectors) == len(midway.detectors) and len(fresh.joiner) == len(midway.joiner)
    os.unlink(os.path.join(path + ".refs", refs[0]))
    with pytest.raises(StateError, match=r"is missing\. Move the file \(and .*\.refs\) away"):
        Checkpoint.load(path)


def test_a_failed_write_is_reported_to_the_processing_thread_and_commits_nothing(midway, tmp_path):
    from rollbackd.daemon.checkpoints import CheckpointWriter
    from rollbackd.daemon.run import Checkpoint

    writer = CheckpointWriter(str(tmp_path / "missing-folder" / "state.ckpt"))
    writer.submit(Checkpoint({0: midway.snapshot()}, {"in:0": 1}, 0, {}))
    with pytest.raises(OSError):
        writer.wait()
    writer.close()


def test_the_join_buffers_changes_rebuild_it_as_it_was_at_each_take():
    """OutcomeJoiner.take_changes: adds, matches, duplicates, expiry and eviction by the cap,
    applied later to the copy, give each book as it was at the take, in its order."""
    from rollbackd.daemon.join import OutcomeJoiner
    from rollbackd.events import Outcome, Prediction

    joiner = OutcomeJoiner(horizon=30.0, max_pending=40)
    for dep in ("a", "b"):
        joiner.track(dep)
    takes = []
    for step in range(12):
        for i in range(9):
            n = step * 9 + i
            dep = "ab"[n % 2]
            joiner.add(Prediction(id=f"p{n}", ts=10.0 * step + i, deployment=dep, model_version="1",
                                  features={}, prediction=1.0, score=0.5))
            joiner.added(0)
        joiner.add(Prediction(id=f"p{step * 9}", ts=10.0 * step, deployment="a", model_version="1",
                              features={}, prediction=1.0, score=0.5))  # a duplicate
        if step % 3 == 2:
            joiner.match(Outcome(id=f"p{step * 9 - 3}", ts=10.0 * step, deployment="b", label=1))
        if step == 7:
            joiner.track("c")
        joiner.expire(10.0 * step)
        takes.append((joiner.take_changes(), OutcomeJoiner.encode_books(
            {d: dict(b) for d, b in joiner.pending_books().items()})))
    assert joiner.stats.evicted_capacity and joiner.stats.never_labeled and joiner.stats.joined
    for changes, expected in takes:
        assert changes.encoded() == expected
