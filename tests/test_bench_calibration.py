"""The calibration helpers behind benchmarks/detectors.py's delay comparisons: the fairness of
"the same false-alarm rate" rests on them, so they are checked against brute force."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "detectors.py"
_spec = importlib.util.spec_from_file_location("bench_detectors", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_detectors"] = bench
_spec.loader.exec_module(bench)


def _runs(flags: np.ndarray) -> int:
    """Alarms as runs of consecutive flagged evaluations, counted the slow way."""
    count, prev = 0, False
    for f in flags.tolist():
        count += f and not prev
        prev = f
    return count


@settings(max_examples=300, deadline=None)
@given(
    ps=st.lists(st.sampled_from([0.001, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0]), min_size=1, max_size=60),
    allowed=st.integers(0, 20),
)
def test_alpha_for_alarms_is_the_loosest_level_within_the_allowance(ps: list[float], allowed: int) -> None:
    p = np.array(ps)
    alpha = bench._alpha_for_alarms(p, allowed)
    assert _runs(p < alpha) <= allowed
    # every looser candidate level (the next distinct p-value up) breaks the allowance
    looser = sorted({x for x in ps if x > alpha} | ({1.0 + 1e-9} if alpha <= 1.0 else set()))
    if alpha < 1.0 and looser:
        assert _runs(p < looser[0]) > allowed


def test_alpha_for_alarms_counts_merged_runs_once() -> None:
    # two adjacent small p-values are one alarm; a p-value of 1 never breaches
    p = np.array([0.01, 0.02, 0.9, 0.03, 1.0, 0.04])
    assert bench._alpha_for_alarms(p, 1) == 0.03  # flags the run 0.01, 0.02 only
    assert bench._alpha_for_alarms(p, 2) == 0.04
    # flagging 0.9 merges the first two alarms: three allowed take every level below 1
    assert bench._alpha_for_alarms(p, 3) == 1.0
    assert _runs(p < 1.0) == 2


def test_rate_ratio_interval_is_the_exact_conditional_one() -> None:
    from scipy.stats import beta

    a, b = 30, 50
    out = bench._rate_ratio(a, b)
    n = a + b
    lo = beta.ppf(0.025, a, n - a + 1)  # Clopper-Pearson, written out
    hi = beta.ppf(0.975, a + 1, n - a)
    assert abs(out["ratio"] - a / b) < 1e-12
    assert abs(out["ci"][0] - lo / (1 - lo)) < 1e-9
    assert abs(out["ci"][1] - hi / (1 - hi)) < 1e-9


def test_paired_verdicts() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(100, 300, 400).tolist()
    same = bench._paired(base, base, np.random.default_rng(2), cap=10_000)
    assert same["median_ratio"] == 1.0 and same["verdict"] == "no worse (within 10 %)"
    faster = bench._paired([d // 2 for d in base], base, np.random.default_rng(2), cap=10_000)
    assert faster["verdict"] == "faster" and faster["ours_first"] == 400
    slower = bench._paired([d * 2 for d in base], base, np.random.default_rng(2), cap=10_000)
    assert slower["verdict"] == "slower"
    # a delay past the cap is a miss, counted as infinite in the median
    missed = bench._paired([None] * 300 + base[:100], base, np.random.default_rng(2), cap=10_000)
    assert missed["missed_ours"] == 300 and missed["median_ours"] is None
