"""Model quality on joined outcomes: the metric a model card states, against a fixed level or a
baseline (the previous version, a reference period, the stable arm in the same window)."""

from __future__ import annotations

import difflib
import math
from functools import partial
from operator import attrgetter
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from rollbackd.detectors import metrics as M
from rollbackd.detectors.base import Labeled, Measurement, Window, register
from rollbackd.detectors.model_error import binary_value
from rollbackd.detectors.stats import (
    binomial_pvalue_greater,
    binomial_pvalue_less,
    fisher_pvalue,
    t_pvalue,
    welch_pvalue,
)

__all__ = ["ModelQuality", "METRICS", "BASELINES"]


class MetricSpec(NamedTuple):
    task: str  # binary, multiclass, regression
    kind: str  # how it is computed and tested (see ModelQuality._measure)
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
BASELINES = ("absolute", "reference", "previous_version", "stable")
# Metrics that condition on the positive class (min_positives 10 by default) and on the
# negative class (min_negatives 10): a recall on 3 positives is not a verdict.
_NEEDS_POSITIVES = frozenset({"recall", "f1", "pr_auc", "roc_auc", "precision", "class_recall"})
_NEEDS_NEGATIVES = frozenset({"fpr", "roc_auc"})
# Versions whose outcomes previous_version keeps (the least recently seen is dropped first).
MAX_VERSIONS = 4
# Distinct classes a multiclass detector tells apart: labels beyond (an id sent as a label by
# mistake, a hostile stream) are unusable rather than a vocabulary that grows without end.
MAX_CLASSES = 1000
_DEFAULT_ARMS = ("stable", "primary")

_get_label = attrgetter("label")
_get_prediction = attrgetter("prediction")
_get_score = attrgetter("score")
_get_version = attrgetter("model_version")
_get_pred_ts = attrgetter("pred_ts")

# Two columns per usable outcome, by task: binary (label 0/1 int8, predicted class 0/1 int8 or
# score float64), multiclass (class codes int32, twice), regression (label, prediction float64).
Columns = tuple[np.ndarray, np.ndarray]


def _class_key(v: Any) -> str | None:
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


@register("model_quality")
class ModelQuality:
    """A model-quality metric on the labelled outcomes of the window.

    ``metric``: binary — ``precision``, ``recall`` (alias ``tpr``), ``fpr``, ``f1``, ``roc_auc``,
    ``pr_auc`` (average precision), ``log_loss``, ``brier``, ``positive_rate``; multiclass —
    ``accuracy``, ``macro_f1``, ``class_recall`` (of ``class``); regression — ``mae``,
    ``rmse``, ``mape``, ``bias`` (mean of prediction − label). A binary class is read as
    :func:`model_error.binary_value` reads it; the predicted class is ``prediction`` when the
    outcome has one, else ``score >= score_threshold``. ``roc_auc``, ``pr_auc``, ``log_loss``
    and ``brier`` use the score (in [0, 1] for the last two). Outcomes whose label, prediction
    or score the metric cannot use are counted as ``unusable``; ``sample_size`` and
    ``min_samples`` count the usable ones.

    ``baseline="absolute"``: ``value`` is the metric as is, compared with the rule's threshold;
    a rule on a metric where higher is better (recall, AUC...) sets ``direction: below``.
    ``p_value`` is for "worse than the threshold": the exact binomial test for the rates
    (lower tail for higher-is-better rates), DeLong's normal test for ROC AUC, a one-sample
    t-test on the per-outcome losses for log loss, Brier, MAE, MAPE and RMSE (on the squared
    errors against threshold²), a normal test on a bootstrap standard error for F1, macro-F1
    and PR AUC. For
    ``positive_rate`` and ``bias``, where neither side is better, it is two-sided (valid, and
    conservative, with either ``direction``).

    Relative baselines — ``reference`` (the first ``reference_size`` usable outcomes of this
    deployment × variant; no verdict until it is complete), ``previous_version`` (the last
    ``baseline_size`` usable outcomes of the version served before the one judged, or of
    ``window.known_good`` when the pipeline names one; the window's outcomes of the judged
    version only, which is ``window.version`` or else the version of the newest prediction
    labelled so far)
    and ``stable`` (the other arm in the same window, ``baseline_variant`` or else "stable" /
    "primary"): ``value`` is the **degradation**, baseline − window where higher is better,
    window − baseline where lower is better, |window − baseline| for positive_rate and bias,
    so the rule keeps ``direction: above``. ``p_value`` is one-sided: Fisher's exact test for
    the rates, DeLong's test for ROC AUC (the two AUCs' variances added: independent samples),
    Welch's t-test on the per-outcome losses for the mean losses, and for F1, macro-F1 and PR
    AUC a normal test of the degradation over the standard error of a seeded bootstrap of
    each sample (``bootstrap`` replicates; the generator is seeded from the counts, so a
    replay draws the same resamples; see :func:`metrics.bootstrap_test`).

    No verdict when there are fewer usable outcomes than ``min_samples``, fewer positives
    (predicted positives for precision, outcomes of the class for class_recall) than
    ``min_positives`` or fewer negatives than ``min_negatives`` — in the window, or in the
    baseline. ``evidence``: task, metric, baseline kind, n, unusable, label_coverage, positives
    and the confusion counts (binary), the metric's value in the window and in the baseline and
    the baseline's n, version or arm, and the test used.
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset.
    STATE = (
        "_seen", "_why", "_win", "_base", "_base_label", "_unusable", "_label_coverage",
        "_version", "_reference", "_buffers", "_recent", "_classes", "_latest_ts", "_current",
        "_measured",
    )

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        metric: str | None = None,
        score_threshold: float = 0.5,
        baseline: str = "absolute",
        reference_size: int = 1000,
        baseline_size: int = 5000,
        baseline_variant: str | None = None,
        min_positives: int | None = None,
        min_negatives: int | None = None,
        bootstrap: int = 400,
        **class_param: Any,
    ) -> None:
        # ``class`` is a Python keyword, so it arrives in **class_param; any other name there
        # is a misspelt parameter, named first in the message so the loader points at it.
        for key in class_param:
            if key != "class":
                known = [*_PARAMS, "class"]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"{key} is not a parameter of model_quality{hint}; it takes: {', '.join(known)}"
                )
        cls = class_param.get("class")
        name = ALIASES.get(metric, metric) if isinstance(metric, str) else metric
        if not isinstance(name, str) or name not in METRICS:
            raise ValueError(
                f"metric must be one of {', '.join([*METRICS, *ALIASES])}; got {metric!r}"
            )
        spec = METRICS[name]
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if baseline == "absolute" and spec.bounded and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] for {name}, got {threshold}")
        if baseline == "absolute" and spec.better == "lower" and threshold < 0.0:
            raise ValueError(f"threshold must be >= 0 for {name}, got {threshold}")
        if baseline != "absolute" and spec.bounded and not -1.0 <= threshold <= 1.0:
            raise ValueError(
                f"threshold must be in [-1, 1] for a change of {name} against a baseline, "
                f"got {threshold}"
            )
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        for label, v, low in (
            ("min_samples", min_samples, 0), ("reference_size", reference_size, 1),
            ("baseline_size", baseline_size, 2), ("bootstrap", bootstrap, 100),
            ("min_positives", min_positives, 0), ("min_negatives", min_negatives, 0),
        ):
            if v is not None and (type(v) is not int or v < low):
                raise ValueError(f"{label} must be an integer >= {low}, got {v!r}")
        if name == "class_recall" and _class_key(cls) is None:
            raise ValueError(f"class must name the class whose recall is measured, got {cls!r}")
        if cls is not None and name != "class_recall":
            raise ValueError(f"class is for metric: class_recall (got metric {name!r})")
        if baseline_variant is not None and baseline != "stable":
            raise ValueError(f"baseline_variant needs baseline: stable (got baseline {baseline!r})")
        if baseline_variant is not None and not (
            isinstance(baseline_variant, str) and baseline_variant
        ):
            raise ValueError(f"baseline_variant must be a variant name, got {baseline_variant!r}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.metric = name
        self.score_threshold = score_threshold
        self.baseline = baseline
        self.reference_size = reference_size
        self.baseline_size = baseline_size
        self.baseline_variant = baseline_variant
        self.min_positives = (10 if name in _NEEDS_POSITIVES else 0) if min_positives is None else min_positives
        self.min_negatives = (10 if name in _NEEDS_NEGATIVES else 0) if min_negatives is None else min_negatives
        self.bootstrap = bootstrap
        self.class_ = _class_key(cls) if cls is not None else None
        self._spec = spec
        self._reset()

    def _reset(self) -> None:
        self._seen = False
        # Why this window gives no verdict before any count is looked at (no baseline arm, the
        # reference still being built...), else None.
        self._why: str | None = None
        self._win: Columns | None = None
        self._base: Columns | None = None
        # What the baseline is, for the evidence: {"baseline_version": "7"}, {"baseline_variant": ...}.
        self._base_label: dict[str, Any] = {}
        self._unusable = 0
        self._label_coverage: float | None = None
        self._version: str | None = None
        self._reference: Columns | None = None
        # previous_version: usable outcomes per version, the last baseline_size of each, and
        # the versions by when they were last seen (most recent last).
        self._buffers: dict[str, Columns] = {}
        self._recent: list[str] = []
        # The newest prediction time among the labels seen, and its version: the one judged.
        self._latest_ts: float | None = None
        self._current: str | None = None
        # The measurement of the last window once evaluated; the window's and the baseline's
        # columns are dropped then, so a checkpoint between windows holds neither twice.
        self._measured: Measurement | None = None
        # multiclass: class spelling -> code, in order of first sight (codes are stable).
        self._classes: dict[str, int] = {}

    # -- reading outcomes ----------------------------------------------------------------

    def _columns(self, outcomes: Sequence[Labeled]) -> tuple[Columns, np.ndarray]:
        """Both columns for every outcome, and which outcomes are usable."""
        task, kind = self._spec.task, self._spec.kind
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

    def _codes(self, values: list[Any]) -> np.ndarray:
        classes = self._classes
        lut: dict[Any, int] = {}
        # In order of first appearance (a set's order of strings changes with the hash seed):
        # codes, and so the bootstrap's cells and any cap, are the same in every replay.
        for v in dict.fromkeys(values):
            key = _class_key(v)
            if key is None or (key not in classes and len(classes) >= MAX_CLASSES):
                lut[v] = -1
            else:
                lut[v] = classes.setdefault(key, len(classes))
        return np.fromiter(map(lut.__getitem__, values), dtype=np.int32, count=len(values))

    def _usable(self, outcomes: Sequence[Labeled]) -> tuple[Columns, int]:
        (a, b), ok = self._columns(outcomes)
        if ok.all():
            return (a, b), 0
        return (a[ok], b[ok]), int(ok.size - np.count_nonzero(ok))

    # -- update ------------------------------------------------------------------------------

    def update(self, window: Window) -> None:
        self._seen = True
        self._measured = None
        self._why = None
        self._base = None
        self._base_label = {}
        self._label_coverage = window.label_coverage
        self._version = window.version
        outcomes = window.outcomes
        if self.baseline == "previous_version":
            self._update_versions(window)
            return
        self._win, self._unusable = self._usable(outcomes)
        if self.baseline == "reference":
            self._update_reference()
        elif self.baseline == "stable":
            self._update_arm(window)

    def _update_reference(self) -> None:
        ref = self._reference
        have = 0 if ref is None else ref[0].shape[0]
        if have >= self.reference_size:
            self._base = ref
            self._base_label = {}
            return
        a, b = self._win  # type: ignore[misc]
        take = self.reference_size - have
        if ref is None:
            self._reference = (a[:take].copy(), b[:take].copy())
        else:
            self._reference = (np.concatenate((ref[0], a[:take])), np.concatenate((ref[1], b[:take])))
        got = self._reference[0].shape[0]
        # The window that completes the reference is part of it, so it is not tested either.
        self._why = f"building the reference ({got} of reference_size={self.reference_size} usable labels)"

    def _update_arm(self, window: Window) -> None:
        if self.baseline_variant is not None:
            arm = self.baseline_variant
            if window.variant == arm:
                self._why = f"this is the baseline arm {arm!r}"
                return
        else:
            if window.variant in _DEFAULT_ARMS:
                self._why = f"this is the baseline arm {window.variant!r}"
                return
            arm = next((a for a in _DEFAULT_ARMS if a in window.siblings), _DEFAULT_ARMS[0])
        other = window.siblings.get(arm)
        if other is None:
            self._why = f"no baseline arm {arm!r} in this window"
            return
        self._base, _ = self._usable(other.outcomes)
        self._base_label = {"baseline_variant": arm}

    def _update_versions(self, window: Window) -> None:
        outcomes = window.outcomes
        (a, b), ok = self._columns(outcomes)
        self._unusable = int(ok.size - np.count_nonzero(ok))
        versions = list(map(_get_version, outcomes))
        ts = np.fromiter(map(_get_pred_ts, outcomes), dtype=float, count=len(outcomes))
        ts[~ok] = -np.inf
        # Each version's usable outcomes, and when its newest labelled prediction was made.
        parts: dict[str, tuple[Columns, float]] = {}
        distinct = set(versions)
        if len(distinct) == 1:
            parts[distinct.pop()] = ((a[ok], b[ok]), float(ts.max()))
        elif distinct:
            lut = {v: i for i, v in enumerate(sorted(distinct))}
            codes = np.fromiter(map(lut.__getitem__, versions), dtype=np.int32, count=len(versions))
            for v, i in lut.items():
                rows = codes == i
                parts[v] = ((a[rows & ok], b[rows & ok]), float(ts[rows].max()))
        if ok.any():
            # The version under judgement is that of the newest prediction labelled so far:
            # labels of the old version keep arriving for a while after a deploy (as
            # calibration's previous_version baseline reads it). Ties: the later outcome.
            newest = len(ts) - 1 - int(np.argmax(ts[::-1]))
            if self._latest_ts is None or ts[newest] >= self._latest_ts:
                self._latest_ts = float(ts[newest])
                self._current = versions[newest]
        judged = window.version if window.version is not None else self._current
        self._version = judged
        empty = (a[:0], b[:0])
        self._win = parts[judged][0] if judged in parts else empty
        base = self._baseline_version(judged, window.known_good)
        if base is None:
            self._why = (
                f"no outcomes of a version other than {judged!r} yet"
                if judged is not None else "no usable labels in window"
            )
        else:
            self._base = self._buffers[base]
            self._base_label = {"baseline_version": base}
        # This window's outcomes join their versions' buffers after the comparison: a window
        # is never part of the baseline it is judged against. The version with the newest
        # labelled prediction counts as the most recently seen.
        for v in sorted(parts, key=lambda v: (parts[v][1], v)):
            if parts[v][1] > -np.inf:
                self._keep(v, parts[v][0])

    def _baseline_version(self, judged: str | None, known_good: str | None) -> str | None:
        if known_good is not None and known_good != judged and known_good in self._buffers:
            return known_good
        for v in reversed(self._recent):
            if v != judged and self._buffers[v][0].shape[0]:
                return v
        return None

    def _keep(self, version: str, cols: Columns) -> None:
        if version in self._recent:
            self._recent.remove(version)
        self._recent.append(version)
        old = self._buffers.get(version)
        if old is not None and cols[0].shape[0]:
            cols = (np.concatenate((old[0], cols[0])), np.concatenate((old[1], cols[1])))
        elif old is not None:
            cols = old
        size = self.baseline_size
        if cols[0].shape[0] > size:
            cols = (cols[0][-size:].copy(), cols[1][-size:].copy())
        self._buffers[version] = cols
        while len(self._recent) > MAX_VERSIONS:
            del self._buffers[self._recent.pop(0)]

    # -- evaluate ------------------------------------------------------------------------

    def evaluate(self, now: float) -> Measurement:
        if self._measured is None:
            self._measured = self._evaluate()
            self._win = self._base = None
        return self._measured

    def _evaluate(self) -> Measurement:
        thr = self.threshold
        if not self._seen:
            return Measurement.insufficient_data(thr, 0, "no window yet")
        evidence: dict[str, Any] = {
            "task": self._spec.task,
            "metric": self.metric,
            "baseline": self.baseline,
            "label_coverage": self._label_coverage,
            "unusable": self._unusable,
        }
        if self._version is not None:
            evidence["version"] = self._version
        win = self._win
        n = 0 if win is None else int(win[0].shape[0])
        evidence["n"] = n
        short = self._too_few(win, "")
        if short is not None:
            return Measurement.insufficient_data(thr, n, short, **evidence)
        if self._why is not None:
            return Measurement.insufficient_data(thr, n, self._why, **evidence, **self._base_label)
        assert win is not None
        base = self._base
        if self.baseline != "absolute":
            evidence.update(self._base_label)
            short = self._too_few(base, "the baseline: ")
            if short is not None:
                evidence["baseline_n"] = 0 if base is None else int(base[0].shape[0])
                return Measurement.insufficient_data(thr, n, short, **evidence)
        try:
            value, p_value = self._measure(win, base, evidence)
        except _Undefined as why:
            return Measurement.insufficient_data(thr, n, str(why), **evidence)
        return Measurement(
            value, thr, n, p_value=p_value,
            effect_size=value if self.baseline != "absolute" else None,
            evidence=evidence,
        )

    def _too_few(self, cols: Columns | None, side: str) -> str | None:
        n = 0 if cols is None else int(cols[0].shape[0])
        if n == 0:
            return f"{side}no usable labels" + ("" if side else " in window")
        if n < self.min_samples:
            return f"{side}{n} usable labels < min_samples={self.min_samples}"
        assert cols is not None
        metric = self.metric
        if self._spec.task == "binary" and (self.min_positives or self.min_negatives):
            y, x = cols
            if metric == "precision":
                k, what = int(np.count_nonzero(x == 1)), "predicted positives"
            else:
                k, what = int(np.count_nonzero(y == 1)), "positives"
            if k < self.min_positives:
                return (
                    f"{side}{k} {what} < min_positives={self.min_positives}: "
                    f"a {metric} on {k} {what} is not a verdict"
                )
            neg = n - int(np.count_nonzero(y == 1))
            if neg < self.min_negatives:
                return (
                    f"{side}{neg} negatives < min_negatives={self.min_negatives}: "
                    f"a {metric} on {neg} negatives is not a verdict"
                )
        if metric == "class_recall":
            code = self._classes.get(self.class_)  # type: ignore[arg-type]
            k = 0 if code is None else int(np.count_nonzero(cols[0] == code))
            if k == 0 or k < self.min_positives:
                return (
                    f"{side}{k} outcomes of class {self.class_!r} < min_positives="
                    f"{max(1, self.min_positives)}: a recall on {k} is not a verdict"
                )
        return None

    def _measure(
        self, win: Columns, base: Columns | None, ev: dict[str, Any]
    ) -> tuple[float, float | None]:
        kind = self._spec.kind
        if kind == "rate":
            return self._rate(win, base, ev)
        if kind == "class_rate":
            return self._class_rate(win, base, ev)
        if kind == "auc":
            return self._auc(win, base, ev)
        if kind in ("f1", "ap", "macro_f1"):
            return self._bootstrapped(win, base, ev)
        return self._loss(win, base, ev)

    # Each returns (value, p_value) and fills the evidence.

    def _binary_evidence(self, win: Columns, ev: dict[str, Any]) -> tuple[int, int, int, int]:
        y, x = win
        yhat = x if x.dtype == np.int8 else (x >= self.score_threshold).astype(np.int8)
        tp, fp, tn, fn = M.confusion(y, yhat)
        ev.update(positives=tp + fn, negatives=fp + tn, tp=tp, fp=fp, tn=tn, fn=fn)
        return tp, fp, tn, fn

    def _rate(self, win: Columns, base: Columns | None, ev: dict[str, Any]) -> tuple[float, float | None]:
        k, m = M.rate_parts(self.metric, *self._binary_evidence(win, ev))
        if base is None:
            return self._rate_absolute(k, m, ev)
        k0, m0 = M.rate_parts(self.metric, *M.confusion(*base))
        return self._rate_relative(k, m, k0, m0, int(base[0].shape[0]), ev)

    def _class_rate(self, win: Columns, base: Columns | None, ev: dict[str, Any]) -> tuple[float, float | None]:
        def parts(cols: Columns) -> tuple[int, int]:
            y, yhat = cols
            if self.metric == "accuracy":
                return int(np.count_nonzero(y == yhat)), int(y.shape[0])
            code = self._classes[self.class_]  # type: ignore[index]
            mine = y == code
            return int(np.count_nonzero(yhat[mine] == code)), int(np.count_nonzero(mine))

        k, m = parts(win)
        ev.update(classes=int(np.unique(win[0]).shape[0]), correct=k, of=m)
        if self.metric == "class_recall":
            ev["class"] = self.class_
        if base is None:
            return self._rate_absolute(k, m, ev)
        k0, m0 = parts(base)
        return self._rate_relative(k, m, k0, m0, int(base[0].shape[0]), ev)

    def _rate_absolute(self, k: int, m: int, ev: dict[str, Any]) -> tuple[float, float | None]:
        if m == 0:
            raise _Undefined(f"{self.metric} is undefined: nothing to divide by")
        better, thr = self._spec.better, self.threshold
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
            raise _Undefined(f"{self.metric} is undefined {'in the baseline' if m else 'in the window'}")
        rate, rate0 = k / m, k0 / m0
        better = self._spec.better
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
        kind, reps = self._spec.kind, self.bootstrap
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
        metric, task = self.metric, self._spec.task

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
        either = self._spec.better == "either"
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


class _Undefined(Exception):
    """The metric has no value on this window (a rate with nothing to divide by)."""


_PARAMS = (
    "metric", "score_threshold", "baseline", "reference_size", "baseline_size",
    "baseline_variant", "min_positives", "min_negatives", "bootstrap",
)
