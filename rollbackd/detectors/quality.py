"""Data quality: a window's features against the reference's profile of them.

Presence, types, nulls, range and cardinality; a stream that stopped (no data) is the
``traffic`` detector's job.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from rollbackd.detectors.base import Measurement, Reference, Window, check_feature_names, register
from rollbackd.detectors.drift import (
    BASELINES,
    SCORE_COLUMN,
    Baseline,
    _column_kind,
    _is_categorical_type,
    _is_numeric_type,
)

__all__ = ["DataQuality", "QUALITY_CHECKS"]

QUALITY_CHECKS: tuple[str, ...] = (
    "missing_feature",
    "unexpected_feature",
    "type_change",
    "null_rate",
    "out_of_range",
    "cardinality",
)

_NONE = type(None)


class _ColumnStats(NamedTuple):
    n: int
    nulls: int  # None or NaN
    numeric: int  # non-NaN numbers (bools are not numbers)
    categorical: int  # str / bool
    values: np.ndarray  # the non-NaN numbers (±inf kept: they are out of any range)
    categories: Counter[Any] | None


def _column_stats(col: Sequence[Any] | np.ndarray, *, with_categories: bool) -> _ColumnStats:
    if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
        arr = col.astype(float, copy=False)
        nan = np.isnan(arr)
        n_nan = int(nan.sum())
        vals = arr[~nan] if n_nan else arr
        return _ColumnStats(int(arr.shape[0]), n_nan, int(vals.shape[0]), 0, vals, None)
    n = len(col)
    types = Counter(map(type, col))
    if all(t is _NONE or _is_numeric_type(t) for t in types):
        arr = np.array(col, dtype=float)  # None -> NaN
        nan = np.isnan(arr)
        n_nan = int(nan.sum())
        vals = arr[~nan]
        return _ColumnStats(n, n_nan, int(vals.shape[0]), 0, vals, None)
    arr = np.array([v for v in col if _is_numeric_type(type(v))], dtype=float)
    nan = np.isnan(arr)
    vals = arr[~nan]
    n_cat = sum(c for t, c in types.items() if _is_categorical_type(t))
    cats: Counter[Any] | None = None
    if with_categories and n_cat:
        cats = Counter(v for v in col if _is_categorical_type(type(v)))
    nulls = types.get(_NONE, 0) + int(nan.sum())
    return _ColumnStats(n, nulls, int(vals.shape[0]), n_cat, vals, cats)


class _Profile(NamedTuple):
    kind: str | None  # numeric, categorical, or None (no usable values: only presence is checked)
    null_rate: float
    wrong_kind_rate: float  # share of the non-null values not of ``kind``
    low: float
    high: float
    outside_rate: float  # the reference's own share outside [low, high]
    category_probs: np.ndarray  # categorical: the reference's category shares
    missing_mass: float  # categorical: Good–Turing's unseen share, singletons / values


class _Score(NamedTuple):
    score: float
    check: str
    feature: str
    window: float  # the window's figure: a rate, or a distinct count for cardinality
    reference: float  # the reference's


def _wrong_kind(stats: _ColumnStats, kind: str | None) -> int:
    non_null = stats.n - stats.nulls
    if kind == "numeric":
        return non_null - stats.numeric
    if kind == "categorical":
        return non_null - stats.categorical
    return 0


@register("data_quality")
class DataQuality:
    """Checks of each feature of a window against the reference's profile of it.

    Every check yields a score in [0, 1], *how much worse than the reference* the window is:

    - ``missing_feature``: a reference feature no event in the window carries;
      score ``1 − reference null rate`` (the share of values that should have been there);
    - ``unexpected_feature``: a window feature the reference lacks; score: the share of the
      window's events carrying a non-null value for it;
    - ``type_change``: values of the other kind (strings for a numeric feature, numbers for a
      categorical one); score: the window's share of such non-null values minus the
      reference's own share;
    - ``null_rate``: None/NaN; score: window null rate minus reference null rate;
    - ``out_of_range`` (numeric): values outside the reference's ``range_quantiles`` range
      (``[0, 1]``: ``[min, max]``); score: the window's share outside minus the reference's;
    - ``cardinality`` (categorical): distinct categories beyond those a sample of this size
      from the reference would show (``E = Σ_c 1 − (1 − p_c)^n`` plus ``n`` times the
      Good–Turing unseen share); score ``⌊distinct − E⌋ / distinct`` (whole categories in
      excess, per distinct category; 0 when fewer).

    Negative differences are 0. ``value`` (and ``effect_size``) is the largest score over all
    checks and features; a check *fails* when its score exceeds ``threshold``, and
    ``evidence.failing`` lists the failing ones (check, feature, score, the window's and the
    reference's figure), worst first. No p-value: these are descriptive rates. Windows with
    fewer than ``min_samples`` predictions get no verdict. The reference comes from
    ``baseline``, as for ``drift``.
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset (the
    # baseline's own declared state within it).
    STATE = ("_baseline", "_n", "_status", "_scores", "_checked")

    needs_reference = True

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        features: Sequence[str] | None = None,
        checks: Sequence[str] | None = None,
        range_quantiles: Sequence[float] = (0.0, 1.0),
        baseline: str | None = None,
        reference_size: int = 5000,
        rolling_windows: int = 10,
        max_evidence: int = 20,
        reference: Reference | None = None,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (a rate), got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        check_feature_names(features)
        if checks is not None and (
            isinstance(checks, str) or not checks or any(c not in QUALITY_CHECKS for c in checks)
        ):
            raise ValueError(
                f"checks must be a non-empty list of {', '.join(QUALITY_CHECKS)}; got {checks!r}"
            )
        rq = tuple(range_quantiles) if not isinstance(range_quantiles, str) else ()
        if len(rq) != 2 or not 0.0 <= rq[0] < rq[1] <= 1.0:
            raise ValueError(
                "range_quantiles must be [low, high] with 0 <= low < high <= 1, "
                f"got {range_quantiles!r}"
            )
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")
        if reference_size < 1:
            raise ValueError(f"reference_size must be >= 1, got {reference_size}")
        if rolling_windows < 1:
            raise ValueError(f"rolling_windows must be >= 1, got {rolling_windows}")
        if max_evidence < 0:
            raise ValueError(f"max_evidence must be >= 0, got {max_evidence}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.features = None if features is None else list(features)
        self.checks = list(QUALITY_CHECKS) if checks is None else list(dict.fromkeys(checks))
        self.range_quantiles = (float(rq[0]), float(rq[1]))
        self.baseline = baseline
        self.reference_size = reference_size
        self.rolling_windows = rolling_windows
        self.max_evidence = max_evidence
        self.reference = reference
        self._baseline: Baseline[dict[str, _Profile]] = Baseline(
            baseline or None,
            summarise=self._profile,
            reference=reference,
            reference_size=reference_size,
            rolling_windows=rolling_windows,
            names=self.features,
        )
        self._reset()

    def _reset(self) -> None:
        self._baseline._reset()
        self._n: int | None = None
        self._status: str | None = None
        self._scores: list[_Score] = []
        self._checked = 0

    # -- reference ---------------------------------------------------------------------------

    def _profile(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, _Profile]:
        names = [n for n in columns if n != SCORE_COLUMN]
        if self.features is not None:
            names = [n for n in self.features if n in columns]
        out: dict[str, _Profile] = {}
        lo_q, hi_q = self.range_quantiles
        for name in names:
            col = columns[name]
            kind = _column_kind(col)
            st = _column_stats(col, with_categories=kind == "categorical")
            null_rate = st.nulls / st.n if st.n else 1.0
            non_null = st.n - st.nulls
            wrong = _wrong_kind(st, kind) / non_null if non_null else 0.0
            low, high, outside = -math.inf, math.inf, 0.0
            probs, missing_mass = np.zeros(0), 0.0
            if kind == "numeric" and st.values.shape[0]:
                vals = st.values
                finite = vals[np.isfinite(vals)]
                if finite.shape[0]:
                    low, high = (float(v) for v in np.quantile(finite, [lo_q, hi_q]))
                    outside = float(np.count_nonzero((vals < low) | (vals > high))) / vals.shape[0]
            elif kind == "categorical" and st.categories:
                counts = np.fromiter(st.categories.values(), dtype=float)
                probs = counts / counts.sum()
                missing_mass = float(np.count_nonzero(counts == 1.0)) / float(counts.sum())
            out[name] = _Profile(kind, null_rate, wrong, low, high, outside, probs, missing_mass)
        return out

    # -- windows -----------------------------------------------------------------------------

    def update(self, window: Window) -> None:
        self._n = window.n
        self._scores, self._checked = [], 0
        state = self._baseline.admit(window, self.min_samples)
        self._status = "checked" if state == "ready" else state
        if state == "ready":
            self._check(window)

    def _check(self, window: Window) -> None:
        profiles = self._baseline.summary
        assert profiles is not None
        checks = set(self.checks)
        present = set(window.feature_names)
        n = window.n
        scores: list[_Score] = []

        def excess(check: str, name: str, win: float, ref: float) -> None:
            scores.append(_Score(max(0.0, win - ref), check, name, win, ref))

        for name, prof in profiles.items():
            if name not in present:
                if prof.kind is not None and "missing_feature" in checks:
                    excess("missing_feature", name, 1.0, prof.null_rate)
                continue
            wants_cats = prof.kind == "categorical" and "cardinality" in checks
            st = _column_stats(window.feature(name), with_categories=wants_cats)
            if "null_rate" in checks:
                excess("null_rate", name, st.nulls / n, prof.null_rate)
            non_null = n - st.nulls
            if prof.kind is None or non_null == 0:
                continue
            if "type_change" in checks:
                wrong = _wrong_kind(st, prof.kind) / non_null
                excess("type_change", name, wrong, prof.wrong_kind_rate)
            vals = st.values
            if prof.kind == "numeric" and "out_of_range" in checks and vals.shape[0]:
                outside = np.count_nonzero((vals < prof.low) | (vals > prof.high)) / vals.shape[0]
                excess("out_of_range", name, float(outside), prof.outside_rate)
            if wants_cats and st.categories:
                distinct = len(st.categories)
                size = st.categorical
                probs = prof.category_probs
                # E[distinct] of `size` draws from the reference, plus its unseen mass
                expected = float((-np.expm1(size * np.log1p(-probs))).sum()) + (
                    size * prof.missing_mass
                )
                extra = max(0, math.floor(distinct - expected))  # whole categories
                scores.append(
                    _Score(extra / distinct, "cardinality", name, float(distinct), expected)
                )
        if "unexpected_feature" in checks:
            for name in sorted(present - set(profiles) - {SCORE_COLUMN}):
                if self.features is not None and name not in self.features:
                    continue
                st = _column_stats(window.feature(name), with_categories=False)
                excess("unexpected_feature", name, (st.n - st.nulls) / n, 0.0)
        self._scores = scores
        self._checked = len(profiles)

    def evaluate(self, now: float) -> Measurement:
        status, n = self._status, self._n or 0
        waiting = self._baseline.not_tested(status, n, self.threshold, self.min_samples)
        if waiting is not None:
            return waiting
        ranked = sorted(self._scores, key=lambda s: (-s.score, s.feature, s.check))
        value = ranked[0].score if ranked else 0.0
        failing = [s._asdict() for s in ranked if s.score > self.threshold]
        evidence: dict[str, Any] = {
            "failing": failing[: self.max_evidence],
            "n_failing": len(failing),
            "features": self._checked,
            "checks": list(self.checks),
        }
        if ranked and value > 0.0:
            evidence["worst"] = {"check": ranked[0].check, "feature": ranked[0].feature}
        if self._baseline.mode == "previous_version":
            evidence["reference_version"] = self._baseline.version
        return Measurement(
            value=value,
            threshold=self.threshold,
            sample_size=n,
            effect_size=value,
            evidence=evidence,
        )
