"""Serving error rate: the share of predictions in a window that came back with an ``error``."""

from __future__ import annotations

from typing import Any

from scipy.stats import fisher_exact

from rollbackd.detectors.base import Measurement, Window, register
from rollbackd.detectors.seasonal import SeasonalStore, parse_period
from rollbackd.detectors.stats import (
    binomial_pvalue_greater,
    two_proportion_pvalue_greater,
    wilson_interval,
)
from rollbackd.rules.durations import format_duration

__all__ = ["ErrorRate"]

MODES = ("absolute", "baseline", "variant", "same_time")
TOP_ERROR_CODES = 5


@register("error_rate")
class ErrorRate:
    """Error rate of the last window, against a fixed ceiling or against a learned baseline.

    ``mode="absolute"``: ``value`` is the observed rate; ``p_value`` is the exact one-sided
    binomial test of H0: rate <= ``threshold``.

    ``mode="baseline"``: the first ``baseline_windows`` non-empty windows are pooled into a
    baseline rate p0 (no verdict meanwhile); afterwards ``value`` is the current rate minus p0,
    ``threshold`` is the allowed increase, and ``p_value`` comes from a one-sided pooled
    two-proportion z-test (current > baseline).

    ``mode="variant"``: the baseline is another arm of the same deployment in the same time
    window, ``window.siblings[baseline_variant]`` (default ``"stable"``): ``value`` is this
    window's rate minus that arm's, ``p_value`` the same one-sided pooled two-proportion z-test.
    No verdict when the arm is missing, has fewer than ``min_samples`` predictions, or is the
    window's own variant. Each window is a fresh fixed-level test; for a canary watched window
    after window, the ``canary`` detector's always-valid p-value is the sounder choice.

    ``mode="same_time"``: the baseline is the window that ended one ``period`` earlier (``1d``,
    ``7d``, seconds), so a daily or weekly cycle of the error rate is not a fault: ``value`` is
    this window's rate minus that window's, ``p_value`` the one-sided Fisher exact test (one
    earlier window often holds a handful of errors, where the z-test is too eager). No verdict when that window is missing (the first period, a gap) or
    has fewer than ``min_samples`` predictions. Two counts per window are kept for a period
    (:class:`~rollbackd.detectors.seasonal.SeasonalStore`).

    ``evidence``: errors, n, the Wilson interval of the current rate at ``confidence`` and
    the top error codes (at most five, by count then code).

    >>> from rollbackd.events import Prediction
    >>> preds = [Prediction(id=str(i), ts=float(i), deployment="d", model_version="v1",
    ...                     error="timeout" if i < 3 else None) for i in range(10)]
    >>> det = ErrorRate(threshold=0.05, min_samples=5)
    >>> det.update(Window("d", "primary", 0.0, 60.0, preds))
    >>> m = det.evaluate(60.0)
    >>> m.value, m.evidence["top_errors"]
    (0.3, {'timeout': 3})
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset.
    STATE = (
        "_seen", "_n", "_errors", "_codes", "_baseline_n", "_baseline_errors", "_baseline_count",
        "_in_baseline", "_sibling", "_store", "_earlier",
    )

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        mode: str = "absolute",
        baseline_windows: int = 10,
        confidence: float = 0.95,
        baseline_variant: str | None = None,
        period: float | str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if baseline_variant is not None and mode != "variant":
            raise ValueError(f"baseline_variant needs mode: variant (got mode {mode!r})")
        if baseline_variant is not None and not (
            isinstance(baseline_variant, str) and baseline_variant
        ):
            raise ValueError(f"baseline_variant must be a variant name, got {baseline_variant!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if baseline_windows < 1:
            raise ValueError(f"baseline_windows must be >= 1, got {baseline_windows}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        seconds = parse_period(period, mode == "same_time", "mode: same_time")
        self.threshold = threshold
        self.min_samples = min_samples
        self.mode = mode
        self.baseline_windows = baseline_windows
        self.confidence = confidence
        self.baseline_variant = baseline_variant
        self._arm = baseline_variant or "stable"
        self.period = period
        self._period = seconds
        # mode="same_time": (errors, n) of each window, by its end, for one period.
        self._store: SeasonalStore[tuple[int, int]] | None = (
            None if seconds is None else SeasonalStore(seconds)
        )
        self._reset()

    def _reset(self) -> None:
        self._seen = False
        self._n = 0
        self._errors = 0
        self._codes: dict[str, int] = {}
        self._baseline_n = 0
        self._baseline_errors = 0
        self._baseline_count = 0
        # The window that completes the baseline is part of it, so it is not tested either.
        self._in_baseline = False
        # mode="variant": (errors, n) of the baseline arm in this window, or why there is none.
        self._sibling: tuple[int, int] | str | None = None
        if self._store is not None:
            self._store._reset()
        # mode="same_time": (end, (errors, n)) of the window one period earlier, if kept.
        self._earlier: tuple[float, tuple[int, int]] | None = None

    def update(self, window: Window) -> None:
        codes = window.error_codes
        self._seen = True
        self._n = window.n
        self._errors = sum(codes.values())
        self._codes = codes
        self._in_baseline = False
        if self.mode == "variant":
            other = window.siblings.get(self._arm)
            if window.variant == self._arm:
                self._sibling = f"this is the baseline arm {self._arm!r}"
            elif other is None:
                self._sibling = f"no baseline arm {self._arm!r} in this window"
            else:
                self._sibling = (other.n_errors, other.n)
        if self._store is not None:
            self._earlier = self._store.get(window.end - self._period)
            self._store.put(window.end, (self._errors, self._n))
        if self.mode == "baseline" and self._baseline_count < self.baseline_windows and self._n:
            self._baseline_n += self._n
            self._baseline_errors += self._errors
            self._baseline_count += 1
            self._in_baseline = True

    def skip(self, window: Window) -> None:
        """A window that is not measured (:class:`~rollbackd.detectors.base.Skipping`): taken
        only by a baseline still being built or a store of earlier windows (same_time); the
        other modes read nothing but the window they test."""
        if self._store is not None or (
            self.mode == "baseline" and self._baseline_count < self.baseline_windows
        ):
            self.update(window)

    def evaluate(self, now: float) -> Measurement:
        n, k = self._n, self._errors
        if not self._seen:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        if self.mode == "baseline" and (
            self._in_baseline or self._baseline_count < self.baseline_windows
        ):
            return Measurement.insufficient_data(
                self.threshold,
                n,
                "building baseline",
                baseline_windows=self._baseline_count,
                baseline_n=self._baseline_n,
            )
        if n == 0:
            return Measurement.insufficient_data(self.threshold, 0, "no predictions in window")
        if n < self.min_samples:
            return Measurement.insufficient_data(
                self.threshold, n, f"fewer than min_samples={self.min_samples} predictions"
            )
        if self.mode == "variant":
            sib = self._sibling
            if isinstance(sib, str) or sib is None:
                return Measurement.insufficient_data(self.threshold, n, sib or "no window yet")
            if sib[1] == 0 or sib[1] < self.min_samples:
                return Measurement.insufficient_data(
                    self.threshold,
                    n,
                    f"baseline arm {self._arm!r} has fewer than "
                    f"min_samples={max(1, self.min_samples)} predictions",
                    baseline_n=sib[1],
                )
        if self._period is not None:
            label = f"same_time, period {format_duration(self._period)}"
            earlier = self._earlier
            if earlier is None or earlier[1][1] == 0:
                return Measurement.insufficient_data(
                    self.threshold, n, f"no window one period earlier ({label})"
                )
            if earlier[1][1] < self.min_samples:
                return Measurement.insufficient_data(
                    self.threshold,
                    n,
                    f"the window one period earlier has fewer than "
                    f"min_samples={self.min_samples} predictions ({label})",
                    baseline_n=earlier[1][1],
                )
        rate = k / n
        low, high = wilson_interval(k, n, self.confidence)
        evidence: dict[str, Any] = {
            "errors": k,
            "n": n,
            "wilson_low": low,
            "wilson_high": high,
        }
        if self.mode == "absolute":
            value = rate
            p_value = binomial_pvalue_greater(k, n, self.threshold)
        elif self.mode == "same_time":
            end0, (k0, n0) = self._earlier  # type: ignore[misc]
            value = rate - k0 / n0
            # One earlier window is a small baseline, often with a handful of errors, where
            # the z-test's normal approximation is too eager: Fisher's exact test, one-sided.
            p_value = float(fisher_exact([[k, n - k], [k0, n0 - k0]], alternative="greater")[1])
            evidence.update(
                baseline_end=end0,
                baseline_rate=k0 / n0,
                baseline_errors=k0,
                baseline_n=n0,
                test="fisher_exact",
            )
        elif self.mode == "variant":
            k0, n0 = self._sibling  # type: ignore[misc]
            value = rate - k0 / n0
            z, p_value = two_proportion_pvalue_greater(k, n, k0, n0)
            evidence.update(
                baseline_variant=self._arm,
                baseline_rate=k0 / n0,
                baseline_errors=k0,
                baseline_n=n0,
                z=z,
            )
        else:
            p0 = self._baseline_errors / self._baseline_n
            value = rate - p0
            z, p_value = two_proportion_pvalue_greater(
                k, n, self._baseline_errors, self._baseline_n
            )
            evidence.update(
                baseline_rate=p0,
                baseline_errors=self._baseline_errors,
                baseline_n=self._baseline_n,
                z=z,
            )
        top = sorted(self._codes.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ERROR_CODES]
        evidence["top_errors"] = dict(top)
        return Measurement(
            value=value,
            threshold=self.threshold,
            sample_size=n,
            p_value=p_value,
            evidence=evidence,
        )
