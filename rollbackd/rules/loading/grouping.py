"""The ``grouping:`` section: which labels make one incident, and how often it is re-notified."""

from __future__ import annotations

from typing import Any

from yaml.nodes import Node

from rollbackd.rules.loading.reader import NodeReader
from rollbackd.rules.model import GROUP_LABELS, GroupingSpec


class GroupingReader:
    def __init__(self, read: NodeReader) -> None:
        self.read = read

    def grouping(self, node: Node) -> GroupingSpec:
        read = self.read
        pairs = read.mapping(node, "grouping", ("group_by", "group_wait", "repeat_interval"))
        if not pairs:
            return GroupingSpec()
        kw: dict[str, Any] = {}
        read.optional(
            pairs,
            "grouping",
            kw,
            "group_by",
            lambda n, p: read.strings(n, p, choices=GROUP_LABELS, non_empty=False),
        )
        read.optional(pairs, "grouping", kw, "group_wait", read.duration)
        read.optional(pairs, "grouping", kw, "repeat_interval", read.positive_duration)
        return GroupingSpec(**kw)
