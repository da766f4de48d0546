"""The drift test suite: each statistic against scipy (or a written-out formula), seeded streams
with known change points, the reference baselines, and reference files (JSONL, CSV, Parquet).

Tolerances (see docs/detectors.md): KS D is bit-for-bit scipy's, and so is CvM's T; KS and CvM
p-values agree to 1e-9 relative; AD's statistic to 1e-9 relative (1e-12 absolute near 0), its
p-value to 3 % of scipy's interpolated table value where scipy does not clip it; Wasserstein
to 1e-9 relative (1e-12 of the data's spread absolute); G and JS to 1e-12; PSI to 1e-12 of a
formula written out in plain Python.
"""

from __future__ import annotations

import bisect
import gzip
import json
import math
import sys
import warnings
from typing import Any, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from rollbackd.daemon.references import ReferenceFileError, load_reference
from rollbackd.detectors import Measurement, Reference, Window, make_detector
from rollbackd.detectors.drift import Drift
from rollbackd.detectors.stats import (
    AD_INF_VARIANCE,
    PSI_FLOOR,
    ad_inf_sf,
    ad_pvalue,
    ad_reference,
    ad_statistic,
    chi2_pvalues,
    cvm_pvalues,
    cvm_reference,
    cvm_statistic,
    g_2xk,
    js_chi2_statistic,
    js_distance,
    ks_pvalues,
    ks_pvalues_fast,
    ks_statistic,
    ks_statistic_sorted,
    psi,
    psi_bin_counts,
    psi_reference,
    unseen_pvalue,
    wasserstein_pvalue,
    wasserstein_reference,
    wasserstein_statistic,
)
from rollbackd.events import Prediction

FAST = settings(max_examples=150, deadline=None, derandomize=True)

ints = st.lists(st.integers(-15, 15), min_size=2, max_size=250)
floats = st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=250)


def close(a: float, b: float, rel: float = 1e-9, abs_: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def seeded_pairs(count: int = 12) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded (window, reference) pairs: shifts from none to large, continuous and tied."""
    rng = np.random.default_rng(20240601)
    out = []
    for i in range(count):
        n, m = int(rng.integers(20, 1500)), int(rng.integers(20, 4000))
        shift = float(rng.choice([0.0, 0.02, 0.1, 0.3, 1.0]))
        x, r = rng.normal(shift, 1.0, n), rng.normal(0.0, 1.0, m)
        if i % 3 == 1:
            x, r = np.round(x, 1), np.round(r, 1)
        if i % 4 == 3:
            x, r = rng.integers(0, 6, n).astype(float), rng.integers(0, 7, m).astype(float)
        out.append((x, r))
    return out


# -- Kolmogorov–Smirnov ------------------------------------------------------------------------


def check_ks(x: np.ndarray, r: np.ndarray) -> None:
    rs = np.sort(r)
    d = ks_statistic_sorted(np.sort(x), rs)
    assert d == float(sps.ks_2samp(x, r, method="asymp").statistic)  # bit for bit
    assert d == ks_statistic(x, rs)


@FAST
@given(ints, ints)
def test_ks_sorted_matches_scipy_with_ties(x: list[int], r: list[int]) -> None:
    check_ks(np.array(x, dtype=float), np.array(r, dtype=float))


@FAST
@given(floats, floats)
def test_ks_sorted_matches_scipy_floats(x: list[float], r: list[float]) -> None:
    check_ks(np.array(x), np.array(r))


def test_ks_sorted_seeded() -> None:
    for x, r in seeded_pairs():
        check_ks(x, r)


@FAST
@given(
    d=st.floats(0.0, 1.0),
    n1=st.integers(1, 6000),
    n2=st.integers(1, 20000),
)
def test_ks_pvalues_fast_match_scipy(d: float, n1: int, n2: int) -> None:
    want = float(ks_pvalues(np.array([d]), np.array([n1]), np.array([n2]))[0])
    got = float(ks_pvalues_fast(np.array([d]), np.array([n1]), np.array([n2]))[0])
    assert close(got, want, rel=1e-9, abs_=1e-300)


def test_ks_pvalues_fast_in_the_smirnov_region_and_vectorised() -> None:
    # n_eff ~ 909, D from the quiet region to far into the tail: scipy's 2·smirnov branch.
    ds = np.array([0.01, 0.03, 0.05, 0.08, 0.12, 0.3, 0.6, 0.999])
    n1, n2 = np.full(8, 1000), np.full(8, 10000)
    got = ks_pvalues_fast(ds, n1, n2)
    for g, d in zip(got, ds):
        # ks_2samp's own p for this D and these sizes: kstwo.sf(D, round(n1 n2 / (n1 + n2)))
        assert close(float(g), float(sps.kstwo.sf(d, 909.0)), rel=1e-9, abs_=1e-300)
    assert ks_pvalues_fast(np.array([0.5]), np.array([1]), np.array([1])).tolist() == [1.0]


# -- Cramér–von Mises --------------------------------------------------------------------------


def check_cvm(x: np.ndarray, r: np.ndarray) -> None:
    t = cvm_statistic(np.sort(x), cvm_reference(np.sort(r)))
    res = sps.cramervonmises_2samp(x, r, method="asymptotic")
    assert close(t, float(res.statistic), rel=1e-12, abs_=1e-12)
    p = float(cvm_pvalues([t], [x.shape[0]], [r.shape[0]])[0])
    assert close(p, float(res.pvalue), rel=1e-9, abs_=1e-15)


@FAST
@given(ints, ints)
def test_cvm_matches_scipy_with_ties(x: list[int], r: list[int]) -> None:
    check_cvm(np.array(x, dtype=float), np.array(r, dtype=float))


@FAST
@given(floats, floats)
def test_cvm_matches_scipy_floats(x: list[float], r: list[float]) -> None:
    check_cvm(np.array(x), np.array(r))


def test_cvm_seeded_is_bit_for_bit() -> None:
    for x, r in seeded_pairs():
        t = cvm_statistic(np.sort(x), cvm_reference(np.sort(r)))
        assert t == float(sps.cramervonmises_2samp(x, r, method="asymptotic").statistic)
        check_cvm(x, r)


def test_cvm_pvalues_vectorised_equal_single_calls() -> None:
    ts, ns, ms = [0.05, 0.3, 0.9, 2.5, 40.0], [30, 200, 1000, 1000, 500], [50, 4000, 10000, 300, 500]
    got = cvm_pvalues(ts, ns, ms)
    for i in range(5):
        assert got[i] == cvm_pvalues([ts[i]], [ns[i]], [ms[i]])[0]
    assert got[-1] < 1e-7  # beyond the series' resolution (as in scipy)


# -- Anderson–Darling --------------------------------------------------------------------------


def scipy_ad(x: np.ndarray, r: np.ndarray) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns when it caps or floors its p-value
        return sps.anderson_ksamp([x, r], variant="midrank")


def check_ad(x: np.ndarray, r: np.ndarray) -> None:
    got = ad_statistic(np.sort(x), ad_reference(np.sort(r)))
    if np.unique(np.concatenate([x, r])).shape[0] < 2:
        assert got is None
        return
    assert got is not None
    a2, t = got
    res = scipy_ad(x, r)
    assert close(t, float(res.statistic), rel=1e-9, abs_=1e-12)
    if 0.001 < float(res.pvalue) < 0.25:  # not clipped: scipy interpolates its table
        assert close(ad_pvalue(t), float(res.pvalue), rel=0.03)
    elif float(res.pvalue) == 0.001:
        assert ad_pvalue(t) < 0.0011
    else:
        assert ad_pvalue(t) > 0.24


@FAST
@given(ints, ints)
def test_ad_matches_scipy_with_ties(x: list[int], r: list[int]) -> None:
    check_ad(np.array(x, dtype=float), np.array(r, dtype=float))


@FAST
@given(floats, floats)
def test_ad_matches_scipy_floats(x: list[float], r: list[float]) -> None:
    check_ad(np.array(x), np.array(r))


def test_ad_seeded() -> None:
    for x, r in seeded_pairs():
        check_ad(x, r)


def test_ad_limit_distribution() -> None:
    # Lewis (1961): upper percentage points of A²∞
    for z, p in [(1.9330, 0.10), (2.4924, 0.05), (3.0775, 0.025), (3.8781, 0.01)]:
        assert close(ad_inf_sf(z), p, rel=1e-4)
    assert AD_INF_VARIANCE == pytest.approx(0.5797, abs=1e-4)
    # the tail meets the exact asymptote √3·erfc(√z) and is continuous where it takes over
    assert close(ad_inf_sf(20.0), math.sqrt(3) * math.erfc(math.sqrt(20.0)), rel=0.02)
    assert close(ad_inf_sf(25.0), ad_inf_sf(25.0 + 1e-9), rel=1e-6)
    zs = np.linspace(0.02, 60.0, 400)
    sf = [ad_inf_sf(float(z)) for z in zs]
    assert all(a >= b for a, b in zip(sf, sf[1:])) and sf[-1] > 0.0
    assert ad_inf_sf(0.0) == 1.0
    # T = 0 is the limit's mean: P(A²∞ > 1)
    assert close(ad_pvalue(0.0), ad_inf_sf(1.0), rel=1e-15)


# -- Wasserstein -------------------------------------------------------------------------------


def check_wasserstein(x: np.ndarray, r: np.ndarray) -> None:
    ref = wasserstein_reference(np.sort(r))
    got = wasserstein_statistic(np.sort(x), ref)
    want = float(sps.wasserstein_distance(x, r))
    spread = float(max(x.max(), r.max()) - min(x.min(), r.min()))
    assert close(got, want, rel=1e-9, abs_=1e-12 * max(spread, 1.0))


@FAST
@given(ints, ints)
def test_wasserstein_matches_scipy_with_ties(x: list[int], r: list[int]) -> None:
    check_wasserstein(np.array(x, dtype=float), np.array(r, dtype=float))


@FAST
@given(floats, floats)
def test_wasserstein_matches_scipy_floats(x: list[float], r: list[float]) -> None:
    check_wasserstein(np.array(x), np.array(r))


def test_wasserstein_seeded_and_reference_summary() -> None:
    for x, r in seeded_pairs():
        check_wasserstein(x, r)
    r = np.sort(np.random.default_rng(3).normal(0, 2, 4000))
    ref = wasserstein_reference(r)
    q25, q75 = np.percentile(r, [25, 75])
    assert ref.scale_kind == "iqr" and ref.scale == pytest.approx(q75 - q25, rel=1e-15)
    assert ref.null_var == pytest.approx(float(np.var(r)), rel=1e-12)
    # E‖B∘F‖₁ = sqrt(2/π) Σ sqrt(F(1−F)) Δ, F the reference ECDF
    f = np.arange(1, r.shape[0]) / r.shape[0]
    want = math.sqrt(2 / math.pi) * float((np.sqrt(f * (1 - f)) * np.diff(r)).sum())
    assert ref.null_mean == pytest.approx(want, rel=1e-9)
    assert wasserstein_reference(np.array([1.0] * 7 + [5.0])).scale_kind == "sd"
    assert wasserstein_reference(np.array([2.0, 2.0])).scale_kind == "none"


def test_wasserstein_pvalue_written_out() -> None:
    r = np.sort(np.random.default_rng(4).normal(0, 1, 3000))
    ref = wasserstein_reference(r)
    n, m = 800, 3000
    for w in (0.0, 0.01, 0.05, 0.1, 0.3):
        t = math.sqrt(n * m / (n + m)) * w
        want = 1.0 if t <= ref.null_mean else math.exp(-((t - ref.null_mean) ** 2) / (2 * ref.null_var))
        assert wasserstein_pvalue(w, n, m, ref) == pytest.approx(want, rel=1e-12)
    const = wasserstein_reference(np.array([2.0, 2.0, 2.0]))
    assert wasserstein_pvalue(0.0, 10, 3, const) == 1.0
    assert wasserstein_pvalue(0.5, 10, 3, const) == 0.0


# -- PSI ---------------------------------------------------------------------------------------


def psi_by_hand(window: Sequence[float], reference: Sequence[float], bins: int) -> float:
    ref = sorted(reference)
    cuts = sorted(set(float(np.quantile(ref, i / bins)) for i in range(1, bins)))
    actual = [0] * (len(cuts) + 1)
    expected = [0] * (len(cuts) + 1)
    for v in window:
        actual[bisect.bisect_right(cuts, v)] += 1
    for v in ref:
        expected[bisect.bisect_right(cuts, v)] += 1
    total = 0.0
    for a, e in zip(actual, expected):
        p = max(a / len(window), PSI_FLOOR)
        q = max(e / len(ref), PSI_FLOOR)
        total += (p - q) * math.log(p / q)
    return total


@FAST
@given(floats, floats, st.integers(2, 20))
def test_psi_numeric_written_out(x: list[float], r: list[float], bins: int) -> None:
    ref = psi_reference(np.sort(np.array(r)), bins)
    value, dof = psi(psi_bin_counts(np.sort(np.array(x)), ref.edges), ref.counts)
    assert close(value, psi_by_hand(x, r, bins), rel=1e-12, abs_=1e-15)
    assert 0 <= dof <= bins - 1


def test_psi_categorical_written_out_and_pvalue() -> None:
    a, b = np.array([30.0, 50.0, 0.0, 20.0]), np.array([400.0, 350.0, 150.0, 0.0])
    value, dof = psi(a, b)
    pa = [max(v / 100, PSI_FLOOR) for v in a]
    pb = [max(v / 900, PSI_FLOOR) for v in b]
    assert value == pytest.approx(sum((p - q) * math.log(p / q) for p, q in zip(pa, pb)), rel=1e-12)
    assert dof == 3
    stat = value * 100 * 900 / 1000
    assert float(chi2_pvalues(np.array([stat]), np.array([dof]))[0]) == pytest.approx(
        float(sps.chi2.sf(stat, 3)), rel=1e-12
    )
    assert psi(np.array([5.0]), np.array([7.0])) == (0.0, 0)


# -- G-test, Jensen–Shannon, unseen categories -------------------------------------------------

tables = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 400)).filter(lambda c: c[0] + c[1] > 0),
    min_size=1,
    max_size=10,
).filter(lambda cols: sum(a for a, _ in cols) > 0 and sum(b for _, b in cols) > 0)


@FAST
@given(tables)
def test_g_matches_scipy(cols: list[tuple[int, int]]) -> None:
    a = np.array([c[0] for c in cols], dtype=float)
    b = np.array([c[1] for c in cols], dtype=float)
    stat, dof = g_2xk(a, b)
    p = float(chi2_pvalues(np.array([stat]), np.array([dof]))[0])
    table = np.array([a, b])
    res = sps.chi2_contingency(table, correction=False, lambda_="log-likelihood")
    assert dof == res.dof
    assert close(stat, float(res.statistic), rel=1e-12, abs_=1e-12)
    assert close(p, float(res.pvalue), rel=1e-9, abs_=1e-300)
    if dof:
        expected = sps.contingency.expected_freq(table)
        pd = sps.power_divergence(table.ravel(), expected.ravel(), ddof=table.size - 1 - dof,
                                  lambda_="log-likelihood")
        assert close(stat, float(pd.statistic), rel=1e-12, abs_=1e-12)


@FAST
@given(tables)
def test_js_matches_scipy(cols: list[tuple[int, int]]) -> None:
    a = np.array([c[0] for c in cols], dtype=float)
    b = np.array([c[1] for c in cols], dtype=float)
    d = js_distance(a, b)
    assert close(d, float(jensenshannon(a, b, base=2)), rel=1e-12, abs_=1e-15)
    assert 0.0 <= d <= 1.0
    # the p-value's statistic: 8 · nm/(n+m) · JSD in nats
    n, m = a.sum(), b.sum()
    jsd_nats = float(jensenshannon(a, b)) ** 2
    assert close(js_chi2_statistic(d, int(n), int(m)), 8 * n * m / (n + m) * jsd_nats, rel=1e-9, abs_=1e-12)


def test_unseen_pvalue_is_the_binomial_tail() -> None:
    for unseen, n, f1, m in [(0, 100, 3, 1000), (1, 100, 3, 1000), (7, 500, 0, 2000), (50, 500, 40, 2000)]:
        p0 = (f1 + 1) / (m + 1)
        want = 1.0 if unseen == 0 else float(sps.binom.sf(unseen - 1, n, p0))
        assert unseen_pvalue(unseen, n, f1, m) == pytest.approx(want, rel=1e-12)


# -- the detector on seeded streams with a change point ----------------------------------------

CATS = ["a", "b", "c", "d"]
_ids = iter(range(10**9))


def pred(features: dict[str, Any], version: str = "v1", score: float | None = None) -> Prediction:
    i = next(_ids)
    return Prediction(id=str(i), ts=float(i), deployment="d", model_version=version,
                      features=features, score=score)


def make_preds(rng: np.random.Generator, n: int, *, shift: float = 0.0,
               probs: Sequence[float] = (0.4, 0.3, 0.2, 0.1), version: str = "v1") -> list[Prediction]:
    x0, x1 = rng.normal(shift, 1.0, n), rng.normal(0.0, 1.0, n)
    c = rng.choice(CATS, size=n, p=list(probs))
    return [pred({"x0": float(a), "x1": float(b), "c": str(k)}, version) for a, b, k in zip(x0, x1, c)]


def columns(preds: Sequence[Prediction]) -> dict[str, list[Any]]:
    names = sorted({k for p in preds for k in p.features})
    return {k: [p.features.get(k) for p in preds] for k in names}


def window(preds: Sequence[Prediction], i: int = 0) -> Window:
    return Window("d", "primary", 60.0 * i, 60.0 * (i + 1), list(preds))


CHANGE, WINDOWS = 20, 30


@pytest.fixture(scope="module")
def change_stream() -> tuple[Reference, list[Window]]:
    """5,000 reference events; 30 windows of 500; from window 20 on, x0 shifts by 0.4 sd and
    the categories move from (.4, .3, .2, .1) to (.3, .3, .2, .2). x1 never changes."""
    rng = np.random.default_rng(11)
    ref = Reference("seeded", columns(make_preds(rng, 5000)))
    wins = [
        window(make_preds(rng, 500, shift=0.4 if i >= CHANGE else 0.0,
                          probs=(0.3, 0.3, 0.2, 0.2) if i >= CHANGE else (0.4, 0.3, 0.2, 0.1)), i)
        for i in range(WINDOWS)
    ]
    return ref, wins


def breaches(det: Any, wins: Sequence[Window], alpha: float = 0.01) -> list[int]:
    """Windows where a rule with the detector's threshold and ``alpha`` breaches."""
    out = []
    for i, w in enumerate(wins):
        det.update(w)
        m = det.evaluate(w.end)
        if m.value is not None and m.value > m.threshold and m.p_value is not None and m.p_value < alpha:
            out.append(i)
    return out


# Thresholds on each test's own effect scale; every one flags the first changed window
# (delay 0) and nothing before it.
@pytest.mark.parametrize(
    "test, threshold",
    [("ks", 0.1), ("cvm", 0.07), ("ad", 0.15), ("wasserstein", 0.15), ("psi", 0.08)],
)
def test_numeric_tests_flag_the_change_and_only_it(change_stream, test: str, threshold: float) -> None:
    ref, wins = change_stream
    det = Drift(threshold=threshold, features=["x0", "x1"], test={"numeric": test}, reference=ref)
    assert breaches(det, wins) == list(range(CHANGE, WINDOWS))
    det.update(wins[CHANGE])
    m = det.evaluate(0.0)
    assert m.evidence["drifted"] == ["x0"] and m.evidence["features"][0]["test"] == test


@pytest.mark.parametrize("test, threshold", [("chi2", 0.06), ("g", 0.06), ("js", 0.08), ("psi", 0.04)])
def test_categorical_tests_flag_the_change_and_only_it(change_stream, test: str, threshold: float) -> None:
    ref, wins = change_stream
    det = Drift(threshold=threshold, features=["c"], test={"categorical": test}, reference=ref)
    assert breaches(det, wins) == list(range(CHANGE, WINDOWS))


def test_p_value_alone_would_flag_the_stationary_part(change_stream) -> None:
    # Why a rule needs both: with alpha alone (threshold 0) a quiet window is flagged too.
    ref, wins = change_stream
    det = Drift(threshold=0.0, features=["x0", "x1"], correction="none", reference=ref)
    assert breaches(det, wins[:CHANGE], alpha=0.05) != []


def test_detector_values_equal_scipy_per_test() -> None:
    rng = np.random.default_rng(21)
    ref_preds = make_preds(rng, 3000)
    ref = Reference("r", columns(ref_preds))
    win = make_preds(rng, 700, shift=0.2, probs=(0.35, 0.3, 0.2, 0.15))
    x = np.array([p.features["x0"] for p in win])
    r = np.array(ref.columns["x0"])
    table_keys = CATS
    a = np.array([sum(p.features["c"] == k for p in win) for k in table_keys], dtype=float)
    b = np.array([sum(v == k for v in ref.columns["c"]) for k in table_keys], dtype=float)

    def feats(numeric: str, categorical: str) -> dict[str, dict[str, Any]]:
        det = Drift(threshold=0.1, test={"numeric": numeric, "categorical": categorical},
                    correction="none", reference=ref)
        det.update(window(win))
        m = det.evaluate(0.0)
        json.dumps(m.to_record())
        return {f["feature"]: f for f in m.evidence["features"]}

    f = feats("cvm", "g")
    cvm = sps.cramervonmises_2samp(x, r, method="asymptotic")
    assert f["x0"]["statistic"] == float(cvm.statistic)
    assert close(f["x0"]["p_value"], float(cvm.pvalue), rel=1e-9, abs_=1e-15)
    assert f["x0"]["effect"] == pytest.approx(math.sqrt(cvm.statistic * 3700 / (700 * 3000)), rel=1e-12)
    g = sps.chi2_contingency(np.array([a, b]), correction=False, lambda_="log-likelihood")
    assert close(f["c"]["statistic"], float(g.statistic), rel=1e-12)
    assert close(f["c"]["p_value"], float(g.pvalue), rel=1e-9)
    assert f["c"]["effect"] == pytest.approx(math.sqrt(g.statistic / 3700), rel=1e-12)

    f = feats("ad", "js")
    ad = scipy_ad(x, r)
    assert close(f["x0"]["statistic"], float(ad.statistic), rel=1e-9)
    assert close(f["c"]["statistic"], float(jensenshannon(a, b, base=2)), rel=1e-12)
    assert f["c"]["effect"] == f["c"]["statistic"]

    f = feats("wasserstein", "psi")
    w = float(sps.wasserstein_distance(x, r))
    q25, q75 = np.percentile(r, [25, 75])
    assert close(f["x0"]["statistic"], w, rel=1e-9)
    assert f["x0"]["effect"] == pytest.approx(w / (q75 - q25), rel=1e-9)
    assert f["x0"]["scale"] == "iqr"
    value, dof = psi(a, b)
    assert f["c"]["statistic"] == pytest.approx(value, rel=1e-12)
    assert f["c"]["p_value"] == pytest.approx(float(sps.chi2.sf(value * 700 * 3000 / 3700, dof)), rel=1e-9)

    f = feats("psi", "chi2")
    assert f["x0"]["statistic"] == pytest.approx(psi_by_hand(x.tolist(), r.tolist(), 10), rel=1e-12)


# -- parameters, unseen categories -------------------------------------------------------------


def test_test_param_forms() -> None:
    d = Drift(threshold=0.1, test="cvm")
    assert (d._numeric_test, d._categorical_test) == ("cvm", "chi2")
    d = Drift(threshold=0.1, test="js")
    assert (d._numeric_test, d._categorical_test) == ("ks", "js")
    d = Drift(threshold=0.1, test="psi")
    assert (d._numeric_test, d._categorical_test) == ("psi", "psi")
    d = Drift(threshold=0.1, test={"categorical": "g"})
    assert (d._numeric_test, d._categorical_test) == ("ks", "g")
    # unbounded effects (AD, Wasserstein/IQR, PSI) allow thresholds above 1
    assert Drift(threshold=2.5, test="psi").threshold == 2.5
    assert Drift(threshold=1.5, test={"numeric": "wasserstein", "categorical": "psi"}).threshold == 1.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"test": "mmd"}, "numeric tests: ks, cvm, ad, wasserstein, psi"),
        ({"test": {"numeric": "chi2"}}, "test.numeric must be one of"),
        ({"test": {"categorical": "ks"}}, "test.categorical must be one of"),
        ({"test": {"num": "ks"}}, "keys numeric and categorical"),
        ({"test": "js", "threshold": 1.5}, r"\[0, 1\]"),
        ({"test": "psi", "threshold": -0.5}, ">= 0"),
        ({"bins": 1}, r"\[2, 1000\]"),
        ({"unseen_categories": "count"}, "ignore, evidence, drift"),
        ({"baseline": "last_week"}, "file, first_n, previous_version, rolling"),
        ({"rolling_windows": 0}, ">= 1"),
    ],
)
def test_invalid_params(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("threshold", 0.1)
    with pytest.raises(ValueError, match=match):
        Drift(**kwargs)


def unseen_case() -> tuple[Reference, Window]:
    ref = Reference("r", {"c": ["a"] * 600 + ["b"] * 399 + ["rare"]})  # one singleton
    win = window([pred({"c": v}) for v in ["a"] * 55 + ["b"] * 35 + ["new1"] * 7 + ["new2"] * 3])
    return ref, win


def test_unseen_categories_modes() -> None:
    ref, win = unseen_case()
    ignore = Drift(threshold=0.1, unseen_categories="ignore", reference=ref)
    ignore.update(win)
    f = ignore.evaluate(0.0).evidence["features"][0]
    assert "unseen" not in f and f["test"] == "chi2"

    ev = Drift(threshold=0.1, reference=ref)
    ev.update(win)
    m = ev.evaluate(0.0)
    f = m.evidence["features"][0]
    assert (f["unseen"], f["unseen_share"]) == (2, 0.1) and "unseen_values" not in f
    assert m.evidence["tested"] == 1
    # the chi-square table spans both: three reference categories, two new ones
    res = sps.chi2_contingency(np.array([[55, 35, 0, 7, 3], [600, 399, 1, 0, 0]]), correction=False)
    assert close(f["statistic"], float(res.statistic), rel=1e-12)

    shown = Drift(threshold=0.1, report_values=True, reference=ref)
    shown.update(win)
    assert shown.evaluate(0.0).evidence["features"][0]["unseen_values"] == ["new1", "new2"]

    drift = Drift(threshold=0.05, unseen_categories="drift", correction="none", reference=ref)
    drift.update(win)
    m = drift.evaluate(0.0)
    by_test = {f["test"]: f for f in m.evidence["features"]}
    assert set(by_test) == {"chi2", "unseen"} and m.evidence["tested"] == 2
    u = by_test["unseen"]
    assert u["statistic"] == 10.0 and u["effect"] == 0.1 and u["n"] == 100
    assert u["p_value"] == pytest.approx(float(sps.binom.sf(9, 100, 2 / 1001)), rel=1e-12)
    assert m.evidence["drifted"] == ["c"]


# -- baselines ---------------------------------------------------------------------------------


def record_without(m: Measurement, *keys: str) -> dict[str, Any]:
    rec = m.to_record()
    for k in keys:
        rec.get("evidence", {}).pop(k, None)
    return rec


def test_baseline_file_without_reference_gives_no_verdict() -> None:
    det = Drift(threshold=0.1, baseline="file")
    det.update(window([pred({"x": 1.0})]))
    m = det.evaluate(0.0)
    assert m.value is None and m.insufficient == "no reference file"


def test_baseline_previous_version() -> None:
    rng = np.random.default_rng(5)
    det = Drift(threshold=0.1, baseline="previous_version", reference_size=1200, include_score=True)
    v1 = [make_preds(rng, 500, version="v1") for _ in range(3)]
    for w in v1:
        det.update(window(w))
        assert det.evaluate(0.0).insufficient == "no previous version"
    # v2 arrives shifted: it is compared with v1's last 1,200 predictions
    v2 = make_preds(rng, 600, shift=0.5, version="v2")
    det.update(window(v2))
    got = det.evaluate(0.0)
    want_det = Drift(threshold=0.1, include_score=True,
                     reference=Reference("v1", columns([p for w in v1 for p in w][-1200:])))
    want_det.update(window(v2))
    want = want_det.evaluate(0.0)
    assert record_without(got, "reference_version") == want.to_record()
    assert got.evidence["reference_version"] == "v1" and got.evidence["drifted"] == ["x0"]
    # a second v2 window: still against v1
    v2b = make_preds(rng, 600, shift=0.5, version="v2")
    det.update(window(v2b))
    assert det.evaluate(0.0).evidence["reference_version"] == "v1"
    # rolled back to v1: v1 is compared with its own last predictions, not with v2's
    back = make_preds(rng, 500, version="v1")
    det.update(window(back))
    m = det.evaluate(0.0)
    assert m.evidence["reference_version"] == "v1" and m.evidence["drifted"] == []
    want_det.update(window(back))
    assert record_without(m, "reference_version") == want_det.evaluate(0.0).to_record()
    # then a new v3: compared with v1 (v1's tail now includes the rollback window)
    v3 = make_preds(rng, 500, version="v3")
    det.update(window(v3))
    tail = ([p for w in v1 for p in w] + back)[-1200:]
    ref3 = Drift(threshold=0.1, include_score=True, reference=Reference("v1", columns(tail)))
    ref3.update(window(v3))
    m = det.evaluate(0.0)
    assert m.evidence["reference_version"] == "v1"
    assert record_without(m, "reference_version") == ref3.evaluate(0.0).to_record()


def test_baseline_rolling() -> None:
    rng = np.random.default_rng(6)
    det = Drift(threshold=0.1, baseline="rolling", rolling_windows=3)
    wins = [make_preds(rng, 300, shift=0.6 if i == 5 else 0.0) for i in range(7)]
    results = []
    for i, w in enumerate(wins):
        det.update(window(w, i))
        results.append(det.evaluate(0.0))
    assert [m.insufficient for m in results[:3]] == ["building reference"] * 3
    assert results[1].evidence == {"reference_windows": 2, "rolling_windows": 3}
    for i in range(3, 7):
        ref = Reference("prev", columns([p for w in wins[i - 3:i] for p in w]))
        want = Drift(threshold=0.1, reference=ref)
        want.update(window(wins[i], i))
        assert results[i].to_record() == want.evaluate(0.0).to_record()
    assert results[5].evidence["drifted"] == ["x0"]
    # window 6 is compared with windows 3-5, which include the shifted one: x0 is not clean
    assert results[4].evidence["drifted"] == []


def test_first_n_is_the_default_without_a_reference_and_file_with_one() -> None:
    assert Drift(threshold=0.1)._baseline.mode == "first_n"
    assert Drift(threshold=0.1, reference=Reference("r", {"x": [1.0]}))._baseline.mode == "file"
    # an explicit baseline overrides a given reference
    ref = Reference("r", {"x": [1.0]})
    assert Drift(threshold=0.1, baseline="rolling", reference=ref)._baseline.mode == "rolling"


# -- reference files ---------------------------------------------------------------------------


def test_load_jsonl_reference_aligned(tmp_path) -> None:
    lines = [
        {"type": "prediction", "id": "1", "ts": 1, "deployment": "d", "model_version": "1",
         "features": {"x": 1.5, "c": "a"}, "score": 0.2},
        {"type": "outcome", "id": "1", "ts": 2, "deployment": "d", "label": 1},
        {"type": "prediction", "id": "2", "ts": 3, "deployment": "d", "model_version": "1",
         "features": {"x": 2.5}},
        {"type": "prediction", "id": "3", "ts": 4, "deployment": "d", "model_version": "1",
         "features": {"c": "b", "flag": True}, "score": 0.9},
    ]
    path = tmp_path / "ref.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ref = load_reference(path)
    assert ref.columns == {
        "x": [1.5, 2.5, None],
        "c": ["a", None, "b"],
        "flag": [None, None, True],
        "__score__": [0.2, None, 0.9],
    }
    assert load_reference(path, limit=2).columns["x"] == [1.5, 2.5]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(ReferenceFileError, match="no prediction events"):
        load_reference(empty)


def test_load_csv_reference(tmp_path) -> None:
    path = tmp_path / "ref.csv"
    path.write_text("x,c,mixed,flag,__score__\n1,a,3,true,0.5\n2.5,,n/a,FALSE,\n,b,4e2,,0.25\n")
    ref = load_reference(path)
    x = ref.columns["x"]
    assert isinstance(x, np.ndarray) and x[:2].tolist() == [1.0, 2.5] and math.isnan(x[2])
    assert ref.columns["c"] == ["a", None, "b"]
    assert ref.columns["mixed"] == [3.0, "n/a", 400.0]
    assert ref.columns["flag"] == [True, False, None]
    score = ref.columns["__score__"]
    assert score[0] == 0.5 and math.isnan(score[1]) and score[2] == 0.25
    gz = tmp_path / "ref.csv.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("x\n1\n2\n3\n")
    assert load_reference(gz, limit=2).columns["x"].tolist() == [1.0, 2.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n3\n")
    with pytest.raises(ReferenceFileError, match="line 3: 1 cells, the header has 2"):
        load_reference(bad)
    (tmp_path / "hdr.csv").write_text("x,x\n1,2\n")
    with pytest.raises(ReferenceFileError, match="every column once"):
        load_reference(tmp_path / "hdr.csv")
    (tmp_path / "none.csv").write_text("x\n")
    with pytest.raises(ReferenceFileError, match="no rows"):
        load_reference(tmp_path / "none.csv")


def test_load_parquet_reference(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({
        "x": pa.array([1.0, None, 3.0]),
        "n": pa.array([1, 2, None], type=pa.int64()),
        "c": pa.array(["a", None, "b"]),
        "d": pa.array(["u", "v", "u"]).dictionary_encode(),
        "flag": pa.array([True, False, None]),
    })
    path = tmp_path / "ref.parquet"
    pq.write_table(table, path)
    ref = load_reference(path)
    assert ref.columns["x"][0] == 1.0 and math.isnan(ref.columns["x"][1])
    assert ref.columns["n"][:2].tolist() == [1.0, 2.0] and math.isnan(ref.columns["n"][2])
    assert ref.columns["c"] == ["a", None, "b"]
    assert ref.columns["d"] == ["u", "v", "u"]
    assert ref.columns["flag"] == [True, False, None]
    assert load_reference(path, limit=2).columns["c"] == ["a", None]
    # the format may be named when the file name does not say it
    other = tmp_path / "ref.data"
    other.write_bytes(path.read_bytes())
    assert load_reference(other, format="parquet").columns["c"] == ["a", None, "b"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ReferenceFileError, match=r"pip install 'rollbackd\[parquet\]'"):
        load_reference(tmp_path / "ref.parquet")


def test_drift_from_csv_and_parquet_equals_in_memory(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(8)
    ref_preds = make_preds(rng, 2000)
    cols = columns(ref_preds)
    csv_path = tmp_path / "ref.csv"
    csv_path.write_text("x0,x1,c\n" + "".join(
        f"{a!r},{b!r},{c}\n" for a, b, c in zip(cols["x0"], cols["x1"], cols["c"])
    ))
    pq_path = tmp_path / "ref.parquet"
    pq.write_table(pa.table(cols), pq_path)
    win = window(make_preds(rng, 500, shift=0.3))
    records = []
    for reference in (Reference("mem", cols), load_reference(csv_path), load_reference(pq_path)):
        det = make_detector("drift", threshold=0.1, min_samples=1,
                            params={"test": {"numeric": "ad", "categorical": "g"}}, reference=reference)
        det.update(win)
        records.append(det.evaluate(0.0).to_record())
    assert records[0] == records[1] == records[2]


@pytest.mark.parametrize("names", [None, ["x1", "zz", "c"], ["x1", "c", "x0"], ["x1"], []])
@pytest.mark.parametrize("uniform", [True, False])
def test_a_few_predictions_give_the_windows_own_columns(names, uniform):
    # The reference build reads a small window's columns from its predictions (drift._few_columns),
    # not through the Window's cache: the same names in the same order, the same values, None
    # where absent, and the scores when asked for.
    from rollbackd.detectors.drift import SCORE_COLUMN, _FEW, _window_columns

    rng = np.random.default_rng(5)
    preds = make_preds(rng, 3)
    if not uniform:
        preds.append(pred({"x0": 1.0, "extra": "e"}, score=0.25))
    preds = [pred(p.features, score=0.5 + i / 10) for i, p in enumerate(preds)]
    assert len(preds) <= _FEW
    few, n = _window_columns(window(preds), None, names, True)
    w = window(preds)
    wanted = w.feature_names if names is None else names
    cached = {k: w.feature(k) for k in wanted}
    cached[SCORE_COLUMN] = [p.score for p in preds]
    assert n == len(preds)
    assert list(few) == list(cached) and few == cached


def test_an_empty_window_gives_empty_columns():
    from rollbackd.detectors.drift import _window_columns

    assert _window_columns(window([]), None, None, False) == ({}, 0)
    assert _window_columns(window([]), None, ["x0", "c"], False) == ({"x0": [], "c": []}, 0)


def _mixed_stream(seed: int) -> list[Window]:
    """Windows of 1-120 predictions whose columns mix what a reference may hold: NaN, inf and
    None among numbers; sentinel strings in a numeric column (a majority of them in some
    windows); bools beside ints (True == 1); a column of NaN and a few strings; a feature that
    only appears later; scores with None; a window served mostly by another version."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(40):
        n = int(rng.integers(1, 121))
        version = "v2" if i == 3 else "v1"
        preds = []
        for j in range(n):
            f: dict[str, Any] = {"x0": float(rng.normal()), "c": str(rng.choice(CATS))}
            u = rng.random()
            if u < 0.05:
                f["x0"] = None
            elif u < 0.08:
                f["x0"] = math.nan
            elif u < 0.09:
                f["x0"] = -math.inf
            elif u < 0.1:
                del f["x0"]
            f["s"] = "n/a" if (i == 7 or rng.random() < 0.1) else int(rng.integers(-3, 4))
            f["b"] = bool(rng.random() < 0.5) if rng.random() < 0.7 else int(rng.integers(0, 3))
            f["nan_cat"] = math.nan if rng.random() < 0.8 else "odd"
            if i > 20:
                f["late"] = float(rng.integers(0, 5))
            score = None if rng.random() < 0.1 else float(rng.random())
            preds.append(pred(f, "v2" if (version == "v2" and j % 4) else "v1", score=score))
        out.append(window(preds, i))
    return out


@pytest.mark.parametrize("test", ["ks", "cvm", "ad", "wasserstein", "psi"])
@pytest.mark.parametrize("features", [None, ["x0", "s", "b", "nan_cat", "late", "gone", "__score__"]])
def test_a_gathered_reference_is_the_reference_of_its_raw_columns(test, features):
    # first_n gathers its reference as it comes (drift.PartialReference: numbers as float64,
    # categories as counts); the summary, and every verdict after it, is exactly the one made
    # from the raw columns (drift._Chunks), which is what the reference was before.
    from rollbackd.daemon.snapshot import to_plain
    from rollbackd.detectors.drift import PartialReference, _Chunks

    params = {"test": {"numeric": test, "categorical": "g"}, "reference_size": 900,
              "include_score": True, "features": features, "alpha": 0.5}
    gathered = make_detector("drift", threshold=0.0, min_samples=1, params=params)
    raw = make_detector("drift", threshold=0.0, min_samples=1, params=params)
    raw._baseline._new_build = _Chunks  # type: ignore[attr-defined]
    raw._reset()  # type: ignore[attr-defined]
    assert type(gathered._baseline._build) is PartialReference  # type: ignore[attr-defined]
    tested = 0
    for w in _mixed_stream(3):
        gathered.update(w)
        raw.update(w)
        a, b = gathered.evaluate(w.end).to_record(), raw.evaluate(w.end).to_record()
        assert a == b
        tested += a.get("insufficient") is None
        assert to_plain(gathered._baseline.summary) == to_plain(raw._baseline.summary)  # type: ignore[attr-defined]
    assert tested > 5 and gathered._baseline.summary is not None  # type: ignore[attr-defined]


def test_a_reference_being_gathered_is_restored_from_a_snapshot_as_it_was():
    # A checkpoint taken while first_n gathers its reference (staged predictions and gathered
    # columns) restores into a detector that goes on to the same verdicts.
    from rollbackd.daemon.snapshot import frame, restore_detector, unframe

    params = {"reference_size": 900, "include_score": True}
    stream = _mixed_stream(4)
    det = make_detector("drift", threshold=0.0, min_samples=1, params=params)
    for w in stream[:12]:
        det.update(w)
    assert det._baseline.summary is None and det._baseline._build.n > 0  # type: ignore[attr-defined]
    restored = make_detector("drift", threshold=0.0, min_samples=1, params=params)
    restore_detector(restored, unframe("pipeline", frame("pipeline", det)))
    for w in stream[12:]:
        det.update(w)
        restored.update(w)
        assert det.evaluate(w.end).to_record() == restored.evaluate(w.end).to_record()
    assert det._baseline.summary is not None  # type: ignore[attr-defined]


def test_a_ks_reference_of_float32_values_is_kept_as_float32_with_the_same_statistics():
    # Integer-valued features (ties everywhere) and a feature of quarters: every reference value
    # is a float32, so KS keeps them in half the bytes; D is bit for bit the one of the float64
    # reference, for windows whose values are not float32s (x + 0.1) too. A feature with a
    # value that is not a float32 stays float64.
    from rollbackd.detectors.stats import ks_statistic_sorted

    rng = np.random.default_rng(21)

    def preds(n: int, shift: float) -> list[Prediction]:
        k = rng.integers(0, 30, n).astype(float)
        return [pred({"k": float(a) + shift, "q": float(a) / 4, "x": float(a) + 0.1}) for a in k]

    det = make_detector("drift", threshold=0.0, min_samples=1, params={"reference_size": 2000, "alpha": 0.5})
    ref = preds(2000, 0.0)
    det.update(window(ref))
    summary = det._baseline.summary  # type: ignore[attr-defined]
    assert summary["k"].values.dtype == np.float32 and summary["q"].values.dtype == np.float32
    assert summary["x"].values.dtype == np.float64
    for i, shift in enumerate((0.0, 1.0, 0.1, -2.5)):
        win = preds(300, shift)
        det.update(window(win, i + 1))
        got = {f["feature"]: f["statistic"] for f in det.evaluate(0.0).to_record()["evidence"]["features"]}
        for name in ("k", "q", "x"):
            want = ks_statistic_sorted(np.sort([p.features[name] for p in win]),
                                       np.sort([p.features[name] for p in ref]))
            assert got[name] == want


def test_deployments_naming_one_reference_file_share_it_and_its_summary(tmp_path):
    # A fleet behind one reference file: it is read once, summarised once per drift
    # configuration, and a checkpoint writes that summary once (one blob, named by every
    # detector); the verdicts are the ones of a reference of one's own.
    from rollbackd.daemon.replay import build_pipeline
    from rollbackd.rules.loader import load_config

    rng = np.random.default_rng(8)
    ref_path = tmp_path / "ref.jsonl"
    ref_path.write_text("".join(
        json.dumps({"type": "prediction", "id": f"r{i}", "ts": 1000.0 + i, "deployment": "ref",
                    "model_version": "1", "features": {"x": float(x), "c": str(c)}}) + "\n"
        for i, (x, c) in enumerate(zip(rng.normal(size=800), rng.choice(CATS, 800)))))
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
version: 1
settings: {{notifier: {{type: none}}}}
deployments: {{a: {{reference: {ref_path}}}, b: {{reference: {ref_path}}}, c: {{}}}}
rules:
  - {{name: drift, detector: drift, threshold: 0.1, min_samples: 50}}
  - {{name: drift-cvm, detector: drift, params: {{test: cvm}}, threshold: 0.1, min_samples: 50}}
""")
    config = load_config(str(rules))
    pipeline = build_pipeline(config)
    events = [
        Prediction(id=f"{d}{i}", ts=1_790_000_000.0 + i / 2, deployment=d, model_version="1",
                   features={"x": float(rng.normal(0.5 if d == "b" else 0.0)), "c": str(rng.choice(CATS))})
        for i in range(400) for d in ("a", "b")
    ]
    pipeline.ingest(events)
    pipeline.advance(pipeline.max_event_time)
    dets = pipeline.detectors
    a, b = dets[("drift", ("a", "primary"))], dets[("drift", ("b", "primary"))]
    assert a.reference is b.reference  # type: ignore[attr-defined]
    assert a._baseline.summary is b._baseline.summary is not None  # type: ignore[attr-defined]
    cvm_a = dets[("drift-cvm", ("a", "primary"))]
    assert cvm_a._baseline.summary is not a._baseline.summary  # type: ignore[attr-defined]
    pipeline.snapshot(external=True)
    assert len(pipeline.new_blobs()) == 2  # one per drift configuration, not per deployment
    own = make_detector("drift", threshold=0.1, min_samples=50, params={},
                        reference=Reference(str(ref_path), dict(a.reference.columns)))  # type: ignore[attr-defined]
    last = Window("b", "primary", 0.0, 1.0, [e for e in events if e.deployment == "b"][-100:])
    b.update(last)
    own.update(last)
    assert b.evaluate(1.0).to_record() == own.evaluate(1.0).to_record()
    assert b.evaluate(1.0).value > 0.1
