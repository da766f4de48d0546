"""A pipeline's state, written down and read back: what a restart needs to go on exactly.

Beside ``daemon/snapshot.py`` (the codec: frames, the schema, blobs) and ``daemon/checkpoints.py``
(the checkpoint file and its writer thread), this module decides *what* of a pipeline is kept
and how it is taken: :meth:`PipelineState.snapshot` in one go, :meth:`PipelineState.freeze` in
two halves (taken now on the processing thread, encoded later on a writer thread by
:meth:`FrozenSnapshot.encode`), and :meth:`PipelineState.restore`. ``Pipeline`` delegates its
``snapshot``/``freeze``/``new_blobs``/``blob_digests``/``restore`` here.

:class:`PipelineState` is the one place outside ``daemon/pipeline.py`` that reads and sets the
pipeline's own fields, private ones included: the pipeline's whole state is its business.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Mapping

import msgspec

from rollbackd.daemon.admission import DeploymentSeen
from rollbackd.daemon.snapshot import (
    SCHEMA, BlobReader, Blobs, DeclaredStates, Plain, StateError, Taken, blob_refs, checkpointed,
    frame, restore_detector, to_plain, unframe,
)
from rollbackd.daemon.versions import VersionHistory, VersionSpan
from rollbackd.daemon.windows import Pane
from rollbackd.detectors.base import Detector
from rollbackd.rules.alerts import Alert

if TYPE_CHECKING:
    from rollbackd.daemon.pipeline import Key, Pipeline

__all__ = ["PipelineState", "FrozenSnapshot"]


class PipelineState:
    """Takes and restores one pipeline's state, and keeps what makes the next checkpoint cheap:
    the references already written (by digest), the detectors' plain state until they change,
    the alerts' plain form."""

    def __init__(self, pipeline: "Pipeline") -> None:
        self.p = pipeline
        self.blobs = Blobs()  # the references the snapshots wrote, by digest
        # The detectors' declared state as plain values, kept until they next change (freeze).
        self._declared = DeclaredStates()
        self._alert_plain: dict[tuple[str, Key], tuple[Alert, Any]] = {}  # by identity (immutable)

    def changing(self, key: Hashable) -> None:
        """The detector ``key`` is about to change: a checkpoint taken before has its state first."""
        self._declared.changing(key)

    def changing_many(self, keys: Iterable[Hashable]) -> None:
        """:meth:`changing` for every detector a window boundary is about to change, at once."""
        self._declared.changing_many(keys)

    def snapshot(self, external: bool = False) -> bytes:
        """See :meth:`Pipeline.snapshot`."""
        p = self.p
        blobs = self.blobs if external else None
        if blobs is not None:
            blobs.begin()
        state = self._state()
        state["panes"] = p.assembler.panes
        state["join"] = (p.joiner.books_snapshot(), p.joiner._size, p.joiner.stats)
        blob = frame("pipeline", state, blobs)
        if blobs is not None:
            blobs.end()
        return blob

    def freeze(self) -> "FrozenSnapshot":
        """See :meth:`Pipeline.freeze`.

        Taken now is only what is not taken as it is later, each part at the cost of what
        changed (a checkpoint every few seconds must not stall the loop for its whole state):

        - detectors: the plain form of each kept until it next changes (at its window's close);
          the ones changed since the last checkpoint are converted by the writer, or by this
          thread before it changes one again (``DeclaredStates``: copy on write);
        - the join buffer: its changes since the last freeze (``OutcomeJoiner.take_changes``),
          which the writer applies to its own copy;
        - references: named by digest when encoded before, else written inline by the writer
          (``Blobs.name``): never hashed here;
        - alerts (immutable values), counters, names, the panes' lists (they only grow, their
          entries are immutable): shallow copies; event time and version histories: their
          fields copied; the rest (incidents, safety, calls in flight: small) as plain values.
        """
        p = self.p
        blobs = self.blobs
        blobs.begin()
        detectors = self._declared.take({k: det for k, det in p.detectors.items() if _checkpointed(det)})
        names = {}
        for value in detectors.blobs:
            digest = blobs.name(value)
            if digest is not None:
                names[id(value)] = digest
        plain = {k: Plain(to_plain(v)) for k, v in {
            "admission": p.admission.state(),
            "safety": p.safety,
            "awaiting": p.awaiting,
            "stalled": p.stalled,
            "incidents": (p.book.open, p.book.closed[-1000:]),
            "effects": p.executor.in_flight(),
            "parked": p.responder.parked,
        }.items()}
        blobs.end()
        et = p.event_time.state()
        later = {
            "rules": {r.name: repr(r) for r in p.config.rules},
            "event_time": {**et, "deployments": [
                (k, s.name, s.max_ts, s.queued, s.variants, set(s.features)) for k, s in et["deployments"].items()]},
            "closed": p._closed,
            "data_until": p._data_until,
            "next_boundary": p._next_boundary,
            "counters": Counter(p.counters),
            "muted_episodes": Counter(p.muted_episodes),
            "rejects": Counter(p.rejects),
            "known_keys": set(p._known_keys),
            "muted": set(p._muted),
            "first_index": dict(p.assembler.first_index),
            "not_checkpointed": sorted({k[0] for k, det in p.detectors.items() if not _checkpointed(det)}),
            "alerts": dict(p.alerts),
            "versions": {k: [(s.version, s.started, s.ended, s.bad, s.provenance.copy(), s.predictions)
                             for s in h.spans] for k, h in p.versions.items()},
        }
        panes = {key: {i: Pane(pane.predictions[:], pane.outcomes[:], pane.deploys[:]) for i, pane in by.items()}
                 for key, by in p.assembler.panes.items()}
        return FrozenSnapshot(plain, later, detectors, names, blobs, self._alert_plain, panes,
                              p.joiner.take_changes(), p.joiner._size, replace(p.joiner.stats))

    def _state(self) -> dict[str, Any]:
        """The snapshot but for the window panes and the join buffer (the large parts)."""
        p = self.p
        detectors = {k: det for k, det in p.detectors.items() if checkpointed(det)}
        afresh = {k[0] for k, det in p.detectors.items() if not checkpointed(det)}
        return {
            "rules": {r.name: repr(r) for r in p.config.rules},
            "event_time": p.event_time.state(),
            "admission": p.admission.state(),
            "closed": p._closed,
            "data_until": p._data_until,
            "next_boundary": p._next_boundary,
            "counters": p.counters,
            "muted_episodes": p.muted_episodes,
            "rejects": p.rejects,
            "known_keys": p._known_keys,
            "muted": p._muted,
            "first_index": p.assembler.first_index,
            "detectors": detectors,  # each its declared STATE
            "not_checkpointed": sorted(afresh),
            "alerts": p.alerts,
            "versions": p.versions,
            "safety": p.safety,
            "awaiting": p.awaiting,
            "stalled": p.stalled,
            "incidents": (p.book.open, p.book.closed[-1000:]),
            # calls not finished yet, and the places their notices wait at: run after a restart
            "effects": p.executor.in_flight(),
            "parked": p.responder.parked,
        }

    def new_blobs(self) -> dict[str, bytes]:
        """The blobs (by digest) the last snapshot named that no earlier one did."""
        return dict(self.blobs.new)

    def blob_digests(self) -> set[str]:
        """Every blob the last snapshot named (to keep; the others may be dropped)."""
        return set(self.blobs.digests)

    def restore(self, blob: bytes, blobs: Mapping[str, bytes] | None = None) -> list[str]:
        """See :meth:`Pipeline.restore`."""
        reader = BlobReader(blobs)
        state = unframe("pipeline", blob, reader)
        try:
            return self._restore(state, reader)
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, msgspec.MsgspecError) as exc:
            raise StateError(f"pipeline snapshot does not fit schema {SCHEMA}: "
                             f"{type(exc).__name__}: {exc}") from None

    def _restore(self, state: dict[str, Any], blobs: BlobReader) -> list[str]:
        p = self.p
        if type(state) is not dict:
            raise StateError("pipeline snapshot is not a mapping")
        now_rules = {r.name: repr(r) for r in p.config.rules}
        changed = {n for n, spec in state["rules"].items() if now_rules.get(n) != spec}
        warnings = [f"rule {n} changed or was removed since the checkpoint: its state starts afresh"
                    for n in sorted(changed)]
        warnings += [f"rule {n}: its detector keeps no checkpointed state and starts afresh"
                     for n in state["not_checkpointed"] if n not in changed]
        # Detectors first: each is built from its rule and given its declared state; one that
        # does not fit fails the restore before anything else was set.
        detectors: dict[tuple[str, Key], Detector] = {}
        for (name, key), det_state in state["detectors"].items():
            if name in changed:
                continue
            det = p.evaluator.build_detector(p._rule_index[name], key)
            restore_detector(det, det_state, blobs)
            detectors[(name, key)] = det
        join_books, join_size, join_stats = state["join"]
        p.joiner.restore_books(join_books)
        p.joiner._size, p.joiner.stats = join_size, join_stats
        p.detectors = detectors
        p._next_boundary = state["next_boundary"]
        p.event_time.restore(state["event_time"])
        p.admission.restore(state["admission"])
        p._closed = state["closed"]
        p._data_until = state["data_until"]
        p.counters = state["counters"]
        p.muted_episodes = state["muted_episodes"]
        p.rejects = state["rejects"]
        p._known_keys = state["known_keys"]
        p._muted = {m for m in state["muted"] if m[0] not in changed}
        p.assembler.panes = state["panes"]
        p.assembler.first_index = state["first_index"]
        p.alerts = {k: v for k, v in state["alerts"].items() if k[0] not in changed}
        p.versions = state["versions"]
        p.safety = state["safety"]
        p.awaiting = state["awaiting"]
        p.stalled = state.get("stalled", {})  # absent from a snapshot taken before they were kept
        p.book.open, p.book.closed = state["incidents"]
        p.restored_effects = list(state["effects"])
        p.responder.parked = dict(state["parked"])
        p._slots = {}
        self._declared = DeclaredStates()
        self._alert_plain = {}
        self.blobs.seed(blobs)  # what it read by digest is stored: named, never written again
        return warnings


class FrozenSnapshot:
    """A pipeline's state taken by :meth:`Pipeline.freeze`, encoded by :meth:`encode` (on any
    thread, once) into the same frame :meth:`Pipeline.snapshot` writes."""

    def __init__(self, plain: dict[str, Plain], later: dict[str, Any], detectors: Taken,
                 names: dict[int, str], blobs: Blobs, alert_plain: dict[Any, tuple[Alert, Any]],
                 panes: dict[Key, dict[int, Pane]], join: Any, size: int, stats: Any) -> None:
        self._plain, self._later, self._detectors = plain, later, detectors
        self._names, self._blobs, self._alert_plain = names, blobs, alert_plain
        self._panes, self._join, self._size, self._stats = panes, join, size, stats

    def encode(self) -> bytes:
        later = dict(self._later)
        et = later["event_time"]
        later["event_time"] = {**et, "deployments": {k: _seen(row) for k, *row in et["deployments"]}}
        later["versions"] = {k: VersionHistory([VersionSpan(*row) for row in rows])
                             for k, rows in later["versions"].items()}
        cache = self._alert_plain  # only encoders use it; alerts are replaced, never changed
        alerts = {}
        for k, a in later["alerts"].items():
            known = cache.get(k)
            if known is None or known[0] is not a:
                known = cache[k] = (a, to_plain(a))
            alerts[k] = Plain(known[1])
        later["alerts"] = alerts
        if len(cache) > len(alerts):
            for k in [k for k in cache if k not in alerts]:
                del cache[k]
        state = {k: Plain(to_plain(v)) for k, v in later.items()}
        state.update(self._plain)
        state["detectors"] = Plain(to_plain(self._detectors.settle()))
        # pane by pane and book by book: short C calls, between which the processing thread runs
        state["panes"] = Plain(to_plain(self._panes))
        books = self._join.encoded()
        state["join"] = Plain(to_plain((books, self._size, self._stats)))
        return frame("pipeline", state, refs=blob_refs(self._names, self._blobs))


def _seen(row: tuple[Any, ...]) -> DeploymentSeen:
    seen = object.__new__(DeploymentSeen)
    seen.name, seen.max_ts, seen.queued, seen.variants, seen.features = row
    return seen


_CHECKPOINTED: dict[type, bool] = {}


def _checkpointed(det: Any) -> bool:
    """``snapshot.checkpointed``, remembered per class: freeze asks it of every detector."""
    cls = type(det)
    known = _CHECKPOINTED.get(cls)
    if known is None:
        known = _CHECKPOINTED[cls] = checkpointed(det)
    return known
