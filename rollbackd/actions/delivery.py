"""Delivery: the small stages every call goes through, written once.

outbox (done already? reuse its outcome) → record started → call (never raises) → record
finished. Rollbacks, their checks against the target (``Confirm``, polling the backend's
read-back: ``actions/verification.py``), pauses, incident notices, the blind notice and the
digest all pass through here, in a replay and live alike; only *where* the call runs differs
(``daemon/executor.py``).
Retry by classification happens inside the call, in each backend and notifier
(``actions/retry.py``); a call that raises is a failed result, never an exception.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, Protocol

import structlog

from rollbackd.actions.base import ActionResult, PausableBackend, RollbackBackend, Verification
from rollbackd.actions.intents import Call, Confirm, Notify, Record, Rollback, finished_record
from rollbackd.actions.verification import Confirmer, unobserved

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

    def __init__(self, edges: Any, confirmer: Confirmer | None = None) -> None:
        self.edges = edges
        self.confirmer = confirmer if confirmer is not None else Confirmer()
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
        checked = data.get("verification")
        return ActionResult(
            row["status"], row.get("detail") or "", attempts=row.get("attempts") or 0,
            thread=data.get("thread"), data=data.get("result") or {},
            verification=Verification.from_record(checked) if isinstance(checked, dict) else None,
        )

    def started(self, call: Call) -> None:
        """Durable before the call runs: a crash in between retries it with the same key."""
        self.edges.recorder.action({**call.rec, "status": "started"}, "started")

    def prepare(self, call: Call) -> Call:
        """The call as it goes out: a notice carries its idempotency key, and one without a
        thread gets its incident's, if known."""
        if not isinstance(call, Notify):
            return call
        notice = call.notice
        if notice.key is None:
            notice = replace(notice, key=call.key)
        if notice.thread is None:
            thread = self.threads.get(notice.incident_id)
            if thread is not None:
                notice = replace(notice, thread=thread)
        return call if notice is call.notice else replace(call, notice=notice)

    def call(self, call: Call) -> ActionResult | None:
        """Run one call. Never raises: a backend or notifier bug is a failed result. ``None``
        only for a check the confirmer's stop ended before its verdict (it stays in flight)."""
        try:
            if isinstance(call, Notify):
                return self.edges.notifier.post(call.notice)
            backend: RollbackBackend = self.edges.backend_for(call.deployment)
            if isinstance(call, Confirm):
                return self.confirm(backend, call)
            if isinstance(call, Rollback):
                result = backend.apply(call.plan)
            elif isinstance(backend, PausableBackend):
                return backend.pause(call.deployment, call.variant, call.incident_id)
            else:
                return ActionResult("skipped", "backend cannot pause", attempts=0, data={"paused": False})
        except Exception as exc:  # an edge must never stop the pipeline or a rollback
            return ActionResult("failed", f"{type(exc).__name__}: {exc}")
        if result.status in ("succeeded", "skipped"):
            # A backend without read-back gets no check: the ledger says why, beside the rollback.
            blind = unobserved(backend, call.plan, self._name(backend, call))
            if blind is not None:
                return replace(result, verification=blind)
        return result

    def confirm(self, backend: RollbackBackend, call: Confirm) -> ActionResult | None:
        """An applied rollback checked against the system it changed, for at most the
        deployment's ``verify_within``: ``succeeded`` when the target reported it, ``failed``
        when it never did, ``skipped`` when the backend could not check after all."""
        within = float(call.context.get("verify_within", 0.0))
        checked = self.confirmer.confirm(backend, call.plan, within, self._name(backend, call))
        if checked is None:
            return None
        if checked.verdict == "confirmed":
            return ActionResult("succeeded", checked.describe(), attempts=checked.polls, verification=checked)
        if checked.verdict == "unconfirmed":
            return ActionResult("failed", checked.describe(), attempts=checked.polls, verification=checked)
        return ActionResult("skipped", checked.describe(), attempts=checked.polls, verification=checked)

    @staticmethod
    def _name(backend: RollbackBackend, call: Rollback | Confirm) -> str:
        return str(call.context.get("backend") or type(backend).__name__)

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
            checked = result.verification
            if checked is not None and not checked.observes:  # said in the ledger only
                rec = {**rec, "verification": checked.to_record()}
            self.edges.recorder.action(rec, "finished")


def perform(delivery: Delivery, call: Call, report: Callable[[Call, ActionResult], None]) -> None:
    """All four stages inline (the synchronous executor's way)."""
    result = delivery.outbox(call)
    replayed = result is not None
    if result is None:
        delivery.started(call)
        result = delivery.call(delivery.prepare(call))
        if result is None:  # a check stopped before its verdict: nothing finished to report
            return
    delivery.finished(call, result, replayed)
    report(call, result)
