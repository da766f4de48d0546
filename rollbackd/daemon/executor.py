"""Executors: where the engine's intents are carried out.

The engine decides and hands each intent to its executor (Prometheus' rule evaluation hands
firing alerts to a ``NotifyFunc`` the same way); the executor performs it through the delivery
stages (``actions/delivery.py``) and reports every call's result back with
``engine.apply_result``, which may decide more (the "rollback succeeded" reply, the freeze
record).

- :class:`SyncExecutor` performs each intent at once, on the caller's thread, and reports the
  result before the engine goes on: replays, drills, backtests and tests. The decisions, and
  their order in the decision log, are those of an engine that called its edges itself.
- :class:`LaneExecutor` (the live daemon) writes records at once, but runs calls on worker
  threads, one *lane* per deployment so an incident's steps keep their order (its rollback
  before its notices), while a slow webhook or Slack holds up only its own deployment. Results
  come back to the processing thread through :meth:`LaneExecutor.drain`, called by the loop:
  the engine and the ledger are only ever touched from that thread. Work in flight is bounded;
  a notice that finds its lane full is recorded as dropped and the condition is reported
  (``on_full``), never a stall; rollbacks and pauses are never dropped.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import structlog

from rollbackd.actions.base import ActionResult
from rollbackd.actions.delivery import Delivery, perform
from rollbackd.actions.intents import Call, Fill, FollowUps, Intent, Notify, Pause, Record, Rollback, lane_of

__all__ = ["Engine", "Executor", "SyncExecutor", "LaneExecutor", "DEFAULT_LANE_LIMIT"]

log = structlog.get_logger("rollbackd.executor")

# Calls waiting per deployment before a further notice is dropped (and said to be).
DEFAULT_LANE_LIMIT = 100
# Worker threads for the lanes: a lane is run by one worker at a time.
DEFAULT_WORKERS = 8


class Engine(Protocol):
    """What an executor reports back to."""

    def apply_result(self, call: Call, result: ActionResult) -> None: ...


class Executor(Protocol):
    def submit(self, intent: Intent) -> None: ...


class SyncExecutor:
    """Every intent at once, in order, results reported before ``submit`` returns.

    Intents submitted while one is being performed (a follow-up that ``apply_result``
    decided) queue behind it, so the order is the order of decision."""

    def __init__(self, delivery: Delivery, engine: Engine) -> None:
        self.delivery = delivery
        self.engine = engine
        self._queue: collections.deque[Intent] = collections.deque()
        self._busy = False

    def submit(self, intent: Intent) -> None:
        self._queue.append(intent)
        if self._busy:
            return
        self._busy = True
        try:
            while self._queue:
                self._perform(self._queue.popleft())
        finally:
            self._busy = False

    def _perform(self, intent: Intent) -> None:
        if isinstance(intent, Record):
            self.delivery.record(intent)
        elif isinstance(intent, (Notify, Rollback, Pause)):
            perform(self.delivery, intent, self.engine.apply_result)
        elif isinstance(intent, Fill):
            for notice in intent.notices:
                self._perform(notice)
        # A FollowUps place never reaches a synchronous executor: the result it waits for is
        # reported before the engine goes on, so the engine posts the notices itself.

    def in_flight(self) -> list[Intent]:
        return []


@dataclass
class _Lane:
    items: collections.deque[Intent] = field(default_factory=collections.deque)
    running: bool = False
    calls: int = 0  # calls waiting (not markers)


class LaneExecutor:
    """Calls on worker threads, one lane per deployment; records and results on the caller's
    (the processing loop's) thread. ``drain()`` must be called by that thread regularly."""

    def __init__(
        self,
        delivery: Delivery,
        engine: Engine,
        *,
        lane_limit: int = DEFAULT_LANE_LIMIT,
        workers: int = DEFAULT_WORKERS,
        on_full: Callable[[str, int], None] | None = None,
    ) -> None:
        if lane_limit < 1 or workers < 1:
            raise ValueError("lane_limit and workers must be >= 1")
        self.delivery = delivery
        self.engine = engine
        self.lane_limit = lane_limit
        self.on_full = on_full
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self._ready: collections.deque[str] = collections.deque()
        self._wake = threading.Condition(self._lock)
        self._results: collections.deque[tuple[Call, ActionResult]] = collections.deque()
        self._closed = False
        self.dropped = 0  # notices dropped because their lane was full
        self.completed = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"rollbackd-effects-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # The processing thread -------------------------------------------------------------
    def submit(self, intent: Intent) -> None:
        if isinstance(intent, Record):
            self.delivery.record(intent)
            return
        if isinstance(intent, Fill):
            self._fill(intent)
            return
        if isinstance(intent, FollowUps):
            self._enqueue(intent.deployment, intent)
            return
        done = self.delivery.outbox(intent)
        if done is not None:  # re-decided after a restart: done already
            self.delivery.finished(intent, done, replayed=True)
            self.engine.apply_result(intent, done)
            return
        lane = lane_of(intent)
        if isinstance(intent, Notify) and self._waiting(lane) >= self.lane_limit:
            self.dropped += 1
            result = ActionResult("failed", f"effect queue full: {self.lane_limit} calls waiting for {lane}",
                                  attempts=0)
            self.delivery.finished(intent, result, replayed=False)
            self.engine.apply_result(intent, result)
            if self.on_full is not None:
                self.on_full(lane, self.lane_limit)
            return
        self.delivery.started(intent)
        self._enqueue(lane, intent)

    def resubmit(self, intents: Iterable[Intent]) -> None:
        """Intents a checkpoint carried: calls the outbox knows are finished are not run again;
        the others run (their start is recorded already)."""
        for intent in intents:
            if isinstance(intent, (Notify, Rollback, Pause)):
                done = self.delivery.outbox(intent)
                if done is not None:
                    self.delivery.finished(intent, done, replayed=True)
                    self.engine.apply_result(intent, done)
                    continue
                self._enqueue(lane_of(intent), intent)
            else:
                self.submit(intent)

    def drain(self) -> int:
        """Report the results that came back; returns how many."""
        n = 0
        while True:
            with self._lock:
                if not self._results:
                    return n
                call, result = self._results.popleft()
            self.delivery.finished(call, result, replayed=False)
            self.engine.apply_result(call, result)
            n += 1

    def in_flight(self) -> list[Intent]:
        """Everything not finished yet, in lane order (for a checkpoint), including calls whose
        result has come back but was not reported yet."""
        with self._lock:
            out: list[Intent] = [call for call, _ in self._results]
            for name in sorted(self._lanes):
                out.extend(self._lanes[name].items)
            return out

    def waiting(self) -> int:
        with self._lock:
            return sum(lane.calls for lane in self._lanes.values()) + len(self._results)

    def close(self, timeout: float) -> bool:
        """Stop the workers; wait up to ``timeout`` seconds for the lanes to empty. True when
        nothing was left (what is left is in the last checkpoint and runs after a restart)."""
        deadline = time.monotonic() + max(0.0, timeout)  # waiting only: no decision reads it
        while time.monotonic() < deadline:
            self.drain()
            with self._lock:
                busy = any(lane.items or lane.running for lane in self._lanes.values())
            if not busy:
                break
            time.sleep(0.05)
        self.drain()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            return not any(lane.items or lane.running for lane in self._lanes.values())

    # Internals ----------------------------------------------------------------------------
    def _waiting(self, lane: str) -> int:
        with self._lock:
            entry = self._lanes.get(lane)
            return entry.calls if entry is not None else 0

    def _enqueue(self, name: str, intent: Intent) -> None:
        with self._wake:
            lane = self._lanes.setdefault(name, _Lane())
            lane.items.append(intent)
            if not isinstance(intent, FollowUps):
                lane.calls += 1
            if not lane.running and name not in self._ready:
                self._ready.append(name)
                self._wake.notify()

    def _fill(self, fill: Fill) -> None:
        with self._wake:
            lane = self._lanes.get(fill.deployment)
            if lane is None:
                return
            for i, item in enumerate(lane.items):
                if isinstance(item, FollowUps) and item.key == fill.key:
                    del lane.items[i]
                    for j, notice in enumerate(fill.notices):
                        lane.items.insert(i + j, notice)
                    lane.calls += len(fill.notices)
                    break
            for notice in fill.notices:
                self.delivery.started(notice)
            if not lane.running and lane.items and fill.deployment not in self._ready:
                self._ready.append(fill.deployment)
                self._wake.notify()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._ready and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                name = self._ready.popleft()
                lane = self._lanes[name]
                if lane.running or not lane.items or isinstance(lane.items[0], FollowUps):
                    continue  # parked at a place not filled yet: _fill wakes it
                call = lane.items.popleft()
                lane.running = True
            assert isinstance(call, (Notify, Rollback, Pause))
            result = self.delivery.call(self.delivery.prepare(call))
            self.delivery.remember(call, result)  # the lane's next notice replies in its thread
            with self._wake:
                lane.running = False
                lane.calls -= 1
                self._results.append((call, result))
                self.completed += 1
                if lane.items and not isinstance(lane.items[0], FollowUps):
                    self._ready.append(name)
                    self._wake.notify()
