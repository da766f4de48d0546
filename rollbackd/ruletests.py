"""Rule unit tests, in the manner of ``promtool test rules``: inputs and the alerts expected.

A test file (YAML)::

    rule_files: [rules.yaml]            # relative to this file; several are merged
    tests:
      - name: sustained errors fire within three minutes of the bad deploy
        input: {scenario: sustained_errors}       # a built-in scenario
        expect:
          - {rule: serving-error-rate, deployment: demo-scorer, variant: primary,
             state: firing, after: 15m, at_or_before: 18m}
          - {rule: feature-drift, deployment: demo-scorer, state: none}
      - name: a recorded incident
        input: {recording: data/incident-2024-03-02.jsonl.gz}
        expect: [...]
      - name: synthetic series
        input:
          series:
            - deployment: fraud-scorer
              interval: 1m                       # one step (default 1m)
              rate: 20                           # predictions per second (default 10)
              version: "1 x10 2 x10"             # per step: value, or value xN for N steps
              error_rate: "0.005 x10 0.3 x10"
              latency_ms: "20 x20"
        expect: [...]

``after`` and ``at_or_before`` are offsets from the input's start (a scenario's start, a
recording's first event, a series' ``start``). ``state``:

- ``firing`` / ``pending`` / ``resolved``: the alert made that transition at a time ``t``
  with ``after < t <= at_or_before`` (each bound optional);
- ``none``: it did not fire in that interval (the whole input by default).

Without ``variant`` any variant matches. The same core as a replay runs each input, with
nothing leaving the process (a simulated backend, no notifier). Series are deterministic:
``N`` predictions per step, evenly spaced; an error rate of ``e`` fails exactly
``floor(N·e)`` of them, spread evenly; ``model_error`` flips that share of the labels.
Note ``x``: ``0.2 x15`` is fifteen steps at 0.2 (promtool's ``0.2x15`` is sixteen values).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

from rollbackd.rules.durations import DURATION_FORMS, format_duration, parse_duration
from rollbackd.rules.loader import ConfigError, load_config
from rollbackd.rules.model import Config

__all__ = [
    "RuleTestError",
    "Expectation",
    "Check",
    "TestResult",
    "run_rule_tests",
    "format_results",
    "exit_code",
    "series_events",
    "series_origin",
    "RunInput",
]

STATES = ("firing", "pending", "resolved", "none")
SERIES_FIELDS = ("version", "error_rate", "latency_ms", "rate", "model_error", "label_fraction")
_DEFAULT_START = 1_790_000_000.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class RuleTestError(ValueError):
    """The test file (or a rule file it names) is invalid; ``errors`` lists every problem as
    ``FILE:LINE: PATH: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True, slots=True)
class Expectation:
    rule: str
    deployment: str
    state: str
    variant: str | None = None
    at_or_before: float | None = None
    after: float | None = None
    line: int = 0

    def describe(self) -> str:
        where = f"{self.deployment}/{self.variant or '*'}"
        when = []
        if self.after is not None:
            when.append(f"after +{format_duration(self.after)}")
        if self.at_or_before is not None:
            when.append(f"at or before +{format_duration(self.at_or_before)}")
        timing = " " + " and ".join(when) if when else (" at any time" if self.state != "none" else "")
        what = "never fires" if self.state == "none" else self.state
        return f"{self.rule} {where} {what}{timing}"


@dataclass(frozen=True, slots=True)
class Check:
    expectation: Expectation
    ok: bool
    got: str


@dataclass
class TestResult:
    name: str
    ok: bool
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    input: str = ""
    line: int = 0

    __test__ = False  # not a pytest test class


@dataclass
class _Test:
    name: str
    input: dict[str, Any]
    expect: list[Expectation]
    line: int


# YAML with line numbers ------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[str, Any]:
    m = loader.construct_mapping(node, deep=True)
    m["__line__"] = node.start_mark.line + 1
    return m


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _line(obj: Any) -> int:
    return obj.get("__line__", 0) if isinstance(obj, dict) else 0


def _keys(obj: Mapping[str, Any]) -> set[str]:
    return {k for k in obj if k != "__line__"}


# Parsing ---------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[str] = []

    def error(self, line: int, where: str, message: str) -> None:
        self.errors.append(f"{self.path}:{line}: {where}: {message}" if line else f"{self.path}: {where}: {message}")

    def offset(self, value: Any, line: int, where: str) -> float | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError:
            self.error(line, where, f"expected an offset from the input's start; use {DURATION_FORMS}")
            return None

    def parse(self, doc: Any) -> tuple[list[Path], list[_Test]]:
        if not isinstance(doc, dict):
            self.error(0, "(top)", "expected a mapping with rule_files and tests")
            return [], []
        unknown = _keys(doc) - {"rule_files", "tests"}
        for k in sorted(unknown):
            self.error(_line(doc), k, "unknown key (known: rule_files, tests)")
        files = doc.get("rule_files")
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            self.error(_line(doc), "rule_files", "expected a list of rules files")
            files = []
        rule_files = [(self.path.parent / f) for f in files]
        tests_raw = doc.get("tests")
        if not isinstance(tests_raw, list) or not tests_raw:
            self.error(_line(doc), "tests", "expected a non-empty list of tests")
            tests_raw = []
        tests = []
        for i, t in enumerate(tests_raw):
            test = self._test(t, f"tests[{i}]")
            if test is not None:
                tests.append(test)
        return rule_files, tests

    def _test(self, t: Any, where: str) -> _Test | None:
        if not isinstance(t, dict):
            self.error(0, where, "expected a mapping with name, input and expect")
            return None
        line = _line(t)
        for k in sorted(_keys(t) - {"name", "input", "expect"}):
            self.error(line, f"{where}.{k}", "unknown key (known: name, input, expect)")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            self.error(line, f"{where}.name", "required: a name for the test")
            name = where
        inp = t.get("input")
        ok_input = isinstance(inp, dict) and len(_keys(inp) & {"scenario", "recording", "series"}) == 1
        if not ok_input:
            self.error(_line(inp) or line, f"{where}.input", "expected exactly one of scenario, recording, series")
        else:
            for k in sorted(_keys(inp) - {"scenario", "recording", "series", "start"}):
                self.error(_line(inp), f"{where}.input.{k}", "unknown key")
            if "series" in inp:
                self._series(inp["series"], _line(inp), f"{where}.input.series")
            if "scenario" in inp:
                from rollbackd.scenarios import BUILTIN

                if inp["scenario"] not in BUILTIN:
                    self.error(_line(inp), f"{where}.input.scenario",
                               f"unknown scenario {inp['scenario']!r} (known: {', '.join(sorted(BUILTIN))})")
        raw = t.get("expect")
        if not isinstance(raw, list) or not raw:
            self.error(line, f"{where}.expect", "expected a non-empty list of expected alert states")
            raw = []
        expect = [e for i, item in enumerate(raw) if (e := self._expect(item, f"{where}.expect[{i}]", line)) is not None]
        return _Test(name, inp if ok_input else {}, expect, line)

    def _expect(self, e: Any, where: str, parent_line: int) -> Expectation | None:
        if not isinstance(e, dict):
            self.error(parent_line, where, "expected a mapping: rule, deployment, state, ...")
            return None
        line = _line(e)
        allowed = {"rule", "deployment", "variant", "state", "at_or_before", "after"}
        for k in sorted(_keys(e) - allowed):
            self.error(line, f"{where}.{k}", f"unknown key (known: {', '.join(sorted(allowed))})")
        bad = False
        for k in ("rule", "deployment", "state"):
            if not isinstance(e.get(k), str) or not e.get(k):
                self.error(line, f"{where}.{k}", "required")
                bad = True
        if isinstance(e.get("state"), str) and e["state"] not in STATES:
            self.error(line, f"{where}.state", f"{e['state']!r} is not one of {', '.join(STATES)}")
            bad = True
        at = self.offset(e.get("at_or_before"), line, f"{where}.at_or_before")
        after = self.offset(e.get("after"), line, f"{where}.after")
        if at is not None and after is not None and at <= after:
            self.error(line, f"{where}", "at_or_before must be later than after")
            bad = True
        if bad:
            return None
        variant = e.get("variant")
        return Expectation(e["rule"], e["deployment"], e["state"], None if variant is None else str(variant), at, after, line)

    def _series(self, series: Any, line: int, where: str) -> None:
        if not isinstance(series, list) or not series:
            self.error(line, where, "expected a list of series (deployment, interval, rate, version, ...)")
            return
        for i, s in enumerate(series):
            w = f"{where}[{i}]"
            if not isinstance(s, dict):
                self.error(line, w, "expected a mapping")
                continue
            try:
                _steps(s)
            except ValueError as exc:
                self.error(_line(s), w, str(exc))


# Series ----------------------------------------------------------------------------------------


def _tokens(text: Any, name: str) -> list[str]:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return [str(text)]
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected values like '0.2 x15 0.5 x5', got {text!r}")
    out: list[str] = []
    parts = text.replace(",", " ").split()
    i = 0
    while i < len(parts):
        tok = parts[i]
        value, n = tok, 1
        if i + 1 < len(parts) and parts[i + 1].startswith("x") and parts[i + 1][1:].isdigit():
            n = int(parts[i + 1][1:])
            i += 1
        elif "x" in tok[1:] and tok.rsplit("x", 1)[1].isdigit():
            value, count = tok.rsplit("x", 1)
            n = int(count)
        if n < 1:
            raise ValueError(f"{name}: {tok!r}: a repeat count must be >= 1")
        out.extend([value] * n)
        i += 1
    if not out:
        raise ValueError(f"{name}: no values")
    return out


@dataclass(frozen=True, slots=True)
class _Step:
    version: str
    error_rate: float
    latency_ms: float
    rate: float
    model_error: float | None
    label_fraction: float


def _steps(s: Mapping[str, Any]) -> tuple[str, str, float, list[_Step], float]:
    """(deployment, variant, interval, steps, label delay) of one series; ValueError if bad."""
    unknown = _keys(s) - {"deployment", "variant", "interval", "label_delay", *SERIES_FIELDS}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} (known: deployment, variant, interval, "
                         f"label_delay, {', '.join(SERIES_FIELDS)})")
    dep = s.get("deployment")
    if not isinstance(dep, str) or not dep:
        raise ValueError("deployment is required")
    variant = str(s.get("variant", "primary"))
    interval = parse_duration(s.get("interval", "1m"))
    if interval <= 0:
        raise ValueError("interval must be > 0")
    delay = parse_duration(s.get("label_delay", "30s"))
    cols: dict[str, list[str]] = {}
    for name in SERIES_FIELDS:
        if name in s:
            cols[name] = _tokens(s[name], name)
    if not cols:
        raise ValueError(f"no values: give at least one of {', '.join(SERIES_FIELDS)}")
    n = max(len(c) for c in cols.values())
    for name, c in cols.items():
        if len(c) not in (1, n):
            raise ValueError(f"{name} has {len(c)} steps, others {n}: give one value or {n}")

    def col(name: str, default: str | None) -> list[str | None]:
        c = cols.get(name)
        if c is None:
            return [default] * n
        return c * n if len(c) == 1 else c

    def num(name: str, v: str | None, lo: float, hi: float) -> float | None:
        if v is None:
            return None
        try:
            x = float(v)
        except ValueError:
            raise ValueError(f"{name}: {v!r} is not a number") from None
        if not (lo <= x <= hi):
            raise ValueError(f"{name}: {v} is outside [{lo:g}, {hi:g}]")
        return x

    has_labels = "model_error" in cols or "label_fraction" in cols
    steps = []
    for version, err, lat, rate, merr, lf in zip(
        col("version", "1"), col("error_rate", "0"), col("latency_ms", "20"), col("rate", "10"),
        col("model_error", None), col("label_fraction", "0.5" if has_labels else "0"),
    ):
        steps.append(_Step(
            version=str(version),
            error_rate=num("error_rate", err, 0.0, 1.0),  # type: ignore[arg-type]
            latency_ms=num("latency_ms", lat, 0.0, math.inf),  # type: ignore[arg-type]
            rate=num("rate", rate, 0.0, 1e6),  # type: ignore[arg-type]
            model_error=num("model_error", merr, 0.0, 1.0),
            label_fraction=num("label_fraction", lf, 0.0, 1.0),  # type: ignore[arg-type]
        ))
    return dep, variant, interval, steps, delay


def _spread(i: int, share: float) -> bool:
    """Whether item ``i`` is one of the ``floor(n·share)`` items spread evenly over ``n``."""
    return math.floor((i + 1) * share) > math.floor(i * share)


def series_events(series: Sequence[Mapping[str, Any]], start: float = _DEFAULT_START) -> list[Any]:
    """The events of ``series`` (see the module docstring), sorted by event time."""
    from rollbackd.events import Deploy, Outcome, Prediction

    events: list[Any] = []
    for s in series:
        dep, variant, interval, steps, delay = _steps(s)
        version = None
        for k, st in enumerate(steps):
            t0 = start + k * interval
            if st.version != version:
                version = st.version
                events.append(Deploy(ts=t0, deployment=dep, model_version=version, variant=variant))
            n = int(round(st.rate * interval))
            served = labelled = 0  # successful predictions, labelled ones: spread among these
            for i in range(n):
                ts = t0 + (i + 0.5) * interval / n
                frac = (i * _GOLDEN) % 1.0
                pid = f"{dep}-{variant}-{k}-{i}"
                if _spread(i, st.error_rate):
                    events.append(Prediction(id=pid, ts=ts, deployment=dep, model_version=version,
                                             variant=variant, latency_ms=st.latency_ms, error="INTERNAL"))
                    continue
                score = min(max((frac + 0.5) % 1.0, 0.01), 0.99)
                pred = int(score >= 0.5)
                events.append(Prediction(
                    id=pid, ts=ts, deployment=dep, model_version=version, variant=variant,
                    features={"x": round(frac, 4)}, prediction=pred, score=round(score, 4),
                    latency_ms=round(st.latency_ms * (0.9 + 0.2 * frac), 3),
                ))
                served += 1
                if _spread(served - 1, st.label_fraction):
                    wrong = st.model_error is not None and _spread(labelled, st.model_error)
                    labelled += 1
                    events.append(Outcome(id=pid, ts=ts + delay, deployment=dep, label=1 - pred if wrong else pred))
    events.sort(key=lambda e: e.ts)
    return events


# Running ---------------------------------------------------------------------------------------


def _merge(configs: list[Config]) -> Config:
    first = configs[0]
    if len(configs) == 1:
        return first
    rules = [r for c in configs for r in c.rules]
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RuleTestError([f"rule name(s) {', '.join(dupes)} defined in more than one rule file"])
    deployments: dict[str, Any] = {}
    for c in configs:
        deployments.update(c.deployments)
    return dataclasses.replace(
        first, rules=tuple(rules), deployments=MappingProxyType(deployments),
        inhibit_rules=tuple(i for c in configs for i in c.inhibit_rules),
    )


RunInput = Callable[[Config, Mapping[str, Any], Path, Path], tuple[list[dict[str, Any]], float, str]]


def run_rule_tests(path: str | os.PathLike[str], *, run_input: RunInput | None = None) -> list[TestResult]:
    """Run every test of the test file at ``path``. Raises :class:`RuleTestError` when the
    file or a rule file it names is invalid (every error listed).

    ``run_input(config, input, base_dir, scratch_dir) -> (decisions, origin, label)`` runs the
    rules over one test's input; the default, ``rollbackd.drills.run_input``, is the replay
    core with nothing leaving the process. It is injected so that this module, like the rest
    of ``rules/``, imports nothing from ``daemon/`` or ``actions/``.
    """
    if run_input is None:
        from rollbackd.drills import run_input as default_run_input

        run_input = default_run_input
    p = Path(path)
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except OSError as exc:
        raise RuleTestError([f"{p}: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise RuleTestError([f"{p}: invalid YAML: {exc}"]) from None
    parser = _Parser(p)
    rule_files, tests = parser.parse(doc)
    configs = []
    for f in rule_files:
        try:
            configs.append(load_config(f))
        except ConfigError as exc:
            parser.errors.extend(str(exc).splitlines())
        except OSError as exc:
            parser.errors.append(f"{f}: {exc.strerror or exc}")
    if parser.errors:
        raise RuleTestError(parser.errors)
    config = _merge(configs)
    known_rules = {r.name for r in config.rules}
    for t in tests:
        for e in t.expect:
            if e.rule not in known_rules:
                parser.error(e.line, t.name, f"rule {e.rule!r} is not in the rule files (known: {', '.join(sorted(known_rules))})")
    if parser.errors:
        raise RuleTestError(parser.errors)

    results = []
    with tempfile.TemporaryDirectory(prefix="rollbackd-ruletests-") as tmp:
        for t in tests:
            try:
                decisions, origin, label = run_input(config, t.input, p.parent, Path(tmp))
            except (OSError, ValueError) as exc:
                results.append(TestResult(t.name, False, error=f"{type(exc).__name__}: {exc}", line=t.line))
                continue
            checks = [_check(e, decisions, origin) for e in t.expect]
            results.append(TestResult(t.name, all(c.ok for c in checks), checks, input=label, line=t.line))
    return results


def series_origin(spec: Mapping[str, Any]) -> float:
    """Where a series input starts (its ``start``, else a fixed default), in Unix seconds."""
    start = spec.get("start")
    return _DEFAULT_START if start is None else float(start)


def _check(e: Expectation, decisions: Sequence[Mapping[str, Any]], origin: float) -> Check:
    mine = [d for d in decisions if d.get("kind") == "alert" and d["rule"] == e.rule
            and d["deployment"] == e.deployment and (e.variant is None or d["variant"] == e.variant)]
    lo = -math.inf if e.after is None else origin + e.after
    hi = math.inf if e.at_or_before is None else origin + e.at_or_before
    target = "firing" if e.state == "none" else e.state
    hits = [d for d in mine if d["state"] == target and lo < d["ts"] <= hi]
    ok = not hits if e.state == "none" else bool(hits)
    return Check(e, ok, _got(e, mine, origin))


def _got(e: Expectation, mine: Sequence[Mapping[str, Any]], origin: float) -> str:
    """What the alert did, one clause per variant: every transition with its offset."""
    if not mine:
        return f"{e.rule} {e.deployment}/{e.variant or '*'} never pending, never fired"
    by_variant: dict[str, list[str]] = {}
    for d in mine:
        v = (d.get("measurement") or {}).get("value")
        off = d["ts"] - origin
        by_variant.setdefault(d["variant"], []).append(
            f"{d['state']} at {'+' if off >= 0 else '-'}{format_duration(round(abs(off)))}"
            + (f" (value {v:.4g})" if isinstance(v, float) else "")
        )
    return "; ".join(
        f"{e.rule} {e.deployment}/{variant} " + ", ".join(items)
        + ("" if any(i.startswith("firing") for i in items) else ", never fired")
        for variant, items in by_variant.items()
    )


def format_results(results: Sequence[TestResult], path: str | os.PathLike[str] | None = None) -> str:
    """PASS/FAIL per test and, for each failed expectation, what was expected against what
    happened (``-`` expected, ``+`` got)."""
    lines = []
    if path is not None:
        lines.append(f"{path}:")
    for r in results:
        if r.error is not None:
            lines.append(f"  FAIL  {r.name}: {r.error}")
            continue
        failed = [c for c in r.checks if not c.ok]
        if not failed:
            lines.append(f"  PASS  {r.name} ({len(r.checks)} expectation(s), {r.input})")
            continue
        lines.append(f"  FAIL  {r.name} ({len(failed)} of {len(r.checks)} expectation(s) failed, {r.input})")
        for c in failed:
            e = c.expectation
            lines.append(f"        - expected: {e.describe()}" + (f"   (line {e.line})" if e.line else ""))
            lines.append(f"        + got:      {c.got}")
    passed = sum(1 for r in results if r.ok)
    lines.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines) + "\n"


def exit_code(results: Sequence[TestResult]) -> int:
    """0 when every test passed, 1 otherwise (2 is for an invalid file: RuleTestError)."""
    return 0 if all(r.ok for r in results) else 1


def iter_failures(results: Sequence[TestResult]) -> Iterator[tuple[TestResult, Check]]:
    for r in results:
        for c in r.checks:
            if not c.ok:
                yield r, c
