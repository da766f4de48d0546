"""Load the rules file into :class:`~rollbackd.rules.model.Config`, reporting every problem at once.

The file is composed (not constructed) with PyYAML's safe loader, so each value still carries
its line and column while we check it; like Prometheus' ``rulefmt``, a user who runs
``rollbackd validate`` sees every error in one go, each with its place, instead of fixing
them one by one. Values are checked against the schema below, then against each other
(rule → deployment references, hysteresis, ``k <= n``, detector names and parameters).
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Collection, Iterable, Literal, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rollbackd.rules.budget import apply_budgets, budget_lines, unreachable_level
from rollbackd.rules.durations import DURATION_FORMS, format_duration, parse_duration
from rollbackd.rules.parse import RulesFileError, TooLarge, compose, read_rules_file
from rollbackd.rules.model import (
    ACTIONS,
    APPROVAL_DEFAULTS,
    ApprovalSpec,
    DEPLOYMENT_POLICIES,
    SEVERITIES,
    BackendSpec,
    Config,
    DeploymentSpec,
    DigestSpec,
    FalseAlarmBudget,
    MATCH_LABELS,
    GroupingSpec,
    InhibitRule,
    NotifierSpec,
    RuleSpec,
    Settings,
    WindowSpec,
)

__all__ = [
    "ConfigIssue",
    "ConfigError",
    "load_config",
    "load_config_text",
    "check_file",
    "check_text",
    "validate_file",
    "summarize",
    "known_detectors",
    "FALLBACK_DETECTORS",
    "BACKEND_TYPES",
    "NOTIFIER_TYPES",
    "GROUP_LABELS",
]

# Used when ``rollbackd.detectors`` cannot be imported or registers nothing, so a broken
# detector module degrades the check to names instead of failing every config.
FALLBACK_DETECTORS = (
    "error_rate", "latency", "model_error", "drift", "traffic",
    "burn_rate", "calibration", "canary", "sequential", "data_quality",
)
BACKEND_TYPES = ("log", "webhook", "mlflow", "kubernetes", "command", "traffic-file")
KUBERNETES_KINDS = ("deployment", "argo-rollout", "kserve")
COMMAND_PLACEHOLDERS = ("deployment", "variant", "to_version", "from_version", "incident")
NOTIFIER_TYPES = ("console", "slack", "none")
GROUP_LABELS = ("rule", "deployment", "variant", "severity")
DIRECTIONS = ("above", "below")
SUPPORTED_VERSIONS = (1,)

# Set by the rule itself; a copy under ``params`` would silently disagree with it.
_RULE_OWNED_PARAMS = ("threshold", "min_samples", "reference")

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_FOR_WINDOWS = re.compile(r"^\s*(\d+)\s+windows?\s*$")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_YEAR_10000 = 253_402_300_800.0  # 10000-01-01T00:00:00Z in Unix seconds


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a rules file: where (dotted ``path``, 1-based ``line``/``column``) and what.

    ``line`` is 0 when the problem has no place in the file (it could not be read).
    """

    path: str
    line: int
    column: int
    message: str
    severity: Literal["error", "warning"] = "error"

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}:{self.column}: " if self.line else f"{source}: "
        what = f"{self.path}: " if self.path else ""
        kind = "warning: " if self.severity == "warning" else ""
        return f"{where}{what}{kind}{self.message}"


class ConfigError(ValueError):
    """The rules file is invalid; ``errors`` holds every problem found, in file order."""

    def __init__(self, errors: list[ConfigIssue], source: str = "<string>") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(issue.format(self.source) for issue in self.errors)


# --------------------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and validate the rules file at ``path``; :class:`ConfigError` lists every error."""
    config, issues = check_file(path)
    errors = [i for i in issues if i.severity == "error"]
    if errors or config is None:
        raise ConfigError(errors, str(path))
    return config


def load_config_text(
    text: str, source: str = "<string>", *, base_dir: str | os.PathLike[str] | None = None
) -> Config:
    """Like :func:`load_config` for text already read; ``source`` names it in messages.

    Relative ``reference`` paths resolve against ``base_dir``, else against ``source``'s folder
    when ``source`` is a path, else they are kept as written.
    """
    config, issues = check_text(text, source, base_dir=base_dir)
    errors = [i for i in issues if i.severity == "error"]
    if errors or config is None:
        raise ConfigError(errors, source)
    return config


def check_file(path: str | os.PathLike[str]) -> tuple[Config | None, list[ConfigIssue]]:
    """Every issue (errors and warnings) in the file, and the config when there was no error."""
    try:
        text = read_rules_file(path)
    except RulesFileError as exc:
        return None, [ConfigIssue("", exc.line, exc.column, f"cannot read the rules file: {exc.message}")]
    except OSError as exc:
        return None, [ConfigIssue("", 0, 0, f"cannot read the rules file: {exc.strerror or exc}")]
    return check_text(text, str(path), base_dir=Path(path).parent)


def check_text(
    text: str, source: str = "<string>", *, base_dir: str | os.PathLike[str] | None = None
) -> tuple[Config | None, list[ConfigIssue]]:
    """Every issue in ``text``, and the config when there was no error (warnings allowed)."""
    if base_dir is None and not source.startswith("<"):
        base_dir = Path(source).parent
    walker = _Walker(None if base_dir is None else Path(base_dir))
    config = walker.load(text, source)
    issues = sorted(walker.issues, key=lambda i: (i.line, i.column))
    if any(i.severity == "error" for i in issues):
        return None, issues
    return config, issues


def validate_file(path: str | os.PathLike[str]) -> list[ConfigIssue]:
    """Every issue in the file; the file is usable when none has ``severity == "error"``."""
    return check_file(path)[1]


def known_detectors() -> Mapping[str, Callable[..., Any] | None]:
    """Detector names a rule may use, with their factories (``None`` in the fallback list)."""
    try:
        import rollbackd.detectors  # noqa: F401  (registers the built-in detectors)
        from rollbackd.detectors.base import REGISTRY
    except Exception:  # a half-written detector module must not make every config invalid
        return {name: None for name in FALLBACK_DETECTORS}
    if not REGISTRY:
        return {name: None for name in FALLBACK_DETECTORS}
    return dict(REGISTRY)


# --------------------------------------------------------------------------- the walker


class _Invalid:
    """A value that failed its check; the error is already recorded."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Invalid()

Pairs = dict[str, tuple[Node, Node]]


def _sub(path: str, key: str) -> str:
    if _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return {
        _NULL: "null",
        _STR: "a string",
        "tag:yaml.org,2002:int": "an integer",
        "tag:yaml.org,2002:float": "a number",
        "tag:yaml.org,2002:bool": "a boolean",
    }.get(node.tag, f"a {node.tag.rsplit(':', 1)[-1]}")


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _fmt_num(x: float) -> str:
    return f"{x:g}"


class _Walker:
    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.issues: list[ConfigIssue] = []
        self.errors = 0  # issues with severity "error": counted, not recounted per rule
        self.ctor = yaml.constructor.SafeConstructor()
        # Where budget warnings point: a rule's item node, a deployment's budget node.
        self.rule_nodes: dict[str, Node] = {}
        self.budget_nodes: dict[str, tuple[Node, str]] = {}

    # ----------------------------------------------------------------- reporting

    def error(self, node: Node | None, path: str, message: str) -> Any:
        self._add(node, path, message, "error")
        return INVALID

    def warn(self, node: Node | None, path: str, message: str) -> None:
        self._add(node, path, message, "warning")

    def _add(self, node: Node | None, path: str, message: str, severity: Any) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        column = node.start_mark.column + 1 if node is not None else 1
        self.issues.append(ConfigIssue(path, line, column, message, severity))
        self.errors += severity == "error"

    # ----------------------------------------------------------------- structure

    def mapping(self, node: Node, path: str, keys: Collection[str]) -> Pairs | None:
        """Check ``node`` is a mapping of known string keys; ``None`` (after reporting) if not."""
        if _is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            self.error(node, path, f"expected a mapping (key: value), got {_kind(node)}")
            return None
        out: Pairs = {}
        for key, value, merged in self._flatten(node, path, set()):
            if not (isinstance(key, ScalarNode) and key.tag == _STR):
                self.error(key, path, f"keys must be strings, got {_kind(key)}")
                continue
            name = key.value
            if name in out:
                if not merged:  # an explicit key overrides a merged one (YAML merge semantics)
                    first = out[name][0].start_mark.line + 1
                    self.error(key, _sub(path, name), f"duplicate key (first set on line {first})")
                continue
            if name not in keys:
                self.error(key, _sub(path, name), f"unknown key {name!r}{_suggest(name, keys)}")
                continue
            out[name] = (key, value)
        return out

    def _flatten(
        self, node: MappingNode, path: str, seen: set[int]
    ) -> list[tuple[Node, Node, bool]]:
        if id(node) in seen:
            self.error(node, path, "a merge (<<) refers to itself")
            return []
        seen = seen | {id(node)}
        own: list[tuple[Node, Node, bool]] = []
        merged: list[tuple[Node, Node, bool]] = []
        for key, value in node.value:
            if key.tag != _MERGE:
                own.append((key, value, False))
                continue
            sources = value.value if isinstance(value, SequenceNode) else [value]
            for src in sources:
                if not isinstance(src, MappingNode):
                    self.error(src, path, "a merge (<<) takes a mapping or a list of mappings")
                    continue
                merged.extend((k, v, True) for k, v, _ in self._flatten(src, path, seen))
        return own + merged

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if _is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            self.error(node, path, f"expected a list, got {_kind(node)}")
            return None
        return list(node.value)

    def construct(self, node: Node, path: str) -> Any:
        try:
            return self.ctor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            return self.error(node, path, f"cannot read value: {problem}")
        except (ValueError, OverflowError) as exc:  # a date like 2026-13-45 (datetime's own check)
            return self.error(node, path, f"cannot read value: {exc}")

    # ----------------------------------------------------------------- scalars

    def string(self, node: Node, path: str, *, choices: Collection[str] | None = None) -> Any:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            hint = " (quote it)" if isinstance(node, ScalarNode) and not _is_null(node) else ""
            return self.error(node, path, f"expected a string, got {_kind(node)}{hint}")
        value: str = node.value
        if not value.strip():
            return self.error(node, path, "must not be empty")
        if choices is not None and value not in choices:
            return self.error(
                node,
                path,
                f"{value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}",
            )
        return value

    def boolean(self, node: Node, path: str) -> Any:
        value = self.construct(node, path) if isinstance(node, ScalarNode) else None
        if value is INVALID:
            return INVALID
        if not isinstance(value, bool):
            return self.error(node, path, f"expected true or false, got {_kind(node)}")
        return value

    def number(
        self,
        node: Node,
        path: str,
        *,
        gt: float | None = None,
        ge: float | None = None,
        lt: float | None = None,
        le: float | None = None,
        integer: bool = False,
    ) -> Any:
        value = self.construct(node, path) if isinstance(node, ScalarNode) else None
        if value is INVALID:
            return INVALID
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            want = "an integer" if integer else "a number"
            return self.error(node, path, f"expected {want}, got {_kind(node)}")
        if isinstance(value, float) and not math.isfinite(value):
            return self.error(node, path, f"must be finite, got {value}")
        for bound, bad, words in (
            (gt, lambda b: value <= b, "> "),
            (ge, lambda b: value < b, ">= "),
            (lt, lambda b: value >= b, "< "),
            (le, lambda b: value > b, "<= "),
        ):
            if bound is not None and bad(bound):
                return self.error(node, path, f"must be {words}{_fmt_num(bound)}, got {value}")
        return int(value) if integer else float(value)

    def duration(self, node: Node, path: str, *, positive: bool = False) -> Any:
        if not isinstance(node, ScalarNode) or _is_null(node):
            return self.error(
                node, path, f"expected a duration ({DURATION_FORMS}), got {_kind(node)}"
            )
        value = self.construct(node, path)
        if value is INVALID:
            return INVALID
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            return self.error(node, path, str(exc))
        if positive and seconds <= 0:
            return self.error(node, path, "must be longer than 0s")
        return seconds

    def strings(
        self, node: Node, path: str, *, choices: Collection[str] | None = None, non_empty: bool
    ) -> Any:
        items = self.sequence(node, path)
        if items is None:
            return INVALID
        if non_empty and not items:
            return self.error(node, path, "must not be empty (leave the key out instead)")
        out: list[str] = []
        failed = False
        for i, item in enumerate(items):
            value = self.string(item, f"{path}[{i}]", choices=choices)
            if value is INVALID:
                failed = True
            elif value in out:
                self.error(item, f"{path}[{i}]", f"{value!r} is listed twice")
                failed = True
            else:
                out.append(value)
        return INVALID if failed else tuple(out)

    # ----------------------------------------------------------------- the document

    def load(self, text: str, source: str) -> Config | None:
        try:
            root = compose(text)
        except TooLarge as exc:
            mark = exc.problem_mark
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            self.issues.append(ConfigIssue("", line, col, str(exc.problem)))
            return None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, ...)
            line = text.count("\n", 0, exc.position) + 1
            col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            what = f"character #x{exc.character:04x}" if isinstance(exc.character, int) else "character"
            self.issues.append(ConfigIssue("", line, col, f"YAML syntax error: unacceptable {what}: {exc.reason}"))
            return None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = exc.problem or "invalid YAML"
            if exc.context:
                message = f"{message} ({exc.context}"
                if exc.context_mark is not None and exc.context_mark is not mark:
                    message += f" started on line {exc.context_mark.line + 1}"
                message += ")"
            line = mark.line + 1 if mark is not None else 1
            col = mark.column + 1 if mark is not None else 1
            self.issues.append(ConfigIssue("", line, col, f"YAML syntax error: {message}"))
            return None
        except yaml.YAMLError as exc:
            self.issues.append(ConfigIssue("", 1, 1, f"YAML syntax error: {' '.join(str(exc).split())}"))
            return None
        if root is None:
            self.issues.append(
                ConfigIssue("", 1, 1, "the file is empty; expected a mapping with a `rules:` list")
            )
            return None
        top = self.mapping(
            root, "", ("version", "settings", "grouping", "deployments", "rules", "inhibit_rules")
        )
        if top is None:
            return None

        if "version" in top:
            node = top["version"][1]
            version = self.number(node, "version", integer=True)
            if version is not INVALID and version not in SUPPORTED_VERSIONS:
                self.error(
                    node,
                    "version",
                    f"unsupported version {version}; this rollbackd reads version 1",
                )

        settings = self.settings(top["settings"][1]) if "settings" in top else Settings()
        grouping = self.grouping(top["grouping"][1]) if "grouping" in top else GroupingSpec()
        deployments = self.deployments(top["deployments"][1]) if "deployments" in top else {}

        if "rules" in top:
            rules_key, rules_node = top["rules"]
            rules = self.rules(rules_node, deployments)
        else:
            rules_key, rules = root, ()
        if not rules and rules is not INVALID:
            self.warn(
                rules_key, "rules", "no rules: rollbackd will watch the stream but never alert"
            )
        inhibit: Any = ()
        if "inhibit_rules" in top:
            inhibit = self.inhibit_rules(top["inhibit_rules"][1], rules if isinstance(rules, tuple) else ())
        if not isinstance(rules, tuple) or inhibit is INVALID:
            return None
        rules = self.budgets(deployments, rules)
        return Config(
            settings=settings,
            deployments=MappingProxyType(dict(deployments)),
            rules=rules,
            grouping=grouping,
            inhibit_rules=inhibit,
            source=source,
        )

    # ----------------------------------------------------------------- false-alarm budget

    def budgets(
        self, deployments: Mapping[str, DeploymentSpec], rules: tuple[RuleSpec, ...]
    ) -> tuple[RuleSpec, ...]:
        """Set each budgeted rule's ``alpha``; warn where a budget cannot hold."""
        out, notes = apply_budgets(deployments, rules)
        for note in notes:
            if note.rule is not None and note.rule in self.rule_nodes:
                index = next(i for i, r in enumerate(rules) if r.name == note.rule)
                node, path = self.rule_nodes[note.rule], f"rules[{index}]"
            else:
                node, path = self.budget_nodes.get(note.deployment, (None, "deployments"))
            self.warn(node, path, note.message)
        return out

    # ----------------------------------------------------------------- inhibition

    def inhibit_rules(self, node: Node, rules: tuple[RuleSpec, ...]) -> Any:
        items = self.sequence(node, "inhibit_rules")
        if items is None:
            return INVALID
        out: list[InhibitRule] = []
        names: dict[str, int] = {}
        failed = False
        for i, item in enumerate(items):
            path = f"inhibit_rules[{i}]"
            pairs = self.mapping(item, path, ("name", "source", "target", "equal"))
            if pairs is None:
                failed = True
                continue
            kw: dict[str, Any] = {}
            for key in ("name", "target"):
                if key not in pairs:
                    self.error(item, path, f"missing `{key}`")
                    failed = True
            if "name" in pairs:
                name = self.string(pairs["name"][1], _sub(path, "name"))
                if name is not INVALID:
                    if name in names:
                        self.error(pairs["name"][1], _sub(path, "name"),
                                   f"duplicate inhibit rule name {name!r} (first on line {names[name]})")
                        failed = True
                    names[name] = pairs["name"][1].start_mark.line + 1
                    kw["name"] = name
                else:
                    failed = True
            if "target" in pairs:
                target = self.matchers(pairs["target"][1], _sub(path, "target"), rules, allow_rollback=False)
                failed |= target is INVALID
                kw["target"] = target
            if "source" in pairs:
                source = self.matchers(pairs["source"][1], _sub(path, "source"), rules, allow_rollback=True)
                if source is INVALID:
                    failed = True
                else:
                    kw["source_rollback"] = bool(source.pop("rollback_in_progress", False))
                    kw["source"] = MappingProxyType(source)
                    if not source and not kw["source_rollback"]:
                        self.error(pairs["source"][1], _sub(path, "source"),
                                   "needs at least one matcher or `rollback_in_progress: true`")
                        failed = True
            else:
                self.error(item, path, "missing `source`")
                failed = True
            if "equal" in pairs:
                equal = self.strings(pairs["equal"][1], _sub(path, "equal"),
                                     choices=("deployment", "variant"), non_empty=True)
                if equal is INVALID:
                    failed = True
                elif "deployment" not in equal:
                    self.error(pairs["equal"][1], _sub(path, "equal"),
                               "must include `deployment`: one deployment never inhibits another")
                    failed = True
                else:
                    kw["equal"] = equal
            if not failed and "name" in kw and isinstance(kw.get("target"), Mapping):
                kw["target"] = MappingProxyType(kw["target"])
                out.append(InhibitRule(**kw))
        return INVALID if failed else tuple(out)

    def matchers(self, node: Node, path: str, rules: tuple[RuleSpec, ...], *, allow_rollback: bool) -> Any:
        keys = MATCH_LABELS + (("rollback_in_progress",) if allow_rollback else ())
        pairs = self.mapping(node, path, keys)
        if pairs is None:
            return INVALID
        out: dict[str, Any] = {}
        failed = False
        for key, (_, value) in pairs.items():
            sub = _sub(path, key)
            if key == "rollback_in_progress":
                flag = self.boolean(value, sub)
                if flag is INVALID:
                    failed = True
                elif flag is not True:
                    self.error(value, sub, "only `true` makes sense here (leave the key out instead)")
                    failed = True
                else:
                    out[key] = True
                continue
            choices = {
                "severity": SEVERITIES,
                "detector": tuple(known_detectors()),
                "rule": tuple(r.name for r in rules) or None,
            }.get(key)
            if isinstance(value, SequenceNode):
                got = self.strings(value, sub, choices=choices, non_empty=True)
            else:
                one = self.string(value, sub, choices=choices)
                got = INVALID if one is INVALID else (one,)
            if got is INVALID:
                failed = True
            else:
                out[key] = got
        if not out and not failed and not allow_rollback:
            self.error(node, path, f"needs at least one matcher ({', '.join(MATCH_LABELS)})")
            failed = True
        return INVALID if failed else out

    # ----------------------------------------------------------------- settings

    def settings(self, node: Node) -> Settings:
        keys = (
            "dry_run",
            "lateness",
            "join_horizon",
            "max_pending_labels",
            "max_event_bytes",
            "max_future_skew",
            "min_event_time",
            "max_deployments",
            "max_variants_per_deployment",
            "max_features_per_deployment",
            "notifier",
        )
        pairs = self.mapping(node, "settings", keys)
        if not pairs:
            return Settings()
        kw: dict[str, Any] = {}
        self.optional(pairs, "settings", kw, "dry_run", self.boolean)
        self.optional(pairs, "settings", kw, "lateness", self.duration)
        self.optional(
            pairs, "settings", kw, "join_horizon", lambda n, p: self.duration(n, p, positive=True)
        )
        self.optional(
            pairs,
            "settings",
            kw,
            "max_pending_labels",
            lambda n, p: self.number(n, p, integer=True, ge=1),
        )
        self.optional(
            pairs,
            "settings",
            kw,
            "max_event_bytes",
            lambda n, p: self.number(n, p, integer=True, ge=1),
        )
        self.optional(
            pairs, "settings", kw, "max_future_skew",
            lambda n, p: self.duration(n, p, positive=True),
        )
        self.optional(pairs, "settings", kw, "min_event_time", self.event_time)
        for cap in ("max_deployments", "max_variants_per_deployment", "max_features_per_deployment"):
            self.optional(
                pairs, "settings", kw, cap, lambda n, p: self.number(n, p, integer=True, ge=1)
            )
        if "notifier" in pairs:
            notifier = self.notifier(pairs["notifier"][1], "settings.notifier")
            if notifier is not None:
                kw["notifier"] = notifier
        return Settings(**kw)

    def event_time(self, node: Node, path: str) -> Any:
        """A point in time: RFC 3339 (``2000-01-01T00:00:00Z``, quoted or not) or Unix seconds,
        between 1970 and 9999 (what the event contract can carry)."""
        import datetime as dt

        value = self.construct(node, path) if isinstance(node, ScalarNode) else None
        if value is INVALID:
            return INVALID
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value.strip().replace("z", "Z").replace("Z", "+00:00"))
            except ValueError:
                return self.error(
                    node, path, f"expected an RFC 3339 time (2000-01-01T00:00:00Z) or Unix seconds, got {value!r}"
                )
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:  # YAML reads an unquoted ...Z time as naive UTC
                value = value.replace(tzinfo=dt.timezone.utc)
            value = value.timestamp()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.error(
                node, path, f"expected an RFC 3339 time (2000-01-01T00:00:00Z) or Unix seconds, got {_kind(node)}"
            )
        if not 0 <= value < _YEAR_10000:
            return self.error(node, path, f"must be between 1970 and 9999, got {value}")
        return float(value)

    def optional(
        self,
        pairs: Pairs,
        path: str,
        into: dict[str, Any],
        key: str,
        check: Callable[[Node, str], Any],
        attr: str | None = None,
    ) -> Any:
        """Check ``pairs[key]`` if present and not null; store it under ``attr`` when valid."""
        if key not in pairs or _is_null(pairs[key][1]):
            return None
        value = check(pairs[key][1], _sub(path, key))
        if value is not INVALID:
            into[attr or key] = value
        return value

    def notifier(self, node: Node, path: str) -> NotifierSpec | None:
        # The option names are those ``actions.factory.make_notifier`` reads.
        schema: dict[str, dict[str, Callable[[Node, str], Any]]] = {
            "console": {"color": self.boolean, "digest": self.digest},
            "none": {},
            "slack": {
                "channel": self.string,
                "token_env": self.string,
                "base_url": self.url,
                "timeout": lambda n, p: self.duration(n, p, positive=True),
                "max_rate_limit_retries": lambda n, p: self.number(n, p, integer=True, ge=0),
                "digest": self.digest,
            },
        }
        typed = self.typed_options(node, path, schema, "console", {"slack": ("channel",)})
        if typed is None:
            return None
        kind, options = typed
        digest = options.pop("digest", None)  # the notifier's schedule, not one of its options
        return NotifierSpec(type=kind, options=MappingProxyType(options), digest=digest)

    def digest(self, node: Node, path: str) -> Any:
        """``"0 9 * * *"`` (UTC) or ``{cron: "0 9 * * *", timezone: Europe/Berlin}``."""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from apscheduler.triggers.cron import CronTrigger

        if isinstance(node, ScalarNode):
            cron_node, tz_node, pairs = node, None, None
        else:
            pairs = self.mapping(node, path, ("cron", "timezone"))
            if pairs is None:
                return INVALID
            if "cron" not in pairs:
                return self.error(node, path, 'missing `cron`: a 5-field cron expression, e.g. "0 9 * * *"')
            cron_node, tz_node = pairs["cron"][1], pairs.get("timezone", (None, None))[1]
        cron_path = path if pairs is None else _sub(path, "cron")
        cron = self.string(cron_node, cron_path)
        tz_name = "UTC" if tz_node is None else self.string(tz_node, _sub(path, "timezone"))
        if INVALID in (cron, tz_name):
            return INVALID
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            return self.error(tz_node, _sub(path, "timezone"),
                              f"unknown time zone {tz_name!r} (an IANA name such as UTC or Europe/Berlin)")
        try:
            CronTrigger.from_crontab(cron, timezone=tz)
        except ValueError as exc:
            return self.error(cron_node, cron_path, f"not a cron expression (minute hour day month weekday): {exc}")
        weekday = cron.split()[4]
        if re.search(r"\d", weekday):
            self.warn(cron_node, cron_path, f"weekday {weekday!r}: numbers count from 0 = Monday here "
                      "(APScheduler), not from 0 = Sunday as in crontab; names (mon-fri, sun) are unambiguous")
        return DigestSpec(cron=cron, timezone=tz_name)

    def backend(self, node: Node, path: str) -> BackendSpec | None:
        # The option names are those ``actions.factory.make_backend`` reads.
        schema: dict[str, dict[str, Callable[[Node, str], Any]]] = {
            "log": {},
            "webhook": {
                "url": self.url,
                "secret_env": self.string,
                "timeout": lambda n, p: self.duration(n, p, positive=True),
                "headers": self.headers,
                "retry": self.retry,
                "max_attempts": lambda n, p: self.number(n, p, integer=True, ge=1),
            },
        }
        duration = lambda n, p: self.duration(n, p, positive=True)  # noqa: E731
        argv = lambda n, p: self.argv(n, p)  # noqa: E731
        schema["mlflow"] = {
            "tracking_uri": self.url,
            "alias": self.string,
            "model": self.string,
            "token_env": self.string,
            "timeout": duration,
            "retry": self.retry,
        }
        schema["kubernetes"] = {
            "kind": lambda n, p: self.string(n, p, choices=KUBERNETES_KINDS),
            **{k: self.string for k in ("name", "namespace", "container", "label", "env_var")},
            "image_template": self.version_template,
            "storage_uri_template": self.version_template,
            "api_url": self.url,
            "token_env": self.string,
            "kubeconfig": self.string,
            "context": self.string,
            "in_cluster": self.boolean,
            "verify_tls": self.boolean,
            "timeout": duration,
            "retry": self.retry,
        }
        schema["command"] = {
            "argv": argv,
            "current_argv": argv,
            "timeout": duration,
            "env": self.string_mapping,
            "env_from": lambda n, p: self.strings(n, p, non_empty=False),
            "cwd": self.string,
            "max_output": lambda n, p: self.number(n, p, integer=True, ge=1),
        }
        schema["traffic-file"] = {
            "path": self.string,
            "route": self.string,
            "format": lambda n, p: self.string(n, p, choices=("json", "yaml")),
            "total": lambda n, p: self.number(n, p, integer=True, ge=1),
        }
        required = {
            "webhook": ("url",),
            "mlflow": ("tracking_uri",),
            "kubernetes": ("kind",),
            "command": ("argv",),
            "traffic-file": ("path",),
        }
        typed = self.typed_options(node, path, schema, "log", required)
        if typed is None:
            return None
        kind, options = typed
        if kind == "kubernetes" and not self.kubernetes_options(node, path, options):
            return None
        if "max_attempts" in options:
            # ``max_attempts: N`` is shorthand for ``retry: {max_attempts: N}``.
            retry = dict(options.get("retry", {}))
            if "max_attempts" in retry:
                self.error(
                    node,
                    _sub(path, "max_attempts"),
                    "set max_attempts here or under retry, not both",
                )
                return None
            retry["max_attempts"] = options.pop("max_attempts")
            options["retry"] = MappingProxyType(retry)
        return BackendSpec(type=kind, options=MappingProxyType(options))

    def kubernetes_options(self, node: Node, path: str, options: Mapping[str, Any]) -> bool:
        # The same cross-option rules ``actions.kubernetes.KubernetesBackend`` enforces.
        k8s_kind = options.get("kind")
        per_deployment = [k for k in ("image_template", "label", "env_var", "container") if k in options]
        problems = []
        if k8s_kind == "deployment" and not set(per_deployment) - {"container"}:
            problems.append("kind deployment needs at least one of image_template, label, env_var")
        if k8s_kind != "deployment" and per_deployment:
            problems.append(f"{', '.join(per_deployment)}: only for kind deployment")
        if k8s_kind != "kserve" and "storage_uri_template" in options:
            problems.append("storage_uri_template: only for kind kserve")
        for problem in problems:
            self.error(node, path, problem)
        return not problems

    def version_template(self, node: Node, path: str) -> Any:
        value = self.string(node, path)
        if value is not INVALID and value.count("{version}") != 1:
            return self.error(node, path, f"must contain {{version}} exactly once, got {value!r}")
        return value

    def argv(self, node: Node, path: str) -> Any:
        # Not ``strings``: an argv may repeat an element (``--set a=1 --set b=2``).
        if not isinstance(node, SequenceNode) or not node.value:
            return self.error(
                node, path, f"expected a non-empty list of strings (an argv; no shell is used), got {_kind(node)}"
            )
        out = tuple(self.string(item, f"{path}[{i}]") for i, item in enumerate(node.value))
        if INVALID in out:
            return INVALID
        for i, element in enumerate(out):
            for name in re.findall(r"\{([A-Za-z_][A-Za-z0-9_.\[\]]*)\}", element):
                if name not in COMMAND_PLACEHOLDERS:
                    self.error(
                        node.value[i],
                        f"{path}[{i}]",
                        f"{{{name}}} is not a placeholder (known: "
                        f"{', '.join('{' + p + '}' for p in COMMAND_PLACEHOLDERS)})",
                    )
                    return INVALID
        return out

    def string_mapping(self, node: Node, path: str, what: str = "name to string") -> Any:
        if not isinstance(node, MappingNode):
            return self.error(node, path, f"expected a mapping of {what}, got {_kind(node)}")
        out: dict[str, str] = {}
        for key, value, _ in self._flatten(node, path, set()):
            name = self.string(key, path)
            text = self.string(value, _sub(path, name) if isinstance(name, str) else path)
            if name is INVALID or text is INVALID:
                return INVALID
            out[name] = text
        return MappingProxyType(out)

    def headers(self, node: Node, path: str) -> Any:
        return self.string_mapping(node, path, "header to value")

    def retry(self, node: Node, path: str) -> Any:
        pairs = self.mapping(node, path, ("max_attempts", "base_delay", "max_delay", "multiplier"))
        if pairs is None:
            return INVALID
        kw: dict[str, Any] = {}
        checks = (
            self.optional(
                pairs, path, kw, "max_attempts", lambda n, p: self.number(n, p, integer=True, ge=1)
            ),
            self.optional(pairs, path, kw, "base_delay", self.duration),
            self.optional(pairs, path, kw, "max_delay", self.duration),
            self.optional(pairs, path, kw, "multiplier", lambda n, p: self.number(n, p, ge=1)),
        )
        if INVALID in checks:
            return INVALID
        if "max_delay" in kw and kw["max_delay"] < kw.get("base_delay", 0.5):
            return self.error(
                pairs["max_delay"][1], _sub(path, "max_delay"), "must be >= base_delay"
            )
        return MappingProxyType(kw)

    def url(self, node: Node, path: str) -> Any:
        value = self.string(node, path)
        if value is not INVALID and not re.match(r"^https?://[^\s/]+", value):
            return self.error(node, path, f"expected an http:// or https:// URL, got {value!r}")
        return value

    def typed_options(
        self,
        node: Node,
        path: str,
        schema: Mapping[str, Mapping[str, Callable[[Node, str], Any]]],
        default_type: str,
        required: Mapping[str, tuple[str, ...]],
    ) -> tuple[str, dict[str, Any]] | None:
        """A ``{type: NAME, ...options}`` mapping whose allowed options depend on ``type``."""
        if _is_null(node):
            return default_type, {}
        if not isinstance(node, MappingNode):
            self.error(node, path, f"expected a mapping with a `type`, got {_kind(node)}")
            return None
        # Read ``type`` first so the unknown-key check knows which options are allowed.
        type_node = next(
            (
                v
                for k, v, _ in self._flatten(node, path, set())
                if isinstance(k, ScalarNode) and k.value == "type" and k.tag == _STR
            ),
            None,
        )
        kind = (
            default_type
            if type_node is None
            else self.string(type_node, _sub(path, "type"), choices=tuple(schema))
        )
        if kind is INVALID:
            allowed = ("type", *dict.fromkeys(k for s in schema.values() for k in s))
        else:
            allowed = ("type", *schema[kind])
        pairs = self.mapping(node, path, allowed)
        if pairs is None or kind is INVALID:
            return None
        options: dict[str, Any] = {}
        failed = False
        for key, check in schema[kind].items():
            value = self.optional(pairs, path, options, key, check)
            failed |= value is INVALID
        for key in required.get(kind, ()):
            if key not in pairs or _is_null(pairs[key][1]):
                self.error(node, path, f"type {kind} requires `{key}`")
                failed = True
        return None if failed else (kind, options)

    def grouping(self, node: Node) -> GroupingSpec:
        pairs = self.mapping(node, "grouping", ("group_by", "group_wait", "repeat_interval"))
        if not pairs:
            return GroupingSpec()
        kw: dict[str, Any] = {}
        self.optional(
            pairs,
            "grouping",
            kw,
            "group_by",
            lambda n, p: self.strings(n, p, choices=GROUP_LABELS, non_empty=False),
        )
        self.optional(pairs, "grouping", kw, "group_wait", self.duration)
        self.optional(
            pairs,
            "grouping",
            kw,
            "repeat_interval",
            lambda n, p: self.duration(n, p, positive=True),
        )
        return GroupingSpec(**kw)

    # ----------------------------------------------------------------- deployments

    def deployments(self, node: Node) -> dict[str, DeploymentSpec]:
        if _is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            self.error(
                node,
                "deployments",
                f"expected a mapping of deployment name to settings, got {_kind(node)}",
            )
            return {}
        out: dict[str, DeploymentSpec] = {}
        first: dict[str, Node] = {}
        for key, value, merged in self._flatten(node, "deployments", set()):
            if not (isinstance(key, ScalarNode) and key.tag == _STR and key.value.strip()):
                self.error(
                    key,
                    "deployments",
                    f"a deployment name must be a non-empty string, got {_kind(key)}",
                )
                continue
            name = key.value
            path = _sub("deployments", name)
            if name in first:
                if not merged:
                    self.error(
                        key,
                        path,
                        f"duplicate deployment (first on line {first[name].start_mark.line + 1})",
                    )
                continue
            first[name] = key
            # An invalid deployment still counts as configured, so rules naming it don't
            # get a second, misleading "unknown deployment" error.
            out[name] = self.deployment(name, value, path) or DeploymentSpec(name=name)
        return out

    def deployment(self, name: str, node: Node, path: str) -> DeploymentSpec | None:
        keys = (
            "backend",
            "slack_channel",
            "runbook",
            "reference",
            "reference_size",
            "cooldown",
            "known_good_after",
            "known_good_min_predictions",
            "dry_run",
            "false_alarm_budget",
            "policy",
            "loop_guard",
            "verify_within",
            "approval",
        )
        pairs = self.mapping(node, path, keys)
        if pairs is None:
            return None
        kw: dict[str, Any] = {"name": name}
        if "backend" in pairs:
            backend = self.backend(pairs["backend"][1], _sub(path, "backend"))
            if backend is not None:
                kw["backend"] = backend
        self.optional(pairs, path, kw, "slack_channel", self.string)
        self.optional(pairs, path, kw, "runbook", self.string)
        ref = self.optional(pairs, path, kw, "reference", self.string)
        if isinstance(ref, str):
            kw["reference"] = self.resolve(ref)
            if not os.path.exists(kw["reference"]):
                self.warn(
                    pairs["reference"][1],
                    _sub(path, "reference"),
                    f"reference file {kw['reference']} does not exist (here, at least)",
                )
        self.optional(
            pairs, path, kw, "reference_size", lambda n, p: self.number(n, p, integer=True, ge=1)
        )
        self.optional(pairs, path, kw, "cooldown", self.duration)
        self.optional(pairs, path, kw, "known_good_after", self.duration)
        self.optional(pairs, path, kw, "known_good_min_predictions",
                      lambda n, p: self.number(n, p, integer=True, ge=0))
        self.optional(pairs, path, kw, "dry_run", self.boolean)
        self.optional(pairs, path, kw, "policy", lambda n, p: self.string(n, p, choices=DEPLOYMENT_POLICIES))
        self.optional(pairs, path, kw, "verify_within", lambda n, p: self.duration(n, p, positive=True))
        if "loop_guard" in pairs:
            self.loop_guard(pairs["loop_guard"][1], _sub(path, "loop_guard"), kw)
        if "approval" in pairs and not _is_null(pairs["approval"][1]):
            approval = self.approval(pairs["approval"][1], _sub(path, "approval"))
            if approval is not None:
                kw["approval"] = approval
        if "false_alarm_budget" in pairs and not _is_null(pairs["false_alarm_budget"][1]):
            budget_path = _sub(path, "false_alarm_budget")
            budget = self.false_alarm_budget(pairs["false_alarm_budget"][1], budget_path)
            if budget is not None:
                kw["false_alarm_budget"] = budget
                self.budget_nodes[name] = (pairs["false_alarm_budget"][1], budget_path)
        return DeploymentSpec(**kw)

    def approval(self, node: Node, path: str) -> ApprovalSpec | None:
        """``{approvers: [alice, bob], timeout: 15m, default: reject}``."""
        pairs = self.mapping(node, path, ("approvers", "timeout", "default"))
        if pairs is None:
            return None
        kw: dict[str, Any] = {}
        checks = [
            self.optional(pairs, path, kw, "approvers",
                          lambda n, p: self.strings(n, p, non_empty=True)),
            self.optional(pairs, path, kw, "timeout", lambda n, p: self.duration(n, p, positive=True)),
            self.optional(pairs, path, kw, "default",
                          lambda n, p: self.string(n, p, choices=APPROVAL_DEFAULTS)),
        ]
        if INVALID in checks:
            return None
        if "approvers" not in kw:
            self.error(node, path, "missing `approvers`: the people whose answer counts")
            return None
        return ApprovalSpec(**kw)

    def loop_guard(self, node: Node, path: str, into: dict[str, Any]) -> None:
        """``{max_rollbacks: N, per: 1d}``, or ``false`` to lift the limit."""
        if isinstance(node, ScalarNode) and not _is_null(node):
            if self.boolean(node, path) is False:
                into["max_rollbacks"] = None
            return
        pairs = self.mapping(node, path, ("max_rollbacks", "per"))
        if pairs is None:
            return
        self.optional(pairs, path, into, "max_rollbacks",
                      lambda n, p: self.number(n, p, integer=True, ge=1))
        self.optional(pairs, path, into, "per", lambda n, p: self.duration(n, p, positive=True),
                      attr="loop_period")

    def false_alarm_budget(self, node: Node, path: str) -> FalseAlarmBudget | None:
        """``{rollbacks: N, per: 30d}`` and/or ``alerts: N``: expected false ones per period."""
        pairs = self.mapping(node, path, ("rollbacks", "alerts", "per"))
        if pairs is None:
            return None
        kw: dict[str, Any] = {}
        checks = [
            self.optional(pairs, path, kw, "per", lambda n, p: self.duration(n, p, positive=True)),
            self.optional(pairs, path, kw, "rollbacks", lambda n, p: self.number(n, p, gt=0)),
            self.optional(pairs, path, kw, "alerts", lambda n, p: self.number(n, p, gt=0)),
        ]
        if INVALID in checks:
            return None
        if "per" not in kw:
            self.error(node, path, "missing `per`: the period the budget is for (e.g. 30d)")
            return None
        if "rollbacks" not in kw and "alerts" not in kw:
            self.error(node, path, "state `rollbacks: N` and/or `alerts: N` per period")
            return None
        return FalseAlarmBudget(**kw)

    def resolve(self, ref: str) -> str:
        ref = os.path.expanduser(ref)
        if os.path.isabs(ref) or self.base_dir is None:
            return ref
        return os.path.abspath(self.base_dir / ref)

    # ----------------------------------------------------------------- rules

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
        "weight",
    )

    def rules(self, node: Node, deployments: Mapping[str, DeploymentSpec]) -> Any:
        items = self.sequence(node, "rules")
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
        detectors: Mapping[str, Callable[..., Any] | None],
        names: dict[str, Node],
    ) -> RuleSpec | None:
        errors_before = self.errors
        pairs = self.mapping(node, path, self.RULE_KEYS)
        if pairs is None:
            return None
        missing = [
            k for k in ("name", "detector", "threshold") if k not in pairs or _is_null(pairs[k][1])
        ]
        if missing:
            self.error(
                node,
                path,
                f"missing required key{'s' if len(missing) > 1 else ''} "
                + ", ".join(map(repr, missing)),
            )

        kw: dict[str, Any] = {}
        name = self.optional(pairs, path, kw, "name", self.string)
        if isinstance(name, str):
            if name in names:
                first = names[name].start_mark.line + 1
                self.error(
                    pairs["name"][1],
                    _sub(path, "name"),
                    f"duplicate rule name {name!r} (first on line {first})",
                )
            else:
                names[name] = pairs["name"][1]
        detector = self.optional(
            pairs, path, kw, "detector", lambda n, p: self.string(n, p, choices=sorted(detectors))
        )
        params: dict[str, Any] | None = None
        param_keys: dict[str, Node] = {}
        if "params" in pairs and not _is_null(pairs["params"][1]):
            params_node = pairs["params"][1]
            if not isinstance(params_node, MappingNode):
                self.error(
                    params_node,
                    _sub(path, "params"),
                    f"expected a mapping, got {_kind(params_node)}",
                )
            else:
                params = self.params(params_node, _sub(path, "params"), param_keys)
                if params is not None:
                    kw["params"] = MappingProxyType(params)

        threshold = self.optional(pairs, path, kw, "threshold", self.number)
        clear = self.optional(pairs, path, kw, "clear_threshold", self.number)
        direction = self.optional(
            pairs, path, kw, "direction", lambda n, p: self.string(n, p, choices=DIRECTIONS)
        )
        self.optional(pairs, path, kw, "alpha", lambda n, p: self.number(n, p, gt=0, lt=1))
        self.optional(pairs, path, kw, "weight", lambda n, p: self.number(n, p, gt=0))
        if isinstance(threshold, float) and isinstance(clear, float) and direction is not INVALID:
            above = (direction or "above") == "above"
            if above and clear > threshold:
                self.error(
                    pairs["clear_threshold"][1],
                    _sub(path, "clear_threshold"),
                    f"with direction: above, clear_threshold must be <= threshold "
                    f"({_fmt_num(clear)} > {_fmt_num(threshold)}): "
                    "an alert clears when the value falls back",
                )
            elif not above and clear < threshold:
                self.error(
                    pairs["clear_threshold"][1],
                    _sub(path, "clear_threshold"),
                    f"with direction: below, clear_threshold must be >= threshold "
                    f"({_fmt_num(clear)} < {_fmt_num(threshold)}): "
                    "an alert clears when the value rises back",
                )

        window = WindowSpec()
        if "window" in pairs:
            parsed = self.window(pairs["window"][1], _sub(path, "window"))
            if parsed is not None:
                window = kw["window"] = parsed
        self.timing(pairs, path, kw, window)
        self.optional(pairs, path, kw, "keep_firing_for", self.duration)
        if "k_of_n" in pairs and not _is_null(pairs["k_of_n"][1]):
            kn = self.k_of_n(pairs["k_of_n"][1], _sub(path, "k_of_n"))
            if kn is not None:
                kw["k"], kw["n"] = kn
        self.optional(
            pairs, path, kw, "min_samples", lambda n, p: self.number(n, p, integer=True, ge=0)
        )
        self.optional(
            pairs, path, kw, "severity", lambda n, p: self.string(n, p, choices=SEVERITIES)
        )
        actions = self.optional(
            pairs,
            path,
            kw,
            "actions",
            lambda n, p: self.strings(n, p, choices=ACTIONS, non_empty=False),
        )
        if actions == ():
            self.warn(
                pairs["actions"][1], _sub(path, "actions"), "no actions: the alert is only recorded"
            )
        elif isinstance(actions, tuple) and "rollback" in actions and "notify" not in actions:
            self.warn(
                pairs["actions"][1], _sub(path, "actions"),
                "rollback without notify: an incident of this rule alone rolls back and posts no "
                "notice, so nobody on call hears of it; add notify",
            )
        if "deployments" in pairs and not _is_null(pairs["deployments"][1]):
            self.rule_deployments(
                pairs["deployments"][1], _sub(path, "deployments"), deployments, kw
            )
        self.optional(pairs, path, kw, "variants", lambda n, p: self.strings(n, p, non_empty=True))
        self.optional(pairs, path, kw, "dry_run", self.boolean)
        self.optional(pairs, path, kw, "summary", self.string)
        self.optional(pairs, path, kw, "runbook", self.string)

        params_ok = "params" in kw or "params" not in pairs or _is_null(pairs["params"][1])
        if isinstance(detector, str) and detector in detectors and params_ok:
            # Build the detector when what it takes from the rule is valid, even if other keys
            # of the rule are not, so that every error is reported in one go; not from a
            # missing or invalid threshold or min_samples: its complaints would repeat ours.
            self.check_detector(
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
                self.warn(pairs["alpha"][1], _sub(path, "alpha"), unreachable)

        errors_after = self.errors
        if errors_after != errors_before:
            return None
        if isinstance(name, str):
            self.rule_nodes[name] = node
        if detector == "canary" and "variants" not in kw:
            self.warn(
                pairs["detector"][1],
                _sub(path, "detector"),
                "a canary rule without `variants` also runs on the baseline arm, where it has "
                "nothing to compare and a rollback would hit the wrong arm; set "
                "`variants: [canary]`",
            )
        if "for_" in kw and kw["for_"] % window.step:
            effective = math.ceil(kw["for_"] / window.step) * window.step
            key = "for" if "for" in pairs else "for_windows"
            self.warn(
                pairs[key][1],
                _sub(path, key),
                f"{format_duration(kw['for_'])} is not a multiple of window.step "
                f"({format_duration(window.step)}): rules are evaluated once per step, so it acts "
                f"as {format_duration(effective)}",
            )
        return RuleSpec(**kw)

    def params(self, node: MappingNode, path: str, seen: dict[str, Node]) -> dict[str, Any] | None:
        """Detector parameters pass through as constructed YAML; ``seen`` gets their key nodes."""
        out: dict[str, Any] = {}
        failed = False
        for key, value, merged in self._flatten(node, path, set()):
            if not (isinstance(key, ScalarNode) and key.tag == _STR):
                self.error(key, path, f"parameter names must be strings, got {_kind(key)}")
                failed = True
                continue
            name = key.value
            if name in seen:
                if not merged:
                    first = seen[name].start_mark.line + 1
                    self.error(key, _sub(path, name), f"duplicate key (first set on line {first})")
                    failed = True
                continue
            seen[name] = key
            if name in _RULE_OWNED_PARAMS:
                self.error(
                    key, _sub(path, name), f"{name!r} is set by the rule itself, not in params"
                )
                failed = True
                continue
            constructed = self.construct(value, _sub(path, name))
            if constructed is INVALID:
                failed = True
            out[name] = constructed
        return None if failed else out

    def window(self, node: Node, path: str) -> WindowSpec | None:
        pairs = self.mapping(node, path, ("size", "step", "min_count"))
        if pairs is None:
            return None
        kw: dict[str, Any] = {}
        size = self.optional(
            pairs, path, kw, "size", lambda n, p: self.duration(n, p, positive=True)
        )
        step = self.optional(
            pairs, path, kw, "step", lambda n, p: self.duration(n, p, positive=True)
        )
        self.optional(
            pairs, path, kw, "min_count", lambda n, p: self.number(n, p, integer=True, ge=0)
        )
        if size is INVALID or step is INVALID:
            return None
        size = WindowSpec.size if size is None else size
        if step is None:
            step = size
        elif step > size:
            self.error(
                pairs["step"][1],
                _sub(path, "step"),
                f"step ({format_duration(step)}) must be <= size ({format_duration(size)}); "
                "a longer step would skip data between windows",
            )
            return None
        kw["size"], kw["step"] = size, step
        return WindowSpec(**kw)

    def timing(self, pairs: Pairs, path: str, kw: dict[str, Any], window: WindowSpec) -> None:
        """``for``: a duration or ``N windows``; or ``for_windows: N``. N windows span N-1 steps."""
        has_for = "for" in pairs and not _is_null(pairs["for"][1])
        has_windows = "for_windows" in pairs and not _is_null(pairs["for_windows"][1])
        if has_for and has_windows:
            self.error(
                pairs["for_windows"][0],
                _sub(path, "for_windows"),
                "set either `for` or `for_windows`, not both",
            )
            return
        if has_windows:
            count = self.number(
                pairs["for_windows"][1], _sub(path, "for_windows"), integer=True, ge=1
            )
            if count is not INVALID:
                kw["for_"] = (count - 1) * window.step
            return
        if not has_for:
            return
        node = pairs["for"][1]
        if isinstance(node, ScalarNode) and node.tag == _STR:
            match = _FOR_WINDOWS.match(node.value)
            if match:
                count = int(match.group(1))
                if count < 1:
                    self.error(node, _sub(path, "for"), "the number of windows must be >= 1")
                else:
                    kw["for_"] = (count - 1) * window.step
                return
        if not isinstance(node, ScalarNode):
            self.error(
                node, _sub(path, "for"), f"expected a duration or `N windows`, got {_kind(node)}"
            )
            return
        value = self.construct(node, _sub(path, "for"))
        if value is INVALID:
            return
        try:
            kw["for_"] = parse_duration(value)
        except ValueError as exc:
            self.error(node, _sub(path, "for"), f"{exc}; or `N windows`")

    def k_of_n(self, node: Node, path: str) -> tuple[int, int] | None:
        items = self.sequence(node, path)
        if items is None:
            return None
        if len(items) != 2:
            self.error(node, path, f"expected [k, n] (two integers), got {len(items)} items")
            return None
        k = self.number(items[0], f"{path}[0]", integer=True, ge=1)
        n = self.number(items[1], f"{path}[1]", integer=True, ge=1)
        if k is INVALID or n is INVALID:
            return None
        if k > n:
            self.error(node, path, f"k must be <= n, got k={k}, n={n}")
            return None
        return k, n

    def rule_deployments(
        self, node: Node, path: str, deployments: Mapping[str, DeploymentSpec], kw: dict[str, Any]
    ) -> None:
        names = self.strings(node, path, non_empty=True)
        if names is INVALID:
            return
        failed = False
        for i, (item, name) in enumerate(zip(self.sequence(node, path) or [], names, strict=True)):
            if name not in deployments:
                known = ", ".join(sorted(deployments)) or "none are configured"
                self.error(
                    item,
                    f"{path}[{i}]",
                    f"unknown deployment {name!r}{_suggest(name, deployments)} "
                    f"(configured: {known})",
                )
                failed = True
        if not failed:
            kw["deployments"] = names

    def check_detector(
        self,
        factory: Callable[..., Any] | None,
        name: str,
        params: Mapping[str, Any],
        param_keys: Mapping[str, Node],
        pairs: Pairs,
        kw: Mapping[str, Any],
        path: str,
        *,
        construct: bool,
    ) -> None:
        """Catch misspelt or out-of-range detector parameters now, not at the first window."""
        if factory is None:
            return
        params_path = _sub(path, "params")
        fallback = pairs["params"] if "params" in pairs else pairs["detector"]
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):
            sig = None
        if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            accepted = [
                p
                for p, v in sig.parameters.items()
                if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)
                and p not in _RULE_OWNED_PARAMS
            ]
            unknown = [p for p in params if p not in sig.parameters]
            for p in unknown:
                self.error(
                    param_keys.get(p, fallback[1]),
                    _sub(params_path, p),
                    f"detector {name} has no parameter {p!r}{_suggest(p, accepted)} "
                    f"(it takes: {', '.join(accepted) or 'none'})",
                )
        else:
            unknown = []
        if not construct:
            return
        # the known ones are still checked: every error in one go
        kwargs = {k: v for k, v in params.items() if k not in unknown}
        if getattr(factory, "needs_reference", False):
            kwargs["reference"] = None  # built later, from the deployment's reference file
        # A constructor stops at the first value it rejects. To report every one in one go,
        # build again without each parameter it named (its default then), until it accepts
        # the rest or names something that is not a parameter of the file's.
        while True:
            try:
                factory(threshold=kw["threshold"], min_samples=kw.get("min_samples", 1), **kwargs)
                return
            except (TypeError, ValueError) as exc:
                from rollbackd.detectors.base import MissingExtra  # importable: factory is not None

                if isinstance(exc, MissingExtra):
                    # No parameter can fix it: the extra must be installed or another detector
                    # chosen. The message already starts with the detector's name.
                    self.error(pairs["detector"][1], _sub(path, "detector"), str(exc))
                    return
                # Detectors name the offending argument first ("quantile must be in (0, 1)"):
                # point at it when the file has it.
                first = re.match(r"[A-Za-z_]+", str(exc))
                word = first.group(0) if first else ""
                if word in param_keys:
                    where, where_path = param_keys[word], _sub(params_path, word)
                elif word in ("threshold", "min_samples") and word in pairs:
                    where, where_path = pairs[word][1], _sub(path, word)
                else:
                    where, where_path = fallback[1], _sub(path, fallback[0].value)
                self.error(where, where_path, f"detector {name} rejects this: {exc}")
                if word not in param_keys or word not in kwargs:
                    return
                del kwargs[word]


# --------------------------------------------------------------------------- summary


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


def summarize(config: Config) -> str:
    """A short human summary: what ``rollbackd validate`` prints for a valid file."""
    s = config.settings
    digest = ""
    if s.notifier.digest is not None:
        digest = f" (digest {s.notifier.digest.cron!r} {s.notifier.digest.timezone})"
    lines = [
        f"{config.source or '<config>'}: {len(config.deployments)} deployment(s), "
        f"{len(config.rules)} rule(s); dry run {'on' if s.dry_run else 'off'}; "
        f"notifier {s.notifier.type}{digest}; lateness {format_duration(s.lateness)}",
    ]
    if config.deployments:
        lines.append("deployments:")
        for dep in config.deployments.values():
            lines.append(f"  {dep.name}: " + ", ".join(_safety(dep, s.dry_run)))
    if config.rules:
        lines.append("rules:")
        for r in config.rules:
            op = ">" if r.direction == "above" else "<"
            cond = f"{r.detector} {op} {_fmt_num(r.threshold)}"
            if r.clear_threshold is not None and r.clear_threshold != r.threshold:
                cond += f" (clears at {_fmt_num(r.clear_threshold)})"
            if r.alpha is not None:
                cond += f", p < {_fmt_num(r.alpha)}"
                if r.alpha_source == "budget":
                    cond += " (from the false-alarm budget)"
            timing = f"for {format_duration(r.for_)}"
            if r.n > 1:
                timing += f", {r.k} of {r.n}"
            if r.keep_firing_for:
                timing += f", keep firing {format_duration(r.keep_firing_for)}"
            scope = ", ".join(r.deployments) if r.deployments is not None else "all deployments"
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
        lines.extend(budget_lines(config.rules, config.deployments))
    return "\n".join(lines)
