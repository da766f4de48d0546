"""Time. The only module allowed to read the wall clock.

Event time decides; processing time only schedules. In a replay the clock is the stream's
watermark (max event time seen minus the allowed lateness); live, the daemon still decides
on event time and uses the wall clock only to know when to poll and tick.
"""

from __future__ import annotations

import heapq
import time
from datetime import datetime, timezone
from typing import Generic, Protocol, TypeVar

__all__ = ["Clock", "EventTimeClock", "WallClock", "TimerQueue", "iso"]


def iso(ts: float) -> str:
    """A time as ISO 8601 UTC text (``2026-09-21T14:36:00Z``, to the microsecond when it has
    one); ``repr`` of one no calendar holds (an out-of-range or non-finite float)."""
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


class Clock(Protocol):
    def now(self) -> float:
        """Current time in Unix seconds."""


class EventTimeClock:
    """Watermark clock: ``now()`` is the highest event time observed minus ``lateness``.

    Before any event is observed ``now()`` is ``-inf``, so no timer fires on an empty stream.
    """

    def __init__(self, lateness: float = 30.0) -> None:
        if lateness < 0:
            raise ValueError(f"lateness must be >= 0 seconds, got {lateness}")
        self.lateness = lateness
        self.max_event_time = float("-inf")

    def observe(self, ts: float) -> None:
        if ts > self.max_event_time:
            self.max_event_time = ts

    def now(self) -> float:
        return self.max_event_time - self.lateness

    def flush(self) -> float:
        """End of a finite stream: everything up to the last event is complete."""
        self.lateness = 0.0
        return self.now()


class WallClock:
    def now(self) -> float:
        return time.time()


T = TypeVar("T")


class TimerQueue(Generic[T]):
    """Timers keyed by due time; ties keep insertion order, so firing order is deterministic."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, at: float, item: T) -> None:
        heapq.heappush(self._heap, (at, self._seq, item))
        self._seq += 1

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[float, T] | None:
        if self._heap and self._heap[0][0] <= now:
            at, _, item = heapq.heappop(self._heap)
            return at, item
        return None
