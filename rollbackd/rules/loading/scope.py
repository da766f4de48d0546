"""A rule's ``deployments`` and ``variants``: names, fnmatch globs and label matchers.

``deployments`` is a list of names and globs (``[fraud-*, churn]``), or a mapping that adds
labels, each condition narrowing the choice as in a Kubernetes label selector::

    deployments:
      names: [fraud-*]                    # optional: names and globs, any of them
      labels: {task: binary, team: risk}  # every label equal to its value (or one of a list)
      matchers: ['team!="growth"', 'task=~"binary|multiclass"']   # Alertmanager matchers

``labels`` has the shape of an inhibit rule's matchers; ``matchers`` are Alertmanager's, for
what it cannot say (``!=``, ``=~``, ``!~``).
"""

from __future__ import annotations

import re
from fnmatch import translate
from types import MappingProxyType
from typing import Any, Mapping

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rollbackd.rules.loading.reader import INVALID, STR_TAG, NodeReader, kind, sub, suggest
from rollbackd.rules.model import (
    LABEL_NAME,
    MATCHER_OPS,
    DeploymentSpec,
    LabelMatcher,
    LabelSelector,
    is_glob,
    name_matches,
)

_SELECTOR_KEYS = ("names", "labels", "matchers")
# label, operator, then a double-quoted value with backslash escapes (Alertmanager's form).
_MATCHER = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*$')


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable glob, or ``None``. fnmatch itself never refuses one:
    an unclosed ``[`` silently becomes a literal, an empty range matches nothing."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                return f"`[` at position {i + 1} is never closed (write `[[]` for a literal `[`)"
            i = j
        i += 1
    if "(?!)" in translate(pattern):
        return "a character range in it is empty (e.g. `[z-a]`), so it matches nothing"
    return None


def parse_matcher(text: str) -> LabelMatcher | str:
    """``team="risk"`` as a :class:`LabelMatcher`, or why it is not one."""
    m = _MATCHER.match(text)
    if m is None:
        return (f"{text!r} is not a matcher: write label, one of {' '.join(MATCHER_OPS)}, then a "
                'double-quoted value, e.g. team="risk" or task=~"binary|multiclass"')
    label, op, quoted = m.groups()
    value = re.sub(r"\\(.)", r"\1", quoted)
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except re.error as exc:
            return f"invalid regular expression {value!r} in {text!r}: {exc}"
    return LabelMatcher(label, op, value)


def label_name(read: NodeReader, key: Node, path: str, prefix: str = "") -> str | None:
    """The label name ``key`` holds, or ``None`` after reporting why it is not one: a label
    name as Prometheus spells one, in a deployment's ``labels`` and in a rule's alike."""
    if isinstance(key, ScalarNode) and key.tag == STR_TAG and LABEL_NAME.match(key.value):
        return str(key.value)
    what = repr(key.value) if isinstance(key, ScalarNode) else kind(key)
    read.error(key, path, f"{prefix}a label name is a letter or _ then letters, digits or _, got {what}")
    return None


class ScopeReader:
    def __init__(self, read: NodeReader) -> None:
        self.read = read

    def globs(self, node: Node, path: str, rule: Any) -> Any:
        """A list of names and fnmatch globs (a rule's ``variants``, or its deployment names)."""
        read = self.read
        names = read.strings(node, path, non_empty=True)
        if names is INVALID:
            return INVALID
        failed = False
        for i, (item, name) in enumerate(zip(node.value, names, strict=True)):
            problem = glob_problem(name) if is_glob(name) else None
            if problem is not None:
                read.error(item, f"{path}[{i}]", f"{_of(rule)}invalid glob {name!r}: {problem}")
                failed = True
        return INVALID if failed else names

    def deployments(
        self,
        node: Node,
        path: str,
        rule: Any,
        declared: Mapping[str, DeploymentSpec],
        kw: dict[str, Any],
    ) -> None:
        """The rule's ``deployments`` into ``kw``: a plain name must be declared; a glob or
        label choice that takes in no declared deployment is warned about."""
        read = self.read
        if isinstance(node, MappingNode):
            pairs = read.mapping(node, path, _SELECTOR_KEYS)
            if pairs is None:
                return
            if not pairs:
                read.error(node, path, f"{_of(rule)}name the deployments: "
                                       f"{', '.join(_SELECTOR_KEYS)} (or leave the key out for all)")
                return
            names_node = pairs["names"][1] if "names" in pairs else None
            names_path = sub(path, "names")
        elif isinstance(node, SequenceNode):
            names_node, names_path, pairs = node, path, {}
        else:
            read.error(node, path, f"{_of(rule)}expected a list of names and globs, or a mapping "
                                   f"with {', '.join(_SELECTOR_KEYS)}; got {kind(node)}")
            return
        names: Any = None
        if names_node is not None:
            names = self.globs(names_node, names_path, rule)
            if names is not INVALID and not self.declared(names_node, names_path, names, declared):
                names = INVALID
        selector: Any = None
        if "labels" in pairs or "matchers" in pairs:
            selector = self.selector(node, path, pairs, rule, declared)
        if names is INVALID or selector is INVALID:
            return
        if selector is not None:
            selector = LabelSelector(
                labels=selector.labels,
                matchers=selector.matchers,
                selected=frozenset(
                    d for d, spec in declared.items()
                    if selector.matches(spec.labels) and (names is None or name_matches(names, d))
                ),
            )
            kw["deployment_labels"] = selector
        if names is not None:
            kw["deployments"] = names
        self.none_declared(node, path, rule, names, selector, declared)

    def declared(
        self, node: Node, path: str, names: tuple[str, ...], declared: Mapping[str, DeploymentSpec]
    ) -> bool:
        """Whether every plain name (not a glob) is a declared deployment; each one that is
        not is reported."""
        ok = True
        for i, (item, name) in enumerate(zip(node.value, names, strict=True)):
            if not is_glob(name) and name not in declared:
                known = ", ".join(sorted(declared)) or "none are configured"
                self.read.error(
                    item,
                    f"{path}[{i}]",
                    f"unknown deployment {name!r}{suggest(name, declared)} (configured: {known})",
                )
                ok = False
        return ok

    def selector(
        self,
        node: Node,
        path: str,
        pairs: dict[str, tuple[Node, Node]],
        rule: Any,
        declared: Mapping[str, DeploymentSpec],
    ) -> Any:
        """The ``labels`` and ``matchers`` of a rule's ``deployments`` (``selected`` not yet
        resolved), or :data:`INVALID`."""
        read = self.read
        failed = False
        labels: dict[str, tuple[str, ...]] = {}
        if "labels" in pairs:
            got = self.labels(pairs["labels"][1], sub(path, "labels"), rule)
            failed |= got is INVALID
            labels = {} if got is INVALID else got
        matchers: list[LabelMatcher] = []
        if "matchers" in pairs:
            mpath = sub(path, "matchers")
            texts = read.strings(pairs["matchers"][1], mpath, non_empty=True)
            if texts is INVALID:
                failed = True
            else:
                for i, (item, text) in enumerate(zip(pairs["matchers"][1].value, texts, strict=True)):
                    parsed = parse_matcher(text)
                    if isinstance(parsed, str):
                        read.error(item, f"{mpath}[{i}]", f"{_of(rule)}{parsed}")
                        failed = True
                    else:
                        matchers.append(parsed)
        if not any(spec.labels for spec in declared.values()):
            read.error(
                node, path,
                f"{_of(rule)}chooses deployments by label, but no deployment in `deployments:` "
                "has labels (a deployment seen only in the stream has none); give them some, e.g. "
                "`deployments: {fraud-eu: {labels: {task: binary, team: risk}}}`",
            )
            failed = True
        if failed:
            return INVALID
        return LabelSelector(labels=MappingProxyType(labels), matchers=tuple(matchers))

    def labels(self, node: Node, path: str, rule: Any) -> Any:
        """``{task: binary, team: [risk, fraud]}``: label -> one value or a list of them."""
        read = self.read
        if not isinstance(node, MappingNode) or not node.value:
            return read.error(node, path, f"{_of(rule)}expected a mapping of label to value(s), "
                                          f"got {'an empty mapping' if isinstance(node, MappingNode) else kind(node)}")
        out: dict[str, tuple[str, ...]] = {}
        failed = False
        for key, value, merged in read.flatten(node, path):
            label = label_name(read, key, path, _of(rule))
            if label is None:
                failed = True
                continue
            if label in out:
                if not merged:
                    read.error(key, sub(path, label), "duplicate label")
                    failed = True
                continue
            key_path = sub(path, label)
            if isinstance(value, SequenceNode):
                got = read.strings(value, key_path, non_empty=True)
            else:
                one = read.string(value, key_path)
                got = INVALID if one is INVALID else (one,)
            if got is INVALID:
                failed = True
            else:
                out[label] = got
        return INVALID if failed else out

    def none_declared(
        self,
        node: Node,
        path: str,
        rule: Any,
        names: tuple[str, ...] | None,
        selector: LabelSelector | None,
        declared: Mapping[str, DeploymentSpec],
    ) -> None:
        """Warn when the rule's choice takes in no declared deployment: likely a typo."""
        if selector is not None:
            if selector.selected:
                return
            known = sorted({k for spec in declared.values() for k in spec.labels})
            asked = list(selector.labels) + [m.label for m in selector.matchers]
            unknown = [k for k in dict.fromkeys(asked) if k not in known]
            hint = "".join(
                f"; no deployment has label {k!r}{suggest(k, known)}" for k in unknown
            )
            self.read.warn(node, path, f"{_of(rule)}matches none of the {len(declared)} declared "
                                       f"deployment(s), so it never applies{hint}")
        elif declared and names is not None and not any(name_matches(names, d) for d in declared):
            globs = ", ".join(n for n in names if is_glob(n))
            self.read.warn(node, path, f"{_of(rule)}{globs} matches none of the {len(declared)} "
                                       "declared deployment(s): the rule applies only to deployments "
                                       "seen in the stream whose name matches")


def _of(rule: Any) -> str:
    """The rule's name at the head of a message (its path gives only its index)."""
    return f"rule {rule!r}: " if isinstance(rule, str) else ""
