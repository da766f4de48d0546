"""What model_quality measures and how: the metrics, an outcome read into the two columns a
metric uses, what the minimums count, and each metric's value with its one-sided test (exact
or Fisher for rates, DeLong for ROC AUC, a seeded bootstrap for F1, macro-F1 and PR AUC, t and
Welch for the mean losses). Pure: no clock, no I/O."""

from __future__ import annotations

import math
from functools import partial
from operator import attrgetter
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from rollbackd.detectors import metrics as M
from rollbackd.detectors.base import Labeled
from rollbackd.detectors.model_error import binary_value
from rollbackd.detectors.stats import (
    binomial_pvalue_greater,
    binomial_pvalue_less,
    fisher_pvalue,
    t_pvalue,
    welch_pvalue,
)

__all__ = [
    "METRICS", "ALIASES", "MAX_CLASSES", "MetricSpec", "Columns", "Tally", "OutcomeReader",
    "QualityMeasure", "Undefined", "class_key", "keep_rows",
]


class MetricSpec(NamedTuple):
    task: str  # binary, multiclass, regression
    kind: str  # how it is computed and tested (see QualityMeasure.measure)
    better: str  # higher, lower, either: which way is a degradation
    bounded: bool  # a value in [0, 1]


METRICS: dict[str, MetricSpec] = {
    "precision": MetricSpec("binary", "rate", "higher", True),
    "recall": MetricSpec("binary", "rate", "higher", True),
    "fpr": MetricSpec("binary", "rate", "lower", True),
    "positive_rate": MetricSpec("binary", "rate", "either", True),
    "f1": MetricSpec("binary", "f1", "higher", True),
    "roc_auc": MetricSpec("binary", "auc", "higher", True),
    "pr_auc": MetricSpec("binary", "ap", "higher", True),
    "log_loss": MetricSpec("binary", "loss", "lower", False),
    "brier": MetricSpec("binary", "loss", "lower", True),
    "accuracy": MetricSpec("multiclass", "class_rate", "higher", True),
    "class_recall": MetricSpec("multiclass", "class_rate", "higher", True),
    "macro_f1": MetricSpec("multiclass", "macro_f1", "higher", True),
    "mae": MetricSpec("regression", "loss", "lower", False),
    "rmse": MetricSpec("regression", "loss", "lower", False),
    "mape": MetricSpec("regression", "loss", "lower", False),
    "bias": MetricSpec("regression", "loss", "either", False),
}
ALIASES = {"tpr": "recall"}
# Kinds whose test reads counts only (a Tally is all a baseline of them needs to keep).
RATE_KINDS = frozenset({"rate", "class_rate"})
# Distinct classes a multiclass detector tells apart: labels beyond (an id sent as a label by
# mistake, a hostile stream) are unusable rather than a vocabulary that grows without end.
MAX_CLASSES = 1000

_get_label = attrgetter("label")
_get_prediction = attrgetter("prediction")
_get_score = attrgetter("score")

# Two columns per usable outcome, by task: binary (label 0/1 int8, predicted class 0/1 int8 or
# score float64), multiclass (class codes int32, twice), regression (label, prediction float64).
Columns = tuple[np.ndarray, np.ndarray]


class Tally(NamedTuple):
    """What the minimums and a rate's test read of a sample of outcomes: all a baseline of a
    rate metric needs to keep (``baseline: same_time`` keeps one per window)."""

    n: int  # usable outcomes
    k: int  # a rate's successes (0 for the other metrics)
    m: int  # a rate's trials
    guarded: int  # what min_positives counts: positives, predicted positives for precision,
    # outcomes of the class for class_recall
    negatives: int  # binary: outcomes labelled 0


class Undefined(Exception):
    """The metric has no value on this window (a rate with nothing to divide by)."""


def class_key(v: Any) -> str | None:
    """One spelling per class: 1, 1.0 and "1" are the same class; None and NaN are none."""
    t = type(v)
    if t is str:
        return v.strip()
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return str(v)
    if t is float:
        if not math.isfinite(v):
            return None
        return str(int(v)) if v.is_integer() else repr(v)
    return None


def _numbers(values: list[Any]) -> np.ndarray:
    """Floats of numeric values (NaN for None, bools, strings, inf): read in C when the
    column holds only ints, floats and None (the usual case)."""
    if set(map(type, values)) <= {float, int, type(None)}:
        try:
            arr = np.array(values, dtype=float)
        except OverflowError:  # an int beyond float
            arr = np.array([float(v) if v is not None and abs(v) < 1e308 else np.nan for v in values])
    else:
        arr = np.array(
            [float(v) if type(v) in (float, int) and abs(v) < 1e308 else np.nan for v in values],
            dtype=float,
        )
    arr[~np.isfinite(arr)] = np.nan
    return arr


def keep_rows(cols: Columns, size: int) -> Columns:
    """At most ``size`` rows of ``cols``: evenly spaced ranks (``floor((i + 1/2) n / size)``)
    in the order of (second column, first column), so every cell of a confusion matrix and
    the positives and negatives at every score keep their share of the window to within one
    row; deterministic (no random draw), so a replay keeps the same rows."""
    n = cols[0].shape[0]
    if n <= size:
        return (cols[0].copy(), cols[1].copy())
    order = np.lexsort((cols[0], cols[1]))
    rows = order[((np.arange(size) + 0.5) * (n / size)).astype(np.int64)]
    return (cols[0][rows], cols[1][rows])


class OutcomeReader:
    """Labelled outcomes as the two columns the metric's task uses, and which are usable.

    A multiclass reader keeps the class vocabulary (spelling -> code, in order of first
    sight, at most :data:`MAX_CLASSES`): its codes are stable, so columns kept from earlier
    windows stay comparable.
    """

    # What a checkpoint keeps (daemon/snapshot.py).
    STATE = ("classes",)

    def __init__(self, spec: MetricSpec, score_threshold: float) -> None:
        self.spec = spec
        self.score_threshold = score_threshold
        self._reset()

    def _reset(self) -> None:
        self.classes: dict[str, int] = {}

    def columns(self, outcomes: Sequence[Labeled]) -> tuple[Columns, np.ndarray]:
        """Both columns for every outcome, and which outcomes are usable."""
        task, kind = self.spec.task, self.spec.kind
        n = len(outcomes)
        labels = list(map(_get_label, outcomes))
        if task == "regression":
            y = _numbers(labels)
            p = _numbers(list(map(_get_prediction, outcomes)))
            return (y, p), ~(np.isnan(y) | np.isnan(p))
        if task == "multiclass":
            y = self._codes(labels)
            yhat = self._codes(list(map(_get_prediction, outcomes)))
            return (y, yhat), (y >= 0) & (yhat >= 0)
        lut = {v: -1 if (b := binary_value(v)) is None else b for v in set(labels)}
        y8 = np.fromiter(map(lut.__getitem__, labels), dtype=np.int8, count=n)
        if kind in ("auc", "ap", "loss"):
            s = np.array(list(map(_get_score, outcomes)), dtype=float)
            ok = (y8 >= 0) & np.isfinite(s)
            if kind == "loss":
                ok &= (s >= 0.0) & (s <= 1.0)
            return (y8, s), ok
        preds = list(map(_get_prediction, outcomes))
        plut = {v: -2 if v is None else (-1 if (b := binary_value(v)) is None else b) for v in set(preds)}
        yhat = np.fromiter(map(plut.__getitem__, preds), dtype=np.int8, count=n)
        by_score = yhat == -2
        if by_score.any():
            s = np.array(list(map(_get_score, outcomes)), dtype=float)[by_score]
            yhat[by_score] = np.where(np.isnan(s), -1, s >= self.score_threshold)
        return (y8, yhat), (y8 >= 0) & (yhat >= 0)

    def usable(self, outcomes: Sequence[Labeled]) -> tuple[Columns, int]:
        """The usable outcomes' columns, and how many were not usable."""
        (a, b), ok = self.columns(outcomes)
        if ok.all():
            return (a, b), 0
        return (a[ok], b[ok]), int(ok.size - np.count_nonzero(ok))

    def _codes(self, values: list[Any]) -> np.ndarray:
        classes = self.classes
        lut: dict[Any, int] = {}
        # In order of first appearance (a set's order of strings changes with the hash seed):
        # codes, and so the bootstrap's cells and any cap, are the same in every replay.
        for v in dict.fromkeys(values):
            key = class_key(v)
            if key is None or (key not in classes and len(classes) >= MAX_CLASSES):
                lut[v] = -1
            else:
                lut[v] = classes.setdefault(key, len(classes))
        return np.fromiter(map(lut.__getitem__, values), dtype=np.int32, count=len(values))


class QualityMeasure:
    """One metric's value and one-sided test on a window's columns, against the threshold or
    a baseline (its columns, or its :class:`Tally` for a rate), and the minimums a sample
    must meet first. Each measurement fills the evidence it is given."""

    def __init__(
        self,
        metric: str,
        reader: OutcomeReader,
        *,
        threshold: float,
        score_threshold: float,
        min_samples: int,
        min_positives: int,
        min_negatives: int,
        bootstrap: int,
        class_: str | None,
    ) -> None:
        self.metric = metric
        self.spec = METRICS[metric]
        self.reader = reader
        self.threshold = threshold
        self.score_threshold = score_threshold
        self.min_samples = min_samples
        self.min_positives = min_positives
        self.min_negatives = min_negatives
        self.bootstrap = bootstrap
        self.class_ = class_

    # -- what a sample holds -----------------------------------------------------------------

    def tally(self, sample: Columns | Tally | None) -> Tally:
        if sample is None:
            return Tally(0, 0, 0, 0, 0)
        if isinstance(sample, Tally):
            return sample
        y, x = sample
        n = int(y.shape[0])
        metric, kind = self.metric, self.spec.kind
        if self.spec.task == "binary":
            pos = int(np.count_nonzero(y == 1))
            guarded = int(np.count_nonzero(x == 1)) if metric == "precision" else pos
            k = m = 0
            if kind == "rate":
                k, m = M.rate_parts(metric, *M.confusion(y, x))
            return Tally(n, k, m, guarded, n - pos)
        if metric == "accuracy":
            return Tally(n, int(np.count_nonzero(y == x)), n, 0, 0)
        if metric == "class_recall":
            code = self.reader.classes.get(self.class_)  # type: ignore[arg-type]
            if code is None:
                return Tally(n, 0, 0, 0, 0)
            mine = y == code
            of = int(np.count_nonzero(mine))
            return Tally(n, int(np.count_nonzero(x[mine] == code)), of, of, 0)
        return Tally(n, 0, 0, 0, 0)

    def keep(self, cols: Columns, size: int) -> Columns | Tally:
        """What a baseline needs to keep of a window for this metric's test: the counts of a
        rate, else at most ``size`` of its rows (:func:`keep_rows`)."""
        return self.tally(cols) if self.spec.kind in RATE_KINDS else keep_rows(cols, size)

    def too_few(self, sample: Columns | Tally | None, side: str) -> str | None:
        """Why ``sample`` is too small for a verdict, or None; ``side`` names it ("" for the
        window, "the baseline: " ...)."""
        t = self.tally(sample)
        n = t.n
        if n == 0:
            return f"{side}no usable labels" + ("" if side else " in window")
        if n < self.min_samples:
            return f"{side}{n} usable labels < min_samples={self.min_samples}"
        metric = self.metric
        if self.spec.task == "binary":
            what = "predicted positives" if metric == "precision" else "positives"
            if t.guarded < self.min_positives:
                return (
                    f"{side}{t.guarded} {what} < min_positives={self.min_positives}: "
                    f"a {metric} on {t.guarded} {what} is not a verdict"
                )
            if t.negatives < self.min_negatives:
                return (
                    f"{side}{t.negatives} negatives < min_negatives={self.min_negatives}: "
                    f"a {metric} on {t.negatives} negatives is not a verdict"
                )
        if metric == "class_recall" and (t.guarded == 0 or t.guarded < self.min_positives):
            return (
                f"{side}{t.guarded} outcomes of class {self.class_!r} < min_positives="
                f"{max(1, self.min_positives)}: a recall on {t.guarded} is not a verdict"
            )
        return None

    # -- value and test ------------------------------------------------------------------------

    def measure(
        self, win: Columns, base: Columns | Tally | None, ev: dict[str, Any]
    ) -> tuple[float, float | None]:
        """``(value, p_value)`` of the window, against the threshold when ``base`` is None,
        else the degradation from the baseline; raises :class:`Undefined` when there is none."""
        kind = self.spec.kind
        if kind == "rate":
            return self._rate(win, base, ev)
        if kind == "class_rate":
            return self._class_rate(win, base, ev)
        assert not isinstance(base, Tally), "a baseline keeps counts for rates only"
        if kind == "auc":
            return self._auc(win, base, ev)
        if kind in ("f1", "ap", "macro_f1"):
            return self._bootstrapped(win, base, ev)
        return self._loss(win, base, ev)

    def _binary_evidence(self, win: Columns, ev: dict[str, Any]) -> tuple[int, int, int, int]:
        y, x = win
        yhat = x if x.dtype == np.int8 else (x >= self.score_threshold).astype(np.int8)
        tp, fp, tn, fn = M.confusion(y, yhat)
        ev.update(positives=tp + fn, negatives=fp + tn, tp=tp, fp=fp, tn=tn, fn=fn)
        return tp, fp, tn, fn

    def _rate(self, win: Columns, base: Columns | Tally | None, ev: dict[str, Any]) -> tuple[float, float | None]:
        k, m = M.rate_parts(self.metric, *self._binary_evidence(win, ev))
        if base is None:
            return self._rate_absolute(k, m, ev)
        t = self.tally(base)
        return self._rate_relative(k, m, t.k, t.m, t.n, ev)

    def _class_rate(self, win: Columns, base: Columns | Tally | None, ev: dict[str, Any]) -> tuple[float, float | None]:
        t = self.tally(win)
        k, m = t.k, t.m
        ev.update(classes=int(np.unique(win[0]).shape[0]), correct=k, of=m)
        if self.metric == "class_recall":
            ev["class"] = self.class_
        if base is None:
            return self._rate_absolute(k, m, ev)
        t0 = self.tally(base)
        return self._rate_relative(k, m, t0.k, t0.m, t0.n, ev)

    def _rate_absolute(self, k: int, m: int, ev: dict[str, Any]) -> tuple[float, float | None]:
        if m == 0:
            raise Undefined(f"{self.metric} is undefined: nothing to divide by")
        better, thr = self.spec.better, self.threshold
        if better == "higher":
            p = binomial_pvalue_less(k, m, thr)
        elif better == "lower":
            p = binomial_pvalue_greater(k, m, thr)
        else:
            p = min(1.0, 2.0 * min(binomial_pvalue_less(k, m, thr), binomial_pvalue_greater(k, m, thr)))
        ev.update(value=k / m, test="binomial")
        return k / m, p

    def _rate_relative(
        self, k: int, m: int, k0: int, m0: int, n0: int, ev: dict[str, Any]
    ) -> tuple[float, float | None]:
        if m == 0 or m0 == 0:
            raise Undefined(f"{self.metric} is undefined {'in the baseline' if m else 'in the window'}")
        rate, rate0 = k / m, k0 / m0
        better = self.spec.better
        if better == "higher":
            value, p = rate0 - rate, fisher_pvalue(k, m, k0, m0, "less")
        elif better == "lower":
            value, p = rate - rate0, fisher_pvalue(k, m, k0, m0, "greater")
        else:
            value = abs(rate - rate0)
            p = min(1.0, 2.0 * min(fisher_pvalue(k, m, k0, m0, "less"), fisher_pvalue(k, m, k0, m0, "greater")))
        ev.update(value=rate, baseline_value=rate0, baseline_n=n0, test="fisher")
        return value, p

    def _auc(self, win: Columns, base: Columns | None, ev: dict[str, Any]) -> tuple[float, float | None]:
        self._binary_evidence(win, ev)
        y, s = win
        auc, base_auc, z, p = M.delong_test(y, s, base if base is not None else float(self.threshold))
        ev.update(value=auc, z=z, test="delong")
        if base is None:
            return auc, p
        ev.update(baseline_value=base_auc, baseline_n=int(base[0].shape[0]))
        return base_auc - auc, p

    def _bootstrapped(self, win: Columns, base: Columns | None, ev: dict[str, Any]) -> tuple[float, float | None]:
        kind, reps = self.spec.kind, self.bootstrap
        seed: list[int] = []
        sides: list[tuple[float, Callable[[np.random.Generator], np.ndarray]]] = []
        for cols in (win, base):
            if cols is None:
                continue
            if kind == "f1":
                tp, fp, tn, fn = M.confusion(*cols)
                seed += (1, tp, fp, tn, fn)
                value = float(M.f1_from_counts(tp, fp, fn))
                sides.append((value, partial(M.bootstrap_f1, tp=tp, fp=fp, tn=tn, fn=fn, replicates=reps)))
            elif kind == "ap":
                pos, neg = M.score_atoms(*cols)
                seed += (2, int(pos.sum()), int(neg.sum()), pos.shape[0])
                value = float(M.ap_from_atoms(pos, neg))
                sides.append((value, partial(M.bootstrap_average_precision, pos=pos, neg=neg, replicates=reps)))
            else:
                _, matrix = M.confusion_matrix(*cols)
                seed += (3, int(matrix.sum()), int(np.trace(matrix)), matrix.shape[0])
                value = float(M.macro_f1_from_matrix(matrix))
                sides.append((value, partial(M.bootstrap_macro_f1, matrix=matrix, replicates=reps)))
        if kind in ("f1", "ap"):
            self._binary_evidence(win, ev)
        # Seeded from the counts: the same windows draw the same resamples in every replay.
        rng = M.bootstrap_generator(*seed)
        value, draw_window = sides[0]
        ev.update(value=value, test="bootstrap", replicates=reps)
        window_reps = draw_window(rng)
        if base is None:
            # H1: the metric is below the threshold (all three are higher-is-better).
            z, p = M.bootstrap_test(self.threshold - value, window_reps)
            ev["z"] = z
            return value, p
        base_value, draw_base = sides[1]
        z, p = M.bootstrap_test(base_value - value, window_reps, draw_base(rng))
        ev.update(baseline_value=base_value, baseline_n=int(base[0].shape[0]), z=z)
        return base_value - value, p

    def _loss(self, win: Columns, base: Columns | None, ev: dict[str, Any]) -> tuple[float, float | None]:
        metric, task = self.metric, self.spec.task

        def losses(cols: Columns) -> np.ndarray:
            if task == "binary":
                return M.binary_losses(metric, cols[0].astype(float), cols[1])
            return M.regression_losses(metric, *cols)

        def value_of(terms: np.ndarray) -> float:
            mean = float(np.mean(terms))
            return math.sqrt(mean) if metric == "rmse" else mean

        if task == "binary":
            self._binary_evidence(win, ev)
        else:
            err = win[1] - win[0]
            ev.update(mae=float(np.mean(np.abs(err))), bias=float(np.mean(err)),
                      rmse=float(np.sqrt(np.mean(err * err))))
        lw = losses(win)
        value = value_of(lw)
        either = self.spec.better == "either"
        alternative = "two-sided" if either else "greater"
        ev.update(value=value)
        if base is None:
            ev["test"] = "t"
            mu = self.threshold * self.threshold if metric == "rmse" else self.threshold
            p = t_pvalue(lw, mu, alternative)[1] if lw.shape[0] >= 2 else None
            return value, p
        lb = losses(base)
        base_value = value_of(lb)
        ev.update(baseline_value=base_value, baseline_n=int(lb.shape[0]), test="welch")
        p = welch_pvalue(lw, lb, alternative)[1] if lw.shape[0] >= 2 and lb.shape[0] >= 2 else None
        return (abs(value - base_value) if either else value - base_value), p
