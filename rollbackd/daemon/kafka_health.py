"""What a Kafka consumer knows of the brokers besides the messages: its health, and where the
partitions end.

librdkafka reports every ``statistics.interval.ms`` (the brokers it knows and their state, each
held partition's leader and offsets, the consumer group's state). :class:`ConsumerHealth` keeps
the latest report and reads it when asked: when the brokers were last heard, what is wrong now,
the lag, and since when the group has had no coordinator (``KafkaSource`` replaces a consumer
stuck without one). No request to any broker.

:class:`PartitionEnds` asks the brokers where partitions end (ListOffsets) off the loop: an
end-of-partition event says only that the end was reached once.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping

import msgspec
from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from rollbackd.daemon.blindness import SourceHealth

__all__ = ["ConsumerHealth", "PartitionEnds", "END_EVERY", "END_FRESH"]

log = logging.getLogger("rollbackd.kafka")

# A partition's end as the broker says it (ListOffsets): asked at most this often (seconds), and
# believed for this long after it was asked. A flag set by an end-of-partition event says only
# that the end was reached once; after a stall it is stale while a backlog waits behind it.
END_EVERY = 0.5
END_FRESH = 1.5
_END_TIMEOUT = 2.0


class ConsumerHealth:
    """What the latest statistics report says (times are monotonic seconds).

    ``stall_after``: brokers silent this long are unreachable; ``heartbeat``: the group's
    heartbeat interval (a coordinator answers one that often); ``stats_on``: whether librdkafka
    reports at all (without reports the brokers are taken as reachable)."""

    def __init__(self, stall_after: float, heartbeat: float, stats_on: bool) -> None:
        self.stall_after = stall_after
        self.heartbeat = heartbeat
        self.stats_on = stats_on
        self._latest: tuple[float, str] | None = None  # the latest report not read yet
        self.heard = time.monotonic()  # the brokers were last heard then
        self.problem = ""  # what is wrong, as of the last report read
        self.lag: int | None = None
        self.lag_at = 0.0  # when the lag was as measured
        self.coordless_since: float | None = None  # the group has had no coordinator since

    def receive(self, raw: str) -> None:
        """librdkafka's ``stats_cb``: kept, read in :meth:`read` (reports pile up while the loop
        is busy; only the latest counts)."""
        self._latest = (time.monotonic(), raw)

    def start_over(self) -> None:
        """A new consumer: nothing the old one reported holds."""
        self._latest = None
        self.coordless_since = None
        self.heard = time.monotonic()

    def read(self, assigned: Iterable[tuple[str, int]], offsets: Mapping[tuple[str, int], int]) -> None:
        """Reads the latest report, if one came, for the partitions ``assigned`` and the next
        offsets ``offsets`` read of them."""
        if self._latest is None:
            return
        at, raw = self._latest
        self._latest = None
        try:
            self._read(at, msgspec.json.decode(raw), sorted(assigned), offsets)
        except (msgspec.DecodeError, TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("unreadable librdkafka statistics: %s", exc)

    def report(self, down: str | None) -> SourceHealth:
        """The source's health now; ``down``: librdkafka said every broker is down (and no sign
        of them since)."""
        now = time.monotonic()
        silent = now - self.heard
        reachable = not self.stats_on or down is None and silent <= self.stall_after
        detail = down or self.problem or f"the brokers have been silent for {silent:.0f} s"
        return SourceHealth(
            reachable=reachable, silent_for=0.0 if reachable else silent, detail="" if reachable else detail,
            lag=self.lag, lag_age=now - self.lag_at if self.lag is not None else None,
        )

    def _read(self, at: float, stats: dict[str, Any], assigned: list[tuple[str, int]],
              offsets: Mapping[tuple[str, int], int]) -> None:
        """One statistics report: when the brokers were last heard, what is wrong, and the lag.

        Only evidence moves ``heard``: every held partition's leader connected and answering
        (the longest silence among them counts), or, with nothing held, the group coordinator
        answering heartbeats. A report without such evidence (leaders unknown, coordinator being
        looked for) leaves it, so the silence grows until ``stall_after``.
        """
        listed = list(stats.get("brokers", {}).values())
        brokers = {b.get("nodeid"): b for b in listed if b.get("nodeid", -1) >= 0}
        topics = stats.get("topics", {})
        problems: list[str] = []
        quiet = 0.0  # the longest any of them has been silent, as of this report
        lag: int | None = 0 if assigned else None  # nothing held: nothing to be behind on
        for t, p in assigned:
            part = topics.get(t, {}).get("partitions", {}).get(str(p))
            leader = brokers.get(part.get("leader", -1)) if part is not None else None
            if leader is None:
                problems.append(f"partition {t}:{p} has no reachable leader")
                continue
            idle = leader.get("rxidle", -1)
            if leader.get("state") != "UP" or idle < 0:
                problems.append(f"broker {leader.get('name')} is {leader.get('state')}")
                continue
            quiet = max(quiet, idle / 1e6)
            high = part["ls_offset"] if part.get("ls_offset", -1) >= 0 else part.get("hi_offset", -1)
            at_offset = offsets.get((t, p))
            if at_offset is None:  # not read yet: where the consumer will start
                at_offset = next((part[k] for k in ("app_offset", "committed_offset") if part.get(k, -1) >= 0),
                                 part.get("lo_offset", -1))
            if high < 0 or lag is None:
                lag = None  # the leader has not said yet
            else:
                lag += max(0, high - max(at_offset, part.get("lo_offset", 0), 0))
        group = stats.get("cgrp")
        if not assigned:
            # A healthy coordinator answers a heartbeat every heartbeat.interval.ms. One that
            # holds a JoinGroup is in a rebalance: no partition is read meanwhile either.
            coordinator = next((b for b in listed if b.get("name") == "GroupCoordinator"), None)
            if coordinator is None or coordinator.get("state") != "UP" or coordinator.get("rxidle", -1) < 0:
                problems.append("no partition assigned and no group coordinator connected")
            else:
                quiet = max(0.0, coordinator["rxidle"] / 1e6 - self.heartbeat)
        self.coordless_since = None
        if group is not None and group.get("state") != "up":
            self.coordless_since = at - group.get("stateage", 0) / 1e3
            problems.append(f"no group coordinator ({group.get('state')} for {group.get('stateage', 0) / 1e3:.0f} s)")
        silence = []
        if quiet > self.stall_after:
            silence.append(f"partition leaders silent for {quiet:.0f} s" if assigned else
                           f"no partition assigned, group coordinator silent for {quiet:.0f} s (join state "
                           f"{(group or {}).get('join_state', '?')}: unreachable, or holding a rebalance "
                           "for a member that left)")
        self.problem = "; ".join(problems + silence)
        if problems:
            return  # no evidence in this report
        self.heard = max(self.heard, at - quiet)  # silent ones too: of when they last answered
        if not silence and lag is not None:  # as of the leaders' last answer
            self.lag, self.lag_at = lag, at - quiet


class PartitionEnds:
    """The brokers' word on where partitions end, asked with an admin client of ``admin_conf``
    at the consumer's isolation level (``read_committed``: the last stable offset)."""

    def __init__(self, admin_conf: Mapping[str, Any], read_committed: bool) -> None:
        self._admin_conf = dict(admin_conf)
        self._level = IsolationLevel.READ_COMMITTED if read_committed else IsolationLevel.READ_UNCOMMITTED
        self._admin: AdminClient | None = None
        self._ends: dict[tuple[str, int], tuple[int, float]] = {}  # (end offset, monotonic time asked)
        self._want: set[tuple[str, int]] = set()  # waiting for the next request
        self._asking: dict[Any, Any] = {}  # the request in flight: a future per partition
        self._asked_at = -1e9

    def confirmed(self, reached: Mapping[tuple[str, int], int], now: float) -> bool:
        """True when the broker said, within the last ``END_FRESH`` seconds, that each partition
        ends where ``reached`` says it was read to. Otherwise asks (at most every ``END_EVERY``
        seconds, answered by a later call): never waits for a round trip."""
        self._collect()
        confirmed = True
        for tp, offset in reached.items():
            end = self._ends.get(tp)
            if end is None or now - end[1] > END_FRESH or end[0] > offset:
                confirmed = False
                self._want.add(tp)
        if not confirmed:
            self._ask(now)
        return confirmed

    def forget(self, tp: tuple[str, int]) -> None:
        """What was said of ``tp`` no longer holds (sought elsewhere, or taken away)."""
        self._ends.pop(tp, None)

    def _ask(self, now: float) -> None:
        if self._asking or now - self._asked_at < END_EVERY or not self._want:
            return
        if self._admin is None:
            self._admin = AdminClient(self._admin_conf)
        wanted = {TopicPartition(t, p): OffsetSpec.latest() for t, p in sorted(self._want)}
        try:
            self._asking = self._admin.list_offsets(wanted, isolation_level=self._level, request_timeout=_END_TIMEOUT)
        except (KafkaException, ValueError, TypeError) as exc:
            log.info("end offsets not asked: %s", exc)
            self._asking = {}
        self._asked_at = now
        self._want.clear()

    def _collect(self) -> None:
        if not self._asking or not all(f.done() for f in self._asking.values()):
            return
        failed = None
        for tp, future in self._asking.items():
            try:
                self._ends[(tp.topic, tp.partition)] = (future.result().offset, self._asked_at)
            except KafkaException as exc:  # not answered: the end stays unconfirmed
                failed = f"{tp.topic}:{tp.partition}: {exc}"
        self._asking = {}
        if failed is not None:
            # e.g. FENCED_LEADER_EPOCH after a broker restart: the admin client's metadata is
            # stale and it keeps asking the old leader epoch; a new client looks afresh.
            log.info("end offsets unknown (%s): asking with a new client", failed)
            self._admin = None
