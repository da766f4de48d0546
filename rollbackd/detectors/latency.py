"""Serving latency: a high quantile of ``latency_ms`` over the window."""

from __future__ import annotations

import numpy as np

from rollbackd.detectors.base import Measurement, Window, register

__all__ = ["Latency"]


@register("latency")
class Latency:
    """The ``quantile`` of the window's latencies in milliseconds (numpy's linear method).

    ``value`` is that quantile, with no p-value; ``sample_size`` counts predictions that
    reported a latency. ``evidence``: p50, p95, p99, max and n.

    >>> from rollbackd.events import Prediction
    >>> preds = [Prediction(id=str(i), ts=float(i), deployment="d", model_version="v1",
    ...                     latency_ms=float(i)) for i in range(1, 101)]
    >>> det = Latency(threshold=250.0, quantile=0.5)
    >>> det.update(Window("d", "primary", 0.0, 60.0, preds))
    >>> m = det.evaluate(60.0)
    >>> m.value, m.evidence["p99"], m.evidence["max"]
    (50.5, 99.01, 100.0)
    """

    def __init__(self, threshold: float, min_samples: int = 1, quantile: float = 0.99) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if threshold < 0.0:
            raise ValueError(f"threshold must be >= 0 (milliseconds), got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.quantile = quantile
        self._reset()

    def _reset(self) -> None:
        self._latencies: np.ndarray | None = None

    def update(self, window: Window) -> None:
        self._latencies = window.latencies

    def evaluate(self, now: float) -> Measurement:
        lat = self._latencies
        if lat is None:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        n = int(lat.shape[0])
        if n == 0:
            return Measurement.insufficient_data(self.threshold, 0, "no latencies in window")
        if n < self.min_samples:
            return Measurement.insufficient_data(
                self.threshold, n, f"fewer than min_samples={self.min_samples} latencies"
            )
        # One partition serves all four quantiles; each equals its own np.quantile call.
        q, p50, p95, p99 = np.quantile(lat, [self.quantile, 0.5, 0.95, 0.99]).tolist()
        return Measurement(
            value=q,
            threshold=self.threshold,
            sample_size=n,
            evidence={"p50": p50, "p95": p95, "p99": p99, "max": float(lat.max()), "n": n},
        )
