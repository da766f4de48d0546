"""Model-quality metrics on labelled outcomes, and the tests that compare them.

Pure numpy on columns: binary labels ``y`` (0/1 ints), predicted classes ``yhat`` (0/1),
scores ``s`` (floats); class codes for multiclass; numbers for regression. Each metric is
scikit-learn's definition (the tests hold each one against scikit-learn on random inputs):
the functions exist so a detector pays for one vectorised pass per window and can resample a
metric without re-sorting the data.

The comparisons (``*_test``) are one-sided: the p-value is for "the window is *worse* than the
baseline" (or than a fixed level), whatever way round "worse" is for the metric.
"""

from __future__ import annotations

import math
import numpy as np
from scipy.stats import norm, rankdata

__all__ = [
    "confusion",
    "rate_parts",
    "roc_auc",
    "delong_placements",
    "delong_variance",
    "delong_test",
    "average_precision",
    "score_atoms",
    "ap_from_atoms",
    "bootstrap_average_precision",
    "f1_from_counts",
    "bootstrap_f1",
    "confusion_matrix",
    "macro_f1_from_matrix",
    "bootstrap_macro_f1",
    "binary_losses",
    "regression_losses",
    "bootstrap_test",
    "BOOTSTRAP_ATOMS",
    "bootstrap_generator",
]

# sklearn's log_loss clips probabilities to [eps, 1 - eps] with the float64 machine epsilon.
_EPS = float(np.finfo(np.float64).eps)


# -- counts ---------------------------------------------------------------------------------------


def confusion(y: np.ndarray, yhat: np.ndarray) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` of 0/1 arrays."""
    tn, fp, fn, tp = np.bincount(2 * y.astype(np.intp) + yhat, minlength=4)[:4]
    return int(tp), int(fp), int(tn), int(fn)


def rate_parts(metric: str, tp: int, fp: int, tn: int, fn: int) -> tuple[int, int]:
    """``(successes, trials)`` of a rate metric: precision is tp of the predicted positives,
    recall tp of the positives, fpr fp of the negatives, positive_rate the predicted positives
    of all, accuracy the correct ones of all."""
    if metric == "precision":
        return tp, tp + fp
    if metric == "recall":
        return tp, tp + fn
    if metric == "fpr":
        return fp, fp + tn
    if metric == "positive_rate":
        return tp + fp, tp + fp + tn + fn
    if metric == "accuracy":
        return tp + tn, tp + fp + tn + fn
    raise ValueError(f"{metric!r} is not a binary rate metric")


def f1_from_counts(tp: np.ndarray | int, fp: np.ndarray | int, fn: np.ndarray | int) -> np.ndarray:
    """``2tp / (2tp + fp + fn)``, 0 where nothing was positive either way (sklearn's
    ``zero_division=0``)."""
    tp, fp, fn = np.asarray(tp, float), np.asarray(fp, float), np.asarray(fn, float)
    den = 2.0 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2.0 * tp / np.where(den > 0, den, 1.0), 0.0)


# -- ROC AUC and DeLong -----------------------------------------------------------------------


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve: the Mann–Whitney U of the positives' scores over n1·n0
    (ties count one half), as ``sklearn.metrics.roc_auc_score``."""
    pos = y == 1
    n1 = int(pos.sum())
    n0 = y.shape[0] - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("roc_auc needs both classes")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def delong_placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components ``(V10, V01)`` by Sun & Xu's (2014) midrank algorithm.

    ``V10[i] = mean_j psi(x_i, z_j)`` over the negatives' scores ``z`` for each positive's score
    ``x_i``, and ``V01[j] = mean_i psi(x_i, z_j)`` for each negative, with ``psi(a, b) = 1`` if
    ``a > b``, 1/2 if equal, else 0 (DeLong, DeLong & Clarke-Pearson 1988). With midranks
    ``Tx`` of the positives among themselves, ``Tz`` of everything pooled and ``Ty`` of the
    negatives among themselves: ``V10 = (Tz_x - Tx) / n0`` and ``V01 = 1 - (Tz_z - Ty) / n1``,
    O(n log n) instead of the pairwise O(n1 n0). ``mean(V10) == mean(V01) == AUC``.
    """
    pos = y == 1
    x, z = s[pos], s[~pos]
    n1, n0 = x.shape[0], z.shape[0]
    if n1 == 0 or n0 == 0:
        raise ValueError("delong_placements needs both classes")
    tz = rankdata(np.concatenate((x, z)))
    v10 = (tz[:n1] - rankdata(x)) / n0
    v01 = 1.0 - (tz[n1:] - rankdata(z)) / n1
    return v10, v01


def delong_variance(v10: np.ndarray, v01: np.ndarray) -> float:
    """``Var(AUC) = S10 / n1 + S01 / n0``, the components' sample variances (ddof 1) over their
    counts (DeLong 1988, eq. for a single AUC). 0 with a single positive or negative's term
    left out (its variance is not estimable)."""
    s10 = float(np.var(v10, ddof=1)) if v10.shape[0] > 1 else 0.0
    s01 = float(np.var(v01, ddof=1)) if v01.shape[0] > 1 else 0.0
    return s10 / v10.shape[0] + s01 / v01.shape[0]


def delong_test(
    y: np.ndarray, s: np.ndarray, baseline: tuple[np.ndarray, np.ndarray] | float
) -> tuple[float, float, float, float]:
    """One-sided test of "AUC below the baseline's": ``(auc, baseline_auc, z, p_value)``.

    The baseline is an independent sample (another version, the reference, the other arm):
    the variance of the difference is the sum of both DeLong variances (the unpaired case of
    DeLong 1988). A number as baseline is a fixed level (variance 0). ``z`` is
    ``(auc - baseline) / sd``; p = Φ(z). No spread on either side: p is 0 when the AUC is
    below the baseline, else 1.
    """
    v10, v01 = delong_placements(y, s)
    auc = float(v10.mean())
    var = delong_variance(v10, v01)
    if isinstance(baseline, tuple):
        b10, b01 = delong_placements(*baseline)
        base = float(b10.mean())
        var += delong_variance(b10, b01)
    else:
        base = float(baseline)
    diff = auc - base
    if var <= 0.0:
        return auc, base, (math.copysign(math.inf, diff) if diff else 0.0), (0.0 if diff < 0 else 1.0)
    z = diff / math.sqrt(var)
    return auc, base, z, float(norm.cdf(z))


# -- average precision ------------------------------------------------------------------------


def score_atoms(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives at each distinct score, highest score first."""
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y, minlength=values.shape[0])
    total = np.bincount(inverse, minlength=values.shape[0])
    return pos[::-1].astype(np.int64), (total - pos)[::-1].astype(np.int64)


def ap_from_atoms(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision of count arrays ``(..., k)`` over distinct scores, highest first:
    ``Σ_k (ΔTP_k / P) · TP_k / (TP_k + FP_k)``. NaN where there is no positive."""
    tp = np.cumsum(pos, axis=-1, dtype=float)
    fp = np.cumsum(neg, axis=-1, dtype=float)
    called = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(called > 0, tp / np.where(called > 0, called, 1.0), 0.0)
        total = tp[..., -1]
        return (pos * precision).sum(axis=-1) / np.where(total > 0, total, np.nan)


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision, ``Σ (R_k − R_{k−1}) P_k`` over the distinct score thresholds, as
    ``sklearn.metrics.average_precision_score`` (no interpolation)."""
    pos, neg = score_atoms(y, s)
    if pos.sum() == 0:
        raise ValueError("average_precision needs a positive")
    return float(ap_from_atoms(pos, neg))


# -- multiclass -----------------------------------------------------------------------------


def confusion_matrix(y: np.ndarray, yhat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, matrix)`` over the class codes present in either column; ``matrix[i, j]``
    counts true ``classes[i]`` predicted ``classes[j]``."""
    classes, inverse = np.unique(np.concatenate((y, yhat)), return_inverse=True)
    k, n = classes.shape[0], y.shape[0]
    cells = np.bincount(inverse[:n] * k + inverse[n:], minlength=k * k)
    return classes, cells.reshape(k, k)


def macro_f1_from_matrix(m: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices ``(..., k, k)``: the mean F1 over the classes present in
    the labels or the predictions (sklearn's ``f1_score(average="macro")``)."""
    tp = np.diagonal(m, axis1=-2, axis2=-1).astype(float)
    fn = m.sum(axis=-1) - tp
    fp = m.sum(axis=-2) - tp
    den = 2.0 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(den > 0, 2.0 * tp / np.where(den > 0, den, 1.0), np.nan)
        return np.nanmean(f1, axis=-1)


# -- per-sample losses --------------------------------------------------------------------------


def binary_losses(metric: str, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-outcome loss whose mean is the metric: log loss (scores clipped to
    ``[eps, 1 − eps]`` as sklearn does) or the Brier score's squared error."""
    if metric == "log_loss":
        p = np.clip(s, _EPS, 1.0 - _EPS)
        return -np.where(y == 1, np.log(p), np.log1p(-p))
    if metric == "brier":
        d = s - y
        return d * d
    raise ValueError(f"{metric!r} is not a mean binary loss")


def regression_losses(metric: str, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-outcome terms whose mean is the metric (rmse: the squared error, whose mean is the
    square of it; mape: ``|p − y| / max(|y|, eps)`` as sklearn; bias: ``p − y``)."""
    err = p - y
    if metric == "mae":
        return np.abs(err)
    if metric == "rmse":
        return err * err
    if metric == "mape":
        return np.abs(err) / np.maximum(np.abs(y), _EPS)
    if metric == "bias":
        return err
    raise ValueError(f"{metric!r} is not a regression metric")


# -- bootstrap ------------------------------------------------------------------------------


def bootstrap_generator(*data: int) -> np.random.Generator:
    """A generator seeded from integers that describe the data (sizes, counts): the same
    windows always draw the same resamples, so a replay is byte-identical."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([abs(int(d)) for d in data])))


def _multinomial(rng: np.random.Generator, counts: np.ndarray, replicates: int) -> np.ndarray:
    """``replicates`` resamples (with replacement, of the same size) of a sample summarised by
    the counts of its distinct cells: multinomial draws of the cell counts."""
    n = int(counts.sum())
    return rng.multinomial(n, counts / n, size=replicates)


def bootstrap_f1(rng: np.random.Generator, tp: int, fp: int, tn: int, fn: int, replicates: int) -> np.ndarray:
    """F1 of ``replicates`` resamples of a confusion table (resampling outcomes is resampling
    its four cells multinomially)."""
    d = _multinomial(rng, np.array([tp, fp, tn, fn], dtype=float), replicates)
    return f1_from_counts(d[:, 0], d[:, 1], d[:, 3])


def bootstrap_macro_f1(rng: np.random.Generator, matrix: np.ndarray, replicates: int) -> np.ndarray:
    k = matrix.shape[0]
    d = _multinomial(rng, matrix.ravel().astype(float), replicates)
    return macro_f1_from_matrix(d.reshape(replicates, k, k))


# Largest replicates × atoms block drawn at once (memory: 8 bytes each, a few arrays of it).
_BLOCK = 1 << 20
# Distinct scores a resample of average precision keeps: beyond, neighbouring scores are merged
# (their order within a merged group is lost, so they count as tied). The resamples only
# estimate AP's standard error, which that barely moves; the value itself is exact.
BOOTSTRAP_ATOMS = 1000


def bootstrap_average_precision(
    rng: np.random.Generator, pos: np.ndarray, neg: np.ndarray, replicates: int,
    max_atoms: int = BOOTSTRAP_ATOMS,
) -> np.ndarray:
    """Average precision of ``replicates`` resamples of a sample given as its :func:`score_atoms`:
    the (score, label) cells are drawn multinomially, so nothing is sorted again, and at most
    ``max_atoms`` distinct scores are kept (see :data:`BOOTSTRAP_ATOMS`). NaN for a resample
    without a positive."""
    k = pos.shape[0]
    if k > max_atoms:
        group = np.arange(k) * max_atoms // k
        pos = np.bincount(group, weights=pos, minlength=max_atoms)
        neg = np.bincount(group, weights=neg, minlength=max_atoms)
        k = max_atoms
    cells = np.concatenate((pos, neg)).astype(float)
    keep = cells > 0
    out = np.empty(replicates)
    step = max(1, _BLOCK // max(1, 2 * k))
    for start in range(0, replicates, step):
        b = min(step, replicates - start)
        drawn = np.zeros((b, 2 * k), dtype=np.int64)
        drawn[:, keep] = _multinomial(rng, cells[keep], b)
        out[start : start + b] = ap_from_atoms(drawn[:, :k], drawn[:, k:])
    return out


def bootstrap_test(degradation: float, *replicates: np.ndarray) -> tuple[float, float]:
    """One-sided test of "worse" from a metric's bootstrap replicates on each side: ``(z, p)``
    with ``z = degradation / sqrt(Σ se²)``, each ``se`` the standard deviation (ddof 1) of that
    side's replicates (drawn independently: the samples are), ``p = 1 − Φ(z)``. A normal test
    on a bootstrap standard error rather than a percentile count: continuous p-values from a few
    hundred replicates. Replicates where the metric is undefined (a resample without a positive)
    are left out. No spread at all: p is 0 for a degradation, else 1."""
    var = 0.0
    for r in replicates:
        r = r[np.isfinite(r)]
        if r.shape[0] > 1:
            var += float(np.var(r, ddof=1))
    if var <= 0.0:
        return (math.copysign(math.inf, degradation) if degradation else 0.0), (0.0 if degradation > 0 else 1.0)
    z = degradation / math.sqrt(var)
    return z, float(norm.sf(z))
