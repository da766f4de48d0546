"""Traffic shaping: how many requests arrive, what each draws, and which variant, version and
region serves it (traffic shares, deploys, rolling-update ramps, a daily cycle)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from rollbackd.synthetic.model import LATENCY_SIGMA

if TYPE_CHECKING:
    from rollbackd.scenarios import Cycle, Scenario

Columns = dict[str, np.ndarray]


def take(cols: Columns, keep: np.ndarray) -> Columns:
    return {k: v[keep] for k, v in cols.items()}


class DailyShape:
    """A :class:`~rollbackd.scenarios.Cycle`: the arrival rate is ``rate · (1 + a·cos φ)`` and
    the cycled feature's mean moves by ``amplitude · sd · cos φ``, with ``φ`` the phase of the
    absolute time against the period (anchored at the Unix epoch, so a 1-day period peaks at
    the same UTC time of day every day) and ``a = (ratio − 1) / (ratio + 1)``."""

    __slots__ = ("period", "peak", "a", "feature", "amplitude")

    def __init__(self, c: Cycle) -> None:
        self.period = c.period
        self.peak = c.peak
        self.a = (c.traffic_ratio - 1.0) / (c.traffic_ratio + 1.0)
        self.feature = c.feature
        self.amplitude = c.amplitude

    def _phase(self, t: np.ndarray | float) -> np.ndarray | float:
        return 2.0 * math.pi * (np.mod(np.subtract(t, self.peak), self.period) / self.period)

    def mean_factor(self, t0: float, t1: float) -> float:
        """The rate factor averaged over ``[t0, t1)`` (absolute seconds): exact, so that the
        chunks' piecewise-constant rates add up to the cycle's integral."""
        span = 2.0 * math.pi * (t1 - t0) / self.period
        p0 = float(self._phase(t0))
        return 1.0 + self.a * (math.sin(p0 + span) - math.sin(p0)) / span

    def feature_offset(self, ts: np.ndarray) -> np.ndarray:
        """In units of the feature's sd."""
        return self.amplitude * np.cos(self._phase(ts))


class Routing:
    """Which variant and which version serve a request."""

    __slots__ = ("variant_names", "shares", "share_cum", "version_names", "schedule", "ramps")

    def __init__(self, s: Scenario) -> None:
        self.variant_names = [v for v, _ in s.variants]
        shares = np.array([w for _, w in s.variants], dtype=float)
        self.shares = shares / shares.sum()
        self.share_cum = np.cumsum(self.shares)
        self.share_cum[-1] = 1.0
        self.version_names: list[str] = []
        for e in s.versions:
            if e[1] not in self.version_names:
                self.version_names.append(e[1])
        # per variant: offsets and version indices of the deploys that apply to it
        self.schedule: list[tuple[np.ndarray, np.ndarray]] = []
        for v in self.variant_names:
            entries = [e for e in s.versions if len(e) == 2 or e[2] == v]
            self.schedule.append(
                (
                    np.array([e[0] for e in entries], dtype=float),
                    np.array([self.version_names.index(e[1]) for e in entries], dtype=np.int64),
                )
            )
        # (variant, version, previous version or -1, start, end) per ramp and variant it covers
        self.ramps: list[tuple[int, int, int, float, float]] = []
        for r in s.ramps:
            for vi, v in enumerate(self.variant_names):
                if r.variant is not None and r.variant != v:
                    continue
                offs, vers = self.schedule[vi]
                pos = int(np.searchsorted(offs, r.start, side="left")) - 1
                prev = int(vers[pos]) if pos >= 0 else -1
                self.ramps.append((vi, self.version_names.index(r.version), prev, r.start, r.end))

    def variants(self, u_variant: np.ndarray) -> np.ndarray:
        variant = np.searchsorted(self.share_cum, u_variant, side="right")
        np.minimum(variant, len(self.variant_names) - 1, out=variant)
        return variant

    def versions(self, off: np.ndarray, variant: np.ndarray, u_ramp: np.ndarray | None) -> np.ndarray:
        """The version index serving each request (-1: none deployed on its variant yet)."""
        version = np.full(len(off), -1, dtype=np.int64)
        for vi, (offs, vers) in enumerate(self.schedule):
            sel = variant == vi
            if not sel.any():
                continue
            pos = np.searchsorted(offs, off[sel], side="right") - 1
            version[sel] = np.where(pos >= 0, vers[np.maximum(pos, 0)], -1)
        for vi, new, prev, start, end in self.ramps:
            assert u_ramp is not None
            during = (variant == vi) & (version == new) & (off >= start) & (off < end)
            old = during & (u_ramp >= (off - start) / (end - start))
            version[old] = prev
        return version


class Arrivals:
    """The requests of one deployment, chunk by chunk, with every random number each needs.

    Every per-request number is drawn whatever the faults, in a fixed order, so a scenario
    with faults is identical to the same scenario without them outside the faults' effects.
    The draws only some scenarios need come from their own stream (``extra``), so adding a
    ramp, regions or a signal-loss fault leaves the other draws alone."""

    __slots__ = ("s", "rng", "extra", "shape", "region_cum", "need_eta")

    def __init__(self, s: Scenario, rng: np.random.Generator, extra: np.random.Generator) -> None:
        self.s = s
        self.rng = rng
        self.extra = extra
        self.shape = DailyShape(s.cycle) if s.cycle is not None else None
        if s.regions:
            w = np.array([share for _, share in s.regions], dtype=float)
            self.region_cum = np.cumsum(w / w.sum())
            self.region_cum[-1] = 1.0
        else:
            self.region_cum = None
        self.need_eta = any(f.kind == "signal_loss" for f in s.faults)

    def draw(self, t0: float, length: float) -> Columns:
        """Arrivals in ``[t0, t0 + length)`` (relative seconds). Within a chunk the arrivals are
        uniform: a daily cycle's rate is the chunk's average (a minute is 0.07 % of a day)."""
        s, rng = self.s, self.rng
        k, c = s.n_numeric, s.n_categorical
        if self.shape is None:
            n = int(rng.poisson(s.rate * length))
        else:
            factor = self.shape.mean_factor(s.start + t0, s.start + t0 + length)
            n = int(rng.poisson(s.rate * factor * length))
        cols: Columns = {}
        cols["off"] = t0 + np.sort(rng.uniform(0.0, length, n))
        cols["u_variant"] = rng.random(n)
        cols["z"] = rng.standard_normal((n, k))
        cols["u_cat"] = rng.random((n, c))
        cols["u_cat_shift"] = rng.random((n, c))
        cols["latency"] = rng.lognormal(math.log(s.base_latency_ms), LATENCY_SIGMA, n)
        cols["u_error"] = rng.random(n)
        cols["u_code"] = rng.random(n)
        cols["u_labelled"] = rng.random(n)
        cols["delay"] = rng.uniform(s.label_delay[0], s.label_delay[1], n)
        cols["u_label"] = rng.random(n)
        cols["u_flip"] = rng.random(n)
        if s.ramps:
            cols["u_ramp"] = self.extra.random(n)
        if self.region_cum is not None:
            region = np.searchsorted(self.region_cum, self.extra.random(n), side="right")
            cols["region"] = np.minimum(region, len(self.region_cum) - 1)
        if self.need_eta:
            cols["eta"] = self.extra.standard_normal(n)
        return cols
