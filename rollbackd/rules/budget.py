"""The false-alarm budget: from "at most one false rollback per 30 days" to each test's level.

A deployment states ``false_alarm_budget: {rollbacks: B, per: T}`` (and/or ``alerts: B``). The
budget is split over the rules that spend it, by ``weight`` (equal by default): rules with the
``rollback`` action spend ``rollbacks``, every rule that notifies or acts spends ``alerts``.
A rule's share ``s = B · weight / (sum of weights)`` bounds the *firings* (alerts) it may
cause per period, on each of its ``streams`` (the variants it lists, 1 when it lists none)::

    evaluations · streams · R(alpha) <= s,   evaluations = T / window.step

``R(alpha)`` is the most firings per evaluation the alert state machine can produce when each
evaluation breaches (``value`` beyond ``threshold`` and ``p < alpha``) with probability at most
``alpha`` (the detector's p-value is valid under no fault): ``rules/firing.py`` models
``rules.alerts.step`` as a renewal chain, with ``for`` (``m`` windows in a row), ``k_of_n``
(the chain over the last ``n`` results) and ``keep_firing_for`` (``r`` windows without a hold
resolve), exactly for tumbling windows under independence. Once an episode opened, hysteresis
lets it continue on ``value`` beyond ``clear_threshold`` alone, whose probability ``q`` the
level does not bound, so ``R`` is the worst case over ``q``. Where verdicts are correlated,
on sliding windows (``step < size``) or with a detector that tests every window against shared
data (a reference, a pooled baseline, the release so far: :data:`_SHARED`), ``R`` is a looser
bound, ``min(alpha, 1 / (m + r))``, and is reported as one. The rule's level is the largest
``alpha`` that keeps within its share (bisection: ``R`` grows with ``alpha``); with ``for: 0``
and no ``keep_firing_for`` it is ``s / (evaluations · streams)`` to first order
(``R(alpha) = alpha / (1 + alpha)``), as a per-window Bonferroni split would give, and ``for``
and ``keep_firing_for`` raise it. Summed over rules the expected false
alerts are at most ``B``. Within a drift rule the level is family-wise: its Holm or Bonferroni
correction splits it over the features.

Only detectors that report a valid p-value can be held to a level; the others are listed as
not covered (with the reason when a parameter of their own sets their false alarms, as
``alibi_cvm_online``'s ``ert`` does). A rule that sets ``alpha`` itself keeps it, with a
warning when it exceeds its share. A resampled p-value ``(1 + k) / (B + 1)`` (``alibi_mmd``,
``alibi_lsdd``, ``calibration``'s ``ece_drift``) is never below ``1 / (B + 1)``, so a level at
or below that can never be met: :func:`unreachable_level` says so, and how many resamples would
do. Pure functions of the frozen config: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from rollbackd.rules.durations import format_duration
from rollbackd.rules.firing import FiringModel
from rollbackd.rules.model import DeploymentSpec, FalseAlarmBudget, RuleSpec

__all__ = [
    "WEEK",
    "Allocation",
    "BudgetNote",
    "Estimate",
    "reports_p_value",
    "smallest_p_value",
    "unreachable_level",
    "allocate",
    "apply_budgets",
    "expected_false_alerts",
    "estimate",
    "budget_lines",
]

WEEK = 7 * 86400.0

# Which detector configurations report a p-value the rule's ``alpha`` can gate on.
_P_VALUE: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "error_rate": lambda p: True,
    "model_error": lambda p: p.get("task", "auto") != "regression",
    # every metric and baseline has a one-sided test (detectors/model_quality.py)
    "model_quality": lambda p: True,
    "drift": lambda p: True,
    "calibration": lambda p: p.get("metric", "ece") in ("spiegelhalter", "ece_drift"),
    "canary": lambda p: True,
    # permutation p-value, (1 + k) / (n_permutations + 1): valid, and floored (_RESAMPLED)
    "alibi_mmd": lambda p: True,
    "alibi_lsdd": lambda p: True,
}

# Detectors left out of the split because their false alarms are controlled by a parameter of
# their own, not by a level: why, as validate says it.
_OWN_CONTROL: dict[str, str] = {
    "alibi_cvm_online": (
        "its false alarms are set by params.ert, about one per ert events on a stream like the "
        "reference, and a budget per period cannot be turned into ert without knowing the "
        "event rate"
    ),
}


# What every window's test shares with the others, by detector configuration: their verdicts
# are correlated, so rules/firing.py bounds their firings by the level alone. The rest test each
# window on its own data (and another arm's in the same window).
_SHARED: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "error_rate": lambda p: "a pooled baseline" if p.get("mode") == "baseline" else None,
    "drift": lambda p: "a shared reference",
    "calibration": lambda p: "a shared reference" if p.get("metric") == "ece_drift" else None,
    "model_quality": lambda p: {
        "reference": "a shared reference", "previous_version": "the previous version's labels",
    }.get(p.get("baseline", "absolute")),
    "canary": lambda p: "a test over the whole release",
    "alibi_mmd": lambda p: "a shared reference",
    "alibi_lsdd": lambda p: "a shared reference",
}


def _model(rule: RuleSpec) -> FiringModel:
    shared = _SHARED.get(rule.detector)
    return FiringModel.of(rule, shared(rule.params) if shared else None)


def reports_p_value(rule: RuleSpec) -> bool:
    """Whether the rule's detector, as configured, reports a p-value its ``alpha`` can gate."""
    check = _P_VALUE.get(rule.detector)
    return bool(check and check(rule.params))


# Detectors whose p-value is resampled, ``(1 + k) / (B + 1)``: when it is (by their params),
# the parameter that is ``B``, its default and its largest valid value (the detectors'
# constructors enforce the same range; they are not imported here, see loader.known_detectors).
_RESAMPLED: dict[str, tuple[Callable[[Mapping[str, Any]], bool], str, int, int]] = {
    "calibration": (lambda p: p.get("metric") == "ece_drift", "resamples", 200, 10_000),
    "alibi_mmd": (lambda p: True, "n_permutations", 100, 100_000),
    "alibi_lsdd": (lambda p: True, "n_permutations", 100, 100_000),
}


def _resamples(detector: str, params: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """The resampling parameter's name, value and largest valid value, if the p-value is one."""
    entry = _RESAMPLED.get(detector)
    if entry is None or not entry[0](params):
        return None
    _, name, default, largest = entry
    b = params.get(name, default)
    if type(b) is not int or b < 1:
        return None  # the detector rejects it, with the valid range
    return name, b, largest


def smallest_p_value(rule: RuleSpec) -> float:
    """The smallest p-value the detector can report (0 for continuous tests)."""
    found = _resamples(rule.detector, rule.params)
    return 0.0 if found is None else 1.0 / (found[1] + 1)


def unreachable_level(
    detector: str, params: Mapping[str, Any], alpha: float, *, from_budget: bool = False
) -> str | None:
    """Why a rule at level ``alpha`` can never breach, and the fix; ``None`` when it can.

    A breach needs ``p_value < alpha`` and a resampled p-value is never below ``1 / (B + 1)``;
    the fix is the smallest ``B`` with ``1 / (B + 1) < alpha``, or a larger ``alpha`` (the
    budget, when it set the level) if that ``B`` is beyond the parameter's range.
    """
    found = _resamples(detector, params)
    if found is None:
        return None
    name, b, largest = found
    floor = 1.0 / (b + 1)
    if floor < alpha:
        return None
    need = max(1, math.floor(1.0 / alpha) - 1)
    while 1.0 / (need + 1) >= alpha:  # floor() of a rounded 1/alpha may be one short
        need += 1
    level = f"alpha {alpha:g}" + (" (from the false-alarm budget)" if from_budget else "")
    if need <= largest:
        fix = f"raise params.{name} to at least {need}"
    else:
        fix = (
            f"{name} can be at most {largest}, enough for alpha > {1.0 / (largest + 1):.3g}: "
            f"raise {'the budget' if from_budget else 'alpha'}"
        )
    return (
        f"its smallest possible p-value ({floor:.3g}) is not below {level}: with {name} {b} it "
        f"is 1/({b} + 1), so the rule can never breach; {fix}"
    )


@dataclass(frozen=True, slots=True)
class Allocation:
    """One rule's share of one deployment's budget, and the level it implies."""

    rule: str
    deployment: str
    kind: str  # "rollbacks" or "alerts"
    share: float  # expected false alerts per period allotted to the rule
    per: float  # the period, seconds
    evaluations: float  # per period and stream: per / window.step
    streams: int
    alpha: float  # per evaluation: the largest level whose firings stay within the share


@dataclass(frozen=True, slots=True)
class BudgetNote:
    """Something the user should know about how a budget applies (a loader warning)."""

    rule: str | None
    deployment: str
    message: str


def _streams(rule: RuleSpec) -> int:
    return len(rule.variants) if rule.variants else 1


def _spends(rule: RuleSpec, kind: str) -> bool:
    if kind == "rollbacks":
        return "rollback" in rule.actions
    return bool(rule.actions)


def _applies(rule: RuleSpec, deployment: str) -> bool:
    return rule.covers(deployment)


def allocate(
    deployments: Mapping[str, DeploymentSpec], rules: Sequence[RuleSpec]
) -> tuple[list[Allocation], list[BudgetNote]]:
    """Every rule's share of every budget it spends, and what the budget cannot cover."""
    out: list[Allocation] = []
    notes: list[BudgetNote] = []
    for dep in deployments.values():
        budget = dep.false_alarm_budget
        if budget is None:
            continue
        uncovered: dict[str, list[str]] = {}  # rule -> the budgets it would spend
        for kind in ("rollbacks", "alerts"):
            amount = getattr(budget, kind)
            if amount is None:
                continue
            spenders = [r for r in rules if _applies(r, dep.name) and _spends(r, kind)]
            gated = [r for r in spenders if reports_p_value(r)]
            for r in spenders:
                if r not in gated:
                    uncovered.setdefault(r.name, []).append(kind)
            total = sum(r.weight for r in gated)
            for r in gated:
                share = amount * r.weight / total
                evaluations = budget.per / r.window.step
                per_evaluation = share / (evaluations * _streams(r))
                alpha = _model(r).level(per_evaluation)
                out.append(Allocation(
                    r.name, dep.name, kind, share, budget.per, evaluations, _streams(r), alpha
                ))
        for name, kinds in uncovered.items():
            detector = next(r.detector for r in rules if r.name == name)
            why = f": {_OWN_CONTROL[detector]};" if detector in _OWN_CONTROL else " here,"
            notes.append(BudgetNote(
                name, dep.name,
                f"detector {detector} reports no p-value{why} so the {' and '.join(kinds)} "
                f"budget{'s' if len(kinds) > 1 else ''} of {dep.name} cannot bound its false "
                "alerts (they are not counted)",
            ))
    return out, notes


def apply_budgets(
    deployments: Mapping[str, DeploymentSpec], rules: Sequence[RuleSpec]
) -> tuple[tuple[RuleSpec, ...], list[BudgetNote]]:
    """The rules with ``alpha`` set from the budgets, and the notes (warnings) on the way.

    A rule without ``alpha`` gets the smallest level any of its allocations implies
    (``alpha_source="budget"``); one with its own ``alpha`` keeps it, with a note when it
    exceeds that level.
    """
    allocations, notes = allocate(deployments, rules)
    by_rule: dict[str, list[Allocation]] = {}
    for a in allocations:
        by_rule.setdefault(a.rule, []).append(a)
    out = []
    for r in rules:
        mine = by_rule.get(r.name)
        if not mine:
            out.append(r)
            continue
        tightest = min(mine, key=lambda a: a.alpha)
        own = r.alpha is not None and r.alpha_source != "budget"
        if own:
            assert r.alpha is not None
            if r.alpha > tightest.alpha * (1 + 1e-12):
                notes.append(BudgetNote(
                    r.name, tightest.deployment,
                    f"alpha {r.alpha:g} exceeds the {tightest.kind} budget of "
                    f"{tightest.deployment}: its share ({tightest.share:g} per "
                    f"{_period(tightest.per)}) allows alpha <= {tightest.alpha:.3g}; "
                    f"expect up to {_firings(r, r.alpha, tightest.per):.3g} false "
                    f"{tightest.kind} per {_period(tightest.per)} from this rule",
                ))
            alpha = r.alpha
        else:
            alpha = tightest.alpha
            r = replace(r, alpha=alpha, alpha_source="budget")
        # A rule's own alpha is checked as the loader reads the rule (even when the rule has
        # other errors); the one the budget sets, here.
        if not own:
            unreachable = unreachable_level(r.detector, r.params, alpha, from_budget=True)
            if unreachable is not None:
                notes.append(BudgetNote(r.name, tightest.deployment, unreachable))
        if r.detector == "drift" and r.params.get("correction", "holm") in ("bh", "none"):
            notes.append(BudgetNote(
                r.name, tightest.deployment,
                f"correction {r.params.get('correction')} does not control the family-wise "
                "error over features, so the budget is not guaranteed; use holm or bonferroni",
            ))
        out.append(r)
    return tuple(out), notes


def _deployment_count(rule: RuleSpec, deployments: Mapping[str, DeploymentSpec]) -> int:
    """The declared deployments the rule covers (names, globs, labels); at least one when a
    deployment seen only in the stream can join them."""
    covered = sum(1 for name in deployments if rule.covers(name))
    return max(1, covered) if rule.reaches_undeclared else covered


def drift_level(rule: RuleSpec) -> float | None:
    """The level a ``drift`` rule's own parameters hold each evaluation to, without a rule
    ``alpha``: its value is the largest effect among *drifted* features (0 if none), so with a
    threshold at or above 0 a breach needs one, and under Holm or Bonferroni the chance that
    any feature is flagged under no drift is at most ``params.alpha`` (family-wise). ``bh``
    and ``none`` do not bound it."""
    if rule.detector != "drift" or rule.direction != "above" or rule.threshold < 0:
        return None
    if rule.params.get("correction", "holm") not in ("holm", "bonferroni"):
        return None
    level = rule.params.get("alpha", 0.01)
    return float(level) if isinstance(level, (int, float)) and 0 < level < 1 else None


def _level(rule: RuleSpec) -> tuple[float, str] | None:
    """The per-evaluation level that bounds the rule's false breaches, and where it comes from."""
    if not reports_p_value(rule):
        return None
    own = drift_level(rule)
    if rule.alpha is not None and (own is None or rule.alpha <= own):
        return rule.alpha, ", from the budget" if rule.alpha_source == "budget" else ""
    if own is not None:
        return own, f", params.alpha under {rule.params.get('correction', 'holm')}"
    return None


def _firings(rule: RuleSpec, alpha: float, period: float) -> float:
    """The most false alerts per ``period`` on each deployment at level ``alpha``."""
    own = drift_level(rule)
    level = alpha if own is None else min(alpha, own)
    rate = _model(rule).worst_rate(level)
    return rate * period / rule.window.step * _streams(rule)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A rule's expected false alerts per period under no fault, over all its streams.

    ``alerts`` is the upper bound (the worst case over how often the value stays past
    ``clear_threshold``); ``if_half`` the same when that is at most half the evaluations
    (``None`` when the rule's timing makes no difference); ``loose`` why the bound is not
    the exact worst case (``None``: exact for tumbling windows of independent data).
    """

    alerts: float
    level: float
    source: str
    model: FiringModel
    loose: str | None
    if_half: float | None


def estimate(
    rule: RuleSpec, deployments: Mapping[str, DeploymentSpec], period: float = WEEK
) -> Estimate | None:
    """The rule's expected false alerts per ``period`` (all its deployments and listed
    variants), or ``None`` when nothing bounds it (no ``alpha``, or no p-value)."""
    level = _level(rule)
    if level is None:
        return None
    model = _model(rule)
    evaluations = period / rule.window.step * _streams(rule) * _deployment_count(rule, deployments)
    alerts = model.worst_rate(level[0]) * evaluations
    if_half = None
    if model.m > 1 or model.r > 1:
        if_half = model.worst_rate(level[0], 0.5) * evaluations
    return Estimate(alerts, level[0], level[1], model, model.loose, if_half)


def expected_false_alerts(
    rule: RuleSpec, deployments: Mapping[str, DeploymentSpec], period: float = WEEK
) -> float | None:
    """Upper bound on the rule's expected false alerts per ``period`` (all its deployments and
    listed variants), or ``None`` when nothing bounds it (no ``alpha``, or no p-value)."""
    e = estimate(rule, deployments, period)
    return None if e is None else e.alerts


def _timing(model: FiringModel) -> str:
    """What the rule's timing asks of a false alert, in windows."""
    parts = []
    if model.n > 1:
        parts.append(f"opens on {model.k} of {model.n}")
    if model.m > 1:
        parts.append(f"{model.m} windows in a row")
    if model.r > 1:
        parts.append(f"resolves after {model.r} clear windows")
    return "; " + ", ".join(parts) if parts else ""


def budget_lines(
    rules: Sequence[RuleSpec], deployments: Mapping[str, DeploymentSpec]
) -> list[str]:
    """``rollbackd validate``'s account of the false alerts per week the configuration implies."""
    lines = ["expected false alerts per week (upper bounds, under no fault):"]
    total = 0.0
    unbounded = 0
    for r in rules:
        e = estimate(r, deployments)
        if e is None:
            unbounded += 1
            why = "no p-value" if not reports_p_value(r) else "no alpha"
            lines.append(f"  {r.name}: not bounded ({why})")
            continue
        total += e.alerts
        said = f"alpha {e.level:.3g}{e.source}{_timing(e.model)}"
        if e.loose is not None:
            said += f"; {e.loose}: a looser bound"
        if e.if_half is not None and e.if_half < 0.9 * e.alerts:
            said += (
                f"; {_fmt(e.if_half)} if its value is past clear_threshold in at most half "
                "the windows"
            )
        lines.append(f"  {r.name}: {_fmt(e.alerts)} ({said})")
    lines.append(
        f"  total: {_fmt(total)}"
        + (
            f" from {len(rules) - unbounded} bounded rule(s); {unbounded} not bounded"
            if unbounded
            else ""
        )
    )
    for dep in deployments.values():
        b: FalseAlarmBudget | None = dep.false_alarm_budget
        if b is None:
            continue
        kinds = [k for k in ("rollbacks", "alerts") if getattr(b, k) is not None]
        parts = [f"{_fmt(getattr(b, k))} {k}" for k in kinds]
        weekly = [f"{_fmt(getattr(b, k) * WEEK / b.per)} {k}/week" for k in kinds]
        lines.append(
            f"  budget of {dep.name}: {' and '.join(parts)} per {_period(b.per)} "
            f"(= {', '.join(weekly)})"
        )
    return lines


def _period(seconds: float) -> str:
    """A budget period as people write it: ``30d`` rather than ``4w2d``."""
    days, rest = divmod(seconds, 86400.0)
    return f"{int(days)}d" if days and not rest else format_duration(seconds)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if x >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2e}"

