"""The ``deployments:`` section: per deployment its backend and safety rails."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from rollbackd.rules.loading.backends import BackendReader
from rollbackd.rules.loading.reader import INVALID, STR_TAG, NodeReader, is_null, kind, sub
from rollbackd.rules.loading.scope import label_name
from rollbackd.rules.model import (
    APPROVAL_DEFAULTS,
    DEPLOYMENT_POLICIES,
    SLACK_USER_ID,
    ApprovalSpec,
    DeploymentSpec,
    FalseAlarmBudget,
)

_KEYS = (
    "backend",
    "slack_channel",
    "slack_responders",
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
    "labels",
)


class DeploymentsReader:
    def __init__(self, read: NodeReader, base_dir: Path | None) -> None:
        self.read = read
        self.backends = BackendReader(read)
        self.base_dir = base_dir
        # Where a deployment's budget warnings point: its budget node and path.
        self.budget_nodes: dict[str, tuple[Node, str]] = {}

    def deployments(self, node: Node) -> dict[str, DeploymentSpec]:
        read = self.read
        if is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            read.error(
                node,
                "deployments",
                f"expected a mapping of deployment name to settings, got {kind(node)}",
            )
            return {}
        out: dict[str, DeploymentSpec] = {}
        first: dict[str, Node] = {}
        for key, value, merged in read.flatten(node, "deployments"):
            if not (isinstance(key, ScalarNode) and key.tag == STR_TAG and key.value.strip()):
                read.error(
                    key,
                    "deployments",
                    f"a deployment name must be a non-empty string, got {kind(key)}",
                )
                continue
            name = key.value
            path = sub("deployments", name)
            if name in first:
                if not merged:
                    read.error(
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
        read = self.read
        pairs = read.mapping(node, path, _KEYS)
        if pairs is None:
            return None
        kw: dict[str, Any] = {"name": name}
        if "backend" in pairs:
            backend = self.backends.backend(pairs["backend"][1], sub(path, "backend"))
            if backend is not None:
                kw["backend"] = backend
        read.optional(pairs, path, kw, "slack_channel", read.string)
        read.optional(pairs, path, kw, "slack_responders", self.slack_users)
        read.optional(pairs, path, kw, "runbook", read.string)
        ref = read.optional(pairs, path, kw, "reference", read.string)
        if isinstance(ref, str):
            kw["reference"] = self.resolve(ref)
            if not os.path.exists(kw["reference"]):
                read.warn(
                    pairs["reference"][1],
                    sub(path, "reference"),
                    f"reference file {kw['reference']} does not exist (here, at least)",
                )
        read.optional(pairs, path, kw, "reference_size", read.count)
        read.optional(pairs, path, kw, "cooldown", read.duration)
        read.optional(pairs, path, kw, "known_good_after", read.duration)
        read.optional(pairs, path, kw, "known_good_min_predictions",
                      lambda n, p: read.number(n, p, integer=True, ge=0))
        read.optional(pairs, path, kw, "dry_run", read.boolean)
        read.optional(pairs, path, kw, "policy", lambda n, p: read.string(n, p, choices=DEPLOYMENT_POLICIES))
        read.optional(pairs, path, kw, "verify_within", read.positive_duration)
        if "loop_guard" in pairs:
            self.loop_guard(pairs["loop_guard"][1], sub(path, "loop_guard"), kw)
        if "approval" in pairs and not is_null(pairs["approval"][1]):
            approval = self.approval(pairs["approval"][1], sub(path, "approval"))
            if approval is not None:
                kw["approval"] = approval
        if "labels" in pairs and not is_null(pairs["labels"][1]):
            labels = self.labels(pairs["labels"][1], sub(path, "labels"))
            if labels is not None:
                kw["labels"] = MappingProxyType(labels)
        if "false_alarm_budget" in pairs and not is_null(pairs["false_alarm_budget"][1]):
            budget_path = sub(path, "false_alarm_budget")
            budget = self.false_alarm_budget(pairs["false_alarm_budget"][1], budget_path)
            if budget is not None:
                kw["false_alarm_budget"] = budget
                self.budget_nodes[name] = (pairs["false_alarm_budget"][1], budget_path)
        return DeploymentSpec(**kw)

    def labels(self, node: Node, path: str) -> dict[str, str] | None:
        """``{task: binary, team: risk}``: what rules choose the deployment by."""
        read = self.read
        if not isinstance(node, MappingNode):
            read.error(node, path, f"expected a mapping of label to value, got {kind(node)}")
            return None
        out: dict[str, str] = {}
        for key, value, merged in read.flatten(node, path):
            label = label_name(read, key, path)
            if label is None:
                continue
            if label in out:
                if not merged:
                    read.error(key, sub(path, label), "duplicate label")
                continue
            got = read.string(value, sub(path, label))
            if got is not INVALID:
                out[label] = got
        return out

    def slack_users(self, node: Node, path: str) -> Any:
        """``[U0123ABCD, W0456EFGH]``: Slack user ids, never names."""
        users = self.read.strings(node, path, non_empty=True)
        if users is INVALID:
            return INVALID
        bad = [u for u in users if not SLACK_USER_ID.fullmatch(u)]
        if bad:
            return self.read.error(node, path, f"{', '.join(map(repr, bad))}: not a Slack user id (U… or W…, "
                                   "as in the user's profile → Copy member ID); Slack buttons match people "
                                   "by id, never by name")
        return users

    def approval(self, node: Node, path: str) -> ApprovalSpec | None:
        """``{approvers: [alice, bob], timeout: 15m, default: reject}``."""
        read = self.read
        pairs = read.mapping(node, path, ("approvers", "timeout", "default"))
        if pairs is None:
            return None
        kw: dict[str, Any] = {}
        checks = [
            read.optional(pairs, path, kw, "approvers",
                          lambda n, p: read.strings(n, p, non_empty=True)),
            read.optional(pairs, path, kw, "timeout", read.positive_duration),
            read.optional(pairs, path, kw, "default",
                          lambda n, p: read.string(n, p, choices=APPROVAL_DEFAULTS)),
        ]
        if INVALID in checks:
            return None
        if "approvers" not in kw:
            read.error(node, path, "missing `approvers`: the people whose answer counts")
            return None
        return ApprovalSpec(**kw)

    def loop_guard(self, node: Node, path: str, into: dict[str, Any]) -> None:
        """``{max_rollbacks: N, per: 1d}``, or ``false`` to lift the limit."""
        read = self.read
        if isinstance(node, ScalarNode) and not is_null(node):
            if read.boolean(node, path) is False:
                into["max_rollbacks"] = None
            return
        pairs = read.mapping(node, path, ("max_rollbacks", "per"))
        if pairs is None:
            return
        read.optional(pairs, path, into, "max_rollbacks", read.count)
        read.optional(pairs, path, into, "per", read.positive_duration, attr="loop_period")

    def false_alarm_budget(self, node: Node, path: str) -> FalseAlarmBudget | None:
        """``{rollbacks: N, per: 30d}`` and/or ``alerts: N``: expected false ones per period."""
        read = self.read
        pairs = read.mapping(node, path, ("rollbacks", "alerts", "per"))
        if pairs is None:
            return None
        kw: dict[str, Any] = {}
        checks = [
            read.optional(pairs, path, kw, "per", read.positive_duration),
            read.optional(pairs, path, kw, "rollbacks", lambda n, p: read.number(n, p, gt=0)),
            read.optional(pairs, path, kw, "alerts", lambda n, p: read.number(n, p, gt=0)),
        ]
        if INVALID in checks:
            return None
        if "per" not in kw:
            read.error(node, path, "missing `per`: the period the budget is for (e.g. 30d)")
            return None
        if "rollbacks" not in kw and "alerts" not in kw:
            read.error(node, path, "state `rollbacks: N` and/or `alerts: N` per period")
            return None
        return FalseAlarmBudget(**kw)

    def resolve(self, ref: str) -> str:
        """A ``reference`` path: ``~`` expanded, relative ones against the rules file's folder."""
        ref = os.path.expanduser(ref)
        if os.path.isabs(ref) or self.base_dir is None:
            return ref
        return os.path.abspath(self.base_dir / ref)
