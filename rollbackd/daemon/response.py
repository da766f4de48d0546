"""The engine's response to an incident: what to record, post, roll back or pause.

The incident book (``rules/incidents.py``) says *that* a notice or an action is due; the
:class:`Responder` decides *what* exactly — which version to go back to, whether the safety
policy, an approval or a dry run stops it, the words of each notice — and hands each step to
the executor as an intent (``actions/intents.py``). It calls no edge itself. The executor
reports each call's result back (:meth:`Responder.apply_result`), and what follows from it
(the outcome's notice, a freeze's record, the check of an applied rollback against its target)
is decided then.

Order is part of the decision: a step's rollbacks are handed over before its notices, so a
slow or rate-limited notifier never delays a rollback, and a rollback's own notices
("started", "succeeded") take the place in the incident's thread where they were decided.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import structlog

from rollbackd.actions.base import (
    ActionResult,
    Notice,
    PausableBackend,
    RollbackPlan,
    Verification,
    observes,
)
from rollbackd.actions.intents import (
    Call,
    Confirm,
    Fill,
    FollowUps,
    Notify,
    Pause,
    Record,
    RecordKind,
    Rollback,
    confirm_key,
    own_notice,
)
from rollbackd.actions.policy import SafetyPolicy, SafetyState
from rollbackd.daemon.clock import iso
from rollbackd.daemon.notices import build_notice
from rollbackd.daemon.splits import blamed_version, mixed_unattributed
from rollbackd.daemon.targets import RollbackTargets
from rollbackd.daemon.versions import VersionHistory
from rollbackd.rules.incidents import CONFIRMED, ESCALATED, ActionsDue, Incident, IncidentChange, NoticeDue

if TYPE_CHECKING:
    from rollbackd.daemon.pipeline import Pipeline

__all__ = ["Responder", "SHADOW_ARM"]

log = structlog.get_logger("rollbackd")

SHADOW_ARM = "shadow"
# Safety verdicts that leave a bad version serving because a rail stopped rollbackd, not because
# the operator asked for less: the notice says so, so on-call takes over.
_ESCALATING = ("freeze", "loop_guard", "redeployed", "no_target")

# (incident, notice kind, event time, reason, extra): a notice decided, not yet worded.
NoticeDraft = tuple[Incident, str, float, str, str]


class Responder:
    """Turns incident effects into intents. Reads and updates the pipeline's incident state
    (book, versions, safety, approvals waiting); ``pipeline.executor`` receives the intents."""

    def __init__(self, pipeline: "Pipeline") -> None:
        self.p = pipeline
        # Follow-up notices of calls whose result came back before their place was reached (and
        # the places of the calls those results decided, whose notices come after them).
        self._followups: dict[str, list[NoticeDraft | FollowUps]] = {}
        # Places (FollowUps) handed to the executor whose call has not answered yet.
        self.parked: dict[str, str] = {}  # call key -> deployment
        # Answers from approvers, by incident, pushed in by whoever drives the pipeline.
        self.answers: dict[str, list[dict[str, Any]]] = {}
        self.targets = RollbackTargets(pipeline)

    # Records ------------------------------------------------------------------------------
    def record(self, rec: dict[str, Any], kind: RecordKind) -> None:
        self.p.executor.submit(Record(rec, kind))

    # Incident effects ---------------------------------------------------------------------
    def effects(self, effects: Iterable[Any]) -> None:
        notices: list[NoticeDraft | FollowUps] = []
        for e in effects:
            if isinstance(e, IncidentChange):
                self._incident_change(e)
            elif isinstance(e, NoticeDue):
                notices.append((e.incident, e.kind, e.ts, e.reason, ""))
            elif isinstance(e, ActionsDue):
                for action in e.actions:
                    if action == "rollback":
                        notices.extend(self._rollback(e.incident, e.alert.rule, e.alert.variant, e.ts))
        self._post(notices)

    def _post(self, notices: Sequence[NoticeDraft | FollowUps]) -> None:
        for n in notices:
            if isinstance(n, FollowUps):
                ready = self._followups.pop(n.key, None)
                if ready is None:  # the call has not answered: its place waits in the lane
                    self.parked[n.key] = n.deployment
                    self.p.executor.submit(n)
                else:
                    self._post(ready)
            else:
                self._notice(*n)

    def _follow(self, call: Call, drafts: list[NoticeDraft | FollowUps]) -> None:
        """The notices a call's result produced: posted at their place. A place among them
        (of a call this result decided) comes after the notices before it: submitted once the
        call's place is filled, it goes behind it in the lane and in the order of results."""
        deployment = self.parked.pop(call.key, None)
        if deployment is None:
            self._followups[call.key] = drafts
            return
        intents = tuple(i for d in drafts if not isinstance(d, FollowUps) and (i := build_notice(self.p, *d)) is not None)
        self.p.executor.submit(Fill(call.key, deployment, intents))
        self._post([d for d in drafts if isinstance(d, FollowUps)])

    def _incident_change(self, e: IncidentChange) -> None:
        inc = e.incident
        alert = e.alert
        variant = alert.variant if alert is not None else inc.lead_alert().variant
        key = (inc.deployment, variant)
        rec: dict[str, Any] = {
            "ts": e.ts,
            "kind": "incident",
            "state": e.change,
            "incident_id": inc.id,
            "deployment": inc.deployment,
            "variant": variant,
            "rule": alert.rule if alert is not None else None,
            "severity": inc.severity,
        }
        if e.change in ("verified", "verification_failed"):
            rec["verify_by"] = inc.verify_by
        if e.change == "acknowledged":
            rec["by"], rec["acknowledged_at"] = inc.acknowledged_by, inc.acknowledged_at
        named = blamed_version(alert.measurement) if alert is not None else None
        if e.change in ("opened", "alert_joined") and alert is not None and self.targets.marks_bad(alert.rule) \
                and not mixed_unattributed(alert.measurement):
            hist = self.p.versions.get(key)
            if hist is not None and hist.current is not None:
                hist.mark_bad(named)
        if e.change == "opened":
            hist = self.p.versions.get(key)
            span = hist.latest(named) if hist is not None and named is not None else None
            if span is None and hist is not None:
                span = hist.current
            if named is not None:
                rec["version"] = named
            if span is not None:
                rec.setdefault("version", span.version)
                if span.version == rec["version"]:
                    rec["version_started"] = span.started
                    if span.provenance:
                        rec["provenance"] = dict(sorted(span.provenance.items()))
        self.record(rec, "incident")
        log.info("incident." + e.change, incident=inc.id, deployment=inc.deployment, ts=iso(e.ts))

    # Notices ------------------------------------------------------------------------------
    def _notice(self, inc: Incident, kind: str, ts: float, reason: str, extra: str = "") -> None:
        intent = build_notice(self.p, inc, kind, ts, reason, extra)
        if intent is not None:
            self.p.executor.submit(intent)

    def system_notice(self, key: str, ts: float, title: str, text: str) -> None:
        """A notice about rollbackd itself rather than an incident (a cardinality cap that
        binds): posted and kept in the ledger, not in the decision log."""
        notice = Notice(incident_id=key, kind="opened", ts=ts, deployment="*", variant="*",
                        version=None, title=title, text=text, drill=self.p.edges.drill)
        self.p.executor.submit(own_notice(notice, f"{key}:notice", title))

    # Results ------------------------------------------------------------------------------
    def apply_result(self, call: Call, result: ActionResult) -> None:
        if isinstance(call, Notify):
            inc = self._incident_by_id(call.notice.incident_id)
            if inc is not None and result.thread is not None:
                self.p.book.noticed(inc, call.notice.ts, result.thread)
        elif isinstance(call, Rollback):
            self._rolled_back(call, result)
        elif isinstance(call, Pause):
            self._paused(call, result)
        elif isinstance(call, Confirm):
            self._confirmed(call, result)

    # Approval -----------------------------------------------------------------------------
    def _answer(self, incident_id: str, approvers: Sequence[str], now: float) -> dict[str, Any] | None:
        """The first answer from a listed approver that event time ``now`` has reached."""
        for row in self.answers.get(incident_id, ()):
            if row["at"] <= now and row["by"] in approvers:
                return row
        return None

    def approvals(self, now: float) -> None:
        """Settle the rollbacks waiting for a human: an answer arrived, or the timeout ran out
        and the configured default applies."""
        awaiting = self.p.awaiting
        if not awaiting:
            return
        notices: list[NoticeDraft | FollowUps] = []
        for key in sorted(awaiting):
            wait = awaiting[key]
            spec = self.p.config.deployment(wait["deployment"]).approval
            answer = self._answer(wait["incident_id"], spec.approvers if spec else (), now)
            if answer is not None:
                approval = {"decision": answer["decision"], "by": answer["by"], "at": answer["at"],
                            "timed_out": False}
                ts = now
            elif now >= wait["deadline"]:
                approval = {"decision": spec.default if spec else "reject", "by": None,
                            "at": wait["deadline"], "timed_out": True}
                ts = wait["deadline"]
            else:
                continue
            del awaiting[key]
            inc = self._incident_by_id(wait["incident_id"])
            if inc is None:
                continue
            notices.extend(self._rollback(inc, wait["rule"], wait["variant"], ts, approval=approval))
        self._post(notices)

    def _incident_by_id(self, incident_id: str) -> Incident | None:
        book = self.p.book
        for inc in book.open.values():
            if inc.id == incident_id:
                return inc
        for inc in reversed(book.closed):
            if inc.id == incident_id:
                return inc
        return None

    # Rollbacks ----------------------------------------------------------------------------
    def _rollback(
        self, inc: Incident, rule_name: str, variant: str, ts: float,
        approval: dict[str, Any] | None = None,
    ) -> list[NoticeDraft | FollowUps]:
        """Decide one rollback (or its refusal); returns the notices about it, in order.
        ``approval``: the human (or timeout) answer when this rollback waited for one."""
        p = self.p
        spec = p.config.deployment(inc.deployment)
        rule = p._rule_index.get(rule_name)
        hist = p.versions.get((inc.deployment, variant)) or VersionHistory()
        # The version to move away from (a rolling update's failing share, else the one
        # serving) and where to.
        current, target, _ = self.targets.choose(inc, rule_name, variant, ts)
        plan = (
            RollbackPlan(inc.deployment, variant, current, target, inc.id, f"rule {rule_name}")
            if target is not None
            else None
        )
        dry_run = p.config.settings.force_dry_run or _first_set(
            rule.dry_run if rule else None, spec.dry_run, p.config.settings.dry_run
        ) or p.edges.drill
        policy = SafetyPolicy(
            dry_run=dry_run, cooldown=spec.cooldown, policy=spec.policy,
            max_rollbacks=spec.max_rollbacks, loop_period=spec.loop_period,
        )
        p.safety.prune(ts - spec.loop_period)
        since = hist.current.started if hist.current is not None else None
        verdict, why = policy.decide(self._safety_with_in_flight(inc.deployment), plan, ts, serving_since=since)
        rec: dict[str, Any] = {
            "ts": ts,
            "kind": "action",
            "action": "rollback",
            "incident_id": inc.id,
            "deployment": inc.deployment,
            "variant": variant,
            "rule": rule_name,
            "from_version": current,
            "to_version": target,
            "backend": spec.backend.type,
            "dry_run": dry_run,
        }
        if plan is not None:
            rec["idempotency_key"] = plan.idempotency_key
        if approval is not None:
            rec["approval"] = approval
        if variant == SHADOW_ARM and verdict in ("run", "dry_run"):
            # A shadow arm serves nobody: it is judged (alerts, the gate) but never rolled back.
            verdict, why = "shadow", "shadow arm: judged, never rolled back"
        if verdict == "run" and not inc.is_open:
            verdict, why = "resolved", "the incident resolved while the rollback waited for approval"
        elif verdict == "run" and spec.approval is not None and approval is None:
            answer = self._answer(inc.id, spec.approval.approvers, ts)
            if answer is None:
                deadline = ts + spec.approval.timeout
                p.awaiting[f"{inc.id}:{variant}"] = {
                    "incident_id": inc.id, "deployment": inc.deployment, "rule": rule_name,
                    "variant": variant, "requested_at": ts, "deadline": deadline,
                }
                why = (f"waiting for {', '.join(spec.approval.approvers)} until {iso(deadline)}; "
                       f"then {spec.approval.default}")
                rec.update(status="pending_approval", reason="approval", detail=why)
                if plan is not None:  # not the plan's own key: the outbox must not take it as done
                    rec["idempotency_key"] = plan.idempotency_key + ":approval"
                self.record(rec, "action")
                log.warning("rollback.pending_approval", incident=inc.id, deployment=inc.deployment)
                return [(inc, "updated", ts, "rollback awaits approval", why)]
            approval = rec["approval"] = {"decision": answer["decision"], "by": answer["by"],
                                          "at": answer["at"], "timed_out": False}
        if approval is not None:  # said on the incident's notices (Slack: who decided, no buttons)
            inc.approval = dict(approval)
        if verdict == "run" and approval is not None and approval["decision"] == "reject":
            who = "nobody answered (default reject)" if approval["timed_out"] else f"rejected by {approval['by']}"
            verdict, why = "rejected", who
        if verdict != "run":
            if plan is not None and verdict == "dry_run":
                p.safety.record(plan, ts, applied=False)
            if verdict == "freeze":
                pause = self._pause(inc, rule_name, variant, current, ts, dry_run, rec, why)
                if isinstance(pause, FollowUps):
                    return [pause]
                why = f"policy freeze: {pause}; not reverted; escalating to a human"
            return self._refused(inc, rec, verdict, why, ts)
        assert plan is not None
        moving = f"{inc.deployment}/{variant} {current} → {target}"
        call = Rollback(plan.idempotency_key, plan, rec, {
            "verify_within": spec.verify_within, "moving": moving, "backend": spec.backend.type,
        })
        p.executor.submit(call)
        return [FollowUps(call.key, inc.deployment)]

    def retry_stalled(self, now: float) -> None:
        """Decide again each rollback skipped for want of a target whose arm's versions changed
        since (a new version serving, the rolling update finished); drop those whose incident
        is over."""
        stalled = self.p.stalled
        if not stalled:
            return
        notices: list[NoticeDraft | FollowUps] = []
        for key in sorted(stalled):
            entry = stalled[key]
            inc = self._incident_by_id(entry["incident_id"])
            if inc is None or not inc.is_open:
                del stalled[key]
                continue
            if self.targets.picture((inc.deployment, entry["variant"])) == entry["picture"]:
                continue
            del stalled[key]
            log.info("rollback.retry", incident=inc.id, deployment=inc.deployment, variant=entry["variant"])
            notices.extend(self._rollback(inc, entry["rule"], entry["variant"], now))
        self._post(notices)

    def _safety_with_in_flight(self, deployment: str) -> SafetyState:
        """The safety state as it will be once the rollbacks of ``deployment`` still in flight
        have answered: each counts for the cooldown from its decision, as it does in a replay,
        where the answer comes at once. Live, a slow backend keeps a rollback in flight (a
        retried call, a command's timeout), and a second one must not slip through."""
        state = self.p.safety
        started = [c.rec["ts"] for c in self.p.executor.in_flight()
                   if isinstance(c, Rollback) and c.deployment == deployment]
        if not started:
            return state
        last = max(state.last_rollback.get(deployment, -math.inf), max(started))
        return replace(state, last_rollback={**state.last_rollback, deployment: last})

    def _refused(self, inc: Incident, rec: dict[str, Any], verdict: str, why: str, ts: float) -> list[NoticeDraft | FollowUps]:
        status = "dry_run" if verdict == "dry_run" else "skipped"
        rec.update(status=status, reason=verdict, detail=why)
        self.record(rec, "action")
        # A dry run is what was asked for (a drill runs every rollback dry): not a warning.
        emit = log.info if verdict == "dry_run" else log.warning
        emit("rollback." + verdict, incident=inc.id, deployment=inc.deployment, detail=why)
        if verdict == "no_target" and inc.is_open:
            # Decided again when the versions of the arm change (``retry_stalled``): the
            # version serving alone, or a known-good one appearing, may give it a target.
            key = (inc.deployment, rec["variant"])
            self.p.stalled[f"{inc.id}:{rec['variant']}"] = {
                "incident_id": inc.id, "rule": rec["rule"], "variant": rec["variant"],
                "picture": self.targets.picture(key),
            }
        if verdict in _ESCALATING:
            self.p.book.escalated(inc, ts)
            return [(inc, "updated", ts, f"{ESCALATED}rollback {verdict.replace('_', ' ')}", why)]
        return [(inc, "updated", ts, f"rollback {status}", why)]

    def _rolled_back(self, call: Rollback, result: ActionResult) -> None:
        plan, ts = call.plan, call.rec["ts"]
        applied = result.status in ("succeeded", "skipped")
        self.p.safety.record(plan, ts, applied=applied)
        inc = self._incident_by_id(plan.incident_id)
        if applied and inc is not None:
            self.p.book.rolled_back(inc, ts, call.context["verify_within"])
        (log.info if applied else log.error)(
            "rollback." + result.status, incident=plan.incident_id, deployment=plan.deployment,
            variant=plan.variant, from_version=plan.from_version, to_version=plan.to_version,
            detail=result.detail,
        )
        if inc is None:  # gone from the book: nothing to say, but its place must not wait forever
            self._follow(call, [])
            return
        # The thread's "started" reply follows the incident's first notice, and the outcome
        # follows it: both are posted at the place the rollback was decided; the notices of the
        # check against the target (if the backend can read back) come after them.
        moving = call.context["moving"]
        extra = moving + (f" ({result.detail})" if result.status == "failed" else "")
        drafts: list[NoticeDraft | FollowUps] = [
            (inc, "updated", ts, "rollback started", f"{moving} via {call.context['backend']}"),
            (inc, "updated", ts, f"rollback {result.status}", extra),
        ]
        if applied and self._observes(plan.deployment):
            check = self._confirm(call)
            self.p.executor.submit(check)
            drafts.append(FollowUps(check.key, plan.deployment))
        self._follow(call, drafts)

    def _observes(self, deployment: str) -> bool:
        """Whether the deployment's backend can read back what a rollback changed."""
        try:
            return observes(self.p.edges.backend_for(deployment))
        except Exception:  # a backend that cannot be built did not apply anything either
            return False

    def _confirm(self, rollback: Rollback) -> Confirm:
        """The check of an applied rollback against its target: a call of its own, so the
        rollback's outcome is recorded and said without waiting for it (up to
        ``verify_within``), and a restart resumes it instead of applying the rollback again."""
        plan, rec = rollback.plan, rollback.rec
        key = confirm_key(rollback.key)
        check = {
            "ts": rec["ts"], "kind": "action", "action": "confirm", "incident_id": plan.incident_id,
            "deployment": plan.deployment, "variant": plan.variant, "rule": rec.get("rule"),
            "from_version": plan.from_version, "to_version": plan.to_version,
            "backend": rollback.context["backend"], "idempotency_key": key,
        }
        return Confirm(key, plan, check, {
            "verify_within": rollback.context["verify_within"], "backend": rollback.context["backend"],
        })

    def _confirmed(self, call: Confirm, result: ActionResult) -> None:
        """What the target reported back: a short reply in the incident's thread when it serves
        the target (the "rollback succeeded" reply only said the backend accepted it), an
        escalation when it never did within the bound."""
        checked = result.verification
        inc = self._incident_by_id(call.plan.incident_id)
        if inc is None or checked is None or not checked.observes:
            self._follow(call, [])
            return
        ts = call.rec["ts"]
        if checked.verdict == "confirmed":
            log.info("incident.rollback_confirmed", incident=inc.id, deployment=call.deployment,
                     backend=checked.backend, observed=checked.observed, polls=checked.polls)
            drafts: list[NoticeDraft | FollowUps] = [
                (inc, "updated", ts, f"{CONFIRMED}{checked.backend}", checked.describe())]
        else:
            drafts = [self._unconfirmed(inc, call, checked, ts)]
        self._follow(call, drafts)

    def _unconfirmed(self, inc: Incident, call: Confirm, checked: Verification, ts: float) -> NoticeDraft:
        """The backend accepted the rollback but never reported its target within the bound: a
        human must look at the target system. Independent of the alerts' own verification."""
        plan = call.plan
        self.record({
            "ts": ts, "kind": "incident", "state": "rollback_unconfirmed", "incident_id": inc.id,
            "deployment": plan.deployment, "variant": plan.variant, "rule": call.rec.get("rule"),
            "severity": inc.severity, "idempotency_key": plan.idempotency_key,
            "verification": checked.to_record(),
        }, "incident")
        log.error("incident.rollback_unconfirmed", incident=inc.id, deployment=plan.deployment,
                  backend=checked.backend, observed=checked.observed, expected=checked.expected)
        self.p.book.escalated(inc, ts)
        return (inc, "updated", ts, f"{ESCALATED}rollback not confirmed by {checked.backend}", checked.describe())

    # Pause (the freeze policy) ------------------------------------------------------------
    def _pause(self, inc: Incident, rule_name: str, variant: str, current: str | None, ts: float,
               dry_run: bool, refusal: dict[str, Any], why: str) -> str | FollowUps:
        """The freeze policy stops the rollout where the backend can pause one (Argo Rollouts).
        Returns what the notice says about it, or the place of the notices that follow the
        pause call's result."""
        if dry_run:
            return "rollout not paused (dry run)"
        if variant == SHADOW_ARM:
            return "rollout not paused (shadow arm: judged, never acted on)"
        try:
            backend = self.p.edges.backend_for(inc.deployment)
        except Exception as exc:  # a misconfigured backend (a missing secret): said, not raised
            return f"rollout not paused ({type(exc).__name__}: {exc})"
        if not isinstance(backend, PausableBackend):
            return "rollout not paused (backend cannot)"
        key = f"{inc.id}:pause:{variant}"
        rec: dict[str, Any] = {
            "ts": ts, "kind": "action", "action": "pause", "incident_id": inc.id,
            "deployment": inc.deployment, "variant": variant, "rule": rule_name,
            "from_version": current, "backend": self.p.config.deployment(inc.deployment).backend.type,
            "dry_run": False, "idempotency_key": key,
        }
        call = Pause(key, inc.deployment, variant, inc.id, rec, {"refusal": refusal, "why": why})
        self.p.executor.submit(call)
        return FollowUps(key, inc.deployment)

    def _paused(self, call: Pause, result: ActionResult) -> None:
        (log.error if result.status == "failed" else log.info)(
            "pause." + result.status, incident=call.incident_id, deployment=call.deployment,
            variant=call.variant, detail=result.detail,
        )
        if result.data.get("paused"):
            paused = "rollout paused" if result.status == "succeeded" else "rollout already paused"
        elif result.status == "failed":
            paused = f"rollout not paused ({result.detail})"
        else:
            paused = f"rollout not paused (backend cannot: {result.detail})"
        inc = self._incident_by_id(call.incident_id)
        if inc is None:
            self._follow(call, [])
            return
        why = f"policy freeze: {paused}; not reverted; escalating to a human"
        drafts = self._refused(inc, dict(call.context["refusal"]), "freeze", why, call.rec["ts"])
        self._follow(call, [d for d in drafts if not isinstance(d, FollowUps)])



def _first_set(*values: bool | None) -> bool:
    for v in values:
        if v is not None:
            return v
    return False
