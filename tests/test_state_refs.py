"""References and large records in the state topic, on a real Kafka broker.

A task's complete drift references go to the refs topic (partition = task, key = digest), each
written once, in the transaction of the first state record that names them; a state record or
a reference larger than one message (the topics' ``max.message.bytes``) is written as parts and
a head. The topics here take 1 MiB (256 KiB for the parts test): far below what the records
need, so every path above the cap runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.kafka import BrokerUnavailable
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.pipeline import Pipeline
from rollbackd.daemon.replay import build_pipeline, open_recording, push_human_input
from rollbackd.daemon.scaleout import GroupState, ensure_topics
from rollbackd.daemon.snapshot import StateError, encode_state, frame
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

pytestmark = pytest.mark.kafka

DEPLOYMENTS = tuple(f"d{i:02d}" for i in range(32))
CAP = 1024 * 1024


def rules(tmp_path: Path) -> Path:
    """Feature drift against a reference of each deployment's first 1,000 predictions."""
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\n"
                    "settings: {dry_run: true, lateness: 30s, join_horizon: 1h, notifier: {type: console}}\n"
                    "deployments:\n" + "".join(f"  {d}: {{reference_size: 1000}}\n" for d in DEPLOYMENTS) +
                    "rules:\n"
                    "  - {name: feature-drift, detector: drift, params: {correction: holm, alpha: 0.01},\n"
                    "     threshold: 0.2, clear_threshold: 0.1, window: {size: 1m}, for: 2m, min_samples: 100,\n"
                    "     severity: warning, actions: [notify]}\n")
    return path


def recording(tmp_path: Path) -> Path:
    """32 deployments, 8 numeric features, their inputs shifting at 450 s (after the references
    are complete, at 200 s): ~64 KB of reference per deployment, ~2 MB in all."""
    base = BUILTIN["feature_shift"]
    scenario = dataclasses.replace(base, deployments=DEPLOYMENTS, duration=700.0, rate=5.0, n_numeric=8,
                                   faults=tuple(dataclasses.replace(f, start=450.0) for f in base.faults))
    path = tmp_path / "rec.jsonl.gz"
    write_recording(scenario, path)
    return path


def stores(bootstrap: str, name: str, cap: int, *ids: str) -> list[GroupState]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(admin, f"{name}-state", f"{name}-decisions", 1, max_record_bytes=cap)
    deadline = time.monotonic() + 30
    for topic in (f"{name}-state", f"{name}-state.refs", f"{name}-decisions"):
        while True:  # created is not yet led: until its partition has a leader
            meta = admin.list_topics(topic, timeout=10).topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions and all(
                    p.leader >= 0 for p in meta.partitions.values()):
                break
            assert time.monotonic() < deadline, f"{topic} has no leader after 30 s"
            time.sleep(0.05)
    return [GroupState(bootstrap, f"g-{name}", f"{name}-state", f"{name}-decisions", transactional_id=f"{i}-{name}",
                       max_record_bytes=cap) for i in ids]


def load(store: GroupState, key: int):
    """``store.load(key)``, asked again while the brokers say a partition has no leader yet
    (NOT_LEADER_FOR_PARTITION right after the topics were made), as the daemon's takeover does."""
    for attempt in range(20):
        try:
            return store.load(key)
        except BrokerUnavailable:
            if attempt == 19:
                raise
            time.sleep(0.5)


def drop_topics(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics([f"{name}-state", f"{name}-state.refs", f"{name}-decisions"]).values():
        try:
            future.result(30)
        except Exception:  # noqa: BLE001 - gone with the session's broker anyway
            pass


def records(bootstrap: str, topic: str) -> list:
    """Every committed record of ``topic``'s partition 0."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                  "enable.auto.commit": False, "enable.partition.eof": True, "isolation.level": "read_committed",
                  "fetch.message.max.bytes": CAP})
    c.assign([TopicPartition(topic, 0, 0)])
    out, deadline = [], time.monotonic() + 30
    while time.monotonic() < deadline:
        msgs = c.consume(500, 0.2)
        if any(m.error() is not None for m in msgs):
            out += [m for m in msgs if m.error() is None]
            break
        out += msgs
    c.close()
    return out


def commit(store: GroupState, p: Pipeline) -> int:
    """``p``'s state as task 0's record (no input offsets: no consumer group here); its size."""
    snapshot = p.snapshot(external=True)
    state = store.task_state(0, snapshot, {}, p.blob_digests())
    store.commit({0: state}, {}, None, {0: p.new_blobs()})
    return len(encode_state(state))


def decide(rec: Path, rules_path: Path, work: Path, store_at: dict[int, GroupState] | None = None) -> tuple[bytes, list]:
    """The recording's decision log, replayed in batches. With ``store_at`` (batch number ->
    store), the task's state is committed after every batch by its owner: the store named at the
    last batch number reached. A new owner takes the task over before its batch: loaded from
    the topics into a new pipeline."""
    config = load_config(rules_path)
    work.mkdir()
    ledger = Ledger(work / "ledger.db", run_id="refs")
    p = build_pipeline(config, decisions=DecisionLog(work / "decisions.jsonl"), recorder=ledger,
                       notifier=ConsoleNotifier(stream=io.StringIO()))
    source = open_recording(str(rec), config)
    sizes, store, i = [], None, 0
    while (batch := source.read(4096)) is not None:
        i += 1
        if store_at and i in store_at:
            store = store_at[i]
            if i > 1:  # taken over: the new owner reads the task's record and references
                saved = load(store, 0)
                assert saved is not None and set(saved["blobs"]) == set(saved["refs"])
                q = Pipeline(p.config, p.edges, p.silences)
                q.restore(saved["pipeline"], saved["blobs"])
                p = q
        push_human_input(p)
        p.ingest(batch.events)
        p.advance(p.watermark)
        if store is not None:
            sizes.append(commit(store, p))
    p.finish()
    p.advance(p.max_event_time)
    source.close()
    p.edges.decisions.close()
    ledger.close()
    return (work / "decisions.jsonl").read_bytes(), sizes


def test_a_task_with_many_references_is_taken_over_with_the_same_decisions_each_reference_written_once(
        kafka_bootstrap, tmp_path):
    name = f"refs-{os.urandom(4).hex()}"
    a, b = stores(kafka_bootstrap, name, CAP, "a", "b")
    try:
        rec, rules_path = recording(tmp_path), rules(tmp_path)
        expected, _ = decide(rec, rules_path, tmp_path / "replay")
        # A owns the task, B takes it over after the references are made, then A again.
        got, sizes = decide(rec, rules_path, tmp_path / "handed-over", {1: a, 12: b, 20: a})
        assert got == expected and got.count(b'"kind":"alert"') >= len(DEPLOYMENTS)
        refs = records(kafka_bootstrap, f"{name}-state.refs")
        written = Counter(m.key() for m in refs if m.value() is not None)
        assert len(written) == len(DEPLOYMENTS), "a reference per deployment"
        assert set(written.values()) == {1}, "each written once, whoever held the task"
        assert all(hashlib.sha256(m.value()).hexdigest().encode() == m.key() for m in refs if m.value())
        assert sum(len(m.value()) for m in refs) > CAP  # inline, they would not fit one record
        # State records above the cap were written as parts; no record is above it.
        assert max(sizes) > CAP
        state = records(kafka_bootstrap, f"{name}-state")
        assert any(m.key().startswith(f"g-{name}/0/".encode()) for m in state)
        assert max(len(m.value() or b"") for m in state + refs) <= CAP
    finally:
        for s in (a, b):
            s.close()
        drop_topics(kafka_bootstrap, name)


def test_a_record_and_a_reference_above_the_cap_are_written_as_parts_and_read_back(kafka_bootstrap):
    cap = 256 * 1024
    name = f"parts-{os.urandom(4).hex()}"
    a, b = stores(kafka_bootstrap, name, cap, "a", "b")
    try:
        big = frame("blob", os.urandom(600_000))  # a reference of three parts
        small = frame("blob", b"small")
        digests = {hashlib.sha256(x).hexdigest(): x for x in (big, small)}
        pipeline = os.urandom(700_000)  # a snapshot of three parts
        state = a.task_state(0, pipeline, {"t:0": 5}, digests)
        a.commit({0: state}, {}, None, {0: digests})
        saved = load(b, 0)
        assert saved["pipeline"] == pipeline and saved["position"] == {"t:0": 5}
        assert saved["blobs"] == digests
        # B goes on with a smaller record naming only the small reference: the big one and the
        # record's parts it no longer has are deleted (tombstones), the small one not rewritten.
        digest_small = hashlib.sha256(small).hexdigest()
        b.commit({0: b.task_state(0, b"tiny", {"t:0": 9}, [digest_small])}, {}, None, {0: {}})
        saved = load(a, 0)
        assert saved["pipeline"] == b"tiny" and saved["blobs"] == {digest_small: small}
        state_records, refs = records(kafka_bootstrap, f"{name}-state"), records(kafka_bootstrap, f"{name}-state.refs")
        assert max(len(m.value() or b"") for m in state_records + refs) <= cap
        last = {m.key(): m.value() for m in refs}
        assert [k for k, v in last.items() if v is not None] == [digest_small.encode()]
        assert Counter(m.key() for m in refs if m.value() is not None)[digest_small.encode()] == 1
        live = {k for k, v in {m.key(): m.value() for m in state_records}.items() if v is not None}
        assert live == {f"g-{name}/0".encode()}, "the first record's parts are deleted"
    finally:
        for s in (a, b):
            s.close()
        drop_topics(kafka_bootstrap, name)


def test_a_record_naming_a_reference_that_is_gone_is_refused(kafka_bootstrap):
    name = f"gone-{os.urandom(4).hex()}"
    a, b = stores(kafka_bootstrap, name, CAP, "a", "b")
    try:
        ref = frame("blob", os.urandom(1000))
        digest = hashlib.sha256(ref).hexdigest()
        a.commit({0: a.task_state(0, b"snapshot", {}, [digest])}, {}, None, {0: {digest: ref}})
        # Deleted behind the group's back (a tombstone; a topic recreated is alike).
        p = Producer({"bootstrap.servers": kafka_bootstrap})
        p.produce(f"{name}-state.refs", None, key=digest.encode(), partition=0)
        assert p.flush(10) == 0
        with pytest.raises(StateError, match=f"blob {digest[:16]} named by the state record .* is missing"):
            load(b, 0)
    finally:
        for s in (a, b):
            s.close()
        drop_topics(kafka_bootstrap, name)
