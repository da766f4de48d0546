"""Model quality on joined outcomes: the metric a model card states, against a fixed level or a
baseline (the previous version, a reference period, the stable arm in the same window, the same
time one period earlier).

The detector wires three parts: an :class:`~.model_quality_measure.OutcomeReader` (outcomes to
columns), a baseline (:mod:`.model_quality_baselines`: what is kept and what a window is
compared with) and a :class:`~.model_quality_measure.QualityMeasure` (the minimums, the value
and the one-sided test)."""

from __future__ import annotations

import difflib
import math
from typing import Any

from rollbackd.detectors.base import Measurement, Window, register
from rollbackd.detectors.model_quality_baselines import (
    MAX_VERSIONS,
    NoBaseline,
    OtherArm,
    PreviousVersion,
    QualityBaseline,
    Reference,
    SameTime,
)
from rollbackd.detectors.model_quality_measure import (
    ALIASES,
    MAX_CLASSES,
    METRICS,
    Columns,
    MetricSpec,
    OutcomeReader,
    QualityMeasure,
    Tally,
    Undefined,
    class_key,
)
from rollbackd.detectors.seasonal import parse_period

__all__ = ["ModelQuality", "METRICS", "BASELINES", "MetricSpec", "MAX_CLASSES", "MAX_VERSIONS"]

BASELINES = ("absolute", "reference", "previous_version", "stable", "same_time")
# Metrics that condition on the positive class (min_positives 10 by default) and on the
# negative class (min_negatives 10): a recall on 3 positives is not a verdict.
_NEEDS_POSITIVES = frozenset({"recall", "f1", "pr_auc", "roc_auc", "precision", "class_recall"})
_NEEDS_NEGATIVES = frozenset({"fpr", "roc_auc"})


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
    labelled so far), ``stable`` (the other arm in the same window, ``baseline_variant`` or
    else "stable" / "primary") and ``same_time`` (the window that ended one ``period`` earlier,
    ``1d``, ``7d`` or seconds, so a daily or weekly cycle of label quality is not a fault):
    ``value`` is the **degradation**, baseline − window where higher is better,
    window − baseline where lower is better, |window − baseline| for positive_rate and bias,
    so the rule keeps ``direction: above``. ``p_value`` is one-sided: Fisher's exact test for
    the rates, DeLong's test for ROC AUC (the two AUCs' variances added: independent samples),
    Welch's t-test on the per-outcome losses for the mean losses, and for F1, macro-F1 and PR
    AUC a normal test of the degradation over the standard error of a seeded bootstrap of
    each sample (``bootstrap`` replicates; the generator is seeded from the counts, so a
    replay draws the same resamples; see :func:`metrics.bootstrap_test`).

    ``same_time`` keeps each window for one period (:mod:`.model_quality_baselines`): the
    counts of a rate metric (exact), else at most ``same_time_size`` of its usable outcomes,
    evenly spaced in (score or prediction, label) order, never drawn at random, so a replay
    keeps the same ones; the test counts them as a sample of that size (conservative when the
    window held more). No verdict in the first period, after a gap, or when that window has
    too few labels (the reason names same_time and the period).

    No verdict when there are fewer usable outcomes than ``min_samples``, fewer positives
    (predicted positives for precision, outcomes of the class for class_recall) than
    ``min_positives`` or fewer negatives than ``min_negatives`` — in the window, or in the
    baseline (for same_time, in what is kept of the earlier window). ``evidence``: task,
    metric, baseline kind, n, unusable, label_coverage, positives and the confusion counts
    (binary), the metric's value in the window and in the baseline and the baseline's n,
    version, arm or end (same_time), and the test used.
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset, with the
    # reader's class vocabulary and the baseline's own declared state within it.
    STATE = (
        "_seen", "_why", "_win", "_base", "_base_label", "_unusable", "_label_coverage",
        "_version", "_measured", "_reader", "_source",
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
        period: float | str | None = None,
        same_time_size: int = 1000,
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
        if name == "class_recall" and class_key(cls) is None:
            raise ValueError(f"class must name the class whose recall is measured, got {cls!r}")
        if cls is not None and name != "class_recall":
            raise ValueError(f"class is for metric: class_recall (got metric {name!r})")
        if baseline_variant is not None and baseline != "stable":
            raise ValueError(f"baseline_variant needs baseline: stable (got baseline {baseline!r})")
        if baseline_variant is not None and not (
            isinstance(baseline_variant, str) and baseline_variant
        ):
            raise ValueError(f"baseline_variant must be a variant name, got {baseline_variant!r}")
        seconds = parse_period(period, baseline == "same_time", "baseline: same_time")
        if not (type(same_time_size) is int and 2 <= same_time_size <= 1_000_000):
            raise ValueError(f"same_time_size must be an integer in [2, 1000000], got {same_time_size!r}")
        if seconds is not None and spec.kind not in ("rate", "class_rate") and same_time_size < min_samples:
            # The minimum counts what the test reads: the kept outcomes of the earlier window.
            raise ValueError(
                f"same_time_size must be >= min_samples ({same_time_size} < {min_samples}): "
                f"a {name} baseline keeps at most same_time_size outcomes of a window"
            )
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
        self.period = period
        self.same_time_size = same_time_size
        self.class_ = class_key(cls) if cls is not None else None
        self._spec = spec
        self._reader = OutcomeReader(spec, score_threshold)
        self._measure = QualityMeasure(
            name, self._reader, threshold=threshold, score_threshold=score_threshold,
            min_samples=min_samples, min_positives=self.min_positives,
            min_negatives=self.min_negatives, bootstrap=bootstrap, class_=self.class_,
        )
        self._source: QualityBaseline
        if baseline == "reference":
            self._source = Reference(self._reader, reference_size)
        elif baseline == "previous_version":
            self._source = PreviousVersion(self._reader, baseline_size)
        elif baseline == "stable":
            self._source = OtherArm(self._reader, baseline_variant)
        elif seconds is not None:
            self._source = SameTime(self._reader, self._measure, seconds, same_time_size)
        else:
            self._source = NoBaseline(self._reader)
        self._reset()

    def _reset(self) -> None:
        self._seen = False
        # Why this window gives no verdict before any count is looked at (no baseline arm, the
        # reference still being built...), else None.
        self._why: str | None = None
        self._win: Columns | None = None
        self._base: Columns | Tally | None = None
        # What the baseline is, for the evidence: {"baseline_version": "7"}, {"baseline_variant": ...}.
        self._base_label: dict[str, Any] = {}
        self._unusable = 0
        self._label_coverage: float | None = None
        self._version: str | None = None
        # The measurement of the last window once evaluated; the window's and the baseline's
        # columns are dropped then, so a checkpoint between windows holds neither twice.
        self._measured: Measurement | None = None
        self._reader._reset()
        self._source._reset()

    # Read-only views of state kept by the parts (tests and a debugger read them).

    @property
    def _classes(self) -> dict[str, int]:
        return self._reader.classes

    @property
    def _buffers(self) -> dict[str, Columns]:
        return self._source.buffers if isinstance(self._source, PreviousVersion) else {}

    @property
    def _recent(self) -> list[str]:
        return self._source.recent if isinstance(self._source, PreviousVersion) else []

    # -- update and evaluate ---------------------------------------------------------------

    def update(self, window: Window) -> None:
        self._seen = True
        self._measured = None
        self._label_coverage = window.label_coverage
        judged = self._source.judge(window)
        self._win, self._unusable, self._base = judged.win, judged.unusable, judged.base
        self._base_label, self._why, self._version = judged.label, judged.why, judged.version

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
        measure = self._measure
        short = measure.too_few(win, "")
        if short is not None:
            return Measurement.insufficient_data(thr, n, short, **evidence)
        if self._why is not None:
            return Measurement.insufficient_data(thr, n, self._why, **evidence, **self._base_label)
        assert win is not None
        base = self._base
        if self.baseline != "absolute":
            evidence.update(self._base_label)
            short = measure.too_few(base, self._source.side)
            if short is not None:
                evidence["baseline_n"] = measure.tally(base).n
                return Measurement.insufficient_data(thr, n, short, **evidence)
        try:
            value, p_value = measure.measure(win, base, evidence)
        except Undefined as why:
            return Measurement.insufficient_data(thr, n, str(why), **evidence)
        return Measurement(
            value, thr, n, p_value=p_value,
            effect_size=value if self.baseline != "absolute" else None,
            evidence=evidence,
        )


_PARAMS = (
    "metric", "score_threshold", "baseline", "reference_size", "baseline_size",
    "baseline_variant", "min_positives", "min_negatives", "bootstrap", "period", "same_time_size",
)
