"""What gets into the windows, and the event time it may set: so that one bad clock cannot move it.

A decoded event is valid, but its ``ts`` is a producer's claim. One prediction stamped a day
ahead used to become the watermark and make every later event "late"; one stamped in 2100 made
the window loop walk every empty minute up to it. Two pure objects guard against that; the
pipeline runs them inline in its hot loop (``Pipeline.ingest``), so replay, drills and the live
daemon share them, and every decision is made per event against the events before it (never
against batch boundaries):

:class:`Admission` dead-letters what must not get in:

- ``future_timestamp``: ``ts`` more than ``settings.max_future_skew`` ahead of the *reference*.
  The reference is the stream's own: the first :data:`WARM_UP` events are held and the
  reference anchors on their median (a bogus first event cannot anchor it); from then on it is
  the newest ``ts`` within the limits, so one event can move it by at most the skew. Live, the
  wall clock (the daemon passes it in) bounds it too, and the warm-up ends as soon as the
  daemon has read all there is (a sparse stream is not held for 64 events). So a replay and a
  live run of the same stream judge alike, and a recording published for a drill, whose times
  are all in the past, is judged against itself. A genuine jump of
  the whole stream (two recordings a week apart) is followed: when the last :data:`JUMP_RUN`
  events were all beyond the reference, it re-anchors on their median. The events before the
  one that completes the run (``JUMP_RUN - 1`` of them) stay dead-lettered.
- ``too_old``: ``ts`` before ``settings.min_event_time``, or more than the join horizon behind
  the newest ``ts`` within the limits (live too: an old recording published for a drill still works,
  it is only judged against itself).
- ``cardinality``: a new deployment beyond ``max_deployments`` (deployments named in the rules
  file are always admitted), a new variant beyond ``max_variants_per_deployment``, or a
  prediction naming a feature beyond ``max_features_per_deployment`` distinct names of its
  deployment. Memory grows with the caps, never with the input.

:class:`EventTime` keeps event time per deployment: an event is late when it is more than
``lateness`` behind its *own* deployment's newest event, so a producer whose clock runs fast
(by up to the skew) makes no other deployment's events late. Windows are cut for all
deployments at once, so they close at the pipeline's watermark, the slowest *active*
deployment's newest event minus ``lateness``. A deployment more than the skew behind the
lead no longer holds it back (a silent deployment stalls no one for longer than the skew); its
events then count as late below the watermark, as they would have been cut already.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any, Iterable, Mapping

import msgspec
import structlog

from rollbackd.daemon.clock import iso
from rollbackd.events import Event, Prediction, Rejected
from rollbackd.rules.model import Settings

__all__ = ["Admission", "DeploymentSeen", "EventTime", "WARM_UP", "JUMP_RUN", "MAX_EVENT_TIME",
           "ADMISSION_REASONS", "FUTURE_TIMESTAMP", "TOO_OLD", "CARDINALITY"]

# Dead-letter reasons of well-formed events that admission turns away (docs/event-contract.md).
FUTURE_TIMESTAMP = "future_timestamp"
TOO_OLD = "too_old"
CARDINALITY = "cardinality"
ADMISSION_REASONS = (FUTURE_TIMESTAMP, TOO_OLD, CARDINALITY)

log = structlog.get_logger("rollbackd")

# Events a replay holds before its reference anchors on their median: a count, not a time,
# so the anchor is the same whatever the batch size.
WARM_UP = 64
# This many events in a row beyond the reference are a jump of the whole stream. A run, not a
# majority of a window: a producer whose clock runs ahead, however much of the traffic it
# carries, is followed only if it sends this many events with nothing from anyone else between
# (for one with half the traffic: a chance of 2^-32 at each event).
JUMP_RUN = 32
# Nothing is later than this (10000-01-01T00:00:00Z), whatever the reference: every timestamp
# the pipeline handles stays far from where adding a window step stops changing a float.
MAX_EVENT_TIME = 253_402_300_800.0
# Event time (seconds) the slowest deployment may pass the next one by before the heap of
# active deployments is refreshed (see EventTime): bounds how far the watermark may lag.
REFRESH = 1.0

_JSON = msgspec.json.Encoder()


class DeploymentSeen:
    """What the pipeline keeps per deployment name: its newest event time and its names."""

    __slots__ = ("name", "max_ts", "queued", "variants", "features")

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_ts = -math.inf
        self.queued = False  # in EventTime's heap of active deployments
        self.variants = 0
        self.features: set[str] = set()


class EventTime:
    """Per-deployment newest event times and the watermark they make.

    ``lead`` is the stream's newest event time (``Admission.newest``). The watermark is the
    smallest newest event time among *active* deployments (those within ``skew`` of the lead)
    minus ``lateness``, or the lead minus ``skew`` and ``lateness`` when none is active; it
    never goes back. The active ones are a heap with one entry per
    deployment, refreshed lazily: an entry is corrected only when it reaches the top.

    The hot loop (``Pipeline._ingest``) does the common case itself: when the slowest
    deployment (:attr:`top`) moves on, the watermark follows it up to :attr:`runner` (the next
    entry's value: a lower bound of every other deployment's time, as entries only lag), and
    the heap is touched only once it passes ``runner`` by :data:`REFRESH` seconds. With one
    deployment the watermark is exact; with several it may lag the true one by up to
    ``REFRESH``, which only makes it later to close and slower to call an event late.
    """

    def __init__(self, lateness: float, skew: float) -> None:
        self.lateness = lateness
        self.skew = skew
        self.deployments: dict[str, DeploymentSeen] = {}
        self.lead = -math.inf
        self.watermark = -math.inf
        self._heap: list[tuple[float, str]] = []
        self.top: DeploymentSeen | None = None  # the slowest active deployment
        self.runner = math.inf  # the next heap entry's value
        self.refresh_at = math.inf  # the top beyond this: refresh the heap
        self.drop_at = math.inf  # a lead beyond this leaves the top inactive

    def add(self, name: str) -> DeploymentSeen:
        seen = self.deployments[name] = DeploymentSeen(name)
        return seen

    def moved(self, seen: DeploymentSeen) -> None:
        """``seen.max_ts`` (or the lead, which the caller sets) moved on: refresh the heap and
        the watermark."""
        if seen.max_ts > self.lead:
            self.lead = seen.max_ts
        if not seen.queued:
            seen.queued = True
            heapq.heappush(self._heap, (seen.max_ts, seen.name))
        self._settle()

    def _settle(self) -> None:
        heap, deployments = self._heap, self.deployments
        active_from = self.lead - self.skew
        while heap:
            value, name = heap[0]
            seen = deployments[name]
            if seen.max_ts < active_from:  # silent for longer than the skew: not waited for
                heapq.heappop(heap)
                seen.queued = False
            elif value != seen.max_ts:  # moved on since it was queued
                heapq.heapreplace(heap, (seen.max_ts, name))
            else:
                break
        if not heap:
            # Every deployment is silent: the watermark follows the lead, the skew behind.
            self.top, self.runner, self.refresh_at, self.drop_at = None, math.inf, math.inf, math.inf
            if active_from - self.lateness > self.watermark:
                self.watermark = active_from - self.lateness
            return
        value, name = heap[0]
        self.top = deployments[name]
        self.runner = min((heap[i][0] for i in (1, 2) if i < len(heap)), default=math.inf)
        self.refresh_at = self.runner + REFRESH
        self.drop_at = value + self.skew
        if value - self.lateness > self.watermark:
            self.watermark = value - self.lateness

    def state(self) -> dict[str, Any]:
        return {"deployments": self.deployments, "lead": self.lead, "watermark": self.watermark,
                "heap": list(self._heap)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.deployments = dict(state["deployments"])
        self.lead = state["lead"]
        self.watermark = state["watermark"]
        self._heap = list(state["heap"])
        self._settle()


class Admission:
    """Bounds on ``ts`` and on the names an event may add. Pure: the wall clock is passed in.

    The pipeline's hot loop compares each ``ts`` with :meth:`future_limit` and :meth:`old_limit`
    itself and calls :meth:`judge` only for an event outside them.
    """

    def __init__(self, settings: Settings, horizon: float, configured: Iterable[str] = ()) -> None:
        self.skew = settings.max_future_skew
        self.min_event_time = settings.min_event_time
        self.horizon = horizon
        self.max_deployments = settings.max_deployments
        self.max_variants = settings.max_variants_per_deployment
        self.max_features = settings.max_features_per_deployment
        self.configured = frozenset(configured)
        # The stream's own reference (a replay): None until the warm-up anchors it.
        self.anchor: float | None = None
        self.held: list[Event] = []
        self.seen = 0  # events judged so far (positions for the jump run)
        # The newest ts within the limits so far, admitted or refused for a name: the stream's
        # time (too_old is judged against it, and so is the future in a replay).
        self.newest = -math.inf
        # (position, ts) of the latest run of consecutive events beyond the reference
        self._beyond: deque[tuple[int, float]] = deque(maxlen=JUMP_RUN)
        self.unconfigured = 0  # admitted deployments not named in the rules file
        self._warned: set[tuple[str, str]] = set()
        self.alarms: list[tuple[str, str]] = []  # (deployment, kind) first rejected, not said yet

    # Limits -----------------------------------------------------------------------------
    def reference(self, wall_now: float | None) -> float:
        if wall_now is not None:
            return wall_now
        newest = self.newest
        return newest if self.anchor is None or newest > self.anchor else self.anchor

    def future_limit(self, wall_now: float | None) -> float:
        """Live, the earlier of the wall clock's limit and the stream's; in a replay, the stream's."""
        limit = min(self.reference(None) + self.skew, MAX_EVENT_TIME)
        return limit if wall_now is None else min(limit, wall_now + self.skew)

    def old_limit(self) -> float:
        return max(self.min_event_time, self.newest - self.horizon)

    # Warm-up (a replay) -------------------------------------------------------------------
    @property
    def warming(self) -> bool:
        return self.anchor is None

    def hold(self, events: list[Event]) -> list[Event]:
        """Hold events until :data:`WARM_UP` are there; then anchor the reference on their
        median and return them all, in order. Returns [] while still holding."""
        self.held.extend(events)
        if len(self.held) < WARM_UP:
            return []
        return self.release()

    def release(self) -> list[Event]:
        """Anchor on what is held (the end of a short stream) and hand it out."""
        held, self.held = self.held, []
        if held:
            stamps = sorted(ev.ts for ev in held[:WARM_UP])
            self.anchor = stamps[(len(stamps) - 1) // 2]
        elif self.anchor is None:
            self.anchor = -math.inf
        return held

    # The slow path ------------------------------------------------------------------------
    def judge(self, ev: Event, position: int, wall_now: float | None) -> Rejected | None:
        """An event outside the limits: its rejection, or None when a jump of the whole stream
        was just recognised and it is within the new reference."""
        ts = ev.ts
        newest = self.newest
        if ts < self.min_event_time:
            return self.rejected(ev, TOO_OLD, f"ts {iso(ts)} is before settings.min_event_time "
                                 f"{iso(self.min_event_time)}")
        if ts < newest - self.horizon:
            return self.rejected(ev, TOO_OLD, f"ts {iso(ts)} is more than the join horizon "
                                 f"({self.horizon:g}s) behind the newest event {iso(newest)}")
        limit = self.future_limit(wall_now)
        if ts <= limit:
            return None
        beyond_wall = wall_now is not None and ts > wall_now + self.skew
        what, ref = ("the wall clock", wall_now) if beyond_wall else ("the stream's newest event", self.reference(None))
        rejected = self.rejected(
            ev, FUTURE_TIMESTAMP,
            f"ts {iso(ts)} is more than settings.max_future_skew ({self.skew:g}s) ahead of "
            f"{what} {iso(ref)}",
        )
        if beyond_wall or ts >= MAX_EVENT_TIME:
            return rejected  # no jump of the stream goes past the wall clock
        beyond = self._beyond
        if beyond and beyond[-1][0] != position - 1:
            beyond.clear()  # an event within the reference came between: no run
        beyond.append((position, ts))
        if len(beyond) < JUMP_RUN:
            return rejected
        # Every one of the last JUMP_RUN events was beyond: the stream jumped (a second
        # recording, days later). Follow it.
        stamps = sorted(t for _, t in beyond)
        beyond.clear()
        self.anchor = stamps[(len(stamps) - 1) // 2]
        log.warning("admission.stream_jump", anchor=iso(self.anchor), previous=iso(newest))
        return None if ts <= self.future_limit(wall_now) else rejected

    def rejected(self, ev: Event, reason: str, detail: str) -> Rejected:
        return Rejected(reason, detail, _JSON.encode(ev))

    # Cardinality ----------------------------------------------------------------------------
    def admit_deployment(self, name: str) -> bool:
        if name in self.configured:
            return True
        if self.unconfigured >= self.max_deployments:
            self._warn("*", "deployments", self.max_deployments)
            return False
        self.unconfigured += 1
        return True

    def room_for_variant(self, seen: DeploymentSeen) -> bool:
        """Whether ``seen`` may have one more variant (counted when it is made known)."""
        if seen.variants >= self.max_variants:
            self._warn(seen.name, "variants", self.max_variants)
            return False
        return True

    def admit_features(self, seen: DeploymentSeen, ev: Prediction) -> bool:
        """Called only when the prediction names a feature new to its deployment."""
        names = seen.features
        new = [k for k in ev.features if k not in names]
        if len(names) + len(new) > self.max_features:
            self._warn(seen.name, "features", self.max_features)
            return False
        names.update(new)
        return True

    def _warn(self, deployment: str, kind: str, cap: int) -> None:
        if (deployment, kind) in self._warned:
            return
        self._warned.add((deployment, kind))
        # The first rejection per deployment and kind: said in a notice (the pipeline takes it
        # from ``alarms``); later ones are only counted.
        self.alarms.append((deployment, kind))
        log.warning("admission.cardinality", deployment=deployment, kind=kind, cap=cap)

    def cap_text(self, kind: str) -> str:
        """The cap on ``kind`` (deployments, variants, features), as a notice or a dead letter
        says it."""
        setting, cap = {
            "deployments": ("max_deployments", self.max_deployments),
            "variants": ("max_variants_per_deployment", self.max_variants),
            "features": ("max_features_per_deployment", self.max_features),
        }[kind]
        return f"more than settings.{setting} ({cap}) distinct {kind}"

    def cardinality_rejected(self, ev: Event, kind: str, deployment: str) -> Rejected:
        return self.rejected(ev, CARDINALITY, f"deployment {deployment!r}: {self.cap_text(kind)}")

    # Checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "held": self.held, "seen": self.seen, "newest": self.newest,
                "beyond": list(self._beyond), "unconfigured": self.unconfigured}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.anchor = state["anchor"]
        self.held = list(state["held"])
        self.seen = state["seen"]
        self.newest = state["newest"]
        self._beyond = deque(state["beyond"], maxlen=JUMP_RUN)
        self.unconfigured = state["unconfigured"]
