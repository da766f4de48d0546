"""The default notifier: a compact, human-readable notice on a text stream.

Rendering reads nothing but the :class:`Notice`, so the same notice prints the same bytes in a
live run, a replay and a test.

In a replay or a drill (``summarize_repeats``), an incident's repeat notices are folded: the
first is printed, the ones after it are counted and said in one line ("repeated 42 more times
between T1 and T2") when the incident's next other notice comes or the replay ends. They are
still due at the same event times and recorded in the decision log one by one, with the same
result: only what is printed changes. A replay of slow data, whose ``repeat_interval`` passes
in a few seconds of wall time, would otherwise print little else.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TextIO

from rollbackd.actions.base import ActionResult, AlertSummary, Notice

__all__ = ["ConsoleNotifier", "RepeatFolding", "RepeatRun", "format_notice", "utc_iso", "fmt_number"]

_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
_SEVERITY_COLORS = {"critical": "\x1b[31m", "warning": "\x1b[33m", "info": "\x1b[36m"}
_RESOLVED = "\x1b[32m"


def utc_iso(ts: float) -> str:
    """``2024-01-01T00:00:00Z`` (second precision); ``n/a`` for a non-finite time."""
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return "n/a"


def fmt_number(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color and code else text


def _alert_line(a: AlertSummary, color: bool) -> list[str]:
    code = _RESOLVED if a.state == "resolved" else _SEVERITY_COLORS.get(a.severity, "")
    head = _paint(f"{a.rule} ({a.severity}, {a.state})", code, color)
    parts = [
        f"value {fmt_number(a.value)}{' ' + a.where if a.where else ''} vs threshold {fmt_number(a.threshold)}",
        f"window {utc_iso(a.window_start)}/{utc_iso(a.window_end)}",
        f"n={a.sample_size}",
    ]
    if a.p_value is not None:
        parts.append(f"p={fmt_number(a.p_value, 3)}")
    lines = [f"  - {head}: {', '.join(parts)}"]
    if a.summary:
        lines.extend(f"      {line}" for line in a.summary.splitlines())
    return lines


def format_notice(notice: Notice, color: bool = False) -> str:
    """The notice as lines of text, ending in a newline."""
    drill = "[DRILL] " if notice.drill else ""
    header = f"{drill}{notice.kind.upper()} {notice.incident_id} at {utc_iso(notice.ts)}: {notice.title}"
    lines = [_paint(header, _BOLD, color)]
    if notice.kind != "digest":
        lines.append(
            f"  deployment {notice.deployment}, variant {notice.variant}, version {notice.version or 'unknown'}"
        )
    if notice.text and notice.text != notice.title:
        lines.extend(f"  {line}" for line in notice.text.splitlines())
    for alert in notice.alerts:
        lines.extend(_alert_line(alert, color))
    if notice.runbook:
        lines.append(f"  runbook: {notice.runbook}")
    return "\n".join(lines) + "\n"


@dataclass(slots=True)
class RepeatRun:
    """Repeat notices of one incident folded after the first printed one."""

    incident_id: str
    count: int = 0  # folded, not printed
    first: float | None = None  # event time of the first folded one
    last: float | None = None

    def line(self) -> str:
        """The summary line (``""`` when nothing was folded)."""
        if not self.count:
            return ""
        times = "time" if self.count == 1 else "times"
        return (f"REPEAT {self.incident_id}: repeated {self.count} more {times} between "
                f"{utc_iso(self.first)} and {utc_iso(self.last)} (not printed one by one)\n")


class RepeatFolding:
    """Which repeat notices to print: per incident the first of each run of repeats; the rest
    are counted into a :class:`RepeatRun` that ends at the incident's next other notice."""

    def __init__(self) -> None:
        self._runs: dict[str, RepeatRun] = {}

    def repeat(self, incident_id: str, ts: float) -> bool:
        """A repeat notice of ``incident_id`` at ``ts``: True to print it, False when folded."""
        run = self._runs.get(incident_id)
        if run is None:
            self._runs[incident_id] = RepeatRun(incident_id)
            return True
        run.count += 1
        run.first = ts if run.first is None else run.first
        run.last = ts
        return False

    def other(self, incident_id: str) -> str:
        """Another notice of ``incident_id``: the summary line of the run it ends (or ``""``)."""
        run = self._runs.pop(incident_id, None)
        return run.line() if run is not None else ""

    def end(self) -> str:
        """The summary lines of every run still going (at the end of a replay)."""
        runs, self._runs = self._runs, {}
        return "".join(run.line() for run in sorted(runs.values(), key=lambda r: (r.first or 0.0, r.incident_id)))


class ConsoleNotifier:
    """Prints notices to ``stream`` (``None``: whatever ``sys.stdout`` is when posting).

    ``summarize_repeats`` (replays and drills) folds repeat notices (see the module's
    docstring); :meth:`end` prints what is still folded. The result of a folded notice is the
    one printing it would have had, so the decision log does not change.
    """

    def __init__(self, stream: TextIO | None = None, color: bool = False, summarize_repeats: bool = False) -> None:
        self.stream = stream
        self.color = color
        self.folding = RepeatFolding() if summarize_repeats else None

    def post(self, notice: Notice) -> ActionResult:
        thread = notice.thread or notice.incident_id
        text = format_notice(notice, self.color)
        if self.folding is not None:
            if notice.kind == "repeat":
                if not self.folding.repeat(notice.incident_id, notice.ts):
                    return ActionResult("succeeded", "printed", thread=thread)
            else:
                text = self.folding.other(notice.incident_id) + text
        try:
            self._write(text)
        except (OSError, ValueError) as exc:  # closed or broken stream: a notice never blocks
            return ActionResult("failed", f"console: {type(exc).__name__}: {exc}", thread=thread)
        return ActionResult("succeeded", "printed", thread=thread)

    def end(self) -> None:
        """Print the summary lines of the repeat notices still folded (a replay's end)."""
        if self.folding is None:
            return
        text = self.folding.end()
        if text:
            try:
                self._write(text)
            except (OSError, ValueError):
                pass

    def _write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        stream.write(text)
        stream.flush()
