"""Scale out on Kafka: task state in a compacted topic, every decision in a decisions topic,
both written in Kafka transactions with the input offsets (exactly-once, as Kafka Streams'
``exactly_once_v2``, KIP-447).

Several ``rollbackd run`` instances in one consumer group share the input partitions; the
daemon keeps one task (pipeline) per partition number. :class:`GroupState` is what makes a
partition movable, and what keeps an instance that lost it from writing:

- **state topic** (compacted, one record per ``<group>/<partition>``): a task's snapshot with the
  input offsets it covers and the decisions-topic offset it had reached. Read by the next owner
  when the partition is assigned, which then seeks to those offsets;
- **refs topic** (compacted, ``<state topic>.refs``, partition = task, key = digest): the
  complete references the task's snapshots name by digest (``Pipeline.snapshot(external=True)``),
  each written once, in the transaction of the first state record that names it, and deleted in
  the one of the first that no longer does. Partition = task, so the next owner finds a task's
  references by reading one compacted partition to its end (Kafka has no lookup by key); the
  partition holds about what the task names, since each is written once and deleted when
  dropped;
- **decisions topic** (partition = task): every alert transition, incident change and action,
  as the decision log writes it, plus a deterministic ``decision_id``. It is the audit trail of
  the whole group, and the group's outbox: the next owner of a partition reads what was decided
  after the snapshot it restores, so it neither writes those decisions twice nor runs a finished
  action again. Decisions are re-derived identically (the same events through the same rules),
  so their ids match.

**No size cap.** A state record or a reference larger than one message (the topics'
``max.message.bytes``) is written as parts and a head, in one transaction (:func:`split_record`).

**One transaction per checkpoint.** The instance's producer has a ``transactional.id`` of its
own. Decisions go into the open transaction as they are made; a checkpoint adds every task's
state record and the input offsets (``send_offsets_to_transaction`` with the consumer's group
metadata) and commits. Readers use ``read_committed``: a decision, a state record and the offsets
past the events behind them become visible together, or not at all. The group metadata carries
the consumer's generation: an instance that lost its partitions (stalled past the session
timeout, cut off from the coordinator) has its offsets refused (``UNKNOWN_MEMBER_ID``,
``ILLEGAL_GENERATION``) and its transaction aborts; an open transaction it cannot finish is
aborted by the coordinator after ``transaction.timeout.ms`` (its producer is then fenced). A new
owner waits until no transaction is open on the task's state and decisions partitions before it
reads them (:meth:`GroupState.load`), so a transaction still in flight from the previous owner
is either visible or gone by then, never appearing later.

**The outbox.** A call's outcome (a rollback's, a pause's, a notice's finished record) is a fact
about the world, not derived state: it is written at once, durably, outside the transaction, so
neither a crash nor an aborted transaction after the call can lose it, and the next owner finds
it (read-committed readers see it in offset order, after the transaction open before it). A
crash between a backend call and that write means the next owner calls the backend again with
the same idempotency key, as a restarted single instance does: the backends are idempotent.

**Who does what.** :class:`GroupState` is the daemon's one handle on all this, a facade over
classes with one job each: the transaction's producer and its lifecycle
(:class:`~rollbackd.daemon.txn.Transaction`, in ``daemon/txn.py``); writing a checkpoint's state
records and references into it (:class:`StateRecords`); reading a task's committed state back
(:class:`StateReader`, over :class:`PartitionReader`); the decisions topic and its outbox
(:class:`DecisionsTopic`).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from contextlib import closing
from typing import Any, Callable, Iterable, Iterator, Mapping

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from rollbackd.daemon.decisions import encode_decision
from rollbackd.daemon.kafka import CLIENT_DEFAULTS, BrokerUnavailable, classify
from rollbackd.daemon.snapshot import StateError, decode_state, encode_state, frame, kind_of, unframe
from rollbackd.daemon.txn import TIMEOUT, Transaction, TransactionFailed

__all__ = ["GroupState", "GroupDecisions", "GroupRecorder", "DecisionsTopicAnchors", "TransactionFailed", "decision_id",
           "ensure_topics", "split_record", "join_parts", "MAX_RECORD_BYTES", "DecisionsTopic", "StateReader",
           "StateRecords", "PartitionReader"]

log = structlog.get_logger("rollbackd.scaleout")

# The largest record written to the state and refs topics (their max.message.bytes): a state
# record or a reference above it is written as parts (split_record), so it caps nothing. Above
# Kafka's 1 MB default, so that most records are one message; far below what strains a broker.
MAX_RECORD_BYTES = 8 * 1024 * 1024
# What a part leaves free of the cap: its key, the record and batch headers.
_RECORD_OVERHEAD = 16 * 1024
_CONSUMER_ONLY = ("session.", "heartbeat.", "max.poll.", "auto.", "enable.auto.", "fetch.", "isolation.",
                  "queued.", "check.crcs", "enable.partition.eof", "group.", "partition.assignment")


def decision_id(rec: Mapping[str, Any]) -> str:
    """Deterministic id of a decision record: the same decision, re-made, has the same id.

    A finished action is identified by its idempotency key and outcome, not by its detail text
    (a retry count may differ between two owners)."""
    if rec.get("kind") == "action" and rec.get("idempotency_key"):
        basis = f"action|{rec['idempotency_key']}|{rec.get('status')}".encode()
    else:
        basis = encode_decision({k: v for k, v in rec.items() if k != "decision_id"})
    return hashlib.sha256(basis).hexdigest()[:24]


def ensure_topics(admin: AdminClient, state_topic: str, decisions_topic: str, partitions: int,
                  refs_topic: str | None = None, max_record_bytes: int = MAX_RECORD_BYTES) -> None:
    """Creates the state topic and the refs topic (both compacted, ``max.message.bytes`` of
    ``max_record_bytes``) and the decisions topic when they do not exist."""
    existing = admin.list_topics(timeout=TIMEOUT).topics
    new = []
    for name in (state_topic, refs_topic or f"{state_topic}.refs"):
        if name not in existing:
            new.append(NewTopic(name, num_partitions=max(1, partitions), replication_factor=-1, config={
                "cleanup.policy": "compact", "max.message.bytes": str(max_record_bytes),
                "segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1",
            }))
    if decisions_topic not in existing:
        new.append(NewTopic(decisions_topic, num_partitions=max(1, partitions), replication_factor=-1))
    for topic, future in admin.create_topics(new).items() if new else ():
        try:
            future.result(timeout=TIMEOUT)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise classify(exc, f"creating {topic}") from exc


def record_cap(admin: AdminClient, topics: Iterable[str], most: int = MAX_RECORD_BYTES) -> int:
    """The largest record ``topics`` all take (their ``max.message.bytes``, as the brokers
    apply it), at most ``most``: a topic made by hand with a smaller cap gets smaller parts."""
    cap = most
    resources = [ConfigResource("topic", t) for t in topics]
    for resource, future in admin.describe_configs(resources).items():
        try:
            entry = future.result(timeout=TIMEOUT).get("max.message.bytes")
        except KafkaException as exc:
            raise classify(exc, f"describing {resource.name}") from exc
        if entry is not None and entry.value and entry.value.isdigit():
            cap = min(cap, int(entry.value))
    return cap


def split_record(key: bytes, value: bytes, part_bytes: int) -> list[tuple[bytes, bytes]]:
    """``value`` under ``key`` as records of at most ``part_bytes`` each, to write in this order
    in one transaction: itself when it fits; else its parts (``<key>/0``, ``<key>/1``, ...),
    then a head under ``key``: a ``parts`` frame with their count and the whole's size and
    SHA-256. A compacted topic keeps the last of each key, so the head and the parts it counts
    are always of the same transaction."""
    if len(value) <= part_bytes:
        return [(key, value)]
    parts = [(part_key(key, i), value[at:at + part_bytes]) for i, at in enumerate(range(0, len(value), part_bytes))]
    head = frame("parts", {"count": len(parts), "size": len(value), "sha256": hashlib.sha256(value).hexdigest()})
    return [*parts, (key, head)]


def part_key(key: bytes, n: int) -> bytes:
    return key + b"/" + str(n).encode()


def parts_count(head: bytes, what: str) -> int:
    """How many parts the head :func:`split_record` wrote names (StateError if not a head)."""
    info = unframe("parts", head, what=what)
    if type(info) is not dict or type(info.get("count")) is not int or info["count"] < 1 \
            or type(info.get("size")) is not int or type(info.get("sha256")) is not str:
        raise StateError(f"{what}: a parts head without its count, size and SHA-256")
    return info["count"]


def join_parts(key: bytes, head: bytes, parts: Mapping[bytes, bytes | None], what: str) -> bytes:
    """The value :func:`split_record` wrote as ``head`` and ``parts`` (by key); StateError when a
    part is missing or they do not add up to the size and SHA-256 the head states."""
    count = parts_count(head, what)
    info = unframe("parts", head, what=what)
    chunks = []
    for n in range(count):
        chunk = parts.get(part_key(key, n))
        if chunk is None:
            raise StateError(f"{what}: part {n} of {count} is missing")
        chunks.append(chunk)
    value = b"".join(chunks)
    if len(value) != info["size"] or hashlib.sha256(value).hexdigest() != info["sha256"]:
        raise StateError(f"{what}: its {count} parts do not make the record their head describes "
                         "(size or SHA-256 differs)")
    return value


class PartitionReader:
    """Reads single partitions of the group's topics, committed records only, with consumers
    that never join the group (nor commit)."""

    def __init__(self, servers: str, config: Mapping[str, Any], group_id: str, max_record_bytes: int) -> None:
        self.servers = servers
        self.config = dict(config)
        self.group_id = group_id
        self.max_record_bytes = max_record_bytes

    def consumer(self, group: str | None = None, isolation: str = "read_committed") -> Consumer:
        return Consumer({
            **CLIENT_DEFAULTS,
            **self.config,
            "bootstrap.servers": self.servers,
            "group.id": group or f"{self.group_id}-restore",  # never subscribes nor commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": isolation,
            "fetch.message.max.bytes": self.max_record_bytes,
        })

    def read_back(self, topic: str, partition: int, enough: Callable[[list[Any]], bool], span: int = 8) -> list[Any]:
        """The committed records at the end of ``topic``/``partition``, reaching back until
        ``enough`` of them are read (four times further each time) or the partition's start.
        Transaction markers (and aborted records) sit between the records."""
        c = self.consumer()
        try:
            low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=TIMEOUT)
        except KafkaException as exc:
            raise classify(exc, f"reading {topic}/{partition}") from exc
        finally:
            c.close()
        while True:
            begin = max(low, high - span)
            msgs = self.read(topic, partition, begin)
            if enough(msgs) or begin <= low:
                return msgs
            span *= 4

    def read(self, topic: str, partition: int, start: int) -> list[Any]:
        """Every committed message of ``topic``/``partition`` from offset ``start`` to its end now."""
        with closing(self.iterate(topic, partition, start)) as msgs:
            return list(msgs)

    def iterate(self, topic: str, partition: int, start: int) -> Iterator[Any]:
        """:meth:`read`, one message at a time."""
        c = self.consumer()
        try:
            low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=TIMEOUT)
            begin = max(start, low)
            if high <= begin:
                return
            c.assign([TopicPartition(topic, partition, begin)])
            deadline = time.monotonic() + TIMEOUT
            while True:
                # Short polls: a batch waits out its whole timeout unless it fills up, and the
                # end of the partition (an event) does not end the wait.
                msgs = c.consume(1000, 0.1)
                if not msgs:
                    if time.monotonic() > deadline:
                        raise BrokerUnavailable(f"reading {topic}/{partition}: nothing in {TIMEOUT} s")
                    continue
                deadline = time.monotonic() + TIMEOUT
                for m in msgs:
                    err = m.error()
                    if err is None:
                        yield m
                        if m.offset() >= high - 1:
                            return
                    elif err.code() == KafkaError._PARTITION_EOF:
                        return
                    else:
                        raise classify(err, f"reading {topic}/{partition}")
        except KafkaException as exc:
            raise classify(exc, f"reading {topic}/{partition}") from exc
        finally:
            c.close()


class StateRecords:
    """Writes a checkpoint's state records into the transaction, and knows what the last
    committed record of each task left in the topics: the references in its refs partition
    (digest -> how many parts, 0 for one record) and how many parts its state record has; and
    the same for the open transaction, until it commits (a transaction
    :class:`~rollbackd.daemon.txn.Participant`)."""

    def __init__(self, txn: Transaction, group_id: str, state_topic: str, refs_topic: str, part_bytes: int) -> None:
        self.txn = txn
        self.group_id = group_id
        self.state_topic = state_topic
        self.refs_topic = refs_topic
        self.part_bytes = part_bytes
        self._stored: dict[int, dict[str, int]] = {}
        self._state_parts: dict[int, int] = {}
        self._staged: dict[int, tuple[dict[str, int], int]] = {}
        txn.participants.append(self)

    def write(self, states: Mapping[int, dict[str, Any]], blobs: Mapping[int, Mapping[str, bytes]]) -> None:
        """Into the open transaction: ``states`` (one record per task), each after the blobs it
        names that its partition of the refs topic does not hold yet (``blobs``: by task, by
        digest)."""
        self._staged = {}  # (a commit left in doubt was settled when the transaction began)
        for key, state in states.items():
            # The references first: a record is never visible without the blobs it names.
            stored = self._produce_refs(key, state.get("refs") or (), blobs.get(key) or {})
            record_key = state_key(self.group_id, key)
            records = split_record(record_key, encode_state(state), self.part_bytes)
            parts = len(records) - 1 if len(records) > 1 else 0
            for n in range(parts, self._state_parts.get(key, 0)):  # a smaller record: its old parts go
                self.txn.produce(self.state_topic, None, key=part_key(record_key, n), partition=key)
            for part, value in records[:-1]:
                self.txn.produce(self.state_topic, value, key=part, partition=key)
            # Headers for people and tools: what the record covers and who wrote it.
            self.txn.produce(self.state_topic, records[-1][1], key=record_key, partition=key, headers=[
                ("rollbackd-position", json.dumps(state.get("position") or {}, sort_keys=True).encode()),
                ("rollbackd-writer", self.txn.transactional_id.encode())])
            self._staged[key] = (stored, parts)

    def restored(self, key: int, stored: dict[str, int], parts: int) -> None:
        """Task ``key``'s committed record, as read back: ``stored`` references, ``parts``."""
        self._stored[key], self._state_parts[key] = stored, parts

    def release(self, key: int) -> None:
        self._stored.pop(key, None)
        self._state_parts.pop(key, None)

    def committed(self) -> None:
        for key, (stored, parts) in self._staged.items():
            self._stored[key], self._state_parts[key] = stored, parts
        self._staged = {}

    def discarded(self) -> None:
        self._staged = {}

    def _produce_refs(self, key: int, refs: Iterable[str], new: Mapping[str, bytes]) -> dict[str, int]:
        """Into the open transaction: the blobs of ``refs`` that task ``key``'s refs partition
        does not hold (their bytes in ``new``), each keyed by its digest (as parts when larger
        than a record may be); tombstones for the ones it holds that ``refs`` no longer names.
        Returns what the partition holds once this commits."""
        held = self._stored.get(key, {})
        stored: dict[str, int] = {}
        for digest in sorted(refs):
            if digest in held:
                stored[digest] = held[digest]
                continue
            data = new.get(digest)
            if data is None:
                # The snapshot names a blob as written when no committed record wrote it: this
                # transaction must not commit. Aborted, the daemon rewinds its tasks to what is
                # committed, whose blobs are all there.
                raise BrokerUnavailable(f"task {key}: blob {digest[:16]} is named but neither new nor "
                                        f"in {self.refs_topic}/{key}")
            records = split_record(digest.encode(), data, self.part_bytes)
            for record_key, value in records:
                self.txn.produce(self.refs_topic, value, key=record_key, partition=key)
            stored[digest] = len(records) - 1 if len(records) > 1 else 0
        for digest, parts in held.items():
            if digest not in stored:  # compaction drops it (and its parts) after delete.retention.ms
                for n in range(parts):
                    self.txn.produce(self.refs_topic, None, key=part_key(digest.encode(), n), partition=key)
                self.txn.produce(self.refs_topic, None, key=digest.encode(), partition=key)
        return stored


class StateReader:
    """Reads a task's committed state back: its state record (joined from its parts) and the
    blobs it names, once no transaction is open on the task's partitions."""

    def __init__(self, partitions: PartitionReader, txn: Transaction, group_id: str, state_topic: str,
                 decisions_topic: str, refs_topic: str) -> None:
        self.partitions = partitions
        self.txn = txn
        self.group_id = group_id
        self.state_topic = state_topic
        self.decisions_topic = decisions_topic
        self.refs_topic = refs_topic
        self._refs_exist = False

    def load(self, key: int) -> tuple[dict[str, Any], dict[str, int], int] | None:
        """Task ``key``'s latest committed state (see :meth:`GroupState.load`), the references
        its refs partition holds (digest -> parts) and how many parts its record has; or None."""
        self._wait_settled(key)
        what = f"{self.state_topic}/{key}"
        record_key = state_key(self.group_id, key)
        tail = self.partitions.read_back(self.state_topic, key, lambda msgs: bool(msgs))
        last = tail[-1] if tail else None
        if last is None or last.value() is None:
            return None
        if last.key() != record_key:
            raise ValueError(f"{what} holds {last.key()!r}, not {record_key!r}: "
                             "one state topic per consumer group")
        # A record this rollbackd cannot read stops the daemon (StateError is Fatal): the
        # partition is never started without its state, and nothing in the record runs.
        value, parts = last.value(), 0
        if kind_of(value) == "parts":
            parts = parts_count(value, what)
            value = join_parts(record_key, value, self._parts_before(key, last, parts), what)
        state = decode_state(value, what)
        state["blobs"], stored = self._read_refs(key, state.get("refs") or [])
        return state, stored, parts

    def _has_refs_topic(self) -> bool:
        """Whether the refs topic exists (a state topic made by hand, or by a rollbackd before
        references had their topic, may lack it: then no record names a blob there)."""
        if not self._refs_exist:
            c = self.partitions.consumer()
            try:
                topic = c.list_topics(self.refs_topic, timeout=TIMEOUT).topics.get(self.refs_topic)
            except KafkaException as exc:
                raise classify(exc, "refs topic metadata") from exc
            finally:
                c.close()
            self._refs_exist = topic is not None and topic.error is None and bool(topic.partitions)
        return self._refs_exist

    def _wait_settled(self, key: int) -> None:
        """Until no transaction is open on task ``key``'s state, decisions and refs partitions: the
        last stable offset (what read_committed readers see) has reached the high watermark.
        Bounded by our transaction timeout, after which the coordinator aborts any open one."""
        parts = [TopicPartition(self.state_topic, key), TopicPartition(self.decisions_topic, key)]
        if self._has_refs_topic():
            parts.append(TopicPartition(self.refs_topic, key))
        committed, everything = self.partitions.consumer(), self.partitions.consumer(isolation="read_uncommitted")
        deadline = time.monotonic() + self.txn.timeout + TIMEOUT
        waited = False
        try:
            while True:
                if not self.txn.settled:
                    self.txn.drive(1.0)  # ours, first: nobody else finishes it
                open_ = [tp.topic for tp in parts
                         if committed.get_watermark_offsets(tp, timeout=TIMEOUT, cached=False)[1]
                         < everything.get_watermark_offsets(tp, timeout=TIMEOUT, cached=False)[1]]
                if not open_:
                    if waited:
                        log.info("task.transaction_settled", task=key)
                    return
                if not waited:
                    log.info("task.waiting_for_transaction", task=key, topics=open_,
                             detail="a previous owner's transaction is open: waiting until it commits or aborts")
                    waited = True
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"task {key}: a transaction on {', '.join(open_)} stayed open "
                                            f"past {self.txn.timeout + TIMEOUT:.0f} s")
                time.sleep(0.2)
        except KafkaException as exc:
            raise classify(exc, f"task {key}: transaction state") from exc
        except TypeError as exc:  # get_watermark_offsets answered None: timed out
            raise BrokerUnavailable(f"task {key}: watermarks not answered in {TIMEOUT} s") from exc
        finally:
            committed.close()
            everything.close()

    def _parts_before(self, key: int, head: Any, count: int) -> dict[bytes, bytes | None]:
        """The parts of the state record whose head is ``head``: the last committed record of
        each part key before it (written in the head's transaction, just before it)."""
        wanted = {part_key(state_key(self.group_id, key), n) for n in range(count)}

        def found(msgs: list[Any]) -> bool:
            return wanted <= {m.key() for m in msgs if m.offset() < head.offset()}

        parts: dict[bytes, bytes | None] = {}
        for m in self.partitions.read_back(self.state_topic, key, found, span=2 * count + 8):
            if m.offset() < head.offset() and m.key() in wanted:
                parts[m.key()] = m.value()
        return parts

    def _read_refs(self, key: int, refs: list[str]) -> tuple[dict[str, bytes], dict[str, int]]:
        """The blobs ``refs`` names, from task ``key``'s refs partition (each checked against
        its digest), and how many parts each has there."""
        if not refs:
            return {}, {}
        what = f"{self.refs_topic}/{key}"
        if not self._has_refs_topic():
            raise StateError(f"{self.state_topic}/{key} names {len(refs)} blob(s) but {self.refs_topic} does not exist")
        named = set(refs)
        found: dict[bytes, bytes | None] = {}
        with closing(self.partitions.iterate(self.refs_topic, key, 0)) as msgs:
            for m in msgs:
                record_key = m.key() or b""
                if record_key.split(b"/", 1)[0].decode("ascii", "replace") in named:
                    found[record_key] = m.value()  # the last one of a key counts (None: deleted)
        blobs: dict[str, bytes] = {}
        stored: dict[str, int] = {}
        for digest in refs:
            data = found.get(digest.encode())
            if data is None:
                raise StateError(
                    f"{what}: blob {digest[:16]} named by the state record of {self.state_topic}/{key} is missing "
                    "(deleted, or the refs topic was recreated): the task is not started without it")
            stored[digest] = 0
            if kind_of(data) == "parts":
                stored[digest] = parts_count(data, f"{what}: blob {digest[:16]}")
                data = join_parts(digest.encode(), data, found, f"{what}: blob {digest[:16]}")
            if hashlib.sha256(data).hexdigest() != digest:
                raise StateError(f"{what}: blob {digest[:16]} does not match its digest")
            blobs[digest] = data
        log.info("task.refs_read", task=key, blobs=len(blobs), bytes=sum(map(len, blobs.values())))
        return blobs, stored


class DecisionsTopic:
    """The decisions topic (partition = task): decisions go into the open transaction; the
    outcomes of calls and the ledger's anchors are written at once, outside it, by a producer
    of their own. Knows which decisions are there already (``seen``: committed, ours or another
    owner's; the ones in the open transaction, until it commits: a transaction
    :class:`~rollbackd.daemon.txn.Participant`) and which actions finished (``done``)."""

    def __init__(self, txn: Transaction, partitions: PartitionReader, topic: str, servers: str,
                 producer_config: Mapping[str, Any]) -> None:
        self.txn = txn
        self.partitions = partitions
        self.topic = topic
        # Outcomes of calls are facts, not derived state: written at once, outside the
        # transactions (see GroupDecisions).
        self._facts = Producer({**CLIENT_DEFAULTS, **producer_config, "bootstrap.servers": servers,
                                "enable.idempotence": True, "acks": "all", "linger.ms": 0})
        self._home: dict[str, int] = {}  # deployment -> the task (decisions partition) deciding for it
        self._next: dict[int, int] = {}  # decisions partition -> next offset (ours, delivered)
        self.task = 0  # the task whose decisions are being made now
        self.seen: set[str] = set()  # decision ids committed to the decisions topic (adopted or ours)
        self._txn_ids: set[str] = set()  # decision ids in the open transaction
        self.done: dict[str, dict[str, Any]] = {}  # finished actions there, by idempotency key
        txn.participants.append(self)

    def release(self, key: int) -> None:
        self._next.pop(key, None)
        self._home = {d: k for d, k in self._home.items() if k != key}

    def published(self, did: str) -> bool:
        """The decision is in the decisions topic already, or in the open transaction."""
        return did in self.seen or did in self._txn_ids

    def publish(self, rec: Mapping[str, Any], did: str) -> None:
        """Into the open transaction (begun now unless open)."""
        value = encode_decision({**rec, "decision_id": did})
        try:
            self.txn.begin()
            self.txn.produce(self.topic, value, key=str(rec.get("deployment", "")).encode(),
                             partition=self._partition(rec), on_delivered=self._delivered)
        except BrokerUnavailable as exc:
            # Decided on the processing thread, mid-batch: no place to raise. The transaction
            # cannot hold this decision, so it must not commit: the next commit aborts it and
            # the daemon rewinds to the last committed state, which re-derives the decision.
            self.txn.doom(f"a decision was not written: {exc}")
            return
        self._txn_ids.add(did)

    def publish_fact(self, rec: Mapping[str, Any], did: str) -> None:
        """A call's outcome, durable in the decisions topic before this returns, outside the
        transaction: a crash or an abort after the call cannot take back that it was made, and
        the next owner must find it in the outbox. (Read-committed readers still see it in
        offset order: it waits behind a transaction open before it.) If the brokers do not take
        it now, it goes into the transaction instead; the local ledger has it meanwhile."""
        value = encode_decision({**rec, "decision_id": did})
        failure = self._durably(value, str(rec.get("deployment", "")).encode(), self._partition(rec),
                                self._delivered)
        if failure is not None:
            log.warning("decision.outcome_not_durable", decision_id=did, detail=failure,
                        fallback="the next commit")
            self.publish(rec, did)
            return
        self.seen.add(did)

    def publish_anchor(self, anchor: Mapping[str, Any]) -> None:
        """A signed anchor of the ledger (``daemon/audit.py``) into the decisions topic, durable
        before this returns (raises otherwise): key ``anchor/<ledger id>``, partition 0, outside
        any transaction, since it only states what the ledger holds already. The anchor records'
        values, one per line, are an anchor file for ``rollbackd audit verify --anchors``."""
        value = json.dumps(anchor, sort_keys=True, separators=(",", ":")).encode()
        failure = self._durably(value, f"anchor/{anchor.get('ledger_id')}".encode(), 0)
        if failure is not None:
            raise BrokerUnavailable(f"publishing an anchor: {failure}")

    def _durably(self, value: bytes, key: bytes, partition: int,
                 on_delivered: Callable[[Any], None] | None = None) -> str | None:
        """Produces one record with the outside-the-transaction producer and waits until the
        brokers have it: None then, else why not."""
        failures: list[str] = []

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                failures.append(f"{err.name()}: {err.str()}")
            elif on_delivered is not None:
                on_delivered(msg)

        try:
            self._facts.produce(self.topic, value, key=key, partition=partition, on_delivery=delivered)
            left = self._facts.flush(TIMEOUT)
        except (KafkaException, BufferError) as exc:
            return str(exc)
        if failures:
            return failures[0]
        return f"not acknowledged in {TIMEOUT} s" if left else None

    def adopt(self, key: int, start: int) -> None:
        """Reads what was decided for task ``key`` from offset ``start``: those decisions are not
        written again and those actions not run again."""
        n = 0
        for msg in self.partitions.read(self.topic, key, start):
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

    def end(self, key: int) -> int:
        """The offset after task ``key``'s last decision, once every decision written is delivered."""
        self.txn.flush("publishing decisions")
        if key in self._next:
            return self._next[key]
        c = self.partitions.consumer()
        deadline = time.monotonic() + TIMEOUT
        try:
            while True:
                try:
                    _, high = c.get_watermark_offsets(TopicPartition(self.topic, key), timeout=TIMEOUT)
                    break
                except KafkaException as exc:
                    # A partition between leaders (just created, or its broker moved) answers
                    # NOT_LEADER for a moment: asked again, within the timeout.
                    if not _leader_moving(exc) or time.monotonic() > deadline:
                        raise classify(exc, "decisions topic end") from exc
                    time.sleep(0.2)
        finally:
            c.close()
        self._next[key] = high  # from now on we are its only writer
        return high

    def committed(self) -> None:
        self.seen |= self._txn_ids
        self._txn_ids.clear()

    def discarded(self) -> None:
        self._txn_ids.clear()

    def close(self) -> None:
        try:
            self._facts.flush(1.0)
        except KafkaException:
            pass

    def _partition(self, rec: Mapping[str, Any]) -> int:
        """The task that decides for the record's deployment. Results of calls come back while
        any task may be selected; the deployment's first decision (an alert) was made by its own."""
        return self._home.setdefault(str(rec.get("deployment", "")), self.task)

    def _delivered(self, msg: Any) -> None:
        self._next[msg.partition()] = max(self._next.get(msg.partition(), 0), msg.offset() + 1)


class GroupState:
    """Task state in ``state_topic``; decisions (and what other owners decided) in
    ``decisions_topic``; both written in transactions of ``transactional_id``. The daemon's one
    handle on them, composing the transaction (:class:`~rollbackd.daemon.txn.Transaction`), the
    writer of state records (:class:`StateRecords`), their reader (:class:`StateReader`) and the
    decisions topic (:class:`DecisionsTopic`)."""

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        state_topic: str,
        decisions_topic: str,
        config: Mapping[str, str] = {},
        transactional_id: str | None = None,
        transaction_timeout: float = 60.0,
        refs_topic: str | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self.servers = bootstrap_servers
        self.group_id = group_id
        self.state_topic = state_topic
        self.decisions_topic = decisions_topic
        self.refs_topic = refs_topic or f"{state_topic}.refs"
        if max_record_bytes < 4 * _RECORD_OVERHEAD:
            raise ValueError(f"max_record_bytes must be at least {4 * _RECORD_OVERHEAD}, got {max_record_bytes}")
        self.max_record_bytes = max_record_bytes
        part_bytes = max_record_bytes - _RECORD_OVERHEAD
        self.config = {k: v for k, v in config.items() if not k.startswith(("group.", "partition.assignment"))}
        self.transactional_id = str(self.config.pop("transactional.id", "") or transactional_id
                                    or f"rollbackd-{group_id}-{uuid.uuid4().hex[:12]}")
        self.transaction_timeout = float(self.config.pop("transaction.timeout.ms", 0) or 0) / 1000 or transaction_timeout
        # The user's settings minus the consumer's (librdkafka warns about each).
        producer_config = {k: v for k, v in self.config.items() if not k.startswith(_CONSUMER_ONLY)}
        self.txn = Transaction(bootstrap_servers, producer_config, self.transactional_id, self.transaction_timeout,
                               max_record_bytes, part_bytes)
        partitions = PartitionReader(bootstrap_servers, self.config, group_id, max_record_bytes)
        self.decisions = DecisionsTopic(self.txn, partitions, decisions_topic, bootstrap_servers, producer_config)
        self.records = StateRecords(self.txn, group_id, state_topic, self.refs_topic, part_bytes)
        self.reader = StateReader(partitions, self.txn, group_id, state_topic, decisions_topic, self.refs_topic)
        self._partitions = partitions

    # -- the daemon's hooks

    def select(self, key: int) -> None:
        self.decisions.task = key

    def release(self, key: int) -> None:
        """Task ``key`` moved away: what we knew of its partitions is stale now."""
        self.decisions.release(key)
        self.records.release(key)

    @property
    def txn_open(self) -> bool:
        """Something was written since the last commit (or a transaction is not settled)."""
        return self.txn.open

    @property
    def settled(self) -> bool:
        """No transaction of ours is waiting for the coordinator's answer."""
        return self.txn.settled

    @property
    def seen(self) -> set[str]:
        """Decision ids committed to the decisions topic (adopted or ours)."""
        return self.decisions.seen

    @property
    def done(self) -> dict[str, dict[str, Any]]:
        """Finished actions in the decisions topic, by idempotency key."""
        return self.decisions.done

    @property
    def commits(self) -> int:
        return self.txn.commits

    @property
    def aborts(self) -> int:
        return self.txn.aborts

    def task_state(self, key: int, snapshot: bytes, position: dict[str, int],
                   refs: Iterable[str] = ()) -> dict[str, Any]:
        """Task ``key``'s state record: its pipeline ``snapshot``, the input offsets it covers,
        the decisions-topic offset, the blobs the snapshot names by digest (``refs``)."""
        return {"pipeline": snapshot, "position": position, "decisions_offset": self.decisions.end(key),
                "refs": sorted(refs)}

    def commit(self, states: Mapping[int, dict[str, Any]], offsets: Mapping[str, int], group_metadata: Any,
               blobs: Mapping[int, Mapping[str, bytes]] = {}) -> None:
        """One transaction: the decisions written since the last commit, ``states`` (one record
        per task) with the blobs they name that their partition of the refs topic does not hold
        yet (``blobs``: by task, by digest), and the input ``offsets`` (``{"topic:partition":
        next offset}``) for the consumer group ``group_metadata`` describes; then commit. Raises
        :class:`TransactionFailed` when it did not commit (aborted, or in doubt)."""
        self.txn.commit(lambda: self.records.write(states, blobs), offsets, group_metadata)

    def abort(self, why: str) -> None:
        """Give up the open transaction (its tasks were lost): nothing in it becomes visible.
        An abort the coordinator does not acknowledge now is finished by :meth:`settle`."""
        self.txn.abort(why)

    def settle(self, timeout: float = 1.0) -> str | None:
        """See :meth:`Transaction.settle <rollbackd.daemon.txn.Transaction.settle>`: None while
        a pending transaction cannot be finished; else how the last one that did not simply
        commit ended (``"committed"``, ``"aborted"``), once, or ``""``."""
        return self.txn.settle(timeout)

    def load(self, key: int) -> dict[str, Any] | None:
        """The latest committed state of task ``key``, or None; ``blobs`` in it: the blobs its
        snapshot names (bytes by digest), for ``Pipeline.restore``.

        First waits until no transaction is open on the task's state, decisions and refs
        partitions (a previous owner's commit in flight, or a stalled owner's transaction that
        the coordinator aborts after ``transaction.timeout.ms``): what it reads then is final.
        Task ``key`` writes to partition ``key`` of the state topic and nothing else does, so its
        latest state is the partition's last committed record (compaction never removes that
        one); a record written as parts is the head, its parts just before it. Its blobs are in
        partition ``key`` of the refs topic, read to its end: a compacted partition holding the
        task's references, each once. A blob it names that is not there is a StateError: the
        task never starts without the state it had."""
        loaded = self.reader.load(key)
        if loaded is None:
            return None
        state, stored, parts = loaded
        self.records.restored(key, stored, parts)
        return state

    def start_offsets(self, partitions: list[tuple[str, int]], reset: str = "earliest") -> dict[str, int]:
        """Where a task without saved state starts: the group's committed offsets, else the
        beginning (or the end, with ``auto.offset.reset`` latest) of each partition."""
        c = self._partitions.consumer(group=self.group_id)
        try:
            tps = [TopicPartition(t, p) for t, p in partitions]
            out: dict[str, int] = {}
            for tp in c.committed(tps, timeout=TIMEOUT):
                if tp.offset >= 0:
                    out[f"{tp.topic}:{tp.partition}"] = tp.offset
                    continue
                low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=TIMEOUT)
                out[f"{tp.topic}:{tp.partition}"] = high if reset in ("latest", "end", "largest") else low
            return out
        except KafkaException as exc:
            raise classify(exc, "start offsets") from exc
        finally:
            c.close()

    def adopt(self, key: int, saved: Mapping[str, Any]) -> None:
        """Reads what was decided for task ``key`` after its snapshot: those decisions are not
        written again and those actions not run again."""
        self.decisions.adopt(key, saved.get("decisions_offset") or 0)

    # -- the decisions topic

    def published(self, did: str) -> bool:
        """The decision is in the decisions topic already, or in the open transaction."""
        return self.decisions.published(did)

    def publish_fact(self, rec: Mapping[str, Any], did: str) -> None:
        """A call's outcome, durable before this returns (:meth:`DecisionsTopic.publish_fact`)."""
        self.decisions.publish_fact(rec, did)

    def publish_anchor(self, anchor: Mapping[str, Any]) -> None:
        """A signed anchor of the ledger (:meth:`DecisionsTopic.publish_anchor`)."""
        self.decisions.publish_anchor(anchor)

    def publish(self, rec: Mapping[str, Any], did: str) -> None:
        """A decision, into the open transaction (:meth:`DecisionsTopic.publish`)."""
        self.decisions.publish(rec, did)

    def close(self) -> None:
        """Aborts a transaction left open (what it held is re-derived from the committed state
        by whoever owns the partitions next) and lets the producers go."""
        self.txn.close()
        self.decisions.close()


def state_key(group_id: str, task: int) -> bytes:
    """The key of task ``task``'s state record (its parts': ``<key>/<n>``)."""
    return f"{group_id}/{task}".encode()


class GroupDecisions:
    """The decision sink in a group: the local decision log plus the decisions topic (in the
    open transaction), skipping decisions another owner (or this instance before a crash or a
    rewind) already published."""

    def __init__(self, local: Any, group: GroupState) -> None:
        self.local = local
        self.group = group

    def write(self, rec: dict[str, Any]) -> None:
        did = decision_id(rec)
        if self.group.published(did):
            return
        if self.local is not None:
            self.local.write(rec)
        if _is_outcome(rec):
            self.group.publish_fact(rec, did)
        else:
            self.group.publish(rec, did)

    def close(self) -> None:
        self.group.close()
        if self.local is not None:
            self.local.close()


def _is_outcome(rec: Mapping[str, Any]) -> bool:
    """A call's finished record (``actions.intents.finished_record``): a rollback's or pause's
    carries ``attempts``, a notice's ``thread``. Records the engine decides about actions
    (skipped, dry run, waiting for approval) carry neither: they are derived, like alerts."""
    return rec.get("kind") == "action" and ("attempts" in rec or "thread" in rec)


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


class DecisionsTopicAnchors:
    """The ledger's anchors into the group's decisions topic (an ``audit.AnchorSink``)."""

    def __init__(self, group: GroupState) -> None:
        self.group = group

    def publish(self, anchor: dict[str, Any]) -> None:
        self.group.publish_anchor(anchor)


def _leader_moving(exc: KafkaException) -> bool:
    """A partition with no leader for the moment: worth asking again shortly."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    return err is not None and (err.retriable() or err.code() in (
        KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE))
