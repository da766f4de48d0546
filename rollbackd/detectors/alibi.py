"""alibi-detect's drift detectors behind rollbackd's detector interface (optional extra).

alibi-detect (Seldon) is under the **Business Source License 1.1**: free for non-production
use only; production use needs a commercial licence from Seldon. It is therefore never part
of the default install: ``pip install 'rollbackd[alibi]'`` brings it in (with TensorFlow and
``numpy<2``, about 3 GB installed). Without it these detectors raise ``ValueError`` with that
hint (:class:`~rollbackd.detectors.base.MissingExtra`), so a rules file naming them is rejected
at load time, at the rule's ``detector``.

Three detectors are registered:

- ``alibi_mmd``: ``alibi_detect.cd.MMDDrift``, maximum mean discrepancy between the window's
  rows of numeric features and the reference's, with a permutation p-value;
- ``alibi_lsdd``: ``alibi_detect.cd.LSDDDrift``, least-squares density difference, likewise;
- ``alibi_cvm_online``: ``alibi_detect.cd.CVMDriftOnline``, fed one event at a time like
  ``sequential``; its thresholds are set from an expected run time (``ert``) between false
  alarms.

The reference comes from the same :class:`~rollbackd.detectors.drift.Baseline` as ``drift``'s.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from operator import attrgetter
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from rollbackd.detectors.base import Measurement, MissingExtra, Reference, Window, check_feature_names, register
from rollbackd.detectors.drift import BASELINES, SCORE_COLUMN, Baseline, wants_score

__all__ = ["AlibiMMD", "AlibiLSDD", "AlibiCVMOnline", "INSTALL_HINT", "LICENSE_NOTE"]

INSTALL_HINT = "pip install 'rollbackd[alibi]'"
LICENSE_NOTE = "Business Source License 1.1: non-production use only"

_ONLINE_BASELINES = ("file", "first_n")
_by_ts = attrgetter("ts")


def _alibi_cd(detector: str) -> Any:
    try:
        from alibi_detect import cd
    except ImportError as exc:
        raise MissingExtra(
            f"{detector} needs the optional alibi-detect package ({LICENSE_NOTE}): "
            f"{INSTALL_HINT} (import failed: {exc})"
        ) from None
    return cd


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Fix the generators alibi draws from (numpy's global one, TensorFlow's and PyTorch's
    global seeds) around one call, so a replay gets the same permutations and bootstraps;
    numpy's global state is put back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        tf.random.set_seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _floats(col: Sequence[Any] | np.ndarray) -> np.ndarray:
    """A column as float64; anything but an int or float (bools, strings, None) is NaN."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
        return col.astype(float)
    return np.array(
        [v if (type(v) is float or type(v) is int) else math.nan for v in col], dtype=float
    )


def _rows(columns: Mapping[str, Sequence[Any]], names: Sequence[str], n: int) -> np.ndarray:
    """``(n, len(names))`` matrix of the columns (NaN where a value is missing or not a number)."""
    out = np.full((n, len(names)), math.nan)
    for j, name in enumerate(names):
        col = columns.get(name)
        if col is not None:
            out[:, j] = _floats(col)[:n]
    return out


def _complete(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.isfinite(matrix).all(axis=1)]


def _window_columns(window: Window, names: Sequence[str]) -> dict[str, Sequence[Any]]:
    cols: dict[str, Sequence[Any]] = {n: window.feature(n) for n in names if n != SCORE_COLUMN}
    if SCORE_COLUMN in names:
        cols[SCORE_COLUMN] = [p.score for p in window.predictions]
    return cols


def _names_of(
    columns: Mapping[str, Sequence[Any]], features: Sequence[str] | None, include_score: bool
) -> list[str]:
    if features is not None:
        names = list(dict.fromkeys(features))
    else:
        # The reference's numeric features: those with at least one finite number.
        names = sorted(
            n for n, col in columns.items()
            if n != SCORE_COLUMN and np.isfinite(_floats(col)).any()
        )
    if include_score and SCORE_COLUMN not in names:
        names.append(SCORE_COLUMN)
    return names


def _subsample(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if rows.shape[0] <= limit:
        return rows
    pick = np.sort(np.random.default_rng(seed).choice(rows.shape[0], limit, replace=False))
    return rows[pick]


def _check_common(
    threshold: float,
    min_samples: int,
    features: Sequence[str] | None,
    baseline: str | None,
    baselines: Sequence[str],
    reference_size: int,
    max_reference: int,
    seed: int,
) -> None:
    if not (math.isfinite(threshold) and threshold >= 0.0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    check_feature_names(features)
    if baseline is not None and baseline not in baselines:
        raise ValueError(f"baseline must be one of {', '.join(baselines)}; got {baseline!r}")
    if reference_size < 1:
        raise ValueError(f"reference_size must be >= 1, got {reference_size}")
    if not isinstance(max_reference, int) or max_reference < 2:
        raise ValueError(f"max_reference must be an integer >= 2, got {max_reference!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


# -- windowed two-sample tests: MMD and LSDD --------------------------------------------------


class _Fitted(NamedTuple):
    names: list[str]
    center: np.ndarray
    scale: np.ndarray
    n: int  # reference rows used
    detector: Any  # the alibi detector, or None without complete reference rows


class _WindowedAlibi:
    """One alibi two-sample detector per reference; each window is one test against it.

    ``value`` is alibi's distance (MMD² or LSDD) between the window's complete rows of the
    chosen numeric features and the reference's (both standardised by the reference's mean
    and standard deviation when ``standardize``), ``effect_size`` the same, ``p_value`` the
    permutation p-value ``(1 + #{permuted >= observed}) / (n_permutations + 1)`` (alibi's own
    share, which can be 0, is in ``evidence.alibi_p_value``). Permutations are seeded with
    ``seed`` at each evaluation, so a replay gets the same answer. At most ``max_reference``
    reference rows and ``max_window`` window rows are used (a seeded subsample beyond that):
    the cost grows with the square of their sum.
    """

    needs_reference = True
    _name = ""
    _class = ""
    _backends: tuple[str, ...] = ("tensorflow", "pytorch")

    def __init__(
        self,
        threshold: float = 0.0,
        min_samples: int = 1,
        features: Sequence[str] | None = None,
        include_score: bool = False,
        standardize: bool = True,
        n_permutations: int = 100,
        backend: str = "tensorflow",
        max_reference: int = 2000,
        max_window: int = 2000,
        seed: int = 0,
        baseline: str | None = None,
        reference_size: int = 5000,
        rolling_windows: int = 10,
        reference: Reference | None = None,
    ) -> None:
        _check_common(
            threshold, min_samples, features, baseline, BASELINES, reference_size,
            max_reference, seed,
        )
        if not isinstance(n_permutations, int) or not 10 <= n_permutations <= 100_000:
            raise ValueError(
                f"n_permutations must be an integer in [10, 100000], got {n_permutations!r}"
            )
        if backend not in self._backends:
            raise ValueError(f"backend must be one of {', '.join(self._backends)}; got {backend!r}")
        if not isinstance(max_window, int) or max_window < 2:
            raise ValueError(f"max_window must be an integer >= 2, got {max_window!r}")
        if rolling_windows < 1:
            raise ValueError(f"rolling_windows must be >= 1, got {rolling_windows}")
        _alibi_cd(self._name)  # fail now, with the hint, rather than at the first window
        self.threshold = threshold
        self.min_samples = min_samples
        self.features = None if features is None else list(features)
        self.include_score = include_score
        self.standardize = standardize
        self.n_permutations = n_permutations
        self.backend = backend
        self.max_reference = max_reference
        self.max_window = max_window
        self.seed = seed
        self.baseline = baseline
        self.reference_size = reference_size
        self.rolling_windows = rolling_windows
        self.reference = reference
        self._baseline: Baseline[_Fitted] = Baseline(
            baseline or None,
            summarise=self._fit,
            reference=reference,
            reference_size=reference_size,
            rolling_windows=rolling_windows,
            names=self.features,
            with_score=wants_score(include_score, self.features),
        )
        self._reset()

    def _reset(self) -> None:
        self._baseline._reset()
        self._status: str | None = None
        self._n = 0
        self._result: dict[str, Any] = {}

    def _make(self, x_ref: np.ndarray) -> Any:
        cls = getattr(_alibi_cd(self._name), self._class)
        return cls(x_ref, backend=self.backend, n_permutations=self.n_permutations)

    def _fit(self, columns: Mapping[str, Sequence[Any]]) -> _Fitted:
        names = _names_of(columns, self.features, self.include_score)
        n = max((len(c) for c in columns.values()), default=0)
        rows = _subsample(_complete(_rows(columns, names, n)), self.max_reference, self.seed)
        d = len(names)
        if rows.shape[0] < 2 or d == 0:
            return _Fitted(names, np.zeros(d), np.ones(d), rows.shape[0], None)
        center, scale = np.zeros(d), np.ones(d)
        if self.standardize:
            center = rows.mean(axis=0)
            sd = rows.std(axis=0)
            scale = np.where(sd > 0, sd, 1.0)
        with _seeded(self.seed):
            det = self._make(((rows - center) / scale).astype(np.float32))
        return _Fitted(names, center, scale, rows.shape[0], det)

    def update(self, window: Window) -> None:
        self._result = {}
        state = self._baseline.admit(window, 0)
        self._status = "tested" if state == "ready" else state
        if state != "ready":
            self._n = window.n
            return
        fitted = self._baseline.summary
        assert fitted is not None
        matrix = _rows(_window_columns(window, fitted.names), fitted.names, window.n)
        rows = _complete(matrix)
        self._n = rows.shape[0]
        self._result = {"incomplete": window.n - rows.shape[0], "reference_n": fitted.n}
        if fitted.detector is None:
            self._status = "no usable reference"
            return
        if rows.shape[0] < max(2, self.min_samples):
            self._status = "few"
            return
        used = _subsample(rows, self.max_window, self.seed)
        x = ((used - fitted.center) / fitted.scale).astype(np.float32)
        with _seeded(self.seed):
            p_alibi, distance, _ = fitted.detector.score(x)
        b = self.n_permutations
        self._result.update(
            distance=float(distance),
            alibi_p_value=float(p_alibi),
            p_value=(round(float(p_alibi) * b) + 1) / (b + 1),
            window_used=int(used.shape[0]),
        )

    def evaluate(self, now: float) -> Measurement:
        status, n = self._status, self._n
        if status is None:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        if status == "empty":
            return Measurement.insufficient_data(self.threshold, 0, "no predictions in window")
        if status == "building":
            return Measurement.insufficient_data(
                self.threshold, n, "building reference", **self._baseline.progress
            )
        if status in ("no previous version", "no reference file", "no usable reference"):
            return Measurement.insufficient_data(self.threshold, n, status, **self._result)
        if status == "few":
            return Measurement.insufficient_data(
                self.threshold, n,
                f"fewer than max(2, min_samples={self.min_samples}) complete rows",
                **self._result,
            )
        fitted = self._baseline.summary
        assert fitted is not None
        r = self._result
        evidence: dict[str, Any] = {
            "test": self._name,
            "features": list(fitted.names),
            "n": n,
            "incomplete": r["incomplete"],
            "window_used": r["window_used"],
            "reference_n": r["reference_n"],
            "alibi_p_value": r["alibi_p_value"],
            "n_permutations": self.n_permutations,
            "seed": self.seed,
            "backend": self.backend,
            "license": LICENSE_NOTE,
        }
        if self._baseline.mode == "previous_version":
            evidence["reference_version"] = self._baseline.version
        return Measurement(
            r["distance"], self.threshold, n, p_value=r["p_value"], effect_size=r["distance"],
            evidence=evidence,
        )


@register("alibi_mmd")
class AlibiMMD(_WindowedAlibi):
    """``alibi_detect.cd.MMDDrift``: maximum mean discrepancy (Gaussian RBF kernel, bandwidth
    from the reference by the median heuristic) with a permutation test. See
    :class:`_WindowedAlibi` for the measurement."""

    _name = "alibi_mmd"
    _class = "MMDDrift"
    _backends = ("tensorflow", "pytorch", "keops")


@register("alibi_lsdd")
class AlibiLSDD(_WindowedAlibi):
    """``alibi_detect.cd.LSDDDrift``: least-squares density difference with a permutation
    test. See :class:`_WindowedAlibi` for the measurement."""

    _name = "alibi_lsdd"
    _class = "LSDDDrift"


# -- online Cramér–von Mises ---------------------------------------------------------------------


class _Online(NamedTuple):
    names: list[str]
    n: int
    detector: Any


@register("alibi_cvm_online")
class AlibiCVMOnline:
    """``alibi_detect.cd.CVMDriftOnline`` fed one event at a time, in event-time order.

    Each prediction whose chosen features are all numbers is one step of alibi's detector
    (others are skipped and counted); the detector's state persists across windows, and after
    a detection it starts afresh (``reset_state``), as river's detectors do. ``value`` is 1.0
    when a change was detected among the window's events, else 0.0 (``threshold`` 0.5); no
    p-value. alibi sets its thresholds so that, on a stream like the reference, the expected
    number of events between false alarms is ``ert``; it does so by simulating
    ``n_bootstraps`` streams (default ``10·ert``) once per reference, at a cost that grows
    with ``n_bootstraps · (max_reference + 2·max(window_sizes))²``: keep the reference small
    (``max_reference``, a seeded subsample) and ``ert`` moderate. Each event costs about
    ``max_reference · Σ window_sizes`` operations. ``baseline`` is ``file`` or ``first_n``
    (a reference that changes every window would re-run the simulation every window).
    """

    needs_reference = True

    def __init__(
        self,
        threshold: float = 0.5,
        min_samples: int = 1,
        features: Sequence[str] | None = None,
        include_score: bool = False,
        ert: int = 2000,
        window_sizes: Sequence[int] = (50, 100),
        n_bootstraps: int | None = None,
        max_reference: int = 500,
        seed: int = 0,
        baseline: str | None = None,
        reference_size: int = 5000,
        reference: Reference | None = None,
    ) -> None:
        _check_common(
            threshold, min_samples, features, baseline, _ONLINE_BASELINES, reference_size,
            max_reference, seed,
        )
        if threshold >= 1.0:
            raise ValueError(f"threshold must be in [0, 1) (value is 0 or 1), got {threshold}")
        if not isinstance(ert, int) or ert < 2:
            raise ValueError(f"ert must be an integer >= 2 (events between false alarms), got {ert!r}")
        sizes = list(window_sizes) if not isinstance(window_sizes, (str, int)) else None
        if not sizes or not all(isinstance(w, int) and w >= 1 for w in sizes):
            raise ValueError(
                f"window_sizes must be a non-empty list of integers >= 1, got {window_sizes!r}"
            )
        boots = 10 * ert if n_bootstraps is None else n_bootstraps
        # alibi estimates the (1 - 1/ert) quantile at each of 2·max(window_sizes) steps, from
        # the simulated streams that have not alarmed yet: too few and it raises mid-stream.
        need = math.ceil(1.2 * ert / (1.0 - 1.0 / ert) ** (2 * max(sizes)))
        if not isinstance(boots, int) or boots < need:
            raise ValueError(
                f"n_bootstraps must be an integer >= {need} for ert={ert} and window sizes up "
                f"to {max(sizes)}, got {boots!r}"
            )
        _alibi_cd("alibi_cvm_online")
        self.threshold = threshold
        self.min_samples = min_samples
        self.features = None if features is None else list(features)
        self.include_score = include_score
        self.ert = ert
        self.window_sizes = sizes
        self.n_bootstraps = n_bootstraps
        self.max_reference = max_reference
        self.seed = seed
        self.baseline = baseline
        self.reference_size = reference_size
        self.reference = reference
        self._boots = boots
        self._baseline: Baseline[_Online] = Baseline(
            baseline or None,
            summarise=self._configure,
            reference=reference,
            reference_size=reference_size,
            names=self.features,
            with_score=wants_score(include_score, self.features),
        )
        self._reset()

    def _reset(self) -> None:
        self._baseline._reset()
        self._active: _Online | None = None
        self._seen = 0
        self._fed_until = -math.inf
        self._status: str | None = None
        self._fed = 0
        self._skipped = 0
        self._detections: list[dict[str, Any]] = []

    def _configure(self, columns: Mapping[str, Sequence[Any]]) -> _Online:
        names = _names_of(columns, self.features, self.include_score)
        n = max((len(c) for c in columns.values()), default=0)
        rows = _subsample(_complete(_rows(columns, names, n)), self.max_reference, self.seed)
        if rows.shape[0] < 2 or not names:
            return _Online(names, rows.shape[0], None)
        cd = _alibi_cd("alibi_cvm_online")
        with _seeded(self.seed):
            det = cd.CVMDriftOnline(
                rows, ert=self.ert, window_sizes=self.window_sizes,
                n_bootstraps=self._boots, verbose=False,
            )
        return _Online(names, rows.shape[0], det)

    def update(self, window: Window) -> None:
        self._fed = self._skipped = 0
        self._detections = []
        state = self._baseline.admit(window, 0)
        self._status = state if state != "ready" else "fed"
        if state != "ready":
            return
        online = self._baseline.summary
        assert online is not None
        if online is not self._active:  # a new reference: a new detector, from t = 0
            self._active = online
            if online.detector is not None:
                online.detector.reset_state()
        if online.detector is None:
            self._status = "no usable reference"
            return
        since = self._fed_until
        preds = [p for p in window.predictions if p.ts >= since] if since > -math.inf else list(
            window.predictions
        )
        preds.sort(key=_by_ts)  # stable: ties keep arrival order
        self._fed_until = max(self._fed_until, window.end)
        cols = {
            n: ([p.score for p in preds] if n == SCORE_COLUMN else [p.features.get(n) for p in preds])
            for n in online.names
        }
        matrix = _rows(cols, online.names, len(preds))
        ok = np.isfinite(matrix).all(axis=1)
        det = online.detector
        detections = []
        for i in np.flatnonzero(ok).tolist():
            out = det.predict(matrix[i])["data"]
            if out["is_drift"]:
                detections.append(
                    {
                        "index": i,
                        "event": self._seen + self._fed,
                        "ts": preds[i].ts,
                        "test_stat": float(np.nanmax(out["test_stat"])),
                        "threshold": float(np.nanmax(out["threshold"])),
                    }
                )
                det.reset_state()
            self._fed += 1
        _trim(det)
        self._skipped = len(preds) - self._fed
        self._seen += self._fed
        self._detections = detections

    def evaluate(self, now: float) -> Measurement:
        status, n = self._status, self._fed
        if status is None:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        if status == "empty":
            return Measurement.insufficient_data(self.threshold, 0, "no predictions in window")
        if status == "building":
            return Measurement.insufficient_data(
                self.threshold, 0, "building reference", **self._baseline.progress
            )
        if status in ("no reference file", "no usable reference"):
            return Measurement.insufficient_data(self.threshold, 0, status)
        if n < max(1, self.min_samples) and not self._detections:
            return Measurement.insufficient_data(
                self.threshold, n,
                "no complete events in window" if n == 0
                else f"fewer than min_samples={self.min_samples} events",
                skipped=self._skipped, events_seen=self._seen,
            )
        online = self._baseline.summary
        assert online is not None
        evidence: dict[str, Any] = {
            "test": "alibi_cvm_online",
            "features": list(online.names),
            "events": n,
            "skipped": self._skipped,
            "events_seen": self._seen,
            "detections": len(self._detections),
            "ert": self.ert,
            "window_sizes": list(self.window_sizes),
            "reference_n": online.n,
            "license": LICENSE_NOTE,
        }
        if self._detections:
            evidence["first"] = self._detections[0]
        return Measurement(1.0 if self._detections else 0.0, self.threshold, n, evidence=evidence)


def _trim(det: Any) -> None:
    """Drop the history alibi keeps but never reads again.

    CVMDriftOnline appends every event to ``xs`` and every statistic to ``test_stats`` /
    ``drift_preds`` with ``np.concatenate``, so each step copies the whole history: a
    long-running stream would slow down without bound. Only the last ``max(window_sizes)``
    rows of ``xs`` are read.
    """
    keep = int(det.max_ws)
    xs = getattr(det, "xs", None)
    if isinstance(xs, np.ndarray) and xs.ndim == 2 and xs.shape[0] > keep:
        det.xs = xs[-keep:]
    for name in ("test_stats", "drift_preds"):
        arr = getattr(det, name, None)
        if isinstance(arr, np.ndarray) and arr.shape[0] > keep:
            setattr(det, name, arr[-keep:])
