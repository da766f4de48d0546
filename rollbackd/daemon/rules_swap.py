"""Rules replaced in a running pipeline (a reload, daemon/reload.py), as a restart from a
checkpoint would replace them, without one: what a rule had is kept when its definition is
unchanged, and everything else of the pipeline (windows, the join buffer, event time, versions,
incidents) goes on. Pure: no I/O, time is the event time passed in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollbackd.daemon.evaluation import RuleEvaluator
from rollbackd.daemon.join import pack, unpack
from rollbackd.daemon.splits import UNKNOWN
from rollbackd.daemon.targets import RollbackTargets
from rollbackd.daemon.windows import WindowAssembler
from rollbackd.measurements import FollowsRules
from rollbackd.rules.alerts import AlertState
from rollbackd.rules.model import Config

if TYPE_CHECKING:
    from rollbackd.daemon.pipeline import Pipeline

__all__ = ["RulesChange", "replace_rules"]


@dataclass(frozen=True)
class RulesChange:
    """What :func:`replace_rules` changed, by rule name."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()

    def to_record(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "changed": list(self.changed), "removed": list(self.removed),
                "kept": list(self.kept)}

    def describe(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("changed", self.changed), ("removed", self.removed)) if names]
        return "; ".join(parts) or "no rule changed"


def replace_rules(p: Pipeline, config: Config, now: float) -> RulesChange:
    """``p`` goes on under ``config``'s rules and inhibit rules from event time ``now``: a rule
    whose definition is unchanged keeps its detectors, alerts and muted episodes; a changed one
    starts afresh; a removed one is dropped, and its firing alerts are resolved in their
    incidents (they can no longer resolve otherwise); a new one is evaluated from the next
    window on (on the data still buffered, as after a start).

    ``ValueError`` (and nothing changed) when ``config`` differs in what was built from it at
    start (settings with the notifier, deployments with their backends, grouping) or needs other
    panes (another window granularity): those need a restart.
    """
    old = p.config
    differ = [name for name in ("settings", "deployments", "grouping") if getattr(old, name) != getattr(config, name)]
    if differ:
        raise ValueError(f"{', '.join(differ)} changed: a reload applies rules and inhibit rules only; "
                         "restart rollbackd to apply the rest")
    assembler = WindowAssembler([r.window for r in config.rules])
    if assembler.granularity != p.assembler.granularity:
        raise ValueError(f"the rules' windows need panes of {assembler.granularity:g}s, the running ones "
                         f"{p.assembler.granularity:g}s: restart rollbackd to apply them")
    before = {r.name: repr(r) for r in old.rules}  # a rule's identity, as a checkpoint's
    after = {r.name: repr(r) for r in config.rules}
    kept = {n for n, spec in after.items() if before.get(n) == spec}
    change = RulesChange(
        added=tuple(sorted(set(after) - set(before))),
        changed=tuple(sorted(n for n in after if n in before and n not in kept)),
        removed=tuple(sorted(set(before) - set(after))),
        kept=tuple(sorted(kept)),
    )
    old_evaluator = p.evaluator
    dropped = [(k, a) for k, a in p.alerts.items() if k[0] not in kept]
    assembler.panes, assembler.first_index = p.assembler.panes, p.assembler.first_index
    p._use_rules(config, assembler)
    p.detectors = {k: d for k, d in p.detectors.items() if k[0] in kept}
    p.alerts = {k: a for k, a in p.alerts.items() if k[0] in kept}
    muted = p._muted
    p._muted = {m for m in muted if m[0] in kept}
    p.evaluator = RuleEvaluator(p)
    p.evaluator.adopt(old_evaluator, kept)
    p.responder.targets = RollbackTargets(p)
    p._slots.clear()
    for key in sorted(p._known_keys):  # a new label rule's deployments buffer predictions from now
        if any(r.needs_labels and r.applies_to(*key) for r in config.rules):
            p.joiner.track(key[0])
    _relabel_pending(p, old_evaluator)
    if isinstance(p.edges.tap, FollowsRules):  # /metrics, --measurements-out: a new rule's records
        p.edges.tap.rules_changed(config)
    for (name, key), alert in sorted(dropped):
        if alert.state == AlertState.FIRING and (name, key) not in muted:
            p._effects(p.book.alert_resolved(alert.id, key[0], now))
    return change


def _relabel_pending(p: Pipeline, old: RuleEvaluator) -> None:
    """Buffered predictions carry one slice per label-sliced ``slice_by`` of their deployment
    (``Pending.segments``): when that list changes, each keeps the slices it has and gets
    ``(unknown)`` for a new one (its attributes are no longer at hand)."""
    noted = p.joiner.changes_log()
    for deployment, book in p.joiner.pending_books().items():
        was, now = old.label_slice_paths(deployment), p.evaluator.label_slice_paths(deployment)
        if was == now:
            continue
        for pid, packed in list(book.items()):
            entry = unpack(packed)
            segs = entry.segments or ()
            moved = tuple(segs[was.index(path)] if path in was and was.index(path) < len(segs) else UNKNOWN
                          for path in now) or None
            book[pid] = entry = pack(entry.ts, entry.variant, entry.model_version, entry.prediction, entry.score, moved)
            if noted is not None:
                noted.append((deployment, pid, entry))
