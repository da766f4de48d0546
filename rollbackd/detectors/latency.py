"""Serving latency: a high quantile of ``latency_ms`` over the window, exact or from a sketch."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from rollbackd.detectors.base import Measurement, Window, register

__all__ = ["Latency", "LogSketch", "ESTIMATORS"]

ESTIMATORS = ("exact", "sketch")


class LogSketch:
    """A mergeable quantile sketch with relative accuracy ``alpha`` (DDSketch's log buckets).

    A value ``x > min_value`` lands in bucket ``i = ceil(log_γ x)`` with
    ``γ = (1 + α) / (1 - α)``, which holds ``(γ^(i-1), γ^i]``; the bucket's representative
    ``2 γ^i / (γ + 1)`` is within ``α·x`` of every value in it. Values ``<= min_value`` are
    counted in a zero bucket, reported as 0. :meth:`quantile` returns the representative of
    the bucket holding the order statistic of rank ``floor(q (n - 1))`` (0-based), so it is
    within relative error ``α`` of that element of the sorted data (Masson, Rim & Lee, VLDB
    2019). Sketches with the same ``alpha`` merge by adding counts, and a merge equals the
    sketch of the concatenated data exactly, which is what lets panes be summarised once and
    combined into any window that covers them. Memory: one counter per occupied bucket, about
    ``log(max/min) / log γ`` (≈ 1,200 for 1 µs..1 h at α = 1%).
    """

    __slots__ = ("alpha", "min_value", "_gamma_log", "_counts", "_zeros", "count", "min", "max")

    def __init__(self, alpha: float = 0.01, min_value: float = 1e-9) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not min_value > 0.0:
            raise ValueError(f"min_value must be > 0, got {min_value}")
        self.alpha = alpha
        self.min_value = min_value
        self._gamma_log = math.log((1.0 + alpha) / (1.0 - alpha))
        self._counts: dict[int, int] = {}
        self._zeros = 0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def add_many(self, values: np.ndarray) -> None:
        """Add finite, non-negative values."""
        values = np.asarray(values, dtype=float)
        if values.shape[0] == 0:
            return
        if not np.all(np.isfinite(values)) or values.min() < 0.0:
            raise ValueError("LogSketch takes finite values >= 0")
        big = values[values > self.min_value]
        self._zeros += int(values.shape[0] - big.shape[0])
        if big.shape[0]:
            keys, counts = np.unique(
                np.ceil(np.log(big) / self._gamma_log).astype(np.int64), return_counts=True
            )
            c = self._counts
            for k, v in zip(keys.tolist(), counts.tolist()):
                c[k] = c.get(k, 0) + v
        self.count += int(values.shape[0])
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    def merge(self, other: "LogSketch") -> None:
        """Add ``other``'s counts to this sketch (both must have the same ``alpha``)."""
        if other.alpha != self.alpha or other.min_value != self.min_value:
            raise ValueError("only sketches with the same alpha and min_value merge")
        c = self._counts
        for k, v in other._counts.items():
            c[k] = c.get(k, 0) + v
        self._zeros += other._zeros
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantiles(self, qs: list[float]) -> list[float]:
        """The sketch's estimate of each quantile in ``qs`` (NaN when empty)."""
        if self.count == 0:
            return [math.nan] * len(qs)
        keys = sorted(self._counts)
        cum = np.cumsum([self._counts[k] for k in keys]) + self._zeros
        out = []
        g = math.exp(self._gamma_log)
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q}")
            rank = math.floor(q * (self.count - 1))
            if rank < self._zeros:
                out.append(0.0)
                continue
            i = int(np.searchsorted(cum, rank, side="right"))
            estimate = 2.0 * math.exp(keys[i] * self._gamma_log) / (g + 1.0)
            # The extreme buckets are clamped to the exact extremes (never further from them).
            out.append(min(max(estimate, self.min), self.max))
        return out

    def quantile(self, q: float) -> float:
        return self.quantiles([q])[0]

    @property
    def buckets(self) -> int:
        return len(self._counts) + (1 if self._zeros else 0)

    def to_record(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "min_value": self.min_value,
            "zeros": self._zeros,
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "buckets": {str(k): v for k, v in sorted(self._counts.items())},
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "LogSketch":
        s = cls(rec["alpha"], rec["min_value"])
        s._zeros = int(rec["zeros"])
        s.count = int(rec["count"])
        s.min, s.max = float(rec["min"]), float(rec["max"])
        s._counts = {int(k): int(v) for k, v in rec["buckets"].items()}
        return s


@register("latency")
class Latency:
    """The ``quantile`` of the window's latencies in milliseconds.

    ``estimator: exact`` (default) is numpy's linear-interpolation quantile of the window's
    values. ``estimator: sketch`` reads it from a :class:`LogSketch` of relative accuracy
    ``relative_accuracy``: the window is cut into panes of ``pane`` seconds (aligned to the
    epoch, like rollbackd's windows), each closed pane is summarised once, and a window's
    sketch is the merge of its panes' sketches, so a sliding window (``size: 1h, step: 1m``)
    costs one new pane per step instead of an hour of values. When the window's edges are not
    multiples of ``pane``, the window is sketched whole. The sketch's answer is within
    ``relative_accuracy`` (relative) of the order statistic of rank ``floor(q (n-1))``, not
    numpy's interpolated value.

    ``value`` is that quantile, with no p-value; ``sample_size`` counts predictions that
    reported a latency. ``evidence``: p50, p95, p99, max and n (and the estimator).

    >>> from rollbackd.events import Prediction
    >>> preds = [Prediction(id=str(i), ts=float(i), deployment="d", model_version="v1",
    ...                     latency_ms=float(i)) for i in range(1, 101)]
    >>> det = Latency(threshold=250.0, quantile=0.5)
    >>> det.update(Window("d", "primary", 0.0, 60.0, preds))
    >>> m = det.evaluate(60.0)
    >>> m.value, m.evidence["p99"], m.evidence["max"]
    (50.5, 99.01, 100.0)
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset.
    STATE = ("_latencies", "_sketch", "_panes", "_merged")

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        quantile: float = 0.99,
        estimator: str = "exact",
        relative_accuracy: float = 0.01,
        pane: float = 60.0,
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if threshold < 0.0:
            raise ValueError(f"threshold must be >= 0 (milliseconds), got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
        if not 0.0 < relative_accuracy < 0.5:
            raise ValueError(f"relative_accuracy must be in (0, 0.5), got {relative_accuracy}")
        if not (isinstance(pane, (int, float)) and pane > 0):
            raise ValueError(f"pane must be > 0 seconds, got {pane!r}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.quantile = quantile
        self.estimator = estimator
        self.relative_accuracy = relative_accuracy
        self.pane = float(pane)
        self._reset()

    def _reset(self) -> None:
        self._latencies: np.ndarray | None = None
        self._sketch: LogSketch | None = None
        self._panes: dict[int, LogSketch] = {}
        self._merged = 0

    def update(self, window: Window) -> None:
        if self.estimator == "exact":
            self._latencies = window.latencies
            return
        self._sketch = self._window_sketch(window)

    def skip(self, window: Window) -> None:
        """A window that is not measured (:class:`~rollbackd.detectors.base.Skipping`): the
        exact quantile reads nothing but the window it tests; the sketch keeps its panes'
        summaries (and says how many it reused), so it takes the window."""
        if self.estimator == "sketch":
            self.update(window)

    def _window_sketch(self, window: Window) -> LogSketch:
        first, last = window.start / self.pane, window.end / self.pane
        if first != math.floor(first) or last != math.floor(last):
            sketch = LogSketch(self.relative_accuracy)
            sketch.add_many(window.latencies)
            self._merged = 0
            return sketch
        lo, hi = int(first), int(last)
        # Closed panes never change (the window closed after the watermark passed them), so
        # a pane summarised for an earlier window is reused as is.
        self._panes = {i: s for i, s in self._panes.items() if lo <= i < hi}
        missing = set(range(lo, hi)) - set(self._panes)
        if missing:
            rows = [
                (p.ts, p.latency_ms)
                for p in window.predictions
                if p.latency_ms is not None and int(p.ts // self.pane) in missing
            ]
            ts = np.array([r[0] for r in rows], dtype=float)
            lat = np.array([r[1] for r in rows], dtype=float)
            idx = np.floor(ts / self.pane).astype(np.int64)
            for i in missing:
                s = self._panes[i] = LogSketch(self.relative_accuracy)
                s.add_many(lat[idx == i])
        sketch = LogSketch(self.relative_accuracy)
        for i in range(lo, hi):
            sketch.merge(self._panes[i])
        self._merged = hi - lo - len(missing)
        return sketch

    def evaluate(self, now: float) -> Measurement:
        if self.estimator == "sketch":
            return self._evaluate_sketch()
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

    def _evaluate_sketch(self) -> Measurement:
        s = self._sketch
        if s is None:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        n = s.count
        if n == 0:
            return Measurement.insufficient_data(self.threshold, 0, "no latencies in window")
        if n < self.min_samples:
            return Measurement.insufficient_data(
                self.threshold, n, f"fewer than min_samples={self.min_samples} latencies"
            )
        q, p50, p95, p99 = s.quantiles([self.quantile, 0.5, 0.95, 0.99])
        return Measurement(
            value=q,
            threshold=self.threshold,
            sample_size=n,
            evidence={
                "p50": p50, "p95": p95, "p99": p99, "max": s.max, "n": n,
                "estimator": "sketch", "relative_accuracy": self.relative_accuracy,
                "buckets": s.buckets, "panes_reused": self._merged,
            },
        )
