"""Event-time windows per deployment × variant, built from shared panes.

Events are stored once, in panes of ``granularity`` seconds (the greatest common divisor of
every configured window size and step). A window of size S ending at boundary T is the
union of the panes in ``[T - S, T)``, so tumbling and sliding windows of several rules share
storage. Panes older than the longest window are dropped: memory is bounded by the longest
window times the event rate. Boundaries are aligned to the Unix epoch, so the same events
always land in the same windows, live or in a replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec

from rollbackd.detectors.base import Labeled, Window
from rollbackd.events import Deploy, Prediction
from rollbackd.rules.model import WindowSpec

__all__ = ["Pane", "WindowAssembler", "pane_columns", "pane_from_columns"]

Key = tuple[str, str]  # (deployment, variant)

# How far back a count-based window may reach for more events, in window sizes.
MAX_COUNT_EXTENSION = 10


@dataclass(slots=True)
class Pane:
    predictions: list[Prediction] = field(default_factory=list)
    outcomes: list[Labeled] = field(default_factory=list)
    deploys: list[Deploy] = field(default_factory=list)

    def _lists(self) -> tuple[tuple[list[Any], type], ...]:
        return (self.predictions, Prediction), (self.outcomes, Labeled), (self.deploys, Deploy)


_PANE = msgspec.msgpack.Encoder()


def pane_columns(pane: Pane) -> bytes | None:
    """A pane for a checkpoint: one msgpack blob of columns, one list per field (C loops
    instead of a Python call per event). None when a value does not fit msgpack (an integer
    beyond 64 bits) or an entry is not of its list's type: the caller writes it field by field."""
    try:
        return _PANE.encode([_columns(items, cls) for items, cls in pane._lists()])
    except (OverflowError, TypeError, AttributeError):
        return None


def _columns(items: list[Any], cls: type) -> list[list[Any]] | None:
    if not items:
        return None
    if any(type(x) is not cls for x in items):
        raise TypeError(f"not all {cls.__name__}")
    return [list(map(attrgetter(f), items)) for f in cls.__struct_fields__]  # type: ignore[attr-defined]


def pane_from_columns(blob: bytes) -> Pane:
    """The pane :func:`pane_columns` wrote. The constructors do not validate: each event comes
    back exactly as it was. A blob of another shape raises ``ValueError``."""
    columns = msgspec.msgpack.decode(blob)
    kinds = (Prediction, Labeled, Deploy)
    if type(columns) is not list or len(columns) != len(kinds):
        raise ValueError("a pane is three column lists")
    lists = []
    for cols, cls in zip(columns, kinds):
        if cols is None:
            lists.append([])
            continue
        fields = cls.__struct_fields__
        # Trailing fields with a default may be missing (a pane written before they existed).
        required = len(fields) - len(cls.__struct_defaults__)  # type: ignore[attr-defined]
        if type(cols) is not list or not required <= len(cols) <= len(fields) \
                or any(type(c) is not list for c in cols) or len({len(c) for c in cols}) != 1:
            raise ValueError(f"{cls.__name__} columns of the wrong shape")
        lists.append([cls(*row) for row in zip(*cols)])
    return Pane(*lists)


def _gcd_seconds(values: list[float]) -> float:
    ms = [max(1, round(v * 1000)) for v in values]
    g = ms[0]
    for v in ms[1:]:
        g = math.gcd(g, v)
    return g / 1000.0


class WindowAssembler:
    """Holds panes and cuts windows at boundaries. Pure: the caller passes every time in."""

    def __init__(self, specs: list[WindowSpec]) -> None:
        specs = list(dict.fromkeys(specs)) or [WindowSpec()]
        for s in specs:
            if s.size <= 0 or s.step <= 0:
                raise ValueError(f"window size and step must be > 0 seconds, got {s}")
        self.specs = tuple(specs)
        self.granularity = _gcd_seconds([v for s in specs for v in (s.size, s.step)])
        reach = max(s.size * (MAX_COUNT_EXTENSION if s.min_count else 1) for s in specs)
        self.retain_panes = int(round(reach / self.granularity))
        self.panes: dict[Key, dict[int, Pane]] = {}
        # First pane of each key: a key has windows only from there on, so a variant announced
        # by a deploy event before it serves is not "empty" in the windows before it existed.
        self.first_index: dict[Key, int] = {}

    def pane_index(self, ts: float) -> int:
        return int(ts // self.granularity)

    def pane(self, key: Key, index: int) -> Pane:
        by_idx = self.panes.get(key)
        if by_idx is None:
            by_idx = self.panes[key] = {}
        pane = by_idx.get(index)
        if pane is None:
            pane = by_idx[index] = Pane()
            if index < self.first_index.get(key, index + 1):
                self.first_index[key] = index
        return pane

    def keys(self) -> list[Key]:
        return sorted(self.panes)

    def due_specs(self, boundary: float) -> list[WindowSpec]:
        """Window specs that close at this boundary (boundaries are multiples of their step)."""
        b = round(boundary * 1000)
        return [s for s in self.specs if b % max(1, round(s.step * 1000)) == 0]

    def window(self, key: Key, spec: WindowSpec, end: float) -> Window:
        g = self.granularity
        end_idx = int(round(end / g))
        return self._cut(key, self.panes.get(key, {}), spec, end_idx - int(round(spec.size / g)), end_idx, end)

    def _cut(
        self, key: Key, by_idx: dict[int, Pane], spec: WindowSpec, start_idx: int, end_idx: int, end: float
    ) -> Window:
        """The window of ``key`` over panes ``[start_idx, end_idx)`` (reaching further back for a
        count-based window), ending at ``end``."""
        g = self.granularity
        if end_idx - start_idx == 1 and not spec.min_count:  # a tumbling window of one pane
            pane = by_idx.get(start_idx)
            if pane is None:
                return Window(key[0], key[1], start_idx * g, end, [], [])
            return Window(key[0], key[1], start_idx * g, end, pane.predictions, pane.outcomes)
        n_panes = end_idx - start_idx
        indices = [i for i in range(start_idx, end_idx) if i in by_idx]
        if spec.min_count:
            floor_idx = end_idx - n_panes * MAX_COUNT_EXTENSION
            count = sum(len(by_idx[i].predictions) for i in indices)
            i = start_idx - 1
            while count < spec.min_count and i >= floor_idx:
                if i in by_idx:
                    indices.insert(0, i)
                    count += len(by_idx[i].predictions)
                    start_idx = i
                i -= 1
        panes = [by_idx[i] for i in indices]
        if len(panes) == 1:
            preds: list[Prediction] = panes[0].predictions
            outs: list[Labeled] = panes[0].outcomes
        else:
            preds = [p for pane in panes for p in pane.predictions]
            outs = [o for pane in panes for o in pane.outcomes]
        return Window(key[0], key[1], start_idx * g, end, preds, outs)

    def windows_at(self, boundary: float) -> list[tuple[WindowSpec, Window]]:
        """Every window closing at ``boundary``: by spec, then by key (sorted)."""
        g = self.granularity
        end_idx = int(round(boundary / g))
        due: list[tuple[WindowSpec, Window]] = []
        for spec in self.due_specs(boundary):
            start_idx = end_idx - int(round(spec.size / g))
            windows = [
                self._cut(key, by_idx, spec, start_idx, end_idx, boundary)
                for key, by_idx in sorted(self.panes.items())
                if self.first_index.get(key, -(2**62)) < end_idx
            ]
            # Each window sees the other variants of its deployment over the same span, so a
            # detector can compare a canary with the stable arm in the same time window.
            by_deployment: dict[str, dict[str, Window]] = {}
            for w in windows:
                siblings = by_deployment.get(w.deployment)
                if siblings is None:
                    siblings = by_deployment[w.deployment] = {}
                siblings[w.variant] = w
                w.siblings = siblings
            due.extend((spec, w) for w in windows)
        return due

    def drop_before(self, boundary: float) -> None:
        """Forget panes no window ending after ``boundary`` can still include."""
        keep_from = int(round(boundary / self.granularity)) - self.retain_panes + 1
        for by_idx in self.panes.values():
            for idx in [i for i in by_idx if i < keep_from]:
                del by_idx[idx]

    def earliest_pane_end(self) -> float | None:
        """End of the earliest pane holding data (to skip empty stretches of time)."""
        ends = [min(by_idx) for by_idx in self.panes.values() if by_idx]
        return (min(ends) + 1) * self.granularity if ends else None
