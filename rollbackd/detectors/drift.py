"""Input (and optionally score) drift: per-feature two-sample tests of a window against a reference."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from rollbackd.detectors.base import Measurement, Reference, Window, register
from rollbackd.detectors.stats import (
    CORRECTIONS,
    adjust_pvalues,
    chi2_2xk,
    chi2_pvalues,
    cramers_v,
    ks_pvalues,
    ks_statistic,
    sorted_rank,
)

__all__ = ["Drift", "SCORE_COLUMN"]

SCORE_COLUMN = "__score__"

_NONE = type(None)


def _is_numeric_type(t: type) -> bool:
    return issubclass(t, (int, float, np.integer, np.floating)) and not issubclass(
        t, (bool, np.bool_)
    )


def _is_categorical_type(t: type) -> bool:
    return issubclass(t, (str, bool, np.bool_))


class _Numeric(NamedTuple):
    values: np.ndarray  # sorted
    rank: np.ndarray  # sorted_rank(values), so each window pays one searchsorted less


class _Categorical(NamedTuple):
    keys: tuple[Any, ...]
    counts: np.ndarray


class _Tested(NamedTuple):
    feature: str
    test: str
    statistic: float
    p_value: float
    effect: float
    n: int


def _numeric_values(col: Sequence[Any] | np.ndarray) -> np.ndarray:
    """The finite numbers of a column as float64; strings, bools and None are dropped."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
        arr = col.astype(float, copy=False)
    else:
        types = set(map(type, col))
        if all(t is _NONE or _is_numeric_type(t) for t in types):
            # numpy turns None into NaN here, which the finiteness mask below drops.
            arr = np.array(col, dtype=float)
        else:
            arr = np.array([v for v in col if _is_numeric_type(type(v))], dtype=float)
    return arr[np.isfinite(arr)]


def _category_counts(col: Sequence[Any]) -> Counter[Any]:
    """Counts of the str/bool values of a column; numbers and None are not categories."""
    types = set(map(type, col))
    if any(issubclass(t, (bool, np.bool_)) for t in types) and any(
        _is_numeric_type(t) for t in types
    ):
        # True == 1.0 would share one Counter slot; take the categories out first.
        return Counter(v for v in col if _is_categorical_type(type(v)))
    counts = Counter(col)
    if not all(_is_categorical_type(t) for t in types):
        for key in [k for k in counts if not _is_categorical_type(type(k))]:
            del counts[key]
    return counts


def _reference_column(col: Sequence[Any] | np.ndarray) -> _Numeric | _Categorical | None:
    """Summarise one reference column once; its kind decides the test for every window.

    A column is numeric when numbers are at least half of its non-null values (a numeric
    feature with a few sentinel strings stays numeric), categorical otherwise.
    """
    if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
        n_num, n_cat = int(col.shape[0]), 0
    else:
        kinds = Counter(map(type, col))
        n_num = sum(c for t, c in kinds.items() if _is_numeric_type(t))
        n_cat = sum(c for t, c in kinds.items() if _is_categorical_type(t))
    if n_num and n_num >= n_cat:
        values = np.sort(_numeric_values(col))
        if values.shape[0] == 0:
            return None
        return _Numeric(values, sorted_rank(values))
    if n_cat:
        counts = _category_counts(col)
        return _Categorical(tuple(counts), np.fromiter(counts.values(), dtype=float))
    return None


def _dominant_version(versions: Mapping[str, int]) -> str:
    # Ties go to the version that appeared later in the window: the newer one is running.
    best, best_n = "", -1
    for version, count in versions.items():
        if count >= best_n:
            best, best_n = version, count
    return best


@register("drift")
class Drift:
    """Two-sample drift tests of each feature in the window against a reference sample.

    Numeric features (numbers, None dropped) get a two-sided asymptotic Kolmogorov–Smirnov
    test, effect size D; categorical ones (str/bool) a chi-square test on the window-vs-reference
    contingency table over the union of categories, effect size Cramér's V. A feature's kind is
    decided from the reference. The p-values of the family are adjusted by ``correction``
    (``holm``, ``bonferroni``, ``bh`` or ``none``) and a feature is *drifted* when its adjusted
    p-value is below ``alpha``.

    ``value`` (and ``effect_size``) is the largest effect among drifted features, 0.0 if none;
    ``p_value`` is the smallest adjusted p-value; ``sample_size`` is the number of predictions in
    the window. ``evidence``: drifted names, the count tested, the correction, features that could
    not be tested, and the ``max_evidence_features`` most significant features.

    The reference is the given :class:`Reference` (summarised once), or else the first
    ``reference_size`` predictions of the running version (the window's most frequent
    ``model_version``), collected from the windows as they arrive; those windows are not tested.
    When the running version changes, the self-built reference is collected anew.
    """

    needs_reference = True

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        features: Sequence[str] | None = None,
        include_score: bool = False,
        correction: str = "holm",
        alpha: float = 0.01,
        reference_size: int = 5000,
        max_evidence_features: int = 10,
        reference: Reference | None = None,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (an effect size), got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if features is not None and (
            isinstance(features, str) or not all(isinstance(f, str) for f in features)
        ):
            raise ValueError(f"features must be a list of feature names, got {features!r}")
        if correction not in CORRECTIONS:
            raise ValueError(
                f"correction must be one of {', '.join(CORRECTIONS)}; got {correction!r}"
            )
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if reference_size < 1:
            raise ValueError(f"reference_size must be >= 1, got {reference_size}")
        if max_evidence_features < 0:
            raise ValueError(f"max_evidence_features must be >= 0, got {max_evidence_features}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.features = None if features is None else list(features)
        self.include_score = include_score
        self.correction = correction
        self.alpha = alpha
        self.reference_size = reference_size
        self.max_evidence_features = max_evidence_features
        self.reference = reference
        # A given reference is configuration, not moving state: summarise it once here.
        self._given = None if reference is None else self._summarise(reference.columns)
        self._reset()

    def _reset(self) -> None:
        self._ref: dict[str, _Numeric | _Categorical | None] | None = self._given
        self._ref_version: str | None = None
        self._build: dict[str, list[Any]] = {}
        self._build_version: str | None = None
        self._build_n = 0
        self._n: int | None = None
        self._status: str | None = None
        self._tested: list[_Tested] = []
        self._untested: list[str] = []

    # -- reference ---------------------------------------------------------------------------

    @property
    def _wants_score(self) -> bool:
        return self.include_score or (self.features is not None and SCORE_COLUMN in self.features)

    def _names(self, available: Iterable[str]) -> list[str]:
        if self.features is not None:
            names = list(dict.fromkeys(self.features))
        else:
            names = sorted(n for n in available if n != SCORE_COLUMN)
        if self.include_score and SCORE_COLUMN not in names:
            names.append(SCORE_COLUMN)
        return names

    def _summarise(
        self, columns: Mapping[str, Sequence[Any]]
    ) -> dict[str, _Numeric | _Categorical | None]:
        return {
            name: (_reference_column(columns[name]) if name in columns else None)
            for name in self._names(columns)
        }

    def _collect(self, window: Window, version: str) -> None:
        """Add the running version's first predictions in ``window`` to the reference being built."""
        if version != self._build_version:
            self._build, self._build_version, self._build_n = {}, version, 0
        need = self.reference_size - self._build_n
        if len(window.versions) == 1 and window.n <= need:
            # The common case: the window's cached columns are used as they are.
            taken = window.n
            # Build only the columns asked for: each costs a pass over the window.
            names = window.feature_names if self.features is None else self.features
            cols: dict[str, Sequence[Any]] = {
                name: window.feature(name) for name in names if name != SCORE_COLUMN
            }
            if self._wants_score:
                cols[SCORE_COLUMN] = window.scores
        else:
            preds = [p for p in window.predictions if p.model_version == version][:need]
            taken = len(preds)
            names_set: set[str] = set()
            for p in preds:
                names_set.update(p.features)
            names_set.discard(SCORE_COLUMN)
            cols = {name: [p.features.get(name) for p in preds] for name in sorted(names_set)}
            if self._wants_score:
                cols[SCORE_COLUMN] = [p.score for p in preds]
        wanted = self.features
        for name, col in cols.items():
            if wanted is None or name in wanted or name == SCORE_COLUMN:
                self._build.setdefault(name, []).extend(col)
        self._build_n += taken
        if self._build_n >= self.reference_size:
            self._ref = self._summarise(self._build)
            self._ref_version = version
            self._build, self._build_version, self._build_n = {}, None, 0

    # -- windows -----------------------------------------------------------------------------

    def update(self, window: Window) -> None:
        n = window.n
        self._n = n
        self._tested, self._untested = [], []
        if n == 0:
            self._status = "empty"
            return
        if self._given is None:
            version = _dominant_version(window.versions)
            if self._ref is not None and version != self._ref_version:
                self._ref, self._ref_version = None, None
            if self._ref is None:
                self._collect(window, version)
                self._status = "building"
                return
        if n < self.min_samples:
            self._status = "few"
            return
        self._status = "tested"
        self._test(window)

    def _test(self, window: Window) -> None:
        assert self._ref is not None
        ks: list[tuple[str, float, int, int]] = []
        chi: list[tuple[str, float, int, float, int]] = []
        untested: list[str] = []
        for name, ref in self._ref.items():
            if ref is None:
                untested.append(name)
                continue
            if isinstance(ref, _Numeric):
                col = window.scores if name == SCORE_COLUMN else window.feature(name)
                x = _numeric_values(col)
                if x.shape[0] == 0:
                    untested.append(name)
                    continue
                d = ks_statistic(x, ref.values, ref.rank)
                ks.append((name, d, int(x.shape[0]), int(ref.values.shape[0])))
            else:
                counts = _category_counts(window.feature(name))
                n_win = sum(counts.values())
                if n_win == 0:
                    untested.append(name)
                    continue
                seen = set(ref.keys)
                new = [k for k in counts if k not in seen]
                a = np.fromiter((counts.get(k, 0) for k in (*ref.keys, *new)), dtype=float)
                b = np.concatenate([ref.counts, np.zeros(len(new))])
                stat, dof = chi2_2xk(a, b)
                v = cramers_v(stat, float(a.sum() + b.sum()), 2, a.shape[0])
                chi.append((name, stat, dof, v, n_win))
        tested: list[_Tested] = []
        if ks:
            p = ks_pvalues(
                np.array([t[1] for t in ks]),
                np.array([t[2] for t in ks]),
                np.array([t[3] for t in ks]),
            )
            tested.extend(
                _Tested(name, "ks", d, float(pv), d, n1) for (name, d, n1, _), pv in zip(ks, p)
            )
        if chi:
            p = chi2_pvalues(np.array([t[1] for t in chi]), np.array([t[2] for t in chi]))
            tested.extend(
                _Tested(name, "chi2", stat, float(pv), v, nw)
                for (name, stat, _, v, nw), pv in zip(chi, p)
            )
        self._tested = tested
        self._untested = untested

    def evaluate(self, now: float) -> Measurement:
        status, n = self._status, self._n or 0
        if status is None:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        if status == "empty":
            return Measurement.insufficient_data(self.threshold, 0, "no predictions in window")
        if status == "building":
            return Measurement.insufficient_data(
                self.threshold,
                n,
                "building reference",
                reference_n=self._build_n if self._ref is None else self.reference_size,
                reference_size=self.reference_size,
            )
        if status == "few":
            return Measurement.insufficient_data(
                self.threshold, n, f"fewer than min_samples={self.min_samples} predictions"
            )
        if not self._tested:
            return Measurement.insufficient_data(
                self.threshold, n, "no testable features", untested=list(self._untested)
            )
        tested = self._tested
        adjusted = adjust_pvalues([t.p_value for t in tested], self.correction).tolist()
        order = sorted(range(len(tested)), key=lambda i: (adjusted[i], tested[i].feature))
        drifted = [i for i in order if adjusted[i] < self.alpha]
        value = max((tested[i].effect for i in drifted), default=0.0)
        top = [
            {
                "feature": tested[i].feature,
                "test": tested[i].test,
                "statistic": tested[i].statistic,
                "p_value": tested[i].p_value,
                "p_adjusted": adjusted[i],
                "effect": tested[i].effect,
                "n": tested[i].n,
            }
            for i in order[: self.max_evidence_features]
        ]
        evidence = {
            "drifted": [tested[i].feature for i in drifted],
            "tested": len(tested),
            "correction": self.correction,
            "untested": list(self._untested),
            "features": top,
        }
        return Measurement(
            value=value,
            threshold=self.threshold,
            sample_size=n,
            p_value=min(adjusted),
            effect_size=value,
            evidence=evidence,
        )
