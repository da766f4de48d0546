"""Drills and backtests: the replay core pointed at history, with every edge made harmless.

- :func:`drill` rehearses an incident from a recording: backends forced to dry-run (and a
  backend that refuses behind them, so a real one can never be reached), notices marked
  ``[DRILL]`` to the console (or a drill notifier you pass), a progress callback, optional
  pacing by event time, and an incident report at the end.
- :func:`backtest` answers "what would these rules have done": when each alert would have
  fired and each rollback run, the difference between two versions of the rules, and, given
  labelled fault intervals (a truth file), detection delay, missed faults and false alerts
  per rule. Rollbacks go to a simulated backend that accepts every plan, so cooldowns and
  duplicates behave as they would live; notices go nowhere.

Both read the wall clock only to pace a drill (``clock`` and ``sleep`` are injected).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgspec
import yaml

from rollbackd.actions.base import ActionResult, Notifier, NullNotifier, RollbackPlan
from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.clock import Clock, WallClock
from rollbackd.daemon.decisions import DecisionLog, encode_decision
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.daemon.sources import Batch, EventSource
from rollbackd.daemon.splits import where
from rollbackd.measurements import MeasurementTapLike, MeasurementWriter
from rollbackd.report import MeasurementTap, Report, rule_signal, write_report
from rollbackd.rules.durations import format_duration, parse_duration
from rollbackd.rules.model import Config, RuleSpec, name_matches

__all__ = [
    "DrillProgress",
    "DrillResult",
    "drill",
    "parse_speed",
    "ProgressPrinter",
    "BacktestRun",
    "BacktestResult",
    "DecisionDiff",
    "RuleScore",
    "FaultInterval",
    "backtest",
    "diff_decisions",
    "load_truth",
    "write_truth",
    "score_truth",
    "attach_tap",
    "simulate_decisions",
    "run_input",
    "episodes",
    "FAULT_SIGNALS",
]

Decision = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Shared plumbing


class _Decisions:
    """The decision sink of a drill or backtest: every record kept (as the log would read it
    back), optionally also written to a decision log, and counted for the progress line."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.records: list[Decision] = []
        self._log = DecisionLog(path) if path is not None else None
        self.incidents = self.rollbacks = self.notices = self.firing = 0

    def write(self, rec: dict[str, Any]) -> None:
        raw = encode_decision(rec)
        self.records.append(msgspec.json.decode(raw))
        if self._log is not None:
            self._log.write(rec)
        kind = rec.get("kind")
        if kind == "incident" and rec.get("state") == "opened":
            self.incidents += 1
        elif kind == "alert" and rec.get("state") == "firing":
            self.firing += 1
        elif kind == "action":
            if rec.get("action") == "rollback":
                self.rollbacks += 1
            else:
                self.notices += 1

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


class _Span:
    """Passes a source through, noting the first and last event time it hands out."""

    def __init__(self, inner: EventSource) -> None:
        self.inner = inner
        self.first = math.inf
        self.last = -math.inf

    def read(self, max_events: int) -> Batch | None:
        batch = self.inner.read(max_events)
        if batch is not None and batch.events:
            ts = list(map(_ts, batch.events))
            self.first = min(self.first, min(ts))
            self.last = max(self.last, max(ts))
        return batch

    def commit(self, position: Any) -> None:
        self.inner.commit(position)

    def close(self) -> None:
        self.inner.close()

    @property
    def span(self) -> tuple[float, float] | None:
        return (self.first, self.last) if self.first <= self.last else None


_ts = attrgetter("ts")


class _RefusingBackend:
    """Stands behind a drill's dry-run: if a plan ever got past it, nothing is called."""

    def apply(self, plan: RollbackPlan) -> ActionResult:
        return ActionResult("failed", "drill: no backend is called in a drill", attempts=0)


class _SimulatedBackend:
    """A backtest's backend: accepts every plan (so cooldowns start as they would live)."""

    def __init__(self) -> None:
        self.plans: list[RollbackPlan] = []

    def apply(self, plan: RollbackPlan) -> ActionResult:
        self.plans.append(plan)
        return ActionResult(
            "succeeded", f"backtest: would set {plan.deployment}/{plan.variant} to {plan.to_version}", attempts=0
        )


def attach_tap(pipeline: Any, tap: MeasurementTapLike) -> None:
    """Give the pipeline a measurement tap (``Edges.tap``; the pipeline calls
    ``tap.measure(...)`` after each evaluation once it has that hook)."""
    pipeline.edges.tap = tap


def _iso(ts: float | None) -> str:
    if ts is None or not math.isfinite(ts):
        return "n/a"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _offset(ts: float, origin: float | None) -> str:
    if origin is None or not math.isfinite(origin):
        return ""
    d = ts - origin
    return ("+" if d >= 0 else "-") + format_duration(round(abs(d)))


# ---------------------------------------------------------------------------------------------
# Drill


def parse_speed(text: str | None) -> float | None:
    """``"max"`` (or None) → None, as fast as possible; ``"1x"``, ``"10x"``, ``"0.5"`` → the
    factor by which event time runs faster than the wall clock."""
    if text is None or str(text).strip().lower() == "max":
        return None
    raw = str(text).strip().lower().removesuffix("x")
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"speed {text!r}: use 1x, 10x, ... or max") from None
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"speed {text!r}: the factor must be > 0")
    return factor


@dataclass(frozen=True, slots=True)
class DrillProgress:
    events: int
    event_time: float | None  # the watermark
    alerts_fired: int
    incidents: int
    rollbacks: int
    notices: int
    done: bool = False

    def format(self) -> str:
        when = _iso(self.event_time) if self.event_time is not None else "…"
        return (
            f"[DRILL] {self.events:,} events  event time {when}  alerts fired {self.alerts_fired}  "
            f"incidents {self.incidents}  rollbacks {self.rollbacks}  notices {self.notices}"
        )


class _ClearFirst:
    """A notifier that has the progress display clear its line before each notice."""

    def __init__(self, inner: Notifier, clear: Callable[[], None]) -> None:
        self.inner = inner
        self.clear = clear

    def post(self, notice: Any) -> ActionResult:
        self.clear()
        return self.inner.post(notice)


class ProgressPrinter:
    """Renders :class:`DrillProgress` on one line of a terminal (nothing on a non-terminal
    until the end), at most every ``every`` wall seconds."""

    def __init__(self, stream: Any, *, every: float = 0.2, clock: Clock | None = None) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = every
        self.clock = clock or WallClock()
        self._last = -math.inf

    def clear(self) -> None:
        """Wipe the progress line, so that a notice printed next starts on a clean line."""
        if self.tty and self._last > -math.inf:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __call__(self, p: DrillProgress) -> None:
        if p.done:
            self.stream.write(("\r" if self.tty else "") + p.format() + "\n")
            self.stream.flush()
            return
        if not self.tty:
            return
        now = self.clock.now()
        if now - self._last < self.every:
            return
        self._last = now
        self.stream.write("\r" + p.format() + "   ")
        self.stream.flush()


@dataclass
class DrillResult:
    summary: dict[str, Any]
    decisions: list[Decision]
    incidents: list[dict[str, Any]]  # Incident.to_record() of every incident
    report: Report
    decisions_path: Path
    ledger_path: Path | None
    run_id: str
    events: int
    measured: bool  # the report had every evaluation (the pipeline called the tap)
    tap: MeasurementTap | None = None

    @property
    def report_path(self) -> Path:
        return self.report.html


def drill(
    recording: str | os.PathLike[str],
    config: Config,
    *,
    speed: float | None = None,
    out_dir: str | os.PathLike[str],
    notifier: Notifier | None = None,
    progress: Callable[[DrillProgress], None] | None = None,
    clock: Clock | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    ledger: bool = True,
    batch_size: int | None = None,
    title: str | None = None,
    measurements: MeasurementWriter | None = None,
) -> DrillResult:
    """Rehearse ``recording`` through ``config``: nothing real is touched.

    Rollbacks are dry runs (``build_pipeline(drill=True)``) and the pipeline's backends are
    replaced by one that refuses; notices carry ``drill=True`` (``[DRILL]``) and go to
    ``notifier`` (default: the console). ``speed``: None as fast as possible, else event time
    runs ``speed`` times faster than ``clock`` (1.0 keeps the recording's timing).

    ``out_dir`` receives ``decisions.jsonl``, ``rejected.jsonl`` (dead letters),
    ``drill.db`` (a ledger under a ``drill-…`` run id, unless ``ledger=False``) and
    ``report.html`` (plus PNG plots when matplotlib is installed).

    ``measurements`` (a writer of ``--measurements-out``) gets every evaluation, and a
    ``not_evaluated`` line per window the recording ended inside; the drill closes it. A
    :class:`ConsoleNotifier` that folds repeat notices prints what it folded before the end.
    """
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be None or > 0, got {speed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = clock or WallClock()
    run_id = f"drill-{uuid.uuid4().hex[:12]}"
    sink = _Decisions(out / "decisions.jsonl")
    recorder = None
    ledger_path = out / "drill.db" if ledger else None
    if ledger_path is not None:
        from rollbackd.daemon.ledger import Ledger

        recorder = Ledger(ledger_path, run_id=run_id)
        recorder.start_run("drill", os.fspath(recording), config.source,
                           datetime.fromtimestamp(clock.now(), timezone.utc).isoformat())
    posts: Notifier = notifier or ConsoleNotifier()
    if hasattr(progress, "clear"):
        posts = _ClearFirst(posts, progress.clear)  # type: ignore[union-attr]
    pipeline = build_pipeline(
        config,
        decisions=sink,
        recorder=recorder,
        dead_letter_path=out / "rejected.jsonl",
        notifier=posts,
        drill=True,
    )
    refusing = _RefusingBackend()
    pipeline.edges.backend_for = lambda deployment: refusing
    tap = MeasurementTap(config)
    if measurements is not None:
        measurements.tee = tap
        attach_tap(pipeline, measurements)
    else:
        attach_tap(pipeline, tap)

    start: list[float] = []  # (event time, wall time) of the first paced batch

    def on_batch(events: int, watermark: float | None) -> None:
        wm = watermark if watermark is not None and math.isfinite(watermark) else None
        if speed is not None and wm is not None:
            if not start:
                start.extend((wm, clock.now()))
            else:
                delay = start[1] + (wm - start[0]) / speed - clock.now()
                if delay > 0:
                    sleep(delay)
        if progress is not None:
            progress(DrillProgress(events, wm, sink.firing, sink.incidents, sink.rollbacks, sink.notices))

    source = _Span(open_recording(os.fspath(recording), config))
    try:
        result = replay(source, pipeline, batch_size=batch_size or (256 if speed is not None else 8192),
                        progress=on_batch)
        if measurements is not None:
            measurements.not_evaluated(result.not_evaluated)
        summary = result.summary
        if recorder is not None:
            recorder.counters(
                [(f"events.{k}", v) for k, v in summary["events"].items()]
                + [(f"rejected.{k}", v) for k, v in summary["rejected"].items()]
                + [(f"join.{k}", v) for k, v in summary["join"].items()]
            )
            recorder.finish_run(summary)
    finally:
        if recorder is not None:
            recorder.close()
        if measurements is not None:
            measurements.close()
    if isinstance(notifier, ConsoleNotifier):
        notifier.end()
    if progress is not None:
        span = source.span
        progress(DrillProgress(result.events, span[1] if span else None, sink.firing, sink.incidents,
                               sink.rollbacks, sink.notices, done=True))
    measured = tap.evaluations > 0
    report = write_report(
        sink.records,
        out / "report.html",
        title=title or f"Drill: {Path(recording).name} with {Path(config.source).name if config.source else 'rules'}",
        measurements_by_rule=tap.by_rule() if measured else None,
        profiles=tap.profiles() if measured else None,
        config=config,
    )
    return DrillResult(
        summary=summary,
        decisions=sink.records,
        incidents=[i.to_record() for i in pipeline.incidents()],
        report=report,
        decisions_path=out / "decisions.jsonl",
        ledger_path=ledger_path,
        run_id=run_id,
        events=result.events,
        measured=measured,
        tap=tap,
    )


# ---------------------------------------------------------------------------------------------
# Truth: labelled fault intervals


@dataclass(frozen=True, slots=True)
class FaultInterval:
    """A labelled fault: on ``deployment`` (None: any) and ``variant`` (None: any), during
    ``[start, end]`` (``end`` None: until the end of the recording). ``rule`` names the rule
    meant to catch it; else ``kind`` (a scenario fault kind) says which detectors are; with
    neither, every rule is. ``slice``: the segment the fault is confined to, as
    ``(("attrs.region", "eu-west"),)``: an episode of a rule with ``slice_by`` catches it
    only when it names that slice (see :meth:`named_by`)."""

    start: float
    end: float | None = None
    deployment: str | None = None
    variant: str | None = None
    rule: str | None = None
    kind: str | None = None
    label: str = ""
    slice: tuple[tuple[str, str], ...] = ()

    def covers(self, deployment: str, variant: str) -> bool:
        return (self.deployment is None or self.deployment == deployment) and (
            self.variant is None or self.variant == variant
        )

    def named_by(self, segment: str | None) -> bool:
        """Whether an episode that found its value in ``segment`` ("region=eu-west", a sliced
        rule's) points at this fault's slice; an episode of the whole window (None) does."""
        if segment is None or not self.slice:
            return True
        parts = set(segment.split(","))
        return all(f"{key.partition('.')[2] or key}={value}" in parts for key, value in self.slice)

    def describe(self, origin: float | None) -> str:
        what = self.label or self.rule or self.kind or "fault"
        where = f"{self.deployment or '*'}" + (f"/{self.variant}" if self.variant else "")
        where += "".join(f" {k}={v}" for k, v in self.slice)
        end = _offset(self.end, origin) if self.end is not None else "end"
        return f"{what} on {where} {_offset(self.start, origin) or _iso(self.start)}…{end}"


# Which detectors (and detector modes) a scenario fault kind is meant to be caught by.
FAULT_SIGNALS: Mapping[str, frozenset[str]] = {
    "error_rate": frozenset({"error_rate", "burn_rate", "canary:error_rate", "sequential:serving_error"}),
    "latency": frozenset({"latency", "canary:latency"}),
    "feature_shift": frozenset({"drift"}),
    "score_shift": frozenset({"calibration", "canary:calibration", "canary:score"}),
    "model_error": frozenset({"model_error", "model_quality", "calibration", "canary:calibration", "sequential:model_error"}),
    "traffic_stop": frozenset({"traffic"}),
    # calibrated scores, lost discrimination: for model-quality metrics (recall, AUC), not calibration
    "signal_loss": frozenset({"model_quality"}),
}


def _expects(rule: RuleSpec, fault: FaultInterval) -> bool:
    if fault.variant is not None and rule.variants is not None and not name_matches(rule.variants, fault.variant):
        return False
    if fault.rule is not None:
        return fault.rule == rule.name
    if fault.kind is not None:
        return rule_signal(rule) in FAULT_SIGNALS.get(fault.kind, frozenset())
    return True


def _when(value: Any, origin: float | None, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a time, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{where}: {value} has no UTC offset")
        return value.timestamp()
    text = str(value).strip()
    if text.startswith("+"):
        if origin is None:
            raise ValueError(f"{where}: {text!r} is an offset, and the recording's start is unknown")
        return origin + parse_duration(text[1:])
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not Unix seconds, an ISO 8601 time or +<duration>") from None
    if dt.tzinfo is None:
        raise ValueError(f"{where}: {text!r} has no UTC offset (add Z)")
    return dt.timestamp()


def load_truth(source: str | os.PathLike[str] | Sequence[Mapping[str, Any]], *, origin: float | None = None) -> list[FaultInterval]:
    """Labelled fault intervals from a YAML file (a list, or ``{faults: [...]}``) or a list of
    dicts (``scenario_truth`` gives one). Each: ``start``, optional ``end``, ``deployment``,
    ``variant``, ``rule``, ``kind``, ``label``. Times: Unix seconds, ISO 8601 with offset, or
    ``+15m`` from ``origin`` (the recording's first event). Entries with ``active: false``
    (a scenario fault that never touched traffic) are skipped. Raises ``ValueError`` naming
    the entry."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        name = os.fspath(source)
    else:
        data, name = list(source), "truth"
    if isinstance(data, Mapping):
        data = data.get("faults")
    if not isinstance(data, list):
        raise ValueError(f"{name}: expected a list of fault intervals (or faults: [...])")
    out = []
    for i, item in enumerate(data):
        where = f"{name}: [{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected a mapping")
        if item.get("active") is False:
            continue
        unknown = set(item) - {"start", "end", "deployment", "variant", "rule", "kind", "label", "active",
                               "magnitude", "feature", "version", "declared_start", "declared_end", "slice"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        start = _when(item.get("start"), origin, f"{where}.start")
        if start is None:
            raise ValueError(f"{where}.start is required")
        end = _when(item.get("end"), origin, f"{where}.end")
        if end is not None and end < start:
            raise ValueError(f"{where}: end is before start")
        raw_slice = item.get("slice") or {}
        if not (isinstance(raw_slice, Mapping)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in raw_slice.items())):
            raise ValueError(f"{where}.slice: expected a mapping of attribute to value, e.g. {{attrs.region: eu-west}}")
        label = item.get("label") or ""
        if not label and item.get("kind"):
            label = str(item["kind"]) + (f"({item['feature']})" if item.get("feature") else "")
        out.append(FaultInterval(
            start=start, end=end, deployment=item.get("deployment"), variant=item.get("variant"),
            rule=item.get("rule"), kind=item.get("kind"), label=str(label),
            slice=tuple(sorted(raw_slice.items())),
        ))
    return out


def write_truth(scenario: Any, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Write the truth file of a built-in scenario (a ``Scenario`` or its name): the intervals
    of ``scenarios.scenario_truth`` in Unix seconds, as YAML. Returns the entries written."""
    from rollbackd.scenarios import BUILTIN, scenario_truth

    if isinstance(scenario, str):
        if scenario not in BUILTIN:
            raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(sorted(BUILTIN))}")
        scenario = BUILTIN[scenario]
    entries = []
    for t in scenario_truth(scenario):
        entry = {k: t[k] for k in ("kind", "start", "end", "deployment", "variant", "feature", "version",
                                   "magnitude", "active")}
        if t.get("slice"):  # only then, so older scenarios' truth files stay as they were
            entry["slice"] = t["slice"]
        entries.append(entry)
    header = (
        f"# Fault intervals of the built-in scenario {scenario.name!r} (Unix seconds, event time).\n"
        "# deployment/variant null: every one. Used by: rollbackd backtest REC -c RULES --truth FILE\n"
    )
    Path(path).write_text(header + yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")
    return entries


@dataclass(frozen=True, slots=True)
class Episode:
    rule: str
    deployment: str
    variant: str
    fired: float
    resolved: float | None
    segment: str | None = None  # the slice a sliced rule's firing named


def episodes(decisions: Iterable[Mapping[str, Any]]) -> list[Episode]:
    """Every firing episode in the decisions: (rule, deployment, variant, fired, resolved)."""
    open_: dict[tuple[str, str, str], tuple[float, str | None]] = {}
    out = []
    for d in decisions:
        if d.get("kind") != "alert":
            continue
        key = (d["rule"], d["deployment"], d["variant"])
        if d.get("state") == "firing":
            evidence = (d.get("measurement") or {}).get("evidence") or {}
            segment = evidence.get("segment") if isinstance(evidence, Mapping) else None
            open_[key] = (d["ts"], segment if isinstance(segment, str) else None)
        elif d.get("state") == "resolved" and key in open_:
            fired, segment = open_.pop(key)
            out.append(Episode(*key, fired, d["ts"], segment))
    out.extend(Episode(*key, fired, None, segment) for key, (fired, segment) in open_.items())
    out.sort(key=lambda e: (e.fired, e.rule, e.deployment, e.variant))
    return out


@dataclass
class RuleScore:
    rule: str
    expected: int  # faults this rule is meant to catch
    detected: int
    delays: list[float]  # seconds, one per detected fault, in fault order
    missed: list[str]  # the missed faults, described
    false_alerts: int
    healthy_seconds: float

    @property
    def mean_delay(self) -> float | None:
        return sum(self.delays) / len(self.delays) if self.delays else None

    @property
    def mtbfa(self) -> float | None:
        """Mean time between false alerts: healthy time / false alerts (None without any)."""
        return self.healthy_seconds / self.false_alerts if self.false_alerts else None

    def to_record(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "expected": self.expected, "detected": self.detected,
            "missed": len(self.missed), "missed_faults": list(self.missed), "delays": list(self.delays),
            "mean_delay": self.mean_delay, "false_alerts": self.false_alerts,
            "healthy_seconds": self.healthy_seconds, "mtbfa": self.mtbfa,
        }


def score_truth(
    decisions: Sequence[Mapping[str, Any]],
    faults: Sequence[FaultInterval],
    rules: Sequence[RuleSpec],
    span: tuple[float, float],
    *,
    grace: float = 300.0,
) -> dict[str, RuleScore]:
    """Score each rule's firings against labelled faults.

    - A fault is **detected** by a rule meant to catch it (see :class:`FaultInterval`) when an
      alert of that rule on the fault's deployment/variant is firing at some time in
      ``[start, end + grace]``; the **delay** is from the fault's start to that episode's
      firing (0 if it was already firing).
    - A **false alert** is a firing (of any rule) at a time outside every fault interval
      ``[start, end + grace]`` of its deployment/variant.
    - **Healthy time** is the recording's span minus the union of ``[start, end + grace]``;
      the mean time between false alerts is healthy time / false alerts.
    """
    first, last = span
    eps = episodes(decisions)
    ends = {id(f): (f.end if f.end is not None else last) for f in faults}
    # The union of the fault intervals (with grace), clipped to the span.
    covered = 0.0
    cur: list[float] | None = None
    for a, b in sorted((max(f.start, first), min(ends[id(f)] + grace, last)) for f in faults):
        if b <= a:
            continue
        if cur is None or a > cur[1]:
            if cur is not None:
                covered += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur is not None:
        covered += cur[1] - cur[0]
    healthy = max(0.0, (last - first) - covered)
    scores: dict[str, RuleScore] = {}
    for rule in rules:
        mine = [e for e in eps if e.rule == rule.name]
        expected = [f for f in faults if _expects(rule, f)]
        delays: list[float] = []
        missed: list[str] = []
        for f in expected:
            hi = ends[id(f)] + grace
            hit = [e for e in mine if f.covers(e.deployment, e.variant) and e.fired <= hi
                   and (e.resolved is None or e.resolved >= f.start) and f.named_by(e.segment)]
            if hit:
                delays.append(max(0.0, min(e.fired for e in hit) - f.start))
            else:
                missed.append(f.describe(first))
        false = sum(
            1 for e in mine
            if not any(f.covers(e.deployment, e.variant) and f.start <= e.fired <= ends[id(f)] + grace for f in faults)
        )
        scores[rule.name] = RuleScore(rule.name, len(expected), len(delays), delays, missed, false, healthy)
    return scores


# ---------------------------------------------------------------------------------------------
# Backtest


def _key(d: Mapping[str, Any]) -> tuple[Any, ...]:
    kind = d.get("kind")
    if kind == "action":
        what = d.get("action") if d.get("action") != "notify" else f"notify:{d.get('notice')}"
    else:
        what = d.get("state")
    return (kind, d.get("rule"), d.get("deployment"), d.get("variant"), what, d.get("ts"))


def _projection(d: Mapping[str, Any]) -> tuple[Any, ...]:
    if d.get("kind") == "alert":
        m = d.get("measurement") or {}
        return (m.get("value"), m.get("threshold"), d.get("incident_id"), bool(d.get("suppressed")))
    if d.get("kind") == "incident":
        return (d.get("severity"), d.get("version"), d.get("incident_id"))
    return (d.get("status"), d.get("to_version"), d.get("reason"))


@dataclass
class DecisionDiff:
    only_a: list[Decision]
    only_b: list[Decision]
    changed: list[tuple[Decision, Decision]]

    @property
    def empty(self) -> bool:
        return not (self.only_a or self.only_b or self.changed)


def diff_decisions(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> DecisionDiff:
    """Decisions present under one version of the rules and not the other, keyed by
    ``(kind, rule, deployment, variant, state or action, ts)``; ``changed``: the same key with a
    different outcome (value, threshold, status, target)."""
    by_a: dict[tuple[Any, ...], list[tuple[int, Decision]]] = {}
    by_b: dict[tuple[Any, ...], list[tuple[int, Decision]]] = {}
    for i, d in enumerate(a):
        by_a.setdefault(_key(d), []).append((i, dict(d)))
    for i, d in enumerate(b):
        by_b.setdefault(_key(d), []).append((i, dict(d)))
    only_a: list[tuple[int, Decision]] = []
    only_b: list[tuple[int, Decision]] = []
    changed: list[tuple[int, Decision, Decision]] = []
    for k in by_a.keys() | by_b.keys():
        xs, ys = by_a.get(k, []), by_b.get(k, [])
        for (i, x), (_, y) in zip(xs, ys):
            if _projection(x) != _projection(y):
                changed.append((i, x, y))
        only_a.extend(xs[len(ys):])
        only_b.extend(ys[len(xs):])
    # In each log's own order: by event time, then as decided.
    only_a.sort(key=lambda t: (t[1]["ts"], t[0]))
    only_b.sort(key=lambda t: (t[1]["ts"], t[0]))
    changed.sort(key=lambda t: (t[1]["ts"], t[0]))
    return DecisionDiff([d for _, d in only_a], [d for _, d in only_b], [(x, y) for _, x, y in changed])


@dataclass
class BacktestRun:
    config: Config
    decisions: list[Decision]
    summary: dict[str, Any]
    scores: dict[str, RuleScore] | None = None

    @property
    def name(self) -> str:
        return self.config.source or "rules"

    def fired(self) -> list[Decision]:
        return [d for d in self.decisions if d.get("kind") == "alert" and d.get("state") == "firing"]

    def rollbacks(self) -> list[Decision]:
        return [d for d in self.decisions if d.get("kind") == "action" and d.get("action") == "rollback"]


@dataclass
class BacktestResult:
    recording: str
    span: tuple[float, float] | None
    a: BacktestRun
    b: BacktestRun | None = None
    diff: DecisionDiff | None = None
    faults: list[FaultInterval] = field(default_factory=list)
    grace: float = 300.0

    def to_record(self) -> dict[str, Any]:
        def run(r: BacktestRun) -> dict[str, Any]:
            return {
                "rules": r.name, "summary": r.summary, "fired": r.fired(), "rollbacks": r.rollbacks(),
                "scores": {k: v.to_record() for k, v in (r.scores or {}).items()} if r.scores is not None else None,
            }

        rec: dict[str, Any] = {"recording": self.recording, "span": list(self.span) if self.span else None,
                               "a": run(self.a)}
        if self.b is not None:
            rec["b"] = run(self.b)
        if self.diff is not None:
            rec["diff"] = {"only_a": self.diff.only_a, "only_b": self.diff.only_b,
                           "changed": [list(p) for p in self.diff.changed]}
        return rec

    def format_text(self) -> str:
        origin = self.span[0] if self.span else None
        lines = [f"recording {self.recording}"
                 + (f": {_iso(self.span[0])} to {_iso(self.span[1])} UTC "
                    f"({format_duration(round(self.span[1] - self.span[0]))})" if self.span else ": no events")]
        for tag, run in (("A", self.a), ("B", self.b)):
            if run is None:
                continue
            lines.append("")
            lines.append(f"rules {tag + ' ' if self.b is not None else ''}{run.name}:")
            timeline = [d for d in run.decisions if _shown(d)]
            if not timeline:
                lines.append("  no alert fired, nothing would have been rolled back")
            for d in timeline:
                lines.append("  " + _line(d, origin))
            n_inc = sum(1 for d in run.decisions if d.get("kind") == "incident" and d.get("state") == "opened")
            lines.append(f"  = {len(run.fired())} alert(s) fired, {n_inc} incident(s), {len(run.rollbacks())} rollback(s)")
        if self.diff is not None:
            lines.append("")
            if self.diff.empty:
                lines.append("difference: none (both versions reach the same decisions)")
            else:
                lines.append(
                    f"difference: {len(self.diff.only_a)} decision(s) only under A, {len(self.diff.only_b)} only "
                    f"under B, {len(self.diff.changed)} changed"
                )
                notices = 0
                for sign, tag, items in (("-", "A", self.diff.only_a), ("+", "B", self.diff.only_b)):
                    for d in items:
                        if d.get("action") == "notify":
                            notices += 1
                        else:
                            lines.append(f"  {sign} {tag}  " + _line(d, origin))
                for x, y in self.diff.changed:
                    if x.get("action") == "notify":
                        notices += 1
                    else:
                        lines.append("  ~    " + _line(x, origin) + "   →   B: " + _changes(x, y))
                if notices:
                    lines.append(f"  (and {notices} notice(s) that differ with them; --json lists every decision)")
        for tag, run in (("A", self.a), ("B", self.b)):
            if run is None or run.scores is None:
                continue
            lines.append("")
            lines.append(
                f"against the truth{' (rules ' + tag + ')' if self.b is not None else ''}: {len(self.faults)} "
                f"fault(s), grace {format_duration(self.grace)}"
            )
            for f in self.faults:
                lines.append(f"  fault: {f.describe(origin)}")
            lines.append(_score_table(run.scores))
            for s in run.scores.values():
                for m in s.missed:
                    lines.append(f"  {s.rule} missed: {m}")
        return "\n".join(lines) + "\n"


def _shown(d: Mapping[str, Any]) -> bool:
    kind = d.get("kind")
    if kind == "alert":
        return d.get("state") in ("firing", "resolved")
    if kind == "incident":
        return d.get("state") in ("opened", "resolved", "escalated")
    return kind == "action" and d.get("action") == "rollback"


def _outcome(d: Mapping[str, Any]) -> str:
    if d.get("kind") == "alert":
        m = d.get("measurement") or {}
        found = where(m)
        return (f"value {_fmt(m.get('value'))}" + (f" {found}" if found else "") + f" vs {_fmt(m.get('threshold'))}"
                + (" (muted)" if d.get("suppressed") else ""))
    if d.get("kind") == "incident":
        return f"{d.get('incident_id')} severity {d.get('severity')}"
    if d.get("action") == "rollback":
        return f"{d.get('from_version')} → {d.get('to_version')} {d.get('status')}" + (
            f" ({d.get('reason')})" if d.get("reason") else "")
    return f"{d.get('notice')} {d.get('status')}"


def _changes(x: Mapping[str, Any], y: Mapping[str, Any]) -> str:
    """What differs between two decisions with the same key."""
    if x.get("kind") == "alert" and x.get("incident_id") != y.get("incident_id"):
        return f"{_outcome(y)}, incident {x.get('incident_id')} → {y.get('incident_id')}"
    if x.get("kind") == "alert" and bool(x.get("suppressed")) != bool(y.get("suppressed")):
        return f"{_outcome(y)}" + ("" if y.get("suppressed") else " (not muted)")
    return _outcome(y)


def _line(d: Mapping[str, Any], origin: float | None) -> str:
    when = f"{_iso(d['ts'])} {_offset(d['ts'], origin):>8}"
    where = f"{d.get('deployment')}/{d.get('variant')}"
    kind = d.get("kind")
    if kind == "alert":
        return f"{when}  alert     {d.get('state'):<8} {d.get('rule'):<24} {where}  {_outcome(d)}"
    if kind == "incident":
        return f"{when}  incident  {d.get('state'):<8} {d.get('incident_id')}  {where}"
    if d.get("action") == "rollback":
        return f"{when}  rollback  {where}  {_outcome(d)}"
    return f"{when}  notify    {d.get('notice'):<8} {where}  {d.get('status')}"


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _dur(x: float | None) -> str:
    return "-" if x is None else format_duration(round(x))


def _score_table(scores: Mapping[str, RuleScore]) -> str:
    head = ("rule", "faults", "detected", "missed", "delay (mean)", "delays", "false alerts", "MTBFA")
    rows = [head]
    for s in scores.values():
        rows.append((
            s.rule, str(s.expected), str(s.detected) if s.expected else "-", str(len(s.missed)) if s.expected else "-",
            _dur(s.mean_delay), ", ".join(_dur(d) for d in s.delays) or "-", str(s.false_alerts),
            _dur(s.mtbfa) if s.mtbfa is not None else f"none ({_dur(s.healthy_seconds)} healthy)",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def simulate_decisions(
    source: EventSource, config: Config, *, batch_size: int = 8192
) -> tuple[list[Decision], dict[str, Any], tuple[float, float] | None]:
    """``(decisions, summary, (first, last) event time)`` of ``config`` over ``source``, with
    nothing leaving the process: rollbacks go to a simulated backend that accepts every plan
    (so cooldowns and duplicates behave as they would live), notices to the null notifier;
    no ledger, no dead-letter file."""
    sink = _Decisions()
    pipeline = build_pipeline(config, decisions=sink, notifier=NullNotifier())
    backend = _SimulatedBackend()
    pipeline.edges.backend_for = lambda deployment: backend
    span = _Span(source)
    result = replay(span, pipeline, batch_size=batch_size)
    return sink.records, result.summary, span.span


def backtest(
    recording: str | os.PathLike[str],
    config_a: Config,
    config_b: Config | None = None,
    truth: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Sequence[FaultInterval] | None = None,
    *,
    grace: float = 300.0,
    batch_size: int = 8192,
) -> BacktestResult:
    """Run ``config_a`` (and ``config_b``) over ``recording``; diff the two; score against
    ``truth`` (a truth file, ``scenario_truth`` output, or :class:`FaultInterval` s).

    Nothing leaves the process: rollbacks go to a simulated backend that accepts them, notices
    to the null notifier, there is no ledger and no dead-letter file.
    """
    rec = os.fspath(recording)
    decisions_a, summary_a, span = simulate_decisions(open_recording(rec, config_a), config_a, batch_size=batch_size)
    run_a = BacktestRun(config_a, decisions_a, summary_a)
    run_b = None
    if config_b is not None:
        decisions_b, summary_b, _ = simulate_decisions(open_recording(rec, config_b), config_b, batch_size=batch_size)
        run_b = BacktestRun(config_b, decisions_b, summary_b)
    faults: list[FaultInterval] = []
    if truth is not None:
        if isinstance(truth, Sequence) and not isinstance(truth, str) and all(isinstance(f, FaultInterval) for f in truth):
            faults = list(truth)  # type: ignore[arg-type]
        else:
            faults = load_truth(truth, origin=span[0] if span else None)  # type: ignore[arg-type]
        scoring_span = span or (0.0, 0.0)
        run_a.scores = score_truth(run_a.decisions, faults, config_a.rules, scoring_span, grace=grace)
        if run_b is not None:
            run_b.scores = score_truth(run_b.decisions, faults, config_b.rules, scoring_span, grace=grace)  # type: ignore[union-attr]
    diff = diff_decisions(run_a.decisions, run_b.decisions) if run_b is not None else None
    return BacktestResult(rec, span, run_a, run_b, diff, faults, grace)


# ---------------------------------------------------------------------------------------------
# Rule unit tests: running one test's input


class _ListSource:
    """Events already in memory (a rule test's series), in batches."""

    def __init__(self, events: list[Any]) -> None:
        self._events = events
        self._pos = 0

    def read(self, max_events: int) -> Batch | None:
        if self._pos >= len(self._events):
            return None
        chunk = self._events[self._pos:self._pos + max_events]
        self._pos += len(chunk)
        return Batch(chunk, [], self._pos)

    def commit(self, position: Any) -> None:
        pass

    def close(self) -> None:
        pass


def run_input(
    config: Config, spec: Mapping[str, Any], base_dir: Path, scratch: Path
) -> tuple[list[Decision], float, str]:
    """The runner of ``ruletests.run_rule_tests``: ``(decisions, origin, label)`` of
    ``config`` over one test input (``scenario``, ``recording`` relative to ``base_dir``, or
    ``series``); built-in scenarios are generated once into ``scratch``."""
    from rollbackd.ruletests import series_events, series_origin
    from rollbackd.scenarios import BUILTIN, write_recording

    if "scenario" in spec:
        name = str(spec["scenario"])
        path = scratch / f"{name}.jsonl"
        if not path.exists():
            write_recording(BUILTIN[name], path)
        decisions, _, _ = simulate_decisions(open_recording(str(path), config), config)
        return decisions, BUILTIN[name].start, f"scenario {name}"
    if "recording" in spec:
        path = base_dir / str(spec["recording"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recording")
        decisions, _, span = simulate_decisions(open_recording(str(path), config), config)
        return decisions, span[0] if span else 0.0, f"recording {spec['recording']}"
    origin = series_origin(spec)
    events = series_events(spec["series"], origin)
    decisions, _, _ = simulate_decisions(_ListSource(events), config)
    return decisions, origin, f"series of {len(spec['series'])}"
