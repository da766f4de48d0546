"""Monitoring the monitor: can the live daemon read its events, and how far behind is it?

:class:`Watch` looks after every read and every second of a backoff wait: it reads the source's
health (or, for a source that only answers ``lag()``, asks it every ``lag_every`` seconds), steps
the blind state (``daemon/blindness.py``) and posts its [BLIND] notice and the resolution. The
lag it measured is kept, with its time, for /metrics: a scrape never talks to a broker.

:class:`OwnNotices` posts the daemon's own notices (monitoring blind, an effect queue full, the
digest another thread hands over) through the effect lanes to the daemon's notifier: recorded in
the ledger, not in the decision log; whoever asked hears how each went, on the loop's thread.
"""

from __future__ import annotations

import math
import queue
from typing import Any, Callable

import structlog

from rollbackd.actions.base import ActionResult, Notice
from rollbackd.actions.delivery import Delivery
from rollbackd.actions.intents import Call, own_notice
from rollbackd.daemon.blindness import BlindState, BlindTransition, Blindness, ReportsHealth, ReportsLag
from rollbackd.daemon.clock import Clock
from rollbackd.daemon.executor import LaneExecutor
from rollbackd.daemon.pipeline import Edges
from rollbackd.daemon.sources import EventSource
from rollbackd.errors import Recoverable

__all__ = ["OwnNotices", "Watch"]

# The daemon's logger: these events are the run loop's.
log = structlog.get_logger("rollbackd.run")

OnResult = Callable[[ActionResult], None]


class OwnNotices:
    """The daemon's own notices, through the same lanes as the pipelines' (an executor engine of
    their own), to its own notifier."""

    def __init__(self, effects: LaneExecutor, edges: Edges, name: str, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self._lane = effects.bind(self, Delivery(edges))
        # Notices other threads hand over (the digest), posted from the loop; and who wants to
        # hear how each notice went.
        self._inbox: queue.SimpleQueue[tuple[Notice, str, OnResult | None]] = queue.SimpleQueue()
        self._on_result: dict[str, OnResult] = {}

    def apply_result(self, call: Call, result: ActionResult) -> None:
        """A notice came back: whoever asked hears how it went."""
        callback = self._on_result.pop(call.key, None)
        if callback is not None:
            callback(result)

    def post_from_thread(self, notice: Notice, on_result: OnResult | None = None) -> None:
        """Hand a notice from another thread (the digest's scheduler) to the loop, which posts
        it through the executor; ``on_result`` hears how it went (on the loop's thread)."""
        self._inbox.put((notice, notice.kind, on_result))

    def post(self, notice: Notice, reason: str, on_result: OnResult | None = None) -> None:
        key = f"{notice.incident_id}:{notice.kind}:{notice.ts:.3f}"
        if on_result is not None:
            self._on_result[key] = on_result
        self._lane.submit(own_notice(notice, key, reason))

    def post_handed_over(self) -> None:
        """On the loop's thread: post the notices other threads handed over."""
        while True:
            try:
                notice, reason, on_result = self._inbox.get_nowait()
            except queue.Empty:
                return
            self.post(notice, reason, on_result)

    def effects_full(self, deployment: str, limit: int) -> None:
        """The executor's ``on_full``: a deployment's notice lane is full."""
        text = (f"{limit} notices are waiting for {deployment}'s notifier: further notices for it "
                "are dropped (recorded as failed in the ledger) until it catches up")
        title = f"[EFFECTS] {self.name}: notice queue full for {deployment}"
        self.post(Notice(incident_id=f"effects-{self.name}-{deployment}", kind="opened",
                         ts=self.clock.now(), deployment="*", variant="*", version=None,
                         title=title, text=text), "effect queue full")


class Watch:
    """The blind state, the lag as last measured, and whether the source was readable at the
    last look. ``notify`` False (no notifier configured): the blind notice is logged, not posted."""

    def __init__(self, source: EventSource, *, blind_after: float, lag_limit: int | None, lag_every: float,
                 name: str, own: OwnNotices, notify: bool) -> None:
        self.source = source
        self.lag_every = lag_every
        self.name = name
        self.own = own
        self.notify = notify
        self.blindness = Blindness(blind_after, lag_limit,
                                   lag_measured=isinstance(source, (ReportsHealth, ReportsLag)))
        self.lag: int | None = None  # consumer lag as last measured (kept while the brokers are away)
        self.lag_at: float | None = None  # when (clock time)
        self._lag_asked = -math.inf
        self.reading = True  # the last look found the source readable
        self._unreadable_at = -math.inf  # the last look that did not (clock time)

    @property
    def blind_notified(self) -> bool:
        """The [BLIND] notice is out."""
        return self.blindness.state.notified

    @property
    def blind_since(self) -> float | None:
        """Start of the current spell of blindness (notified or not yet), or None."""
        return self.blindness.state.since

    def look(self, now: float, read_failure: str | None = None) -> None:
        """One look: can the daemon read, how far behind is it? Steps the blind state and sends
        its notice. Called after every read (``read_failure``: why it raised) and every second
        of a backoff wait."""
        lag, since, why = self.measure(now, read_failure)
        reading = why is None
        if reading != self.reading:
            if reading:
                log.info("source.reading", lag=lag)
            else:
                log.warning("source.failing", detail=why)
            self.reading = reading
        if not reading:
            self._unreadable_at = now
        change = self.blindness.observe(now, reading, lag, why or "", since)
        if change is not None:
            self._post(self._blind_notice(now, change))

    def measure(self, now: float, read_failure: str | None) -> tuple[int | None, float | None, str | None]:
        """(current lag or None, when the source stopped answering or None, why it cannot be read
        or None). Never a network round trip from a source that reports its health; sources that
        only answer ``lag()`` are asked every ``lag_every`` seconds.

        The current lag is one measured lately and since the source was last seen unreadable: a
        value from before an outage is kept for /metrics, but says nothing about now."""
        source = self.source
        since: float | None = None
        why = read_failure
        if isinstance(source, ReportsHealth):
            health = source.health()
            if health.lag is not None and health.lag_age is not None:
                self.lag, self.lag_at = health.lag, now - health.lag_age
            if not health.reachable:
                why = why or health.detail or "the brokers do not answer"
                since = now - health.silent_for
        elif isinstance(source, ReportsLag) and read_failure is None:
            if now - self._lag_asked >= self.lag_every:
                self._lag_asked = now
                try:
                    self.lag, self.lag_at = int(source.lag()), now
                except Recoverable as exc:
                    log.info("source.lag_unknown", detail=str(exc))
        fresh = self.lag_at is not None and self.lag_at > self._unreadable_at and (
            now - self.lag_at <= 2 * self.lag_every)
        return self.lag if fresh else None, since, why

    def restore(self, saved: Any) -> None:
        """The blind state a checkpoint (or a task's state record) kept."""
        state = BlindState.from_dict(saved if isinstance(saved, dict) else None)
        self.blindness.adopt(state)
        if state.notified:
            log.warning("monitoring.blind_restored", since=state.since, detail=state.text)

    def _blind_notice(self, now: float, change: BlindTransition) -> Notice:
        opened = change.kind == "opened"
        title = f"[{'BLIND' if opened else 'RESOLVED'}] {self.name}: {change.text}"
        (log.error if opened else log.warning)("monitoring.blind", state=change.kind, detail=change.text,
                                               since=change.since, lag=change.lag)
        return Notice(
            incident_id=f"blind-{self.name}", kind=change.kind,
            ts=now, deployment="*", variant="*", version=None,
            title=title, text=title, thread=change.thread,
        )

    def _post(self, notice: Notice) -> None:
        """The one place the blind notice is decided: the executor posts it, off this thread."""
        if not self.notify:
            return
        if notice.kind == "opened":
            # its thread is kept, so the resolution (after a restart too) replies in it
            self.own.post(notice, "monitoring blind", lambda result: self.blindness.noticed(result.thread))
        else:
            self.own.post(notice, "monitoring again")
