"""Per-window summaries kept for one period: what ``baseline: same_time`` compares a window with.

A detector with a seasonal baseline compares the window ending at ``end`` with the window that
ended one ``period`` earlier (``1d``: yesterday at the same time of day; ``7d``: the same hour
last week), so a daily or weekly cycle is not mistaken for drift or a fault. It keeps a small
summary of each window, keyed by the window's end, for one period.

Window boundaries are aligned to the Unix epoch (daemon/windows.py), so when the window
``step`` divides the period, the end one period back is exactly the end of an earlier window,
and :meth:`SeasonalStore.get` finds it. When it does not (a ``7m`` step against ``1d``), no
earlier end is exactly one period back; the lookup takes the nearest end within half a step,
so the window compared is at most half a step off the same time of day (the rules loader warns
about such a rule). The step is learned from the ends seen: the smallest gap between two of
them (a gap in the data only makes a gap larger).

Memory is bounded: entries older than ``period + step`` before the newest end are dropped, so
at most ``period / step + 2`` summaries are held (``1d`` at a 5-minute step: 290).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any, Generic, TypeVar

from rollbackd.rules.durations import parse_duration

__all__ = ["SeasonalStore", "parse_period"]

S = TypeVar("S")


class SeasonalStore(Generic[S]):
    """Summaries by window end; ``get(end - period)`` finds the one a period back.

    Pure and generic: a summary is whatever the detector keeps (it must be a value a
    checkpoint can hold, daemon/snapshot.py: plain values, numpy arrays, registered records).

    >>> store = SeasonalStore(period=86400.0)
    >>> for end in (300.0, 600.0, 86700.0):
    ...     store.put(end, f"window ending {end:g}")
    >>> store.get(86700.0 - 86400.0)
    (300.0, 'window ending 300')
    >>> store.get(600.0 - 86400.0) is None
    True
    """

    # What a checkpoint keeps (daemon/snapshot.py): the learned step and the entries.
    STATE = ("step", "_ends", "_summaries")

    def __init__(self, period: float) -> None:
        if not (isinstance(period, (int, float)) and math.isfinite(period) and period > 0):
            raise ValueError(f"period must be a duration > 0, got {period!r}")
        self.period = float(period)
        self._reset()

    def _reset(self) -> None:
        # The smallest gap between two window ends seen (None until there are two).
        self.step: float | None = None
        self._ends: list[float] = []  # ascending
        self._summaries: list[S] = []

    def __len__(self) -> int:
        return len(self._ends)

    @property
    def ends(self) -> tuple[float, ...]:
        return tuple(self._ends)

    def put(self, end: float, summary: S) -> None:
        """Keep ``summary`` as the window ending at ``end`` (replacing one with the same end),
        and drop what no later window can ask for."""
        ends = self._ends
        i = bisect_left(ends, end)
        if i < len(ends) and ends[i] == end:
            self._summaries[i] = summary
            return
        for gap in (end - ends[i - 1] if i else None, ends[i] - end if i < len(ends) else None):
            if gap is not None and (self.step is None or gap < self.step):
                self.step = gap
        ends.insert(i, end)
        self._summaries.insert(i, summary)
        self._prune(ends[-1])

    def get(self, when: float) -> tuple[float, S] | None:
        """``(end, summary)`` of the window whose end is nearest to ``when``, if it is within
        half a step of it (exactly ``when`` while the step is not known yet); else None."""
        ends = self._ends
        if not ends:
            return None
        tolerance = 0.0 if self.step is None else self.step / 2
        i = bisect_left(ends, when)
        best: int | None = None
        # the neighbour on each side; the earlier one wins a tie (deterministic)
        for j in (i - 1, i):
            if 0 <= j < len(ends) and abs(ends[j] - when) <= tolerance:
                if best is None or abs(ends[j] - when) < abs(ends[best] - when):
                    best = j
        return None if best is None else (ends[best], self._summaries[best])

    def _prune(self, newest: float) -> None:
        oldest = newest - self.period - (self.step or 0.0)
        drop = bisect_left(self._ends, oldest)
        if drop:
            del self._ends[:drop]
            del self._summaries[:drop]


def parse_period(period: Any, seasonal: bool, option: str) -> float | None:
    """A detector's ``period`` parameter in seconds (``1d``, ``7d``, a number of seconds):
    required when the detector is ``seasonal`` and refused otherwise; ``option`` is the setting
    that makes it seasonal, for the message (``baseline: same_time``)."""
    if not seasonal:
        if period is not None:
            raise ValueError(f"period needs {option}")
        return None
    if period is None:
        raise ValueError(f"period is required with {option} (1d, 7d or seconds)")
    try:
        seconds = parse_duration(period)
    except ValueError as exc:
        raise ValueError(f"period: {exc}") from None
    if seconds <= 0:
        raise ValueError(f"period must be > 0 with {option} (1d, 7d or seconds), got {period!r}")
    return seconds
