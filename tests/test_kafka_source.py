"""KafkaSource, the dead-letter topic, record and publish, against a real broker (tests/conftest.py).

What every source must do is in test_source_contract.py; here is what only Kafka has: keys and
partitions, consumer groups and rebalances, commits and seeks, headers, watermarks, outages.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from confluent_kafka import Consumer, Producer

from rollbackd.daemon.kafka import (
    BrokerUnavailable,
    KafkaDeadLetter,
    KafkaFatal,
    KafkaSource,
    parse_position,
    publish,
    record,
)
from rollbackd.daemon.sources import Batch, EventSource, RecordingSource
from rollbackd.events import Deploy, Outcome, Prediction, Rejected
from rollbackd.scenarios import Scenario, write_recording

pytestmark = pytest.mark.kafka

TopicFactory = Callable[..., str]


def prediction(i: int, dep: str = "d") -> bytes:
    return (
        b'{"type":"prediction","id":"%s-%d","ts":%d,"deployment":"%s","model_version":"7",'
        b'"features":{"x":%d},"score":0.5}' % (dep.encode(), i, 1795169702 + i, dep.encode(), i)
    )


def outcome(i: int, dep: str = "d") -> bytes:
    return b'{"type":"outcome","id":"%s-%d","ts":%d,"deployment":"%s","label":1}' % (
        dep.encode(), i, 1795169703 + i, dep.encode())


def deploy(dep: str = "d") -> bytes:
    return b'{"type":"deploy","ts":1795169700,"deployment":"%s","model_version":"7"}' % dep.encode()


def produce(bootstrap: str, topic: str, values: list[bytes], key: Callable[[bytes], bytes | None] = lambda v: None,
            partition: int | None = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "partitioner": "murmur2_random"})
    for v in values:
        if partition is None:
            producer.produce(topic, v, key(v))
        else:
            producer.produce(topic, v, key(v), partition=partition)
    assert producer.flush(30) == 0


def group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


def read_n(sources: list[KafkaSource], n: int, max_events: int = 500, timeout: float = 30.0) -> list[list[Batch]]:
    """Reads round-robin from ``sources`` until together they returned ``n`` inputs."""
    got: list[list[Batch]] = [[] for _ in sources]
    count = 0
    deadline = time.monotonic() + timeout
    while count < n:
        for i, src in enumerate(sources):
            batch = src.read(max_events)
            assert batch is not None
            if batch.events or batch.rejects:
                got[i].append(batch)
                count += len(batch.events) + len(batch.rejects)
        assert time.monotonic() < deadline, f"read {count} of {n} inputs"
    return got


def ids(batches: list[Batch]) -> list[str]:
    return [e.id for b in batches for e in b.events if not isinstance(e, Deploy)]


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Java's DefaultPartitioner for a keyed record: murmur2(key) & 0x7fffffff % partitions."""
    m, length = 0x5BD1E995, len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = key[length - length % 4 :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


# ---------------------------------------------------------------------------------------------


def test_one_topic_carries_every_event_type(kafka_bootstrap: str, topic: TopicFactory) -> None:
    t = topic(1)
    produce(kafka_bootstrap, t, [deploy(), prediction(0), outcome(0), prediction(1), b"{oops"])
    with KafkaSource(kafka_bootstrap, group(), t, stop_at_end=True, poll_timeout=0.1) as src:
        assert isinstance(src, EventSource)
        batches = []
        while (batch := src.read(100)) is not None:
            batches.append(batch)
        assert src.read(100) is None
    events = [e for b in batches for e in b.events]
    assert [type(e) for e in events] == [Deploy, Prediction, Outcome, Prediction]
    [rej] = [r for b in batches for r in b.rejects]
    assert rej.reason == "invalid_json" and rej.raw == b"{oops"
    assert rej.position == {"topic": t, "partition": 0, "offset": 4}
    assert batches[-1].position == {f"{t}:0": 5}


def test_empty_value_is_a_reject(kafka_bootstrap: str, topic: TopicFactory) -> None:
    t = topic(1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(t, None, b"tombstone")
    producer.produce(t, prediction(1))
    producer.flush(10)
    with KafkaSource(kafka_bootstrap, group(), t, stop_at_end=True, poll_timeout=0.1) as src:
        batches = read_n([src], 2)[0]
    assert ids(batches) == ["d-1"]
    [rej] = [r for b in batches for r in b.rejects]
    assert rej.reason == "invalid_json" and rej.raw == b""


def test_published_events_are_keyed_by_deployment(kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path) -> None:
    t = topic(4)
    deployments = tuple(f"scorer-{i}" for i in range(6))
    rec = tmp_path / "rec.jsonl"
    write_recording(Scenario(name="keys", duration=60.0, rate=10.0, deployments=deployments, seed=3), rec)
    lines = rec.read_bytes().splitlines()
    assert publish(kafka_bootstrap, t, str(rec)) == len(lines)
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group(), "auto.offset.reset": "earliest"})
    consumer.subscribe([t])
    seen: dict[str, list[tuple[int, bytes]]] = {}
    deadline = time.monotonic() + 30
    n = 0
    while n < len(lines):
        for msg in consumer.consume(1000, 0.5):
            assert msg.error() is None
            seen.setdefault(msg.key().decode(), []).append((msg.partition(), msg.value()))
            n += 1
        assert time.monotonic() < deadline
    consumer.close()
    assert sorted(seen) == sorted(deployments)
    for dep, msgs in seen.items():
        assert {p for p, _ in msgs} == {murmur2_partition(dep.encode(), 4)}  # where Java would put it
        # Per deployment, the recording's order is kept.
        assert [v for _, v in msgs] == [line for line in lines if b'"deployment":"%s"' % dep.encode() in line]
    assert len({murmur2_partition(d.encode(), 4) for d in deployments}) > 1


def test_commit_then_a_new_member_resumes(kafka_bootstrap: str, topic: TopicFactory) -> None:
    t = topic(2)
    produce(kafka_bootstrap, t, [prediction(i, f"d{i % 2}") for i in range(100)], key=lambda v: None)
    g = group()
    with KafkaSource(kafka_bootstrap, g, t, poll_timeout=0.1) as src:
        first = read_n([src], 30, max_events=10)[0]
        got = sum(len(b.events) for b in first)
        src.commit(first[-1].position)
        assert parse_position(first[-1].position)
    with KafkaSource(kafka_bootstrap, g, t, poll_timeout=0.1, stop_at_end=True) as again:
        rest = []
        while (b := again.read(1000)) is not None:
            rest.append(b)
    assert sorted(ids(first) + ids(rest)) == sorted(f"d{i % 2}-{i}" for i in range(100))
    assert sum(len(b.events) for b in rest) == 100 - got


def test_a_consumer_that_knows_no_broker_is_replaced(kafka_bootstrap: str, topic: TopicFactory) -> None:
    """librdkafka drops a broker missing from a metadata answer (one fenced for a moment after a
    long pause is) and, when it was the last one it knew, never finds a group coordinator again
    (confluentinc/librdkafka#5511). The statistics report of such a consumer (no broker but the
    logical coordinator, the group looking for its coordinator) is injected: after
    ``stranded_after``, as a new client reaches the cluster, a new consumer in the same group
    takes over. What the old one held is
    lost (``on_lost``, as after an expired session); the new one is assigned the partitions
    again and ``on_assign`` sets where they start: every event is read once."""
    t = topic(2)
    produce(kafka_bootstrap, t, [prediction(i, f"d{i % 2}") for i in range(200)])
    lost: list[list[tuple[str, int]]] = []
    read_to: dict[str, int] = {}  # where the reader was (the daemon: where its state is)

    def on_lost(parts: list[tuple[str, int]]) -> None:
        lost.append(parts)
        read_to.update(src.position)

    src = KafkaSource(kafka_bootstrap, group(), t, poll_timeout=0.1, on_lost=on_lost)
    src.on_assign = lambda parts: src.seek(read_to) if read_to else None
    with src:
        first = read_n([src], 50, max_events=10)[0]
        held = sorted(src.assignment())
        assert held == [(t, 0), (t, 1)]
        stranded = {"brokers": {"GroupCoordinator": {"name": "GroupCoordinator", "nodeid": -1, "source": "logical",
                                                     "state": "INIT", "rxidle": -1}},
                    "cgrp": {"state": "query-coord", "stateage": 12_000, "join_state": "wait-metadata"}}
        src._on_stats(json.dumps(stranded))
        src.health()  # reads the report (the daemon asks after every read)
        assert "no group coordinator (query-coord for 12 s)" in src._health.problem
        old = src._consumer
        src.stranded_after = 0.0
        rest = []
        deadline = time.monotonic() + 30
        while sum(len(b.events) for b in first + rest) < 200:
            assert time.monotonic() < deadline, "the new consumer read the rest"
            batch = src.read(100)
            assert batch is not None
            rest.append(batch)
        assert src._consumer is not old
        assert lost == [held]
        assert sorted(src.assignment()) == held
    assert sorted(ids(first) + ids(rest)) == sorted(f"d{i % 2}-{i}" for i in range(200))


def test_seek_rewinds_and_positions_a_new_group(kafka_bootstrap: str, topic: TopicFactory) -> None:
    t = topic(1)
    produce(kafka_bootstrap, t, [prediction(i) for i in range(50)])
    with KafkaSource(kafka_bootstrap, group(), t, poll_timeout=0.1) as src:
        batches = read_n([src], 50, max_events=20)[0]
        assert src.position == {f"{t}:0": 50}
        src.seek({f"{t}:0": 40})
        assert src.position == {f"{t}:0": 40}
        again = read_n([src], 10)[0]
        assert ids(again) == [f"d-{i}" for i in range(40, 50)]
    assert ids(batches) == [f"d-{i}" for i in range(50)]
    # Before its first assignment: applied when the partition arrives (a checkpoint restore).
    with KafkaSource(kafka_bootstrap, group(), t, poll_timeout=0.1, stop_at_end=True) as fresh:
        fresh.seek({f"{t}:0": 45})
        rest = []
        while (b := fresh.read(100)) is not None:
            rest.append(b)
    assert ids(rest) == [f"d-{i}" for i in range(45, 50)]
    # From the assignment hook, where a daemon restores a partition's checkpoint.
    hooked: list[KafkaSource] = []
    with KafkaSource(kafka_bootstrap, group(), t, poll_timeout=0.1, stop_at_end=True,
                     on_assign=lambda parts: hooked[0].seek({f"{t}:0": 47})) as fresh:
        hooked.append(fresh)
        rest = []
        while (b := fresh.read(100)) is not None:
            rest.append(b)
    assert ids(rest) == [f"d-{i}" for i in range(47, 50)]
    with pytest.raises(ValueError, match="position"):
        parse_position({"no-partition": 3})


def test_lag_from_watermarks(kafka_bootstrap: str, topic: TopicFactory) -> None:
    t = topic(2)
    produce(kafka_bootstrap, t, [prediction(i) for i in range(60)], partition=0)
    produce(kafka_bootstrap, t, [prediction(i) for i in range(40)], partition=1)
    with KafkaSource(kafka_bootstrap, group(), t, poll_timeout=0.1) as src:
        assert src.lag() == 0  # nothing assigned yet
        deadline = time.monotonic() + 20
        while len(src.assignment()) < 2:
            batch = src.read(1)  # assignment happens inside a read
            assert batch is not None and time.monotonic() < deadline
        read = sum(len(b.events) for b in read_n([src], 30, max_events=10)[0]) + len(batch.events)
        assert src.lag() == 100 - read
        read_n([src], 100 - read)
        assert src.lag() == 0


def test_dead_letter_topic(kafka_bootstrap: str, topic: TopicFactory) -> None:
    source_topic, dead_topic = topic(1), topic(1)
    bad = [b"{bad", b'{"type":"nope","ts":1,"deployment":"d"}', b"\xff\xfe"]
    produce(kafka_bootstrap, source_topic, [prediction(0), bad[0], prediction(1), bad[1], bad[2]])
    sink = KafkaDeadLetter(kafka_bootstrap, dead_topic)
    with KafkaSource(kafka_bootstrap, group(), source_topic, stop_at_end=True, poll_timeout=0.1) as src:
        while (batch := src.read(2)) is not None:
            for rej in batch.rejects:
                sink.put(rej)
    sink.put(Rejected("oversize", "9 bytes > limit 1", b"123456789", {"offset": 7, "line": 2}))
    sink.flush()
    assert sink.count == 4
    sink.close()
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group(), "auto.offset.reset": "earliest"})
    consumer.subscribe([dead_topic])
    msgs: list[Any] = []
    deadline = time.monotonic() + 20
    while len(msgs) < 4:
        msgs += [m for m in consumer.consume(10, 0.5) if m.error() is None]
        assert time.monotonic() < deadline
    consumer.close()
    assert [m.value() for m in msgs] == [*bad, b"123456789"]
    headers = [dict(m.headers()) for m in msgs]
    assert [h["rollbackd-reason"] for h in headers] == [b"invalid_json", b"unknown_type", b"invalid_json", b"oversize"]
    assert [h["rollbackd-source"] for h in headers] == [
        f"{source_topic}/0/1".encode(), f"{source_topic}/0/3".encode(), f"{source_topic}/0/4".encode(),
        b'{"offset":7,"line":2}',
    ]
    assert all(h["rollbackd-detail"] for h in headers)


def test_two_members_share_the_partitions(kafka_bootstrap: str, topic: TopicFactory) -> None:
    t = topic(4)
    g = group()
    calls: list[tuple[str, str, list[tuple[str, int]]]] = []
    members: dict[str, KafkaSource] = {}

    def member(name: str) -> KafkaSource:
        def revoked(parts: list[tuple[str, int]]) -> None:
            calls.append((name, "revoke", parts))
            src = members[name]
            src.commit({k: v for k, v in src.position.items() if tuple(k.rsplit(":", 1)) in {(a, str(b)) for a, b in parts}})

        src = KafkaSource(
            kafka_bootstrap, g, t, poll_timeout=0.1, config={"heartbeat.interval.ms": "300"},
            on_assign=lambda parts: calls.append((name, "assign", parts)), on_revoke=revoked,
        )
        members[name] = src
        return src

    first = [prediction(i, f"dep{i % 8}") for i in range(200)]
    produce(kafka_bootstrap, t, first, key=lambda v: v.split(b'"deployment":"')[1].split(b'"')[0])
    a = member("a")
    b = None
    try:
        got_a = read_n([a], 200)[0]
        assert a.assignment() == [(t, p) for p in range(4)]
        b = member("b")
        deadline = time.monotonic() + 30
        while not (len(a.assignment()) == 2 and len(b.assignment()) == 2):
            for src in (a, b):
                extra = src.read(100)
                assert extra is not None and not extra.events  # nothing is read twice
            assert time.monotonic() < deadline, f"no rebalance: {calls}"
        assert set(a.assignment()) | set(b.assignment()) == {(t, p) for p in range(4)}
        second = [prediction(i, f"dep{i % 8}") for i in range(200, 400)]
        produce(kafka_bootstrap, t, second, key=lambda v: v.split(b'"deployment":"')[1].split(b'"')[0])
        more_a, more_b = read_n([a, b], 200)
        everything = ids(got_a + more_a + more_b)
        assert sorted(everything) == sorted(f"dep{i % 8}-{i}" for i in range(400))  # each once
        assert ids(more_b)  # b got partitions with new data
    finally:
        a.close()
        if b is not None:
            b.close()
    kinds = [(n, k) for n, k, _ in calls]
    assert ("a", "assign") in kinds and ("a", "revoke") in kinds and ("b", "assign") in kinds
    revoked_from_a = {p for n, k, parts in calls[: kinds.index(("b", "assign")) + 1] if (n, k) == ("a", "revoke") for p in parts}
    assert revoked_from_a == {p for n, k, parts in calls if (n, k) == ("b", "assign") for p in parts}


def test_publish_then_record_keeps_the_bytes(kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path) -> None:
    t = topic(1)
    rec = tmp_path / "in.jsonl.gz"
    write_recording(Scenario(name="round", duration=120.0, rate=5.0, malformed_fraction=0.05, seed=9), rec)
    original = gzip.decompress(rec.read_bytes())
    assert publish(kafka_bootstrap, t, str(rec)) == original.count(b"\n")
    out = tmp_path / "out.jsonl.gz"
    assert record(kafka_bootstrap, [t], str(out)) == original.count(b"\n")
    assert gzip.decompress(out.read_bytes()) == original
    assert out.read_bytes()[4:8] == b"\0\0\0\0"  # no time in the gzip header
    # And the recording reads back as the same events and rejects.
    with RecordingSource(out) as a, RecordingSource(rec) as b:
        assert a.read(10**6) == b.read(10**6)
    partial = tmp_path / "part.jsonl"
    assert record(kafka_bootstrap, t, str(partial), max_events=7) == 7
    assert partial.read_bytes() == b"".join(original.splitlines(keepends=True)[:7])


def test_record_a_live_topic_for_a_duration(kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path) -> None:
    t = topic(2)
    produce(kafka_bootstrap, t, [prediction(i) for i in range(5)])
    out = tmp_path / "live.jsonl"
    t0 = time.monotonic()
    assert record(kafka_bootstrap, t, str(out), duration=1.5) == 5
    assert 1.5 <= time.monotonic() - t0 < 10
    assert sorted(out.read_bytes().splitlines()) == sorted(prediction(i) for i in range(5))


def test_record_writes_one_line_per_value(kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path) -> None:
    t = topic(1)
    produce(kafka_bootstrap, t, [b'{\n  "type": "outcome", "id": "a",\n "ts": 1, "deployment": "d", "label": 1}', b"{bad\nline"])
    out = tmp_path / "o.jsonl"
    assert record(kafka_bootstrap, t, str(out)) == 2
    assert out.read_bytes() == b'{"type":"outcome","id":"a","ts":1,"deployment":"d","label":1}\n{bad line\n'


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def test_publish_keeps_relative_timing(kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path) -> None:
    t = topic(1)
    rec = tmp_path / "timed.jsonl"
    rec.write_bytes(b"\n".join([prediction(0), prediction(10), b"{bad", outcome(10), prediction(30)]) + b"\n")
    for speed, total in ((1.0, 30.0), (10.0, 3.0)):
        clock = FakeTime()
        assert publish(kafka_bootstrap, t, str(rec), speed=speed, clock=clock, sleep=clock.sleep) == 5
        assert sum(clock.sleeps) == pytest.approx(total)
        assert clock.sleeps == pytest.approx([10 / speed, 1 / speed, 19 / speed])
    clock = FakeTime()
    publish(kafka_bootstrap, t, str(rec), speed=None, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []
    with pytest.raises(ValueError, match="speed"):
        publish(kafka_bootstrap, t, str(rec), speed=0)


def test_errors_are_classified(kafka_bootstrap: str) -> None:
    with pytest.raises(KafkaFatal):
        KafkaSource(kafka_bootstrap, group(), "x", config={"no.such.setting": "1"})
    with pytest.raises(ValueError, match="enable.auto.commit"):
        KafkaSource(kafka_bootstrap, group(), "x", config={"enable.auto.commit": "true"})
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with KafkaSource(kafka_bootstrap, group(), missing, poll_timeout=0.1) as src:
        deadline = time.monotonic() + 20
        with pytest.raises(BrokerUnavailable) as info:
            while time.monotonic() < deadline:
                assert src.read(10) is not None
        assert "UNKNOWN_TOPIC" in info.value.name
        assert src.errors[info.value.name] >= 1


def test_broker_restart(kafka_broker: Any, kafka_bootstrap: str, topic: TopicFactory) -> None:
    """The broker goes away for 5 s mid-stream: the source says so, then reads everything."""
    t = topic(2)
    produce(kafka_bootstrap, t, [prediction(i) for i in range(100)])
    fast = {"reconnect.backoff.ms": "100", "reconnect.backoff.max.ms": "500"}
    with KafkaSource(kafka_bootstrap, group(), t, poll_timeout=0.1, config=fast, commit_timeout=1.0) as src:
        batches = read_n([src], 100)[0]
        src.commit(batches[-1].position)
        kafka_broker.stop()
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="not acknowledged"):
            src.commit(batches[-1].position)  # bounded: the loop must go on to say it is blind
        assert time.monotonic() - t0 < 3
        reads = ""  # "o" a read that returned, "B" one that said the brokers are unreachable
        down_until = time.monotonic() + 5.0
        while time.monotonic() < down_until:
            t1 = time.monotonic()
            try:
                batch = src.read(100)
                assert batch is not None and not batch.events
                reads += "o"
            except BrokerUnavailable:
                reads += "B"
            assert time.monotonic() - t1 < 1.0  # a read never hangs on the outage
        # Once noticed, the outage is reported by every read until it ends, not just once.
        assert "B" in reads and "o" not in reads[reads.index("B") :], reads
        blind = reads.count("B")
        with pytest.raises(BrokerUnavailable):
            src.lag(timeout=0.5)
        kafka_broker.start()
        produce(kafka_bootstrap, t, [prediction(i) for i in range(100, 200)])
        deadline = time.monotonic() + 30
        while sum(len(b.events) for b in batches) < 200:
            try:
                batch = src.read(100)
            except BrokerUnavailable:
                blind += 1
                continue
            assert batch is not None
            if batch.events:
                batches.append(batch)
            assert time.monotonic() < deadline, "no recovery"
        deadline = time.monotonic() + 10
        while True:  # the commit sent during the outage may still be on its way
            try:
                src.commit(batches[-1].position)
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline
                with contextlib.suppress(BrokerUnavailable):  # an outage report, late
                    assert not src.read(1).events  # type: ignore[union-attr]
        assert blind >= 1, "the outage was never reported"
        assert src.lag() == 0
    assert sorted(ids(batches)) == sorted(f"d-{i}" for i in range(200))
