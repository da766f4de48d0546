"""Model error on labelled outcomes: misclassification rate (binary) or MAE (regression)."""

from __future__ import annotations

import math
from collections import Counter
from operator import attrgetter
from typing import Any, Sequence

import numpy as np

from rollbackd.detectors.base import Labeled, Measurement, Window, register
from rollbackd.detectors.stats import binomial_pvalue_greater, wilson_interval

__all__ = ["ModelError", "binary_value"]

TASKS = ("auto", "binary", "regression")

# True == 1 == 1.0 hash alike, so one entry covers the bool, int and float spellings.
_BINARY: dict[Any, int] = {
    True: 1, False: 0, "1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0,
}


def binary_value(v: Any) -> int | None:
    """0 or 1 for the usual spellings of a binary class (bool, 0/1, "true"/"yes"...), else None."""
    if v is None:
        return None
    t = type(v)
    if t is bool or t is int or t is float:
        return _BINARY.get(v)
    if t is str:
        return _BINARY.get(v.strip().lower())
    return None


_get_label = attrgetter("label")
_get_prediction = attrgetter("prediction")


def _number(v: Any) -> float | None:
    t = type(v)
    if (t is float or t is int) and math.isfinite(v):
        return float(v)
    return None


@register("model_error")
class ModelError:
    """Error of the model on the outcomes (labels) that arrived in the window.

    ``task="binary"``: the predicted class is ``prediction`` read as 0/1 (bool, 0/1, "true",
    "yes"... see :func:`binary_value`), or ``score >= score_threshold`` when ``prediction`` is
    None; ``value`` is the misclassification rate and ``p_value`` the exact one-sided binomial
    test of H0: rate <= ``threshold``. ``task="regression"``: ``value`` is the mean absolute
    error of numeric predictions, without a p-value. ``task="auto"`` reads binary until a label
    that is a number other than 0/1 appears, then stays regression: a regression model's window
    can hold only 0/1 labels by chance, a classifier's never holds 2.5.

    Outcomes whose label or prediction cannot be used are counted as ``unusable``;
    ``sample_size`` is the number of usable pairs. ``evidence`` holds the task, n, unusable,
    label_coverage and the confusion counts (binary) or bias and RMSE (regression).
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset.
    STATE = ("_resolved", "_window_seen", "_stats", "_label_coverage")

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        task: str = "auto",
        score_threshold: float = 0.5,
        confidence: float = 0.95,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        if threshold < 0.0 or (task == "binary" and threshold > 1.0):
            raise ValueError(
                f"threshold must be in [0, 1] for binary, >= 0 for regression; got {threshold}"
            )
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.task = task
        self.score_threshold = score_threshold
        self.confidence = confidence
        self._reset()

    def _reset(self) -> None:
        self._resolved: str | None = None if self.task == "auto" else self.task
        self._window_seen = False
        self._stats: dict[str, Any] = {}
        self._label_coverage: float | None = None

    def update(self, window: Window) -> None:
        outcomes = window.outcomes
        self._window_seen = True
        self._label_coverage = window.label_coverage
        if self._resolved is None:
            self._resolve(outcomes)
        if (self._resolved or "binary") == "binary":
            self._stats = self._binary(outcomes)
        else:
            self._stats = self._regression(outcomes)

    def skip(self, window: Window) -> None:
        """A window that is not measured (:class:`~rollbackd.detectors.base.Skipping`): only
        its labels' say on the task (``auto``) is kept; the error is the tested window's."""
        if self._resolved is None and window.outcomes:
            self._resolve(window.outcomes)

    def _resolve(self, outcomes: Sequence[Labeled]) -> None:
        """``auto``: regression from the first label that is a number other than 0/1."""
        labels = set(map(_get_label, outcomes))
        if _BINARY.keys() >= labels:  # the usual window: only spellings of 0 and 1 (in C)
            return
        if any(binary_value(y) is None and _number(y) is not None for y in labels):
            self._resolved = "regression"

    def _binary(self, outcomes: Sequence[Labeled]) -> dict[str, Any]:
        # Labels and predictions take a handful of distinct values: count the distinct
        # (label, prediction) pairs in C and normalise each pair once, not once per outcome.
        tp = fp = tn = fn = unusable = 0
        if not outcomes:  # a window without labels (most, on a quiet deployment): nothing to count
            return {"task": "binary", "tp": 0, "fp": 0, "tn": 0, "fn": 0, "unusable": 0}
        cut = self.score_threshold
        pairs = Counter(zip(map(_get_label, outcomes), map(_get_prediction, outcomes)))
        by_score: list[Labeled] = []
        if any(pred is None for _, pred in pairs):
            by_score = [o for o in outcomes if o.prediction is None]
        cells: Counter[tuple[int | None, int | None]] = Counter()
        for (label, pred), count in pairs.items():
            if pred is not None:
                cells[(binary_value(label), binary_value(pred))] += count
        for o in by_score:
            cells[(binary_value(o.label), None if o.score is None else int(o.score >= cut))] += 1
        for (y, yhat), count in cells.items():
            if y is None or yhat is None:
                unusable += count
            elif y:
                if yhat:
                    tp += count
                else:
                    fn += count
            elif yhat:
                fp += count
            else:
                tn += count
        return {"task": "binary", "tp": tp, "fp": fp, "tn": tn, "fn": fn, "unusable": unusable}

    def _regression(self, outcomes: Sequence[Labeled]) -> dict[str, Any]:
        pairs = [(_number(o.prediction), _number(o.label)) for o in outcomes]
        usable = [(p, y) for p, y in pairs if p is not None and y is not None]
        stats: dict[str, Any] = {"task": "regression", "unusable": len(pairs) - len(usable)}
        if usable:
            err = np.array([p for p, _ in usable]) - np.array([y for _, y in usable])
            stats["mae"] = float(np.mean(np.abs(err)))
            stats["bias"] = float(np.mean(err))
            stats["rmse"] = float(np.sqrt(np.mean(err * err)))
        stats["n"] = len(usable)
        return stats

    def evaluate(self, now: float) -> Measurement:
        if not self._window_seen:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        s = self._stats
        task = s["task"]
        n = s["n"] if task == "regression" else s["tp"] + s["fp"] + s["tn"] + s["fn"]
        if n == 0 or n < self.min_samples:
            return Measurement.insufficient_data(
                self.threshold,
                n,
                "no usable labels in window"
                if n == 0
                else f"fewer than min_samples={self.min_samples} usable labels",
                task=task,
                unusable=s["unusable"],
                label_coverage=self._label_coverage,
            )
        evidence: dict[str, Any] = {
            "task": task,
            "n": n,
            "unusable": s["unusable"],
            "label_coverage": self._label_coverage,
        }
        if task == "binary":
            errors = s["fp"] + s["fn"]
            low, high = wilson_interval(errors, n, self.confidence)
            evidence.update(
                errors=errors, tp=s["tp"], fp=s["fp"], tn=s["tn"], fn=s["fn"],
                wilson_low=low, wilson_high=high,
            )
            p_value = (
                binomial_pvalue_greater(errors, n, self.threshold) if self.threshold <= 1.0 else None
            )
            return Measurement(errors / n, self.threshold, n, p_value=p_value, evidence=evidence)
        evidence.update(bias=s["bias"], rmse=s["rmse"])
        return Measurement(s["mae"], self.threshold, n, evidence=evidence)
