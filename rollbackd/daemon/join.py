"""Joins delayed outcomes to their predictions by (deployment, id) within a horizon.

Memory is bounded two ways: predictions older than the horizon are evicted (counted as never
labelled), and the buffer holds at most ``max_pending`` predictions (oldest evicted first,
counted separately so an operator can see that the cap, not the horizon, was binding).
Only deployments that have a label-based rule register here at all.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from rollbackd.detectors.base import Labeled
from rollbackd.events import Outcome, Prediction

__all__ = ["JoinStats", "OutcomeJoiner"]

# Per pending prediction: (ts, variant, model_version, prediction, score). A tuple, not an
# object, because there may be millions of them.
_Pending = tuple[float, str, str, object, "float | None"]


@dataclass(slots=True)
class JoinStats:
    joined: int = 0
    unmatched_outcomes: int = 0  # no prediction with that id (never seen, or evicted)
    not_needed: int = 0  # outcomes of deployments that no label-based rule watches
    expired_outcomes: int = 0  # prediction found but the outcome came after the horizon
    never_labeled: int = 0  # predictions evicted at the horizon without an outcome
    evicted_capacity: int = 0  # predictions evicted because max_pending was reached
    duplicate_predictions: int = 0

    def to_record(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass(slots=True)
class OutcomeJoiner:
    horizon: float = 86400.0
    max_pending: int = 2_000_000
    stats: JoinStats = field(default_factory=JoinStats)
    _pending: dict[str, dict[str, _Pending]] = field(default_factory=dict)
    _size: int = 0

    def __post_init__(self) -> None:
        if self.horizon <= 0:
            raise ValueError(f"join horizon must be > 0 seconds, got {self.horizon}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")

    def __len__(self) -> int:
        return self._size

    def wants(self, deployment: str) -> bool:
        return deployment in self._pending

    def pending_books(self) -> dict[str, dict[str, _Pending]]:
        """Deployments whose predictions are buffered (for the hot loop's membership test)."""
        return self._pending

    def track(self, deployment: str) -> None:
        # An OrderedDict, not a dict: eviction takes the oldest entry from the front, and a
        # dict finds its front by skipping every slot already deleted there (until it next
        # resizes), which made a full buffer evicting one entry per prediction quadratic.
        self._pending.setdefault(deployment, OrderedDict())

    def add(self, p: Prediction) -> None:
        book = self._pending.get(p.deployment)
        if book is None:
            return
        if p.id in book:
            self.stats.duplicate_predictions += 1
            return
        book[p.id] = (p.ts, p.variant, p.model_version, p.prediction, p.score)
        self._size += 1
        if self._size > self.max_pending:
            self._evict_oldest(self._size - self.max_pending)

    def added(self, n: int) -> None:
        """``n`` predictions were put straight into ``pending_books()`` (the hot loop's path)."""
        self._size += n
        if self._size > self.max_pending:
            self._evict_oldest(self._size - self.max_pending)

    def match(self, o: Outcome) -> Labeled | None:
        book = self._pending.get(o.deployment)
        if book is None:
            self.stats.not_needed += 1
            return None
        entry = book.pop(o.id, None)
        if entry is None:
            self.stats.unmatched_outcomes += 1
            return None
        self._size -= 1
        ts, variant, version, prediction, score = entry
        if o.ts - ts > self.horizon:
            self.stats.expired_outcomes += 1
            return None
        self.stats.joined += 1
        return Labeled(ts, o.ts, variant, version, prediction, score, o.label)

    def expire(self, now: float) -> None:
        """Evict predictions older than ``now - horizon``."""
        cutoff = now - self.horizon
        for book in self._pending.values():
            # Insertion order is (almost) event-time order, so the old ones are at the front.
            # One pass, then delete: ``next(iter(book))`` per victim would rescan every slot
            # already deleted from the front, which made expiry quadratic in the buffer size.
            victims = []
            for key, entry in book.items():
                if entry[0] >= cutoff:
                    break
                victims.append(key)
            for key in victims:
                del book[key]
            self._size -= len(victims)
            self.stats.never_labeled += len(victims)

    def _evict_oldest(self, count: int = 1) -> None:
        """Evict the ``count`` oldest predictions across all books, in one merged pass."""
        heap: list[tuple[float, int, str, Iterator[tuple[str, _Pending]]]] = []
        for i, book in enumerate(self._pending.values()):
            it = iter(book.items())
            first = next(it, None)
            if first is not None:
                heap.append((first[1][0], i, first[0], it))
        heapq.heapify(heap)
        books = list(self._pending.values())
        victims: list[tuple[int, str]] = []
        while len(victims) < count and heap:
            _, i, key, it = heap[0]
            victims.append((i, key))
            nxt = next(it, None)
            if nxt is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (nxt[1][0], i, nxt[0], it))
        for i, key in victims:
            del books[i][key]
        self._size -= len(victims)
        self.stats.evicted_capacity += len(victims)
