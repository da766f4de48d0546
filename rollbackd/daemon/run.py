"""The live daemon: the replay core on a live source, with checkpoints and a watchful eye.

Exactly-once effect on state: the source's offsets are committed only after the state they
produced is in a checkpoint (atomic file replace). On start the daemon restores the
checkpoint, rewinds the decision log and the re-derivable ledger rows to it, and seeks the
source to its offsets, so the events after it are processed again and reach the same
decisions. Actions go through the ledger's outbox: a rollback or notice that was already
finished is not done again (its recorded outcome is reused); one started but not finished is
retried with the same idempotency key.

Time: decisions run on event time (the watermark). The wall clock only schedules: polls,
checkpoints, the idle tick that lets event time follow the wall clock when no events arrive
(so windows still close and a stopped stream raises its no-data alert), and the "monitoring
blind" notice when the source cannot be read.

Blindness (``daemon/blindness.py``) is a state the loop steps on a timer: every iteration, and
every second of a backoff wait, so no backoff postpones the notice. ``daemon/watch.py`` takes
those looks (:class:`~rollbackd.daemon.watch.Watch`): the consumer lag is read from the source
without a round trip (librdkafka's statistics for Kafka) and kept, with its time, for /metrics: a
scrape never talks to a broker. The blind state is saved with each checkpoint, so a restart
resolves (or keeps) the notice it had raised. The daemon's own notices (blind, an effect queue
full, the digest) go through the effect lanes (:class:`~rollbackd.daemon.watch.OwnNotices`).

Shutdown is bounded by ``stop_timeout`` from the moment ``stop()`` is called: the last
checkpoint file is always written; the offset commit is skipped while the brokers do not answer,
and a source whose ``close`` hangs (a consumer leaving a group whose coordinator is gone) is
left behind when the time is up.

Tasks: a partitioned source (Kafka) gets one pipeline per partition number, as Kafka Streams
keeps one task per partition: each has its own event time (a partition that lags does not make
another's events late) and its own state, so a partition can move to another instance with its
state (``state`` store, a compacted Kafka topic: see ``daemon/scaleout.py``). A task whose
partitions are read to their end (as the broker confirms it: not a flag set before a stall)
follows the most advanced task's event time: nothing older can come for it, so its windows close
(and a stopped stream raises no-data) as in a replay.

Outages change nothing. With a state store, state, decisions and offsets commit in one Kafka
transaction; a transaction that does not commit (refused: this instance lost its partitions; not
answered; aborted after a lost session) leaves the in-memory state ahead of what is committed,
so before reading on the loop settles it and rewinds every task to its committed state (reloaded,
its partitions sought there): re-read events are counted once. ``daemon/grouptasks.py``
(:class:`~rollbackd.daemon.grouptasks.GroupTasks`) does this, and takes over and hands over tasks
as partitions move. With a checkpoint file, partitions assigned again after a lost session resume
at the position the in-memory state covers, not at a committed offset that a failed commit left
behind.
"""

from __future__ import annotations

import collections
import gc
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from rollbackd.actions.base import ActionResult, Notice, Notifier, NullNotifier, RollbackBackend
from rollbackd.actions.delivery import Delivery
from rollbackd.daemon.audit import Anchoring
from rollbackd.daemon.checkpoints import Checkpoint, CheckpointWriter, Written
from rollbackd.daemon.clock import Clock, WallClock
from rollbackd.daemon.executor import DEFAULT_LANE_LIMIT, LaneExecutor
from rollbackd.daemon.grouptasks import GroupTasks
from rollbackd.daemon.notices import resume_open
from rollbackd.daemon.pipeline import Edges, Pipeline
from rollbackd.daemon.replay import push_human_input
from rollbackd.daemon.sources import EventSource
from rollbackd.daemon.watch import OwnNotices, Watch
from rollbackd.errors import Recoverable

__all__ = ["RunSettings", "Checkpoint", "Daemon", "Task", "PipelinesView"]

log = structlog.get_logger("rollbackd.run")


@dataclass(frozen=True, slots=True)
class RunSettings:
    checkpoint_path: str = "rollbackd.checkpoint"
    checkpoint_every: float = 5.0  # wall seconds between checkpoints (and offset commits)
    batch_size: int = 5000
    idle_after: float = 30.0  # wall seconds without events before event time follows the wall
    blind_after: float = 30.0  # wall seconds blind (cannot read, or lag over the limit) before the notice
    lag_limit: int | None = None  # consumer lag (messages) that also counts as blind
    backoff_max: float = 10.0
    # From stop() to run() returning, whatever the brokers do (Kubernetes' grace period is 30 s).
    stop_timeout: float = 25.0
    # Sources that measure their lag only when asked (a round trip) are asked this often, by the
    # loop; sources with a health() report keep it current themselves.
    lag_every: float = 5.0
    # A partition read to its end that brought nothing for this long (wall seconds) lets its
    # task's event time follow the most advanced task's: a short wait, so that a partition
    # merely read faster than it is written is not taken for a silent one.
    partition_idle_after: float = 2.0
    # Calls (notices) waiting per deployment before a further notice is dropped and said to be.
    effect_lane_limit: int = DEFAULT_LANE_LIMIT
    # Wall seconds at shutdown for the calls in flight; the rest stay in the checkpoint.
    effects_stop_timeout: float = 10.0
    # Wall seconds between reads of the silences and approvals recorded in the ledger.
    human_input_every: float = 1.0

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "idle_after", "blind_after", "backoff_max", "partition_idle_after",
                     "stop_timeout", "lag_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(slots=True)
class Task:
    """One partition's pipeline and the wall-clock facts its event time needs."""

    key: int
    pipeline: Pipeline
    last_event_wall: float | None = None
    event_time_at_last_event: float = -math.inf

    @property
    def watermark(self) -> float:
        return self.pipeline.watermark


class PipelinesView:
    """The tasks' pipelines read as one, for /metrics, /incidents and the gate."""

    def __init__(self, daemon: "Daemon") -> None:
        self._daemon = daemon

    def _all(self) -> list[Pipeline]:
        return [t.pipeline for _, t in sorted(self._daemon.tasks.items())] or [self._daemon.prototype]

    def __getattr__(self, name: str) -> Any:  # config, lateness, edges, silences: shared
        return getattr(self._daemon.prototype, name)

    @property
    def counters(self) -> Any:
        return sum((p.counters for p in self._all()), collections.Counter())

    @property
    def rejects(self) -> Any:
        return sum((p.rejects for p in self._all()), collections.Counter())

    @property
    def max_event_time(self) -> float:
        return max(p.max_event_time for p in self._all())

    @property
    def watermark(self) -> float:
        return max(p.watermark for p in self._all())

    def _merged(self, name: str) -> dict[Any, Any]:
        """Every task's ``name`` dict merged into one, in task order."""
        out: dict[Any, Any] = {}
        for p in self._all():
            out.update(getattr(p, name))
        return out

    @property
    def alerts(self) -> dict[Any, Any]:
        return self._merged("alerts")

    @property
    def joiner(self) -> Any:
        return _JoinersView([p.joiner for p in self._all()])

    @property
    def book(self) -> Any:
        books = [p.book for p in self._all()]
        return _BooksView({k: v for b in books for k, v in dict(b.open).items()},
                          [i for b in books for i in list(b.closed)])

    @property
    def versions(self) -> dict[Any, Any]:
        return self._merged("versions")

    @property
    def awaiting(self) -> dict[Any, Any]:  # rollbacks waiting for approval (Slack's Approve button)
        return self._merged("awaiting")

    def incidents(self) -> list[Any]:
        return sorted((i for p in self._all() for i in p.incidents()), key=lambda i: (i.opened_at, i.id))

    def summary(self) -> dict[str, Any]:
        parts = [p.summary() for p in self._all()]
        out: dict[str, Any] = {}
        for part in parts:
            for key, value in part.items():
                if isinstance(value, dict):
                    acc = out.setdefault(key, {})
                    for k, v in value.items():
                        acc[k] = acc.get(k, 0) + v if isinstance(v, (int, float)) else v
                elif isinstance(value, list):
                    out[key] = sorted([*out.get(key, []), *value])
                else:
                    out[key] = out.get(key, 0) + value
        return out


@dataclass
class _BooksView:
    open: dict[Any, Any]
    closed: list[Any]


class _JoinersView:
    def __init__(self, joiners: list[Any]) -> None:
        self._joiners = joiners

    def __len__(self) -> int:
        return sum(len(j) for j in self._joiners)

    @property
    def stats(self) -> Any:
        return _StatsView([j.stats for j in self._joiners])


class _StatsView:
    def __init__(self, stats: list[Any]) -> None:
        self._stats = stats

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self._stats:
            for k, v in s.to_record().items():
                out[k] = out.get(k, 0) + v if isinstance(v, (int, float)) else v
        return out

    def evictions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self._stats:
            for k, v in s.evictions().items():
                out[k] = out.get(k, 0) + v
        return out


class Daemon:
    """Drives a pipeline per source partition (one for an unpartitioned source) until ``stop()``.

    ``pipeline`` is the first task's pipeline; ``make_pipeline`` builds the others (default: a
    pipeline with the same config, edges and silences). With a ``state`` store (a compacted
    Kafka topic, :class:`~rollbackd.daemon.scaleout.GroupState`), tasks are checkpointed
    there, one record per partition, and restored when the partition is assigned to this
    instance; without one, every task goes into one checkpoint file.

    Its parts: ``group`` (:class:`~rollbackd.daemon.grouptasks.GroupTasks`: the state store's
    transactions and partitions moving), ``watch`` (:class:`~rollbackd.daemon.watch.Watch`:
    blindness and lag) and ``own`` (:class:`~rollbackd.daemon.watch.OwnNotices`: its own notices).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        source: EventSource,
        *,
        settings: RunSettings = RunSettings(),
        ledger: Any = None,
        decisions: Any = None,
        notifier: Notifier | None = None,
        clock: Clock | None = None,
        wait: Callable[[float], bool] | None = None,
        name: str = "rollbackd",
        make_pipeline: Callable[[], Pipeline] | None = None,
        state: Any = None,
        anchoring: Anchoring | None = None,
        reloads: Any = None,
    ) -> None:
        self.prototype = pipeline
        self._unused: Pipeline | None = pipeline
        self.make_pipeline = make_pipeline or (
            lambda: Pipeline(pipeline.config, pipeline.edges, pipeline.silences)
        )
        self.source = source
        self.settings = settings
        self.ledger = ledger
        self.decisions = decisions
        self.notifier = notifier
        self.clock = clock or WallClock()
        self.state = state
        # Publishes the ledger's chain heads once a checkpoint covers them (see daemon/audit.py).
        self.anchoring = anchoring
        # SIGHUP (or a changed file) reloads the rules between batches (daemon/reload.py).
        self.reloads = reloads
        self.tasks: dict[int, Task] = {}
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self.name = name
        self.ready = threading.Event()  # set once the checkpoint is restored
        self._stop_at: float | None = None  # monotonic time stop() was called
        self._committed: Any = None  # the position last committed (checkpoint file)
        self.events = 0
        self._position: Any = None
        self._last_checkpoint = self.clock.now()
        # When the loop last showed it is moving (/healthz fails when this gets old): set at each
        # iteration, whose waits (a poll, a backoff) are bounded, and between a checkpoint's waits.
        self.last_beat = self.clock.now()
        self.checkpoint_seconds: float | None = None  # the last checkpoint's, and its snapshots' size
        self.checkpoint_bytes: int | None = None
        # Without a state store the checkpoint file is encoded and written on a thread of its
        # own: the loop only freezes the tasks (daemon/checkpoints.py), and commits the offsets
        # a checkpoint covers once the writer reports it durable.
        self._writer = CheckpointWriter(settings.checkpoint_path) if state is None else None
        self._durable_marks: dict[str, dict[str, int]] = {}  # position key -> ledger marks in flight
        self.view = PipelinesView(self)
        # Effects run off this thread, one lane per deployment; results come back in step().
        self.effects = LaneExecutor(Delivery(pipeline.edges), lane_limit=settings.effect_lane_limit,
                                    on_full=lambda deployment, limit: self.own.effects_full(deployment, limit))
        pipeline.executor = self.effects.bind(pipeline)
        # The daemon's own notices (blind, effect queue full, the digest) go through the same
        # lanes, to its own notifier, recorded in the ledger but not in the decision log.
        own = Edges(notifier=notifier or NullNotifier(), backend_for=_no_backend,
                    recorder=ledger if ledger is not None else pipeline.edges.recorder)
        self.own = OwnNotices(self.effects, own, name, self.clock)
        # Can the daemon read, how far behind is it: the blind state, its notice, the lag.
        self.watch = Watch(source, blind_after=settings.blind_after, lag_limit=settings.lag_limit,
                           lag_every=settings.lag_every, name=name, own=self.own, notify=notifier is not None)
        self._human_input_at = -math.inf
        # With a state store: transactions, rewinds, partitions moving (daemon/grouptasks.py).
        self.group = GroupTasks(self)
        hooks: tuple[tuple[str, Callable[[list[tuple[str, int]]], None]], ...] = (
            (("on_assign", self.group.assigned), ("on_revoke", self.group.revoked), ("on_lost", self.group.lost))
            if state is not None else
            # One instance, a checkpoint file: partitions that come back after a lost session or
            # a revoke resume where the in-memory state is, not at an older committed offset.
            (("on_assign", self._resume_where_state_is),))
        for hook, fn in hooks:
            if hasattr(source, hook):
                setattr(source, hook, fn)

    @property
    def pipeline(self) -> Any:
        """The tasks' pipelines read as one (for /metrics, /incidents, the gate, the summary)."""
        return self.view

    def task(self, key: int) -> Task:
        task = self.tasks.get(key)
        if task is None:
            pipeline, self._unused = (self._unused, None) if self._unused is not None else (self.make_pipeline(), None)
            pipeline.executor = self.effects.bind(pipeline)
            if self._writer is not None:
                pipeline.joiner.note_changes()  # freeze() takes the join buffer's changes
            push_human_input(pipeline)
            task = self.tasks[key] = Task(key, pipeline)
        return task

    # Control -----------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop_at is None:
            # Monotonic: the shutdown budget must not depend on an injected (test or event) clock.
            self._stop_at = time.monotonic()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def replace_rules(self, config: Any) -> Any:
        """Every pipeline (the tasks', and the one kept for the next task) goes on under
        ``config``'s rules: see :meth:`Pipeline.replace_rules`. All or none: a config one
        pipeline refuses, all refuse (they run the same rules), before any has changed.
        Returns the change (the same for each)."""
        now = self.clock.now()
        lead = max((t.watermark for t in self.tasks.values()), default=-math.inf)
        pipelines = [(t.pipeline, self.event_now(now, t, lead)) for _, t in sorted(self.tasks.items())]
        held = {id(p) for p, _ in pipelines}
        for spare in (self.prototype, self._unused):
            if spare is not None and id(spare) not in held:
                held.add(id(spare))
                pipelines.append((spare, spare.watermark))
        change = None
        for pipeline, at in pipelines:
            change = pipeline.replace_rules(config, at)
        return change

    # Start -------------------------------------------------------------------------
    def restore(self) -> bool:
        if self.state is not None:  # tasks come back one by one, as partitions are assigned
            # init_transactions now: a predecessor with our transactional id has its open
            # transaction aborted before any partition's state is read (not after its timeout)
            self.state.settle(5.0)
            self.ready.set()
            return False
        cp = Checkpoint.load(self.settings.checkpoint_path)
        if cp is None:
            log.info("checkpoint.none", path=self.settings.checkpoint_path)
            self.ready.set()
            return False
        for key, blob in sorted(cp.pipelines.items()):
            pipeline = self.task(key).pipeline
            for warning in pipeline.restore(blob, cp.blobs):  # type: ignore[arg-type]
                log.warning("checkpoint.rule_changed", task=key, detail=warning)
            self.effects.resubmit(pipeline.restored_effects, pipeline)
            resume_open(self.notifier, pipeline)
        if self.decisions is not None and hasattr(self.decisions, "truncate"):
            self.decisions.truncate(cp.decisions_offset)
        if self.ledger is not None:
            dropped = self.ledger.rewind(cp.ledger_marks)
            log.info("checkpoint.ledger_rewound", rows=dropped)
        seek = getattr(self.source, "seek", None)
        if cp.position is not None and seek is not None:
            seek(cp.position)
        self._position = cp.position
        self.watch.restore(cp.blind)
        log.info("checkpoint.restored", path=self.settings.checkpoint_path, tasks=sorted(cp.pipelines),
                 event_time=max((t.pipeline.max_event_time for t in self.tasks.values()), default=None))
        self.ready.set()
        return True

    def checkpoint(self) -> None:
        if self._position is None:
            return
        started = self.clock.now()
        self.effects.drain()  # what came back is recorded; what is still out is in the snapshot
        flush = getattr(self.prototype.edges.dead_letters, "flush", None)
        if flush is not None:
            flush()
        if self.state is not None:
            # Not while reads fail (the commit would wait out its timeout on the same brokers)
            # nor before the loop has settled an earlier transaction.
            if self.watch.reading and self.group.due():
                self.group.commit()
            self._last_checkpoint = self.clock.now()
            self.checkpoint_seconds = self._last_checkpoint - started
            self.last_beat = self._last_checkpoint
            return
        writer = self._writer
        if writer is None:  # a state store commits above; there is no file
            return
        self._written(writer.done())  # the previous one, if written meanwhile
        tasks = sorted(self.tasks.items())
        cp = Checkpoint(
            pipelines={k: t.pipeline.freeze() for k, t in tasks},
            position=self._position,
            decisions_offset=self.decisions.offset() if self.decisions is not None and hasattr(self.decisions, "offset") else 0,
            ledger_marks=self.ledger.high_water() if self.ledger is not None else {},
            blind=self.watch.blindness.state.to_dict(),
            # every reference the snapshots name: the new ones with their bytes, the others
            # (written by an earlier checkpoint) by digest
            blobs={d: None for _, t in tasks for d in t.pipeline.blob_digests()},
        )
        for _, t in tasks:
            cp.blobs.update(t.pipeline.new_blobs())
        self._durable_marks[_position_key(cp.position)] = cp.ledger_marks
        writer.submit(cp)  # waits only while the previous one is still being written
        self.last_beat = self._last_checkpoint = self.clock.now()
        # frozen on the processing thread: this long, no event was processed
        self.checkpoint_seconds = self._last_checkpoint - started

    def _written(self, written: Written | None) -> None:
        """A checkpoint the writer made durable: only now may the source forget the events it
        covers, and only now is a restart rewound no further than its ledger marks (anchors).
        Not while reads fail (the commit would wait out its timeout on the same unreachable
        brokers, and the loop with it), and not the same offsets again."""
        if written is None:
            return
        self.checkpoint_bytes = written.bytes_written
        marks = self._durable_marks.pop(_position_key(written.position), None)
        self._durable_marks.clear()  # older ones were overtaken by this one
        if self.anchoring is not None and marks is not None:
            self.anchoring.publish(self.clock.now(), marks)
        if self.watch.reading and written.position != self._committed:
            try:
                self.source.commit(written.position)
            except Recoverable as exc:
                # The checkpoint is durable; only the commit failed. The next durable
                # checkpoint's commit covers these offsets too.
                log.warning("checkpoint.commit_failed", detail=str(exc))
                return
            self._committed = written.position

    def flush_checkpoint(self, timeout: float | None = None) -> None:
        """Wait (within ``timeout``) until the checkpoint being written is durable, and commit
        the offsets it covers."""
        if self._writer is not None:
            self._written(self._writer.wait(None if timeout is None else max(0.0, timeout)))

    def _final_checkpoint(self, timeout: float) -> None:
        """The last checkpoint at a stop, waited for (within ``timeout``) and committed."""
        self.checkpoint()
        self.flush_checkpoint(timeout)

    def _resume_where_state_is(self, partitions: list[tuple[str, int]]) -> None:
        """File mode: partitions assigned again (after a lost session, a revoke) continue at the
        position the in-memory state covers. Commits may have failed meanwhile (brokers away):
        the group's committed offset would re-read events the state has counted already."""
        mine = {f"{t}:{p}" for t, p in partitions}
        resume = {tp: off for tp, off in (self._position or {}).items() if tp in mine} \
            if isinstance(self._position, dict) else {}
        if resume:
            self.source.seek(resume)  # type: ignore[attr-defined]
            log.info("partitions.resumed", position=resume)

    def _assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.group.assigned(partitions)

    def _gone(self, partitions: list[tuple[str, int]]) -> list[int]:
        return self.group.gone(partitions)

    # The loop ----------------------------------------------------------------------
    def run(self) -> None:
        from rollbackd.daemon.replay import GC_THRESHOLDS

        self.watch.measure(self.clock.now(), None)  # the lag from the start, for /metrics
        self.restore()
        flush = getattr(self.prototype.edges.dead_letters, "flush", None)
        if flush is not None:
            flush()  # a dead-letter file exists from the start, empty until something is rejected
        backoff = 0.5
        gc_thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            while not self.stopping:
                self.last_beat = self.clock.now()
                if self.group.pending and not self.group.settle():
                    self._pause(backoff, "a transaction is waiting for the group coordinator")
                    backoff = min(backoff * 2, self.settings.backoff_max)
                    continue
                try:
                    batch = self.source.read(self.settings.batch_size)
                except Recoverable as exc:
                    self._pause(backoff, str(exc))
                    backoff = min(backoff * 2, self.settings.backoff_max)
                    continue
                backoff = 0.5
                if batch is None:  # a finite source is exhausted
                    break
                self.step(batch)
            # The calls in flight get their time, within half of what is left of the stop
            # timeout: the checkpoint and the source's close need the rest.
            stop_at = self._stop_at if self._stop_at is not None else time.monotonic()
            left = stop_at + self.settings.stop_timeout - time.monotonic()
            if not self.effects.close(min(self.settings.effects_stop_timeout, max(0.0, left / 2))):
                log.warning("effects.unfinished", calls=self.effects.waiting(),
                            detail="kept in the checkpoint: they run after the restart")
            try:
                # the file always; the commit only while the brokers answer
                self._final_checkpoint(stop_at + self.settings.stop_timeout - time.monotonic())
            except Recoverable as exc:
                log.warning("checkpoint.commit_failed", detail=str(exc))
        finally:
            gc.set_threshold(*gc_thresholds)
            # events: read by this process (a rewind reads some again); counted: by the tasks it
            # holds (before closing the source hands them over)
            counted = dict(sorted(self.view.counters.items()))
            self._close_source()
            if self._writer is not None:
                self._writer.close(timeout=5.0)
            log.info("daemon.stopped", events=self.events, rewinds=self.group.rewinds, counted=counted)

    def _pause(self, seconds: float, failure: str) -> None:
        """A backoff wait after a failed read, looking at the blindness every second of it, so a
        long backoff never postpones the notice."""
        left = seconds
        while True:
            self._tend()
            self.watch.look(self.clock.now(), failure)
            if left <= 0 or self.stopping:
                return
            self._wait(min(1.0, left))
            left -= 1.0

    def _close_source(self) -> None:
        """``source.close()`` within what is left of the stop timeout.

        A Kafka consumer leaving its group waits for the group coordinator, with no deadline of
        its own (up to the session timeout, 45 s by default) when the brokers are gone. Past the
        deadline the close is left running on its thread and the daemon stops: what is given up
        is leaving the group cleanly (the partitions move once the session times out) and the
        revoke hook's commit. Nothing is lost: the checkpoint file (or the state topic) holds
        the state and the offsets it covers, and the next start seeks there.
        """
        started = self._stop_at if self._stop_at is not None else time.monotonic()
        left = max(0.5, started + self.settings.stop_timeout - time.monotonic())
        closer = threading.Thread(target=self.source.close, name="rollbackd-source-close", daemon=True)
        closer.start()
        closer.join(left)
        if closer.is_alive():
            log.warning("source.close_abandoned", after_seconds=round(left, 1),
                        detail="the source did not close in time (brokers unreachable?): leaving the "
                               "group is given up; the checkpoint holds the state and the offsets it covers")

    def step(self, batch: Any) -> None:
        """One batch (possibly empty): ingest, advance event time, checkpoint when due."""
        now = self.clock.now()
        self._tend()
        if self._writer is not None:
            self._written(self._writer.done())  # commit what the writer made durable since
        if now - self._human_input_at >= self.settings.human_input_every:
            self._human_input_at = now
            push_human_input(*(task.pipeline for task in self.tasks.values()))
        parts = batch.parts if batch.parts is not None else ({0: batch.events} if batch.events else {})
        if batch.rejects:
            by_task: dict[int, list[Any]] = {}
            for r in batch.rejects:
                pos = r.position
                key = pos.get("partition", 0) if isinstance(pos, dict) else 0
                by_task.setdefault(key if batch.parts is not None else 0, []).append(r)
            for key, rejects in sorted(by_task.items()):
                self._select(key)
                self.task(key).pipeline.reject(rejects)
        for key, events in parts.items():
            if not events:
                continue
            task = self.task(key)
            self._select(key)
            # Live, the wall clock bounds future timestamps too (daemon/admission.py).
            task.pipeline.ingest(events, wall_now=now)
            self.events += len(events)
            task.last_event_wall = now
            task.event_time_at_last_event = task.pipeline.max_event_time
        at_end = getattr(self.source, "at_end", None)
        for key, task in self.tasks.items():
            # The warm-up holds a backlog's first events until the reference is anchored on
            # them; once all there is has been read, what is held goes in.
            if task.pipeline.admission.warming and (at_end is None or at_end(key)):
                self._select(key)
                task.pipeline.finish(now)
                task.event_time_at_last_event = task.pipeline.max_event_time
        if batch.events or batch.rejects:
            if batch.parts is not None and isinstance(self._position, dict) and isinstance(batch.position, dict):
                # A partitioned source lists the partitions it holds now; the state also covers
                # those it held (a lost session): kept until a task is handed over.
                self._position = {**self._position, **batch.position}
            else:
                self._position = batch.position
        self.watch.look(now)
        lead = max((t.watermark for t in self.tasks.values()), default=-math.inf)
        for key, task in sorted(self.tasks.items()):
            self._select(key)
            task.pipeline.advance(self.event_now(now, task, lead))
        if now - self._last_checkpoint >= self.settings.checkpoint_every:
            try:
                self.checkpoint()
            except Recoverable as exc:
                # With a state store: the transaction did not commit; the loop settles it (and
                # rewinds the tasks) before reading on.
                log.warning("checkpoint.commit_failed", detail=str(exc))
                self._last_checkpoint = now

    def _select(self, key: int) -> None:
        """Decisions made from here on belong to task ``key`` (the decisions topic's partition)."""
        select = getattr(self.state, "select", None)
        if select is not None:
            select(key)

    def event_now(self, wall_now: float, task: Task | None = None, lead: float | None = None) -> float:
        """A task's watermark, moved on when nothing more can come for it now.

        Read to the end of its partitions and quiet for ``partition_idle_after``, a task follows
        ``lead`` (the most advanced task's watermark): as in a replay, where one stream's silence
        does not stop the clock. Idle for ``idle_after`` in wall time, it follows the wall clock
        from the event time of its last event, so a recording published with old timestamps is
        not thrown forward to today.
        """
        if task is None:
            task = self.tasks[min(self.tasks)] if self.tasks else Task(0, self.prototype)
        wm = task.watermark
        at_end = getattr(self.source, "at_end", None)
        if lead is not None and lead > wm and at_end is not None and at_end(task.key) and (
            task.last_event_wall is None
            or wall_now - task.last_event_wall >= self.settings.partition_idle_after
        ):
            wm = lead
        if task.last_event_wall is None:
            return wm
        idle = wall_now - task.last_event_wall
        if idle >= self.settings.idle_after:
            wm = max(wm, task.event_time_at_last_event + idle - task.pipeline.lateness)
        return wm

    # Effects and the watch ---------------------------------------------------------------
    def _tend(self) -> None:
        """Work the loop does whether or not it can read: results, handed-over notices."""
        self.effects.drain()
        self.own.post_handed_over()
        if self.reloads is not None:
            self.reloads.tend(self)

    def post_from_thread(self, notice: Notice, on_result: Callable[[ActionResult], None] | None = None) -> None:
        """See :meth:`OwnNotices.post_from_thread` (the digest's scheduler hands its notice here)."""
        self.own.post_from_thread(notice, on_result)

    @property
    def blind_notified(self) -> bool:
        """The [BLIND] notice is out."""
        return self.watch.blind_notified

    @property
    def blind_since(self) -> float | None:
        """Start of the current spell of blindness (notified or not yet), or None."""
        return self.watch.blind_since

    @property
    def last_checkpoint(self) -> float:
        """Clock time of the last checkpoint (the start counts as one)."""
        return self._last_checkpoint

    @property
    def lag(self) -> int | None:
        """The consumer lag as last measured (kept while the brokers are away), for /metrics."""
        return self.watch.lag

    @property
    def lag_at(self) -> float | None:
        """When (clock time) :attr:`lag` was measured."""
        return self.watch.lag_at


def _no_backend(deployment: str) -> RollbackBackend:
    raise LookupError("the daemon's own notices roll nothing back")


def _position_key(position: Any) -> str:
    """A source position (a dict of offsets, a line number) as a dict key."""
    return repr(sorted(position.items())) if isinstance(position, dict) else repr(position)
