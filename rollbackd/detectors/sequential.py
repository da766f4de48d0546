"""Sequential change detection on per-event error streams, with river's ADWIN and HDDM."""

from __future__ import annotations

import math
from operator import attrgetter, itemgetter
from typing import Any

from rollbackd.detectors.base import Measurement, MissingExtra, Window, register
from rollbackd.detectors.model_error import binary_value

__all__ = ["Sequential", "METHODS", "SIGNALS"]

METHODS = ("adwin", "hddm_a", "hddm_w")
SIGNALS = ("serving_error", "model_error")

_ts_error = attrgetter("ts", "error")
_first = itemgetter(0)
_by_label_ts = attrgetter("label_ts")


def _river() -> Any:
    try:
        from river import drift
    except ImportError:
        raise MissingExtra(
            "sequential needs the optional river package: pip install 'rollbackd[river]'"
        ) from None
    return drift


_PLAIN = (bool, int, float, str, type(None))
# ADWIN's serialised window is a few hundred bytes; far more is not one.
_MAX_RUST_BYTES = 1 << 20


def _plain_vars(obj: Any, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(obj).items():
        if _is_rust(value):  # ADWIN's window, EWMean (river's Rust side): its own bytes
            out[name] = bytes(value.__getstate__())
        elif type(value) in _PLAIN:
            out[name] = value
        elif hasattr(value, "__dict__") and depth < 3:
            out[name] = _plain_vars(value, depth + 1)
        else:
            raise TypeError(f"river state {type(obj).__name__}.{name} is a {type(value).__name__}")
    return out


def _set_vars(obj: Any, saved: Any, depth: int = 0) -> None:
    current = vars(obj)
    if type(saved) is not dict or depth > 3:
        raise ValueError(f"{type(obj).__name__}: saved state is not attributes")
    for name, value in saved.items():
        if name not in current:
            raise ValueError(f"{type(obj).__name__} has no attribute {name!r}")
        if _is_rust(current[name]):
            _set_rust(current[name], value)
        elif type(value) is dict:
            _set_vars(current[name], value, depth + 1)
        elif type(value) in _PLAIN and _same_kind(value, current[name]):
            setattr(obj, name, value)
        else:
            raise ValueError(f"{type(obj).__name__}.{name}: {type(value).__name__} where a "
                             f"{type(current[name]).__name__} belongs")


def _same_kind(a: Any, b: Any) -> bool:
    """Whether a saved value may replace the fresh one: the same type, a number for a number
    (river turns its int counts into floats), or None on either side (not set yet)."""
    if a is None or b is None or type(a) is type(b):
        return True
    return type(a) in (int, float) and type(b) in (int, float)


def _is_rust(value: Any) -> bool:
    return type(value).__module__.startswith("river._river_rust")


def _set_rust(obj: Any, data: Any) -> None:
    """Bytes from ``obj.__getstate__()`` back into ``obj`` (river's Rust object, made by the
    detector's constructor: the bytes name no type, Rust's reader is memory-safe)."""
    if type(data) is not bytes or len(data) > _MAX_RUST_BYTES:
        raise ValueError(f"{type(obj).__name__}: saved state is not bytes of a sensible size")
    try:
        obj.__setstate__(data)
    except BaseException as exc:  # river's Rust side panics (PanicException) on bytes it cannot read
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"{type(obj).__name__}: saved state does not decode ({type(exc).__name__})") from None


@register("sequential")
class Sequential:
    """A river change detector fed one 0/1 error indicator per event, in event order.

    ``signal: serving_error``: one indicator per prediction (1 when it carries an ``error``),
    in ``ts`` order; ``signal: model_error``: one per usable binary outcome (1 when the
    prediction — or ``score >= score_threshold`` when there is none — misses the label), in
    label-time order. ``method`` picks the detector: ``adwin`` (``river.drift.ADWIN``, two-sided,
    parameters ``delta`` and ``clock``), ``hddm_a`` or ``hddm_w``
    (``river.drift.binary.HDDMA``/``HDDMW``, one-sided on increases unless ``two_sided``;
    parameters ``drift_confidence`` and, for ``hddm_w``, ``lambda_val``).

    The detector's state persists across windows, so a change is found within events rather
    than windows. ``value`` is 1.0 when a change was detected among this window's events and
    0.0 otherwise (threshold 0.5); no p-value. ``evidence``: the events fed, the detections in
    the window, and for the first one its index in the window and in the stream, its event
    time, and the estimated error rates before and after it (ADWIN: the means of the dropped
    and the kept part of its window; HDDM-A: of the stream before and after its cut point;
    HDDM-W: the two exponentially weighted means). river is an optional extra
    (``pip install rollbackd[river]``); without it the constructor raises ``ValueError``.
    A window that overlaps the previous one contributes only its events at or after the
    previous window's end, so sliding windows feed each event once.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        min_samples: int = 1,
        method: str = "adwin",
        signal: str = "serving_error",
        delta: float = 0.002,
        clock: int = 32,
        drift_confidence: float = 0.001,
        lambda_val: float = 0.05,
        two_sided: bool = False,
        score_threshold: float = 0.5,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1) (value is 0 or 1), got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not isinstance(clock, int) or clock < 1:
            raise ValueError(f"clock must be an integer >= 1, got {clock!r}")
        if not 0.0 < drift_confidence < 1.0:
            raise ValueError(f"drift_confidence must be in (0, 1), got {drift_confidence}")
        if not 0.0 < lambda_val < 1.0:
            raise ValueError(f"lambda_val must be in (0, 1), got {lambda_val}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        _river()  # fail now, with the hint, rather than at the first window
        self.threshold = threshold
        self.min_samples = min_samples
        self.method = method
        self.signal = signal
        self.delta = delta
        self.clock = clock
        self.drift_confidence = drift_confidence
        self.lambda_val = lambda_val
        self.two_sided = two_sided
        self.score_threshold = score_threshold
        self._reset()

    def _make(self) -> Any:
        d = _river()
        if self.method == "adwin":
            return d.ADWIN(delta=self.delta, clock=self.clock)
        # The warning level must not be below the drift level (river compares them in order).
        warning = max(0.005, self.drift_confidence)
        if self.method == "hddm_a":
            return d.binary.HDDMA(
                drift_confidence=self.drift_confidence,
                warning_confidence=warning,
                two_sided_test=self.two_sided,
            )
        return d.binary.HDDMW(
            drift_confidence=self.drift_confidence,
            warning_confidence=warning,
            lambda_val=self.lambda_val,
            two_sided_test=self.two_sided,
        )

    def _reset(self) -> None:
        self._detector = self._make()
        self._seen = 0  # events fed since the start
        self._fed_until = -math.inf
        self._window_seen = False
        self._fed = 0
        self._ones = 0
        self._detections: list[dict[str, Any]] = []
        self._held = (0, 0)

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset, river's
    # detector as plain values (``_river``).
    STATE = ("_river", "_seen", "_fed_until", "_window_seen", "_fed", "_ones", "_detections", "_held")

    @property
    def _river(self) -> dict[str, Any]:
        """river's detector as plain values: its attributes, nested objects (``stats.Mean``,
        ``SampleInfo``) as their attributes, ADWIN's Rust window as the bytes it writes itself."""
        return _plain_vars(self._detector)

    @_river.setter
    def _river(self, saved: Any) -> None:
        # Into the detector _make built from this rule's parameters: only attributes it has,
        # only plain values; nothing in ``saved`` names a type.
        _set_vars(self._detector, saved)

    def _stream(self, window: Window) -> list[tuple[float, int]]:
        since = self._fed_until
        if self.signal == "serving_error":
            preds = window.predictions
            if since > -math.inf:
                preds = [p for p in preds if p.ts >= since]
            rows = sorted(map(_ts_error, preds), key=_first)  # stable: ties keep arrival order
            return [(ts, int(err is not None)) for ts, err in rows]
        outs = [o for o in window.outcomes if o.label_ts >= since]
        outs.sort(key=_by_label_ts)
        stream = []
        cut = self.score_threshold
        for o in outs:
            y = binary_value(o.label)
            yhat = binary_value(o.prediction)
            if yhat is None and o.prediction is None and o.score is not None:
                yhat = int(o.score >= cut)
            if y is not None and yhat is not None:
                stream.append((o.label_ts, int(y != yhat)))
        return stream

    def update(self, window: Window) -> None:
        self._window_seen = True
        stream = self._stream(window)
        self._fed_until = max(self._fed_until, window.end)
        det = self._detector
        detections = []
        # Events and errors river's detector holds: it resets itself on the update after a
        # detection, and (ADWIN) drops data only when it detects, so these are its window.
        held, held_sum = self._held
        for i, (ts, x) in enumerate(stream):
            det.update(x)
            if det.drift_detected:
                detections.append(self._describe(det, (held, held_sum), x, i, ts))
                held = held_sum = 0  # river starts afresh at the next event
            else:
                held += 1
                held_sum += x
        self._held = (held, held_sum)
        self._seen += len(stream)
        self._fed = len(stream)
        self._ones = sum(x for _, x in stream)
        self._detections = detections

    def _describe(self, det: Any, before: Any, x: int, index: int, ts: float) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index, "event": self._seen + index, "ts": ts}
        mean_before = mean_after = None
        if self.method == "adwin":
            # Before the update ADWIN held ``width0`` events summing to ``total0``; it added
            # ``x`` and dropped its oldest part: what is gone is the "before" segment.
            width0, total0 = before
            width1, total1 = det.width, det.total
            dropped = width0 + 1 - width1
            if dropped > 0:
                mean_before = (total0 + x - total1) / dropped
            mean_after = total1 / width1 if width1 else None
        elif self.method == "hddm_a":
            x_min, z = getattr(det, "_x_min", None), getattr(det, "_z", None)
            if x_min is not None and z is not None and z.n > x_min.n:
                mean_before = x_min.get()
                mean_after = (z.get() * z.n - x_min.get() * x_min.n) / (z.n - x_min.n)
        else:
            s1, s2 = getattr(det, "_s1_incr", None), getattr(det, "_s2_incr", None)
            if s1 is not None and s2 is not None:
                mean_before, mean_after = s1.ewma, s2.ewma
        out["mean_before"] = mean_before
        out["mean_after"] = mean_after
        return out

    def evaluate(self, now: float) -> Measurement:
        if not self._window_seen:
            return Measurement.insufficient_data(self.threshold, 0, "no window yet")
        n = self._fed
        if n < max(1, self.min_samples) and not self._detections:
            return Measurement.insufficient_data(
                self.threshold,
                n,
                "no events in window"
                if n == 0
                else f"fewer than min_samples={self.min_samples} events",
                events_seen=self._seen,
            )
        evidence: dict[str, Any] = {
            "method": self.method,
            "signal": self.signal,
            "events": n,
            "error_rate": self._ones / n if n else None,
            "events_seen": self._seen,
            "detections": len(self._detections),
        }
        if self._detections:
            evidence["first"] = self._detections[0]
        return Measurement(
            1.0 if self._detections else 0.0, self.threshold, n, evidence=evidence
        )
