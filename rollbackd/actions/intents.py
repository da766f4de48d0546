"""What the engine decides, as data: the intents an executor carries out.

The engine (``daemon/pipeline.py``) never calls a backend, a notifier, the ledger or the
decision log. It hands intents to an executor (``daemon/executor.py``), which performs them
through the delivery stages (``actions/delivery.py``) and reports each call's
:class:`~rollbackd.actions.base.ActionResult` back to the engine (``apply_result``).

- :class:`Record`: write a decision (decision log + ledger). Cheap and local: always done at
  once, in order, on the thread that decided it.
- :class:`Notify`, :class:`Rollback`, :class:`Pause`, :class:`Confirm`: calls to the outside
  world, each with an idempotency ``key`` (the outbox key) and the decision record ``rec`` that
  the result completes. A live executor runs them off the processing thread, one lane per
  deployment.
- :class:`FollowUps`: a place in a lane for the notices that a call's result produces (the
  "rollback succeeded" reply goes after the incident's first notice, yet is worded only once
  the rollback has answered). The engine fills it through :class:`Fill`.

Intents are plain frozen data: a checkpoint carries the ones still in flight, and a restart
hands them to the executor again; the outbox (the ledger's finished rows) makes each call run
once per key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

from rollbackd.actions.base import ActionResult, Notice, RollbackPlan

__all__ = [
    "Record",
    "Notify",
    "Rollback",
    "Pause",
    "Confirm",
    "FollowUps",
    "Fill",
    "Call",
    "Intent",
    "confirm_key",
    "finished_record",
    "lane_of",
    "own_notice",
]

RecordKind = Literal["alert", "incident", "action"]


@dataclass(frozen=True, slots=True)
class Record:
    """A decision to write: ``rec`` to the decision log, and to the ledger table ``kind``."""

    rec: Mapping[str, Any]
    kind: RecordKind


@dataclass(frozen=True, slots=True)
class Notify:
    """Post ``notice``. ``reason`` goes into the finished record beside the notifier's answer."""

    key: str
    notice: Notice
    rec: Mapping[str, Any]
    reason: str
    # False for the daemon's own notices (blind, effect queue full): the ledger keeps them, the
    # decision log, which a replay must reproduce, does not.
    decision: bool = True


@dataclass(frozen=True, slots=True)
class Rollback:
    """Apply ``plan`` through the deployment's backend."""

    key: str
    plan: RollbackPlan
    rec: Mapping[str, Any]
    # What the engine needs back with the result (the rule's verify_within, the notice texts).
    context: Mapping[str, Any] = field(default_factory=dict)

    @property
    def deployment(self) -> str:
        return self.plan.deployment


@dataclass(frozen=True, slots=True)
class Pause:
    """Pause the deployment's rollout where it stands (the ``freeze`` policy)."""

    key: str
    deployment: str
    variant: str
    incident_id: str
    rec: Mapping[str, Any]
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Confirm:
    """Check, by polling the backend's read-back for up to ``context["verify_within"]``, that
    the system serves the target of the rollback ``plan`` that was applied already
    (``actions/verification.py``). Its own call, after the rollback's: the rollback's outcome,
    notice and bookkeeping do not wait for it, and a restart resumes the check instead of
    applying the rollback again (the outbox has the rollback finished)."""

    key: str
    plan: RollbackPlan
    rec: Mapping[str, Any]
    context: Mapping[str, Any] = field(default_factory=dict)

    @property
    def deployment(self) -> str:
        return self.plan.deployment


def confirm_key(rollback_key: str) -> str:
    """The idempotency key of the check of rollback ``rollback_key``."""
    return rollback_key + "/confirm"


@dataclass(frozen=True, slots=True)
class FollowUps:
    """The place, in ``deployment``'s lane, of the notices that call ``key``'s result produces."""

    key: str
    deployment: str


@dataclass(frozen=True, slots=True)
class Fill:
    """The notices for the :class:`FollowUps` place ``key``."""

    key: str
    deployment: str
    notices: tuple[Notify, ...]


Call = Union[Notify, Rollback, Pause, Confirm]
Intent = Union[Record, Notify, Rollback, Pause, Confirm, FollowUps, Fill]


def own_notice(notice: Notice, key: str, reason: str) -> Notify:
    """A notice about rollbackd itself (blind, a queue or a cap that binds, the digest) rather
    than an incident: posted and kept in the ledger under ``key``, not in the decision log."""
    rec = {
        "ts": notice.ts, "kind": "action", "action": "notify", "notice": notice.kind,
        "incident_id": notice.incident_id, "deployment": "*", "variant": "*", "status": "started",
        "idempotency_key": key,
    }
    return Notify(key, notice, rec, reason, decision=False)


def lane_of(intent: Intent) -> str:
    """The lane an intent runs in: its deployment's, so each incident's steps keep their order."""
    if isinstance(intent, Notify):
        return intent.notice.deployment
    if isinstance(intent, Record):
        return str(intent.rec.get("deployment", "*"))
    return intent.deployment


def finished_record(call: Call, result: ActionResult) -> dict[str, Any]:
    """The decision record of a finished call: the engine's ``rec`` plus what the call answered."""
    rec = dict(call.rec)
    if isinstance(call, Notify):
        rec.update(status=result.status, reason=call.reason, detail=result.detail, thread=result.thread)
        return rec
    rec.update(status=result.status, detail=result.detail, attempts=result.attempts)
    if result.data:  # what the backend changed or printed: kept in the ledger
        rec["result"] = json.loads(json.dumps(dict(result.data), default=str))
    if result.verification is not None and (isinstance(call, Confirm) or result.verification.observes):
        # What the target reported back. A rollback through a backend that cannot read back
        # adds nothing here (the ledger says so, see Delivery.finished), so a replay's decision
        # log stays as it was.
        rec["verification"] = result.verification.to_record()
    return rec
