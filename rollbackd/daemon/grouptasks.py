"""The live daemon's tasks with a state store: committed in Kafka transactions, moved in rebalances.

With a state store (``daemon/scaleout.py``), every task's state, the decisions since the last
commit and the input offsets they cover commit in one transaction (:meth:`GroupTasks.commit`). A
transaction that does not commit (refused: this instance lost its partitions; not answered;
aborted after a lost session) leaves the in-memory state ahead of what is committed: before
reading on, the loop settles it (:meth:`GroupTasks.settle`) and, unless it committed after all,
rewinds every task to its committed state (reloaded, its partitions sought there), so re-read
events are counted once.

Partitions moving: an assigned partition's task starts from its last committed state (read with
retries; a partition never starts without the state it had); a revoked one is committed before it
goes, so the next owner starts exactly there; a lost one (the session expired) has the open
transaction aborted and the tasks that stay rewound.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import structlog

from rollbackd.daemon.notices import resume_open
from rollbackd.daemon.scaleout import TransactionFailed
from rollbackd.errors import Fatal, Recoverable

if TYPE_CHECKING:
    from rollbackd.daemon.run import Daemon

__all__ = ["GroupTasks"]

# The daemon's logger: these events are the run loop's.
log = structlog.get_logger("rollbackd.run")


class GroupTasks:
    """Commits, settles and rewinds the daemon's tasks in the state store, and takes over and
    hands over tasks as partitions move. Reads and updates the daemon's tasks and source position
    (``daemon.tasks``, ``daemon._position``); the daemon's loop asks :attr:`pending` before it
    reads."""

    def __init__(self, daemon: "Daemon") -> None:
        self.d = daemon
        # The last commit's marks in the local ledger and decision log (a rewind goes back to
        # them), and what the loop must do before reading.
        self._ledger_marks: dict[str, int] | None = None
        self._decisions_mark: int | None = None
        self._unsettled = False  # a transaction's outcome is not known yet
        self._rewind_due = False  # in-memory state is ahead of what was committed, and must not be
        self._in_doubt_position: Any = None  # the position an unanswered commit covers
        self._committed: Any = None  # the position last committed
        self._committed_blind: dict[str, Any] | None = None
        self.rewinds = 0

    @property
    def pending(self) -> bool:
        """A transaction to settle, or a rewind to do, before the loop reads on."""
        return self._unsettled or self._rewind_due

    def due(self) -> bool:
        """A commit may go now (no earlier transaction waits to be settled) and would change
        something."""
        return not (self._unsettled or self._rewind_due) and self._dirty()

    # Exactly-once ------------------------------------------------------------------------
    def commit(self) -> None:
        """One transaction: the decisions since the last one, every task's state and the input
        offsets they cover. On failure the in-memory state is ahead of what is committed: the
        loop settles the transaction and, unless it committed after all, rewinds every task."""
        d = self.d
        keys = sorted(d.tasks)
        states, blobs = {}, {}
        for k in keys:
            states[k], blobs[k] = self._task_state(k)
        d.checkpoint_bytes = sum(len(s["pipeline"]) + sum(map(len, blobs[k].values())) for k, s in states.items())
        position = dict(d._position or {})
        try:
            d.state.commit(states, _of_tasks(position, set(keys)), d.source.group_metadata(),  # type: ignore[attr-defined]
                           blobs)
        except TransactionFailed as exc:
            self._unsettled = True
            if exc.in_doubt:
                self._in_doubt_position = position
            else:
                self._rewind_due = True
            raise
        self._committed_at(position)

    def _committed_at(self, position: Any) -> None:
        d = self.d
        self._committed = position
        self._committed_blind = d.watch.blindness.state.to_dict()
        self._in_doubt_position = None
        if d.ledger is not None and hasattr(d.ledger, "high_water"):
            self._ledger_marks = d.ledger.high_water()
        if d.decisions is not None and hasattr(d.decisions, "offset"):
            self._decisions_mark = d.decisions.offset()
        if d.anchoring is not None:  # a rewind goes back no further than these marks
            d.anchoring.publish(d.clock.now(), self._ledger_marks)

    def settle(self) -> bool:
        """Before reading on: a transaction whose outcome is unknown is settled and, if the
        in-memory state went past what is committed, every task is rewound. False while the
        coordinator cannot be reached."""
        if self._unsettled:
            outcome = self.d.state.settle(1.0)
            if outcome is None:
                return False
            self._unsettled = False
            if outcome == "committed" and self._in_doubt_position is not None:
                log.info("txn.committed_after_doubt")
                self._committed_at(self._in_doubt_position)
            elif outcome == "aborted":
                self._rewind_due = True
        if self._rewind_due:
            self._rewind()
        return True

    def _rewind(self) -> None:
        """Every task back to its last committed state: reloaded from the state topic, its
        partitions sought to the offsets that state covers. Events read since are read again and
        counted once; the decisions they led to are made again, with the same ids."""
        d = self.d
        keys = sorted(d.tasks)
        log.warning("tasks.rewinding", tasks=keys,
                    detail="the last transaction did not commit: back to the committed state")
        self.rewinds += 1
        # Calls in flight finish first (bounded): their outcomes reach the outbox, so the same
        # calls, decided again by the rewound tasks, are not made twice.
        deadline = time.monotonic() + d.settings.effects_stop_timeout
        while d.effects.waiting() and time.monotonic() < deadline:
            d.effects.drain()
            d._wait(0.02)
        d.effects.drain()
        if d.ledger is not None and self._ledger_marks is not None and hasattr(d.ledger, "rewind"):
            d.ledger.rewind(self._ledger_marks)
        if d.decisions is not None and self._decisions_mark is not None and hasattr(d.decisions, "truncate"):
            d.decisions.truncate(self._decisions_mark)
        held = list(d.source.assignment()) if hasattr(d.source, "assignment") else []
        self._drop(keys)
        self._rewind_due = False
        self._take_over(held)
        self._committed = dict(d._position or {})

    def _dirty(self) -> bool:
        """Something a commit would change: events read, decisions written, the blind state."""
        d = self.d
        return (d._position != self._committed or bool(getattr(d.state, "txn_open", False))
                or d.watch.blindness.state.to_dict() != self._committed_blind)

    # Partitions moving -----------------------------------------------------------------
    def _task_state(self, key: int) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Task ``key``'s state record and the blobs it names that no earlier record of this
        pipeline did. Complete references are named by digest, not inlined: each goes to the
        refs topic once, not with every checkpoint."""
        d = self.d
        position = _of_tasks(d._position, {key})
        pipeline = d.tasks[key].pipeline
        snapshot = pipeline.snapshot(external=True)
        # The instance's blind state rides along with each of its tasks: whoever holds one next
        # (this instance after a restart, or another) resolves an open notice once it reads.
        state = {**d.state.task_state(key, snapshot, position, pipeline.blob_digests()),
                 "blind": d.watch.blindness.state.to_dict()}
        return state, pipeline.new_blobs()

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        """The source's ``on_assign`` hook."""
        self._take_over(partitions)

    def _take_over(self, partitions: list[tuple[str, int]]) -> None:
        """Tasks for ``partitions`` that this instance does not hold yet, each from its last
        committed state (or from the start, without one), sought to the offsets it covers."""
        d = self.d
        for key in sorted({p for _, p in partitions} - set(d.tasks)):
            saved = self._load(key)
            task = d.task(key)
            if saved is None:
                # Sought explicitly: a rewind before the task's first commit comes back here.
                reset = str(getattr(d.source, "offset_reset", "earliest"))
                mine = [tp for tp in partitions if tp[1] == key]
                start = self._retrying(f"the start offsets of partition {key}",
                                       lambda: d.state.start_offsets(mine, reset))
                if start:
                    d.source.seek(start)  # type: ignore[attr-defined]
                    d._position = {**(d._position or {}), **start}
                log.info("task.started", task=key, position=start)
                continue
            for warning in task.pipeline.restore(saved["pipeline"], saved.get("blobs")):
                log.warning("checkpoint.rule_changed", task=key, detail=warning)
            # The outbox first: calls in flight at the snapshot that finished since are not redone.
            d.state.adopt(key, saved)
            d.effects.resubmit(task.pipeline.restored_effects, task.pipeline)
            resume_open(d.notifier, task.pipeline)
            d.watch.restore(saved.get("blind"))
            if saved["position"]:
                d.source.seek(saved["position"])  # type: ignore[attr-defined]
                d._position = {**(d._position or {}), **saved["position"]}
            log.info("task.restored", task=key, position=saved["position"],
                     event_time=task.pipeline.max_event_time)

    def _load(self, key: int, attempts: int = 5) -> dict[str, Any] | None:
        """Task ``key``'s saved state, retried with backoff. A partition must never start without
        the state it had: if the store stays unreadable the daemon stops (its supervisor restarts
        it, and the partition goes to a member that can read it)."""
        return self._retrying(f"the state of partition {key}", lambda: self.d.state.load(key), attempts, key)

    def _retrying(self, what: str, fn: Callable[[], Any], attempts: int = 5, key: int | None = None) -> Any:
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Recoverable as exc:
                if attempt == attempts:
                    raise Fatal(f"cannot read {what}: {exc}") from exc
                log.warning("task.restore_failed", task=key, attempt=attempt, detail=str(exc))
                self.d._wait(delay)
                delay = min(delay * 2, self.d.settings.backoff_max)
        return None

    def revoked(self, partitions: list[tuple[str, int]]) -> None:
        """The source's ``on_revoke`` hook. Partitions leave in a rebalance: everything is
        committed (one transaction, still in this generation) before their tasks go, so the next
        owner starts exactly here."""
        gone = self.gone(partitions)
        if not gone:
            return
        if self.d._position is not None and self.due():
            try:
                self.d.effects.drain()
                self.commit()
            except Recoverable as exc:  # the next owner starts from the last commit
                log.warning("task.commit_failed", tasks=gone, detail=str(exc))
        self._drop(gone)

    def lost(self, partitions: list[tuple[str, int]]) -> None:
        """The source's ``on_lost`` hook. Partitions taken without a revoke (the session expired:
        another member may own them already). The open transaction holds their decisions: it is
        aborted, never committed, and the tasks that stay are rewound to the last commit."""
        gone = self.gone(partitions)
        if getattr(self.d.state, "txn_open", False):
            self.d.state.abort(f"partitions lost: {gone}")
            self._unsettled = True
            self._rewind_due = True
        self._drop(gone)
        log.warning("tasks.lost", tasks=gone)

    def gone(self, partitions: list[tuple[str, int]]) -> list[int]:
        """The tasks left with none of their partitions once ``partitions`` go (the source still
        lists them as assigned while the hook runs)."""
        leaving = set(partitions)
        staying = {p for t, p in getattr(self.d.source, "assignment", lambda: [])() if (t, p) not in leaving}
        return sorted({p for _, p in leaving} & set(self.d.tasks) - staying)

    def _drop(self, keys: list[int]) -> None:
        d = self.d
        release = getattr(d.state, "release", None)
        for key in keys:
            d.tasks.pop(key, None)
            if release is not None:
                release(key)
            log.info("task.handed_over", task=key)
        if d._position is not None:
            d._position = _of_tasks(d._position, set(keys), exclude=True)


def _of_tasks(position: dict[str, int] | None, keys: set[int], exclude: bool = False) -> dict[str, int]:
    """The entries of a Kafka position (``{"topic:3": offset}``) for the partitions ``keys``
    (with ``exclude``, for all the others)."""
    return {tp: off for tp, off in (position or {}).items()
            if (int(tp.rpartition(":")[2]) in keys) != exclude}
