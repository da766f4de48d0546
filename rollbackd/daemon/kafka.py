"""Kafka at the edge: a source of contract events, a dead-letter topic, and recording drills.

Uses confluent-kafka (librdkafka); see ``docs/kafka.md`` for why, and for configuration.

:class:`KafkaSource` is an :class:`~rollbackd.daemon.sources.EventSource` over a consumer group.
Its positions are ``{"topic:partition": next_offset}`` (JSON-able); nothing is committed until
the engine calls ``commit(position)``, so offsets never run ahead of checkpointed state.
:class:`KafkaDeadLetter` writes rejected inputs, raw, to a topic with the reason in headers.
:func:`record` and :func:`publish` copy between topics and JSON Lines recordings.
"""

from __future__ import annotations

import collections
import gzip
import logging
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from rollbackd.daemon.blindness import SourceHealth
from rollbackd.daemon.kafka_health import ConsumerHealth, PartitionEnds
from rollbackd.daemon.clock import Clock, WallClock
from rollbackd.daemon.sources import Batch
from rollbackd.errors import Fatal, Recoverable
from rollbackd.events import Event, EventDecoder, Rejected

__all__ = [
    "BrokerUnavailable",
    "KafkaFatal",
    "KafkaSource",
    "KafkaDeadLetter",
    "classify",
    "record",
    "publish",
    "parse_position",
    "DEAD_LETTER_HEADERS",
    "librdkafka_log",
    "CLIENT_DEFAULTS",
]

log = logging.getLogger("rollbackd.kafka")
# Every client's ``logger``: librdkafka's own lines (connection failures, ...) go through stdlib
# logging, which the command line renders like every other log line (JSON with --log-json),
# instead of librdkafka printing plain text on stderr.
librdkafka_log = logging.getLogger("rollbackd.kafka.librdkafka")
# What every Kafka client the daemon creates starts from; the user's ``--kafka-config`` overrides.
CLIENT_DEFAULTS: dict[str, Any] = {"logger": librdkafka_log}

Partitions = list[tuple[str, int]]
PartitionHook = Callable[[Partitions], None]

DEAD_LETTER_HEADERS = ("rollbackd-reason", "rollbackd-detail", "rollbackd-source")

_EOF = KafkaError._PARTITION_EOF
# librdkafka reconnects by itself after a dropped connection (idle brokers close them routinely);
# only "all brokers down" and the like mean the daemon cannot see its input.
_TRANSIENT = frozenset({KafkaError._TRANSPORT})
_FATAL = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError._INVALID_ARG,
        KafkaError._FATAL,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.UNSUPPORTED_SASL_MECHANISM,
        KafkaError.ILLEGAL_SASL_STATE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
_PROBE_INTERVAL = 1.0  # seconds between "are the brokers back?" checks during an outage
_PROBE_TIMEOUT = 0.5
_BUFFER_LIMIT = 50_000  # messages kept while a commit waits for its acknowledgement
# librdkafka's statistics (JSON) this often: the lag and the brokers' health, without a request.
_STATS_INTERVAL_MS = 1000
# A consumer whose group has had no coordinator this long, while a new client reaches the
# cluster, is replaced by a new one. librdkafka forgets a broker missing from a metadata answer
# (one fenced for a moment after a long pause is); when that was the last one it knew, it has
# nobody to ask for the group coordinator and never finds it again (confluentinc/librdkafka#5511):
# the daemon would stay blind while the brokers are fine.
_STRANDED_AFTER = 10.0
_NO_OFFSET = -1001  # librdkafka's RD_KAFKA_OFFSET_INVALID, as the statistics show it
# What an admin client (the end offsets) takes over from the consumer's settings: how to reach
# and authenticate to the brokers, nothing about consuming.
_ADMIN_KEYS = ("bootstrap.", "security.", "sasl.", "ssl.", "socket.", "broker.", "reconnect.", "retry.",
               "metadata.", "topic.metadata.", "api.version", "client.id", "client.dns", "connections.", "debug",
               "enable.ssl", "enable.sasl", "oauthbearer", "https.")
_value = Message.value
_error = Message.error
_topic = Message.topic
_partition = Message.partition
_offset = Message.offset


class BrokerUnavailable(Recoverable):
    """Kafka cannot serve the source or sink right now: brokers down or unreachable, a leader
    election, a missing topic, a commit that raced a rebalance. The loop retries and is blind
    meanwhile. ``code`` and ``name`` are librdkafka's (``KafkaError``)."""

    def __init__(self, message: str, code: int | None = None, name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.name = name


class KafkaFatal(Fatal):
    """Kafka refuses us for a reason waiting cannot fix: authentication, authorisation, a bad
    setting, or a client error librdkafka marks fatal."""

    def __init__(self, message: str, code: int | None = None, name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.name = name


def classify(err: KafkaError | KafkaException, context: str = "kafka") -> BrokerUnavailable | KafkaFatal:
    """The one place a librdkafka error becomes Recoverable or Fatal."""
    if isinstance(err, KafkaException):
        err = err.args[0] if err.args and isinstance(err.args[0], KafkaError) else KafkaError(KafkaError._FAIL, str(err))
    message = f"{context}: {err.name()}: {err.str()}"
    if err.fatal() or err.code() in _FATAL:
        return KafkaFatal(message, err.code(), err.name())
    return BrokerUnavailable(message, err.code(), err.name())


def parse_position(position: Any) -> dict[tuple[str, int], int]:
    """``{"topic:partition": offset}`` as ``{(topic, partition): offset}``; ValueError if malformed."""
    if not isinstance(position, Mapping):
        raise ValueError(f"a Kafka position is a mapping {{'topic:partition': offset}}, got {position!r}")
    out: dict[tuple[str, int], int] = {}
    for key, offset in position.items():
        topic, sep, part = str(key).rpartition(":")
        if not sep or not topic or not part.isdigit() or type(offset) is not int or offset < 0:
            raise ValueError(f"bad Kafka position entry {key!r}: {offset!r} (want 'topic:partition': offset >= 0)")
        out[(topic, int(part))] = offset
    return out


def _consumer_config(
    bootstrap_servers: str, group_id: str, config: Mapping[str, str], eof: bool
) -> dict[str, Any]:
    if str(config.get("enable.auto.commit", "false")).lower() == "true":
        raise ValueError("enable.auto.commit must stay false: offsets are committed after state is checkpointed")
    conf: dict[str, Any] = {
        **CLIENT_DEFAULTS,
        "bootstrap.servers": bootstrap_servers,
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        # Partitions that stay put keep flowing during a rebalance; hooks see only what moved.
        "partition.assignment.strategy": "cooperative-sticky",
        # Always on: a partition read to its end tells the daemon that nothing older is coming
        # (its task's event time may follow the others'); with stop_at_end, where to stop.
        "enable.partition.eof": True,
    }
    conf.update(config)
    if str(conf.get("group.protocol", "classic")).lower() == "consumer":
        conf.pop("partition.assignment.strategy", None)  # KIP-848: the broker assigns
    conf["enable.auto.commit"] = False
    conf["enable.auto.offset.store"] = False
    return conf


class KafkaSource:
    """Contract events from Kafka topics, read in a consumer group.

    ``read`` returns what arrived within ``poll_timeout`` seconds, possibly an empty batch (never
    None: a live topic is not exhausted), unless ``stop_at_end`` is set: then it returns None once
    every assigned partition has been read to its end. Values are decoded with ``decoder``;
    rejects carry ``{"topic", "partition", "offset"}``. ``Batch.position`` maps
    ``"topic:partition"`` to the next offset for every assigned partition read so far.

    ``config`` is passed to librdkafka as is (``security.protocol``, ``sasl.*``, ``ssl.*``, ...),
    over the defaults: ``auto.offset.reset=earliest``, ``cooperative-sticky`` assignment.

    ``on_assign(partitions)`` runs when partitions arrive, before they are fetched: a ``seek`` in
    it sets where they start (restore a checkpoint there); ``on_revoke(partitions)`` before they are taken away (commit what was processed for them
    there); ``on_lost`` when they were taken without a revoke (another member may own them now;
    defaults to ``on_revoke``). With the default cooperative assignment each hook receives the
    partitions that moved; with an eager strategy (``range``, ``roundrobin``), all of them.

    Consumer errors raise :class:`BrokerUnavailable` (retry) or :class:`KafkaFatal` (stop); an
    error that arrives with messages is raised by the next ``read``, so no message is dropped.
    Once every broker is down, each ``read`` that brings nothing raises BrokerUnavailable until
    a message arrives or a metadata request (at most one a second) is answered, so "blind" lasts
    as long as the outage. ``errors`` counts every error seen by name, raised or not.

    ``health()`` says, from librdkafka's statistics (``statistics.interval.ms``, 1 s unless set)
    and without a request, whether the brokers answer and how far behind the reads are: a read
    that returns normally says nothing while the partition leaders are stalled (SIGSTOP, a hung
    disk) or gone, and no error arrives before ``socket.timeout.ms`` (60 s). The leaders of the
    assigned partitions answer a fetch at least every ``fetch.wait.max.ms`` (500 ms): silent for
    ``stall_after`` seconds, or without a leader, or with the group coordinator lost, the source
    is unreachable. ``lag()`` is the exact count, with round trips (tools and tests).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        topics: str | Sequence[str],
        decoder: EventDecoder | None = None,
        config: Mapping[str, str] = {},
        poll_timeout: float = 0.5,
        stop_at_end: bool = False,
        commit_timeout: float = 10.0,
        on_assign: PartitionHook | None = None,
        on_revoke: PartitionHook | None = None,
        on_lost: PartitionHook | None = None,
        stall_after: float = 5.0,
    ) -> None:
        if poll_timeout < 0:
            raise ValueError(f"poll_timeout must be >= 0 seconds, got {poll_timeout}")
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ValueError("topics must name at least one topic")
        self.group_id = group_id
        self.poll_timeout = poll_timeout
        self.stop_at_end = stop_at_end
        if not commit_timeout > 0:
            raise ValueError(f"commit_timeout must be > 0 seconds, got {commit_timeout}")
        self.commit_timeout = commit_timeout
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_lost = on_lost
        self.errors: collections.Counter[str] = collections.Counter()
        self._decoder = decoder if decoder is not None else EventDecoder()
        conf = _consumer_config(bootstrap_servers, group_id, config, stop_at_end)
        conf["error_cb"] = self._on_error
        conf["on_commit"] = self._on_commit
        conf.setdefault("statistics.interval.ms", _STATS_INTERVAL_MS)
        conf["stats_cb"] = self._on_stats
        if not stall_after > 0:
            raise ValueError(f"stall_after must be > 0 seconds, got {stall_after}")
        # A healthy leader may take fetch.wait.max.ms to answer an idle fetch.
        self._health = ConsumerHealth(
            stall_after=max(stall_after, 2 * int(conf.get("fetch.wait.max.ms", 500)) / 1000),
            heartbeat=int(conf.get("heartbeat.interval.ms", 3000)) / 1000,
            stats_on=int(conf["statistics.interval.ms"]) > 0,
        )
        self.offset_reset = str(conf.get("auto.offset.reset", "earliest")).lower()
        read_committed = str(conf.get("isolation.level", "read_committed")).lower() != "read_uncommitted"
        self._admin_conf = {**CLIENT_DEFAULTS,
                            **{k: v for k, v in conf.items() if isinstance(k, str) and k.startswith(_ADMIN_KEYS)}}
        strategy = str(conf.get("partition.assignment.strategy", ""))
        self._incremental = "cooperative" in strategy or str(conf.get("group.protocol", "")).lower() == "consumer"
        self._conf = conf
        self.stranded_after = _STRANDED_AFTER
        self._next_rescue = 0.0  # no new client asks the cluster before this (monotonic)
        self._retiring = False  # a stranded consumer is being closed: its callbacks are ignored
        self._consumer = self._new_consumer()
        self._assigned: set[tuple[str, int]] = set()
        self._offsets: dict[tuple[str, int], int] = {}  # next offset of each partition read
        self._starts: dict[tuple[str, int], int] = {}  # seek() targets not yet assigned
        self._eof: set[tuple[str, int]] = set()
        self._eof_at: dict[tuple[str, int], int] = {}  # the offset each end was reached at
        # The broker's word on partition ends: (end offset, monotonic time asked), the
        # partitions waiting for it, the request in flight and when it was sent.
        self._ends = PartitionEnds(self._admin_conf, read_committed)
        self._last: dict[tuple[str, int], int] = {}  # the partitions of the last batch
        self._parts: dict[int, list[Event]] = {}  # the batch being read, by partition number
        self._pending: BrokerUnavailable | KafkaFatal | None = None
        self._exhausted = False
        self._closed = False
        self._buffer: list[Message] = []  # consumed while waiting for a commit, not yet read
        self._issued = self._acked = 0  # asynchronous commits sent and acknowledged
        self._commit_failure: BrokerUnavailable | KafkaFatal | None = None
        self._in_rebalance = False
        self._down: str | None = None  # all brokers down, and no sign of them since
        self._next_probe = 0.0

    def _new_consumer(self) -> Consumer:
        try:
            consumer = Consumer(self._conf)
        except KafkaException as exc:
            raise classify(exc, "creating the consumer") from exc
        consumer.subscribe(self.topics, on_assign=self._assigned_cb, on_revoke=self._revoked_cb, on_lost=self._lost_cb)
        return consumer

    # -- EventSource

    def read(self, max_events: int) -> Batch | None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        if self._closed:
            raise ValueError("read from a closed source")
        self._raise_pending()
        if self._exhausted or (
            self.stop_at_end and not self._buffer and self._assigned and self._eof >= self._assigned
        ):
            self._exhausted = True
            return None
        if self._health.coordless_since is not None:
            self._rescue(time.monotonic())
        if self._buffer:
            msgs = self._buffer[:max_events]
            del self._buffer[:max_events]
        else:
            try:
                msgs = self._consumer.consume(max_events, self.poll_timeout)
            except KafkaException as exc:
                raise classify(exc, "consume") from exc
        events: list[Event] = []
        rejects: list[Rejected] = []
        self._parts = {}
        if msgs:
            errs = list(map(_error, msgs))
            # By type: KafkaError's == against None leaves an exception set (confluent-kafka 2.x).
            if KafkaError in map(type, errs):
                msgs = self._sort_errors(msgs, errs)
                if msgs:
                    self._decode(msgs, events, rejects)
            elif self._decode(msgs, events, rejects) and self._eof:
                self._eof.difference_update(self._last)
        if events or rejects:
            self._health.heard = time.monotonic()
            self._down = None
        else:
            self._raise_pending()
            if self._down is not None:
                self._probe()
        parts, self._parts = self._parts, {}
        return Batch(events, rejects, self.position, parts)

    def commit(self, position: Any) -> None:
        """Commits ``position``'s offsets synchronously, for the partitions still assigned.

        A partition that moved to another member is that member's to commit: committing our
        older offset for it would rewind the new owner after its next restart.

        librdkafka waits for a group coordinator without a deadline of its own (until the session
        times out, 45 s by default) and a blocking commit would stall ``read`` as long, so the
        commit is sent asynchronously and its acknowledgement awaited for ``commit_timeout``
        seconds, keeping messages that arrive meanwhile for the next ``read``. Past the timeout,
        :class:`BrokerUnavailable` is raised while the commit stays in flight; until it ends,
        later commits raise at once (one at a time keeps them in order). A commit that did not
        happen loses nothing: the next one covers it. Called from an ``on_revoke`` hook, the
        commit blocks (the group is in a rebalance, so the coordinator is there).
        """
        wanted = parse_position(position)
        offsets = [TopicPartition(t, p, o) for (t, p), o in wanted.items() if (t, p) in self._assigned]
        for tp in wanted:
            self._starts.pop(tp, None)
        if not offsets:
            return
        if self._in_rebalance:  # inside consume(): only a blocking commit can wait here
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                raise classify(exc, "commit") from exc
            return
        if self._acked < self._issued:
            self._serve(0.0)
            if self._acked < self._issued:
                raise BrokerUnavailable("commit: an earlier commit is still waiting for the group coordinator")
        self._commit_failure = None
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            raise classify(exc, "commit") from exc
        self._issued += 1
        deadline = time.monotonic() + self.commit_timeout
        while self._acked < self._issued:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailable(
                    f"commit: not acknowledged within {self.commit_timeout} s (group coordinator unreachable?)"
                )
            self._serve(min(left, 0.05))
        failure, self._commit_failure = self._commit_failure, None
        if failure is not None:
            raise failure

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()  # leaves the group: on_revoke runs for what we hold
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer: %s", exc)

    def _rescue(self, now: float) -> None:
        """A consumer without a group coordinator for ``stranded_after`` seconds is replaced if a
        new client reaches the cluster (the brokers are fine: the consumer is stuck, see
        ``_STRANDED_AFTER``). Asked at most once per ``stranded_after``."""
        since = self._health.coordless_since
        if since is None or now - since < self.stranded_after or now < self._next_rescue:
            return
        self._next_rescue = now + self.stranded_after
        try:
            answered = bool(AdminClient(self._admin_conf).list_topics(timeout=1.0).brokers)
        except KafkaException:
            answered = False
        if answered:
            self._renew(now - since)

    def _renew(self, coordless_for: float) -> None:
        """Replaces the consumer with a new one in the same group. What it held is lost, as
        after an expired session (``on_lost``); the new consumer is assigned partitions like any
        member joining, and ``on_assign`` says where they start."""
        held = sorted(self._assigned)
        log.warning("the consumer of group %s has had no group coordinator for %.0f s while the cluster "
                    "answers a new client: a new consumer replaces it (held: %s)",
                    self.group_id, coordless_for, ", ".join(f"{t}:{p}" for t, p in held) or "nothing")
        if held:
            self._take_away([TopicPartition(t, p) for t, p in held], self.on_lost or self.on_revoke)
        self._retiring = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the stranded consumer: %s", exc)
        finally:
            self._retiring = False
        # Its commits in flight will never be answered; nothing it read is kept.
        self._issued = self._acked = 0
        self._commit_failure = None
        self._buffer = []
        self._health.start_over()
        self._consumer = self._new_consumer()

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Kafka specifics

    @property
    def position(self) -> dict[str, int]:
        """``{"topic:partition": next offset}`` for each assigned partition read or sought."""
        return {f"{t}:{p}": o for (t, p), o in sorted(self._offsets.items())}

    def at_end(self, partition: int) -> bool:
        """True when every assigned topic's ``partition`` has been read to its end, as the broker
        confirmed within the last ``kafka_health.END_FRESH`` seconds.

        The end-of-partition event says only that the end was reached once: after a stalled
        broker resumes, the flag still stands while a backlog waits in the fetch queue. So the
        broker is asked for the end offsets (ListOffsets, at the consumer's isolation level), off
        the loop: the request is sent here, at most every ``kafka_health.END_EVERY`` seconds, and its answer
        read by a later call; until one fresh enough says the end is where this consumer is, the
        answer is False. No round trip is waited for."""
        mine = [tp for tp in self._assigned if tp[1] == partition]
        if not mine or not all(tp in self._eof for tp in mine) or any(
            m.partition() == partition for m in self._buffer
        ):
            return False
        return self._ends.confirmed({tp: self._eof_at.get(tp, self._offsets.get(tp, -1)) for tp in mine},
                                    time.monotonic())

    def group_metadata(self) -> Any:
        """The consumer's group metadata (member, generation) for a transactional producer's
        ``send_offsets_to_transaction``: offsets sent with a stale one are refused."""
        return self._consumer.consumer_group_metadata()

    def assignment(self) -> Partitions:
        """The partitions this member holds now, sorted."""
        return sorted(self._assigned)

    def seek(self, position: Any) -> None:
        """Resumes from ``position`` (a ``Batch.position``, e.g. from a checkpoint).

        Assigned partitions move at once; the others start there when they are assigned to this
        member (until a commit for them supersedes it).
        """
        wanted = parse_position(position)
        if self._buffer:  # consumed before the seek: not what comes next any more
            self._buffer = [m for m in self._buffer if (m.topic(), m.partition()) not in wanted]
        for tp, offset in wanted.items():
            if tp in self._assigned:
                try:
                    self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
                except KafkaException as exc:
                    raise classify(exc, f"seek {tp[0]}:{tp[1]} to {offset}") from exc
                self._offsets[tp] = offset
                self._eof.discard(tp)
                self._ends.forget(tp)
            else:
                self._starts[tp] = offset
        self._exhausted = False

    def lag(self, timeout: float = 5.0) -> int:
        """Messages in the assigned partitions not yet handed out by ``read`` (from watermarks).

        Asks the brokers; raises :class:`BrokerUnavailable` when they do not answer in time.
        """
        assigned = sorted(self._assigned)
        if not assigned:
            return 0
        try:
            unknown = [TopicPartition(t, p) for t, p in assigned if (t, p) not in self._offsets]
            fallback: dict[tuple[str, int], int] = {}
            if unknown:
                for tp in self._consumer.committed(unknown, timeout=timeout):
                    if tp.offset >= 0:
                        fallback[(tp.topic, tp.partition)] = tp.offset
            total = 0
            for t, p in assigned:
                low, high = self._consumer.get_watermark_offsets(TopicPartition(t, p), timeout=timeout)
                at = self._offsets.get((t, p), fallback.get((t, p), low))
                total += max(0, high - max(at, low))
            return total
        except KafkaException as exc:
            raise classify(exc, "lag") from exc

    @property
    def stall_after(self) -> float:
        """Brokers silent this long are unreachable (seconds)."""
        return self._health.stall_after

    def health(self) -> SourceHealth:
        """Whether the brokers answer and the lag, from the latest statistics: no request."""
        self._health.read(self._assigned, self._offsets)
        return self._health.report(self._down)

    # -- internals

    def _on_stats(self, raw: str) -> None:
        if self._retiring:  # the stranded consumer being closed
            return
        self._health.receive(raw)

    def _decode(self, msgs: list[Message], events: list[Event], rejects: list[Rejected]) -> bool:
        values = list(map(_value, msgs))
        if None in values:  # a tombstone or an empty message
            values = [b"" if v is None else v for v in values]
        decoded = self._decoder.decode_lines(values)
        clean = Rejected not in map(type, decoded)
        if not clean:
            for msg, ev in zip(msgs, decoded):
                if ev.__class__ is Rejected:
                    position = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
                    rejects.append(ev._replace(position=position))
                else:
                    events.append(ev)
        else:
            events.extend(decoded)
        parts = list(map(_partition, msgs))
        if clean and parts.count(parts[0]) == len(parts):  # one partition: C-level all the way
            self._parts.setdefault(parts[0], []).extend(decoded)
        else:
            for p, ev in zip(parts, decoded):
                if ev.__class__ is not Rejected:
                    self._parts.setdefault(p, []).append(ev)
        # dict() keeps the last offset of each partition: message order within one is preserved.
        last = dict(zip(zip(map(_topic, msgs), parts), map(_offset, msgs)))
        offsets = self._offsets
        for tp, offset in last.items():
            offsets[tp] = offset + 1
        self._last = last
        return True

    def _sort_errors(self, msgs: list[Message], errs: list[KafkaError | None]) -> list[Message]:
        """Keeps the data messages; notes partition ends; holds other errors for raising."""
        data: list[Message] = []
        for msg, err in zip(msgs, errs):
            if err is None:
                data.append(msg)
                self._eof.discard((msg.topic(), msg.partition()))
            elif err.code() == _EOF:
                self._eof.add((msg.topic(), msg.partition()))
                self._eof_at[(msg.topic(), msg.partition())] = msg.offset()
                self._health.heard = time.monotonic()  # a fetch answered: nothing more there
            else:
                self._on_error(err)
        return data

    def _probe(self) -> None:
        """After "all brokers down" and no message since: are they back? Raises while not.

        librdkafka says when the brokers go, not when they return, and an idle topic brings no
        message to show it; a metadata request does, at most once a second.
        """
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + _PROBE_INTERVAL
            topic = next((t for t in self.topics if not t.startswith("^")), None)
            try:
                if self._consumer.list_topics(topic, timeout=_PROBE_TIMEOUT).brokers:
                    self._down = None
                    return
            except KafkaException:
                pass
        raise BrokerUnavailable(f"still unreachable: {self._down}", KafkaError._ALL_BROKERS_DOWN, "_ALL_BROKERS_DOWN")

    def _serve(self, timeout: float) -> None:
        """Runs librdkafka's callbacks (commit results, rebalances), keeping what arrives."""
        room = max(1, _BUFFER_LIMIT - len(self._buffer))
        try:
            msgs = self._consumer.consume(room, timeout)
        except KafkaException as exc:
            raise classify(exc, "consume") from exc
        self._buffer.extend(msgs)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if self._retiring:  # the stranded consumer being closed
            return
        self._acked += 1
        if err is None:
            err = next((tp.error for tp in partitions if tp.error is not None), None)
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.errors[err.name()] += 1
            self._commit_failure = classify(err, "commit")

    def _on_error(self, err: KafkaError) -> None:
        if self._retiring:  # the stranded consumer being closed
            return
        self.errors[err.name()] += 1
        if err.code() in _TRANSIENT and not err.fatal():
            log.info("kafka: %s", err.str())
            return
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._down = err.str()
            self._next_probe = time.monotonic() + _PROBE_INTERVAL
        failure = classify(err, f"consumer {self.group_id}")
        if self._pending is None or isinstance(failure, KafkaFatal):
            self._pending = failure

    def _raise_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending

    def _assigned_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._retiring:
            return
        added = [(tp.topic, tp.partition) for tp in partitions]
        try:
            if self.on_assign is not None and added:
                # Before fetching starts, so a seek() in the hook sets where they begin.
                self._in_rebalance = True
                self.on_assign(sorted(added))
        finally:
            self._in_rebalance = False
            for tp in partitions:
                start = self._starts.pop((tp.topic, tp.partition), None)
                if start is not None:
                    tp.offset = start
                    self._offsets[(tp.topic, tp.partition)] = start
            if self._incremental:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
                self._assigned.clear()
            self._assigned.update(added)
            self._eof.difference_update(added)
            self._exhausted = False

    def _revoked_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._retiring:
            return
        self._take_away(partitions, self.on_revoke)

    def _lost_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._retiring:
            return
        self._take_away(partitions, self.on_lost or self.on_revoke)

    def _take_away(self, partitions: list[TopicPartition], hook: PartitionHook | None) -> None:
        gone = sorted((tp.topic, tp.partition) for tp in partitions)
        self._in_rebalance = True
        try:
            if hook is not None and gone:
                hook(gone)
        finally:
            self._in_rebalance = False
            if self._buffer:  # the new owner reads these
                lost = set(gone)
                self._buffer = [m for m in self._buffer if (m.topic(), m.partition()) not in lost]
            for tp in gone:
                self._assigned.discard(tp)
                self._offsets.pop(tp, None)
                self._eof.discard(tp)
                self._eof_at.pop(tp, None)
                self._ends.forget(tp)


# ---------------------------------------------------------------------------------------------
# Dead letters


def _source_header(position: Any) -> str:
    if isinstance(position, Mapping) and {"topic", "partition", "offset"} <= position.keys():
        return f"{position['topic']}/{position['partition']}/{position['offset']}"
    return msgspec.json.encode(position).decode() if position is not None else ""


class KafkaDeadLetter:
    """Produces each rejected input, raw, to ``topic`` with headers ``rollbackd-reason``,
    ``rollbackd-detail`` and ``rollbackd-source`` (``topic/partition/offset`` of the input, or
    the JSON of a non-Kafka position). An ``oversize`` input carries only its first 4 KiB.

    ``flush`` waits until every message put so far is acknowledged (``acks=all``) and raises
    :class:`BrokerUnavailable` if some are not within ``flush_timeout``. The checkpoint that
    called it is then skipped (the dead letters must be durable before their position is
    committed) and the next one tries again; 10 s keeps the loop's wait well inside the
    30 s heartbeat limit of ``/healthz`` during a broker outage.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        config: Mapping[str, str] = {},
        flush_timeout: float = 10.0,
    ) -> None:
        self.topic = topic
        self.flush_timeout = flush_timeout
        self.count = 0
        conf: dict[str, Any] = {
            **CLIENT_DEFAULTS,
            "bootstrap.servers": bootstrap_servers,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
        conf.update(config)
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise classify(exc, "creating the dead-letter producer") from exc
        self._failures: list[KafkaError] = []
        self._closed = False

    def put(self, rejected: Rejected) -> None:
        headers = [
            ("rollbackd-reason", rejected.reason.encode()),
            ("rollbackd-detail", rejected.detail.encode("utf-8", "backslashreplace")),
            ("rollbackd-source", _source_header(rejected.position).encode()),
        ]
        _produce(self._producer, self.topic, rejected.raw, None, headers, self._delivered)
        self.count += 1

    def flush(self) -> None:
        left = self._producer.flush(self.flush_timeout)
        failures, self._failures = self._failures, []
        if failures:
            raise classify(failures[0], f"dead-letter topic {self.topic}: {len(failures)} message(s) not delivered")
        if left:
            raise BrokerUnavailable(f"dead-letter topic {self.topic}: {left} message(s) unacknowledged after {self.flush_timeout} s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()

    def __enter__(self) -> KafkaDeadLetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failures.append(err)


def _produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes | None,
    headers: list[tuple[str, bytes]] | None,
    on_delivery: Callable[[KafkaError | None, Message], None] | None,
) -> None:
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.05)
            continue
        except KafkaException as exc:
            raise classify(exc, f"produce to {topic}") from exc
        producer.poll(0)
        return


# ---------------------------------------------------------------------------------------------
# Recordings


def record(
    bootstrap_servers: str,
    topics: str | Sequence[str],
    out_path: str,
    duration: float | None = None,
    max_events: int | None = None,
    *,
    from_beginning: bool = True,
    config: Mapping[str, str] = {},
    clock: Clock | None = None,
) -> int:
    """Writes the raw values of ``topics`` to a JSON Lines recording (gzip if ``.gz``).

    Stops after ``duration`` seconds, after ``max_events`` messages, or, when neither is given,
    at the end of every partition. Messages of one partition keep their order; partitions are
    interleaved as they arrive. Reads in a throw-away group and commits nothing, so it never
    moves a daemon's offsets. A value that spans lines (pretty-printed JSON) is written compact,
    since a recording holds one value per line. Returns the number of messages written.
    """
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if max_events is not None and max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    clock = clock if clock is not None else WallClock()
    topics = [topics] if isinstance(topics, str) else list(topics)
    conf = _consumer_config(
        bootstrap_servers,
        f"rollbackd-record-{uuid.uuid4().hex[:12]}",
        {"auto.offset.reset": "earliest" if from_beginning else "latest", **config},
        eof=duration is None,
    )
    consumer = Consumer(conf)
    assigned: set[tuple[str, int]] = set()
    eof: set[tuple[str, int]] = set()

    def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
        assigned.update((tp.topic, tp.partition) for tp in parts)

    consumer.subscribe(topics, on_assign=on_assign)
    deadline = clock.now() + duration if duration is not None else None
    written = 0
    out = _open_out(out_path)
    try:
        while True:
            if max_events is not None and written >= max_events:
                break
            if deadline is not None and clock.now() >= deadline:
                break
            if deadline is None and assigned and eof >= assigned:
                break
            want = 10_000 if max_events is None else min(10_000, max_events - written)
            lines = []
            for msg in consumer.consume(want, 0.5):
                err = msg.error()
                if err is None:
                    eof.discard((msg.topic(), msg.partition()))
                    lines.append(_one_line(msg.value() or b""))
                elif err.code() == _EOF:
                    eof.add((msg.topic(), msg.partition()))
                elif err.code() not in _TRANSIENT:
                    raise classify(err, "record")
            if lines:
                out.write(b"\n".join(lines) + b"\n")
                written += len(lines)
    finally:
        out.close()
        consumer.close()
    return written


class _GzipOut:
    """A gzip file whose header carries no name and no time: same messages, same bytes."""

    def __init__(self, path: str) -> None:
        self._raw = open(path, "wb")
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)

    def write(self, data: bytes) -> None:
        self._gz.write(data)

    def close(self) -> None:
        self._gz.close()
        self._raw.close()


def _open_out(path: str) -> Any:
    return _GzipOut(path) if path.endswith(".gz") else open(path, "wb")


def _one_line(value: bytes) -> bytes:
    if b"\n" not in value and not value.endswith(b"\r"):
        return value
    try:
        return msgspec.json.format(value, indent=-1)
    except msgspec.DecodeError:
        return value.replace(b"\r", b" ").replace(b"\n", b" ")


def _iter_lines(path: str) -> Iterable[bytes]:
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
        first = True
        for line in stream:
            if first:
                first = False
                if line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
            line = line.rstrip(b"\n")
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.strip():
                yield line


def publish(
    bootstrap_servers: str,
    topic: str,
    recording_path: str,
    speed: float | None = None,
    *,
    config: Mapping[str, str] = {},
    clock: Clock | None = None,
    sleep: Callable[[float], object] = time.sleep,
) -> int:
    """Produces a recording's lines to ``topic``, keyed by each event's deployment.

    ``speed`` 1.0 keeps the recording's event-time gaps in real time, 10.0 plays ten times
    faster, None as fast as the broker takes it. Lines that break the contract are sent too
    (unkeyed, without pacing), so a drill exercises the dead-letter path. Keys are hashed with
    Java's partitioner (murmur2), so a deployment lands where a Java producer would put it.
    Returns the number of messages acknowledged.
    """
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0 (1.0 = real time) or None (as fast as possible), got {speed}")
    clock = clock if clock is not None else WallClock()
    conf: dict[str, Any] = {
        **CLIENT_DEFAULTS,
        "bootstrap.servers": bootstrap_servers,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 20,
        "partitioner": "murmur2_random",
    }
    conf.update(config)
    producer = Producer(conf)
    failures: list[KafkaError] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(err)

    decode = EventDecoder().decode
    keys: dict[str, bytes] = {}
    first_ts: float | None = None
    started = clock.now()
    sent = 0
    for line in _iter_lines(recording_path):
        ev = decode(line)
        key = None
        if ev.__class__ is not Rejected:
            key = keys.get(ev.deployment)  # type: ignore[union-attr]
            if key is None:
                key = keys[ev.deployment] = ev.deployment.encode()  # type: ignore[union-attr]
            if speed is not None:
                if first_ts is None:
                    first_ts = ev.ts  # type: ignore[union-attr]
                wait = started + (ev.ts - first_ts) / speed - clock.now()  # type: ignore[union-attr]
                if wait > 0:
                    producer.poll(0)
                    sleep(wait)
        _produce(producer, topic, line, key, None, delivered)
        sent += 1
        if failures:
            break
    left = producer.flush(60.0)
    if failures:
        raise classify(failures[0], f"publish to {topic}: {len(failures)} message(s) not delivered")
    if left:
        raise BrokerUnavailable(f"publish to {topic}: {left} message(s) unacknowledged after 60 s")
    return sent
