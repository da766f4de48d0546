"""The rules file, as frozen settings. Loading and validation live in ``rules/loader.py``.

Durations are seconds (the YAML accepts ``30s``, ``5m``, ``2h``, ``1d``, ``1h30m`` or a number).
Nothing here mutates after load; moving state (alert states, incidents) lives elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any, Literal, Mapping

__all__ = [
    "SEVERITIES",
    "severity_rank",
    "WindowSpec",
    "BackendSpec",
    "NotifierSpec",
    "RouteMatch",
    "RouteSpec",
    "DigestSpec",
    "FalseAlarmBudget",
    "DeploymentSpec",
    "LabelMatcher",
    "LabelSelector",
    "name_matches",
    "is_glob",
    "RuleSpec",
    "GroupingSpec",
    "InhibitRule",
    "MATCH_LABELS",
    "Settings",
    "Config",
]

SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("notify", "rollback")
# The names a rules file may use; actions/factory.py builds one of each.
BACKEND_TYPES = ("log", "webhook", "mlflow", "kubernetes", "command", "traffic-file")
NOTIFIER_TYPES = ("console", "slack", "none", "alertmanager", "pagerduty", "opsgenie", "webhook")
# The labels an incident may be grouped by.
GROUP_LABELS = ("rule", "deployment", "variant", "severity")
# The arms that serve the established version: what a canary is compared with (model_quality's
# stable baseline) and falls back to when it has no known-good version of its own.
STABLE_ARMS = ("stable", "primary")


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def _frozen(m: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(m or {}))


DEFAULT_SLICE_TOP_K = 10
MAX_SLICE_TOP_K = 100


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """Event-time window: ``size`` seconds long, advancing by ``step`` (``step == size``: tumbling).

    ``min_count`` optionally extends a window until it holds that many predictions
    (count-based windows); 0 means purely time-based.
    """

    size: float = 60.0
    step: float = 60.0
    min_count: int = 0

    @property
    def tumbling(self) -> bool:
        return self.step == self.size


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A rollback backend chosen by name (``log``, ``webhook``, ...) and its options."""

    type: str = "log"
    options: Mapping[str, Any] = field(default_factory=lambda: _frozen(None))


@dataclass(frozen=True, slots=True)
class DigestSpec:
    """A digest of the incidents since the previous one, posted at each time the 5-field
    ``cron`` expression names in ``timezone`` (an IANA name). Live daemon only."""

    cron: str
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class NotifierSpec:
    """Where notices go: ``console`` (default), ``slack`` or ``none``; ``digest``: when to post
    a digest of the incidents there."""

    type: str = "console"
    options: Mapping[str, Any] = field(default_factory=lambda: _frozen(None))
    digest: DigestSpec | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Which notices a route takes (``settings.notifiers[].match``): those of incidents at one of
    ``severities``, or (``escalation``) every escalation whatever its severity; either is
    enough. ``deployments`` (names or globs) narrows both. Nothing set: every notice."""

    severities: tuple[str, ...] | None = None
    escalation: bool = False
    deployments: tuple[str, ...] | None = None

    @property
    def everything(self) -> bool:
        return self.severities is None and not self.escalation


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One of several notifiers, and the notices it takes."""

    notifier: NotifierSpec
    match: RouteMatch = RouteMatch()


@dataclass(frozen=True, slots=True)
class FalseAlarmBudget:
    """How often a deployment may be wrongly alerted: at most ``rollbacks`` false rollbacks
    and/or ``alerts`` false alerts (notified or acted on) per ``per`` seconds, in expectation.

    ``rules/budget.py`` turns it into each rule's per-evaluation ``alpha``.
    """

    per: float
    rollbacks: float | None = None
    alerts: float | None = None


# A Slack user id: U… (a user), W… (an Enterprise Grid user). Slack's buttons match people by
# id only: a user name is chosen by its owner and is not unique.
SLACK_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")

DEPLOYMENT_POLICIES = ("rollback", "freeze", "notify-only")
APPROVAL_DEFAULTS = ("approve", "reject")


@dataclass(frozen=True, slots=True)
class ApprovalSpec:
    """A rollback waits for one of ``approvers`` to approve or reject it; after ``timeout``
    seconds with no answer, ``default`` applies."""

    approvers: tuple[str, ...]
    timeout: float = 900.0
    default: str = "reject"


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    name: str
    backend: BackendSpec = BackendSpec()
    slack_channel: str | None = None
    # Slack user ids who may Acknowledge / Silence its incidents (empty: anyone in the channel).
    slack_responders: tuple[str, ...] = ()
    runbook: str | None = None
    reference: str | None = None  # path to a reference JSONL file of prediction events
    reference_size: int = 5000  # else: the first N predictions of the running version
    cooldown: float = 1800.0  # no second rollback of this deployment within it
    known_good_after: float = 600.0  # a version is known-good after this long without incident
    known_good_min_predictions: int = 1000  # ...and after serving at least this many predictions
    dry_run: bool | None = None
    false_alarm_budget: FalseAlarmBudget | None = None
    policy: str = "rollback"  # rollback | freeze | notify-only
    # Loop guard: at most this many rollbacks of the deployment per `loop_period` (None: any).
    max_rollbacks: int | None = 3
    loop_period: float = 86400.0
    verify_within: float = 900.0  # after a rollback, its alerts must resolve within this
    approval: ApprovalSpec | None = None  # None: rollbacks run without waiting
    # What rules select it by (``team: risk``); a deployment seen only in the stream has none.
    labels: Mapping[str, str] = field(default_factory=lambda: _frozen(None))


# fnmatch's special characters: a pattern without one is a plain name.
GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    return not GLOB_CHARS.isdisjoint(pattern)


def name_matches(patterns: tuple[str, ...], name: str) -> bool:
    """Whether ``name`` is one of ``patterns`` or matches one of its fnmatch globs
    (case-sensitively: ``Fraud-*`` is not ``fraud-*``, as deployment names are compared)."""
    return any(p == name or (is_glob(p) and fnmatchcase(name, p)) for p in patterns)


# Alertmanager's matcher operators; a label name as Prometheus spells one.
MATCHER_OPS = ("=", "!=", "=~", "!~")
LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class LabelMatcher:
    """One Alertmanager matcher, ``team!="risk"`` or ``task=~"bin.*"``: as in Alertmanager a
    missing label has the value ``""`` and a regex must match the whole value."""

    label: str
    op: str  # one of MATCHER_OPS
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        got = labels.get(self.label, "")
        if self.op in ("=", "!="):
            return (got == self.value) == (self.op == "=")
        return (re.fullmatch(self.value, got) is not None) == (self.op == "=~")

    def __str__(self) -> str:
        quoted = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.label}{self.op}"{quoted}"'


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A rule's choice of deployments by their labels: every one of ``labels`` (label -> the
    values allowed, matched as inhibit rules match) and every one of ``matchers``.

    Only declared deployments have labels, so the loader resolves the selector once into
    ``selected``, the names of the declared deployments it matches: no deployment seen only
    in the stream is ever selected by label.
    """

    labels: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen(None))
    matchers: tuple[LabelMatcher, ...] = ()
    selected: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return _matches(self.labels, labels) and all(m.matches(labels) for m in self.matchers)

    def __str__(self) -> str:
        parts = [f"{k}={'|'.join(v)}" for k, v in self.labels.items()]
        return ", ".join(parts + [str(m) for m in self.matchers])


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One alerting rule: a detector, a condition with hysteresis, timing and actions.

    The alert is *breaching* when ``value`` is beyond ``threshold`` in ``direction`` (and, if
    ``alpha`` is set and the detector reports a p-value, ``p_value < alpha``); once active it
    stays active until ``value`` is back past ``clear_threshold`` (hysteresis).

    ``alpha_source`` is ``"budget"`` when ``alpha`` was set from a deployment's false-alarm
    budget (see ``rules/budget.py``), ``None`` when it was written in the file or is unset.
    ``weight`` is the rule's share of such a budget relative to the others.
    """

    name: str
    detector: str
    threshold: float
    params: Mapping[str, Any] = field(default_factory=lambda: _frozen(None))
    clear_threshold: float | None = None
    direction: Literal["above", "below"] = "above"
    alpha: float | None = None
    window: WindowSpec = WindowSpec()
    for_: float = 0.0
    keep_firing_for: float = 0.0
    k: int = 1
    n: int = 1
    min_samples: int = 1
    severity: str = "warning"
    actions: tuple[str, ...] = ("notify",)
    # Names and fnmatch globs (``fraud-*``); None: every deployment seen.
    deployments: tuple[str, ...] | None = None
    # Labels the deployment must have as well; None: any (it is not chosen by label).
    deployment_labels: LabelSelector | None = None
    variants: tuple[str, ...] | None = None  # names and globs; None: every variant seen
    dry_run: bool | None = None
    summary: str | None = None
    runbook: str | None = None
    weight: float = 1.0
    alpha_source: Literal["budget"] | None = None
    # Whether an incident of this rule marks the serving version bad (no longer a rollback
    # target). None: the rule's own verdict, i.e. it rolls back; a notify-only warning does not.
    marks_bad: bool | None = None
    # Evaluate per slice of the traffic ("attrs.region", "features.country"): the largest
    # ``slice_top_k`` slices of each window on their own, the rest together as "other".
    slice_by: tuple[str, ...] = ()
    slice_top_k: int = DEFAULT_SLICE_TOP_K

    @property
    def marks_version_bad(self) -> bool:
        return "rollback" in self.actions if self.marks_bad is None else self.marks_bad

    @property
    def clear(self) -> float:
        return self.threshold if self.clear_threshold is None else self.clear_threshold

    # applies_to runs per rule for every window: a glob is matched once per name, then the
    # verdict is looked up. A memo, not state: it follows from the frozen fields alone.
    _verdicts: dict[tuple[str, str], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def covers(self, deployment: str) -> bool:
        """Whether the rule's ``deployments`` (names, globs and labels) take in ``deployment``."""
        return (self.deployments is None or name_matches(self.deployments, deployment)) and (
            self.deployment_labels is None or deployment in self.deployment_labels.selected
        )

    def applies_to(self, deployment: str, variant: str) -> bool:
        key = (deployment, variant)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = self.covers(deployment) and (
                self.variants is None or name_matches(self.variants, variant)
            )
        return verdict

    @property
    def reaches_undeclared(self) -> bool:
        """Whether a deployment that is not declared (seen only in the stream) can be covered:
        never when chosen by label; by a glob, or by no ``deployments`` at all, it can."""
        if self.deployment_labels is not None:
            return False
        return self.deployments is None or any(map(is_glob, self.deployments))

    @property
    def needs_labels(self) -> bool:
        if self.detector in LABEL_DETECTORS:
            return True
        if self.detector == "canary":
            return self.params.get("metric") == "calibration"
        if self.detector == "sequential":
            return self.params.get("signal") == "model_error"
        return False


LABEL_DETECTORS = frozenset({"model_error", "model_quality", "calibration"})
# Detectors judged on the whole window even when several versions served it: a share of the
# traffic is not a window of less traffic (no-data alarms), and the alibi detectors hold models
# too large to copy for a probe.
WHOLE_WINDOW_DETECTORS = frozenset({"traffic", "alibi_mmd", "alibi_lsdd", "alibi_cvm_online"})
# Where ``slice_by`` reads a slice's value from: a prediction's attrs or one of its features.
SLICE_SOURCES = ("attrs", "features")


@dataclass(frozen=True, slots=True)
class GroupingSpec:
    """How firing alerts become incidents (Alertmanager's ``group_by`` and timers)."""

    group_by: tuple[str, ...] = ("deployment", "variant")
    group_wait: float = 30.0
    repeat_interval: float = 4 * 3600.0


MATCH_LABELS = ("rule", "detector", "severity", "deployment", "variant")


@dataclass(frozen=True, slots=True)
class InhibitRule:
    """Alertmanager-style inhibition: while a *source* is active, matching *target* alerts
    are recorded but neither notify nor act.

    The source is either firing alerts matching ``source`` (label -> allowed values), or,
    with ``source_rollback``, an open incident whose rollback has run. ``equal`` names the
    labels source and target must share (at least the deployment).
    """

    name: str
    target: Mapping[str, tuple[str, ...]]
    source: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen(None))
    source_rollback: bool = False
    equal: tuple[str, ...] = ("deployment",)

    def targets(self, labels: Mapping[str, str]) -> bool:
        return _matches(self.target, labels)

    def is_source(self, labels: Mapping[str, str]) -> bool:
        return bool(self.source) and _matches(self.source, labels)


def _matches(matchers: Mapping[str, tuple[str, ...]], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) in allowed for k, allowed in matchers.items())


@dataclass(frozen=True, slots=True)
class Settings:
    dry_run: bool = False  # the default level: a deployment's or rule's dry_run overrides it
    # Set by the command line's --dry-run, never by a rules file: every rollback is dry,
    # whatever a deployment or rule says (an operator's override must not be overridden).
    force_dry_run: bool = False
    lateness: float = 30.0
    join_horizon: float = 86400.0
    max_pending_labels: int = 2_000_000
    max_event_bytes: int = 1 << 20
    # Event time that one bad clock cannot move (``daemon/admission.py``): an event stamped
    # further ahead of the reference clock than this is dead-lettered as future_timestamp.
    max_future_skew: float = 300.0
    min_event_time: float = 946_684_800.0  # 2000-01-01T00:00:00Z: older is too_old
    # Cardinality caps: names beyond them are dead-lettered (reason cardinality).
    max_deployments: int = 10_000
    max_variants_per_deployment: int = 16
    max_features_per_deployment: int = 1_000
    notifier: NotifierSpec = NotifierSpec()
    # Several notifiers with routing (``settings.notifiers``); when set, ``notifier`` is unused.
    notifiers: tuple[RouteSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    settings: Settings = Settings()
    deployments: Mapping[str, DeploymentSpec] = field(default_factory=lambda: _frozen(None))
    rules: tuple[RuleSpec, ...] = ()
    grouping: GroupingSpec = GroupingSpec()
    inhibit_rules: tuple[InhibitRule, ...] = ()
    source: str | None = None  # path of the file it was loaded from

    def deployment(self, name: str) -> DeploymentSpec:
        """The configured deployment, or defaults (log backend) for one seen only in the stream."""
        spec = self.deployments.get(name)
        return spec if spec is not None else DeploymentSpec(name=name)
