"""Random streams and the per-deployment model: feature distributions and scoring."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rollbackd.scenarios import Scenario

# Categorical features cycle through these (name, categories, probabilities).
CATEGORICAL = (
    ("country", ("US", "DE", "GB", "FR", "IN"), (0.40, 0.20, 0.15, 0.15, 0.10)),
    ("device", ("ios", "android", "web"), (0.45, 0.35, 0.20)),
    ("channel", ("app", "web", "partner", "store"), (0.50, 0.25, 0.15, 0.10)),
)

LATENCY_SIGMA = 0.35
#: The norm of the numeric weights: the standard deviation of the numeric part of the logit.
WEIGHT_NORM = 5.0
LOGIT_CLIP = 40.0

# Independent random streams, keyed (seed, stream, deployment). EXTRA holds the per-request
# draws that only some scenarios need (ramps, regions, signal loss): drawing them from the
# traffic stream would change every older scenario's bytes.
STREAM_PARAMS, STREAM_TRAFFIC, STREAM_JITTER, STREAM_MALFORMED, STREAM_EXTRA = 0, 1, 2, 3, 4


def rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -LOGIT_CLIP, LOGIT_CLIP)))


class Model:
    """Per-deployment feature distribution and scoring function."""

    __slots__ = ("mean", "sd", "w", "cat_cum", "cat_rev_cum", "cat_values", "cat_effect", "intercept")

    def __init__(self, s: Scenario, dep_index: int) -> None:
        r = rng(s.seed, STREAM_PARAMS, dep_index)
        k = s.n_numeric
        self.intercept = s.intercept
        self.mean = np.round(r.normal(0.0, 3.0, k), 2)
        self.sd = np.round(r.uniform(0.5, 2.5, k), 2)
        w = r.normal(0.0, 1.0, k)
        norm = float(np.sqrt(w @ w)) if k else 0.0
        self.w = w * (WEIGHT_NORM / norm) if norm > 0 else w
        self.cat_cum: list[np.ndarray] = []
        self.cat_rev_cum: list[np.ndarray] = []
        self.cat_values: list[tuple[str, ...]] = []
        self.cat_effect: list[np.ndarray] = []
        for j in range(s.n_categorical):
            _, values, probs = CATEGORICAL[j % len(CATEGORICAL)]
            p = np.asarray(probs)
            cum = np.cumsum(p)
            cum[-1] = 1.0
            rp = p[::-1]  # category i gets the probability of category n-1-i
            rev_cum = np.cumsum(rp)
            rev_cum[-1] = 1.0
            self.cat_cum.append(cum)
            self.cat_rev_cum.append(rev_cum)
            self.cat_values.append(values)
            self.cat_effect.append(r.normal(0.0, 0.3, len(values)))

    def categories(self, u_cat: np.ndarray) -> np.ndarray:
        n, c = u_cat.shape
        cat = np.empty((n, c), dtype=np.int64)
        for j in range(c):
            cat[:, j] = np.searchsorted(self.cat_cum[j], u_cat[:, j], side="right")
        return cat

    def numeric_logit(self, x: np.ndarray) -> np.ndarray:
        """The numeric part of the logit: Normal(0, WEIGHT_NORM²) on unshifted features."""
        return ((x - self.mean) / self.sd) @ self.w

    def logit(self, x: np.ndarray, cat: np.ndarray) -> np.ndarray:
        n, k = x.shape
        logit = self.intercept + self.numeric_logit(x) if k else np.full(n, self.intercept)
        for j in range(cat.shape[1]):
            logit = logit + self.cat_effect[j][cat[:, j]]
        return logit
