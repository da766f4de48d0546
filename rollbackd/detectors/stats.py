"""Statistics shared by the detectors: intervals, tests and multiple-testing corrections.

Every function here is pure and deterministic. Where scipy has a reference implementation the
result matches it (the tests hold each one against scipy); the code exists so the detectors can
reuse presorted references and test many features with one vectorised p-value call instead of
paying scipy's per-call validation on every window.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special
from scipy.stats import binom, kstwo, norm

__all__ = [
    "CORRECTIONS",
    "wilson_interval",
    "binomial_pvalue_greater",
    "two_proportion_pvalue_greater",
    "sorted_rank",
    "ks_statistic",
    "ks_pvalues",
    "ks_two_sample",
    "chi2_2xk",
    "chi2_pvalues",
    "cramers_v",
    "adjust_pvalues",
]

CORRECTIONS: tuple[str, ...] = ("holm", "bonferroni", "bh", "none")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (``(0, 1)`` when ``n == 0``)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    # At k == 0 (k == n) the bound is exactly 0 (1); rounding would leave it a hair off.
    low = 0.0 if k <= 0 else max(0.0, center - half)
    high = 1.0 if k >= n else min(1.0, center + half)
    return low, high


def binomial_pvalue_greater(k: int, n: int, p: float) -> float:
    """Exact one-sided p-value of H0: rate <= ``p`` after ``k`` successes in ``n`` trials.

    Equal to ``scipy.stats.binomtest(k, n, p, alternative="greater").pvalue``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k <= 0:
        return 1.0
    return min(1.0, float(binom.sf(k - 1, n, p)))


def two_proportion_pvalue_greater(k1: int, n1: int, k0: int, n0: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of H1: ``k1/n1 > k0/n0``; returns ``(z, p_value)``.

    When the pooled proportion is 0 or 1 both samples agree exactly, so there is no evidence
    of an increase: ``(0.0, 1.0)``.
    """
    if n1 <= 0 or n0 <= 0:
        raise ValueError(f"both sample sizes must be > 0, got n1={n1}, n0={n0}")
    pooled = (k1 + k0) / (n1 + n0)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n0)
    if var <= 0.0:
        return 0.0, 1.0
    z = (k1 / n1 - k0 / n0) / math.sqrt(var)
    return z, float(norm.sf(z))


def sorted_rank(ref_sorted: np.ndarray) -> np.ndarray:
    """Right-side ranks of a sorted sample in itself: its empirical CDF counts at its own points."""
    return np.searchsorted(ref_sorted, ref_sorted, side="right")


def ks_statistic(
    x: np.ndarray, ref_sorted: np.ndarray, ref_rank: np.ndarray | None = None
) -> float:
    """Two-sided two-sample Kolmogorov–Smirnov D of ``x`` against a presorted reference.

    ``ref_rank`` is :func:`sorted_rank` of the reference, computed once per reference. D is
    bit-for-bit what ``scipy.stats.ks_2samp(x, ref)`` reports: both empirical CDFs are evaluated
    at every point of either sample with the same integer counts and divisions.
    """
    n1, n2 = x.shape[0], ref_sorted.shape[0]
    if n1 == 0 or n2 == 0:
        raise ValueError("ks_statistic needs two non-empty samples")
    xs = np.sort(x)
    if ref_rank is None:
        ref_rank = sorted_rank(ref_sorted)
    at_x = (
        np.searchsorted(xs, xs, side="right") / n1
        - np.searchsorted(ref_sorted, xs, side="right") / n2
    )
    at_ref = np.searchsorted(xs, ref_sorted, side="right") / n1 - ref_rank / n2
    max_s = max(float(at_x.max()), float(at_ref.max()))
    min_s = min(float(at_x.min()), float(at_ref.min()))
    return max(max_s, min(max(-min_s, 0.0), 1.0))


def ks_pvalues(d: np.ndarray, n1: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Smirnov's asymptotic two-sided p-values, vectorised over tests.

    Equal to ``ks_2samp(..., method="asymp").pvalue``: the Kolmogorov distribution at the
    rounded effective size ``n1 * n2 / (n1 + n2)``. The one departure: with one value on each
    side that size rounds to 0 and scipy answers NaN; here the answer is 1.0, no evidence.
    """
    d = np.asarray(d, dtype=float)
    a = np.asarray(n1, dtype=float)
    b = np.asarray(n2, dtype=float)
    # scipy orders the pair (larger, smaller) before multiplying; keep that so the rounding of
    # ``en`` cannot differ at a .5 boundary.
    m, n = np.maximum(a, b), np.minimum(a, b)
    en = np.round(m * n / (m + n))
    p = np.ones(np.broadcast(d, en).shape, dtype=float)
    ok = np.broadcast_to(en >= 1.0, p.shape)
    if ok.any():
        dd, ee = np.broadcast_arrays(d, en)
        p[ok] = np.clip(np.asarray(kstwo.sf(dd[ok], ee[ok]), dtype=float), 0.0, 1.0)
    return p


def ks_two_sample(
    x: np.ndarray, ref_sorted: np.ndarray, ref_rank: np.ndarray | None = None
) -> tuple[float, float]:
    """``(D, p_value)`` of the two-sided asymptotic KS test of ``x`` against a sorted reference."""
    d = ks_statistic(x, ref_sorted, ref_rank)
    p = ks_pvalues(np.array([d]), np.array([x.shape[0]]), np.array([ref_sorted.shape[0]]))
    return d, float(p[0])


def chi2_2xk(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Pearson chi-square statistic and degrees of freedom of the 2×k table ``[a, b]``.

    Columns empty in both rows must be dropped by the caller (scipy refuses them). Matches
    ``scipy.stats.chi2_contingency(np.array([a, b]), correction=False)``, including its
    ``(0.0, dof 0)`` answer for a single category.
    """
    obs = np.array([a, b], dtype=np.float64)
    if obs.ndim != 2 or obs.shape[1] == 0:
        raise ValueError("chi2_2xk needs two equal-length, non-empty count vectors")
    dof = obs.shape[1] - 1
    if dof == 0:
        return 0.0, 0
    rows = obs.sum(axis=1, keepdims=True)
    cols = obs.sum(axis=0, keepdims=True)
    expected = rows * cols / obs.sum()
    if np.any(expected == 0):
        raise ValueError("chi2_2xk: a row or column of the table is empty")
    return float((((obs - expected) ** 2) / expected).sum()), dof


def chi2_pvalues(stat: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """Upper-tail chi-square p-values, vectorised; 1.0 where ``dof == 0``."""
    stat = np.asarray(stat, dtype=float)
    dof = np.asarray(dof, dtype=float)
    with np.errstate(invalid="ignore"):
        p = special.chdtrc(dof, stat)
    return np.where(dof > 0, p, 1.0)


def cramers_v(chi2: float, n_total: float, n_rows: int, n_cols: int) -> float:
    """Cramér's V, ``sqrt(chi2 / (N * (min(r, c) - 1)))``; 0.0 for a degenerate table."""
    k = min(n_rows, n_cols) - 1
    if k <= 0 or n_total <= 0:
        return 0.0
    return math.sqrt(chi2 / (n_total * k))


def adjust_pvalues(p: Sequence[float] | np.ndarray, method: str) -> np.ndarray:
    """Family-wise (``bonferroni``, ``holm``) or false-discovery (``bh``) adjusted p-values.

    ``bh`` matches ``scipy.stats.false_discovery_control(p, method="bh")``; ``none`` returns the
    input. Adjusted values are clipped to 1 and do not depend on how ties are ordered.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}; got {method!r}")
    ps = np.asarray(p, dtype=float)
    m = ps.shape[0]
    if m <= 1 or method == "none":
        return ps.copy()
    if method == "bonferroni":
        return np.minimum(ps * m, 1.0)
    # Stable sort: the result is tie-invariant, but a stable order keeps the arithmetic
    # (and so the last bit) reproducible across numpy versions.
    order = np.argsort(ps, kind="stable")
    sp = ps[order]
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(sp * np.arange(m, 0, -1, dtype=float), 1.0))
    else:  # bh
        adj = sp * (m / np.arange(1, m + 1, dtype=float))
        np.minimum.accumulate(adj[::-1], out=adj[::-1])
        adj = np.clip(adj, 0.0, 1.0)
    out = np.empty(m, dtype=float)
    out[order] = adj
    return out
