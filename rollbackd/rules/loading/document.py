"""The whole rules file: the YAML document, its top-level keys, and the checks across sections."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml
from yaml.nodes import Node

from rollbackd.rules.budget import apply_budgets
from rollbackd.rules.loading.deployments import DeploymentsReader
from rollbackd.rules.loading.grouping import GroupingReader
from rollbackd.rules.loading.inhibit import InhibitReader
from rollbackd.rules.loading.reader import INVALID, NodeReader
from rollbackd.rules.loading.rules import RulesReader
from rollbackd.rules.loading.settings import SettingsReader
from rollbackd.rules.model import Config, DeploymentSpec, GroupingSpec, RuleSpec, Settings
from rollbackd.rules.parse import TooLarge, compose

SUPPORTED_VERSIONS = (1,)

_TOP_KEYS = ("version", "settings", "grouping", "deployments", "rules", "inhibit_rules")


class DocumentReader:
    """Reads one rules file; ``read.issues`` then holds every problem found, in reading order."""

    def __init__(self, base_dir: Path | None) -> None:
        self.read = NodeReader()
        self.settings = SettingsReader(self.read)
        self.grouping = GroupingReader(self.read)
        self.deployments = DeploymentsReader(self.read, base_dir)
        self.rules = RulesReader(self.read)
        self.inhibit = InhibitReader(self.read)

    def load(self, text: str, source: str) -> Config | None:
        """The config, or ``None`` when there was an error (every one is in ``read.issues``)."""
        read = self.read
        root = self.compose(text)
        if root is None:
            return None
        top = read.mapping(root, "", _TOP_KEYS)
        if top is None:
            return None

        if "version" in top:
            node = top["version"][1]
            version = read.number(node, "version", integer=True)
            if version is not INVALID and version not in SUPPORTED_VERSIONS:
                read.error(
                    node,
                    "version",
                    f"unsupported version {version}; this rollbackd reads version 1",
                )

        settings = self.settings.settings(top["settings"][1]) if "settings" in top else Settings()
        grouping = self.grouping.grouping(top["grouping"][1]) if "grouping" in top else GroupingSpec()
        deployments = self.deployments.deployments(top["deployments"][1]) if "deployments" in top else {}

        if "rules" in top:
            rules_key, rules_node = top["rules"]
            rules = self.rules.rules(rules_node, deployments)
        else:
            rules_key, rules = root, ()
        if not rules and rules is not INVALID:
            read.warn(
                rules_key, "rules", "no rules: rollbackd will watch the stream but never alert"
            )
        inhibit: Any = ()
        if "inhibit_rules" in top:
            inhibit = self.inhibit.inhibit_rules(
                top["inhibit_rules"][1], rules if isinstance(rules, tuple) else ()
            )
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

    def compose(self, text: str) -> Node | None:
        """The document's root node; ``None`` after reporting when it is empty or not YAML."""
        read = self.read
        try:
            root = compose(text)
        except TooLarge as exc:
            mark = exc.problem_mark
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            read.error_at(line, col, str(exc.problem))
            return None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, ...)
            line = text.count("\n", 0, exc.position) + 1
            col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            what = f"character #x{exc.character:04x}" if isinstance(exc.character, int) else "character"
            read.error_at(line, col, f"YAML syntax error: unacceptable {what}: {exc.reason}")
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
            read.error_at(line, col, f"YAML syntax error: {message}")
            return None
        except yaml.YAMLError as exc:
            read.error_at(1, 1, f"YAML syntax error: {' '.join(str(exc).split())}")
            return None
        if root is None:
            read.error_at(1, 1, "the file is empty; expected a mapping with a `rules:` list")
        return root

    def budgets(
        self, deployments: Mapping[str, DeploymentSpec], rules: tuple[RuleSpec, ...]
    ) -> tuple[RuleSpec, ...]:
        """Set each budgeted rule's ``alpha``; warn where a budget cannot hold."""
        out, notes = apply_budgets(deployments, rules)
        rule_nodes = self.rules.rule_nodes
        for note in notes:
            if note.rule is not None and note.rule in rule_nodes:
                index = next(i for i, r in enumerate(rules) if r.name == note.rule)
                node, path = rule_nodes[note.rule], f"rules[{index}]"
            else:
                node, path = self.deployments.budget_nodes.get(note.deployment, (None, "deployments"))
            self.read.warn(node, path, note.message)
        return out
