"""Which version serves each deployment × variant, since when, and which ones were good.

A version becomes *known-good* once it served for ``known_good_after`` seconds of event time
and at least ``min_predictions`` predictions without an incident opening while it served. The
rollback target is the most recent known-good version other than the current one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet as Set, Any, Mapping

__all__ = ["VersionSpan", "VersionHistory"]


@dataclass(slots=True)
class VersionSpan:
    version: str
    started: float
    ended: float | None = None
    bad: bool = False  # an alert of a rule that marks bad fired while it served
    provenance: dict[str, str] = field(default_factory=dict)
    # Predictions served while this span ran; None for a span restored from a checkpoint
    # written before rollbackd counted them: such a span is judged by time alone.
    predictions: int | None = 0

    def served_for(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started

    def to_record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "started": self.started,
            "ended": self.ended,
            "bad": self.bad,
            "provenance": dict(sorted(self.provenance.items())),
            "predictions": self.predictions,
        }


@dataclass(slots=True)
class VersionHistory:
    """The version timeline of one deployment × variant."""

    spans: list[VersionSpan] = field(default_factory=list)

    @property
    def current(self) -> VersionSpan | None:
        return self.spans[-1] if self.spans else None

    def observe(self, version: str, ts: float, provenance: dict[str, str] | None = None) -> bool:
        """Record that ``version`` serves from ``ts`` on; True when that is a change."""
        cur = self.current
        if cur is not None and cur.version == version:
            if provenance:
                cur.provenance.update(provenance)
            return False
        if cur is not None:
            cur.ended = ts
        self.spans.append(VersionSpan(version, ts, provenance=dict(provenance or {})))
        return True

    def served(self, counts: Mapping[str, int]) -> None:
        """Count predictions served, by version, toward each version's latest span."""
        for version, n in counts.items():
            for span in reversed(self.spans):
                if span.version == version:
                    if span.predictions is not None:
                        span.predictions += n
                    break

    def latest(self, version: str) -> VersionSpan | None:
        """The latest span of ``version`` (None: it never served most of a pane here)."""
        for span in reversed(self.spans):
            if span.version == version:
                return span
        return None

    def mark_bad(self, version: str | None = None) -> None:
        """Mark the latest span of ``version`` bad (None: the current one). A version that never
        served most of a pane (a rolling update caught early) has no span to mark: the rollback
        moves away from it all the same (``known_good``'s ``away_from``)."""
        span = self.current if version is None else self.latest(version)
        if span is not None:
            span.bad = True

    def bad_versions(self) -> set[str]:
        """The versions marked bad here: a rule that marks bad fired while one of their spans served."""
        return {s.version for s in self.spans if s.bad}

    def known_good(
        self, now: float, known_good_after: float, min_predictions: int = 0, bad: Set[str] = frozenset(),
        away_from: str | None = None,
    ) -> str | None:
        """The most recent version, other than ``away_from`` (None: the current one), that ran
        healthy long enough and served at least ``min_predictions`` predictions in that span,
        and is marked bad neither here nor in ``bad`` (the versions marked bad on the
        deployment's other arms). When ``away_from`` is not the current version (the new
        version of a rolling update failed while the old one still served most), the current
        span is a candidate too."""
        cur = self.current
        bad = self.bad_versions() | bad
        leaving = away_from if away_from is not None else (cur.version if cur is not None else None)
        spans = self.spans if cur is not None and cur.version != leaving else self.spans[:-1]
        for span in reversed(spans):
            if span.version == leaving:
                continue
            if span.version in bad:
                continue
            if span.served_for(now) < known_good_after:
                continue
            if span.predictions is None or span.predictions >= min_predictions:
                return span.version
        return None
