"""Multi-window, multi-burn-rate SLO alerts (Google SRE workbook, "Alerting on SLOs", method 6)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Sequence

from rollbackd.detectors.base import Measurement, Window, register
from rollbackd.rules.durations import format_duration, parse_duration

__all__ = ["BurnRate", "DEFAULT_WINDOWS"]

# (long window, short window, burn factor): the workbook's page-worthy pairs. 14.4 over an
# hour spends 2% of a 30-day budget; 6 over six hours spends 5%.
DEFAULT_WINDOWS: tuple[tuple[str, str, float], ...] = (("1h", "5m", 14.4), ("6h", "30m", 6.0))
MAX_BUCKETS = 1_000_000
_EPS = 1e-9


def _pairs(windows: Any) -> tuple[tuple[float, float, float], ...]:
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or not windows:
        raise ValueError(
            f"windows must be a non-empty list of [long, short, factor], got {windows!r}"
        )
    out = []
    for i, item in enumerate(windows):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
            raise ValueError(f"windows[{i}] must be [long, short, factor], got {item!r}")
        try:
            long, short = parse_duration(item[0]), parse_duration(item[1])
        except ValueError as exc:
            raise ValueError(f"windows[{i}]: {exc}") from None
        factor = item[2]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"windows[{i}]: the burn factor must be a number > 0, got {factor!r}")
        if not 0 < short < long:
            raise ValueError(
                f"windows[{i}]: need 0 < short < long, got long={item[0]!r}, short={item[1]!r}"
            )
        out.append((long, short, float(factor)))
    return tuple(out)


@register("burn_rate")
class BurnRate:
    """How fast the error budget of an SLO burns, over pairs of a long and a short window.

    A request is *bad* when it came back with an ``error`` (or, with ``latency_ms`` set, also
    when it took longer than that). Over a lookback ``L`` ending at ``now``, the burn rate is
    ``(bad / requests) / (1 - slo)``: 1 spends the budget exactly over the SLO period. A pair
    ``[long, short, factor]`` breaches when *both* its long and its short burn rate exceed
    ``factor``: the long window proves the burn is significant, the short one that it is still
    going on, so the alert resets minutes after the fault ends.

    ``value`` is ``max over pairs of min(long burn, short burn) / factor``, so the rule's
    ``threshold`` is 1 ("page") and ``for`` should be 0: the long window already does the
    waiting. No p-value. ``sample_size`` is the requests in the longest lookback; a pair whose
    short window holds fewer than ``max(1, min_samples)`` requests is not judged, and with no
    judged pair the measurement is insufficient. ``evidence.pairs`` lists every pair's burn
    rates, request counts and the seconds of data each lookback actually covers (less than
    its length while rollbackd is starting up).

    The detector keeps the counts of the closed windows it is fed (one ``(start, end,
    requests, bad)`` entry each, at most the longest lookback's worth), so feed it small
    tumbling windows (``window: {size: 1m}``): a lookback holds the windows that lie entirely
    within it, and a window overlapping the previous one is ignored.
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset.
    STATE = ("_buckets", "_last_end")

    def __init__(
        self,
        threshold: float = 1.0,
        min_samples: int = 1,
        slo: float = 0.999,
        windows: Sequence[Sequence[Any]] = DEFAULT_WINDOWS,
        latency_ms: float | None = None,
    ) -> None:
        if not (isinstance(slo, (int, float)) and 0.0 < slo < 1.0):
            raise ValueError(f"slo must be in (0, 1), e.g. 0.999; got {slo!r}")
        if not threshold > 0.0:
            raise ValueError(
                f"threshold must be > 0 (1.0 pages at the burn factor), got {threshold}"
            )
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if latency_ms is not None and not (
            isinstance(latency_ms, (int, float)) and latency_ms >= 0
        ):
            raise ValueError(f"latency_ms must be >= 0 (milliseconds), got {latency_ms!r}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.slo = slo
        self.windows = windows
        self.latency_ms = latency_ms
        self._pairs = _pairs(windows)
        self._longest = max(max(long, short) for long, short, _ in self._pairs)
        self._reset()

    def _reset(self) -> None:
        self._buckets: deque[tuple[float, float, int, int]] = deque(maxlen=MAX_BUCKETS)
        self._last_end = -math.inf

    def _bad(self, window: Window) -> int:
        if self.latency_ms is None:
            return window.n_errors
        slow = self.latency_ms
        return sum(
            1
            for p in window.predictions
            if p.error is not None or (p.latency_ms is not None and p.latency_ms > slow)
        )

    def update(self, window: Window) -> None:
        if window.start < self._last_end - _EPS:
            return
        self._last_end = window.end
        self._buckets.append((window.start, window.end, window.n, self._bad(window)))
        horizon = window.end - self._longest - _EPS
        while self._buckets and self._buckets[0][0] < horizon:
            self._buckets.popleft()

    def _sums(self, now: float, lookback: float) -> tuple[int, int, float]:
        n = bad = 0
        covered = 0.0
        since = now - lookback - _EPS
        for start, end, count, errors in reversed(self._buckets):
            if start < since:
                break
            if end <= now + _EPS:
                n += count
                bad += errors
                covered += end - start
        return n, bad, covered

    def evaluate(self, now: float) -> Measurement:
        if not self._buckets:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        budget = 1.0 - self.slo
        need = max(1, self.min_samples)
        pairs: list[dict[str, Any]] = []
        best: float | None = None
        for long, short, factor in self._pairs:
            row: dict[str, Any] = {
                "long": format_duration(long),
                "short": format_duration(short),
                "factor": factor,
            }
            judged = True
            for name, lookback in (("long", long), ("short", short)):
                n, bad, covered = self._sums(now, lookback)
                burn = (bad / n) / budget if n else None
                row.update({f"{name}_burn": burn, f"{name}_n": n, f"{name}_bad": bad,
                            f"{name}_covered": covered})
                judged = judged and n >= need
            if judged:
                score = min(row["long_burn"], row["short_burn"]) / factor
                row["breaching"] = score > 1.0
                best = score if best is None else max(best, score)
            else:
                row["breaching"] = None
            pairs.append(row)
        sample = self._sums(now, self._longest)[0]
        if best is None:
            return Measurement.insufficient_data(
                self.threshold,
                sample,
                f"fewer than {need} requests in every short window",
                slo=self.slo,
                pairs=pairs,
            )
        return Measurement(
            best, self.threshold, sample, evidence={"slo": self.slo, "pairs": pairs}
        )
