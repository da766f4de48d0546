"""Reading YAML nodes: the checks every section of the rules file is made of, and the issues found.

A value that fails its check is reported with its place and comes back as :data:`INVALID`, so the
caller goes on and every problem in the file is reported in one go.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Literal, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rollbackd.rules.durations import DURATION_FORMS, parse_duration

STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


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


class _Invalid:
    """A value that failed its check; the error is already recorded."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Invalid()

Pairs = dict[str, tuple[Node, Node]]
"""A checked mapping: key name → (key node, value node)."""

Check = Callable[[Node, str], Any]
"""Checks the value at ``node`` (reported under ``path``): the value, or :data:`INVALID`."""


def sub(path: str, key: str) -> str:
    """The path of ``key`` under ``path``: ``a.b``, or ``a['odd key']``."""
    if _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def kind(node: Node) -> str:
    """What ``node`` is, as an error message says it: "a mapping", "an integer", ..."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return {
        _NULL_TAG: "null",
        STR_TAG: "a string",
        "tag:yaml.org,2002:int": "an integer",
        "tag:yaml.org,2002:float": "a number",
        "tag:yaml.org,2002:bool": "a boolean",
    }.get(node.tag, f"a {node.tag.rsplit(':', 1)[-1]}")


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def fmt_num(x: float) -> str:
    return f"{x:g}"


class NodeReader:
    """Checks nodes of a composed YAML document and records every issue with its place."""

    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self.errors = 0  # issues with severity "error": counted, not recounted per rule
        self.ctor = yaml.constructor.SafeConstructor()

    # ----------------------------------------------------------------- reporting

    def error(self, node: Node | None, path: str, message: str) -> Any:
        """Record an error at ``node`` (line 1 when there is none); returns :data:`INVALID`."""
        self._add(node, path, message, "error")
        return INVALID

    def warn(self, node: Node | None, path: str, message: str) -> None:
        self._add(node, path, message, "warning")

    def error_at(self, line: int, column: int, message: str) -> None:
        """An error with a place but no node: the document could not be composed."""
        self.issues.append(ConfigIssue("", line, column, message))
        self.errors += 1

    def _add(self, node: Node | None, path: str, message: str, severity: Any) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        column = node.start_mark.column + 1 if node is not None else 1
        self.issues.append(ConfigIssue(path, line, column, message, severity))
        self.errors += severity == "error"

    # ----------------------------------------------------------------- structure

    def mapping(self, node: Node, path: str, keys: Collection[str]) -> Pairs | None:
        """Check ``node`` is a mapping of known string keys; ``None`` (after reporting) if not."""
        if is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            self.error(node, path, f"expected a mapping (key: value), got {kind(node)}")
            return None
        out: Pairs = {}
        for key, value, merged in self.flatten(node, path):
            if not (isinstance(key, ScalarNode) and key.tag == STR_TAG):
                self.error(key, path, f"keys must be strings, got {kind(key)}")
                continue
            name = key.value
            if name in out:
                if not merged:  # an explicit key overrides a merged one (YAML merge semantics)
                    first = out[name][0].start_mark.line + 1
                    self.error(key, sub(path, name), f"duplicate key (first set on line {first})")
                continue
            if name not in keys:
                self.error(key, sub(path, name), f"unknown key {name!r}{suggest(name, keys)}")
                continue
            out[name] = (key, value)
        return out

    def flatten(
        self, node: MappingNode, path: str, seen: frozenset[int] = frozenset()
    ) -> list[tuple[Node, Node, bool]]:
        """The (key, value, merged) entries of ``node``, its own first, then those ``<<`` merges."""
        if id(node) in seen:
            self.error(node, path, "a merge (<<) refers to itself")
            return []
        seen = seen | {id(node)}
        own: list[tuple[Node, Node, bool]] = []
        merged: list[tuple[Node, Node, bool]] = []
        for key, value in node.value:
            if key.tag != _MERGE_TAG:
                own.append((key, value, False))
                continue
            sources = value.value if isinstance(value, SequenceNode) else [value]
            for src in sources:
                if not isinstance(src, MappingNode):
                    self.error(src, path, "a merge (<<) takes a mapping or a list of mappings")
                    continue
                merged.extend((k, v, True) for k, v, _ in self.flatten(src, path, seen))
        return own + merged

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            self.error(node, path, f"expected a list, got {kind(node)}")
            return None
        return list(node.value)

    def construct(self, node: Node, path: str) -> Any:
        try:
            return self.ctor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = (exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None) or str(exc)
            return self.error(node, path, f"cannot read value: {problem}")
        except (ValueError, OverflowError) as exc:  # a date like 2026-13-45 (datetime's own check)
            return self.error(node, path, f"cannot read value: {exc}")

    def optional(
        self,
        pairs: Pairs,
        path: str,
        into: dict[str, Any],
        key: str,
        check: Check,
        attr: str | None = None,
    ) -> Any:
        """Check ``pairs[key]`` if present and not null; store it under ``attr`` when valid."""
        if key not in pairs or is_null(pairs[key][1]):
            return None
        value = check(pairs[key][1], sub(path, key))
        if value is not INVALID:
            into[attr or key] = value
        return value

    def typed_options(
        self,
        node: Node,
        path: str,
        schema: Mapping[str, Mapping[str, Check]],
        default_type: str,
        required: Mapping[str, tuple[str, ...]],
    ) -> tuple[str, dict[str, Any]] | None:
        """A ``{type: NAME, ...options}`` mapping whose allowed options depend on ``type``.

        A secret named by an option ``X_env`` (the environment variable holding it) may come
        from ``X_file`` instead (a file holding it, e.g. a mounted Kubernetes Secret), never
        from both: every type's schema takes the ``_file`` twin of each of its ``_env``
        options, so a new backend or notifier gets it by naming its ``_env``."""
        schema = {name: _with_secret_files(self, checks) for name, checks in schema.items()}
        if is_null(node):
            return default_type, {}
        if not isinstance(node, MappingNode):
            self.error(node, path, f"expected a mapping with a `type`, got {kind(node)}")
            return None
        # Read ``type`` first so the unknown-key check knows which options are allowed.
        type_node = next(
            (
                v
                for k, v, _ in self.flatten(node, path)
                if isinstance(k, ScalarNode) and k.value == "type" and k.tag == STR_TAG
            ),
            None,
        )
        type_name = (
            default_type
            if type_node is None
            else self.string(type_node, sub(path, "type"), choices=tuple(schema))
        )
        if type_name is INVALID:
            allowed = ("type", *dict.fromkeys(k for s in schema.values() for k in s))
        else:
            allowed = ("type", *schema[type_name])
        pairs = self.mapping(node, path, allowed)
        if pairs is None or type_name is INVALID:
            return None
        options: dict[str, Any] = {}
        failed = False
        for key, check in schema[type_name].items():
            value = self.optional(pairs, path, options, key, check)
            failed |= value is INVALID
        for key in required.get(type_name, ()):
            if key not in pairs or is_null(pairs[key][1]):
                self.error(node, path, f"type {type_name} requires `{key}`")
                failed = True
        for key in options:
            if key.endswith(SECRET_FILE) and key[: -len(SECRET_FILE)] + SECRET_ENV in options:
                self.error(pairs[key][0], sub(path, key), f"set {key} or "
                           f"{key[: -len(SECRET_FILE)] + SECRET_ENV}, not both (one source per secret)")
                failed = True
        return None if failed else (type_name, options)

    # ----------------------------------------------------------------- scalars

    def string(self, node: Node, path: str, *, choices: Collection[str] | None = None) -> Any:
        if not (isinstance(node, ScalarNode) and node.tag == STR_TAG):
            hint = " (quote it)" if isinstance(node, ScalarNode) and not is_null(node) else ""
            return self.error(node, path, f"expected a string, got {kind(node)}{hint}")
        value: str = node.value
        if not value.strip():
            return self.error(node, path, "must not be empty")
        if choices is not None and value not in choices:
            return self.error(
                node,
                path,
                f"{value!r} is not one of {', '.join(choices)}{suggest(value, choices)}",
            )
        return value

    def url(self, node: Node, path: str) -> Any:
        value = self.string(node, path)
        if value is not INVALID and not re.match(r"^https?://[^\s/]+", value):
            return self.error(node, path, f"expected an http:// or https:// URL, got {value!r}")
        return value

    def boolean(self, node: Node, path: str) -> Any:
        value = self.construct(node, path) if isinstance(node, ScalarNode) else None
        if value is INVALID:
            return INVALID
        if not isinstance(value, bool):
            return self.error(node, path, f"expected true or false, got {kind(node)}")
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
            return self.error(node, path, f"expected {want}, got {kind(node)}")
        if isinstance(value, float) and not math.isfinite(value):
            return self.error(node, path, f"must be finite, got {value}")
        for bound, bad, words in (
            (gt, lambda b: value <= b, "> "),
            (ge, lambda b: value < b, ">= "),
            (lt, lambda b: value >= b, "< "),
            (le, lambda b: value > b, "<= "),
        ):
            if bound is not None and bad(bound):
                return self.error(node, path, f"must be {words}{fmt_num(bound)}, got {value}")
        return int(value) if integer else float(value)

    def duration(self, node: Node, path: str, *, positive: bool = False) -> Any:
        if not isinstance(node, ScalarNode) or is_null(node):
            return self.error(
                node, path, f"expected a duration ({DURATION_FORMS}), got {kind(node)}"
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
        """A list of distinct non-empty strings, as a tuple."""
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

    # Shorthands for the checks most options use, so a schema entry reads as one word.

    def positive_duration(self, node: Node, path: str) -> Any:
        return self.duration(node, path, positive=True)

    def count(self, node: Node, path: str) -> Any:
        """An integer >= 1."""
        return self.number(node, path, integer=True, ge=1)


SECRET_ENV, SECRET_FILE = "_env", "_file"


def _with_secret_files(read: NodeReader, checks: Mapping[str, Check]) -> dict[str, Check]:
    """``checks`` with an ``X_file`` (a path) beside each ``X_env``, right after it."""
    out: dict[str, Check] = {}
    for key, check in checks.items():
        out[key] = check
        if key.endswith(SECRET_ENV):
            out.setdefault(key[: -len(SECRET_ENV)] + SECRET_FILE, read.string)
    return out
