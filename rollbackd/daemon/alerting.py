"""What follows from an alert's transition: muted, or filed with its incident; recorded either way.

The alert state machine (``rules/alerts.py``) says *that* an alert fires or resolves; the
:class:`AlertRouter` decides where that goes. A silence (from the config or the ledger) or an
inhibit rule mutes a firing episode: it is recorded with the reason, never notified nor acted
on, and so is its resolution. Otherwise the incident book (``rules/incidents.py``) takes it,
and the effects it returns go to the pipeline's responder. Nothing here calls an edge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from rollbackd.daemon.clock import iso
from rollbackd.daemon.splits import blamed_version
from rollbackd.detectors.base import Measurement, Window
from rollbackd.rules.alerts import Alert, AlertState
from rollbackd.rules.incidents import Incident, IncidentChange
from rollbackd.rules.model import RuleSpec
from rollbackd.rules.silences import first_match

if TYPE_CHECKING:
    from rollbackd.daemon.pipeline import Pipeline

__all__ = ["AlertRouter"]

log = structlog.get_logger("rollbackd")


class AlertRouter:
    """Routes one pipeline's alert transitions. Reads its silences, inhibit rules, alerts and
    incident book, and keeps its record of muted episodes (``pipeline._muted``,
    ``pipeline.muted_episodes``, which a checkpoint carries)."""

    def __init__(self, pipeline: "Pipeline") -> None:
        self.p = pipeline

    def is_inhibit_target(self, rule: RuleSpec, alert: Alert) -> bool:
        """Whether an inhibit rule could mute this alert (its transition is then handled after
        the others of the same boundary, so its source is seen first)."""
        labels = _labels(rule, alert.deployment, alert.variant)
        return any(ir.targets(labels) for ir in self.p.config.inhibit_rules)

    def route(
        self, rule: RuleSpec, new: Alert, transition: Any, m: Measurement, window: Window, now: float
    ) -> None:
        """Handle ``new``'s ``transition``, stepped at event time ``now`` on ``window``."""
        p = self.p
        key = (new.deployment, new.variant)
        effects: list[Any] = []
        suppressed = None
        if transition.new == "firing":
            suppressed = self._suppression(rule, new, now)
            if suppressed is None:
                p._muted.discard((rule.name, key))
                effects = p.book.alert_fired(
                    rule, new.id, key[0], key[1], now, m.to_record(), (window.start, window.end)
                )
            else:
                # Muted for this firing episode: recorded with the reason, never notified
                # nor acted on; its resolution later is recorded the same way.
                p._muted.add((rule.name, key))
                by = suppressed.get("silence_id") or f"inhibit rule {suppressed.get('inhibit_rule')}"
                p.muted_episodes[by] += 1
        elif transition.new == "resolved":
            if (rule.name, key) in p._muted:
                suppressed = {"by": "muted episode"}
                p._muted.discard((rule.name, key))
            else:
                effects = p.book.alert_resolved(new.id, key[0], now, m.to_record())
        incident = (
            p.book.incident_for(key[0], key[1])
            if suppressed is None and transition.new in ("firing", "resolved")
            else None
        )
        measured = m.to_record()
        rec = {
            "ts": now,
            "kind": "alert",
            "alert_id": new.id,
            "rule": rule.name,
            "deployment": key[0],
            "variant": key[1],
            "severity": rule.severity,
            "state": transition.new,
            "previous": str(transition.previous),
            "incident_id": _incident_of(effects, incident),
            "measurement": measured,
            "window": [window.start, window.end],
            "version": blamed_version(measured) or p._current_version(key),
        }
        if suppressed is not None:
            rec["suppressed"] = suppressed
        p.responder.record(rec, "alert")
        log.info(
            "alert." + transition.new, rule=rule.name, deployment=key[0], variant=key[1],
            value=m.value, threshold=m.threshold, n=m.sample_size, ts=iso(now),
            suppressed=(suppressed or {}).get("by"),
        )
        p.responder.effects(effects)

    def _suppression(self, rule: RuleSpec, alert: Alert, now: float) -> dict[str, Any] | None:
        """Why this alert may neither notify nor act right now, or None."""
        p = self.p
        labels = _labels(rule, alert.deployment, alert.variant)
        silence = first_match(p.silences + p.recorded_silences, labels, now)
        if silence is not None:
            return {"by": "silence", "silence_id": silence.id, "reason": silence.reason,
                    "created_by": silence.created_by, "until": silence.ends_at}
        for ir in p.config.inhibit_rules:
            if not ir.targets(labels):
                continue
            same = {k: labels[k] for k in ir.equal}
            if ir.source_rollback:
                for inc in sorted(p.book.open.values(), key=lambda i: i.id):
                    if any(a.startswith("rollback:") for a in inc.actions_done) and any(
                        all(getattr(a, k) == v for k, v in same.items()) for a in inc.firing
                    ):
                        return {"by": "inhibit", "inhibit_rule": ir.name,
                                "source": inc.id, "reason": "rollback in progress"}
            for (name, key), other in sorted(p.alerts.items()):
                if other.state != AlertState.FIRING or (name, key) in p._muted:
                    continue
                if (name, key) == (rule.name, (alert.deployment, alert.variant)):
                    continue
                src_rule = p._rule_index[name]
                src = _labels(src_rule, key[0], key[1])
                if ir.is_source(src) and all(src[k] == v for k, v in same.items()):
                    return {"by": "inhibit", "inhibit_rule": ir.name,
                            "source": other.id, "reason": f"{name} firing"}
        return None


def _labels(rule: RuleSpec, deployment: str, variant: str) -> dict[str, str]:
    """The labels silences and inhibit rules match an alert by."""
    return {
        "rule": rule.name, "detector": rule.detector, "severity": rule.severity,
        "deployment": deployment, "variant": variant,
    }


def _incident_of(effects: list[Any], fallback: Incident | None) -> str | None:
    for e in effects:
        if isinstance(e, IncidentChange):
            return e.incident.id
    return fallback.id if fallback is not None else None
