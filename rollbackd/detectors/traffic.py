"""Traffic: how many predictions a window held. With ``direction: below`` and a threshold of
1 it is a no-data alert; with a higher one, a traffic-drop alert.

Its ``sample_size`` is the number of windows looked at (always 1): an empty window is the
very thing it measures, so it must never count as "insufficient data".
"""

from __future__ import annotations

from rollbackd.detectors.base import Measurement, Window, register

__all__ = ["Traffic"]


@register("traffic")
class Traffic:
    def __init__(self, threshold: float, min_samples: int = 1, per_second: bool = False) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0 predictions, got {threshold}")
        if min_samples > 1:
            raise ValueError(f"min_samples must be 0 or 1 for traffic (one window per evaluation), got {min_samples}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.per_second = per_second
        self._reset()

    # What a checkpoint keeps (daemon/snapshot.py).
    STATE = ("_last",)

    def _reset(self) -> None:
        # The last window's prediction count and span: all evaluate needs (not the window,
        # which would keep its predictions alive and in every checkpoint).
        self._last: tuple[int, float, float] | None = None

    def update(self, window: Window) -> None:
        self._last = (len(window.predictions), window.start, window.end)

    def evaluate(self, now: float) -> Measurement:
        if self._last is None:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        n, start, end = self._last
        span = max(end - start, 1e-9)
        value = n / span if self.per_second else float(n)
        return Measurement(value, self.threshold, 1, evidence={"predictions": n, "seconds": span})
