"""Several notifiers at once (``settings.notifiers``): each notice goes to the routes whose
``match`` takes it, e.g. critical incidents and every escalation to PagerDuty and Slack,
warnings to Slack only.

A route that took one of an incident's notices takes the incident's later ones too (its
updates, repeats and resolution), so a page opened by an escalation is resolved where it was
opened: a route matches every severity the incident has had (``Notice.severities``) and, once it
escalated, every later notice is an escalation (``Notice.escalation``), both read from the
incident's checkpointed state, so this holds across restarts. Notices about rollbackd itself
and digests (no severity) go to the routes that match every notice. The routes are called one after the other (each retries by classification on its
own); one that fails does not stop the others, and the notice is ``failed`` if any failed, with
each route's answer in ``detail``.

Threads: the Slack thread of an incident is the first threaded route's (the first in the list
that answers with one); the incident's thread reference goes to that route only, the others
get theirs from this process's memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Sequence

from rollbackd.actions.base import ActionResult, ClosableNotifier, Notice, Notifier, ResumableNotifier
from rollbackd.rules.model import RouteMatch, name_matches

__all__ = ["Route", "NoticeRouter"]


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # how the ledger and logs name it: its type, numbered when a type repeats
    notifier: Notifier
    match: RouteMatch = RouteMatch()

    def takes(self, notice: Notice) -> bool:
        m = self.match
        if m.deployments is not None and not name_matches(m.deployments, notice.deployment):
            return False
        if m.everything:
            return True
        if notice.severity is None:  # rollbackd's own notices and digests: for catch-all routes
            return False
        had = notice.severities or (notice.severity,)
        return (m.severities is not None and any(s in m.severities for s in had)) or (m.escalation and notice.escalation)


class NoticeRouter:
    """A :class:`Notifier` that hands each notice to the routes that take it."""

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("at least one route is required")
        self.routes = tuple(routes)
        self._threads: dict[tuple[str, int], str] = {}  # (incident, route) -> its thread
        self._primary: dict[str, int] = {}  # incident -> the route whose thread is the incident's
        self._lock = threading.Lock()

    def chosen(self, notice: Notice) -> list[int]:
        return [i for i, r in enumerate(self.routes) if r.takes(notice)]

    def post(self, notice: Notice) -> ActionResult:
        chosen = self.chosen(notice)
        if not chosen:
            return ActionResult("skipped", "no notifier route takes this notice", attempts=0, thread=notice.thread)
        incident = notice.incident_id
        with self._lock:
            primary = self._primary.get(incident)
            threads = {i: self._threads.get((incident, i)) for i in chosen}
        if primary is None and notice.thread is not None:
            primary = chosen[0]  # after a restart: the first route gets the incident's thread back
        results: list[tuple[int, ActionResult]] = []
        for i in chosen:
            thread = notice.thread if i == primary else threads[i]
            try:
                result = self.routes[i].notifier.post(replace(notice, thread=thread))
            except Exception as exc:  # one route's bug must not silence the others
                result = ActionResult("failed", f"{type(exc).__name__}: {exc}")
            results.append((i, result))
        with self._lock:
            for i, result in results:
                if result.thread is not None:
                    self._threads[(incident, i)] = result.thread
                    if primary is None:
                        primary = i
            if primary is not None:
                self._primary[incident] = primary
            if notice.kind == "resolved":  # its pages are resolved: forget it (memory stays bounded)
                self._primary.pop(incident, None)
                for i in range(len(self.routes)):
                    self._threads.pop((incident, i), None)
        thread = notice.thread
        for i, result in results:
            if i == primary and result.thread is not None:
                thread = result.thread
        failed = [f"{self.routes[i].name}" for i, r in results if r.status == "failed"]
        if failed:
            status = "failed"
        elif all(r.status == "skipped" for _, r in results):
            status = "skipped"
        else:
            status = "succeeded"
        detail = "; ".join(f"{self.routes[i].name}: {r.status} ({r.detail})" if r.detail else
                           f"{self.routes[i].name}: {r.status}" for i, r in results)
        data = {"routes": {self.routes[i].name: {"status": r.status, "detail": r.detail} for i, r in results}}
        return ActionResult(status, detail, attempts=sum(r.attempts for _, r in results), thread=thread, data=data)

    def resume(self, notice: Notice) -> None:
        """An open incident after a restart, for the routes that keep what they sent alive."""
        for route in self.routes:
            if isinstance(route.notifier, ResumableNotifier) and route.takes(notice):
                route.notifier.resume(notice)

    def close(self) -> None:
        for route in self.routes:
            if isinstance(route.notifier, ClosableNotifier):
                route.notifier.close()
