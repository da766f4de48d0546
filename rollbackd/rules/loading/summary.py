"""What ``rollbackd validate`` prints for a valid rules file."""

from __future__ import annotations

from dataclasses import dataclass

from rollbackd.rules.budget import budget_lines
from rollbackd.rules.durations import format_duration, parse_duration
from rollbackd.rules.loading.reader import fmt_num
from rollbackd.rules.model import Config, DeploymentSpec, RuleSpec, Settings, is_glob


def _safety(dep: DeploymentSpec, global_dry_run: bool) -> list[str]:
    """A deployment's backend and safety rails, as ``validate`` lists them."""
    kind = dep.backend.options.get("kind")
    out = [f"backend {dep.backend.type}" + (f" ({kind})" if kind else ""), f"policy {dep.policy}",
           f"cooldown {format_duration(dep.cooldown)}"]
    if dep.max_rollbacks is None:
        out.append("no loop guard")
    else:
        out.append(f"loop guard {dep.max_rollbacks} per {format_duration(dep.loop_period)}")
    a = dep.approval
    out.append("no approval" if a is None else
               f"approval by {'/'.join(a.approvers)} within {format_duration(a.timeout)} else {a.default}")
    out.append(f"verify within {format_duration(dep.verify_within)}")
    out.append(f"known-good after {format_duration(dep.known_good_after)} "
               f"and {dep.known_good_min_predictions} predictions")
    if dep.dry_run is None:
        out.append(f"dry run {'on' if global_dry_run else 'off'} (global)")
    else:
        out.append(f"dry run {'on' if dep.dry_run else 'off'}")
    if dep.reference:
        out.append(f"reference {dep.reference}")
    return out


def _scope(rule: RuleSpec) -> str:
    """The rule's ``deployments`` as written: names, globs and label matchers."""
    parts = [] if rule.deployments is None else [", ".join(rule.deployments)]
    if rule.deployment_labels is not None:
        parts.append(f"labels {rule.deployment_labels}")
    return " with ".join(parts) or "all deployments"


def _covers(rule: RuleSpec, config: Config) -> str | None:
    """Which deployments a rule chosen by glob, label or not at all covers: the declared ones
    it matches, and whether deployments seen only in the stream can join them. ``None`` for a
    plain list of names (the rule's line already says it)."""
    plain = rule.deployments is not None and not any(map(is_glob, rule.deployments))
    if plain and rule.deployment_labels is None:
        return None
    globs = ", ".join(p for p in rule.deployments or () if is_glob(p))
    if not config.deployments:  # nothing declared: every deployment comes from the stream
        return f"covers any deployment seen in the stream matching {globs}" if globs else None
    names = [d for d in config.deployments if rule.covers(d)]
    out = f"covers {len(names)} of {len(config.deployments)} declared"
    if names:
        out += ": " + ", ".join(names)
    if rule.reaches_undeclared:
        if rule.deployments is None:
            out += "; plus any undeclared deployment seen in the stream"
        else:
            out += f"; plus any undeclared deployment matching {globs}"
    return out


def _quality_metric(rule: RuleSpec) -> str:
    """What a model_quality rule compares: ``recall``, ``recall (previous_version − window)``."""
    from rollbackd.detectors.model_quality_measure import ALIASES, METRICS

    p = rule.params
    metric = ALIASES.get(p.get("metric"), p.get("metric"))
    spec = METRICS.get(metric)  # type: ignore[arg-type]
    if spec is None:
        return str(metric)
    name = f"{metric}({p['class']})" if metric == "class_recall" and "class" in p else metric
    baseline = p.get("baseline", "absolute")
    if baseline == "absolute":
        return name
    if baseline == "same_time":
        period = p.get("period")
        try:
            period = format_duration(parse_duration(period))
        except ValueError:
            pass
        baseline = f"same_time {period}"
    elif baseline == "stable":
        baseline = p.get("baseline_variant") or "stable"
    if spec.better == "higher":
        return f"{name} ({baseline} − window)"
    if spec.better == "lower":
        return f"{name} (window − {baseline})"
    return f"{name} |window − {baseline}|"


def _notifiers(s: Settings) -> str:
    if not s.notifiers:
        return f"notifier {s.notifier.type}"
    routes = []
    for r in s.notifiers:
        m = r.match
        takes = [*(m.severities or ()), *(["escalations"] if m.escalation else [])]
        where = f" of {', '.join(m.deployments)}" if m.deployments else ""
        routes.append(f"{r.notifier.type} ({' + '.join(takes) if takes else 'all'}{where})")
    return "notifiers " + ", ".join(routes)


# Bytes one buffered prediction takes in the label join, its id included, in a full buffer that
# evicts as it takes more (benchmarks/join_entry.py: 232 B with a 16-character id, 252 B with a
# UUID; rounded up).
JOIN_ENTRY_BYTES = 260


@dataclass(frozen=True)
class LabelBuffer:
    """What the label join will hold. It keeps each prediction of a deployment with a label rule
    until its outcome comes or ``join_horizon`` passes, up to ``max_pending_labels`` in all,
    oldest dropped first."""

    declared: int  # declared deployments with a label rule
    undeclared: bool  # a label rule also reaches deployments seen only in the stream
    cap: int
    horizon: float

    @property
    def binds_at(self) -> float:
        """Unlabelled predictions per second, in all, above which the cap drops outcomes."""
        return self.cap / self.horizon

    def line(self) -> str:
        who = f"{self.declared} declared deployment(s)" + (" and any undeclared one seen" if self.undeclared else "")
        per = f" ({fmt_num(self.binds_at / self.declared)} per deployment)" if self.declared > 1 else ""
        return (f"label buffer (label rules on {who}): join_horizon {format_duration(self.horizon)}, "
                f"max_pending_labels {self.cap:,}, about {self.cap * JOIN_ENTRY_BYTES / 1e6:,.0f} MB when full; "
                f"the cap binds above {fmt_num(self.binds_at)} unlabelled predictions/s in all{per}")

    def at(self, rate: float) -> tuple[float, str | None]:
        """The entries held at ``rate`` unlabelled predictions/s per declared deployment (at
        least one), and a warning when the cap binds there."""
        n = max(self.declared, 1)
        needed = rate * n * self.horizon
        if needed <= self.cap:
            return needed, None
        kept = round(self.cap / (rate * n))
        return needed, (
            f"at {fmt_num(rate)} unlabelled predictions/s per deployment the label buffer needs {needed:,.0f} "
            f"entries (about {needed * JOIN_ENTRY_BYTES / 1e6:,.0f} MB) but max_pending_labels is {self.cap:,}: "
            f"predictions older than {format_duration(kept)} lose their outcome; raise max_pending_labels "
            f"or shorten join_horizon")


def label_buffer(config: Config) -> LabelBuffer | None:
    """The label buffer ``config`` asks for; None without a label rule."""
    label_rules = [r for r in config.rules if r.needs_labels]
    if not label_rules:
        return None
    declared = [d for d in config.deployments if any(r.covers(d) for r in label_rules)]
    undeclared = any(r.reaches_undeclared for r in label_rules) or not config.deployments
    s = config.settings
    return LabelBuffer(len(declared), undeclared, s.max_pending_labels, s.join_horizon)


def summarize(config: Config) -> str:
    """A short human summary: what ``rollbackd validate`` prints for a valid file."""
    s = config.settings
    digest = ""
    if s.notifier.digest is not None:
        digest = f" (digest {s.notifier.digest.cron!r} {s.notifier.digest.timezone})"
    lines = [
        f"{config.source or '<config>'}: {len(config.deployments)} deployment(s), "
        f"{len(config.rules)} rule(s); dry run {'on' if s.dry_run else 'off'}; "
        f"{_notifiers(s)}{digest}; lateness {format_duration(s.lateness)}",
    ]
    if config.deployments:
        lines.append("deployments:")
        for dep in config.deployments.values():
            labels = [f"labels {', '.join(f'{k}={v}' for k, v in dep.labels.items())}"] if dep.labels else []
            lines.append(f"  {dep.name}: " + ", ".join(labels + _safety(dep, s.dry_run)))
    if config.rules:
        lines.append("rules:")
        for r in config.rules:
            op = ">" if r.direction == "above" else "<"
            what = f"{r.detector} {_quality_metric(r)}" if r.detector == "model_quality" else r.detector
            cond = f"{what} {op} {fmt_num(r.threshold)}"
            if r.clear_threshold is not None and r.clear_threshold != r.threshold:
                cond += f" (clears at {fmt_num(r.clear_threshold)})"
            if r.alpha is not None:
                cond += f", p < {fmt_num(r.alpha)}"
                if r.alpha_source == "budget":
                    cond += " (from the false-alarm budget)"
            timing = f"for {format_duration(r.for_)}"
            if r.n > 1:
                timing += f", {r.k} of {r.n}"
            if r.keep_firing_for:
                timing += f", keep firing {format_duration(r.keep_firing_for)}"
            scope = _scope(r)
            if r.variants is not None:
                scope += f" / {', '.join(r.variants)}"
            actions = ", ".join(r.actions) or "record only"
            window = format_duration(r.window.size)
            if not r.window.tumbling:
                window += f" every {format_duration(r.window.step)}"
            lines.append(
                f"  {r.name}: {cond}; {timing}; window {window}; "
                f"{r.severity} → {actions}; {scope}" + ("; dry run" if r.dry_run else "")
            )
            covers = _covers(r, config)
            if covers is not None:
                lines.append(f"    {covers}")
        lines.extend(budget_lines(config.rules, config.deployments))
    buffer = label_buffer(config)
    if buffer is not None:
        lines.append(buffer.line())
    return "\n".join(lines)
