"""Scale out on Kafka: task state in a compacted topic, every decision in a decisions topic.

Several ``rollbackd run`` instances in one consumer group share the input partitions; the
daemon keeps one task (pipeline) per partition number. :class:`GroupState` is what makes a
partition movable:

- **state topic** (compacted, one record per ``<group>/<partition>``): a task's snapshot with the
  input offsets it covers and the decisions-topic offset it had reached. Written at every
  checkpoint and when the partition is revoked, always *before* the offsets are committed; read
  by the next owner when the partition is assigned, which then seeks to those offsets;
- **decisions topic** (partition = task): every alert transition, incident change and action,
  as the decision log writes it, plus a deterministic ``decision_id``. It is the audit trail of
  the whole group, and the group's outbox: the next owner of a partition reads what the previous
  owner decided after the snapshot it restores, so it neither writes those decisions twice nor
  runs a finished action again. Decisions are re-derived identically (the same events through
  the same rules), so their ids match.

A crash between a backend call and the decision reaching the topic means the next owner calls
the backend again with the same idempotency key, as a restarted single instance does: the
backends are idempotent. Consumers of the decisions topic may also deduplicate by
``decision_id``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from rollbackd.daemon.decisions import encode_decision
from rollbackd.daemon.kafka import BrokerUnavailable, classify, librdkafka_log
from rollbackd.daemon.snapshot import decode_state, encode_state

__all__ = ["GroupState", "GroupDecisions", "GroupRecorder", "decision_id", "ensure_topics"]

log = structlog.get_logger("rollbackd.scaleout")

# A task snapshot holds windows and the join buffer: far above Kafka's 1 MB default.
MAX_STATE_BYTES = 64 * 1024 * 1024
_TIMEOUT = 10.0


def decision_id(rec: Mapping[str, Any]) -> str:
    """Deterministic id of a decision record: the same decision, re-made, has the same id.

    A finished action is identified by its idempotency key and outcome, not by its detail text
    (a retry count may differ between two owners)."""
    if rec.get("kind") == "action" and rec.get("idempotency_key"):
        basis = f"action|{rec['idempotency_key']}|{rec.get('status')}".encode()
    else:
        basis = encode_decision({k: v for k, v in rec.items() if k != "decision_id"})
    return hashlib.sha256(basis).hexdigest()[:24]


def ensure_topics(admin: AdminClient, state_topic: str, decisions_topic: str, partitions: int) -> None:
    """Creates the state topic (compacted) and the decisions topic when they do not exist."""
    existing = admin.list_topics(timeout=_TIMEOUT).topics
    new = []
    if state_topic not in existing:
        new.append(NewTopic(state_topic, num_partitions=max(1, partitions), replication_factor=-1, config={
            "cleanup.policy": "compact", "max.message.bytes": str(MAX_STATE_BYTES),
            "segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1",
        }))
    if decisions_topic not in existing:
        new.append(NewTopic(decisions_topic, num_partitions=max(1, partitions), replication_factor=-1))
    for topic, future in admin.create_topics(new).items() if new else ():
        try:
            future.result(timeout=_TIMEOUT)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise classify(exc, f"creating {topic}") from exc


class GroupState:
    """Task state in ``state_topic``; decisions (and what other owners decided) in ``decisions_topic``."""

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        state_topic: str,
        decisions_topic: str,
        config: Mapping[str, str] = {},
    ) -> None:
        self.servers = bootstrap_servers
        self.group_id = group_id
        self.state_topic = state_topic
        self.decisions_topic = decisions_topic
        self.config = {k: v for k, v in config.items() if not k.startswith(("group.", "partition.assignment"))}
        self._producer = Producer({
            **self.config,
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "compression.type": "lz4",
            "message.max.bytes": MAX_STATE_BYTES,
            "linger.ms": 5,
            "logger": librdkafka_log,
        })
        self._failure: str | None = None
        self._next: dict[int, int] = {}  # decisions partition -> next offset (ours, delivered)
        self.task = 0  # the task whose decisions are being made now
        self.seen: set[str] = set()  # decision ids already in the decisions topic (adopted)
        self.done: dict[str, dict[str, Any]] = {}  # finished actions there, by idempotency key

    # -- the daemon's hooks

    def select(self, key: int) -> None:
        self.task = key

    def release(self, key: int) -> None:
        """Task ``key`` moved away: what we knew of its decisions partition is stale now."""
        self._next.pop(key, None)

    def task_state(self, key: int, snapshot: bytes, position: dict[str, int]) -> dict[str, Any]:
        return {"pipeline": snapshot, "position": position, "decisions_offset": self._decisions_end(key)}

    def save(self, states: Mapping[int, dict[str, Any]]) -> None:
        """Writes the task states and waits until the brokers have them (or raises)."""
        for key, state in states.items():
            self._produce(self.state_topic, encode_state(state), key=self._key(key), partition=key)
        self._flush("saving task state")

    def load(self, key: int) -> dict[str, Any] | None:
        """The latest saved state of task ``key``, or None.

        Task ``key`` writes to partition ``key`` of the state topic and nothing else does, so its
        latest state is the partition's last message (compaction never removes that one): one
        read, however much history compaction has not cleaned yet."""
        msgs = self._read_partition(self.state_topic, key, -1)
        last = msgs[-1] if msgs else None
        if last is None or last.value() is None:
            return None
        if last.key() != self._key(key):
            raise ValueError(f"{self.state_topic}/{key} holds {last.key()!r}, not {self._key(key)!r}: "
                             "one state topic per consumer group")
        # A record this rollbackd cannot read stops the daemon (StateError is Fatal): the
        # partition is never started without its state, and nothing in the record runs.
        return decode_state(last.value(), f"{self.state_topic}/{key}")

    def adopt(self, key: int, saved: Mapping[str, Any]) -> None:
        """Reads what was decided for task ``key`` after its snapshot: those decisions are not
        written again and those actions not run again."""
        start = saved.get("decisions_offset") or 0
        n = 0
        for msg in self._read_partition(self.decisions_topic, key, start):
            try:
                rec = json.loads(msg.value())
            except (TypeError, ValueError):
                continue
            did = rec.get("decision_id")
            if did:
                self.seen.add(did)
            if rec.get("kind") == "action" and rec.get("idempotency_key") and rec.get("status") not in (
                None, "started", "pending_approval"
            ):
                self.done[rec["idempotency_key"]] = {
                    "status": rec["status"], "detail": rec.get("detail"), "attempts": rec.get("attempts"),
                    # the verification too: an owner that takes over decides its escalation alike
                    "data": json.dumps({"thread": rec.get("thread"), "verification": rec.get("verification")}),
                }
            n += 1
            self._next[key] = max(self._next.get(key, 0), msg.offset() + 1)
        log.info("task.adopted_decisions", task=key, decisions=n, from_offset=start)

    # -- the decisions topic

    def publish(self, rec: Mapping[str, Any], did: str, durable: bool = False) -> None:
        value = encode_decision({**rec, "decision_id": did})
        self._produce(self.decisions_topic, value, key=str(rec.get("deployment", "")).encode(),
                      partition=self.task)
        if durable:
            self._flush("publishing an action")

    def flush(self) -> None:
        self._flush("publishing decisions")

    def close(self) -> None:
        try:
            self._producer.flush(_TIMEOUT)
        except KafkaException:
            pass

    # -- internals

    def _key(self, key: int) -> bytes:
        return f"{self.group_id}/{key}".encode()

    def _produce(self, topic: str, value: bytes, key: bytes, partition: int | None = None) -> None:
        kwargs: dict[str, Any] = {"key": key, "on_delivery": self._delivered}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as exc:
                raise classify(exc, f"produce to {topic}") from exc

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._failure = f"{msg.topic()}: {err.name()}: {err.str()}"
        elif msg.topic() == self.decisions_topic:
            self._next[msg.partition()] = max(self._next.get(msg.partition(), 0), msg.offset() + 1)

    def _flush(self, what: str) -> None:
        left = self._producer.flush(_TIMEOUT)
        failure, self._failure = self._failure, None
        if left or failure:
            raise BrokerUnavailable(f"{what}: {failure or f'{left} message(s) not delivered in {_TIMEOUT} s'}")

    def _consumer(self) -> Consumer:
        return Consumer({
            **self.config,
            "bootstrap.servers": self.servers,
            "group.id": f"{self.group_id}-restore",  # never subscribes nor commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.message.max.bytes": MAX_STATE_BYTES,
            "logger": librdkafka_log,
        })

    def _decisions_end(self, key: int) -> int:
        self.flush()
        if key in self._next:
            return self._next[key]
        c = self._consumer()
        try:
            _, high = c.get_watermark_offsets(TopicPartition(self.decisions_topic, key), timeout=_TIMEOUT)
        except KafkaException as exc:
            raise classify(exc, "decisions topic end") from exc
        finally:
            c.close()
        self._next[key] = high  # from now on we are its only writer
        return high

    def _read_partition(self, topic: str, partition: int, start: int) -> list[Any]:
        """Every message of ``topic``/``partition`` from offset ``start`` to its end now; a
        negative ``start`` counts back from the end (-1: the last message only)."""
        c = self._consumer()
        try:
            low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=_TIMEOUT)
            begin = max(high + start if start < 0 else start, low)
            if high <= begin:
                return []
            c.assign([TopicPartition(topic, partition, begin)])
            out: list[Any] = []
            while True:
                msgs = c.consume(1000, _TIMEOUT)
                if not msgs:
                    raise BrokerUnavailable(f"reading {topic}/{partition}: nothing in {_TIMEOUT} s")
                for m in msgs:
                    err = m.error()
                    if err is None:
                        out.append(m)
                        if m.offset() >= high - 1:
                            return out
                    elif err.code() == KafkaError._PARTITION_EOF:
                        return out
                    else:
                        raise classify(err, f"reading {topic}/{partition}")
        except KafkaException as exc:
            raise classify(exc, f"reading {topic}/{partition}") from exc
        finally:
            c.close()


class GroupDecisions:
    """The decision sink in a group: the local decision log plus the decisions topic, skipping
    decisions another owner (or this instance before a crash) already published."""

    def __init__(self, local: Any, group: GroupState) -> None:
        self.local = local
        self.group = group

    def write(self, rec: dict[str, Any]) -> None:
        did = decision_id(rec)
        if did in self.group.seen:
            return
        if self.local is not None:
            self.local.write(rec)
        self.group.publish(rec, did, durable=rec.get("kind") == "action")

    def close(self) -> None:
        self.group.close()
        if self.local is not None:
            self.local.close()


class GroupRecorder:
    """The ledger in a group: skips re-derived decisions already in the decisions topic and
    finds finished actions there too (the group's outbox)."""

    def __init__(self, ledger: Any, group: GroupState) -> None:
        self.ledger = ledger
        self.group = group

    def __getattr__(self, name: str) -> Any:  # silences, approvals, rows, ...
        return getattr(self.ledger, name)

    def alert(self, rec: dict[str, Any]) -> None:
        if decision_id(rec) not in self.group.seen:
            self.ledger.alert(rec)

    def incident(self, rec: dict[str, Any]) -> None:
        if decision_id(rec) not in self.group.seen:
            self.ledger.incident(rec)

    def action(self, rec: dict[str, Any], phase: str) -> None:
        if phase == "finished" and decision_id(rec) in self.group.seen:
            return
        self.ledger.action(rec, phase)

    def finished_action(self, key: str) -> dict[str, Any] | None:
        return self.ledger.finished_action(key) or self.group.done.get(key)
