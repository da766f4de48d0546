"""The ``rules:`` section: each rule's detector, thresholds, timing, actions and scope."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping

from yaml.nodes import MappingNode, Node

from rollbackd.rules.budget import unreachable_level
from rollbackd.rules.durations import format_duration, parse_duration
from rollbackd.rules.loading.detector_check import DetectorCheck, DetectorFactories, known_detectors
from rollbackd.rules.loading.reader import INVALID, NodeReader, Pairs, fmt_num, is_null, kind, sub
from rollbackd.rules.loading.scope import ScopeReader
from rollbackd.rules.loading.timing import TimingReader
from rollbackd.rules.model import (
    ACTIONS, MAX_SLICE_TOP_K, SEVERITIES, SLICE_SOURCES, DeploymentSpec, RuleSpec, WindowSpec,
)

DIRECTIONS = ("above", "below")

RULE_KEYS = (
    "name",
    "detector",
    "params",
    "threshold",
    "clear_threshold",
    "direction",
    "alpha",
    "window",
    "for",
    "for_windows",
    "keep_firing_for",
    "k_of_n",
    "min_samples",
    "severity",
    "actions",
    "deployments",
    "variants",
    "dry_run",
    "summary",
    "runbook",
    "marks_bad",
    "weight",
    "slice_by",
    "slice_top_k",
)


class RulesReader:
    def __init__(self, read: NodeReader) -> None:
        self.read = read
        self.timing = TimingReader(read)
        self.detector = DetectorCheck(read)
        self.scope = ScopeReader(read)
        # Where a valid rule's budget warnings point: its item node.
        self.rule_nodes: dict[str, Node] = {}

    def rules(self, node: Node, deployments: Mapping[str, DeploymentSpec]) -> Any:
        items = self.read.sequence(node, "rules")
        if items is None:
            return INVALID
        detectors = known_detectors()
        names: dict[str, Node] = {}
        out: list[RuleSpec] = []
        failed = False
        for i, item in enumerate(items):
            rule = self.rule(item, f"rules[{i}]", deployments, detectors, names)
            if rule is None:
                failed = True
            else:
                out.append(rule)
        return INVALID if failed else tuple(out)

    def rule(
        self,
        node: Node,
        path: str,
        deployments: Mapping[str, DeploymentSpec],
        detectors: DetectorFactories,
        names: dict[str, Node],
    ) -> RuleSpec | None:
        """One rule; ``None`` when it has any error (all of them reported)."""
        read = self.read
        errors_before = read.errors
        pairs = read.mapping(node, path, RULE_KEYS)
        if pairs is None:
            return None
        missing = [
            k for k in ("name", "detector", "threshold") if k not in pairs or is_null(pairs[k][1])
        ]
        if missing:
            read.error(
                node,
                path,
                f"missing required key{'s' if len(missing) > 1 else ''} "
                + ", ".join(map(repr, missing)),
            )

        kw: dict[str, Any] = {}
        name = self.name(pairs, path, kw, names)
        detector = read.optional(
            pairs, path, kw, "detector", lambda n, p: read.string(n, p, choices=sorted(detectors))
        )
        param_keys: dict[str, Node] = {}
        params = self.params(pairs, path, kw, param_keys)
        self.thresholds(pairs, path, kw)
        window = WindowSpec()
        if "window" in pairs:
            parsed = self.timing.window(pairs["window"][1], sub(path, "window"))
            if parsed is not None:
                window = kw["window"] = parsed
        self.timing.for_(pairs, path, kw, window)
        read.optional(pairs, path, kw, "keep_firing_for", read.duration)
        if "k_of_n" in pairs and not is_null(pairs["k_of_n"][1]):
            kn = self.timing.k_of_n(pairs["k_of_n"][1], sub(path, "k_of_n"))
            if kn is not None:
                kw["k"], kw["n"] = kn
        read.optional(
            pairs, path, kw, "min_samples", lambda n, p: read.number(n, p, integer=True, ge=0)
        )
        read.optional(
            pairs, path, kw, "severity", lambda n, p: read.string(n, p, choices=SEVERITIES)
        )
        self.actions(pairs, path, kw)
        if "deployments" in pairs and not is_null(pairs["deployments"][1]):
            self.scope.deployments(pairs["deployments"][1], sub(path, "deployments"), name, deployments, kw)
        read.optional(pairs, path, kw, "variants", lambda n, p: self.scope.globs(n, p, name))
        read.optional(pairs, path, kw, "dry_run", read.boolean)
        read.optional(pairs, path, kw, "summary", read.string)
        read.optional(pairs, path, kw, "runbook", read.string)
        read.optional(pairs, path, kw, "marks_bad", read.boolean)
        self.slices(pairs, path, kw)

        self.check_detector(pairs, path, kw, detector, detectors, params, param_keys)
        if read.errors != errors_before:
            return None
        if isinstance(name, str):
            self.rule_nodes[name] = node
        self.valid_rule_warnings(pairs, path, kw, detector, window)
        return RuleSpec(**kw)

    def name(self, pairs: Pairs, path: str, kw: dict[str, Any], names: dict[str, Node]) -> Any:
        """The rule's ``name``, unique in the file (``names``: the name nodes seen so far)."""
        read = self.read
        name = read.optional(pairs, path, kw, "name", read.string)
        if isinstance(name, str):
            if name in names:
                first = names[name].start_mark.line + 1
                read.error(
                    pairs["name"][1],
                    sub(path, "name"),
                    f"duplicate rule name {name!r} (first on line {first})",
                )
            else:
                names[name] = pairs["name"][1]
        return name

    def params(
        self, pairs: Pairs, path: str, kw: dict[str, Any], param_keys: dict[str, Node]
    ) -> dict[str, Any] | None:
        """The detector's ``params`` as given (``None`` if absent or invalid); ``param_keys``
        gets their key nodes."""
        if "params" not in pairs or is_null(pairs["params"][1]):
            return None
        params_node = pairs["params"][1]
        if not isinstance(params_node, MappingNode):
            self.read.error(
                params_node,
                sub(path, "params"),
                f"expected a mapping, got {kind(params_node)}",
            )
            return None
        params = self.detector.params(params_node, sub(path, "params"), param_keys)
        if params is not None:
            kw["params"] = MappingProxyType(params)
        return params

    def check_detector(
        self,
        pairs: Pairs,
        path: str,
        kw: Mapping[str, Any],
        detector: Any,
        detectors: DetectorFactories,
        params: Mapping[str, Any] | None,
        param_keys: Mapping[str, Node],
    ) -> None:
        """What only the detector can tell: its parameters, and whether ``alpha`` is reachable."""
        params_ok = "params" in kw or "params" not in pairs or is_null(pairs["params"][1])
        if isinstance(detector, str) and detector in detectors and params_ok:
            # Build the detector when what it takes from the rule is valid, even if other keys
            # of the rule are not, so that every error is reported in one go; not from a
            # missing or invalid threshold or min_samples: its complaints would repeat ours.
            self.detector.check(
                detectors[detector],
                detector,
                params or {},
                param_keys,
                pairs,
                kw,
                path,
                construct="threshold" in kw and ("min_samples" in kw or "min_samples" not in pairs),
            )

        if params_ok and isinstance(detector, str) and "alpha" in kw:
            # Needs only the params, so it also runs when the detector could not be built
            # (its optional package missing): the user learns both at once.
            unreachable = unreachable_level(detector, params or {}, kw["alpha"])
            if unreachable is not None:
                self.read.warn(pairs["alpha"][1], sub(path, "alpha"), unreachable)

    def thresholds(self, pairs: Pairs, path: str, kw: dict[str, Any]) -> None:
        """``threshold``, ``clear_threshold`` (hysteresis on the right side), ``direction``,
        ``alpha`` and ``weight``."""
        read = self.read
        threshold = read.optional(pairs, path, kw, "threshold", read.number)
        clear = read.optional(pairs, path, kw, "clear_threshold", read.number)
        direction = read.optional(
            pairs, path, kw, "direction", lambda n, p: read.string(n, p, choices=DIRECTIONS)
        )
        read.optional(pairs, path, kw, "alpha", lambda n, p: read.number(n, p, gt=0, lt=1))
        read.optional(pairs, path, kw, "weight", lambda n, p: read.number(n, p, gt=0))
        if isinstance(threshold, float) and isinstance(clear, float) and direction is not INVALID:
            above = (direction or "above") == "above"
            if above and clear > threshold:
                read.error(
                    pairs["clear_threshold"][1],
                    sub(path, "clear_threshold"),
                    f"with direction: above, clear_threshold must be <= threshold "
                    f"({fmt_num(clear)} > {fmt_num(threshold)}): "
                    "an alert clears when the value falls back",
                )
            elif not above and clear < threshold:
                read.error(
                    pairs["clear_threshold"][1],
                    sub(path, "clear_threshold"),
                    f"with direction: below, clear_threshold must be >= threshold "
                    f"({fmt_num(clear)} < {fmt_num(threshold)}): "
                    "an alert clears when the value rises back",
                )

    def actions(self, pairs: Pairs, path: str, kw: dict[str, Any]) -> None:
        read = self.read
        actions = read.optional(
            pairs,
            path,
            kw,
            "actions",
            lambda n, p: read.strings(n, p, choices=ACTIONS, non_empty=False),
        )
        if actions == ():
            read.warn(
                pairs["actions"][1], sub(path, "actions"), "no actions: the alert is only recorded"
            )
        elif isinstance(actions, tuple) and "rollback" in actions and "notify" not in actions:
            read.warn(
                pairs["actions"][1], sub(path, "actions"),
                "rollback without notify: an incident of this rule alone rolls back and posts no "
                "notice, so nobody on call hears of it; add notify",
            )

    def slices(self, pairs: Pairs, path: str, kw: dict[str, Any]) -> None:
        """``slice_by`` (where each slice's value is read) and ``slice_top_k``."""
        read = self.read
        by = read.optional(pairs, path, kw, "slice_by", lambda n, p: read.strings(n, p, non_empty=True))
        if by not in (None, INVALID):
            node = pairs["slice_by"][1]
            for i, (item, source) in enumerate(zip(read.sequence(node, "") or [], by)):
                head, _, name = source.partition(".")
                if head not in SLICE_SOURCES or not name:
                    read.error(item, f"{sub(path, 'slice_by')}[{i}]",
                               f"{source!r} is not attrs.<name> or features.<name>")
        read.optional(pairs, path, kw, "slice_top_k",
                      lambda n, p: read.number(n, p, integer=True, ge=1, le=MAX_SLICE_TOP_K))
        if "slice_top_k" in pairs and "slice_by" not in pairs:
            read.error(pairs["slice_top_k"][1], sub(path, "slice_top_k"), "slice_top_k needs slice_by")

    def period_warning(self, pairs: Pairs, path: str, kw: Mapping[str, Any], window: WindowSpec) -> None:
        """A seasonal baseline (``same_time``) whose ``period`` the window step does not divide:
        no window ends exactly one period earlier (detectors/seasonal.py)."""
        period = kw.get("params", {}).get("period")
        try:
            seconds = parse_duration(period)
        except ValueError:
            return  # absent, or the detector reported it already
        if seconds <= 0 or not seconds % window.step:
            return
        node = pairs["params"][1]
        for key, _ in getattr(node, "value", ()):
            if getattr(key, "value", None) == "period":
                node = key
        self.read.warn(
            node,
            sub(sub(path, "params"), "period"),
            f"{format_duration(seconds)} is not a multiple of window.step "
            f"({format_duration(window.step)}): windows are aligned to the epoch, so none ends "
            "exactly one period earlier; each window is compared with the one whose end is "
            "nearest to that, within half a step",
        )

    def quality_direction_warning(self, pairs: Pairs, path: str, kw: Mapping[str, Any]) -> None:
        """A model_quality rule whose ``direction`` points the other way from the detector's
        one-sided p-value: it tests "worse than the threshold" (absolute) or "worse than the
        baseline" (value is the degradation), so ``alpha`` would gate the wrong side."""
        from rollbackd.detectors.model_quality_measure import ALIASES, METRICS

        params = kw.get("params", {})
        metric = ALIASES.get(params.get("metric"), params.get("metric"))
        spec = METRICS.get(metric)  # type: ignore[arg-type]
        if spec is None or spec.better == "either":
            return  # positive_rate and bias: a two-sided p-value, valid either way
        direction = kw.get("direction", "above")
        threshold = fmt_num(kw["threshold"])
        if params.get("baseline", "absolute") != "absolute":
            if direction == "below":
                message = (
                    f"with baseline: {params['baseline']} the value is the degradation of "
                    f"{metric} (positive is worse) and the p-value tests for a degradation; "
                    "write direction: above"
                )
            else:
                return
        elif spec.better == "higher" and direction == "above":
            message = (
                f"{metric} is higher-is-better: direction: above fires when it rises above "
                f"{threshold}, while the detector's p-value tests {metric} < {threshold}; for a "
                "floor write direction: below"
            )
        elif spec.better == "lower" and direction == "below":
            message = (
                f"{metric} is lower-is-better: direction: below fires when it falls below "
                f"{threshold}, while the detector's p-value tests {metric} > {threshold}; for a "
                "ceiling write direction: above"
            )
        else:
            return
        key = "direction" if "direction" in pairs else "threshold"
        self.read.warn(pairs[key][1], sub(path, key), message)

    def valid_rule_warnings(
        self, pairs: Pairs, path: str, kw: Mapping[str, Any], detector: Any, window: WindowSpec
    ) -> None:
        """Warnings that only make sense once the rule is valid."""
        if detector == "canary" and "variants" not in kw:
            self.read.warn(
                pairs["detector"][1],
                sub(path, "detector"),
                "a canary rule without `variants` also runs on the baseline arm, where it has "
                "nothing to compare and a rollback would hit the wrong arm; set "
                "`variants: [canary]`",
            )
        self.period_warning(pairs, path, kw, window)
        if detector == "model_quality":
            self.quality_direction_warning(pairs, path, kw)
        if "for_" in kw and kw["for_"] % window.step:
            effective = math.ceil(kw["for_"] / window.step) * window.step
            key = "for" if "for" in pairs else "for_windows"
            self.read.warn(
                pairs[key][1],
                sub(path, key),
                f"{format_duration(kw['for_'])} is not a multiple of window.step "
                f"({format_duration(window.step)}): rules are evaluated once per step, so it acts "
                f"as {format_duration(effective)}",
            )
