"""Silences: an operator mutes matching alerts for a stretch of (event) time.

A silenced alert is still evaluated and recorded, with the silence that muted it, but it
neither notifies nor acts. Silences are data stored in the ledger; the pipeline receives them
and matches by event time, so a replay applies a silence exactly where it applied live, and
it expires on its own at ``ends_at``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["Silence", "first_match"]


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    deployment: str
    starts_at: float
    ends_at: float
    reason: str
    created_by: str
    rule: str | None = None  # None: every rule
    variant: str | None = None  # None: every variant

    def __post_init__(self) -> None:
        if self.ends_at <= self.starts_at:
            raise ValueError(f"a silence must end after it starts ({self.starts_at} >= {self.ends_at})")
        if not self.reason.strip() or not self.created_by.strip():
            raise ValueError("a silence needs a reason and the name of who set it")

    def matches(self, labels: Mapping[str, str], t: float) -> bool:
        return (
            self.starts_at <= t < self.ends_at
            and labels.get("deployment") == self.deployment
            and (self.rule is None or labels.get("rule") == self.rule)
            and (self.variant is None or labels.get("variant") == self.variant)
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "deployment": self.deployment,
            "rule": self.rule,
            "variant": self.variant,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "reason": self.reason,
            "created_by": self.created_by,
        }


def first_match(silences: Iterable[Silence], labels: Mapping[str, str], t: float) -> Silence | None:
    """The earliest-starting silence (ties: lowest id) that mutes ``labels`` at ``t``."""
    hits = [s for s in silences if s.matches(labels, t)]
    return min(hits, key=lambda s: (s.starts_at, s.id)) if hits else None
