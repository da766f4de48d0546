"""Which version a rollback goes back to, and which versions it must never go back to.

The target is the arm's most recent known-good version other than the one being left (the
version whose share of a mixed window breached, else the one serving: see
``daemon/versions.py``), or, for an arm without history of its own, the version a healthy
stable arm serves. Versions marked bad on any arm are never targets. Reads the pipeline's
version histories and incident book; changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rollbackd.daemon.splits import blamed_version
from rollbackd.daemon.versions import VersionHistory
from rollbackd.rules.incidents import Incident
from rollbackd.rules.model import STABLE_ARMS

if TYPE_CHECKING:
    from rollbackd.daemon.pipeline import Pipeline

__all__ = ["RollbackTargets"]


class RollbackTargets:
    def __init__(self, pipeline: "Pipeline") -> None:
        self.p = pipeline
        self._marking = {r.name for r in pipeline.config.rules if r.marks_version_bad}

    def choose(self, inc: Incident, rule_name: str, variant: str, ts: float) -> tuple[str | None, str | None, str | None]:
        """``(leaving, target, named)`` for a rollback of ``variant`` decided for ``inc`` by
        ``rule_name`` at ``ts``: the version to move away from, where to (None: no target), and
        the version the rule's alert named as breaching (None: the serving one is left)."""
        spec = self.p.config.deployment(inc.deployment)
        hist = self.p.versions.get((inc.deployment, variant)) or VersionHistory()
        named = self.named_version(inc, rule_name, variant)
        leaving = named or (hist.current.version if hist.current is not None else None)
        # A version marked bad on any arm is never a target. The stable fallback is not held
        # to the known-good rule: see stable_version.
        bad = self.bad_versions(inc.deployment)
        target = hist.known_good(
            ts, spec.known_good_after, spec.known_good_min_predictions, bad, away_from=named
        ) or self.stable_version(inc.deployment, variant, leaving, bad)
        return leaving, target, named

    def marks_bad(self, rule: str) -> bool:
        """Whether an incident alert of ``rule`` takes its version's known-good status away: a
        rule that rolls back says the version is bad; a notify-only warning does not
        (``marks_bad`` overrides either way)."""
        return rule in self._marking

    def named_version(self, inc: Incident, rule_name: str, variant: str) -> str | None:
        """The version the incident's alert of ``rule_name`` on ``variant`` names as breaching."""
        for a in inc.alerts.values():
            if a.rule == rule_name and a.variant == variant:
                return blamed_version(a.measurement)
        return None

    def bad_versions(self, deployment: str) -> set[str]:
        """The versions marked bad on any arm of ``deployment``."""
        return {
            v for (dep, _), hist in self.p.versions.items() if dep == deployment
            for v in hist.bad_versions()
        }

    def stable_version(self, deployment: str, variant: str, current: str | None, bad: set[str]) -> str | None:
        """For a canary-style arm with no known-good history of its own: the version the stable
        arm serves, if that arm is healthy (no incident open on it) and the version was never
        marked bad on any arm of the deployment (as a canary earlier, say: it may have been
        promoted since, but a version marked bad is never a target).

        Deliberately not held to ``known_good_after`` / ``known_good_min_predictions``. Those
        ask a *past* version to have proved itself, because nothing watches it any more; the
        stable arm's version is serving now, so sending the canary back to it (a canary abort)
        puts nothing into service that is not already carrying traffic, and an incident that
        opened while it served, on any arm, rules it out (``bad``). Holding it to the rule would
        refuse the abort, and leave a failing canary serving, whenever the stable span looks
        short: after a recent promotion, or merely because rollbackd's history starts with its
        stream.
        """
        for arm in STABLE_ARMS:
            if arm == variant:
                continue
            hist = self.p.versions.get((deployment, arm))
            if hist is None or hist.current is None or hist.current.version == current:
                continue
            if hist.current.version in bad or self.p.book.incident_for(deployment, arm) is not None:
                continue
            return hist.current.version
        return None

    def picture(self, key: tuple[str, str]) -> list[list[Any]]:
        """What the arm's version history says now, to tell when it changed."""
        hist = self.p.versions.get(key)
        return [[s.version, s.started] for s in hist.spans] if hist is not None else []
