"""Is the daemon watching? Blindness as a state, stepped by observations, persisted in checkpoints.

The daemon is *blind* while it cannot read its events (reads fail, or return while the brokers do
not answer, so nothing could come) or reads them further behind than the lag limit. A spell of
blindness that lasts ``blind_after`` seconds opens the [BLIND] notice; the first observation that
sees again resolves it. Like an alert's ``for``, this is a comparison of timestamps, not a count
of failed reads, so the notice comes at the bound however often (or rarely) the daemon looks,
and a restart neither forgets an open notice nor restarts the spell's clock.

Pure: no I/O, no clock; ``now`` (Unix seconds) is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Literal, Mapping, Protocol, runtime_checkable

__all__ = ["BlindState", "BlindTransition", "Blindness", "SourceHealth", "ReportsHealth", "ReportsLag"]


@dataclass(frozen=True, slots=True)
class BlindState:
    """What a checkpoint keeps: the spell (``since``), whether its notice is out, and its text and
    thread (so the resolution answers in the same thread, after a restart too)."""

    since: float | None = None  # start of the current spell; None while the daemon sees
    notified: bool = False  # the [BLIND] notice is out (and not yet resolved)
    text: str = ""  # the last notice's text
    thread: str | None = None  # the notifier's thread of the open notice
    why: str = ""  # the current spell's cause

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: a checkpoint must stay readable whatever this class becomes."""
        return {"since": self.since, "notified": self.notified, "text": self.text,
                "thread": self.thread, "why": self.why}

    @staticmethod
    def from_dict(saved: Mapping[str, Any] | None) -> "BlindState":
        if not saved:
            return BlindState()
        since = saved.get("since")
        return BlindState(
            since=float(since) if isinstance(since, (int, float)) else None,
            notified=bool(saved.get("notified")) and isinstance(since, (int, float)),
            text=str(saved.get("text") or ""),
            thread=saved.get("thread") if isinstance(saved.get("thread"), str) else None,
            why=str(saved.get("why") or ""),
        )


@dataclass(frozen=True, slots=True)
class BlindTransition:
    """A notice to send: ``opened`` or ``resolved``, with its text."""

    kind: Literal["opened", "resolved"]
    text: str
    since: float
    lag: int | None
    thread: str | None = None  # resolved: the thread of the notice it resolves


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """What a source knows, without asking anyone, about whether anything can come.

    ``reachable`` is False when reads still return but the brokers do not answer (down, stalled,
    no group coordinator): an empty read then says nothing about the stream. ``silent_for`` is
    how long they have not answered. ``lag`` is the number of messages not yet read, as last
    measured while they answered (kept through an outage), ``lag_age`` how old that measurement
    is; both None before the first one.
    """

    reachable: bool = True
    silent_for: float = 0.0
    detail: str = ""
    lag: int | None = None
    lag_age: float | None = None


@runtime_checkable
class ReportsHealth(Protocol):
    def health(self) -> SourceHealth:
        """Cheap (no network round trip): callable on every loop iteration."""
        ...


@runtime_checkable
class ReportsLag(Protocol):
    def lag(self) -> int:
        """Messages not yet read (may ask a broker: call it sparingly, never from a scrape)."""
        ...


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lasting(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Blindness:
    """The blind state machine.

    ``observe(now, read_ok, lag)`` is called on a timer (every loop iteration and every second of
    a backoff wait): ``read_ok`` says whether the daemon can read (the last read returned and the
    source's brokers answer); ``lag`` is the current consumer lag, or None when not freshly
    known. Blind means ``not read_ok`` or ``lag > lag_limit``; ``since`` (when the caller knows
    the failure began earlier than it noticed, e.g. the brokers' last answer) back-dates a new
    spell.

    An unknown lag while reading ends a spell that raised no notice; a spell whose notice is out
    is held until the lag is known (with ``lag_measured``: the source measures it), so the
    resolution says how far behind the daemon really is.
    """

    def __init__(self, blind_after: float, lag_limit: int | None = None, *, lag_measured: bool = False,
                 state: BlindState = BlindState()) -> None:
        if not blind_after > 0:
            raise ValueError(f"blind_after must be > 0 seconds, got {blind_after}")
        if lag_limit is not None and lag_limit < 0:
            raise ValueError(f"lag_limit must be >= 0 messages, got {lag_limit}")
        self.blind_after = blind_after
        self.lag_limit = lag_limit
        self.lag_measured = lag_measured
        self.state = state

    @property
    def blind(self) -> bool:
        """The notice is out."""
        return self.state.notified

    def observe(self, now: float, read_ok: bool, lag: int | None, why: str = "",
                since: float | None = None) -> BlindTransition | None:
        s = self.state
        behind = self.lag_limit is not None and lag is not None and lag > self.lag_limit
        if not read_ok or behind:
            if not read_ok:
                cause = f"cannot read events: {why}" if why else "cannot read events"
            else:
                cause = f"consumer lag {lag} > limit {self.lag_limit}"
            start = s.since if s.since is not None else min(now, since if since is not None else now)
            s = self.state = replace(s, since=start, why=cause)
            if s.notified or now - start < self.blind_after:
                return None
            text = f"not watching since {_when(start)} ({_lasting(now - start)}): {cause}"
            self.state = replace(s, notified=True, text=text)
            return BlindTransition("opened", text, start, lag)
        if s.since is None:
            return None
        if not s.notified:
            self.state = BlindState()
            return None
        if lag is None and self.lag_measured:
            return None  # hold: say how far behind once it is known
        behind_text = f"consumer lag {lag}" if lag is not None else "consumer lag not measured"
        limit = f" (limit {self.lag_limit})" if self.lag_limit is not None else ""
        text = (f"watching again after {_lasting(now - s.since)} blind (since {_when(s.since)}); "
                f"{behind_text}{limit}")
        self.state = BlindState(text=text)
        return BlindTransition("resolved", text, s.since, lag, s.thread)

    def noticed(self, thread: str | None) -> None:
        """The notifier's thread of the notice just sent (kept for the resolution)."""
        if self.state.notified and thread:
            self.state = replace(self.state, thread=thread)

    def adopt(self, saved: BlindState) -> None:
        """A checkpoint's state: an open notice stays open (to be resolved or kept), and a spell
        keeps its start, so a restart does not reset the clock."""
        if saved.notified or (saved.since is not None and self.state.since is None):
            self.state = saved
