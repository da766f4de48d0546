"""Joins delayed outcomes to their predictions by (deployment, id) within a horizon.

Memory is bounded two ways: predictions older than the horizon are evicted (counted as never
labelled), and the buffer holds at most ``max_pending`` predictions. When a prediction goes in
over the cap, the oldest go out at once, one per prediction over it, so which labels are lost
depends on the stream, not on how it was cut into batches. A victim that could still have been
labelled is counted apart (``evicted_capacity``, and per deployment), and the first such
eviction after a horizon without one opens a binding episode: :attr:`OutcomeJoiner.alarms` holds
it until the pipeline says it in a notice naming the deployments that fill the buffer.
Only deployments that have a label-based rule register here at all.

A buffered prediction is the msgpack of its :class:`Pending` (about 75 bytes, one object: see
:func:`pack`), keyed by its id in its deployment's dict.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import msgspec
import structlog

from rollbackd.detectors.base import Labeled
from rollbackd.events import Outcome, Prediction

__all__ = ["JoinStats", "OutcomeJoiner", "Pending", "BooksCopy", "Changes", "CapBinding", "pack", "unpack",
           "ENTRY_ENCODE", "ENTRY_DECODE"]

log = structlog.get_logger("rollbackd")


class Pending(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One buffered prediction: what its outcome's :class:`Labeled` needs.

    Buffered as its msgpack (:func:`pack`), not as this struct: the struct and the floats it
    points to took 112 bytes, its variant and version strings (a decoded event's own) 100 more.
    Kept as is only for a value msgpack cannot hold (an integer beyond 64 bits), and read from
    checkpoints written before (``array_like``: a five- or six-element array, like the tuples
    of older books).
    """

    ts: float
    variant: str
    model_version: str
    prediction: Any
    score: float | None
    # The prediction's slices, for the deployment's rules that slice labels (slice_by on a
    # label-based rule): one "region=eu-west" per distinct slice_by; None when none does.
    segments: tuple[str, ...] | None = None


class _Stamp(msgspec.Struct, array_like=True):
    """The first field of a packed entry: its ts, read without building the rest."""

    ts: float


_ENTRY = msgspec.msgpack.Encoder()
_ENTRY_DECODER = msgspec.msgpack.Decoder(Pending)
# For the pipeline's hot loop, which inlines pack and unpack.
ENTRY_ENCODE = _ENTRY.encode
ENTRY_DECODE = _ENTRY_DECODER.decode
_STAMP_DECODER = msgspec.msgpack.Decoder(_Stamp)


def pack(ts: float, variant: str, model_version: str, prediction: Any, score: float | None,
         segments: tuple[str, ...] | None = None) -> "bytes | Pending":
    """A buffered prediction: one bytes object (no float or string objects of its own), exact
    (msgpack keeps a float64, and an int, a bool and a str apart). A :class:`Pending` when a
    value does not fit msgpack."""
    try:
        return _ENTRY.encode((ts, variant, model_version, prediction, score, segments))
    except (OverflowError, TypeError):
        return Pending(ts, variant, model_version, prediction, score, segments)


def unpack(entry: Any) -> Pending:
    """A book's entry as a :class:`Pending`: packed, as is, or a tuple of older books."""
    if type(entry) is bytes:
        return _ENTRY_DECODER.decode(entry)
    return entry if type(entry) is Pending else Pending(*entry)


def _ts(entry: Any) -> float:
    if type(entry) is bytes:
        return _STAMP_DECODER.decode(entry).ts
    # A book may hold (ts, variant, version, prediction, score) tuples: written by the
    # rollbackd before this one (a checkpoint) or by a test.
    return entry.ts if type(entry) is Pending else entry[0]


_BOOKS = msgspec.msgpack.Encoder()
_BOOKS_DECODER = msgspec.msgpack.Decoder(dict[str, dict[str, bytes | Pending]])
_BOOK = msgspec.msgpack.Encoder()
_BOOK_DECODER = msgspec.msgpack.Decoder(dict[str, bytes | Pending])
# How many deployments a binding notice names (the fullest books).
_FULLEST = 3
# No watermark given (a caller outside the pipeline): nothing is known to be past the horizon.
_NO_WATERMARK = float("-inf")

_GONE = object()
# Changes are noted only for a joiner whose driver checkpoints off the processing thread
# (note_changes(): the live daemon; a replay never does). Changes noted beyond twice the
# buffer's size plus this, with nobody taking them, are dropped, and no more are noted until
# take_changes is called.
_CHANGES_SLACK = 100_000
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
    # evicted_capacity by deployment (/metrics), and the event time of the last such eviction:
    # the binding episode it belongs to goes on while evictions come less than a horizon apart.
    evicted_by_deployment: dict[str, int] = field(default_factory=dict)
    capped_at: float | None = None

    def __post_init__(self) -> None:
        # A copy (dataclasses.replace, for a checkpoint) must not share the live counts.
        self.evicted_by_deployment = dict(self.evicted_by_deployment)

    def to_record(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _COUNTERS}

    def evictions(self) -> dict[str, int]:
        """``evicted_capacity`` by deployment."""
        return dict(self.evicted_by_deployment)


_COUNTERS = ("joined", "unmatched_outcomes", "not_needed", "expired_outcomes", "never_labeled",
             "evicted_capacity", "duplicate_predictions")


@dataclass(frozen=True, slots=True)
class CapBinding:
    """``max_pending`` began to bind at event time ``since``: predictions that could still be
    labelled are being evicted. ``fullest``: the deployments with the most buffered
    predictions then, and how many each had."""

    since: float
    cap: int
    horizon: float
    fullest: tuple[tuple[str, int], ...]

    def text(self) -> str:
        names = ", ".join(f"{dep} ({n:,})" for dep, n in self.fullest)
        return (f"the label buffer is full (settings.max_pending_labels = {self.cap:,}): the oldest "
                f"predictions are evicted before their outcome can come, so label-based rules see "
                f"fewer labels. Most buffered: {names}. Evictions per deployment: "
                f"rollbackd_label_buffer_evicted_total; raise max_pending_labels or shorten "
                f"join_horizon ({self.horizon:g} s), `rollbackd validate --label-rate` sizes it")


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
    # What changed in the books since the last take_changes(), in order (see BooksCopy), and
    # the copy those changes are for. None when there is no copy (see _CHANGES_SLACK).
    _log: list[tuple[str, Any, Any]] | None = field(default=None, repr=False, compare=False)
    _copy: "BooksCopy | None" = field(default=None, repr=False, compare=False)
    # Binding episodes not said yet (the pipeline takes them: a notice each).
    alarms: list[CapBinding] = field(default_factory=list, repr=False, compare=False)

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

    def books_view(self) -> dict[str, dict[str, Any]]:
        """A copy of the books as they are now, for a checkpoint encoded on another thread:
        shallow, which is exact (entries are frozen structs), and quick (a C copy per book)."""
        return {dep: book.copy() for dep, book in self._pending.items()}

    @staticmethod
    def encode_books(books: dict[str, dict[str, Any]]) -> list[tuple[str, bytes]] | dict[str, dict[str, Any]]:
        """:meth:`books_view`'s books as msgpack, one blob per deployment: each a short C call,
        so a writer thread encoding them lets the processing thread run between them. The books
        themselves when a value does not fit msgpack."""
        try:
            return [(dep, _BOOK.encode(book)) for dep, book in books.items()]
        except (OverflowError, TypeError):
            return books

    def restore_books(self, books: bytes | list[tuple[str, bytes]] | dict[str, dict[str, Any]]) -> None:
        if isinstance(books, bytes):
            self._pending = _BOOKS_DECODER.decode(books)
        elif isinstance(books, list):
            self._pending = {dep: _BOOK_DECODER.decode(blob) for dep, blob in books}
        else:
            self._pending = books
        self._fronts = {}
        if self._log is not None:
            self._log, self._copy = [], BooksCopy(self.books_view())

    def note_changes(self) -> None:
        """From now on, note what changes in the books for :meth:`take_changes` (a driver that
        freezes checkpoints calls it once, before the buffer is large; a replay never does, so
        its hot loop notes nothing)."""
        if self._log is None:
            self._log, self._copy = [], BooksCopy(self.books_view())

    def take_changes(self) -> "Changes":
        """The books as they are now, for a checkpoint encoded on another thread: not a copy
        (a million entries take tens of ms to copy) but the changes since the last call, which
        :class:`BooksCopy` applies to its own copy when encoded. After a long time without a
        call the changes were dropped (memory): then the copy is made afresh, once."""
        if self._log is None or self._copy is None:
            self._log, self._copy = [], BooksCopy(self.books_view())
        log, self._log = self._log, []
        return self._copy.changes(log)

    def changes_log(self) -> list[tuple[str, Any, Any]] | None:
        """Where the hot loop notes what it changes in the books (None: nothing to note)."""
        return self._log

    def _bound_log(self) -> None:
        if self._log is not None and len(self._log) > 2 * self._size + _CHANGES_SLACK:
            self._log = self._copy = None  # nobody takes them: stop noting (take_changes copies)

    def wants(self, deployment: str) -> bool:
        return deployment in self._pending

    def pending_books(self) -> dict[str, dict[str, Any]]:
        """Deployments whose predictions are buffered (for the hot loop's membership test)."""
        return self._pending

    def track(self, deployment: str) -> None:
        # A plain dict: insertion order is (almost) event-time order, so the oldest entries
        # are at the front. (An OrderedDict costs ~50 bytes more per entry and a slower pop.)
        if deployment not in self._pending:
            self._pending[deployment] = {}
            if self._log is not None:
                self._log.append((deployment, None, None))

    def add(self, p: Prediction, watermark: float = _NO_WATERMARK) -> None:
        """Buffer ``p`` (``watermark``: see :meth:`added`)."""
        book = self._pending.get(p.deployment)
        if book is None:
            return
        if p.id in book:
            self.stats.duplicate_predictions += 1
            return
        entry = book[p.id] = pack(p.ts, p.variant, p.model_version, p.prediction, p.score)  # type: ignore[arg-type]
        if self._log is not None:
            self._log.append((p.deployment, p.id, entry))
        self._size += 1
        if self._size > self.max_pending:
            self._evict_oldest(self._size - self.max_pending, watermark, p.ts)

    def added(self, n: int, removed: int = 0, watermark: float = _NO_WATERMARK, now: float | None = None) -> None:
        """``n`` predictions were put straight into ``pending_books()`` and ``removed`` taken
        out of them by their outcomes (the hot loop's path). The hot loop calls it as soon as
        the cap is reached, so that an insert over the cap evicts at once.

        ``watermark``: no outcome older than it gets in any more, so a prediction older than
        ``watermark - horizon`` can no longer be labelled: evicted for room, it counts as
        expired (as the next sweep would have counted it), not as lost to the cap. ``now``:
        the event time of the insert that went over the cap (the binding episode's time)."""
        self._size += n - removed
        if self._size > self.max_pending:
            self._evict_oldest(self._size - self.max_pending, watermark, watermark if now is None else now)
        self._bound_log()

    def match(self, o: Outcome) -> Labeled | None:
        book = self._pending.get(o.deployment)
        if book is None:
            self.stats.not_needed += 1
            return None
        entry = book.pop(o.id, None)
        if entry is None:
            self.stats.unmatched_outcomes += 1
            return None
        if self._log is not None:
            self._log.append((o.deployment, o.id, None))
        self._size -= 1
        entry = unpack(entry)
        if o.ts - entry.ts > self.horizon:
            self.stats.expired_outcomes += 1
            return None
        self.stats.joined += 1
        return Labeled(entry.ts, o.ts, entry.variant, entry.model_version, entry.prediction, entry.score, o.label,
                       entry.segments)

    def expire(self, now: float) -> None:
        """Evict predictions older than ``now - horizon``."""
        cutoff = now - self.horizon
        log = self._log
        for dep, book in self._pending.items():
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
            if victims and log is not None:
                log.append((dep, None, victims))
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

    def _evict_oldest(self, count: int = 1, watermark: float = _NO_WATERMARK, now: float = float("-inf")) -> None:
        """Evict the ``count`` oldest predictions across all books, in one merged pass
        (ties go to the deployment tracked first); see :meth:`added` for ``watermark``.
        Those that could still be labelled are counted as lost to the cap, the others as
        expired."""
        cutoff = watermark - self.horizon
        if len(self._pending) == 1:  # one deployment: no merge
            ((name, book),) = self._pending.items()
            lost = evicted = 0
            while evicted < count:
                q = self._front(name, book)
                if not q:
                    break
                key, entry = q.popleft()
                del book[key]
                if self._log is not None:
                    self._log.append((name, key, None))
                evicted += 1
                if watermark == _NO_WATERMARK or _ts(entry) >= cutoff:
                    lost += 1
            self._size -= evicted
            if lost:
                self._lost(name, lost, now)
            if evicted > lost:
                self.stats.never_labeled += evicted - lost
            return
        books = list(self._pending.items())
        fronts = [self._front(name, book) for name, book in books]
        heap = [(_ts(q[0][1]), i) for i, q in enumerate(fronts) if q]
        heapq.heapify(heap)
        lost_by: dict[str, int] = {}
        evicted = 0
        while evicted < count and heap:
            ts, i = heap[0]
            name, book = books[i]
            key = fronts[i].popleft()[0]
            del book[key]
            if self._log is not None:
                self._log.append((name, key, None))
            evicted += 1
            if ts >= cutoff:
                lost_by[name] = lost_by.get(name, 0) + 1
            q = fronts[i] = self._front(name, book)
            if q:
                heapq.heapreplace(heap, (_ts(q[0][1]), i))
            else:
                heapq.heappop(heap)
        self._size -= evicted
        self.stats.never_labeled += evicted - sum(lost_by.values())
        for name, n in lost_by.items():
            self._lost(name, n, now)

    def _lost(self, deployment: str, n: int, now: float) -> None:
        """``n`` predictions of ``deployment`` that could still have been labelled were
        evicted for room at event time ``now``."""
        stats = self.stats
        stats.evicted_capacity += n
        by_dep = stats.evicted_by_deployment
        by_dep[deployment] = by_dep.get(deployment, 0) + n
        last = stats.capped_at
        if last is not None and now <= last:
            return
        stats.capped_at = now
        if last is None or now - last > self.horizon:
            # A new episode: the cap had not bound for a whole horizon (or ever).
            fullest = sorted(((d, len(b)) for d, b in self._pending.items() if b), key=lambda x: (-x[1], x[0]))
            binding = CapBinding(now, self.max_pending, self.horizon, tuple(fullest[:_FULLEST]))
            self.alarms.append(binding)
            log.warning("join.cap_binds", cap=self.max_pending, fullest=dict(binding.fullest))


class BooksCopy:
    """The books as of the last :meth:`OutcomeJoiner.take_changes`, kept for whoever encodes
    frozen snapshots: brought up to date with each one's changes when it is encoded, so the
    processing thread never copies the buffer (it notes each change: an append).

    Changes are ``(deployment, id, entry)``: ``entry`` put under ``id``; ``entry`` None: ``id``
    removed; ``id`` None: the deployment tracked (``entry`` None) or the ids in ``entry`` (a
    list) removed. Applied in the order they were made, each dict keeps the live one's order.
    """

    def __init__(self, books: dict[str, dict[str, Any]]) -> None:
        self._books = books
        self._queued: deque[tuple[int, list[tuple[str, Any, Any]]]] = deque()
        self._taken = 0  # changes handed out so far (Changes.seq)
        self._applied = 0
        self._queue_lock = threading.Lock()  # the processing thread only queues
        self._lock = threading.Lock()  # one encoder at a time

    def changes(self, log: list[tuple[str, Any, Any]]) -> "Changes":
        with self._queue_lock:
            self._taken += 1
            self._queued.append((self._taken, log))
            return Changes(self, self._taken)

    def encoded(self, seq: int) -> list[tuple[str, bytes]] | dict[str, dict[str, Any]]:
        with self._lock:
            if seq < self._applied:
                raise RuntimeError("frozen snapshots of a pipeline are encoded once each, in the order frozen")
            while self._applied < seq:
                with self._queue_lock:
                    self._applied, log = self._queued.popleft()
                self._apply(log)
            # Encoded before another encoder may change the books again (a copy when they are
            # written entry by entry, later).
            encoded = OutcomeJoiner.encode_books(self._books)
            return encoded if isinstance(encoded, list) else {d: dict(b) for d, b in encoded.items()}

    def _apply(self, log: list[tuple[str, Any, Any]]) -> None:
        books = self._books
        for dep, key, entry in log:
            if key is None:
                if entry is None:
                    books.setdefault(dep, {})
                else:
                    book = books[dep]
                    for victim in entry:
                        del book[victim]
            elif entry is None:
                del books[dep][key]
            else:
                books[dep][key] = entry


class Changes:
    """One freeze's view of the join buffer (:meth:`OutcomeJoiner.take_changes`)."""

    __slots__ = ("_copy", "seq")

    def __init__(self, copy: BooksCopy, seq: int) -> None:
        self._copy, self.seq = copy, seq

    def encoded(self) -> list[tuple[str, bytes]] | dict[str, dict[str, Any]]:
        """The books at the freeze, as :meth:`OutcomeJoiner.encode_books` writes them."""
        return self._copy.encoded(self.seq)
