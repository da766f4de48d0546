"""Canary versus stable: the window's variant against a baseline arm of the same deployment."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rollbackd.detectors.base import Measurement, Window, register
from rollbackd.detectors.calibration import usable_pairs
from rollbackd.detectors.stats import (
    always_valid_pvalue,
    hodges_lehmann_shift,
    mann_whitney_u,
    msprt_log_lr,
)

__all__ = ["Canary", "CANARY_METRICS", "DEFAULT_MIXING_SD"]

CANARY_METRICS = ("error_rate", "score", "latency", "calibration")

# The mixing distribution's standard deviation, on the scale of each metric's tested
# statistic: a difference in error rates, in Brier scores, or in the probability that a
# canary value exceeds a stable one (minus 1/2). The mSPRT is most powerful for effects near
# it; see docs/detectors.md.
DEFAULT_MIXING_SD = {"error_rate": 0.02, "calibration": 0.01, "score": 0.1, "latency": 0.1}


def _dominant(versions: dict[str, int]) -> str | None:
    return max(versions, key=lambda v: (versions[v], v)) if versions else None


@register("canary")
class Canary:
    """The canary (the window's variant) against ``window.siblings[baseline]`` in the same span.

    ``metric`` picks what is compared:

    - ``error_rate``: serving error rates; ``value`` is the canary's minus the baseline's,
      both pooled over the test so far.
    - ``score`` / ``latency``: the distributions of ``score`` / ``latency_ms``, as Kayenta's
      judge compares them: per window a Mann–Whitney U test with the Hodges–Lehmann shift
      (median of canary − baseline differences) as the effect. ``value`` is the shift
      averaged over the test's windows, weighted by each window's information.
    - ``calibration``: Brier scores on the labels that arrived (canary minus baseline,
      pooled over the test), so a positive value is a worse-calibrated canary.

    The canary is looked at every window, so a fixed-level test would be peeking. ``p_value``
    is instead an always-valid p-value: a mixture sequential probability ratio test (mSPRT,
    Johari et al. 2017) of "no difference", with a normal mixing distribution of standard
    deviation ``mixing_sd`` (default :data:`DEFAULT_MIXING_SD`) on the tested statistic, and
    ``p_n = min(p_{n-1}, 1 / Λ_n)``. Whatever the monitoring schedule,
    ``P(p_n <= α for some n | no difference) <= α``. For ``score`` and ``latency`` the tested
    statistic is the probability of superiority ``U / (n_c n_b) - 1/2``, combined over
    windows by inverse null variance, which makes its sum a Gaussian random walk as the test
    requires. The test is two-sided; the rule's ``threshold`` on ``value`` gives the direction.

    A test runs from the first usable window of a pair of versions (the most frequent
    ``model_version`` of each arm) and starts over when either changes. Windows that overlap
    the previous one (sliding windows) are skipped: their data would count twice.

    Insufficient data: the window is the baseline arm itself, the baseline arm is missing
    from the window, or either arm has fewer than ``max(1, min_samples)`` observations
    (predictions; latencies or scores; usable labels for ``calibration``).
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset.
    STATE = ("_result", "_last_end", "_versions", "_windows", "_p", "_stats", "_s", "_h", "_info")

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        metric: str = "error_rate",
        baseline: str = "stable",
        mixing_sd: float | None = None,
        confidence: float = 0.95,
    ) -> None:
        if metric not in CANARY_METRICS:
            raise ValueError(f"metric must be one of {', '.join(CANARY_METRICS)}; got {metric!r}")
        if not isinstance(baseline, str) or not baseline:
            raise ValueError(f"baseline must be a variant name, got {baseline!r}")
        if mixing_sd is not None and not (isinstance(mixing_sd, (int, float)) and mixing_sd > 0):
            raise ValueError(f"mixing_sd must be > 0, got {mixing_sd!r}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.metric = metric
        self.baseline = baseline
        self.mixing_sd = mixing_sd
        self.confidence = confidence
        self._tau2 = float(mixing_sd if mixing_sd is not None else DEFAULT_MIXING_SD[metric]) ** 2
        self._reset()

    def _reset(self) -> None:
        self._result: Measurement | None = None
        self._last_end = -math.inf
        self._restart(None)

    def _restart(self, versions: tuple[str | None, str | None] | None) -> None:
        self._versions = versions
        self._windows = 0
        self._p = 1.0
        # Pooled sufficient statistics: n, sum, sum of squares per arm (canary, baseline).
        self._stats = np.zeros((2, 3))
        # Rank metrics: sums of estimate / V, shift / V, and 1 / V over windows.
        self._s = self._h = self._info = 0.0

    @property
    def _need(self) -> int:
        return max(1, self.min_samples)

    def update(self, window: Window) -> None:
        self._result = self._update(window)

    def evaluate(self, now: float) -> Measurement:
        if self._result is None:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        return self._result

    def _update(self, window: Window) -> Measurement:
        t = self.threshold
        if window.variant == self.baseline:
            return Measurement.insufficient_data(
                t, 0, f"this is the baseline arm {self.baseline!r}; restrict the rule to the canary"
            )
        other = window.siblings.get(self.baseline)
        if other is None:
            return Measurement.insufficient_data(
                t, 0, f"no baseline arm {self.baseline!r} in this window"
            )
        if window.start < self._last_end:
            return Measurement.insufficient_data(
                t, 0, "window overlaps the previous one (use tumbling windows)"
            )
        canary, base = self._sample(window), self._sample(other)
        nc, nb = _size(canary), _size(base)
        evidence: dict[str, Any] = {
            "metric": self.metric,
            "baseline": self.baseline,
            "canary_n": nc,
            "baseline_n": nb,
        }
        if self.metric == "calibration":
            evidence["label_coverage"] = window.label_coverage
            evidence["baseline_label_coverage"] = other.label_coverage
        if nc < self._need or nb < self._need:
            small = "canary" if nc < self._need else f"baseline arm {self.baseline!r}"
            return Measurement.insufficient_data(
                t,
                min(nc, nb),
                f"{small} has fewer than min_samples={self.min_samples} observations",
                **evidence,
            )
        self._last_end = window.end
        versions = (_dominant(window.versions), _dominant(other.versions))
        if versions != self._versions:
            if self._versions is not None:
                evidence["restarted_from"] = list(self._versions)
            self._restart(versions)
        evidence["canary_version"], evidence["baseline_version"] = versions
        self._windows += 1
        if self.metric in ("score", "latency"):
            value, estimate, variance = self._ranks(canary, base, evidence)
        else:
            value, estimate, variance = self._pooled(canary, base, evidence)
        log_lr = msprt_log_lr(estimate, variance, self._tau2)
        self._p = always_valid_pvalue(self._p, log_lr)
        low, high = _confidence_sequence(estimate, variance, self._tau2, 1.0 - self.confidence)
        if self.metric in ("score", "latency") and low is not None and high is not None:
            # The interval is on the tested scale: probability of superiority.
            evidence.update(superiority_ci_low=low + 0.5, superiority_ci_high=high + 0.5)
        else:
            evidence.update(ci_low=low, ci_high=high)
        evidence.update(
            windows=self._windows,
            log_likelihood_ratio=log_lr,
            mixing_sd=math.sqrt(self._tau2),
        )
        return Measurement(
            value,
            t,
            min(nc, nb),
            p_value=self._p,
            effect_size=value,
            evidence=evidence,
        )

    def _sample(self, w: Window) -> Any:
        if self.metric == "error_rate":
            return (w.n_errors, w.n)
        if self.metric == "score":
            return w.scores
        if self.metric == "latency":
            return w.latencies
        p, y, _, _ = usable_pairs(w.outcomes)
        return (p - y) ** 2

    def _pooled(
        self, canary: Any, base: Any, evidence: dict[str, Any]
    ) -> tuple[float, float, float]:
        st = self._stats
        if self.metric == "error_rate":
            (kc, nc), (kb, nb) = canary, base
            st += [[nc, kc, kc], [nb, kb, kb]]  # a 0/1 value is its own square
            evidence.update(window_effect=kc / nc - kb / nb, canary_errors=kc, baseline_errors=kb)
        else:
            for row, e in ((0, canary), (1, base)):
                st[row] += [e.shape[0], float(e.sum()), float(np.dot(e, e))]
            evidence["window_effect"] = float(canary.mean() - base.mean())
        (n_c, s_c, q_c), (n_b, s_b, q_b) = st
        mean_c, mean_b = s_c / n_c, s_b / n_b
        if self.metric == "error_rate":
            # Variance under H0 (equal rates), pooled: the test of Johari et al. for proportions.
            pooled = (s_c + s_b) / (n_c + n_b)
            variance = pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_b)
            evidence.update(canary_rate=mean_c, baseline_rate=mean_b)
        else:
            variance = _var(n_c, s_c, q_c) / n_c + _var(n_b, s_b, q_b) / n_b
            evidence.update(canary_brier=mean_c, baseline_brier=mean_b)
        evidence.update(canary_total=int(n_c), baseline_total=int(n_b))
        estimate = mean_c - mean_b
        return estimate, estimate, variance

    def _ranks(
        self, canary: np.ndarray, base: np.ndarray, evidence: dict[str, Any]
    ) -> tuple[float, float, float]:
        u, p_window, var_u = mann_whitney_u(canary, base)
        pairs = canary.shape[0] * base.shape[0]
        shift = hodges_lehmann_shift(canary, base)
        superiority = u / pairs
        if var_u > 0.0:
            v = var_u / (pairs * pairs)
            self._s += (superiority - 0.5) / v
            self._h += shift / v
            self._info += 1.0 / v
        evidence.update(
            window_shift=shift,
            window_u=u,
            window_mwu_p=p_window,
            window_superiority=superiority,
            canary_median=float(np.median(canary)),
            baseline_median=float(np.median(base)),
        )
        if self._info == 0.0:  # every value so far tied: no information, no shift
            return 0.0, 0.0, 0.0
        estimate = self._s / self._info
        evidence["superiority"] = estimate + 0.5
        return self._h / self._info, estimate, 1.0 / self._info


def _size(sample: Any) -> int:
    return int(sample[1]) if isinstance(sample, tuple) else int(sample.shape[0])


def _var(n: float, s: float, q: float) -> float:
    if n < 2:
        return 0.0
    return max(0.0, (q - s * s / n) / (n - 1))


def _confidence_sequence(
    estimate: float, variance: float, tau2: float, alpha: float
) -> tuple[float | None, float | None]:
    """The always-valid interval: the differences the mSPRT would not reject at ``alpha``."""
    if not variance > 0.0:
        return None, None
    spread = 2.0 * math.log(1.0 / alpha) + math.log((variance + tau2) / variance)
    half = math.sqrt(variance * (variance + tau2) / tau2 * spread)
    return estimate - half, estimate + half
