"""Rules file → YAML node graph, within bounds no file can push past.

The loader validates a node graph; this module makes that graph. PyYAML alone can be made to
fail in ways that are not a user's mistake to read about in a traceback: its composer recurses
once per nesting level (a file nested 500 deep raised RecursionError), an integer of 5,000
digits exceeds Python's int conversion limit, and an alias is shared in the graph but walked
again by everything that reads it, so nine anchors of nine aliases each stand for 387 million
nodes (the "billion laughs"). Each bound below turns one of these into a located error.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import Node, ScalarNode

__all__ = [
    "MAX_RULES_FILE_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "MAX_INT_CHARS",
    "RulesFileError",
    "TooLarge",
    "read_rules_file",
    "compose",
]

#: A rules file is a few KB; the largest example is 2.4 KB. Read no more than this.
MAX_RULES_FILE_BYTES = 1 << 20
#: Collections nested in one another (a rule's params are about 5 deep).
MAX_YAML_DEPTH = 64
#: Values in the document, every alias counted as the values it stands for. A rules file for
#: hundreds of deployments has a few thousand; validating 100,000 takes seconds.
MAX_YAML_NODES = 100_000
#: Characters of a plain integer: far above any count or size a rule takes, far below Python's
#: 4,300-digit conversion limit.
MAX_INT_CHARS = 100

_INT = "tag:yaml.org,2002:int"


class RulesFileError(Exception):
    """The file cannot be read as text: ``line``/``column`` are 1-based, 0 when not located."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class TooLarge(yaml.MarkedYAMLError):
    """The document is valid YAML but past one of this module's bounds."""


def read_rules_file(path: str | os.PathLike[str]) -> str:
    """The file's text; :class:`RulesFileError` if it is too large or not UTF-8 (``OSError``
    passes through). Reads at most one byte past the bound, whatever the file's size."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_RULES_FILE_BYTES + 1)
    if len(data) > MAX_RULES_FILE_BYTES:
        raise RulesFileError(
            f"the file is larger than {MAX_RULES_FILE_BYTES // 1024} KiB; a rules file is a few KB"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RulesFileError(
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} ({exc.reason}); is this a rules file?",
            line,
            column,
        ) from None


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[str, int] = {}  # anchor -> nodes it stands for
        self._open: set[str] = set()  # anchors whose node is being composed
        self._expanded = False  # an alias has stood for more than one value

    def compose_node(self, parent: Any, index: Any) -> Node:
        event = self.peek_event()
        anchor = event.anchor
        if self.check_event(AliasEvent):
            if anchor in self._open:
                raise TooLarge(
                    None, None, f"YAML alias *{anchor} is inside the value it names (a recursive value)", event.start_mark
                )
            node = super().compose_node(parent, index)  # undefined aliases raise there
            size = self._sizes.get(anchor, 1)
            self._expanded |= size > 1
            self._add(size, event)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise TooLarge(None, None, f"YAML nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        if anchor is not None:
            self._open.add(anchor)
        before = self._nodes
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._add(1, event)
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = self._nodes - before
        if isinstance(node, ScalarNode) and node.tag == _INT and len(node.value) > MAX_INT_CHARS:
            raise TooLarge(
                None, None, f"integer of {len(node.value):,} characters (at most {MAX_INT_CHARS})", node.start_mark
            )
        return node

    def _add(self, n: int, event: Any) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise TooLarge(
                None,
                None,
                f"YAML aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)"
                if self._expanded
                else f"YAML has more than {MAX_YAML_NODES:,} values; a rules file has a few thousand",
                event.start_mark,
            )


def compose(text: str) -> Node | None:
    """The node graph of ``text`` (None if empty). Raises :class:`TooLarge` past a bound and
    PyYAML's errors on invalid YAML, nothing else."""
    if len(text) > MAX_RULES_FILE_BYTES:  # text not read through read_rules_file
        raise TooLarge(None, None, f"text longer than {MAX_RULES_FILE_BYTES:,} characters; a rules file is a few KB", None)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()
