"""Canary versus stable: the rank statistics, the always-valid test, the detector, a replay.

Statistics are held against scipy (``mannwhitneyu``) and against formulas written out (the
Hodges–Lehmann estimator, the two-proportion z, the mSPRT likelihood ratio, which is also
checked by numerical integration of its definition).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy import stats as sps

import rollbackd.detectors.stats as stats_mod
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.detectors import Canary, ErrorRate, Labeled, Window, make_detector
from rollbackd.detectors.stats import (
    always_valid_pvalue,
    hodges_lehmann_shift,
    mann_whitney_u,
    msprt_log_lr,
)
from rollbackd.events import Prediction
from rollbackd.rules.loader import load_config_text
from rollbackd.scenarios import Fault, Scenario, write_recording

FAST = settings(max_examples=150, deadline=None, derandomize=True)

samples = st.lists(st.integers(-20, 20), min_size=1, max_size=60).map(
    lambda v: np.array(v, dtype=float) / 4.0  # quarter steps: many ties
) | st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=60).map(np.array)


# -- Mann–Whitney U and Hodges–Lehmann ---------------------------------------------------------


@FAST
@given(x=samples, y=samples, alternative=st.sampled_from(["two-sided", "greater", "less"]))
def test_mann_whitney_matches_scipy(x: np.ndarray, y: np.ndarray, alternative: str) -> None:
    u, p, _ = mann_whitney_u(x, y, alternative)
    ref = sps.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")
    assert math.isclose(u, ref.statistic, rel_tol=1e-9, abs_tol=1e-9)
    if np.all(np.concatenate([x, y]) == x[0]):
        assert p == 1.0  # scipy answers NaN when every value ties
    else:
        assert math.isclose(p, ref.pvalue, rel_tol=1e-9, abs_tol=1e-300)


def test_mann_whitney_variance_is_the_tie_corrected_formula() -> None:
    x = np.array([1.0, 2.0, 2.0, 3.0])
    y = np.array([2.0, 3.0, 3.0, 3.0, 5.0])
    _, _, var = mann_whitney_u(x, y)
    n1, n2, n = 4, 5, 9
    ties = [1, 3, 4, 1]  # values 1, 2, 3, 5
    expected = n1 * n2 / 12 * ((n + 1) - sum(t**3 - t for t in ties) / (n * (n - 1)))
    assert var == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ValueError, match="alternative must be one of"):
        mann_whitney_u(x, y, "bigger")


def hl_reference(x: np.ndarray, y: np.ndarray) -> float:
    diffs = sorted(xi - yj for xi in x.tolist() for yj in y.tolist())
    m = len(diffs)
    return diffs[m // 2] if m % 2 else (diffs[m // 2 - 1] + diffs[m // 2]) / 2


@FAST
@given(x=samples, y=samples, direct=st.booleans())
def test_hodges_lehmann_is_the_median_of_pairwise_differences(
    x: np.ndarray, y: np.ndarray, direct: bool
) -> None:
    old = stats_mod.HL_DIRECT_PAIRS
    stats_mod.HL_DIRECT_PAIRS = old if direct else 0  # 0: always the selection path
    try:
        assert hodges_lehmann_shift(x, y) == pytest.approx(hl_reference(x, y), rel=1e-12, abs=1e-12)
    finally:
        stats_mod.HL_DIRECT_PAIRS = old


def test_hodges_lehmann_selection_on_large_samples() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.lognormal(3.0, 1.0, 700), rng.lognormal(3.1, 1.0, 500)  # 350,000 pairs
    assert x.shape[0] * y.shape[0] > stats_mod.HL_DIRECT_PAIRS
    assert hodges_lehmann_shift(x, y) == float(np.median(np.subtract.outer(x, y)))
    ties = np.repeat([1.0, 2.0], 400)
    assert hodges_lehmann_shift(ties, ties) == 0.0


# -- the mixture SPRT --------------------------------------------------------------------------


@pytest.mark.parametrize("theta, v, tau", [(0.01, 1e-4, 0.02), (-0.3, 0.01, 0.1), (0.0, 0.5, 1.0)])
def test_msprt_is_the_normal_mixture_likelihood_ratio(theta: float, v: float, tau: float) -> None:
    # written out: sqrt(V / (V + τ²)) exp(τ² θ² / (2 V (V + τ²)))
    tau2 = tau * tau
    formula = math.sqrt(v / (v + tau2)) * math.exp(tau2 * theta**2 / (2 * v * (v + tau2)))
    assert math.exp(msprt_log_lr(theta, v, tau2)) == pytest.approx(formula, rel=1e-12)
    # and its definition: ∫ N(θ̂; δ, V) / N(θ̂; 0, V) · N(δ; 0, τ²) dδ
    integrand = lambda d: (  # noqa: E731
        sps.norm.pdf(theta, d, math.sqrt(v)) / sps.norm.pdf(theta, 0, math.sqrt(v))
        * sps.norm.pdf(d, 0, tau)
    )
    numeric, _ = integrate.quad(integrand, -12 * tau, 12 * tau, points=[0.0, theta], limit=200)
    assert numeric == pytest.approx(formula, rel=1e-7)


def test_always_valid_pvalue_is_a_running_minimum() -> None:
    assert msprt_log_lr(0.3, 0.0, 1.0) == 0.0  # no information
    with pytest.raises(ValueError, match="mixing variance must be > 0"):
        msprt_log_lr(0.3, 1.0, 0.0)
    p = 1.0
    seq = []
    for log_lr in (-1.0, 0.5, 2.0, 1.0, 800.0):
        p = always_valid_pvalue(p, log_lr)
        seq.append(p)
    assert seq == [1.0, math.exp(-0.5), math.exp(-2.0), math.exp(-2.0), 0.0]


# -- windows with siblings ---------------------------------------------------------------------

_ids = iter(range(10**9))


def preds(
    rng: np.random.Generator,
    n: int,
    *,
    variant: str,
    version: str,
    error_rate: float = 0.01,
    latency_mu: float = 3.0,
    t0: float = 0.0,
) -> list[Prediction]:
    errors = rng.random(n) < error_rate
    lat = rng.lognormal(latency_mu, 0.4, n)
    score = rng.random(n)
    return [
        Prediction(
            id=str(next(_ids)), ts=t0 + i * 60.0 / n, deployment="d", model_version=version,
            variant=variant, error="e" if e else None, latency_ms=float(l), score=float(s),
        )
        for i, (e, l, s) in enumerate(zip(errors, lat, score))
    ]


def pair(
    i: int,
    canary: Sequence[Prediction],
    stable: Sequence[Prediction] | None,
    canary_outcomes: Sequence[Labeled] = (),
    stable_outcomes: Sequence[Labeled] = (),
) -> Window:
    """The canary's window at index ``i``, with the stable arm as its sibling (when given)."""
    c = Window("d", "canary", 60.0 * i, 60.0 * (i + 1), list(canary), list(canary_outcomes))
    sib = {"canary": c}
    if stable is not None:
        s = Window("d", "stable", 60.0 * i, 60.0 * (i + 1), list(stable), list(stable_outcomes))
        sib["stable"] = s
        s.siblings = sib
    c.siblings = sib
    return c


def breaches(det: Any, windows: Sequence[Window], threshold: float, alpha: float) -> list[int]:
    out = []
    for i, w in enumerate(windows):
        det.update(w)
        m = det.evaluate(w.end)
        if m.value is not None and m.value > threshold and m.p_value < alpha:
            out.append(i)
    return out


def stream(
    seed: int, n_windows: int, change_at: int, new_version: bool = False, **worse: float
) -> list[Window]:
    """Canary and stable alike until ``change_at``; then the canary is ``worse`` (and, with
    ``new_version``, runs version 3 from then on: a new canary release)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_windows):
        kw = worse if i >= change_at else {}
        version = "3" if new_version and i >= change_at else "2"
        t0 = 60.0 * i
        out.append(pair(
            i,
            preds(rng, 200, variant="canary", version=version, t0=t0, **kw),
            preds(rng, 800, variant="stable", version="1", t0=t0),
        ))
    return out


def test_a_worse_canary_is_flagged_and_an_equal_one_left_alone() -> None:
    # error rate 1% on both arms for 30 windows, then 4% on the canary
    wins = stream(7, 40, 30, error_rate=0.04)
    det = Canary(threshold=0.005, metric="error_rate", min_samples=100)
    flagged = breaches(det, wins, threshold=0.005, alpha=0.01)
    # The test pools the whole canary run, so 30 healthy windows dilute the change a while:
    # flagged on the 7th window after it, and on every window since.
    assert flagged == list(range(36, 40))
    equal = Canary(threshold=0.005, metric="error_rate", min_samples=100)
    assert breaches(equal, stream(8, 60, 60), threshold=0.005, alpha=0.01) == []


def test_error_rate_evidence_is_pooled_over_the_test() -> None:
    rng = np.random.default_rng(1)
    det = Canary(threshold=0.0, metric="error_rate")
    c1 = preds(rng, 100, variant="canary", version="2", error_rate=0.1)
    s1 = preds(rng, 400, variant="stable", version="1", error_rate=0.02)
    c2 = preds(rng, 100, variant="canary", version="2", error_rate=0.1, t0=60.0)
    s2 = preds(rng, 400, variant="stable", version="1", error_rate=0.02, t0=60.0)
    det.update(pair(0, c1, s1))
    det.update(pair(1, c2, s2))
    m = det.evaluate(120.0)
    kc = sum(p.error is not None for p in c1 + c2)
    ks = sum(p.error is not None for p in s1 + s2)
    theta = kc / 200 - ks / 800
    pooled = (kc + ks) / 1000
    v = pooled * (1 - pooled) * (1 / 200 + 1 / 800)
    tau2 = 0.02**2
    assert m.value == pytest.approx(theta, rel=1e-12)
    assert m.evidence["windows"] == 2 and m.evidence["canary_total"] == 200
    assert m.evidence["log_likelihood_ratio"] == pytest.approx(
        0.5 * math.log(v / (v + tau2)) + tau2 * theta**2 / (2 * v * (v + tau2)), rel=1e-12
    )
    assert m.p_value <= math.exp(-m.evidence["log_likelihood_ratio"]) + 1e-15
    assert m.evidence["ci_low"] < theta < m.evidence["ci_high"]


def test_always_valid_false_alarms_stay_below_alpha_under_continuous_peeking() -> None:
    # 100 stationary canaries, each watched for 40 windows: the mSPRT may reject at most
    # alpha of them, however often it peeks; a fixed-level test per window would not.
    rng = np.random.default_rng(31337)
    ok_c = Prediction(id="c", ts=0.0, deployment="d", model_version="2", variant="canary")
    bad_c = Prediction(id="c", ts=0.0, deployment="d", model_version="2", variant="canary", error="e")
    ok_s = Prediction(id="s", ts=0.0, deployment="d", model_version="1", variant="stable")
    bad_s = Prediction(id="s", ts=0.0, deployment="d", model_version="1", variant="stable", error="e")
    ever_msprt = ever_fixed = 0
    for _ in range(100):
        det = Canary(threshold=-1.0, metric="error_rate")
        fixed = ErrorRate(threshold=0.0, mode="variant")
        hit_m = hit_f = False
        for i in range(40):
            kc, ks = rng.binomial(100, 0.05), rng.binomial(300, 0.05)
            w = pair(i, [bad_c] * kc + [ok_c] * (100 - kc), [bad_s] * ks + [ok_s] * (300 - ks))
            det.update(w)
            fixed.update(w)
            hit_m |= det.evaluate(w.end).p_value < 0.05
            hit_f |= (fixed.evaluate(w.end).p_value or 1.0) < 0.05
        ever_msprt += hit_m
        ever_fixed += hit_f
    assert ever_msprt == 2  # at most 5 (alpha x 100) allowed
    assert ever_fixed == 89  # a fixed-level test, peeked at every window


def test_latency_distributions_compared_like_kayentas_judge() -> None:
    # release 3 of the canary, from window 10, is ~16% slower (median 20 ms -> 23 ms)
    wins = stream(21, 16, 10, new_version=True, latency_mu=3.15)
    det = Canary(threshold=2.0, metric="latency", min_samples=100)  # ms of median shift
    flagged = breaches(det, wins, threshold=2.0, alpha=0.01)
    # the new release's first window already (its test restarts), then a noisy window whose
    # shift estimate dips to 1.8 ms, then every window
    assert flagged == [10, 12, 13, 14, 15]
    m = det.evaluate(0.0)
    last = wins[-1]
    c, s = last.latencies, last.siblings["stable"].latencies
    assert m.evidence["window_shift"] == float(np.median(np.subtract.outer(c, s)))
    ref = sps.mannwhitneyu(c, s, method="asymptotic")
    assert m.evidence["window_u"] == ref.statistic
    assert m.evidence["window_mwu_p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert 0.5 < m.evidence["superiority"] < m.evidence["superiority_ci_high"]
    equal = Canary(threshold=2.0, metric="latency", min_samples=100)
    assert breaches(equal, stream(22, 40, 40), threshold=2.0, alpha=0.01) == []


def test_score_distribution_shift() -> None:
    rng = np.random.default_rng(5)
    wins = []
    for i in range(6):
        c = preds(rng, 300, variant="canary", version="2", t0=60.0 * i)
        s = preds(rng, 300, variant="stable", version="1", t0=60.0 * i)
        if i >= 3:  # the canary scores everything 0.1 higher
            c = [Prediction(id=p.id, ts=p.ts, deployment="d", model_version="2", variant="canary",
                            score=min(1.0, p.score + 0.1)) for p in c]
        wins.append(pair(i, c, s))
    det = Canary(threshold=0.02, metric="score", min_samples=50)
    assert breaches(det, wins, threshold=0.02, alpha=0.01) == [5]


def labelled(rng: np.random.Generator, n: int, variant: str, version: str, overconfident: float) -> list[Labeled]:
    p = rng.random(n)
    truth = 0.5 + (1 - overconfident) * (p - 0.5)
    y = rng.random(n) < truth
    return [Labeled(0.0, 1.0, variant, version, None, float(a), bool(b)) for a, b in zip(p, y)]


def test_calibration_of_the_canary_against_stable() -> None:
    rng = np.random.default_rng(12)
    wins = []
    for i in range(8):
        c = preds(rng, 300, variant="canary", version="2")
        s = preds(rng, 300, variant="stable", version="1")
        wins.append(pair(
            i, c, s,
            labelled(rng, 300, "canary", "2", 0.6 if i >= 4 else 0.0),
            labelled(rng, 300, "stable", "1", 0.0),
        ))
    det = Canary(threshold=0.01, metric="calibration", min_samples=100)
    assert breaches(det, wins, threshold=0.01, alpha=0.01) == [5, 6, 7]
    m = det.evaluate(0.0)
    assert m.evidence["label_coverage"] == 1.0 and m.evidence["canary_brier"] > m.evidence["baseline_brier"]


def test_insufficient_data_and_restarts() -> None:
    rng = np.random.default_rng(2)
    det = Canary(threshold=0.0, min_samples=50)
    assert det.evaluate(0.0).insufficient == "no window yet"
    det.update(pair(0, preds(rng, 100, variant="canary", version="2"), None))
    assert det.evaluate(60.0).insufficient == "no baseline arm 'stable' in this window"
    det.update(pair(1, preds(rng, 100, variant="canary", version="2"),
                    preds(rng, 20, variant="stable", version="1")))
    m = det.evaluate(120.0)
    assert m.insufficient == "baseline arm 'stable' has fewer than min_samples=50 observations"
    assert m.evidence["baseline_n"] == 20
    w = pair(2, preds(rng, 100, variant="canary", version="2"), preds(rng, 100, variant="stable", version="1"))
    det.update(w.siblings["stable"])
    assert "this is the baseline arm" in (det.evaluate(180.0).insufficient or "")
    det.update(w)
    assert det.evaluate(180.0).evidence["windows"] == 1
    det.update(w)  # the same span again (a sliding window would overlap like this)
    assert "overlaps" in (det.evaluate(180.0).insufficient or "")
    # a new canary version starts a new test
    det.update(pair(3, preds(rng, 100, variant="canary", version="3"), preds(rng, 100, variant="stable", version="1")))
    m = det.evaluate(240.0)
    assert m.evidence["windows"] == 1 and m.evidence["restarted_from"] == ["2", "1"]
    assert m.evidence["canary_version"] == "3"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "auc"}, "metric must be one of error_rate, score, latency, calibration"),
        ({"mixing_sd": 0}, "mixing_sd must be > 0"),
        ({"baseline": ""}, "baseline must be a variant name"),
        ({"confidence": 0.0}, r"confidence must be in \(0, 1\)"),
        ({"min_samples": -1}, "min_samples must be >= 0"),
    ],
)
def test_bad_parameters_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Canary(threshold=0.0, **kwargs)


# -- error_rate against the stable arm (a fixed-level test per window) --------------------------


def test_error_rate_against_a_sibling_arm() -> None:
    rng = np.random.default_rng(3)
    c = preds(rng, 200, variant="canary", version="2", error_rate=0.08)
    s = preds(rng, 600, variant="stable", version="1", error_rate=0.02)
    det = ErrorRate(threshold=0.01, mode="variant", min_samples=100)
    det.update(pair(0, c, s))
    m = det.evaluate(60.0)
    k1, k0 = sum(p.error is not None for p in c), sum(p.error is not None for p in s)
    pooled = (k1 + k0) / 800
    z = (k1 / 200 - k0 / 600) / math.sqrt(pooled * (1 - pooled) * (1 / 200 + 1 / 600))
    assert m.value == pytest.approx(k1 / 200 - k0 / 600, rel=1e-12)
    assert m.evidence["z"] == pytest.approx(z, rel=1e-12)
    assert m.p_value == pytest.approx(sps.norm.sf(z), rel=1e-9)
    assert m.evidence["baseline_variant"] == "stable" and m.evidence["baseline_n"] == 600
    det.update(pair(1, c, None))
    assert det.evaluate(120.0).insufficient == "no baseline arm 'stable' in this window"
    det.update(pair(2, c, s[:50]))
    assert "fewer than min_samples=100" in (det.evaluate(180.0).insufficient or "")
    w = pair(3, c, s)
    det.update(w.siblings["stable"])
    assert "this is the baseline arm" in (det.evaluate(240.0).insufficient or "")
    other = ErrorRate(threshold=0.01, mode="variant", baseline_variant="blue")
    other.update(w)
    assert other.evaluate(240.0).insufficient == "no baseline arm 'blue' in this window"
    with pytest.raises(ValueError, match="baseline_variant needs mode: variant"):
        ErrorRate(threshold=0.01, baseline_variant="stable")


def test_registered() -> None:
    det = make_detector("canary", threshold=0.01, min_samples=5, params={"metric": "latency"})
    assert isinstance(det, Canary) and det.metric == "latency" and det.baseline == "stable"


# -- a replay: the canary is rolled back, the stable arm is untouched ---------------------------

RULES = """
version: 1
deployments:
  demo-scorer: {backend: {type: log}, known_good_after: 5m}
rules:
  - name: canary-errors
    detector: canary
    params: {metric: error_rate}
    threshold: 0.01
    alpha: 0.001
    window: {size: 1m}
    min_samples: 50
    variants: [canary]
    severity: critical
    actions: [notify, rollback]
"""


def canary_scenario(fault: bool) -> Scenario:
    return Scenario(
        name="canary",
        duration=1800.0,
        rate=40.0,
        variants=(("stable", 0.8), ("canary", 0.2)),
        versions=((0.0, "1"), (300.0, "2", "canary")),
        base_error_rate=0.01,
        faults=(Fault("error_rate", 900.0, magnitude=0.06, variant="canary"),) if fault else (),
        seed=5,
    )


@pytest.mark.parametrize("fault", [True, False])
def test_replay_rolls_back_the_worse_canary_only(tmp_path: Path, fault: bool) -> None:
    config = load_config_text(RULES)
    path = tmp_path / "canary.jsonl"
    write_recording(canary_scenario(fault), path)
    decisions = MemoryDecisions()
    pipeline = build_pipeline(config, decisions=decisions)
    replay(open_recording(str(path), config), pipeline, batch_size=4096)
    alerts = [d for d in decisions.records if d["kind"] == "alert"]
    rollbacks = [d for d in decisions.records if d.get("action") == "rollback"]
    assert all(d["variant"] == "canary" for d in alerts)
    if not fault:
        assert alerts == [] and rollbacks == []
        return
    firing = [d for d in alerts if d["state"] == "firing"]
    assert len(firing) == 1 and len(rollbacks) == 1
    start = canary_scenario(True).start
    assert 900.0 < firing[0]["ts"] - start <= 900.0 + 5 * 60.0  # within five windows
    rb = rollbacks[0]
    assert (rb["variant"], rb["from_version"], rb["to_version"]) == ("canary", "2", "1")
