"""What model_quality compares a window with: one small class per ``baseline``, each keeping
only what it needs between windows and handing the detector a :class:`Judged` — the window's
usable columns, the baseline's (columns, or counts for a rate), or why there is none."""

from __future__ import annotations

from operator import attrgetter
from typing import Any, NamedTuple, Protocol

import numpy as np

from rollbackd.detectors.base import Window
from rollbackd.detectors.model_quality_measure import Columns, OutcomeReader, QualityMeasure, Tally
from rollbackd.detectors.seasonal import SeasonalStore
from rollbackd.rules.durations import format_duration
from rollbackd.rules.model import STABLE_ARMS

__all__ = [
    "Judged", "QualityBaseline", "NoBaseline", "Reference", "PreviousVersion", "OtherArm",
    "SameTime", "MAX_VERSIONS",
]

# Versions whose outcomes previous_version keeps (the least recently seen is dropped first).
MAX_VERSIONS = 4
_get_version = attrgetter("model_version")
_get_pred_ts = attrgetter("pred_ts")


class Judged(NamedTuple):
    """A window as its baseline hands it to the detector."""

    win: Columns  # the usable outcomes judged
    unusable: int  # outcomes of the window the metric could not use
    base: Columns | Tally | None  # what the window is compared with (None: the threshold)
    label: dict[str, Any]  # which baseline, for the evidence: {"baseline_version": "7"}...
    why: str | None  # why there is no verdict before any count is looked at, else None
    version: str | None  # the version judged, when known


class QualityBaseline(Protocol):
    """A ``baseline`` of model_quality: what a window is compared with."""

    # How a reason names the baseline ("the baseline: ..."), for too few labels in it.
    side: str

    def judge(self, window: Window) -> Judged:
        """The window's outcomes and the baseline's; the window joins what is kept after."""
        ...

    def _reset(self) -> None: ...


def _judged(window: Window, win: Columns, unusable: int, base: Columns | Tally | None = None,
            why: str | None = None, **label: Any) -> Judged:
    return Judged(win, unusable, base, label, why, window.version)


class NoBaseline:
    """``absolute``: the window against the rule's threshold; nothing is kept."""

    STATE = ()
    side = "the baseline: "

    def __init__(self, reader: OutcomeReader) -> None:
        self.reader = reader

    def _reset(self) -> None:
        pass

    def judge(self, window: Window) -> Judged:
        return _judged(window, *self.reader.usable(window.outcomes))


class Reference:
    """``reference``: the first ``size`` usable outcomes of this deployment × variant; no
    verdict until it is complete (the window that completes it is part of it)."""

    STATE = ("_reference",)
    side = "the baseline: "

    def __init__(self, reader: OutcomeReader, size: int) -> None:
        self.reader = reader
        self.size = size
        self._reset()

    def _reset(self) -> None:
        self._reference: Columns | None = None

    def judge(self, window: Window) -> Judged:
        (a, b), unusable = self.reader.usable(window.outcomes)
        ref = self._reference
        have = 0 if ref is None else ref[0].shape[0]
        if have >= self.size:
            return _judged(window, (a, b), unusable, ref)
        take = self.size - have
        if ref is None:
            self._reference = (a[:take].copy(), b[:take].copy())
        else:
            self._reference = (np.concatenate((ref[0], a[:take])), np.concatenate((ref[1], b[:take])))
        got = self._reference[0].shape[0]
        why = f"building the reference ({got} of reference_size={self.size} usable labels)"
        return _judged(window, (a, b), unusable, why=why)


class OtherArm:
    """``stable``: the other arm in the same window (``variant``, or else "stable" /
    "primary"); nothing is kept."""

    STATE = ()
    side = "the baseline: "

    def __init__(self, reader: OutcomeReader, variant: str | None) -> None:
        self.reader = reader
        self.variant = variant

    def _reset(self) -> None:
        pass

    def judge(self, window: Window) -> Judged:
        win, unusable = self.reader.usable(window.outcomes)
        if self.variant is not None:
            arm = self.variant
            if window.variant == arm:
                return _judged(window, win, unusable, why=f"this is the baseline arm {arm!r}")
        else:
            if window.variant in STABLE_ARMS:
                return _judged(window, win, unusable, why=f"this is the baseline arm {window.variant!r}")
            arm = next((a for a in STABLE_ARMS if a in window.siblings), STABLE_ARMS[0])
        other = window.siblings.get(arm)
        if other is None:
            return _judged(window, win, unusable, why=f"no baseline arm {arm!r} in this window")
        base, _ = self.reader.usable(other.outcomes)
        return _judged(window, win, unusable, base, baseline_variant=arm)


class PreviousVersion:
    """``previous_version``: the last ``size`` usable outcomes of the version served before
    the one judged (``window.known_good`` when the pipeline names one), for at most
    :data:`MAX_VERSIONS` versions. The version judged is ``window.version``, or else that of
    the newest prediction labelled so far; only its outcomes of the window are judged."""

    STATE = ("buffers", "recent", "_latest_ts", "_current")
    side = "the baseline: "

    def __init__(self, reader: OutcomeReader, size: int) -> None:
        self.reader = reader
        self.size = size
        self._reset()

    def _reset(self) -> None:
        # Usable outcomes per version, the last ``size`` of each, and the versions by when
        # they were last seen (most recent last).
        self.buffers: dict[str, Columns] = {}
        self.recent: list[str] = []
        # The newest prediction time among the labels seen, and its version: the one judged.
        self._latest_ts: float | None = None
        self._current: str | None = None

    def judge(self, window: Window) -> Judged:
        outcomes = window.outcomes
        (a, b), ok = self.reader.columns(outcomes)
        unusable = int(ok.size - np.count_nonzero(ok))
        versions = list(map(_get_version, outcomes))
        ts = np.fromiter(map(_get_pred_ts, outcomes), dtype=float, count=len(outcomes))
        ts[~ok] = -np.inf
        # Each version's usable outcomes, and when its newest labelled prediction was made.
        parts: dict[str, tuple[Columns, float]] = {}
        distinct = set(versions)
        if len(distinct) == 1:
            parts[distinct.pop()] = ((a[ok], b[ok]), float(ts.max()))
        elif distinct:
            lut = {v: i for i, v in enumerate(sorted(distinct))}
            codes = np.fromiter(map(lut.__getitem__, versions), dtype=np.int32, count=len(versions))
            for v, i in lut.items():
                rows = codes == i
                parts[v] = ((a[rows & ok], b[rows & ok]), float(ts[rows].max()))
        if ok.any():
            # The version under judgement is that of the newest prediction labelled so far:
            # labels of the old version keep arriving for a while after a deploy (as
            # calibration's previous_version baseline reads it). Ties: the later outcome.
            newest = len(ts) - 1 - int(np.argmax(ts[::-1]))
            if self._latest_ts is None or ts[newest] >= self._latest_ts:
                self._latest_ts = float(ts[newest])
                self._current = versions[newest]
        judged = window.version if window.version is not None else self._current
        win = parts[judged][0] if judged in parts else (a[:0], b[:0])
        base = self._baseline_version(judged, window.known_good)
        if base is None:
            why = (
                f"no outcomes of a version other than {judged!r} yet"
                if judged is not None else "no usable labels in window"
            )
            out = Judged(win, unusable, None, {}, why, judged)
        else:
            out = Judged(win, unusable, self.buffers[base], {"baseline_version": base}, None, judged)
        # This window's outcomes join their versions' buffers after the comparison: a window
        # is never part of the baseline it is judged against. The version with the newest
        # labelled prediction counts as the most recently seen.
        for v in sorted(parts, key=lambda v: (parts[v][1], v)):
            if parts[v][1] > -np.inf:
                self._keep(v, parts[v][0])
        return out

    def _baseline_version(self, judged: str | None, known_good: str | None) -> str | None:
        if known_good is not None and known_good != judged and known_good in self.buffers:
            return known_good
        for v in reversed(self.recent):
            if v != judged and self.buffers[v][0].shape[0]:
                return v
        return None

    def _keep(self, version: str, cols: Columns) -> None:
        if version in self.recent:
            self.recent.remove(version)
        self.recent.append(version)
        old = self.buffers.get(version)
        if old is not None and cols[0].shape[0]:
            cols = (np.concatenate((old[0], cols[0])), np.concatenate((old[1], cols[1])))
        elif old is not None:
            cols = old
        size = self.size
        if cols[0].shape[0] > size:
            cols = (cols[0][-size:].copy(), cols[1][-size:].copy())
        self.buffers[version] = cols
        while len(self.recent) > MAX_VERSIONS:
            del self.buffers[self.recent.pop(0)]


class SameTime:
    """``same_time``: the window that ended one ``period`` earlier, kept in a
    :class:`~rollbackd.detectors.seasonal.SeasonalStore` for a period as what the metric's
    test needs (:meth:`QualityMeasure.keep`: a :class:`Tally` for a rate, else at most
    ``size`` rows). Every window is kept, whatever its own verdict."""

    STATE = ("_store",)

    def __init__(self, reader: OutcomeReader, measure: QualityMeasure, period: float, size: int) -> None:
        self.reader = reader
        self.measure = measure
        self.period = period
        self.size = size
        self._store: SeasonalStore[Columns | Tally] = SeasonalStore(period)
        self._label = f"same_time, period {format_duration(period)}"
        self.side = f"the window one period earlier ({self._label}): "

    def _reset(self) -> None:
        self._store._reset()

    def judge(self, window: Window) -> Judged:
        win, unusable = self.reader.usable(window.outcomes)
        earlier = self._store.get(window.end - self.period)
        self._store.put(window.end, self.measure.keep(win, self.size))
        if earlier is None:
            return _judged(window, win, unusable, why=f"no window one period earlier ({self._label})")
        return _judged(window, win, unusable, earlier[1], baseline_end=earlier[0])
