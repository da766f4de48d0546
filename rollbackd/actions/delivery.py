"""Delivery: the small stages every call goes through, written once.

outbox (done already? reuse its outcome) → record started → call (never raises) → record
finished. Rollbacks, pauses, incident notices, the blind notice and the digest all pass through
here, in a replay and live alike; only *where* the call runs differs (``daemon/executor.py``).
Retry by classification happens inside the call, in each backend and notifier
(``actions/retry.py``); a call that raises is a failed result, never an exception.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, Protocol

import structlog

from rollbackd.actions.base import ActionResult, RollbackBackend, pause_rollout
from rollbackd.actions.intents import Call, Notify, Record, Rollback, finished_record

__all__ = ["Recorder", "DecisionWriter", "Delivery"]

log = structlog.get_logger("rollbackd")


class Recorder(Protocol):
    """What delivery needs of a ledger (``daemon.ledger.Ledger`` implements it)."""

    def alert(self, rec: dict[str, Any]) -> None: ...
    def incident(self, rec: dict[str, Any]) -> None: ...
    def action(self, rec: dict[str, Any], phase: str) -> None: ...
    def finished_action(self, key: str) -> dict[str, Any] | None: ...


class DecisionWriter(Protocol):
    def write(self, rec: dict[str, Any]) -> None: ...


class Delivery:
    """The stages, bound to the edges they talk to. ``backend_for`` and ``notifier`` are read
    at each call (a drill swaps them after the pipeline is built)."""

    def __init__(self, edges: Any) -> None:
        self.edges = edges
        # Thread references by incident: a notice decided before the incident's first notice
        # was answered gets its thread when it is sent.
        self.threads: dict[str, str] = {}

    # Records ------------------------------------------------------------------------------
    def record(self, intent: Record) -> None:
        rec = dict(intent.rec)
        self.edges.decisions.write(rec)
        recorder = self.edges.recorder
        if intent.kind == "alert":
            recorder.alert(rec)
        elif intent.kind == "incident":
            recorder.incident(rec)
        else:
            recorder.action(rec, "finished")

    # Calls --------------------------------------------------------------------------------
    def outbox(self, call: Call) -> ActionResult | None:
        """The recorded outcome of a call this run already finished, if any."""
        row = self.edges.recorder.finished_action(call.key)
        if row is None:
            return None
        data = json.loads(row.get("data") or "{}")
        return ActionResult(
            row["status"], row.get("detail") or "", attempts=row.get("attempts") or 0,
            thread=data.get("thread"), data=data.get("result") or {},
        )

    def started(self, call: Call) -> None:
        """Durable before the call runs: a crash in between retries it with the same key."""
        self.edges.recorder.action({**call.rec, "status": "started"}, "started")

    def prepare(self, call: Call) -> Call:
        """The call as it goes out: a notice without a thread gets its incident's, if known."""
        if isinstance(call, Notify) and call.notice.thread is None:
            thread = self.threads.get(call.notice.incident_id)
            if thread is not None:
                return replace(call, notice=replace(call.notice, thread=thread))
        return call

    def call(self, call: Call) -> ActionResult:
        """Run one call. Never raises: a backend or notifier bug is a failed result."""
        try:
            if isinstance(call, Notify):
                return self.edges.notifier.post(call.notice)
            backend: RollbackBackend = self.edges.backend_for(call.deployment)
            if isinstance(call, Rollback):
                return backend.apply(call.plan)
            result = pause_rollout(backend, call.deployment, call.variant, call.incident_id)
            return result if result is not None else ActionResult(
                "skipped", "backend cannot pause", attempts=0, data={"paused": False})
        except Exception as exc:  # an edge must never stop the pipeline or a rollback
            return ActionResult("failed", f"{type(exc).__name__}: {exc}")

    def remember(self, call: Call, result: ActionResult) -> None:
        """Keep the thread a notice started, for the incident's next notices."""
        if isinstance(call, Notify) and result.thread is not None:
            self.threads[call.notice.incident_id] = result.thread

    def finished(self, call: Call, result: ActionResult, replayed: bool) -> None:
        """Record the outcome. A call found in the outbox (re-decided after a restart) is in the
        ledger already: only the decision log gets it again."""
        self.remember(call, result)
        rec = finished_record(call, result)
        if not isinstance(call, Notify) or call.decision:
            self.edges.decisions.write(rec)
        if not replayed:
            self.edges.recorder.action(rec, "finished")


def perform(delivery: Delivery, call: Call, report: Callable[[Call, ActionResult], None]) -> None:
    """All four stages inline (the synchronous executor's way)."""
    result = delivery.outbox(call)
    replayed = result is not None
    if result is None:
        delivery.started(call)
        result = delivery.call(delivery.prepare(call))
    delivery.finished(call, result, replayed)
    report(call, result)
