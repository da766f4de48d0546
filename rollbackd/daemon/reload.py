"""Reloading a running daemon's rules: on SIGHUP, or when the rules file changes (polled).

The signal handler only notes the request; the daemon's loop reloads between batches, on its
processing thread (``Daemon._tend``): the file is read and checked like ``validate`` does, and
either every pipeline goes on under the new rules (``Pipeline.replace_rules``: unchanged rules
keep their state) or, for a file with an error or a change a reload cannot apply, nothing
changes. Either way the reload is logged, counted for /metrics, written to the ledger
(``rule_reloads``), and a failure raises the daemon's own notice; the next good reload resolves it.
"""

from __future__ import annotations

import hashlib
import signal
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import structlog

from rollbackd.actions.base import Notice
from rollbackd.daemon.clock import Clock, iso
from rollbackd.rules.model import Config

if TYPE_CHECKING:
    from rollbackd.daemon.run import Daemon

__all__ = ["RulesReload"]

log = structlog.get_logger("rollbackd.run")

# A notice carries the first lines of the loader's report: enough to see what is wrong.
_NOTICE_LINES = 10


class RulesReload:
    """Reloads of the rules file at ``path`` with ``load`` (``rules.loader.load_config``: raises
    on any error). ``watch_every``: also reload when the file's content changes, looked at every
    so many seconds (None: on request only)."""

    def __init__(self, path: str, load: Callable[[str], Config], clock: Clock, *,
                 watch_every: float | None = None) -> None:
        self.path = path
        self._load = load
        self.clock = clock
        self.watch_every = watch_every
        self._requested: str | None = None  # set by the signal handler: one assignment
        self._digest = _digest(path)  # of the file the running rules came from
        self._looked_at = clock.now()
        self.counts: Counter[str] = Counter()  # reloads by result: ok, failed
        self.last_success: float | None = None  # clock time
        self.last_failure: float | None = None
        self._failing = False  # the last reload failed: its notice is out

    def request(self, trigger: str = "SIGHUP") -> None:
        """Ask for a reload at the loop's next turn (safe in a signal handler)."""
        self._requested = trigger

    def install(self) -> None:
        """SIGHUP requests a reload (call on the main thread)."""
        signal.signal(signal.SIGHUP, lambda signum, frame: self.request("SIGHUP"))

    def due(self, now: float) -> str | None:
        """What asks for a reload now (``SIGHUP``, ``file changed``), or None."""
        trigger, self._requested = self._requested, None
        if trigger is None and self.watch_every is not None and now - self._looked_at >= self.watch_every:
            self._looked_at = now
            if _digest(self.path) != self._digest:
                trigger = "file changed"
        return trigger

    def tend(self, daemon: "Daemon") -> None:
        """On the processing thread, between batches: reload if one is due."""
        now = self.clock.now()
        trigger = self.due(now)
        if trigger is not None:
            self.reload(daemon, trigger, now)

    def reload(self, daemon: "Daemon", trigger: str, now: float) -> bool:
        digest = _digest(self.path)
        self._digest = digest  # a file that fails is not retried until it changes again (or SIGHUP)
        try:
            config = self._load(self.path)  # nothing changed yet: no file may stop the daemon
        except Exception as exc:  # noqa: BLE001 - ConfigError, OSError, or a bug in the checker
            return self._failed(daemon, trigger, now, digest, _text(exc))
        try:
            change = daemon.replace_rules(config)  # checks before it changes anything
        except ValueError as exc:
            return self._failed(daemon, trigger, now, digest, str(exc))
        self.counts["ok"] += 1
        self.last_success = now
        log.info("rules.reloaded", path=self.path, trigger=trigger, added=list(change.added),
                 changed=list(change.changed), removed=list(change.removed), kept=len(change.kept))
        self._record(daemon, "ok", trigger, digest, change.to_record(), change.describe())
        if self._failing:
            self._failing = False
            self._notice(daemon, "resolved", now, f"[RULES] {daemon.name}: {self.path} reloaded",
                         change.describe())
        return True

    def _failed(self, daemon: "Daemon", trigger: str, now: float, digest: str | None, detail: str) -> bool:
        """A reload refused: the running rules stay; said in the log, the ledger and a notice."""
        self.counts["failed"] += 1
        self.last_failure = now
        log.error("rules.reload_failed", path=self.path, trigger=trigger, detail=detail)
        self._record(daemon, "failed", trigger, digest, None, detail)
        lines = detail.splitlines()
        shown = "\n".join(lines[:_NOTICE_LINES]) + (f"\n... and {len(lines) - _NOTICE_LINES} more line(s)"
                                                   if len(lines) > _NOTICE_LINES else "")
        self._notice(daemon, "opened", now, f"[RULES] {daemon.name}: reload of {self.path} failed; "
                     "the running rules are kept", shown)
        self._failing = True
        return False

    def _record(self, daemon: "Daemon", result: str, trigger: str, digest: str | None,
                change: dict[str, list[str]] | None, detail: str) -> None:
        if daemon.ledger is None:
            return
        daemon.ledger.rules_reload({
            "result": result, "trigger": trigger, "source": self.path, "digest": digest or "",
            **{k: ",".join(v) for k, v in (change or {}).items() if k != "kept"},
            "detail": detail, "created_wall": iso(self.clock.now()),
        })

    def _notice(self, daemon: "Daemon", kind: Any, now: float, title: str, text: str) -> None:
        daemon.own.post(Notice(incident_id=f"rules-{daemon.name}", kind=kind, ts=now, deployment="*",
                               variant="*", version=None, title=title, text=f"{title}\n{text}"),
                        "rules reload")


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def _text(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc) or type(exc).__name__
