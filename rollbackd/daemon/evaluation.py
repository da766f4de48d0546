"""Measuring closed windows and stepping the alerts: the rules' side of a window boundary.

For each closed window and rule the :class:`RuleEvaluator` runs the rule's detector, also on
each version's share when more than one version served the window, or per slice for a rule
with ``slice_by`` (``daemon/splits.py`` judges the parts), and steps the rule's alert with the
measurement that speaks for the window. Detectors are built here (from their rule, the
deployment's reference and ``reference_size``) and kept in the pipeline's ``detectors``, which
a checkpoint carries. Pure like the pipeline: no clock, no I/O but the references a deployment
names (read once, through ``edges.references``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

from rollbackd.daemon.splits import (
    adjust_parts, judge_slices, judge_versions, mixed, slice_paths, slice_windows, version_shares,
)
from rollbackd.detectors.base import (
    REGISTRY, Detector, Measurement, Reference, Skipping, Window, make_detector,
)
from rollbackd.rules.alerts import Alert, Transition, step
from rollbackd.rules.model import WHOLE_WINDOW_DETECTORS, RuleSpec, WindowSpec

if TYPE_CHECKING:
    from rollbackd.daemon.pipeline import Pipeline

__all__ = ["RuleEvaluator", "SLICE_DETECTORS_PER_TOP_K", "WINDOW_SAMPLES"]

Key = tuple[str, str]
# An alert's transition at a boundary: the rule, the alert after it, the transition, the
# measurement that made it and the window measured.
Fired = tuple[RuleSpec, Alert, Transition, Measurement, Window]
# Detectors whose measurement counts only samples of the window they were fed last: at most its
# predictions, or its labels for a rule on labels. A window with fewer than the rule's
# min_samples gives no verdict (rules.alerts.verdict), whatever they measure.
WINDOW_SAMPLES = frozenset({"error_rate", "latency", "drift", "model_error"})
# Detectors kept per sliced rule and arm, in multiples of its slice_top_k, before the ones of
# slices no longer among the largest are dropped.
SLICE_DETECTORS_PER_TOP_K = 4


class RuleEvaluator:
    """One pipeline's rule evaluation. Reads and updates its ``detectors`` and ``alerts``."""

    def __init__(self, pipeline: "Pipeline") -> None:
        self.p = pipeline
        rules = pipeline.config.rules
        # Rules that slice labels: a buffered prediction keeps its slices (Pending.segments),
        # one per distinct slice_by of the rules on its deployment (label_slice_paths).
        self.slices_labels = any(r.slice_by and r.needs_labels for r in rules)
        self.label_paths: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {}
        # Whether a detector reads Window.known_good (model_quality's previous_version baseline).
        self.wants_known_good = any(r.detector == "model_quality" for r in rules)
        self._references: dict[str, Reference | None] = {}
        self._sliced: dict[tuple[str, Key], set[str]] = {}  # sliced rule and arm -> its slices' detectors
        self._skipping: dict[type, bool] = {}  # detector class -> whether it is Skipping

    def adopt(self, previous: "RuleEvaluator", rules: set[str]) -> None:
        """Go on from ``previous`` (the evaluator of the rules before a reload) for the rules
        named in ``rules``, unchanged: the references read, which slices have detectors."""
        self._references = previous._references
        self._sliced = {k: v for k, v in previous._sliced.items() if k[0] in rules}

    def detector(self, rule: RuleSpec, key: Key) -> Detector:
        det = self.p.detectors.get((rule.name, key))
        if det is None:
            det = self.p.detectors[(rule.name, key)] = self.build_detector(rule, key)
        return det

    def build_detector(self, rule: RuleSpec, key: Key) -> Detector:
        params = dict(rule.params)
        if getattr(REGISTRY.get(rule.detector), "needs_reference", False):
            # The deployment's reference_size is the default; a rule's params override it.
            params.setdefault("reference_size", self.p.config.deployment(key[0]).reference_size)
        return make_detector(
            rule.detector,
            threshold=rule.threshold,
            min_samples=rule.min_samples,
            params=params,
            reference=self._reference(key[0]),
        )

    def _reference(self, deployment: str) -> Reference | None:
        if deployment not in self._references:
            self._references[deployment] = self.p.edges.references(deployment)
        return self._references[deployment]

    def close(self, due: Sequence[tuple[WindowSpec, Window]], now: float) -> list[Fired]:
        """Measure every window closing at ``now`` with each rule on it and step the rules'
        alerts: one pass over the boundary for all its deployments, in the order of ``due``
        (window by window, each window's rules in file order), which is the order of the tap's
        measurements and of the transitions returned.

        What a rule needs is looked up once per boundary, the detectors to be changed are
        announced to the checkpoint at once, and an alert is stepped only by a measurement that
        allows a verdict: one that does not (too few samples, the usual case on a quiet
        deployment) leaves every alert as it is (``rules.alerts.verdict``). Without a tap, a
        window too small for any verdict (``WINDOW_SAMPLES``) is not even measured.
        """
        rules_by_window = self.p.rules_by_window
        # Whether a rule's windows are split by version (None: never), and whether by labels too.
        splits = {r.name: None if r.detector in WHOLE_WINDOW_DETECTORS else r.needs_labels
                  for r in self.p.config.rules}
        # Rules whose windows too small for a verdict are taken unmeasured: without a tap
        # nobody reads the measurement (True: the verdict counts labels, False: predictions).
        tap = self.p.edges.tap
        bounds = {} if tap is not None else {
            r.name: r.needs_labels for r in self.p.config.rules
            if r.detector in WINDOW_SAMPLES and r.min_samples > 0 and not r.slice_by}
        # A checkpoint taken before has each detector's state first (sliced rules announce
        # their slices' detectors themselves). Not read at all between checkpoints.
        self.p.checkpointing.changing_many(
            (rule.name, (w.deployment, w.variant))
            for spec, w in due for rule in rules_by_window.get(spec, ())
            if not rule.slice_by and rule.applies_to(w.deployment, w.variant))
        alerts, detectors = self.p.alerts, self.p.detectors
        fired: list[Fired] = []
        for spec, window in due:
            rules = rules_by_window.get(spec)
            if not rules:
                continue
            key = (window.deployment, window.variant)
            for rule in rules:
                if not rule.applies_to(*key):
                    continue
                akey = (rule.name, key)
                alert = alerts.get(akey)
                if rule.slice_by:
                    m = self._measure_slices(rule, window, now, alert)
                else:
                    det = detectors.get(akey)
                    if det is None:
                        det = self.detector(rule, key)
                    bound = bounds.get(rule.name)
                    if bound is not None and len(window.outcomes if bound else window.predictions) < rule.min_samples:
                        self._take_unmeasured(det, window)
                        if alert is None:
                            alerts[akey] = Alert(rule.name, key[0], key[1])
                        continue
                    labels = splits[rule.name]
                    if labels is not None and mixed(window, labels):
                        m = self._measure_shares(rule, window, now, alert, det, labels)
                    else:
                        det.update(window)
                        m = det.evaluate(now)
                        self._tap(rule, window, m, now)
                if alert is None:
                    alert = alerts[akey] = Alert(rule.name, key[0], key[1])
                if m.insufficient or m.value is None:
                    continue  # no verdict: step() would return the alert as it is
                new, transition = step(rule, alert, m, now)
                if new is not alert:
                    alerts[akey] = new
                if transition is not None:
                    fired.append((rule, new, transition, m, window))
        return fired

    def _take_unmeasured(self, det: Detector, window: Window) -> None:
        """A window no verdict can come of (nor of a version's share of it: no alert moves),
        whose measurement nobody reads: the detector takes it for what it keeps
        (``Skipping.skip``), or as any window when it cannot skip one."""
        skips = self._skipping.get(type(det))
        if skips is None:
            skips = self._skipping[type(det)] = isinstance(det, Skipping)
        if skips:
            det.skip(window)  # type: ignore[attr-defined]
        else:
            det.update(window)

    def _measure_shares(
        self, rule: RuleSpec, window: Window, now: float, alert: Alert | None, det: Detector, labels: bool
    ) -> Measurement:
        """The rule's measurement of a window more than one version served, and of each
        version's share of it (``daemon/splits.py``): a probe, a copy of the detector as it was
        before this window, measures each share; the detector itself takes the whole window,
        as it does when one version served."""
        shares = version_shares(window, labels)
        before = copy.deepcopy(det)
        measured: list[tuple[str, Measurement]] = []
        for i, share in enumerate(shares):
            probe = before if i == len(shares) - 1 else copy.deepcopy(before)
            probe.update(share)
            measured.append((share.version, probe.evaluate(now)))  # type: ignore[arg-type]
        measured = adjust_parts(measured)
        for share, (_, m_share) in zip(shares, measured):
            self._tap(rule, share, m_share, now)
        det.update(window)
        m = det.evaluate(now)
        self._tap(rule, window, m, now)
        return judge_versions(rule, alert, m, measured)

    def _measure_slices(self, rule: RuleSpec, window: Window, now: float, alert: Alert | None) -> Measurement:
        """The rule's measurement over the window's slices: each slice has its own detector
        (its own history and reference), and ``daemon/splits.py`` judges them together."""
        key = (window.deployment, window.variant)
        paths = slice_paths(rule)
        labels = self.label_slice_paths(key[0]).index(paths) if rule.needs_labels else None
        parts = slice_windows(window, paths, rule.slice_top_k, labels)
        measured: list[tuple[str, Measurement]] = []
        known = self._sliced.setdefault((rule.name, key), set())
        for part in parts:
            skey = (key[0], key[1], part.segment)
            det = self.detector(rule, skey)  # type: ignore[arg-type]
            self.p.checkpointing.changing((rule.name, skey))  # type: ignore[arg-type]
            det.update(part)
            measured.append((part.segment, det.evaluate(now)))  # type: ignore[arg-type]
            known.add(part.segment)  # type: ignore[arg-type]
        measured = adjust_parts(measured)
        for part, (_, m) in zip(parts, measured):
            self._tap(rule, part, m, now)
        if len(known) > SLICE_DETECTORS_PER_TOP_K * rule.slice_top_k:
            # A slice that left the top K long ago: its detector goes (bounded memory when
            # a sliced attribute has many values).
            current = {part.segment for part in parts}
            for name in sorted(known - current):
                self.p.detectors.pop((rule.name, (key[0], key[1], name)), None)  # type: ignore[arg-type]
            known &= current  # type: ignore[arg-type]
        return judge_slices(rule, alert, measured)

    def label_slice_paths(self, deployment: str) -> tuple[tuple[tuple[str, str], ...], ...]:
        """The distinct slice_by of the label-based rules on ``deployment``, in a fixed order:
        ``Pending.segments`` (and so ``Labeled.segments``) holds one slice per entry."""
        paths = self.label_paths.get(deployment)
        if paths is None:
            paths = self.label_paths[deployment] = tuple(sorted({
                slice_paths(r) for r in self.p.config.rules
                if r.slice_by and r.needs_labels and r.covers(deployment)}))
        return paths

    def _tap(self, rule: RuleSpec, window: Window, m: Measurement, now: float) -> None:
        if self.p.edges.tap is not None:
            self.p.edges.tap.measure(now, rule.name, window.deployment, window.variant, m, window)

    def known_good(self, key: Key, now: float) -> str | None:
        """The arm's rollback target as things stand (a detector's ``previous_version``
        baseline prefers it): the latest known-good version other than the current one."""
        hist = self.p.versions.get(key)
        if hist is None:
            return None
        spec = self.p.config.deployment(key[0])
        return hist.known_good(now, spec.known_good_after, spec.known_good_min_predictions,
                               self.p.responder.targets.bad_versions(key[0]))
