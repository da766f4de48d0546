"""The EventSource contract, run against every transport: a recording file and a real Kafka broker.

A transport writes streams (one per partition; a recording is a single one), opens sources on them
and resumes one from a committed position. The tests only speak the EventSource protocol, so what
passes here holds for whichever source the daemon is given.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

import pytest

from rollbackd.daemon.sources import Batch, EventSource, RecordingSource
from rollbackd.events import EventDecoder, Rejected

LIMIT = 300  # max_event_bytes in these tests, so an oversize input is small


def event(i: int, dep: str) -> bytes:
    if i % 3 == 2:
        return b'{"type":"outcome","id":"%s-%d","ts":%d,"deployment":"%s","label":%d}' % (
            dep.encode(), i - 1, 1795169702 + i, dep.encode(), i % 2)
    return (
        b'{"type":"prediction","id":"%s-%d","ts":%d.25,"deployment":"%s","model_version":"3",'
        b'"features":{"amount":%d.5,"country":"DE"},"score":0.25,"latency_ms":12}'
        % (dep.encode(), i, 1795169702 + i, dep.encode(), i)
    )


MALFORMED = [
    (b"{bad", "invalid_json"),
    (b'{"type":"rollout","ts":1,"deployment":"d"}', "unknown_type"),
    (b'{"type":"outcome","id":"a","ts":1,"deployment":"d"}', "missing_field"),
    (b'{"type":"prediction","id":"a","ts":1,"deployment":"d","model_version":"1","score":1.5}', "out_of_range"),
    (b'{"type":"outcome","id":"%s","ts":1,"deployment":"d","label":1}' % (b"x" * LIMIT), "oversize"),
]


class Transport(Protocol):
    partitions: int

    def write(self, streams: list[list[bytes]]) -> None: ...

    def open(self) -> EventSource: ...

    def resume(self, source: EventSource, position: Any) -> EventSource:
        """Commits ``position`` on ``source``, closes it, and opens the source a restart would."""
        ...

    def locate(self, rejected: Rejected) -> tuple[int, int]:
        """(stream, index in the stream) of a reject's input, from its position."""
        ...


class RecordingTransport:
    partitions = 1

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "recording.jsonl"

    def write(self, streams: list[list[bytes]]) -> None:
        [stream] = streams
        self.path.write_bytes(b"".join(v + b"\n" for v in stream))

    def open(self, start: Any = None) -> EventSource:
        return RecordingSource(self.path, EventDecoder(LIMIT), start)

    def resume(self, source: EventSource, position: Any) -> EventSource:
        source.commit(position)
        source.close()
        return self.open(position)

    def locate(self, rejected: Rejected) -> tuple[int, int]:
        return 0, rejected.position["line"] - 1


class KafkaTransport:
    partitions = 3

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = f"contract-{uuid.uuid4().hex[:8]}"

    def write(self, streams: list[list[bytes]]) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for partition, stream in enumerate(streams):
            for value in stream:
                producer.produce(self.topic, value, partition=partition)
        assert producer.flush(30) == 0

    def open(self) -> EventSource:
        from rollbackd.daemon.kafka import KafkaSource

        return KafkaSource(
            self.bootstrap, self.group, [self.topic], EventDecoder(LIMIT), poll_timeout=0.1, stop_at_end=True
        )

    def resume(self, source: EventSource, position: Any) -> EventSource:
        source.commit(position)
        source.close()
        return self.open()

    def locate(self, rejected: Rejected) -> tuple[int, int]:
        assert rejected.position["topic"] == self.topic
        return rejected.position["partition"], rejected.position["offset"]


@pytest.fixture(params=["recording", "kafka"])
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Transport:
    if request.param == "recording":
        return RecordingTransport(tmp_path)
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    make_topic: Callable[..., str] = request.getfixturevalue("topic")
    return KafkaTransport(bootstrap, make_topic(KafkaTransport.partitions))


def read_until_end(src: EventSource, max_events: int, stop: Callable[[list[Batch]], bool] = lambda b: False,
                   timeout: float = 30.0) -> list[Batch]:
    """Batches until the source is exhausted (or ``stop`` says so); checks the batch size."""
    batches: list[Batch] = []
    deadline = time.monotonic() + timeout
    while not stop(batches):
        batch = src.read(max_events)
        if batch is None:
            assert src.read(max_events) is None  # stays exhausted
            break
        assert len(batch.events) + len(batch.rejects) <= max_events
        if batch.events or batch.rejects:
            batches.append(batch)
        assert time.monotonic() < deadline, "the source neither delivered nor ended"
    return batches


def streams_of(transport: Transport, n: int, malformed_every: int = 0) -> list[list[bytes]]:
    """One stream per partition, each of its own deployment, with malformed inputs mixed in."""
    out: list[list[bytes]] = []
    for p in range(transport.partitions):
        stream = []
        for i in range(n):
            if malformed_every and i % malformed_every == malformed_every - 1:
                stream.append(MALFORMED[(i // malformed_every + p) % len(MALFORMED)][0])
            else:
                stream.append(event(i, f"dep-{p}"))
        out.append(stream)
    return out


def by_partition(transport: Transport, batches: list[Batch]) -> list[list[Any]]:
    """Decoded events per stream, in the order read (deployment ``dep-P`` lives on partition P)."""
    out: list[list[Any]] = [[] for _ in range(transport.partitions)]
    for b in batches:
        for ev in b.events:
            out[int(ev.deployment.rsplit("-", 1)[1])].append(ev)
    return out


def expected_events(streams: list[list[bytes]]) -> list[list[Any]]:
    decoder = EventDecoder(LIMIT)
    return [[e for e in map(decoder.decode, s) if not isinstance(e, Rejected)] for s in streams]


def test_every_event_once_in_order(transport: Transport) -> None:
    streams = streams_of(transport, 400)
    transport.write(streams)
    src = transport.open()
    try:
        batches = read_until_end(src, 64)
    finally:
        src.close()
    assert by_partition(transport, batches) == expected_events(streams)
    assert not any(b.rejects for b in batches)


def test_malformed_inputs_are_rejects_with_reason_and_position(transport: Transport) -> None:
    streams = streams_of(transport, 60, malformed_every=4)
    transport.write(streams)
    src = transport.open()
    try:
        batches = read_until_end(src, 7)
    finally:
        src.close()
    rejects = [r for b in batches for r in b.rejects]
    assert len(rejects) == 15 * transport.partitions
    reasons = dict(MALFORMED)
    for rej in rejects:
        stream, index = transport.locate(rej)
        raw = streams[stream][index]
        assert rej.reason == reasons[raw]
        assert raw.startswith(rej.raw) and rej.detail
    located = sorted(transport.locate(r) for r in rejects)
    assert located == sorted(
        (p, i) for p, s in enumerate(streams) for i, v in enumerate(s) if v in reasons
    )
    assert by_partition(transport, batches) == expected_events(streams)


def test_resume_from_a_committed_position_yields_exactly_the_rest(transport: Transport) -> None:
    streams = streams_of(transport, 300, malformed_every=10)
    transport.write(streams)
    total = sum(map(len, streams))
    src = transport.open()
    first = read_until_end(src, 50, stop=lambda b: sum(len(x.events) + len(x.rejects) for x in b) >= total // 3)
    assert first, "nothing read before the commit"
    rest_src = transport.resume(src, first[-1].position)
    try:
        rest = read_until_end(rest_src, 50)
    finally:
        rest_src.close()
    got = by_partition(transport, first + rest)
    assert got == expected_events(streams)  # nothing lost, nothing twice, order kept
    inputs = sum(len(b.events) + len(b.rejects) for b in first + rest)
    assert inputs == total


def test_batch_size_is_respected(transport: Transport) -> None:
    streams = streams_of(transport, 100, malformed_every=9)
    transport.write(streams)
    src = transport.open()
    try:
        batches = read_until_end(src, 13)  # read_until_end asserts <= 13 per batch
    finally:
        src.close()
    assert max(len(b.events) + len(b.rejects) for b in batches) == 13
    assert sum(len(b.events) + len(b.rejects) for b in batches) == 100 * transport.partitions


def test_bad_max_events(transport: Transport) -> None:
    transport.write(streams_of(transport, 1))
    src = transport.open()
    try:
        with pytest.raises(ValueError, match="max_events"):
            src.read(0)
    finally:
        src.close()
