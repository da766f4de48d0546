"""What every detector sees and returns: a :class:`Window` in, a :class:`Measurement` out.

Detectors are pure: no I/O, no clock reads. The processing loop hands each detector the
closed window for its (deployment, variant) through ``update(window)`` and then asks
``evaluate(now)``. Constructor arguments are public attributes of the same name; moving
state is created in ``_reset()``; invalid parameters raise ``ValueError`` naming the range.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import chain
from operator import attrgetter, itemgetter
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, NamedTuple, Protocol, Sequence, TypeVar, runtime_checkable

import msgspec
import numpy as np

from rollbackd.events import Prediction

__all__ = [
    "Measurement",
    "Labeled",
    "Window",
    "Reference",
    "Detector",
    "Skipping",
    "DetectorFactory",
    "MissingExtra",
    "check_feature_names",
    "REGISTRY",
    "register",
    "make_detector",
]


@dataclass(frozen=True, slots=True)
class Measurement:
    """The result of one evaluation.

    ``value`` is the statistic the rule compares with its threshold (``None`` when the window
    held too little data: then ``insufficient`` says why and no verdict may be drawn).
    """

    value: float | None
    threshold: float
    sample_size: int
    p_value: float | None = None
    effect_size: float | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    insufficient: str | None = None

    @classmethod
    def insufficient_data(
        cls, threshold: float, sample_size: int, reason: str, **evidence: Any
    ) -> "Measurement":
        return cls(None, threshold, sample_size, evidence=evidence, insufficient=reason)

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "value": _num(self.value),
            "threshold": _num(self.threshold),
            "sample_size": self.sample_size,
        }
        if self.p_value is not None:
            rec["p_value"] = _num(self.p_value)
        if self.effect_size is not None:
            rec["effect_size"] = _num(self.effect_size)
        if self.insufficient is not None:
            rec["insufficient"] = self.insufficient
        if self.evidence:
            rec["evidence"] = dict(self.evidence)
        return rec


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class Labeled(msgspec.Struct, frozen=True, gc=False):
    """A prediction joined with its outcome (a C-level struct: there is one per label).
    ``segments``: the prediction's slices for the rules that slice labels (see
    ``daemon/join.Pending``), None when no rule does."""

    pred_ts: float
    label_ts: float
    variant: str
    model_version: str
    prediction: float | str | bool | None
    score: float | None
    label: float | str | bool
    segments: tuple[str, ...] | None = None


_T = TypeVar("_T")


class _cached(Generic[_T]):
    """``functools.cached_property`` without its lock: a value computed on first read and
    kept in the instance's ``__dict__``, which later reads find first. Python 3.11's
    ``cached_property`` takes one lock shared by every instance on each first read, a cost a
    fleet's boundary pays for thousands of small windows; a window is read by one thread."""

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: type | None = None) -> _T:
        if obj is None:
            return self  # type: ignore[return-value]
        value = obj.__dict__[self.name] = self.func(obj)
        return value


class Window:
    """The events of one deployment × variant over ``[start, end)`` of event time.

    Predictions are kept as decoded; columns are built on first use and cached, so a
    detector pays only for the columns it reads. ``outcomes`` are the labels that arrived in
    the window, joined to their predictions (which may be older than ``start``).
    """

    __slots__ = (
        "deployment", "variant", "start", "end", "predictions", "outcomes", "siblings",
        "version", "segment", "known_good", "__dict__",
    )

    def __init__(
        self,
        deployment: str,
        variant: str,
        start: float,
        end: float,
        predictions: Sequence[Prediction] = (),
        outcomes: Sequence[Labeled] = (),
    ) -> None:
        self.deployment = deployment
        self.variant = variant
        self.start = start
        self.end = end
        self.predictions = predictions
        self.outcomes = outcomes
        # variant -> Window of the same deployment and span (this one included); set by the
        # window assembler, empty for a window built alone.
        self.siblings: Mapping[str, Window] = {}
        # Set when this window is one part of a window the pipeline split: the share one model
        # version served (a rolling update), or one slice's share ("region=eu-west"). None: the
        # whole window of the deployment × variant.
        self.version: str | None = None
        self.segment: str | None = None
        # The deployment's last known-good version, when the pipeline knows one: a detector
        # that compares versions (model_quality's previous_version baseline) prefers it to the
        # last version seen. None: not known (or not set by whoever built the window).
        self.known_good: str | None = None

    def __repr__(self) -> str:
        return (
            f"Window({self.deployment!r}, {self.variant!r}, [{self.start}, {self.end}), "
            f"n={len(self.predictions)}, labels={len(self.outcomes)})"
        )

    @property
    def n(self) -> int:
        return len(self.predictions)

    # Each column is read from the predictions when a detector first asks for it, one
    # attribute per pass: measured on windows whose structs were out of the CPU caches, that
    # is twice as fast as one pass collecting every column in a tuple per prediction and
    # transposing them, and a column no detector reads is never built.
    @_cached
    def _errors(self) -> tuple[str | None, ...]:
        return tuple(map(_get_error, self.predictions))

    @_cached
    def _features(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(map(_get_features, self.predictions))

    @_cached
    def n_errors(self) -> int:
        return len(self.predictions) - self._errors.count(None)

    @_cached
    def error_codes(self) -> dict[str, int]:
        errors = [e for e in self._errors if e is not None]
        return dict(Counter(errors)) if errors else {}  # most windows: no Counter to build

    @_cached
    def latencies(self) -> np.ndarray:
        return _floats(map(_get_latency, self.predictions))

    @_cached
    def scores(self) -> np.ndarray:
        return _floats(map(_get_score, self.predictions))

    @_cached
    def versions(self) -> dict[str, int]:
        preds = self.predictions
        distinct = set(map(_get_version, preds))
        if len(distinct) == 1:  # the usual case, at a fraction of Counter's cost
            return {distinct.pop(): len(preds)}
        return dict(Counter(map(_get_version, preds)))

    @_cached
    def label_versions(self) -> frozenset[str]:
        """The versions that served the predictions whose labels arrived in this window."""
        return frozenset(map(_get_version, self.outcomes))

    @_cached
    def feature_names(self) -> tuple[str, ...]:
        return self._rows[0]

    def feature(self, name: str) -> list[Any]:
        """Raw values of one feature, ``None`` where absent."""
        cols = self._columns
        return cols[name] if name in cols else [None] * len(self.predictions)

    @_cached
    def _rows(self) -> tuple[tuple[str, ...], list[tuple[Any, ...]] | None]:
        """The feature names, and each prediction's values of them when every prediction has
        exactly those features (the usual case), else None."""
        feats = self._features
        if feats:
            # Every dict as long as the first one, and holding each of its keys: then they
            # all have the same keys, and the names need not be collected from every dict.
            names = tuple(sorted(feats[0]))
            if len(names) > 1 and set(map(len, feats)) == {len(names)}:
                try:
                    return names, list(map(itemgetter(*names), feats))
                except KeyError:  # same count, other names
                    pass
        return tuple(sorted(set(chain.from_iterable(feats)))), None

    @_cached
    def _columns(self) -> dict[str, list[Any]]:
        names, rows = self._rows
        if rows is None:
            feats = self._features
            return {n: [f.get(n) for f in feats] for n in names}
        # Each feature dict was read once (itemgetter of all names); transposed here.
        return {n: list(col) for n, col in zip(names, zip(*rows))}

    @property
    def label_coverage(self) -> float | None:
        """Labels that arrived in this window per prediction served in it."""
        return None if not self.predictions else len(self.outcomes) / len(self.predictions)


_get_error = attrgetter("error")
_get_latency = attrgetter("latency_ms")
_get_score = attrgetter("score")
_get_version = attrgetter("model_version")
_get_features = attrgetter("features")


def _floats(values: Any) -> np.ndarray:
    return np.array([v for v in values if v is not None], dtype=float)


class Reference(NamedTuple):
    """Reference data for drift detectors: raw values per feature (and ``__score__``).

    ``summaries``: what detectors made of it, by what they made it with (immutable values),
    so the deployments and rules that share one reference file share one summary; None when
    the reference is not shared (each detector then makes its own)."""

    source: str
    columns: Mapping[str, Sequence[Any]]
    summaries: dict[Any, Any] | None = None


class Detector(Protocol):
    """One small object per (rule, deployment, variant) with one verb each way."""

    def update(self, window: Window) -> None:
        """Feed the closed window (replaces the previous one for windowed tests)."""

    def evaluate(self, now: float) -> Measurement:
        """Measure the data fed so far at event time ``now``."""


@runtime_checkable
class Skipping(Protocol):
    """A detector that can pass over a window cheaply: one too small for any verdict, whose
    measurement nobody reads (the pipeline's evaluator knows both: see
    ``daemon/evaluation.WINDOW_SAMPLES``). Optional: without it the window is ``update``d."""

    def skip(self, window: Window) -> None:
        """Take ``window`` without measuring it: keep what later windows depend on (a baseline
        being built, a store of earlier windows, what the labels say the task is), nothing
        more. The next :meth:`~Detector.update` sets the rest, and ``evaluate`` is only
        asked after an update."""


class MissingExtra(ValueError):
    """The detector needs an optional package that is not installed; the message starts with
    the detector's name and says how to install the extra.

    A ``ValueError`` like any bad parameter, so whoever builds detectors catches it the same
    way; the rules loader tells it apart so the error points at the rule's ``detector``, the
    choice the user has to change (or install for), rather than at its ``params``.
    """


def check_feature_names(features: Any) -> None:
    """A detector's ``features`` parameter: ``None`` (all) or a list of names, never one string."""
    if features is not None and (
        isinstance(features, str) or not all(isinstance(f, str) for f in features)
    ):
        raise ValueError(f"features must be a list of feature names, got {features!r}")


DetectorFactory = Callable[..., Detector]
REGISTRY: dict[str, DetectorFactory] = {}


def register(name: str) -> Callable[[DetectorFactory], DetectorFactory]:
    def deco(factory: DetectorFactory) -> DetectorFactory:
        REGISTRY[name] = factory
        return factory

    return deco


def make_detector(
    name: str,
    *,
    threshold: float,
    min_samples: int,
    params: Mapping[str, Any],
    reference: Reference | None = None,
) -> Detector:
    """Build a detector by its name in the rules file.

    Every detector constructor takes ``threshold`` and ``min_samples``; drift detectors also
    take ``reference``; the rule's ``params`` are passed as keyword arguments.
    """
    from rollbackd import detectors as _pkg  # noqa: F401  (registers the built-ins)

    try:
        factory = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    kwargs = dict(params)
    if getattr(factory, "needs_reference", False):
        kwargs["reference"] = reference
    return factory(threshold=threshold, min_samples=min_samples, **kwargs)
