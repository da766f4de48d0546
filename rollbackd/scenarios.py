"""Deterministic synthetic traffic: prediction, outcome and deploy events (contract v1).

Used by ``rollbackd demo``, the tests and the benchmarks. A :class:`Scenario` describes the
traffic of one or more deployments over a time window and the :class:`Fault` s injected into
it; :func:`generate` turns it into JSON Lines (``bytes`` without the trailing newline) in
event-time order.

Determinism
-----------
Everything is drawn from ``numpy.random.Generator`` (PCG64) streams derived from
``Scenario.seed`` with :class:`numpy.random.SeedSequence`; nothing reads the clock or global
random state, and the output is encoded with ``msgspec`` from dicts of fixed key order, so the
same Scenario gives byte-identical output on every run (numpy documents that ``Generator``
streams may change between numpy releases; floats are rounded to 3-4 decimals, which absorbs
last-ulp differences between platforms' libm).

The random streams are separated so that scenarios compare cleanly:

* each deployment has its own traffic stream, and every per-request random number is drawn
  whether a fault uses it or not, so a scenario with faults is *identical* to the same scenario
  without them outside the faults' effects (same ids, timestamps, features, labels);
* malformed lines and arrival jitter use their own streams, so ``malformed_fraction`` and
  ``jitter`` only add lines or reorder them, never change the valid events.

Model of the traffic
--------------------
* Arrivals: Poisson process with ``rate`` predictions per second per deployment. Each
  request is assigned a variant by the traffic shares; a variant serves no traffic before its
  first version is deployed.
* Features: ``num_i`` ~ Normal(mean_i, sd_i) with per-feature parameters derived from the seed
  (and the deployment); ``cat_j`` drawn from fixed categorical distributions (country codes,
  device, channel).
* ``score`` = sigmoid(intercept + w . standardised numeric features + category effects),
  ``prediction`` = int(score >= 0.5). The label is Bernoulli(true score): the model is
  calibrated unless a ``score_shift`` fault moves the served score (the label keeps following
  the unshifted one) or a ``model_error`` fault flips labels.
* ``error``: null, or one of :data:`ERROR_CODES` with probability ``base_error_rate`` (or an
  ``error_rate`` fault's magnitude); errored predictions have null ``prediction``/``score`` and
  never get an outcome.
* Outcomes: a ``label_fraction`` share of the successful predictions gets an outcome after a
  uniform ``label_delay``. The recording is the window ``[start, start + duration)``: outcomes
  that would arrive after its end are not emitted.
* Deploy events at each ``versions`` offset, one per variant the entry applies to, with the
  variant's traffic share and a deterministic ``git_sha`` in ``attrs``.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import msgspec
import numpy as np

__all__ = [
    "Fault",
    "Scenario",
    "RecordingStats",
    "generate",
    "write_recording",
    "iter_chunks",
    "expected_events",
    "scenario_truth",
    "benchmark_scenario",
    "BUILTIN",
    "ERROR_CODES",
    "MALFORMED_KINDS",
    "FAULT_KINDS",
]

FaultKind = Literal["error_rate", "latency", "feature_shift", "score_shift", "model_error", "traffic_stop"]
FAULT_KINDS: tuple[str, ...] = (
    "error_rate",
    "latency",
    "feature_shift",
    "score_shift",
    "model_error",
    "traffic_stop",
)

#: Magnitude used when a Fault is created without one.
DEFAULT_MAGNITUDE: dict[str, float] = {
    "error_rate": 0.3,  # error probability during the fault
    "latency": 3.0,  # latency multiplier
    "feature_shift": 1.5,  # shift in reference SDs (numeric) / resampled share (categorical)
    "score_shift": 1.0,  # added to the logit of the served score
    "model_error": 0.2,  # probability that a label is flipped
    "traffic_stop": 1.0,  # share of requests that never arrive
}

ERROR_CODES: tuple[str, ...] = ("TIMEOUT", "UPSTREAM_5XX", "INTERNAL")
_ERROR_CODE_CUM = np.cumsum([0.5, 0.35, 0.15])

#: The ways a malformed line breaks the contract, in the order of their kind index.
MALFORMED_KINDS: tuple[str, ...] = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "unknown_type",
    "out_of_range",
    "naive_timestamp",
)

# Categorical features cycle through these (name, categories, probabilities).
_CATEGORICAL = (
    ("country", ("US", "DE", "GB", "FR", "IN"), (0.40, 0.20, 0.15, 0.15, 0.10)),
    ("device", ("ios", "android", "web"), (0.45, 0.35, 0.20)),
    ("channel", ("app", "web", "partner", "store"), (0.50, 0.25, 0.15, 0.10)),
)

_LATENCY_SIGMA = 0.35
_INTERCEPT = -1.5
_WEIGHT_NORM = 5.0
_LOGIT_CLIP = 40.0


# --------------------------------------------------------------------------------------------
# Scenario description


@dataclass(frozen=True, slots=True)
class Fault:
    """Something that goes wrong during ``[start, end)`` seconds after the scenario start.

    ``end=None``: until the end of the scenario. ``magnitude`` by kind (``None``: the kind's
    :data:`DEFAULT_MAGNITUDE`):

    * ``error_rate``: the error probability during the fault (replaces the base rate; the
      largest applies where faults overlap);
    * ``latency``: latency multiplier;
    * ``feature_shift``: numeric feature: shift of the mean in reference SDs; categorical
      feature: the share of requests whose category is redrawn from the reversed distribution
      (capped at 1). ``feature=None`` shifts every numeric feature;
    * ``score_shift``: added to the logit of the served score (labels keep the true score, so
      the model becomes miscalibrated);
    * ``model_error``: probability that a label is flipped.

    ``version``/``variant``/``deployment`` restrict the fault to traffic served by that
    version / on that variant / of that deployment (``None``: all).
    """

    kind: FaultKind
    start: float
    end: float | None = None
    magnitude: float = None  # type: ignore[assignment]  # None -> DEFAULT_MAGNITUDE[kind]
    feature: str | None = None
    version: str | None = None
    variant: str | None = None
    deployment: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if self.magnitude is None:
            object.__setattr__(self, "magnitude", DEFAULT_MAGNITUDE[self.kind])
        object.__setattr__(self, "magnitude", float(self.magnitude))
        object.__setattr__(self, "start", float(self.start))
        if self.end is not None:
            object.__setattr__(self, "end", float(self.end))
        m = self.magnitude
        if not math.isfinite(m):
            raise ValueError(f"Fault.magnitude must be finite, got {m}")
        if not (math.isfinite(self.start) and self.start >= 0.0):
            raise ValueError(f"Fault.start must be >= 0, got {self.start}")
        if self.end is not None and not (self.end > self.start):
            raise ValueError(f"Fault.end must be > start ({self.start}), got {self.end}")
        if self.kind in ("error_rate", "model_error", "traffic_stop") and not 0.0 <= m <= 1.0:
            raise ValueError(f"{self.kind} magnitude must be in [0, 1], got {m}")
        if self.kind == "latency" and not m > 0.0:
            raise ValueError(f"latency magnitude must be > 0, got {m}")
        if self.feature is not None and self.kind != "feature_shift":
            raise ValueError(f"Fault.feature only applies to feature_shift, not {self.kind}")


VersionEntry = tuple[float, str] | tuple[float, str, str]


@dataclass(frozen=True, slots=True)
class Scenario:
    """Synthetic traffic of ``deployments`` during ``[start, start + duration)``.

    ``versions``: ``(offset, version)`` deploys ``version`` on every variant at ``offset``
    seconds; ``(offset, version, variant)`` only on that variant (e.g. a canary). Every
    variant serves the latest version deployed on it; it serves no traffic before its first.
    ``malformed_fraction`` (< 0.5) is the expected share of output lines that are malformed;
    they are *added* next to valid lines, never replace one.
    """

    name: str
    start: float = 1_790_000_000.0
    duration: float = 1800.0
    rate: float = 20.0
    deployments: tuple[str, ...] = ("demo-scorer",)
    variants: tuple[tuple[str, float], ...] = (("primary", 1.0),)
    n_numeric: int = 3
    n_categorical: int = 1
    versions: tuple[VersionEntry, ...] = ((0.0, "1"),)
    base_error_rate: float = 0.005
    base_latency_ms: float = 20.0
    label_fraction: float = 0.5
    label_delay: tuple[float, float] = (30.0, 300.0)
    faults: tuple[Fault, ...] = ()
    malformed_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"Scenario {self.name!r}: {msg}")

        if not math.isfinite(self.start):
            bad(f"start must be finite, got {self.start}")
        if not (math.isfinite(self.duration) and self.duration > 0):
            bad(f"duration must be > 0, got {self.duration}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            bad(f"rate must be > 0, got {self.rate}")
        if not self.deployments or len(set(self.deployments)) != len(self.deployments):
            bad(f"deployments must be non-empty and unique, got {self.deployments}")
        names = [v[0] for v in self.variants]
        if not self.variants or len(set(names)) != len(names):
            bad(f"variants must be non-empty and unique, got {self.variants}")
        if any(not (math.isfinite(w) and w > 0) for _, w in self.variants):
            bad(f"variant shares must be > 0, got {self.variants}")
        if self.n_numeric < 0 or self.n_categorical < 0:
            bad("n_numeric and n_categorical must be >= 0")
        if not self.versions:
            bad("versions must not be empty")
        for entry in self.versions:
            if len(entry) not in (2, 3):
                bad(f"a versions entry is (offset, version[, variant]), got {entry!r}")
            if not (0.0 <= entry[0] < self.duration):
                bad(f"version offset must be in [0, duration), got {entry[0]}")
            if len(entry) == 3 and entry[2] not in names:
                bad(f"versions entry {entry!r} names an unknown variant")
        offsets = [e[0] for e in self.versions]
        if offsets != sorted(offsets):
            bad("versions must be sorted by offset")
        if not 0.0 <= self.base_error_rate <= 1.0:
            bad(f"base_error_rate must be in [0, 1], got {self.base_error_rate}")
        if not self.base_latency_ms > 0:
            bad(f"base_latency_ms must be > 0, got {self.base_latency_ms}")
        if not 0.0 <= self.label_fraction <= 1.0:
            bad(f"label_fraction must be in [0, 1], got {self.label_fraction}")
        lo, hi = self.label_delay
        if not (0.0 <= lo <= hi and math.isfinite(hi)):
            bad(f"label_delay must be 0 <= low <= high, got {self.label_delay}")
        if not 0.0 <= self.malformed_fraction < 0.5:
            bad(f"malformed_fraction must be in [0, 0.5), got {self.malformed_fraction}")
        feats = set(self.feature_names)
        versions = {e[1] for e in self.versions}
        for f in self.faults:
            if not isinstance(f, Fault):
                bad(f"faults must be Fault instances, got {f!r}")
            if f.feature is not None and f.feature not in feats:
                bad(f"fault feature {f.feature!r} is not one of {sorted(feats)}")
            if f.version is not None and f.version not in versions:
                bad(f"fault version {f.version!r} is never deployed")
            if f.variant is not None and f.variant not in names:
                bad(f"fault variant {f.variant!r} is not a variant")
            if f.deployment is not None and f.deployment not in self.deployments:
                bad(f"fault deployment {f.deployment!r} is not a deployment")
            if f.start >= self.duration:
                bad(f"fault starts at {f.start}, after the end ({self.duration})")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"num_{i}" for i in range(self.n_numeric)) + tuple(
            f"cat_{j}" for j in range(self.n_categorical)
        )

    @property
    def end(self) -> float:
        """Unix seconds of the end of the window (exclusive)."""
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class RecordingStats:
    """Line counts of a recording (``lines`` = all four kinds together)."""

    predictions: int = 0
    outcomes: int = 0
    deploys: int = 0
    malformed: int = 0
    lines: int = 0


# --------------------------------------------------------------------------------------------
# Generation internals


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


_STREAM_PARAMS, _STREAM_TRAFFIC, _STREAM_JITTER, _STREAM_MALFORMED = 0, 1, 2, 3


class _Model:
    """Per-deployment feature distribution and scoring function."""

    __slots__ = ("mean", "sd", "w", "cat_cum", "cat_rev_cum", "cat_values", "cat_effect")

    def __init__(self, s: Scenario, dep_index: int) -> None:
        rng = _rng(s.seed, _STREAM_PARAMS, dep_index)
        k = s.n_numeric
        self.mean = np.round(rng.normal(0.0, 3.0, k), 2)
        self.sd = np.round(rng.uniform(0.5, 2.5, k), 2)
        w = rng.normal(0.0, 1.0, k)
        norm = float(np.sqrt(w @ w)) if k else 0.0
        self.w = w * (_WEIGHT_NORM / norm) if norm > 0 else w
        self.cat_cum: list[np.ndarray] = []
        self.cat_rev_cum: list[np.ndarray] = []
        self.cat_values: list[tuple[str, ...]] = []
        self.cat_effect: list[np.ndarray] = []
        for j in range(s.n_categorical):
            _, values, probs = _CATEGORICAL[j % len(_CATEGORICAL)]
            p = np.asarray(probs)
            cum = np.cumsum(p)
            cum[-1] = 1.0
            rp = p[::-1]  # category i gets the probability of category n-1-i
            rev_cum = np.cumsum(rp)
            rev_cum[-1] = 1.0
            self.cat_cum.append(cum)
            self.cat_rev_cum.append(rev_cum)
            self.cat_values.append(values)
            self.cat_effect.append(rng.normal(0.0, 0.3, len(values)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -_LOGIT_CLIP, _LOGIT_CLIP)))


def _git_sha(deployment: str, variant: str, version: str) -> str:
    return hashlib.sha1(f"{deployment}\0{variant}\0{version}".encode()).hexdigest()[:7]


class _Pool:
    """Pending events of one kind as column arrays; ``take`` removes those due."""

    __slots__ = ("cols",)

    def __init__(self) -> None:
        self.cols: dict[str, np.ndarray] | None = None

    def add(self, cols: dict[str, np.ndarray]) -> None:
        if self.cols is None:
            self.cols = cols
        else:
            self.cols = {k: np.concatenate((v, cols[k])) for k, v in self.cols.items()}

    def take(self, threshold: float | None) -> dict[str, np.ndarray] | None:
        if self.cols is None:
            return None
        if threshold is None:
            out, self.cols = self.cols, None
            return out
        due = self.cols["key"] < threshold
        if not due.any():
            return None
        if due.all():
            out, self.cols = self.cols, None
            return out
        keep = ~due
        out = {k: v[due] for k, v in self.cols.items()}
        self.cols = {k: v[keep] for k, v in self.cols.items()}
        return out


def _chunk_seconds(s: Scenario) -> float:
    per_second = s.rate * len(s.deployments)
    if per_second <= 1000.0:
        return 60.0
    return max(1.0, float(int(60_000.0 / per_second)))


class _Generator:
    """Produces the output chunk by chunk: ``run()`` yields ``(lines, kinds_count)``."""

    def __init__(self, s: Scenario, jitter: float) -> None:
        if not (math.isfinite(jitter) and 0.0 <= jitter <= 2.0):
            raise ValueError(f"jitter must be in [0, 2] seconds, got {jitter}")
        self.s = s
        self.jitter = float(jitter)
        self.models = [_Model(s, d) for d in range(len(s.deployments))]
        self.traffic = [_rng(s.seed, _STREAM_TRAFFIC, d) for d in range(len(s.deployments))]
        self.jrng = _rng(s.seed, _STREAM_JITTER)
        self.mrng = _rng(s.seed, _STREAM_MALFORMED)
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
        self.fnames = list(s.feature_names)
        self.serial = [0] * len(s.deployments)
        self.encode = msgspec.json.Encoder().encode
        self.p_insert = s.malformed_fraction / (1.0 - s.malformed_fraction)
        self.bad_serial = 0
        self.last_prediction: dict[str, Any] | None = None
        self.preds = _Pool()
        self.outs = _Pool()
        self.deploys = _Pool()
        self._deploy_dicts: list[dict[str, Any]] = []
        self._init_deploys()

    # -- deploy events -------------------------------------------------------------------------

    def jitter_draw(self, n: int) -> np.ndarray:
        return self.jrng.random(n) * self.jitter

    def _init_deploys(self) -> None:
        s = self.s
        ts, dep, serial = [], [], []
        for d, dn in enumerate(s.deployments):
            for e in s.versions:
                for vi, v in enumerate(self.variant_names):
                    if len(e) == 3 and e[2] != v:
                        continue
                    t = round(s.start + e[0], 3)
                    self._deploy_dicts.append(
                        {
                            "type": "deploy",
                            "ts": t,
                            "deployment": dn,
                            "model_version": e[1],
                            "variant": v,
                            "traffic": round(float(self.shares[vi]), 4),
                            "attrs": {"git_sha": _git_sha(dn, v, e[1])},
                        }
                    )
                    ts.append(t)
                    dep.append(d)
                    serial.append(len(serial))
        self.deploys.add(
            {
                "key": np.array(ts, dtype=float),
                "dep": np.array(dep, dtype=np.int64),
                "serial": np.array(serial, dtype=np.int64),
            }
        )

    # -- traffic -------------------------------------------------------------------------------

    def _traffic(self, d: int, t0: float, length: float) -> None:
        """Draws the predictions of deployment ``d`` in ``[t0, t0 + length)`` (relative)."""
        s, m, rng = self.s, self.models[d], self.traffic[d]
        k, c = s.n_numeric, s.n_categorical
        n = int(rng.poisson(s.rate * length))
        # Every draw happens whatever the faults, in a fixed order (see module docstring).
        off = t0 + np.sort(rng.uniform(0.0, length, n))
        u_variant = rng.random(n)
        z = rng.standard_normal((n, k))
        u_cat = rng.random((n, c))
        u_cat_shift = rng.random((n, c))
        latency = rng.lognormal(math.log(s.base_latency_ms), _LATENCY_SIGMA, n)
        u_error = rng.random(n)
        u_code = rng.random(n)
        u_labelled = rng.random(n)
        delay = rng.uniform(s.label_delay[0], s.label_delay[1], n)
        u_label = rng.random(n)
        u_flip = rng.random(n)

        variant = np.searchsorted(self.share_cum, u_variant, side="right")
        np.minimum(variant, len(self.variant_names) - 1, out=variant)
        version = np.full(n, -1, dtype=np.int64)
        for vi, (offs, vers) in enumerate(self.schedule):
            sel = variant == vi
            if not sel.any():
                continue
            pos = np.searchsorted(offs, off[sel], side="right") - 1
            version[sel] = np.where(pos >= 0, vers[np.maximum(pos, 0)], -1)
        ts = np.round(s.start + off, 3)
        keep = (version >= 0) & (ts < s.end)
        if not keep.all():
            off, variant, version, ts = off[keep], variant[keep], version[keep], ts[keep]
            z, u_cat, u_cat_shift = z[keep], u_cat[keep], u_cat_shift[keep]
            latency, u_error, u_code = latency[keep], u_error[keep], u_code[keep]
            u_labelled, delay = u_labelled[keep], delay[keep]
            u_label, u_flip = u_label[keep], u_flip[keep]
            n = int(keep.sum())

        x = m.mean + m.sd * z
        cat = np.empty((n, c), dtype=np.int64)
        for j in range(c):
            cat[:, j] = np.searchsorted(m.cat_cum[j], u_cat[:, j], side="right")
        p_error = np.full(n, s.base_error_rate)
        fault_error = np.full(n, -1.0)
        lat_mult = np.ones(n)
        logit_shift = np.zeros(n)
        p_flip = np.zeros(n)
        drop = np.zeros(n, dtype=bool)
        dropped_share = np.zeros(n)
        dn = s.deployments[d]
        for f in s.faults:
            if f.deployment is not None and f.deployment != dn:
                continue
            mask = off >= f.start
            if f.end is not None:
                mask &= off < f.end
            if f.version is not None:
                mask &= version == self.version_names.index(f.version)
            if f.variant is not None:
                mask &= variant == self.variant_names.index(f.variant)
            if not mask.any():
                continue
            mag = f.magnitude
            if f.kind == "error_rate":
                fault_error[mask] = np.maximum(fault_error[mask], mag)
            elif f.kind == "latency":
                lat_mult[mask] *= mag
            elif f.kind == "score_shift":
                logit_shift[mask] += mag
            elif f.kind == "model_error":
                p_flip[mask] = np.maximum(p_flip[mask], mag)
            elif f.kind == "traffic_stop":
                drop |= mask
                dropped_share[mask] = np.maximum(dropped_share[mask], mag)
            else:  # feature_shift
                targets = [f.feature] if f.feature is not None else self.fnames[:k]
                for name in targets:
                    if name.startswith("num_"):
                        i = int(name[4:])
                        x[mask, i] += mag * m.sd[i]
                    else:
                        j = int(name[4:])
                        redraw = mask & (u_cat_shift[:, j] < mag)
                        cat[redraw, j] = np.searchsorted(
                            m.cat_rev_cum[j], u_cat[redraw, j], side="right"
                        )
        np.copyto(p_error, fault_error, where=fault_error >= 0.0)
        for j in range(c):
            np.minimum(cat[:, j], len(m.cat_values[j]) - 1, out=cat[:, j])

        logit = _INTERCEPT + ((x - m.mean) / m.sd) @ m.w if k else np.full(n, _INTERCEPT)
        for j in range(c):
            logit = logit + m.cat_effect[j][cat[:, j]]
        true_score = _sigmoid(logit)
        score = np.round(_sigmoid(logit + logit_shift), 4)
        error = u_error < p_error
        code = np.where(error, np.searchsorted(_ERROR_CODE_CUM, u_code, side="right"), -1)
        np.minimum(code, len(ERROR_CODES) - 1, out=code)
        latency = np.round(latency * lat_mult, 2)

        serial0 = self.serial[d]
        self.serial[d] = serial0 + n
        serial = np.arange(serial0, serial0 + n, dtype=np.int64)
        key = ts + self.jitter_draw(n) if self.jitter > 0 else ts
        if drop.any():
            # A traffic stop removes requests after every draw was made and every id handed
            # out, so the traffic outside the stop is identical to the scenario without it.
            # Which requests of a partial stop vanish is a fixed hash of the id, not a draw.
            frac = ((serial * 2654435761) % 4294967296) / 4294967296.0
            keep = ~(drop & (frac < dropped_share))
            key, ts, variant, version, x, cat = key[keep], ts[keep], variant[keep], version[keep], x[keep], cat[keep]
            score, latency, code, serial = score[keep], latency[keep], code[keep], serial[keep]
            error, delay, u_labelled = error[keep], delay[keep], u_labelled[keep]
            true_score, u_label, u_flip, p_flip = true_score[keep], u_label[keep], u_flip[keep], p_flip[keep]
            n = int(keep.sum())
        self.preds.add(
            {
                "key": key,
                "dep": np.full(n, d, dtype=np.int64),
                "serial": serial,
                "ts": ts,
                "variant": variant,
                "version": version,
                "x": np.round(x, 4),
                "cat": cat,
                "score": score,
                "latency": latency,
                "code": code,
            }
        )

        labelled = (u_labelled < s.label_fraction) & ~error
        label = (u_label < true_score) ^ (u_flip < p_flip)
        o_ts = np.round(ts + delay, 3)
        o_keep = labelled & (o_ts < s.end)
        o_ts = o_ts[o_keep]
        if self.jitter > 0:
            o_key = np.maximum(o_ts + self.jrng.random(len(o_ts)) * self.jitter, key[o_keep])
        else:
            o_key = o_ts
        self.outs.add(
            {
                "key": o_key,
                "dep": np.full(len(o_ts), d, dtype=np.int64),
                "serial": serial[o_keep],
                "ts": o_ts,
                "label": label[o_keep].astype(np.int64),
            }
        )

    # -- emission ------------------------------------------------------------------------------

    def _prediction_dicts(self, p: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        s = self.s
        deps = s.deployments
        vnames = self.variant_names
        versions = self.version_names
        fnames = self.fnames
        k = s.n_numeric
        catvals = [self.models[d].cat_values for d in range(len(deps))]
        out = []
        append = out.append
        rows_x = p["x"].tolist()
        rows_c = p["cat"].tolist()
        for dep, serial, ts, var, ver, xr, cr, score, lat, code in zip(
            p["dep"].tolist(),
            p["serial"].tolist(),
            p["ts"].tolist(),
            p["variant"].tolist(),
            p["version"].tolist(),
            rows_x,
            rows_c,
            p["score"].tolist(),
            p["latency"].tolist(),
            p["code"].tolist(),
        ):
            dn = deps[dep]
            cv = catvals[dep]
            feats = dict(zip(fnames, xr))
            for j, ci in enumerate(cr):
                feats[fnames[k + j]] = cv[j][ci]
            if code < 0:
                pred, sc, err = int(score >= 0.5), score, None
            else:
                pred, sc, err = None, None, ERROR_CODES[code]
            append(
                {
                    "type": "prediction",
                    "id": f"{dn}-{serial}",
                    "ts": ts,
                    "deployment": dn,
                    "model_version": versions[ver],
                    "variant": vnames[var],
                    "features": feats,
                    "prediction": pred,
                    "score": sc,
                    "latency_ms": lat,
                    "error": err,
                }
            )
        return out

    def _outcome_dicts(self, o: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        deps = self.s.deployments
        return [
            {"type": "outcome", "id": f"{deps[d]}-{n}", "ts": ts, "deployment": deps[d], "label": y}
            for d, n, ts, y in zip(
                o["dep"].tolist(), o["serial"].tolist(), o["ts"].tolist(), o["label"].tolist()
            )
        ]

    def _emit(self, threshold: float | None) -> tuple[list[bytes], tuple[int, int, int, int]]:
        p = self.preds.take(threshold)
        o = self.outs.take(threshold)
        dp = self.deploys.take(threshold)
        dicts: list[dict[str, Any]] = []
        keys, ranks, deps, serials = [], [], [], []
        counts = [0, 0, 0]
        for rank, cols in ((0, dp), (1, p), (2, o)):
            if cols is None:
                continue
            if rank == 0:
                dicts.extend(self._deploy_dicts[i] for i in cols["serial"].tolist())
            elif rank == 1:
                dicts.extend(self._prediction_dicts(cols))
            else:
                dicts.extend(self._outcome_dicts(cols))
            nk = len(cols["key"])
            counts[rank] = nk
            keys.append(cols["key"])
            ranks.append(np.full(nk, rank, dtype=np.int64))
            deps.append(cols["dep"])
            serials.append(cols["serial"])
        if not dicts:
            return [], (0, 0, 0, 0)
        key = np.concatenate(keys)
        rank_a = np.concatenate(ranks)
        order = np.lexsort((np.concatenate(serials), np.concatenate(deps), rank_a, key))
        enc = self.encode
        ordered = [dicts[i] for i in order.tolist()]
        lines = [enc(dd) for dd in ordered]
        n_bad = 0
        if self.p_insert > 0:
            lines, n_bad = self._add_malformed(ordered, lines, rank_a[order] == 1)
        elif counts[1]:
            self.last_prediction = ordered[int(np.nonzero(rank_a[order] == 1)[0][-1])]
        return lines, (counts[1], counts[2], counts[0], n_bad)

    def _add_malformed(
        self, ordered: list[dict[str, Any]], lines: list[bytes], is_pred: np.ndarray
    ) -> tuple[list[bytes], int]:
        n = len(lines)
        after = np.nonzero(self.mrng.random(n) < self.p_insert)[0]
        kinds = self.mrng.integers(0, len(MALFORMED_KINDS), len(after))
        last_pred = np.maximum.accumulate(np.where(is_pred, np.arange(n), -1))
        if len(after) == 0:
            if is_pred.any():
                self.last_prediction = ordered[int(last_pred[-1])]
            return lines, 0
        out: list[bytes] = []
        prev = 0
        for i, kind in zip(after.tolist(), kinds.tolist()):
            lp = int(last_pred[i])
            if lp >= 0:
                self.last_prediction = ordered[lp]
            out.extend(lines[prev : i + 1])
            out.append(self._malformed(ordered[i], kind))
            prev = i + 1
        out.extend(lines[prev:])
        if is_pred.any():
            self.last_prediction = ordered[int(last_pred[-1])]
        return out, len(after)

    def _malformed(self, base: dict[str, Any], kind: int) -> bytes:
        """A line next to ``base`` that breaks the contract in way ``MALFORMED_KINDS[kind]``."""
        ts = base["ts"]
        if MALFORMED_KINDS[kind] == "out_of_range" and base["type"] != "prediction":
            if self.last_prediction is not None:
                base = self.last_prediction
        d = dict(base)
        d["ts"] = ts
        self.bad_serial += 1
        if "id" in d:
            d["id"] = f"{d['deployment']}-bad-{self.bad_serial}"
        name = MALFORMED_KINDS[kind]
        if name == "invalid_json":
            raw = self.encode(d)
            return raw[: max(1, len(raw) // 2)]
        if name == "missing_field":
            del d["deployment"]
        elif name == "wrong_type":
            if "model_version" in d:
                d["model_version"] = int(self.bad_serial)
            else:
                d["deployment"] = int(self.bad_serial)
        elif name == "unknown_type":
            d["type"] = "click"
        elif name == "out_of_range":
            if d["type"] == "prediction":
                d["score"] = 1.5
            else:  # a deploy before any prediction was generated
                d["traffic"] = 1.5
        else:  # naive_timestamp
            dt = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).replace(tzinfo=None)
            d["ts"] = dt.isoformat(timespec="milliseconds")
        return self.encode(d)

    def run(self) -> Iterator[tuple[list[bytes], tuple[int, int, int, int]]]:
        s = self.s
        step = _chunk_seconds(s)
        n_chunks = max(1, math.ceil(s.duration / step - 1e-9))
        for c in range(n_chunks):
            t0 = c * step
            t1 = min(s.duration, t0 + step)
            for d in range(len(s.deployments)):
                self._traffic(d, t0, t1 - t0)
            if c == n_chunks - 1:
                break
            # Everything still to be generated has ts >= start + t1 - 0.0005 (ms rounding).
            out = self._emit(s.start + t1 - 0.001)
            if out[0]:
                yield out
        out = self._emit(None)
        if out[0]:
            yield out


# --------------------------------------------------------------------------------------------
# Public API


def generate(s: Scenario, jitter: float = 0.0) -> Iterator[bytes]:
    """JSON lines (no trailing newline) of the scenario, in event-time order.

    With ``jitter`` > 0 (at most 2 s), each line is emitted at its event time plus a uniform
    delay in ``[0, jitter)``: lines may be out of order by less than ``jitter`` seconds, an
    outcome still comes after its prediction, and a deploy event before the traffic of its
    version.
    """
    for lines, _ in _Generator(s, jitter).run():
        yield from lines


def iter_chunks(s: Scenario, jitter: float = 0.0) -> Iterator[tuple[list[bytes], RecordingStats]]:
    """Like :func:`generate` in lists of lines, each with its counts (faster for bulk use)."""
    for lines, (p, o, d, b) in _Generator(s, jitter).run():
        yield lines, RecordingStats(p, o, d, b, len(lines))


def write_recording(
    s: Scenario, path: str | os.PathLike[str], jitter: float = 0.0
) -> RecordingStats:
    """Writes the scenario as JSON Lines to ``path`` (gzip if it ends in ``.gz``).

    The gzip header carries no name or time, so the file is byte-identical across runs.
    """
    path = os.fspath(path)
    counts = [0, 0, 0, 0, 0]
    if path.endswith(".gz"):
        raw = open(path, "wb")
        fh: Any = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=3, mtime=0)
    else:
        raw = None
        fh = open(path, "wb")
    try:
        for lines, (p, o, d, b) in _Generator(s, jitter).run():
            fh.write(b"\n".join(lines))
            fh.write(b"\n")
            counts[0] += p
            counts[1] += o
            counts[2] += d
            counts[3] += b
            counts[4] += len(lines)
    finally:
        fh.close()
        if raw is not None:
            raw.close()
    return RecordingStats(*counts)


def _serving_intervals(
    s: Scenario, version: str | None, variant: str | None
) -> list[tuple[float, float]]:
    """Relative intervals during which ``version`` serves on ``variant`` (None: any)."""
    out: list[tuple[float, float]] = []
    for v, _ in s.variants:
        if variant is not None and v != variant:
            continue
        entries = [e for e in s.versions if len(e) == 2 or e[2] == v]
        for i, e in enumerate(entries):
            if version is not None and e[1] != version:
                continue
            end = entries[i + 1][0] if i + 1 < len(entries) else s.duration
            if end > e[0]:
                out.append((e[0], end))
    return out


def scenario_truth(s: Scenario) -> list[dict[str, Any]]:
    """The fault intervals of ``s`` in absolute event time, for backtests.

    One dict per fault, in declaration order: ``kind``, ``magnitude``, ``feature``,
    ``version``, ``variant``, ``deployment`` (filters, ``None``: all), ``declared_start`` /
    ``declared_end`` (the fault's interval clipped to the window) and ``start`` / ``end``: the
    envelope of the time when it actually affects traffic (the declared interval intersected
    with the time its version serves on its variant); ``active`` is False (and ``start`` /
    ``end`` None) when it never does.
    """
    out = []
    for f in s.faults:
        f_end = s.duration if f.end is None else min(f.end, s.duration)
        pieces = [
            (max(a, f.start), min(b, f_end))
            for a, b in _serving_intervals(s, f.version, f.variant)
            if min(b, f_end) > max(a, f.start)
        ]
        active = bool(pieces)
        out.append(
            {
                "kind": f.kind,
                "magnitude": f.magnitude,
                "feature": f.feature,
                "version": f.version,
                "variant": f.variant,
                "deployment": f.deployment,
                "declared_start": s.start + f.start,
                "declared_end": s.start + f_end,
                "start": s.start + min(a for a, _ in pieces) if active else None,
                "end": s.start + max(b for _, b in pieces) if active else None,
                "active": active,
            }
        )
    return out


def expected_events(s: Scenario) -> float:
    """Expected number of predictions + outcomes (no faults, single-version traffic)."""
    n_pred = s.rate * s.duration * len(s.deployments)
    lo, hi = s.label_delay
    in_window = max(0.0, 1.0 - (lo + hi) / (2.0 * s.duration)) if hi <= s.duration else None
    if in_window is None:  # delays longer than the window: integrate numerically
        d = np.linspace(lo, hi, 1001)
        in_window = float(np.mean(np.clip(1.0 - d / s.duration, 0.0, None)))
    return n_pred * (1.0 + s.label_fraction * (1.0 - s.base_error_rate) * in_window)


def benchmark_scenario(n_events: int = 1_000_000) -> Scenario:
    """2 deployments, 8 numeric + 2 categorical features, label_fraction 0.6, no faults.

    The rate is chosen so that predictions + outcomes ≈ ``n_events`` (one hour of traffic).
    """
    if n_events <= 0:
        raise ValueError(f"n_events must be > 0, got {n_events}")
    base = Scenario(
        name="benchmark",
        duration=3600.0,
        rate=1.0,
        deployments=("bench-a", "bench-b"),
        n_numeric=8,
        n_categorical=2,
        label_fraction=0.6,
        seed=20_240_601,
    )
    rate = n_events / expected_events(base)
    return Scenario(
        name="benchmark",
        duration=base.duration,
        rate=rate,
        deployments=base.deployments,
        n_numeric=8,
        n_categorical=2,
        label_fraction=0.6,
        seed=base.seed,
    )


BUILTIN: dict[str, Scenario] = {
    "stationary": Scenario(name="stationary", seed=1),
    "error_blip": Scenario(
        name="error_blip",
        seed=2,
        faults=(Fault("error_rate", start=900.0, end=960.0, magnitude=0.3),),
    ),
    "sustained_errors": Scenario(
        name="sustained_errors",
        seed=3,
        versions=((0.0, "1"), (900.0, "2")),
        faults=(Fault("error_rate", start=900.0, magnitude=0.2, version="2"),),
    ),
    "feature_shift": Scenario(
        name="feature_shift",
        seed=4,
        faults=(Fault("feature_shift", start=900.0, magnitude=1.5, feature="num_0"),),
    ),
    "malformed": Scenario(name="malformed", seed=1, malformed_fraction=0.02),
    "calibration_decay": Scenario(
        name="calibration_decay",
        seed=6,
        label_fraction=0.8,
        faults=(Fault("score_shift", start=900.0, magnitude=1.5),),
    ),
    "bad_canary": Scenario(
        name="bad_canary",
        seed=7,
        variants=(("stable", 0.8), ("canary", 0.2)),
        versions=((0.0, "1", "stable"), (600.0, "2", "canary")),
        faults=(Fault("error_rate", start=600.0, magnitude=0.15, version="2", variant="canary"),),
    ),
    "label_delay": Scenario(
        name="label_delay",
        seed=8,
        duration=3600.0,
        label_delay=(600.0, 1800.0),
        faults=(Fault("model_error", start=900.0, magnitude=0.3),),
    ),
    "traffic_stop": Scenario(
        name="traffic_stop",
        seed=9,
        faults=(Fault("traffic_stop", start=900.0, end=1320.0),),
    ),
    "demo": Scenario(
        name="demo",
        duration=35 * 60.0,
        rate=10.0,
        seed=5,
        versions=((0.0, "1"), (1200.0, "2")),
        faults=(
            Fault("error_rate", start=1200.0, magnitude=0.15, version="2"),
            Fault("latency", start=1200.0, magnitude=2.5, version="2"),
        ),
    ),
}
