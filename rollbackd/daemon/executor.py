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
  threads, two *lanes* per deployment: rollbacks, their checks against the target and pauses
  in one, notices in the other, each in the order decided; a notice waits for the rollbacks
  decided before it to start, a rollback never waits for a notice, and a slow webhook or Slack
  holds up only its own deployment.
  Results come back to the processing thread through :meth:`LaneExecutor.drain`, called by the
  loop, each deployment's in the order decided: the engine and the ledger are only ever touched
  from that thread. Work in flight is bounded; a notice that finds its lane full is recorded as
  dropped and the condition is reported (``on_full``), never a stall; rollbacks and pauses are
  never dropped.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import structlog

from rollbackd.actions.base import ActionResult
from rollbackd.actions.delivery import Delivery, perform
from rollbackd.actions.intents import Call, Confirm, Fill, FollowUps, Intent, Notify, Pause, Record, Rollback, lane_of

__all__ = ["Engine", "Executor", "SyncExecutor", "LaneExecutor", "BoundExecutor", "DEFAULT_LANE_LIMIT"]

log = structlog.get_logger("rollbackd.executor")

# Calls waiting per deployment before a further notice is dropped (and said to be).
DEFAULT_LANE_LIMIT = 100
# Worker threads for the lanes: a lane is run by one worker at a time.
DEFAULT_WORKERS = 8


class Engine(Protocol):
    """What an executor reports back to."""

    def apply_result(self, call: Call, result: ActionResult) -> None: ...


class Executor(Protocol):
    """Where an engine hands its intents."""

    def submit(self, intent: Intent) -> None: ...

    def in_flight(self) -> list[Intent]: ...


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
        elif isinstance(intent, (Notify, Rollback, Pause, Confirm)):
            perform(self.delivery, intent, self.engine.apply_result)
        elif isinstance(intent, Fill):
            for notice in intent.notices:
                self._perform(notice)
        # A FollowUps place never reaches a synchronous executor: the result it waits for is
        # reported before the engine goes on, so the engine posts the notices itself.

    def in_flight(self) -> list[Intent]:
        return []


# Each deployment has two lanes: "act" (rollbacks, checks, pauses) and "say" (notices and the places
# of follow-up notices). Each runs one call at a time, in order; a notice never starts before
# the rollbacks decided ahead of it have started, and a rollback never waits for a notice.
ACT, SAY = "act", "say"
LaneKey = tuple[str, str]  # (deployment, ACT | SAY)


@dataclass(eq=False)
class _Slot:
    """A call's (or a follow-up place's) place in its deployment's order of decision. Results
    are reported in that order, so the decision log of a deployment reads as a replay's does,
    whichever lane answered first."""

    intent: Intent
    engine: Engine
    result: ActionResult | None = None
    # A check that the confirmer's stop ended before its verdict: back at its lane's head, it
    # does not run again in this process (the checkpoint keeps it for the next).
    held: bool = False


@dataclass
class _Lane:
    # (gate, slot): a notice waits until its deployment has started `gate` acts
    items: collections.deque[tuple[int, _Slot]] = field(default_factory=collections.deque)
    running: bool = False
    calls: int = 0  # calls waiting or running (places not counted)


def _kind(intent: Intent) -> str:
    return ACT if isinstance(intent, (Rollback, Pause, Confirm)) else SAY


class LaneExecutor:
    """Calls on worker threads, one lane per deployment; records, outbox look-ups and results
    on the processing thread, which must call :meth:`drain` regularly. Serves several engines
    (one pipeline per partition): each gets a :class:`BoundExecutor` from :meth:`bind`."""

    def __init__(
        self,
        delivery: Delivery,
        *,
        lane_limit: int = DEFAULT_LANE_LIMIT,
        workers: int = DEFAULT_WORKERS,
        on_full: Callable[[str, int], None] | None = None,
    ) -> None:
        if lane_limit < 1 or workers < 1:
            raise ValueError(f"lane_limit and workers must be >= 1, got {lane_limit} and {workers}")
        self.delivery = delivery
        self.lane_limit = lane_limit
        self.on_full = on_full
        self._lanes: dict[LaneKey, _Lane] = {}
        self._acts: dict[str, list[int]] = {}  # deployment -> [acts enqueued, acts started]
        self._wake = threading.Condition()
        self._ready: collections.deque[LaneKey] = collections.deque()
        # Per deployment, its calls and places in the order decided; answered ones are reported
        # from the front, so each deployment's results reach the engine in that order.
        self._order: dict[str, collections.deque[_Slot]] = {}
        self._answered: set[str] = set()  # deployments with an answer waiting to be reported
        self._unreported = 0
        self._full: set[str] = set()  # lanes whose overflow was reported and has not cleared
        self._closed = False
        self._running: dict[int, tuple[_Slot, LaneKey]] = {}  # worker -> its call and lane
        self._deliveries: dict[int, Delivery] = {}  # engines whose calls use edges of their own
        self.dropped = 0  # notices dropped because their lane was full
        self._threads = [
            threading.Thread(target=self._work, name=f"rollbackd-effects-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def bind(self, engine: Engine, delivery: Delivery | None = None) -> "BoundExecutor":
        """``engine``'s executor; its calls go through ``delivery`` (default: the pool's)."""
        if delivery is not None:
            self._deliveries[id(engine)] = delivery
        return BoundExecutor(self, engine)

    def _via(self, engine: Engine) -> Delivery:
        return self._deliveries.get(id(engine), self.delivery)

    # The processing thread -------------------------------------------------------------
    def submit(self, intent: Intent, engine: Engine) -> None:
        if isinstance(intent, Record):
            self._via(engine).record(intent)
        elif isinstance(intent, Fill):
            self._fill(intent, engine)
        elif isinstance(intent, FollowUps):
            self._enqueue(intent.deployment, engine, intent)
        elif not self._done_already(intent, engine):
            self._start(intent, engine)

    def resubmit(self, intents: Iterable[Intent], engine: Engine) -> None:
        """The intents a checkpoint carried: a call the outbox knows as finished is not run
        again; the others run once more with the same key (their start is recorded)."""
        for intent in intents:
            if isinstance(intent, (Notify, Rollback, Pause, Confirm)):
                if not self._done_already(intent, engine):
                    self._enqueue(lane_of(intent), engine, intent)
            elif isinstance(intent, FollowUps):
                self._enqueue(intent.deployment, engine, intent)

    def drain(self) -> int:
        """Report the results that came back, each deployment's in the order decided; returns
        how many."""
        n = 0
        while True:
            with self._wake:
                ready = self._next_answer()
                if ready is None:
                    return n
                engine, call, result = ready
            self._via(engine).finished(call, result, replayed=False)
            engine.apply_result(call, result)
            n += 1

    def _next_answer(self) -> tuple[Engine, Call, ActionResult] | None:
        """The next result to report, if a deployment's earliest outstanding call has one
        (lock held)."""
        while self._answered:
            deployment = min(self._answered)
            order = self._order[deployment]
            if order and order[0].result is not None:
                slot = order.popleft()
                self._unreported -= 1
                assert isinstance(slot.intent, (Notify, Rollback, Pause, Confirm)) and slot.result is not None
                return slot.engine, slot.intent, slot.result
            self._answered.discard(deployment)
        return None

    def in_flight(self, engine: Engine | None = None) -> list[Intent]:
        """What is not finished yet (of ``engine``, or all), for a checkpoint: calls waiting or
        running, places, and calls that answered but were not reported yet."""
        with self._wake:
            out = [slot.intent for dep in sorted(self._order) for slot in self._order[dep]
                   if slot.result is not None and (engine is None or slot.engine is engine)]
            running = {key: slot for slot, key in self._running.values()}
            # by deployment, its acts before its notices, and in each lane the running call
            # before the ones waiting behind it: resubmitted in this order after a restart, the
            # lanes keep their order (an incident's first notice, the thread's parent, first)
            for key in sorted(self._lanes):
                slots = [running[key]] if key in running else []
                slots.extend(slot for _, slot in self._lanes[key].items)
                out.extend(slot.intent for slot in slots if engine is None or slot.engine is engine)
            return out

    def waiting(self) -> int:
        """Calls queued or running, and results not reported yet."""
        with self._wake:
            return sum(lane.calls for lane in self._lanes.values()) + self._unreported

    def close(self, timeout: float) -> bool:
        """Let the lanes empty for up to ``timeout`` seconds, reporting results, then stop the
        workers. Checks against a target (which may poll for ``verify_within``, minutes) are
        ended at once without a verdict. True when nothing was left; what is left is in the
        last checkpoint and runs after a restart."""
        deadline = time.monotonic() + max(0.0, timeout)  # waiting only: no decision reads it
        for delivery in {id(d): d for d in (self.delivery, *self._deliveries.values())}.values():
            delivery.confirmer.stop()
        while self.waiting() > self._held() and time.monotonic() < deadline:
            self.drain()
            time.sleep(0.02)
        self.drain()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            return not any(lane.calls for lane in self._lanes.values())

    # Internals ----------------------------------------------------------------------------
    def _held(self) -> int:
        """Calls that cannot run in this process any more: a held check, and what waits behind
        it in its lane (close need not wait for them)."""
        with self._wake:
            return sum(lane.calls for lane in self._lanes.values() if lane.items and lane.items[0][1].held)

    def _done_already(self, call: Call, engine: Engine) -> bool:
        done = self._via(engine).outbox(call)
        if done is None:
            return False
        self._via(engine).finished(call, done, replayed=True)
        engine.apply_result(call, done)
        return True

    def _start(self, call: Call, engine: Engine) -> None:
        lane = lane_of(call)
        with self._wake:
            entry = self._lanes.get((lane, SAY))
            waiting = entry.calls if entry is not None else 0
        if isinstance(call, Notify) and waiting >= self.lane_limit:
            self._drop(call, engine, lane)
            return
        self._via(engine).started(call)
        self._enqueue(lane, engine, call)

    def _drop(self, call: Notify, engine: Engine, lane: str) -> None:
        """A notice that found its lane full: recorded as failed, and the overflow reported
        once until the lane has drained."""
        self.dropped += 1
        result = ActionResult("failed", f"effect queue full: {self.lane_limit} calls waiting for {lane}",
                              attempts=0)
        self._via(engine).finished(call, result, replayed=False)
        engine.apply_result(call, result)
        log.error("effects.queue_full", deployment=lane, limit=self.lane_limit, notice=call.key)
        if lane not in self._full:
            self._full.add(lane)
            if self.on_full is not None:
                self.on_full(lane, self.lane_limit)

    def _enqueue(self, deployment: str, engine: Engine, intent: Intent) -> None:
        with self._wake:
            kind = _kind(intent)
            key = (deployment, kind)
            lane = self._lanes.setdefault(key, _Lane())
            acts = self._acts.setdefault(deployment, [0, 0])
            if kind == ACT:
                acts[0] += 1
            slot = _Slot(intent, engine)
            self._order.setdefault(deployment, collections.deque()).append(slot)
            lane.items.append((0 if kind == ACT else acts[0], slot))
            if not isinstance(intent, FollowUps):
                lane.calls += 1
            self._schedule(key, lane)

    def _can_move(self, key: LaneKey, lane: _Lane) -> bool:
        """Whether a worker can take the lane's head now (lock held)."""
        if lane.running or not lane.items:
            return False
        gate, head = lane.items[0]
        if isinstance(head.intent, FollowUps) or head.held:
            return False  # parked until the engine fills it; held until the next process
        return key[1] == ACT or self._acts[key[0]][1] >= gate

    def _schedule(self, key: LaneKey, lane: _Lane) -> None:
        """Hand the lane to a worker if it can move (lock held)."""
        if self._can_move(key, lane) and key not in self._ready:
            self._ready.append(key)
            self._wake.notify()

    def _fill(self, fill: Fill, engine: Engine) -> None:
        for notice in fill.notices:
            self._via(engine).started(notice)
        with self._wake:
            key = (fill.deployment, SAY)
            lane = self._lanes.get(key)
            if lane is None:
                return
            for i, (gate, place) in enumerate(lane.items):
                if isinstance(place.intent, FollowUps) and place.intent.key == fill.key:
                    del lane.items[i]
                    order = self._order[fill.deployment]
                    at = order.index(place)
                    del order[at]
                    for j, notice in enumerate(fill.notices):
                        slot = _Slot(notice, engine)
                        lane.items.insert(i + j, (gate, slot))
                        order.insert(at + j, slot)
                    lane.calls += len(fill.notices)
                    self._answered.add(fill.deployment)  # an empty fill may unblock the order
                    break
            self._schedule(key, lane)

    def _work(self) -> None:
        me = threading.get_ident()
        while True:
            with self._wake:
                while not self._ready and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                key = self._ready.popleft()
                lane = self._lanes[key]
                if not self._can_move(key, lane):
                    continue  # _fill or a starting act schedules it again
                _, slot = lane.items.popleft()
                engine, call = slot.engine, slot.intent
                lane.running = True
                self._running[me] = (slot, key)
                if key[1] == ACT:
                    self._acts[key[0]][1] += 1
                    say = self._lanes.get((key[0], SAY))
                    if say is not None:
                        self._schedule((key[0], SAY), say)
            assert isinstance(call, (Notify, Rollback, Pause, Confirm))
            via = self._via(engine)
            result = via.call(via.prepare(call))
            if result is None:  # a check ended by close(): it stays in flight, unanswered
                with self._wake:
                    del self._running[me]
                    lane.running = False
                    slot.held = True
                    lane.items.appendleft((0, slot))
                continue
            via.remember(call, result)  # the lane's next notice replies in its thread
            with self._wake:
                del self._running[me]
                lane.running = False
                lane.calls -= 1
                if key[1] == SAY and lane.calls < self.lane_limit // 2:
                    self._full.discard(key[0])
                slot.result = result
                self._unreported += 1
                self._answered.add(key[0])
                self._schedule(key, lane)


class BoundExecutor:
    """A :class:`LaneExecutor` as one engine's executor."""

    def __init__(self, pool: LaneExecutor, engine: Engine) -> None:
        self.pool = pool
        self.engine = engine

    def submit(self, intent: Intent) -> None:
        self.pool.submit(intent, self.engine)

    def in_flight(self) -> list[Intent]:
        return self.pool.in_flight(self.engine)
