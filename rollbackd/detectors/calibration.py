"""Calibration of a binary model's ``score`` on the outcomes (labels) that arrived in the window."""

from __future__ import annotations

from collections import deque
from operator import attrgetter
from typing import Any, Sequence

import numpy as np

from rollbackd.detectors.base import Labeled, Measurement, Window, register
from rollbackd.detectors.model_error import binary_value
from rollbackd.detectors.stats import (
    BINNINGS,
    brier_score,
    calibration_bins,
    ece_resampled,
    expected_calibration_error,
    spiegelhalter_z,
)

__all__ = ["Calibration", "METRICS", "BASELINES", "usable_pairs"]

METRICS = ("ece", "brier", "spiegelhalter", "ece_drift")
BASELINES = ("first_windows", "previous_version")
MAX_RESAMPLES = 10_000


_get_score = attrgetter("score")
_get_label = attrgetter("label")
_get_version = attrgetter("model_version")
_NUMERIC = (bool, int, float)


def usable_pairs(
    outcomes: Sequence[Labeled], with_versions: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Scores, 0/1 labels (and model versions) of the outcomes that have both; the rest's count."""
    n = len(outcomes)
    if not n:
        return np.empty(0), np.empty(0), [], 0
    # One C-level pass per column: a missing score becomes nan.
    p = np.fromiter(map(_get_score, outcomes), float, n)
    y = _binary_labels(outcomes)
    bad = np.isnan(p) | np.isnan(y)
    if not bad.any():
        return p, y, list(map(_get_version, outcomes)) if with_versions else [], 0
    ok = ~bad
    versions: list[str] = []
    if with_versions:
        versions = [v for v, keep in zip(map(_get_version, outcomes), ok.tolist()) if keep]
    return p[ok], y[ok], versions, n - int(np.count_nonzero(ok))


def _binary_labels(outcomes: Sequence[Labeled]) -> np.ndarray:
    """Labels as :func:`binary_value` reads them, as floats (nan where it gives None)."""
    try:
        # bool (or int) labels, the usual case: bytes() converts them in one C loop and
        # raises on anything else (floats, strings, None, negative or large ints).
        codes = np.frombuffer(bytes(map(_get_label, outcomes)), dtype=np.uint8)
    except (TypeError, ValueError):
        pass
    else:
        y = codes.astype(float)
        if codes.max() > 1:
            y[codes > 1] = np.nan
        return y
    raw = list(map(_get_label, outcomes))
    # A label column holds a handful of distinct values: read each spelling once.
    codes_of = {v: binary_value(v) for v in set(raw)}
    if all(type(v) in _NUMERIC and codes_of[v] == v for v in codes_of):
        return np.array(raw, dtype=float)  # already 0/1 (ints or floats): no lookups
    return np.array([codes_of[v] for v in raw], dtype=float)  # None -> nan


@register("calibration")
class Calibration:
    """How well the window's scores match the observed frequency of the positive label.

    Each usable outcome is a (``score``, label) pair: ``score`` is read as P(label = 1) and the
    label as 0/1 (see :func:`~rollbackd.detectors.model_error.binary_value`); outcomes missing
    either are counted as ``unusable``. ``metric`` decides ``value``:

    - ``ece``: expected calibration error ``sum_b n_b/n |mean(y_b) - mean(p_b)|`` over ``bins``
      equal-width (``binning: width``) or equal-mass (``binning: mass``) bins; no p-value.
    - ``brier``: mean of ``(p - y)^2``; no p-value.
    - ``spiegelhalter``: ``|Z|`` of Spiegelhalter's test,
      ``Z = sum (y - p)(1 - 2p) / sqrt(sum (1 - 2p)^2 p (1 - p))``; ``p_value`` is two-sided
      for H0 "calibrated".
    - ``ece_drift``: the window's ECE minus the ECE expected of a window of the same scores
      calibrated *like the baseline*. The null is consistency resampling: labels are drawn
      ``resamples`` times as Bernoulli(``p + gap_b``), ``gap_b`` being the baseline's
      mean(y - p) in the baseline bin of ``p``; this also removes the small-sample bias of
      ECE, which a plain difference of ECEs would report as drift. ``p_value`` is
      ``(1 + #{null ECE >= ECE}) / (resamples + 1)``; ``evidence.drift_lower`` is a basic
      bootstrap lower bound (at ``confidence``) on the drift, resampling the window's pairs.
      The generator is seeded with ``seed`` at every evaluation: a replay gets the same answer.

    The baseline (``ece_drift`` only) is, with ``baseline: first_windows``, the labels of the
    first ``baseline_windows`` windows holding at least ``min_samples`` usable labels (at most
    ``baseline_size``; those windows are not tested); with ``baseline: previous_version``, the
    latest ``baseline_size`` labels of the model version that served before the current one
    (the current one being the version of the newest prediction among the labels). Then only
    the current version's labels are measured, and nothing is tested until a second version
    has been seen.

    Every measurement, sufficient or not, carries ``label_coverage`` (labels per prediction in
    the window) in its evidence, and the ECE, Brier score and Spiegelhalter Z of the window.
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset.
    STATE = (
        "_seen", "_p", "_y", "_unusable", "_coverage", "_in_baseline", "_base_p", "_base_y",
        "_base_windows", "_base_n", "_current", "_previous", "_latest_ts", "_by_version",
    )

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        metric: str = "ece",
        bins: int = 10,
        binning: str = "width",
        baseline: str = "first_windows",
        baseline_windows: int = 10,
        baseline_size: int = 10_000,
        resamples: int = 200,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        if binning not in BINNINGS:
            raise ValueError(f"binning must be one of {', '.join(BINNINGS)}; got {binning!r}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")
        if not isinstance(bins, int) or not 1 <= bins <= 1000:
            raise ValueError(f"bins must be an integer in [1, 1000], got {bins!r}")
        if metric in ("ece", "brier") and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] for metric {metric}, got {threshold}")
        if metric == "spiegelhalter" and threshold < 0.0:
            raise ValueError(
                f"threshold must be >= 0 (|Z|) for metric spiegelhalter, got {threshold}"
            )
        if metric == "ece_drift" and not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1] for metric ece_drift, got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if baseline_windows < 1:
            raise ValueError(f"baseline_windows must be >= 1, got {baseline_windows}")
        if baseline_size < 1:
            raise ValueError(f"baseline_size must be >= 1, got {baseline_size}")
        if not isinstance(resamples, int) or not 10 <= resamples <= MAX_RESAMPLES:
            raise ValueError(
                f"resamples must be an integer in [10, {MAX_RESAMPLES}], got {resamples!r}"
            )
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.metric = metric
        self.bins = bins
        self.binning = binning
        self.baseline = baseline
        self.baseline_windows = baseline_windows
        self.baseline_size = baseline_size
        self.resamples = resamples
        self.confidence = confidence
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self._seen = False
        self._p = np.empty(0)
        self._y = np.empty(0)
        self._unusable = 0
        self._coverage: float | None = None
        self._in_baseline = False
        # first_windows: pooled pairs of the first windows
        self._base_p: list[np.ndarray] = []
        self._base_y: list[np.ndarray] = []
        self._base_windows = 0
        self._base_n = 0
        # previous_version: the latest pairs of the current and of the previous version
        self._current: str | None = None
        self._previous: str | None = None
        self._latest_ts = -np.inf
        self._by_version: dict[str, deque[tuple[float, float]]] = {}

    @property
    def _need(self) -> int:
        return max(1, self.min_samples)

    def update(self, window: Window) -> None:
        self._seen = True
        self._coverage = window.label_coverage
        self._in_baseline = False
        by_version = self.metric == "ece_drift" and self.baseline == "previous_version"
        p, y, versions, unusable = usable_pairs(window.outcomes, with_versions=by_version)
        self._unusable = unusable
        if by_version:
            p, y = self._by_version_update(window.outcomes, p, y, versions)
        self._p, self._y = p, y
        if (
            self.metric == "ece_drift"
            and self.baseline == "first_windows"
            and self._base_windows < self.baseline_windows
            and p.shape[0] >= self._need
        ):
            room = self.baseline_size - self._base_n
            if room > 0:
                self._base_p.append(p[:room])
                self._base_y.append(y[:room])
                self._base_n += min(room, p.shape[0])
            self._base_windows += 1
            self._in_baseline = True

    def _by_version_update(
        self, outcomes: Sequence[Labeled], p: np.ndarray, y: np.ndarray, versions: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        # The current version is that of the newest prediction labelled so far: labels of
        # the old version keep arriving for a while after a deploy.
        newest = max(
            (o for o in outcomes if binary_value(o.label) is not None and o.score is not None),
            key=lambda o: o.pred_ts,
            default=None,
        )
        if newest is not None and newest.pred_ts >= self._latest_ts:
            self._latest_ts = newest.pred_ts
            if newest.model_version != self._current:
                if self._current is not None:
                    self._previous = self._current
                self._current = newest.model_version
                for v in [v for v in self._by_version if v not in (self._current, self._previous)]:
                    del self._by_version[v]
        keep = (self._current, self._previous)
        mine = np.array([v == self._current for v in versions], dtype=bool)
        for pi, yi, v in zip(p.tolist(), y.tolist(), versions):
            if v in keep:
                buf = self._by_version.get(v)
                if buf is None:
                    buf = self._by_version[v] = deque(maxlen=self.baseline_size)
                buf.append((pi, yi))
        return p[mine], y[mine]

    def _baseline_pairs(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.baseline == "first_windows":
            if self._base_windows < self.baseline_windows or self._in_baseline:
                return None
            return np.concatenate(self._base_p), np.concatenate(self._base_y)
        if self._previous is None or not self._by_version.get(self._previous):
            return None
        pairs = np.array(self._by_version[self._previous], dtype=float)
        return pairs[:, 0], pairs[:, 1]

    def evaluate(self, now: float) -> Measurement:
        if not self._seen:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        p, y = self._p, self._y
        n = int(p.shape[0])
        base: dict[str, Any] = {
            "n": n,
            "unusable": self._unusable,
            "label_coverage": self._coverage,
        }
        if self.metric == "ece_drift" and self.baseline == "previous_version":
            base["version"] = self._current
        if n < self._need:
            reason = (
                "no usable labels in window"
                if n == 0
                else f"fewer than min_samples={self.min_samples} usable labels"
            )
            return Measurement.insufficient_data(self.threshold, n, reason, **base)
        ece = expected_calibration_error(p, y, self.bins, self.binning)
        brier = brier_score(p, y)
        z, pz = spiegelhalter_z(p, y)
        evidence = {
            **base,
            "ece": ece,
            "brier": brier,
            "spiegelhalter_z": z,
            "spiegelhalter_p": pz,
            "mean_score": float(p.sum() / n),  # = mean(), without its overhead
            "positive_rate": float(y.sum() / n),
            "bins": self.bins,
            "binning": self.binning,
        }
        if self.metric == "ece":
            return Measurement(ece, self.threshold, n, evidence=evidence)
        if self.metric == "brier":
            return Measurement(brier, self.threshold, n, evidence=evidence)
        if self.metric == "spiegelhalter":
            return Measurement(abs(z), self.threshold, n, p_value=pz, evidence=evidence)
        baseline = self._baseline_pairs()
        if baseline is None:
            reason = (
                "building baseline"
                if self.baseline == "first_windows"
                else "no previous version yet"
            )
            return Measurement.insufficient_data(
                self.threshold,
                n,
                reason,
                **evidence,
                baseline=self.baseline,
                baseline_windows=self._base_windows,
                baseline_n=self._base_n,
            )
        return self._drift(p, y, ece, baseline, evidence)

    def _drift(
        self,
        p: np.ndarray,
        y: np.ndarray,
        ece: float,
        baseline: tuple[np.ndarray, np.ndarray],
        evidence: dict[str, Any],
    ) -> Measurement:
        bp, by = baseline
        # The baseline's calibration map: its mean gap y - p in each of its own bins.
        if self.binning == "width":
            idx = calibration_bins(bp, self.bins, "width")
            where = calibration_bins(p, self.bins, "width")
        else:
            idx = calibration_bins(bp, self.bins, "mass")
            order = np.sort(bp)
            cuts = np.cumsum(np.bincount(idx, minlength=self.bins))[:-1]
            edges = order[np.minimum(cuts, order.shape[0] - 1)]
            where = np.searchsorted(edges, p, side="right")
        sums = np.bincount(idx, weights=by - bp, minlength=self.bins)
        counts = np.bincount(idx, minlength=self.bins)
        gap = np.divide(sums, counts, out=np.zeros(self.bins), where=counts > 0)
        g = np.clip(p + gap[where], 0.0, 1.0)

        rng = np.random.default_rng(self.seed)
        n = p.shape[0]
        window_bins = calibration_bins(p, self.bins, self.binning)
        labels = (rng.random((self.resamples, n)) < g).astype(float)
        null = ece_resampled(window_bins, p, labels, self.bins)
        null_mean = float(null.mean())
        p_value = float((1 + np.count_nonzero(null >= ece)) / (self.resamples + 1))
        pick = rng.integers(0, n, size=(self.resamples, n))
        boot = ece_resampled(window_bins[pick], p[pick], y[pick], self.bins)
        drift = ece - null_mean
        lower = 2.0 * ece - float(np.quantile(boot, self.confidence)) - null_mean
        evidence.update(
            baseline=self.baseline,
            baseline_n=int(bp.shape[0]),
            baseline_ece=expected_calibration_error(bp, by, self.bins, self.binning),
            null_ece_mean=null_mean,
            null_ece_upper=float(np.quantile(null, self.confidence)),
            drift_lower=lower,
            resamples=self.resamples,
            seed=self.seed,
        )
        if self.baseline == "previous_version":
            evidence["baseline_version"] = self._previous
        return Measurement(
            drift,
            self.threshold,
            n,
            p_value=p_value,
            effect_size=drift,
            evidence=evidence,
        )
