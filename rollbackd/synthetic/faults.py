"""What a scenario's faults do to one chunk of one deployment's requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rollbackd.synthetic.model import Model, sigmoid
from rollbackd.synthetic.traffic import Columns, Routing

if TYPE_CHECKING:
    from rollbackd.scenarios import Scenario

# Gauss–Hermite nodes and weights for E[f(Z)], Z ~ Normal(0, 1).
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(48)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


class FaultEffects:
    """Per-request effects of the faults. ``apply`` moves the features (``feature_shift``) in
    place; the other effects are arrays the generator folds into errors, latency, scores and
    labels."""

    __slots__ = ("p_error", "lat_mult", "logit_shift", "p_flip", "drop", "dropped_share", "signal_loss")

    def __init__(self, s: Scenario, n: int) -> None:
        self.p_error = np.full(n, s.base_error_rate)
        self.lat_mult = np.ones(n)
        self.logit_shift = np.zeros(n)
        self.p_flip = np.zeros(n)
        self.drop = np.zeros(n, dtype=bool)
        self.dropped_share = np.zeros(n)
        self.signal_loss = np.zeros(n)

    @classmethod
    def apply(
        cls, s: Scenario, d: int, routing: Routing, m: Model, cols: Columns, x: np.ndarray, cat: np.ndarray
    ) -> FaultEffects:
        off, version, variant = cols["off"], cols["version"], cols["variant"]
        n = len(off)
        fx = cls(s, n)
        fault_error = np.full(n, -1.0)
        dn = s.deployments[d]
        region_names = [r for r, _ in s.regions]
        for f in s.faults:
            if f.deployment is not None and f.deployment != dn:
                continue
            mask = off >= f.start
            if f.end is not None:
                mask &= off < f.end
            if f.version is not None:
                mask &= version == routing.version_names.index(f.version)
            if f.variant is not None:
                mask &= variant == routing.variant_names.index(f.variant)
            if f.region is not None:
                mask &= cols["region"] == region_names.index(f.region)
            if not mask.any():
                continue
            mag = f.magnitude
            if f.kind == "error_rate":
                fault_error[mask] = np.maximum(fault_error[mask], mag)
            elif f.kind == "latency":
                fx.lat_mult[mask] *= mag
            elif f.kind == "score_shift":
                fx.logit_shift[mask] += mag
            elif f.kind == "model_error":
                fx.p_flip[mask] = np.maximum(fx.p_flip[mask], mag)
            elif f.kind == "traffic_stop":
                fx.drop |= mask
                fx.dropped_share[mask] = np.maximum(fx.dropped_share[mask], mag)
            elif f.kind == "signal_loss":
                fx.signal_loss[mask] = np.maximum(fx.signal_loss[mask], mag)
            else:  # feature_shift
                targets = [f.feature] if f.feature is not None else list(s.feature_names[: s.n_numeric])
                for name in targets:
                    if name.startswith("num_"):
                        i = int(name[4:])
                        x[mask, i] += mag * m.sd[i]
                    else:
                        j = int(name[4:])
                        redraw = mask & (cols["u_cat_shift"][:, j] < mag)
                        cat[redraw, j] = np.searchsorted(
                            m.cat_rev_cum[j], cols["u_cat"][redraw, j], side="right"
                        )
        np.copyto(fx.p_error, fault_error, where=fault_error >= 0.0)
        return fx

    def served_logit(self, m: Model, x: np.ndarray, logit: np.ndarray, eta: np.ndarray | None) -> np.ndarray:
        """The logit of the score the model serves, before ``score_shift``.

        Under ``signal_loss`` ρ the version sees only part of the numeric signal ``L``
        (variance σ²): ``L = L1 + L2`` with ``L2 = ρ·L + √(ρ(1−ρ))·σ·η`` (η a standard normal
        draw) is independent of ``L1`` and has variance ρσ², so the version's calibrated score
        is ``E[sigmoid(logit − L2 + L2') | L1]`` with ``L2' ~ Normal(0, ρσ²)``, computed by
        Gauss–Hermite quadrature. Its scores stay calibrated; it separates the classes less
        well (fewer true positives above 0.5: recall falls)."""
        rho = self.signal_loss
        if eta is None or not (rho > 0).any():
            return logit
        sigma2 = float(m.w @ m.w)
        numeric = m.numeric_logit(x) if x.shape[1] else np.zeros(len(logit))
        lost = rho * numeric + np.sqrt(rho * (1.0 - rho) * sigma2) * eta
        seen = logit - lost
        spread = np.sqrt(rho * sigma2)
        p = sigmoid(seen[:, None] + spread[:, None] * _GH_NODES[None, :]) @ _GH_WEIGHTS
        p = np.clip(p, 1e-300, 1.0 - 1e-16)
        return np.where(rho > 0, np.log(p) - np.log1p(-p), logit)
