"""Durations as the rules file writes them (``30s``, ``1h30m``, ``250ms``) and as seconds.

The grammar is Prometheus' (units largest first, each at most once), so a duration that works
in an alerting rule works here too; a bare number is seconds because YAML hands us ``30`` as an
int and refusing it would only annoy.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration", "format_duration", "DURATION_FORMS"]

_UNITS: tuple[tuple[str, float], ...] = (
    ("w", 7 * 86400.0),
    ("d", 86400.0),
    ("h", 3600.0),
    ("m", 60.0),
    ("s", 1.0),
    ("ms", 0.001),
)
_SECONDS = dict(_UNITS)
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|w|d|h|m|s)")

DURATION_FORMS = (
    "a number of seconds or amounts with units w, d, h, m, s, ms, largest first "
    "(30s, 5m, 2h, 1d, 1h30m, 250ms)"
)


def parse_duration(value: object) -> float:
    """``value`` in seconds: a non-negative number, or a duration string such as ``1h30m``.

    Raises ``ValueError`` naming the accepted forms.
    """
    if isinstance(value, bool):  # bool is an int to Python, never a duration to a user
        raise ValueError(f"expected a duration, got {value!r}; use {DURATION_FORMS}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"a duration must be finite and >= 0, got {value!r}")
        return seconds
    if not isinstance(value, str):
        raise ValueError(f"expected a duration, got {type(value).__name__}; use {DURATION_FORMS}")
    text = value.strip()
    if text == "0":
        return 0.0
    if text.startswith("-"):
        raise ValueError(f"a duration must be >= 0, got {value!r}")
    total = 0.0
    pos = 0
    last_rank = -1
    ranks = {unit: i for i, (unit, _) in enumerate(_UNITS)}
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        unit = match.group(2)
        if ranks[unit] <= last_rank:
            raise ValueError(
                f"invalid duration {value!r}: units must appear largest first, each once; "
                f"use {DURATION_FORMS}"
            )
        last_rank = ranks[unit]
        total += float(match.group(1)) * _SECONDS[unit]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"invalid duration {value!r}; use {DURATION_FORMS}")
    return total


def format_duration(seconds: float) -> str:
    """The shortest spelling :func:`parse_duration` reads back: ``5400`` → ``1h30m``."""
    if seconds == 0:
        return "0s"
    millis = round(seconds * 1000)
    if millis < 0:
        return "-" + format_duration(-seconds)
    parts = []
    for unit, size in _UNITS:
        size_ms = round(size * 1000)
        amount, millis = divmod(millis, size_ms)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)
