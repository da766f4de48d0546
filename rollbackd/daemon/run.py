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
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import structlog

from rollbackd.actions.base import ActionResult, Notice, Notifier
from rollbackd.daemon.clock import Clock, WallClock
from rollbackd.daemon.pipeline import Pipeline
from rollbackd.daemon.sources import EventSource
from rollbackd.errors import Recoverable

__all__ = ["RunSettings", "Checkpoint", "Daemon"]

log = structlog.get_logger("rollbackd.run")


@dataclass(frozen=True, slots=True)
class RunSettings:
    checkpoint_path: str = "rollbackd.checkpoint"
    checkpoint_every: float = 5.0  # wall seconds between checkpoints (and offset commits)
    batch_size: int = 5000
    idle_after: float = 30.0  # wall seconds without events before event time follows the wall
    blind_after: float = 30.0  # wall seconds the source fails before the blind notice
    lag_limit: int | None = None  # consumer lag (messages) that also counts as blind
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "idle_after", "blind_after", "backoff_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(slots=True)
class Checkpoint:
    pipeline: bytes
    position: Any
    decisions_offset: int
    ledger_marks: dict[str, int]

    def save(self, path: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(self, fh, protocol=pickle.HIGHEST_PROTOCOL)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def load(path: str) -> "Checkpoint | None":
        try:
            with open(path, "rb") as fh:
                cp = pickle.load(fh)
        except FileNotFoundError:
            return None
        if not isinstance(cp, Checkpoint):
            raise ValueError(f"{path} is not a rollbackd checkpoint")
        return cp


class Daemon:
    """Drives a pipeline from a live source until ``stop()``."""

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
    ) -> None:
        self.pipeline = pipeline
        self.source = source
        self.settings = settings
        self.ledger = ledger
        self.decisions = decisions
        self.notifier = notifier
        self.clock = clock or WallClock()
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self.name = name
        self.ready = threading.Event()  # set once the checkpoint is restored
        self.blind_since: float | None = None
        self.blind_notified = False
        self.events = 0
        self._last_event_wall: float | None = None
        self._event_time_at_last_event = float("-inf")
        self._position: Any = None
        self._last_checkpoint = self.clock.now()

    # Control -----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # Start -------------------------------------------------------------------------
    def restore(self) -> bool:
        cp = Checkpoint.load(self.settings.checkpoint_path)
        if cp is None:
            log.info("checkpoint.none", path=self.settings.checkpoint_path)
            self.ready.set()
            return False
        for warning in self.pipeline.restore(cp.pipeline):
            log.warning("checkpoint.rule_changed", detail=warning)
        if self.decisions is not None and hasattr(self.decisions, "truncate"):
            self.decisions.truncate(cp.decisions_offset)
        if self.ledger is not None:
            dropped = self.ledger.rewind(cp.ledger_marks)
            log.info("checkpoint.ledger_rewound", rows=dropped)
        seek = getattr(self.source, "seek", None)
        if cp.position is not None and seek is not None:
            seek(cp.position)
        self._position = cp.position
        log.info("checkpoint.restored", path=self.settings.checkpoint_path,
                 event_time=self.pipeline.max_event_time)
        self.ready.set()
        return True

    def checkpoint(self) -> None:
        if self._position is None:
            return
        cp = Checkpoint(
            pipeline=self.pipeline.snapshot(),
            position=self._position,
            decisions_offset=self.decisions.offset() if self.decisions is not None and hasattr(self.decisions, "offset") else 0,
            ledger_marks=self.ledger.high_water() if self.ledger is not None else {},
        )
        flush = getattr(self.pipeline.edges.dead_letters, "flush", None)
        if flush is not None:
            flush()
        cp.save(self.settings.checkpoint_path)
        # Only now may the source forget these events.
        self.source.commit(self._position)
        self._last_checkpoint = self.clock.now()

    # The loop ----------------------------------------------------------------------
    def run(self) -> None:
        self.restore()
        backoff = 0.5
        try:
            while not self.stopping:
                try:
                    batch = self.source.read(self.settings.batch_size)
                except Recoverable as exc:
                    self._source_failing(str(exc))
                    self._wait(backoff)
                    backoff = min(backoff * 2, self.settings.backoff_max)
                    continue
                backoff = 0.5
                if batch is None:  # a finite source is exhausted
                    break
                self.step(batch)
            try:
                self.checkpoint()
            except Recoverable as exc:
                log.warning("checkpoint.commit_failed", detail=str(exc))
        finally:
            self.source.close()
            log.info("daemon.stopped", events=self.events)

    def step(self, batch: Any) -> None:
        """One batch (possibly empty): ingest, advance event time, checkpoint when due."""
        now = self.clock.now()
        p = self.pipeline
        if batch.rejects:
            p.reject(batch.rejects)
        if batch.events:
            p.ingest(batch.events)
            self.events += len(batch.events)
            self._last_event_wall = now
            self._event_time_at_last_event = p.max_event_time
        if batch.events or batch.rejects:
            self._position = batch.position
        self._source_ok()
        p.advance(self.event_now(now))
        self._check_lag()
        if now - self._last_checkpoint >= self.settings.checkpoint_every:
            try:
                self.checkpoint()
            except Recoverable as exc:
                # The checkpoint file is written; only the offset commit failed. The next
                # checkpoint's commit covers these offsets too.
                log.warning("checkpoint.commit_failed", detail=str(exc))
                self._last_checkpoint = now

    def event_now(self, wall_now: float) -> float:
        """The watermark, moved on by the wall clock once the stream has been idle.

        Idle time is measured from the last event in wall time and added to the event
        time of that event, so a recording published with old timestamps is not thrown
        forward to today.
        """
        wm = self.pipeline.max_event_time - self.pipeline.lateness
        if self._last_event_wall is None:
            return wm
        idle = wall_now - self._last_event_wall
        if idle >= self.settings.idle_after:
            wm = max(wm, self._event_time_at_last_event + idle - self.pipeline.lateness)
        return wm

    # Monitoring the monitor ----------------------------------------------------------
    def _source_failing(self, detail: str) -> None:
        now = self.clock.now()
        if self.blind_since is None:
            self.blind_since = now
            log.warning("source.failing", detail=detail)
        if not self.blind_notified and now - self.blind_since >= self.settings.blind_after:
            self._blind_notice("opened", f"cannot read events for {now - self.blind_since:.0f}s: {detail}")

    def _source_ok(self) -> None:
        if self.blind_since is not None:
            if self.blind_notified:
                self._blind_notice("resolved", "reading events again; caught up")
            self.blind_since = None

    def _check_lag(self) -> None:
        limit = self.settings.lag_limit
        lag_fn = getattr(self.source, "lag", None)
        if limit is None or lag_fn is None:
            return
        try:
            lag = lag_fn()
        except Recoverable:
            return
        if lag is not None and lag > limit and not self.blind_notified:
            self._blind_notice("opened", f"consumer lag {lag} > {limit}")
        elif lag is not None and lag <= limit and self.blind_notified and self.blind_since is None:
            self._blind_notice("resolved", f"consumer lag {lag} back under {limit}")

    def _blind_notice(self, kind: str, text: str) -> None:
        self.blind_notified = kind == "opened"
        title = f"[{'BLIND' if kind == 'opened' else 'RESOLVED'}] {self.name} is not watching: {text}"
        log.error("monitoring.blind", state=kind, detail=text) if kind == "opened" else log.warning(
            "monitoring.blind", state=kind, detail=text
        )
        if self.notifier is None:
            return
        notice = Notice(
            incident_id=f"blind-{self.name}", kind=kind,  # type: ignore[arg-type]
            ts=self.clock.now(), deployment="*", variant="*", version=None,
            title=title, text=title,
        )
        try:
            result = self.notifier.post(notice)
        except Exception as exc:
            result = ActionResult("failed", f"{type(exc).__name__}: {exc}")
        if self.ledger is not None:
            self.ledger.action({
                "ts": notice.ts, "action": "notify", "deployment": "*", "variant": "*",
                "incident_id": notice.incident_id, "status": result.status,
                "detail": text, "notice": kind,
            }, "finished")
