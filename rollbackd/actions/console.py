"""The default notifier: a compact, human-readable notice on a text stream.

Rendering reads nothing but the :class:`Notice`, so the same notice prints the same bytes in a
live run, a replay and a test.
"""

from __future__ import annotations

import math
import sys
from datetime import datetime, timezone
from typing import TextIO

from rollbackd.actions.base import ActionResult, AlertSummary, Notice

__all__ = ["ConsoleNotifier", "format_notice", "utc_iso", "fmt_number"]

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


class ConsoleNotifier:
    """Prints notices to ``stream`` (``None``: whatever ``sys.stdout`` is when posting)."""

    def __init__(self, stream: TextIO | None = None, color: bool = False) -> None:
        self.stream = stream
        self.color = color

    def post(self, notice: Notice) -> ActionResult:
        thread = notice.thread or notice.incident_id
        stream = self.stream if self.stream is not None else sys.stdout
        try:
            stream.write(format_notice(notice, self.color))
            stream.flush()
        except (OSError, ValueError) as exc:  # closed or broken stream: a notice never blocks
            return ActionResult("failed", f"console: {type(exc).__name__}: {exc}", thread=thread)
        return ActionResult("succeeded", "printed", thread=thread)
