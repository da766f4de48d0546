"""The ``inhibit_rules:`` section: which incidents mute which, matched by label."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from yaml.nodes import Node, SequenceNode

from rollbackd.rules.loading.detector_check import known_detectors
from rollbackd.rules.loading.reader import INVALID, NodeReader, sub
from rollbackd.rules.model import MATCH_LABELS, SEVERITIES, InhibitRule, RuleSpec


class InhibitReader:
    def __init__(self, read: NodeReader) -> None:
        self.read = read

    def inhibit_rules(self, node: Node, rules: tuple[RuleSpec, ...]) -> Any:
        read = self.read
        items = read.sequence(node, "inhibit_rules")
        if items is None:
            return INVALID
        out: list[InhibitRule] = []
        names: dict[str, int] = {}
        failed = False
        for i, item in enumerate(items):
            path = f"inhibit_rules[{i}]"
            pairs = read.mapping(item, path, ("name", "source", "target", "equal"))
            if pairs is None:
                failed = True
                continue
            kw: dict[str, Any] = {}
            for key in ("name", "target"):
                if key not in pairs:
                    read.error(item, path, f"missing `{key}`")
                    failed = True
            if "name" in pairs:
                name = read.string(pairs["name"][1], sub(path, "name"))
                if name is not INVALID:
                    if name in names:
                        read.error(pairs["name"][1], sub(path, "name"),
                                   f"duplicate inhibit rule name {name!r} (first on line {names[name]})")
                        failed = True
                    names[name] = pairs["name"][1].start_mark.line + 1
                    kw["name"] = name
                else:
                    failed = True
            if "target" in pairs:
                target = self.matchers(pairs["target"][1], sub(path, "target"), rules, allow_rollback=False)
                failed |= target is INVALID
                kw["target"] = target
            if "source" in pairs:
                source = self.matchers(pairs["source"][1], sub(path, "source"), rules, allow_rollback=True)
                if source is INVALID:
                    failed = True
                else:
                    kw["source_rollback"] = bool(source.pop("rollback_in_progress", False))
                    kw["source"] = MappingProxyType(source)
                    if not source and not kw["source_rollback"]:
                        read.error(pairs["source"][1], sub(path, "source"),
                                   "needs at least one matcher or `rollback_in_progress: true`")
                        failed = True
            else:
                read.error(item, path, "missing `source`")
                failed = True
            if "equal" in pairs:
                equal = read.strings(pairs["equal"][1], sub(path, "equal"),
                                     choices=("deployment", "variant"), non_empty=True)
                if equal is INVALID:
                    failed = True
                elif "deployment" not in equal:
                    read.error(pairs["equal"][1], sub(path, "equal"),
                               "must include `deployment`: one deployment never inhibits another")
                    failed = True
                else:
                    kw["equal"] = equal
            if not failed and "name" in kw and isinstance(kw.get("target"), Mapping):
                kw["target"] = MappingProxyType(kw["target"])
                out.append(InhibitRule(**kw))
        return INVALID if failed else tuple(out)

    def matchers(self, node: Node, path: str, rules: tuple[RuleSpec, ...], *, allow_rollback: bool) -> Any:
        """Label matchers (one value or a list each); the source may also match a rollback."""
        read = self.read
        keys = MATCH_LABELS + (("rollback_in_progress",) if allow_rollback else ())
        pairs = read.mapping(node, path, keys)
        if pairs is None:
            return INVALID
        out: dict[str, Any] = {}
        failed = False
        for key, (_, value) in pairs.items():
            key_path = sub(path, key)
            if key == "rollback_in_progress":
                flag = read.boolean(value, key_path)
                if flag is INVALID:
                    failed = True
                elif flag is not True:
                    read.error(value, key_path, "only `true` makes sense here (leave the key out instead)")
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
                got = read.strings(value, key_path, choices=choices, non_empty=True)
            else:
                one = read.string(value, key_path, choices=choices)
                got = INVALID if one is INVALID else (one,)
            if got is INVALID:
                failed = True
            else:
                out[key] = got
        if not out and not failed and not allow_rollback:
            read.error(node, path, f"needs at least one matcher ({', '.join(MATCH_LABELS)})")
            failed = True
        return INVALID if failed else out
