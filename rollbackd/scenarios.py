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
* Arrivals: Poisson process with ``rate`` predictions per second per deployment (with a
  ``cycle``, a rate that follows a daily cycle around ``rate``). Each request is assigned a
  variant by the traffic shares; a variant serves no traffic before its first version is
  deployed; during a ``ramp`` the new version's share of its variant rises from 0 to 1.
  With ``regions``, each request comes from a region drawn by its share (``attrs.region``).
* Features: ``num_i`` ~ Normal(mean_i, sd_i) with per-feature parameters derived from the seed
  (and the deployment); ``cat_j`` drawn from fixed categorical distributions (country codes,
  device, channel).
* ``score`` = sigmoid(intercept + w . standardised numeric features + category effects),
  ``prediction`` = int(score >= 0.5). The label is Bernoulli(true score): the model is
  calibrated unless a ``score_shift`` fault moves the served score (the label keeps following
  the unshifted one) or a ``model_error`` fault flips labels (a ``signal_loss`` fault keeps
  it calibrated but less discriminating).
* ``error``: null, or one of :data:`ERROR_CODES` with probability ``base_error_rate`` (or an
  ``error_rate`` fault's magnitude); errored predictions have null ``prediction``/``score`` and
  never get an outcome.
* Outcomes: a ``label_fraction`` share of the successful predictions gets an outcome after a
  uniform ``label_delay``. The recording is the window ``[start, start + duration)``: outcomes
  that would arrive after its end are not emitted.
* Deploy events at each ``versions`` offset, one per variant the entry applies to, with the
  variant's traffic share and a deterministic ``git_sha`` in ``attrs``.

The machinery lives in :mod:`rollbackd.synthetic` (model, traffic shaping, fault effects,
event encoding, the chunked generator); this module is the public face.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np

from rollbackd.synthetic.encoding import ERROR_CODES, MALFORMED_KINDS
from rollbackd.synthetic.generator import Generator

__all__ = [
    "Fault",
    "Ramp",
    "Cycle",
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

FaultKind = Literal[
    "error_rate", "latency", "feature_shift", "score_shift", "model_error", "traffic_stop", "signal_loss"
]
FAULT_KINDS: tuple[str, ...] = (
    "error_rate",
    "latency",
    "feature_shift",
    "score_shift",
    "model_error",
    "traffic_stop",
    "signal_loss",
)

#: Magnitude used when a Fault is created without one.
DEFAULT_MAGNITUDE: dict[str, float] = {
    "error_rate": 0.3,  # error probability during the fault
    "latency": 3.0,  # latency multiplier
    "feature_shift": 1.5,  # shift in reference SDs (numeric) / resampled share (categorical)
    "score_shift": 1.0,  # added to the logit of the served score
    "model_error": 0.2,  # probability that a label is flipped
    "traffic_stop": 1.0,  # share of requests that never arrive
    "signal_loss": 0.3,  # share of the numeric logit's variance the version no longer sees
}

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
    * ``model_error``: probability that a label is flipped;
    * ``signal_loss``: the share ρ of the numeric signal (of the logit's variance) the serving
      version no longer sees. Its scores stay calibrated to what it does see (labels keep the
      true score), so calibration holds while discrimination falls: fewer positives score
      above 0.5 (recall and AUC drop) and the misclassification rate moves little when
      positives are rare. See ``FaultEffects.served_logit``.

    ``version``/``variant``/``deployment``/``region`` restrict the fault to traffic served by
    that version / on that variant / of that deployment / from that region (``None``: all).
    """

    kind: FaultKind
    start: float
    end: float | None = None
    magnitude: float = None  # type: ignore[assignment]  # None -> DEFAULT_MAGNITUDE[kind]
    feature: str | None = None
    version: str | None = None
    variant: str | None = None
    deployment: str | None = None
    region: str | None = None

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
        if self.kind in ("error_rate", "model_error", "traffic_stop", "signal_loss") and not 0.0 <= m <= 1.0:
            raise ValueError(f"{self.kind} magnitude must be in [0, 1], got {m}")
        if self.kind == "latency" and not m > 0.0:
            raise ValueError(f"latency magnitude must be > 0, got {m}")
        if self.feature is not None and self.kind != "feature_shift":
            raise ValueError(f"Fault.feature only applies to feature_shift, not {self.kind}")


@dataclass(frozen=True, slots=True)
class Ramp:
    """A rolling update: from ``start`` to ``end`` (seconds after the scenario start), the share
    of ``version`` among the requests on ``variant`` (``None``: every variant) rises linearly
    from 0 to 1; the other requests are still served by the version deployed before it (none:
    they are not served). ``version`` must be deployed at ``start`` on those variants (a
    ``versions`` entry), whose deploy event marks the start of the rollout."""

    version: str
    start: float
    end: float
    variant: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", float(self.start))
        object.__setattr__(self, "end", float(self.end))
        if not (math.isfinite(self.start) and self.start >= 0.0):
            raise ValueError(f"Ramp.start must be >= 0, got {self.start}")
        if not (math.isfinite(self.end) and self.end > self.start):
            raise ValueError(f"Ramp.end must be > start ({self.start}), got {self.end}")


@dataclass(frozen=True, slots=True)
class Cycle:
    """A periodic (daily, by default) cycle of the traffic and, optionally, of one numeric
    feature: healthy seasonality, not a fault.

    The arrival rate is ``rate · (1 + a·cos φ)`` with ``a = (traffic_ratio − 1) /
    (traffic_ratio + 1)``, so the peak carries ``traffic_ratio`` times the trough's traffic and
    ``rate`` stays the average; ``φ = 2π · ((t − peak) mod period) / period`` for the absolute
    time ``t`` (the phase is anchored at the Unix epoch: with a 1-day period the peak is at
    ``peak`` seconds after midnight UTC every day). ``feature`` (a numeric feature) has its
    mean moved by ``amplitude · sd · cos φ``: ``amplitude`` sd above its average at the peak,
    as far below at the trough."""

    period: float = 86_400.0
    peak: float = 14 * 3600.0
    traffic_ratio: float = 8.0
    feature: str | None = None
    amplitude: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.period) and self.period > 0):
            raise ValueError(f"Cycle.period must be > 0, got {self.period}")
        if not math.isfinite(self.peak):
            raise ValueError(f"Cycle.peak must be finite, got {self.peak}")
        if not (math.isfinite(self.traffic_ratio) and self.traffic_ratio >= 1.0):
            raise ValueError(f"Cycle.traffic_ratio must be >= 1, got {self.traffic_ratio}")
        if not math.isfinite(self.amplitude):
            raise ValueError(f"Cycle.amplitude must be finite, got {self.amplitude}")
        if self.feature is not None and not self.feature.startswith("num_"):
            raise ValueError(f"Cycle.feature must be a numeric feature (num_i), got {self.feature!r}")


VersionEntry = tuple[float, str] | tuple[float, str, str]


@dataclass(frozen=True, slots=True)
class Scenario:
    """Synthetic traffic of ``deployments`` during ``[start, start + duration)``.

    ``versions``: ``(offset, version)`` deploys ``version`` on every variant at ``offset``
    seconds; ``(offset, version, variant)`` only on that variant (e.g. a canary). Every
    variant serves the latest version deployed on it; it serves no traffic before its first.
    ``ramps`` turn deploys into rolling updates (:class:`Ramp`). ``malformed_fraction``
    (< 0.5) is the expected share of output lines that are malformed; they are *added* next
    to valid lines, never replace one.

    ``regions``: ``(name, share)`` pairs; each prediction then carries ``attrs: {region:
    name}``, drawn by the shares (none: no ``attrs``). ``cycle``: a daily traffic and feature
    cycle (:class:`Cycle`). ``intercept``: the logit of a request whose numeric features are
    at their means, before category effects: it sets the share of positive labels (-1.5:
    about 35 %; -9.5: about 4 %, a fraud model's).
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
    ramps: tuple[Ramp, ...] = ()
    regions: tuple[tuple[str, float], ...] = ()
    cycle: Cycle | None = None
    intercept: float = -1.5

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
            if f.region is not None and f.region not in {r for r, _ in self.regions}:
                bad(f"fault region {f.region!r} is not one of the regions")
        for r in self.ramps:
            if not isinstance(r, Ramp):
                bad(f"ramps must be Ramp instances, got {r!r}")
            if r.variant is not None and r.variant not in names:
                bad(f"ramp variant {r.variant!r} is not a variant")
            deployed = any(
                e[0] == r.start and e[1] == r.version and (len(e) == 2 or r.variant in (None, e[2]))
                for e in self.versions
            )
            if not deployed:
                bad(f"ramp of version {r.version!r} at {r.start}: no versions entry deploys it then")
        region_names = [r for r, _ in self.regions]
        if len(set(region_names)) != len(region_names):
            bad(f"regions must be unique, got {self.regions}")
        if any(not (math.isfinite(w) and w > 0) for _, w in self.regions):
            bad(f"region shares must be > 0, got {self.regions}")
        if self.cycle is not None:
            if not isinstance(self.cycle, Cycle):
                bad(f"cycle must be a Cycle, got {self.cycle!r}")
            if self.cycle.feature is not None and self.cycle.feature not in feats:
                bad(f"cycle feature {self.cycle.feature!r} is not one of {sorted(feats)}")
        if not math.isfinite(self.intercept):
            bad(f"intercept must be finite, got {self.intercept}")

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
# Public API


def generate(s: Scenario, jitter: float = 0.0) -> Iterator[bytes]:
    """JSON lines (no trailing newline) of the scenario, in event-time order.

    With ``jitter`` > 0 (at most 2 s), each line is emitted at its event time plus a uniform
    delay in ``[0, jitter)``: lines may be out of order by less than ``jitter`` seconds, an
    outcome still comes after its prediction, and a deploy event before the traffic of its
    version.
    """
    for lines, _ in Generator(s, jitter).run():
        yield from lines


def iter_chunks(s: Scenario, jitter: float = 0.0) -> Iterator[tuple[list[bytes], RecordingStats]]:
    """Like :func:`generate` in lists of lines, each with its counts (faster for bulk use)."""
    for lines, (p, o, d, b) in Generator(s, jitter).run():
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
        for lines, (p, o, d, b) in Generator(s, jitter).run():
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
    ``end`` None) when it never does; ``slice``: ``{"attrs.region": name}`` for a fault of one
    region (the slice an incident should name), else None.
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
                "slice": {"attrs.region": f.region} if f.region is not None else None,
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


_DAY = 86_400.0


def _rolling_update(name: str, faults: tuple[Fault, ...]) -> Scenario:
    """Version 7, then a ten-minute rolling update to 8 from 20 min (8's share 0 -> 100 %),
    then 8 alone for the last 30 minutes."""
    return Scenario(
        name=name,
        duration=3600.0,
        versions=((0.0, "7"), (1200.0, "8")),
        ramps=(Ramp("8", start=1200.0, end=1800.0),),
        faults=faults,
        seed=15,
    )


def _daily_cycle(name: str, faults: tuple[Fault, ...]) -> Scenario:
    """Three days from midnight UTC at 1 prediction/s on average, 8x more at 14:00 UTC than at
    02:00, num_0's mean 0.3 sd above its average at the peak and 0.3 sd below at the trough."""
    return Scenario(
        name=name,
        start=1_789_948_800.0,  # 2026-09-21T00:00:00Z
        duration=3 * _DAY,
        rate=1.0,
        label_fraction=0.2,
        cycle=Cycle(period=_DAY, peak=14 * 3600.0, traffic_ratio=8.0, feature="num_0", amplitude=0.3),
        faults=faults,
        seed=16,
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
    # issue 14: model quality per version, per segment, against the right baseline
    "recall_collapse": Scenario(
        name="recall_collapse",
        deployments=("fraud-scorer",),
        duration=3600.0,
        intercept=-9.5,  # about 4 % fraud
        versions=((0.0, "3"), (1200.0, "4")),
        faults=(Fault("signal_loss", start=1200.0, magnitude=0.3, version="4"),),
        seed=14,
    ),
    "bad_rolling_update": _rolling_update(
        "bad_rolling_update", (Fault("error_rate", start=1200.0, magnitude=0.08, version="8"),)
    ),
    "healthy_rolling_update": _rolling_update("healthy_rolling_update", ()),
    "daily_cycle": _daily_cycle("daily_cycle", ()),
    "daily_cycle_shift": _daily_cycle(
        "daily_cycle_shift",
        (
            Fault("feature_shift", start=2 * _DAY + 6 * 3600.0, magnitude=0.6, feature="num_0"),
            Fault("error_rate", start=2 * _DAY + 12 * 3600.0, magnitude=0.05),
        ),
    ),
    "one_region_fault": Scenario(
        name="one_region_fault",
        base_error_rate=0.004,
        regions=(("us-east", 0.45), ("eu-west", 0.25), ("ap-south", 0.2), ("sa-east", 0.1)),
        faults=(Fault("error_rate", start=900.0, magnitude=0.09, region="eu-west"),),
        seed=17,
    ),
}
