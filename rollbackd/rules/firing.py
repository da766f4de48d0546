"""How often an alert fires on a stream with no fault: :func:`rules.alerts.step` as a chain.

Under no fault each evaluation, independently (tumbling windows of i.i.d. data), *breaches*
with probability ``a`` (``value`` beyond ``threshold`` and ``p < alpha``: ``a <= alpha``) and
*holds* with probability ``q`` (``value`` beyond ``clear_threshold``). ``step`` opens an episode
on a breach (with ``k_of_n``: on ``k`` breaches among the last ``n`` evaluations, counted from
the end of the previous episode), and from then on only *holds* matter (hysteresis: the p-value
no longer does). With ``step`` = window.step::

    m = 1 + ceil(for / step)              evaluations in a row an episode needs to fire
    r = 1 + ceil(keep_firing_for / step)  evaluations in a row without a hold that resolve it

Each episode starts afresh (``step`` clears the k-of-n history when it ends), so episodes are
renewal cycles and the long-run firings per evaluation are ``P(fire) / E[cycle]``::

    P(fire)  = q^(m-1)
    E[cycle] = T + (1 - q^(m-1)) / (1 - q) + q^(m-1) · ((1-q)^-r - 1) / q

``T`` is the expected number of evaluations until an episode opens: ``1/a`` for a single
breach, and for ``k_of_n`` the first-passage time of the chain over the last ``n`` results
(solved exactly while it has at most :data:`HISTORY_STATES` states). The middle term is the
pending evaluations after the opening one (the first failed hold, or the ``m-1``-th), the last
the evaluations a firing alert holds and then takes to resolve (the wait for ``r`` misses in a
row, each ``1-q``). A firing that never resolves (``q = 1``) fires once: the rate is 0.

Only ``a <= alpha`` is known; ``q`` is not bounded by the level (a stream at its threshold is
beyond it about half the time, and more often beyond a lower ``clear_threshold``). The rate
grows with the breach probability (episodes open sooner; nothing after the opening depends on
it), so the bound is the worst case over the hold probability::

    rate <= max over q in [0, h] of rate(alpha, q)

with ``h`` = 1 (or a smaller cap, to ask what a calmer stream gives). Large ``m`` pushes the
worst ``q`` towards 1 and ``keep_firing_for`` pulls it back (a stream that holds that often
keeps one alert firing instead of raising new ones). The maximum is found on a grid fine near
``q = 0``, ``alpha`` and 1, refined by golden section. It grows with ``alpha``, so a budget's
level is found by bisection on it.

Sliding windows (``step < size``) share data, so holds of nearby evaluations are correlated
and the renewal argument fails. Only ``w = ceil(size / step)`` evaluations apart do windows
share none; the pending evaluations ``w, 2w, ...`` after the opening breach are then
independent of it and of each other, so an evaluation opens an episode that fires with
probability at most ``min(alpha, h) · h^floor((m-1) / w)`` (with ``h`` = 1: ``alpha``), and no
cycle is shorter than ``m + r`` evaluations: a bound, reported as one.

A detector that tests each window against data all windows share (a reference sample, a pooled
baseline, the release so far) gives correlated verdicts even on tumbling windows. Then only the
marginal level holds: every firing needs an opening breach, and no cycle is shorter than
``m + r`` evaluations, so ``rate <= min(alpha, 1 / (m + r))``, also reported as a bound.
Pure arithmetic: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rollbackd.rules.model import RuleSpec

__all__ = ["HISTORY_STATES", "FiringModel", "first_passage"]

# Largest k-of-n history chain solved exactly (a dense solve per level tried by a bisection).
HISTORY_STATES = 400
# Counts of evaluations in `for` and `keep_firing_for` are ceilings of duration / step; this
# absorbs float noise in a duration that is a multiple of the step.
_EPS = 1e-9


def _evaluations(duration: float, step: float) -> int:
    """How many steps past the first evaluation ``duration`` takes: ``ceil(duration / step)``."""
    return 0 if duration <= 0 else max(1, math.ceil(duration / step - _EPS))


@lru_cache(maxsize=64)
def _history_chain(k: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The transient states of the k-of-n opening chain (histories, from empty, with fewer than
    ``k`` breaches): for each, the index reached on a breach and on a miss (-1: opened)."""
    index: dict[tuple[bool, ...], int] = {(): 0}
    order: list[tuple[bool, ...]] = [()]
    on_breach: list[int] = []
    on_miss: list[int] = []
    i = 0
    while i < len(order):
        h = order[i]
        for outcome, into in ((True, on_breach), (False, on_miss)):
            nxt = (h + (outcome,))[-n:]
            if sum(nxt) >= k:
                into.append(-1)
                continue
            if nxt not in index:
                if len(order) >= HISTORY_STATES:
                    return None
                index[nxt] = len(order)
                order.append(nxt)
            into.append(index[nxt])
        i += 1
    return tuple(on_breach), tuple(on_miss)


@lru_cache(maxsize=256)
def first_passage(a: float, k: int, n: int) -> float | None:
    """Expected evaluations, from an empty history, until ``k`` of the last ``n`` breached
    (each independently with probability ``a``), the opening one included; ``None`` when the
    chain is larger than :data:`HISTORY_STATES`."""
    if a <= 0:
        return math.inf
    if k == 1:
        return 1.0 / a
    chain = _history_chain(k, n)
    if chain is None:
        return None
    on_breach, on_miss = chain
    size = len(on_breach)
    q = np.zeros((size, size))
    for s in range(size):
        if on_breach[s] >= 0:
            q[s, on_breach[s]] += a
        if on_miss[s] >= 0:
            q[s, on_miss[s]] += 1.0 - a
    t = np.linalg.solve(np.eye(size) - q, np.ones(size))
    return float(t[0])


@dataclass(frozen=True, slots=True)
class FiringModel:
    """A rule's timing, in evaluations: what turns per-evaluation breaches into firings."""

    m: int  # evaluations in a row an episode needs to fire: 1 + ceil(for / step)
    r: int  # evaluations in a row without a hold that resolve: 1 + ceil(keep_firing_for / step)
    k: int = 1
    n: int = 1
    overlap: int = 1  # ceil(size / step): 1 for tumbling windows
    shared: str | None = None  # what every window's test shares, making verdicts correlated

    @classmethod
    def of(cls, rule: RuleSpec, shared: str | None = None) -> FiringModel:
        step = rule.window.step
        return cls(
            shared=shared,
            m=1 + _evaluations(rule.for_, step),
            r=1 + _evaluations(rule.keep_firing_for, step),
            k=rule.k,
            n=rule.n,
            overlap=max(1, math.ceil(rule.window.size / step - _EPS)),
        )

    @property
    def loose(self) -> str | None:
        """Why :meth:`worst_rate` is only a bound, or ``None`` when it is exact (the worst case)."""
        if self.shared is not None:
            return self.shared
        if self.overlap > 1:
            return "sliding windows"
        if self.n > 1 and _history_chain(self.k, self.n) is None:
            return "k_of_n"
        return None

    def rate(self, a: float, q: float) -> float:
        """Long-run firings per evaluation on tumbling windows: breach ``a``, hold ``q``."""
        if a <= 0 or q >= 1 or (self.m > 1 and q <= 0):
            return 0.0
        t = first_passage(a, self.k, self.n)
        if t is None:  # too many states: a single breach opens sooner, so this bounds it
            t = 1.0 / a
        fire = q ** (self.m - 1)
        pending = (1.0 - fire) / (1.0 - q)
        # (1-q)^-r - 1 over q, for r misses in a row; -expm1(log1p) keeps it exact near q = 0
        log_miss = math.log1p(-q)
        if -self.r * log_miss > 700:
            return 0.0  # a firing alert that practically never resolves: it fired once
        held = self.r if q == 0 else math.expm1(-self.r * log_miss) / q
        return fire / (t + pending + fire * held)

    def worst_rate(self, alpha: float, hold: float = 1.0) -> float:
        """The most firings per evaluation a level ``alpha`` allows, whatever the hold
        probability up to ``hold`` (see the module docstring)."""
        if alpha <= 0:
            return 0.0
        if self.shared is not None:
            return min(alpha, 1.0 / (self.m + self.r))
        if self.overlap > 1:
            fire = min(alpha, hold) * hold ** ((self.m - 1) // self.overlap)
            return min(fire, 1.0 / (self.m + self.r))
        return self._worst(alpha, hold)[0]

    def worst_hold(self, alpha: float, hold: float = 1.0) -> float:
        """The hold probability at which :meth:`worst_rate` peaks (tumbling windows)."""
        return self._worst(alpha, hold)[1]

    def _worst(self, alpha: float, hold: float) -> tuple[float, float]:
        def f(q: float) -> float:
            return self.rate(alpha, q)

        hold = min(hold, 1.0)
        # q on a grid that is fine near 0, near alpha and near 1 (in -log(1 - q))
        grid = {hold * x for x in np.linspace(0.0, 1.0, 101)}
        grid |= {min(hold, alpha * x) for x in (0.5, 1.0, 2.0, 4.0)}
        grid |= {q for q in (-np.expm1(-np.linspace(0.0, 40.0, 201))).tolist() if q <= hold}
        qs = sorted(grid)
        values = [f(q) for q in qs]
        best = max(range(len(qs)), key=values.__getitem__)
        lo, hi = qs[max(best - 1, 0)], qs[min(best + 1, len(qs) - 1)]
        # golden section between the best point's neighbours (the rate is unimodal there)
        g = (math.sqrt(5.0) - 1.0) / 2.0
        x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
        f1, f2 = f(x1), f(x2)
        for _ in range(80):
            if f1 < f2:
                lo, x1, f1 = x1, x2, f2
                x2 = lo + g * (hi - lo)
                f2 = f(x2)
            else:
                hi, x2, f2 = x2, x1, f1
                x1 = hi - g * (hi - lo)
                f1 = f(x1)
        candidates = [(values[best], qs[best]), (f1, x1), (f2, x2)]
        return max(candidates)

    def level(self, rate: float, hold: float = 1.0) -> float:
        """The largest ``alpha`` whose :meth:`worst_rate` is at most ``rate`` (1 when even
        ``alpha`` 1 stays within it): bisection, the rate growing with ``alpha``."""
        if self.worst_rate(1.0, hold) <= rate:
            return 1.0
        lo, hi = 0.0, 1.0
        # in log scale first: levels span many decades
        while self.worst_rate(hi / 2.0, hold) > rate and hi > 1e-300:
            hi /= 2.0
        lo = hi / 2.0
        for _ in range(100):
            mid = (lo + hi) / 2.0
            if self.worst_rate(mid, hold) <= rate:
                lo = mid
            else:
                hi = mid
            if hi - lo <= hi * 1e-15:
                break
        return lo
