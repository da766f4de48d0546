"""The detectors' statistics held against scipy and against formulas written out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from rollbackd.detectors.stats import (
    adjust_pvalues,
    binomial_pvalue_greater,
    chi2_2xk,
    chi2_pvalues,
    cramers_v,
    ks_pvalues,
    ks_statistic,
    ks_two_sample,
    sorted_rank,
    two_proportion_pvalue_greater,
    wilson_interval,
)

FAST = settings(max_examples=150, deadline=None, derandomize=True)


def close(a: float, b: float, rel: float = 1e-9, abs_: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# -- binomial --------------------------------------------------------------------------------


@FAST
@given(
    n=st.integers(1, 3000),
    frac=st.floats(0.0, 1.0),
    p=st.floats(0.0, 1.0),
)
def test_binomial_pvalue_matches_binomtest(n: int, frac: float, p: float) -> None:
    k = round(frac * n)
    expected = sps.binomtest(k, n, p, alternative="greater").pvalue
    assert close(binomial_pvalue_greater(k, n, p), expected, rel=1e-12, abs_=1e-300)


def test_binomial_pvalue_edges() -> None:
    assert binomial_pvalue_greater(0, 10, 0.3) == 1.0
    assert binomial_pvalue_greater(10, 10, 0.0) == 0.0
    assert binomial_pvalue_greater(3, 10, 1.0) == 1.0
    # P(X >= 2 | n=2, p=0.5) = 0.25
    assert binomial_pvalue_greater(2, 2, 0.5) == pytest.approx(0.25, rel=1e-15)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binomial_pvalue_greater(1, 10, 1.5)


# -- Wilson ----------------------------------------------------------------------------------


def wilson_by_hand(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = p + z**2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    denom = 1 + z**2 / n
    return (centre - spread) / denom, (centre + spread) / denom


@FAST
@given(n=st.integers(1, 100_000), frac=st.floats(0.0, 1.0), conf=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_matches_formula(n: int, frac: float, conf: float) -> None:
    k = round(frac * n)
    z = sps.norm.ppf(1 - (1 - conf) / 2)
    lo, hi = wilson_interval(k, n, conf)
    elo, ehi = wilson_by_hand(k, n, z)
    assert lo == pytest.approx(max(0.0, elo), rel=1e-9, abs=1e-15)
    assert hi == pytest.approx(min(1.0, ehi), rel=1e-9, abs=1e-15)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_known_value_and_edges() -> None:
    # 5/10 at 95%: 0.5 ± 1.96*sqrt(0.025 + 0.0960)/1.384 (z = 1.959964)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2365931, abs=1e-7)
    assert hi == pytest.approx(0.7634069, abs=1e-7)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 50)[0] == 0.0
    assert wilson_interval(50, 50)[1] == 1.0
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        wilson_interval(1, 10, 1.0)


# -- two-proportion z ------------------------------------------------------------------------


@FAST
@given(
    n1=st.integers(1, 5000), n0=st.integers(1, 5000), f1=st.floats(0, 1), f0=st.floats(0, 1)
)
def test_two_proportion_matches_formula(n1: int, n0: int, f1: float, f0: float) -> None:
    k1, k0 = round(f1 * n1), round(f0 * n0)
    z, p = two_proportion_pvalue_greater(k1, n1, k0, n0)
    pooled = (k1 + k0) / (n1 + n0)
    if pooled in (0.0, 1.0):
        assert (z, p) == (0.0, 1.0)
        return
    ez = (k1 / n1 - k0 / n0) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    assert z == pytest.approx(ez, rel=1e-12, abs=1e-12)
    assert p == pytest.approx(0.5 * math.erfc(ez / math.sqrt(2)), rel=1e-9, abs=1e-300)


def test_two_proportion_rejects_empty_samples() -> None:
    with pytest.raises(ValueError, match="> 0"):
        two_proportion_pvalue_greater(0, 0, 1, 10)


# -- Kolmogorov–Smirnov ----------------------------------------------------------------------


def check_ks(x: np.ndarray, ref: np.ndarray) -> None:
    ref_sorted = np.sort(ref)
    d, p = ks_two_sample(x, ref_sorted, sorted_rank(ref_sorted))
    with warnings.catch_warnings():
        # scipy divides by zero on its way to NaN when both samples hold one value.
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = sps.ks_2samp(x, ref, method="asymp")
        swapped = sps.ks_2samp(ref, x, method="asymp")
    assert d == float(expected.statistic)  # same counts, same divisions: bit-for-bit
    if x.shape[0] == ref.shape[0] == 1:
        assert math.isnan(expected.pvalue) and p == 1.0  # scipy has no answer; we say "no evidence"
    else:
        assert close(p, float(expected.pvalue), rel=1e-9, abs_=1e-300)
    # The statistic is symmetric, so the reference may sit on either side.
    assert d == float(swapped.statistic)


@pytest.mark.parametrize("seed", range(12))
def test_ks_matches_scipy_seeded(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n1 = int(rng.integers(1, 4000))
    n2 = int(rng.integers(1, 6000))
    shift = float(rng.choice([0.0, 0.05, 0.3, 2.0]))
    x = rng.normal(shift, 1.0, n1)
    ref = rng.normal(0.0, 1.0, n2)
    if seed % 3 == 0:  # heavy ties
        x, ref = np.round(x, 1), np.round(ref, 1)
    check_ks(x, ref)


@FAST
@given(
    x=st.lists(st.integers(-20, 20), min_size=1, max_size=300),
    ref=st.lists(st.integers(-20, 20), min_size=1, max_size=300),
)
def test_ks_matches_scipy_with_ties(x: list[int], ref: list[int]) -> None:
    check_ks(np.array(x, dtype=float), np.array(ref, dtype=float))


@FAST
@given(
    x=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200),
    ref=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200),
)
def test_ks_matches_scipy_floats(x: list[float], ref: list[float]) -> None:
    check_ks(np.array(x), np.array(ref))


def test_ks_vectorised_pvalues_equal_single_calls() -> None:
    rng = np.random.default_rng(7)
    ds, n1s, n2s, want = [], [], [], []
    for shift in (0.0, 0.02, 0.1, 0.5, 3.0):
        x, ref = rng.normal(shift, 1, 1500), rng.normal(0, 1, 2500)
        ds.append(ks_statistic(x, np.sort(ref)))
        n1s.append(1500)
        n2s.append(2500)
        want.append(sps.ks_2samp(x, ref, method="asymp").pvalue)
    got = ks_pvalues(np.array(ds), np.array(n1s), np.array(n2s))
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_ks_identical_and_disjoint_samples() -> None:
    a = np.arange(100.0)
    assert ks_two_sample(a, a) == (0.0, 1.0)
    d, p = ks_two_sample(a + 1000.0, a)
    assert d == 1.0 and p < 1e-40
    with pytest.raises(ValueError):
        ks_statistic(np.array([]), a)


# -- chi-square ------------------------------------------------------------------------------


@FAST
@given(
    st.lists(
        st.tuples(st.integers(0, 500), st.integers(0, 500)).filter(lambda c: c[0] + c[1] > 0),
        min_size=1,
        max_size=12,
    ).filter(lambda cols: sum(a for a, _ in cols) > 0 and sum(b for _, b in cols) > 0)
)
def test_chi2_matches_scipy(cols: list[tuple[int, int]]) -> None:
    a = np.array([c[0] for c in cols], dtype=float)
    b = np.array([c[1] for c in cols], dtype=float)
    stat, dof = chi2_2xk(a, b)
    p = float(chi2_pvalues(np.array([stat]), np.array([dof]))[0])
    res = sps.chi2_contingency(np.array([a, b]), correction=False)
    assert dof == res.dof
    assert close(stat, float(res.statistic), rel=1e-12, abs_=1e-12)
    assert close(p, float(res.pvalue), rel=1e-9, abs_=1e-300)


def test_chi2_known_table_and_refusals() -> None:
    # [[10, 20], [30, 40]]: expected [[12, 18], [28, 42]] -> 4/12 + 4/18 + 4/28 + 4/42
    stat, dof = chi2_2xk(np.array([10.0, 20.0]), np.array([30.0, 40.0]))
    assert dof == 1
    assert stat == pytest.approx(4 / 12 + 4 / 18 + 4 / 28 + 4 / 42, rel=1e-14)
    assert chi2_2xk(np.array([5.0]), np.array([7.0])) == (0.0, 0)
    assert chi2_pvalues(np.array([0.0]), np.array([0])).tolist() == [1.0]
    with pytest.raises(ValueError):
        chi2_2xk(np.array([0.0, 0.0]), np.array([3.0, 4.0]))


def test_cramers_v() -> None:
    assert cramers_v(25.0, 100.0, 2, 5) == pytest.approx(0.5)
    assert cramers_v(30.0, 100.0, 3, 4) == pytest.approx(math.sqrt(30 / 200))
    assert cramers_v(3.0, 100.0, 2, 1) == 0.0


# -- multiple testing ------------------------------------------------------------------------


def holm_by_hand(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


pvalue_lists = st.lists(
    st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.01, 0.05, 1.0])), min_size=1, max_size=40
)


@FAST
@given(pvalue_lists)
def test_holm_and_bonferroni_written_out(p: list[float]) -> None:
    m = len(p)
    assert adjust_pvalues(p, "bonferroni").tolist() == pytest.approx(
        [min(1.0, m * x) for x in p], rel=1e-15
    )
    assert adjust_pvalues(p, "holm").tolist() == pytest.approx(holm_by_hand(p), rel=1e-15)
    assert adjust_pvalues(p, "none").tolist() == p


@FAST
@given(pvalue_lists)
def test_bh_matches_scipy(p: list[float]) -> None:
    expected = np.atleast_1d(sps.false_discovery_control(np.array(p), method="bh"))
    assert adjust_pvalues(p, "bh").tolist() == pytest.approx(expected.tolist(), rel=1e-15)


def test_adjust_known_values_and_bad_method() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust_pvalues(p, "holm").tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust_pvalues(p, "bh").tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    with pytest.raises(ValueError, match="holm, bonferroni, bh, none"):
        adjust_pvalues(p, "fdr")
