"""When a rule fires: its ``window``, ``for`` (or ``for_windows``) and ``k_of_n``."""

from __future__ import annotations

import re
from typing import Any

from yaml.nodes import Node, ScalarNode

from rollbackd.rules.durations import format_duration, parse_duration
from rollbackd.rules.loading.reader import INVALID, STR_TAG, NodeReader, Pairs, is_null, kind, sub
from rollbackd.rules.model import WindowSpec

_FOR_WINDOWS = re.compile(r"^\s*(\d+)\s+windows?\s*$")


class TimingReader:
    def __init__(self, read: NodeReader) -> None:
        self.read = read

    def window(self, node: Node, path: str) -> WindowSpec | None:
        read = self.read
        pairs = read.mapping(node, path, ("size", "step", "min_count"))
        if pairs is None:
            return None
        kw: dict[str, Any] = {}
        size = read.optional(pairs, path, kw, "size", read.positive_duration)
        step = read.optional(pairs, path, kw, "step", read.positive_duration)
        read.optional(
            pairs, path, kw, "min_count", lambda n, p: read.number(n, p, integer=True, ge=0)
        )
        if size is INVALID or step is INVALID:
            return None
        size = WindowSpec().size if size is None else size  # the default (a slots class: not WindowSpec.size)
        if step is None:
            step = size
        elif step > size:
            read.error(
                pairs["step"][1],
                sub(path, "step"),
                f"step ({format_duration(step)}) must be <= size ({format_duration(size)}); "
                "a longer step would skip data between windows",
            )
            return None
        kw["size"], kw["step"] = size, step
        return WindowSpec(**kw)

    def for_(self, pairs: Pairs, path: str, kw: dict[str, Any], window: WindowSpec) -> None:
        """``for``: a duration or ``N windows``; or ``for_windows: N``. N windows span N-1 steps."""
        read = self.read
        has_for = "for" in pairs and not is_null(pairs["for"][1])
        has_windows = "for_windows" in pairs and not is_null(pairs["for_windows"][1])
        if has_for and has_windows:
            read.error(
                pairs["for_windows"][0],
                sub(path, "for_windows"),
                "set either `for` or `for_windows`, not both",
            )
            return
        if has_windows:
            count = read.number(
                pairs["for_windows"][1], sub(path, "for_windows"), integer=True, ge=1
            )
            if count is not INVALID:
                kw["for_"] = (count - 1) * window.step
            return
        if not has_for:
            return
        node = pairs["for"][1]
        if isinstance(node, ScalarNode) and node.tag == STR_TAG:
            match = _FOR_WINDOWS.match(node.value)
            if match:
                count = int(match.group(1))
                if count < 1:
                    read.error(node, sub(path, "for"), "the number of windows must be >= 1")
                else:
                    kw["for_"] = (count - 1) * window.step
                return
        if not isinstance(node, ScalarNode):
            read.error(
                node, sub(path, "for"), f"expected a duration or `N windows`, got {kind(node)}"
            )
            return
        value = read.construct(node, sub(path, "for"))
        if value is INVALID:
            return
        try:
            kw["for_"] = parse_duration(value)
        except ValueError as exc:
            read.error(node, sub(path, "for"), f"{exc}; or `N windows`")

    def k_of_n(self, node: Node, path: str) -> tuple[int, int] | None:
        read = self.read
        items = read.sequence(node, path)
        if items is None:
            return None
        if len(items) != 2:
            read.error(node, path, f"expected [k, n] (two integers), got {len(items)} items")
            return None
        k = read.number(items[0], f"{path}[0]", integer=True, ge=1)
        n = read.number(items[1], f"{path}[1]", integer=True, ge=1)
        if k is INVALID or n is INVALID:
            return None
        if k > n:
            read.error(node, path, f"k must be <= n, got k={k}, n={n}")
            return None
        return k, n
