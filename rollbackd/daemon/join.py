"""Joins delayed outcomes to their predictions by (deployment, id) within a horizon.

Memory is bounded two ways: predictions older than the horizon are evicted (counted as never
labelled), and the buffer holds at most ``max_pending`` predictions (oldest evicted first,
counted separately so an operator can see that the cap, not the horizon, was binding).
Only deployments that have a label-based rule register here at all.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import msgspec

from rollbackd.detectors.base import Labeled
from rollbackd.events import Outcome, Prediction

__all__ = ["JoinStats", "OutcomeJoiner", "Pending"]


class Pending(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One buffered prediction: what its outcome's :class:`Labeled` needs.

    A C-level struct outside the cycle collector, not a tuple: there may be millions, and
    every collection walked each tuple and its five fields (0.4 s of a 1M-event replay).
    ``array_like``: in a snapshot it is a five-element array, like the tuples of old books.
    """

    ts: float
    variant: str
    model_version: str
    prediction: Any
    score: float | None


def _ts(entry: Any) -> float:
    # A book may hold (ts, variant, version, prediction, score) tuples: written by the
    # rollbackd before this one (a checkpoint) or by a test.
    return entry.ts if type(entry) is Pending else entry[0]


_BOOKS = msgspec.msgpack.Encoder()
_BOOKS_DECODER = msgspec.msgpack.Decoder(dict[str, dict[str, Pending]])

_GONE = object()
# Eviction reads a book's oldest entries from a snapshot of its front of at least this many.
_FRONT = 4096


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
    # deployment -> {prediction id: Pending}, each in insertion order (plain dicts).
    _pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    _size: int = 0
    # deployment -> the oldest (id, entry) pairs of its book, oldest first; see _front.
    _fronts: dict[str, deque[tuple[str, Any]]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.horizon <= 0:
            raise ValueError(f"join horizon must be > 0 seconds, got {self.horizon}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")

    def __len__(self) -> int:
        return self._size

    def books_snapshot(self) -> bytes | dict[str, dict[str, Any]]:
        """The buffered predictions for a checkpoint, as msgpack: one C loop, about 15x faster
        than writing the structs one by one, which is what a checkpoint of a large buffer spent
        its time on (on the processing thread). The books themselves when a value does not fit
        msgpack (an integer beyond 64 bits): the snapshot writes them entry by entry then."""
        try:
            return _BOOKS.encode(self._pending)
        except (OverflowError, TypeError):
            return self._pending

    def restore_books(self, books: bytes | dict[str, dict[str, Any]]) -> None:
        self._pending = _BOOKS_DECODER.decode(books) if isinstance(books, bytes) else books
        self._fronts = {}

    def wants(self, deployment: str) -> bool:
        return deployment in self._pending

    def pending_books(self) -> dict[str, dict[str, Any]]:
        """Deployments whose predictions are buffered (for the hot loop's membership test)."""
        return self._pending

    def track(self, deployment: str) -> None:
        # A plain dict: insertion order is (almost) event-time order, so the oldest entries
        # are at the front. (An OrderedDict costs ~50 bytes more per entry and a slower pop.)
        self._pending.setdefault(deployment, {})

    def add(self, p: Prediction) -> None:
        book = self._pending.get(p.deployment)
        if book is None:
            return
        if p.id in book:
            self.stats.duplicate_predictions += 1
            return
        book[p.id] = Pending(p.ts, p.variant, p.model_version, p.prediction, p.score)  # type: ignore[arg-type]
        self._size += 1
        if self._size > self.max_pending:
            self._evict_oldest(self._size - self.max_pending)

    def added(self, n: int, removed: int = 0) -> None:
        """``n`` predictions were put straight into ``pending_books()`` and ``removed`` taken
        out of them by their outcomes (the hot loop's path)."""
        self._size += n - removed
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
        if type(entry) is not Pending:
            entry = Pending(*entry)
        if o.ts - entry.ts > self.horizon:
            self.stats.expired_outcomes += 1
            return None
        self.stats.joined += 1
        return Labeled(entry.ts, o.ts, entry.variant, entry.model_version, entry.prediction, entry.score, o.label)

    def expire(self, now: float) -> None:
        """Evict predictions older than ``now - horizon``."""
        cutoff = now - self.horizon
        for book in self._pending.values():
            # Insertion order is (almost) event-time order, so the old ones are at the front.
            # One pass, then delete: ``next(iter(book))`` per victim would rescan every slot
            # already deleted from the front, which made expiry quadratic in the buffer size.
            victims = []
            for key, entry in book.items():
                if _ts(entry) >= cutoff:
                    break
                victims.append(key)
            for key in victims:
                del book[key]
            self._size -= len(victims)
            self.stats.never_labeled += len(victims)

    def _front(self, deployment: str, book: dict[str, Any]) -> deque[tuple[str, Any]]:
        """The oldest entries of ``book``, oldest first (empty when the book is).

        A dict finds its front by skipping every slot already deleted there (until it next
        resizes), so taking ``next(iter(book))`` per victim made a full buffer that evicts one
        entry per prediction quadratic. Instead a snapshot of the front is taken once and
        consumed: an entry still in the book as the same object is still in its place (a dict
        only appends), one that is gone is skipped, and one whose id was put back (a new
        object: it moved to the end) makes the snapshot be taken afresh.
        """
        q = self._fronts.get(deployment)
        if q is not None:
            while q:
                key, entry = q[0]
                current = book.get(key, _GONE)
                if current is entry:
                    return q
                if current is not _GONE:
                    break
                q.popleft()
        q = self._fronts[deployment] = deque(islice(book.items(), max(_FRONT, len(book) >> 6)))
        return q

    def _evict_oldest(self, count: int = 1) -> None:
        """Evict the ``count`` oldest predictions across all books, in one merged pass
        (ties go to the deployment tracked first)."""
        if len(self._pending) == 1:  # one deployment: no merge
            ((name, book),) = self._pending.items()
            evicted = 0
            while evicted < count:
                q = self._front(name, book)
                if not q:
                    break
                del book[q.popleft()[0]]
                evicted += 1
            self._size -= evicted
            self.stats.evicted_capacity += evicted
            return
        books = list(self._pending.items())
        fronts = [self._front(name, book) for name, book in books]
        heap = [(_ts(q[0][1]), i) for i, q in enumerate(fronts) if q]
        heapq.heapify(heap)
        evicted = 0
        while evicted < count and heap:
            i = heap[0][1]
            name, book = books[i]
            del book[fronts[i].popleft()[0]]
            evicted += 1
            q = fronts[i] = self._front(name, book)
            if q:
                heapq.heapreplace(heap, (_ts(q[0][1]), i))
            else:
                heapq.heappop(heap)
        self._size -= evicted
        self.stats.evicted_capacity += evicted
