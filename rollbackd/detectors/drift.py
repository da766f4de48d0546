"""Input (and optionally score) drift: per-feature two-sample tests of a window against a reference.

Also home to :class:`Baseline`, which decides what a window is compared with (a reference file,
the running version's first predictions, the previous version's last ones, or the windows just
before) for this detector and for ``data_quality``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from operator import attrgetter, itemgetter
from typing import Any, Callable, Generic, Iterable, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np

from rollbackd.detectors.base import Measurement, Reference, Window, check_feature_names, register
from rollbackd.detectors.seasonal import SeasonalStore, parse_period
from rollbackd.detectors.stats import (
    CORRECTIONS,
    ad_pvalue,
    ad_reference,
    ad_statistic,
    adjust_pvalues,
    chi2_2xk,
    chi2_pvalues,
    cramers_v,
    cvm_pvalues,
    cvm_reference,
    cvm_statistic,
    g_2xk,
    js_chi2_statistic,
    js_distance,
    ks_pvalues_fast,
    ks_statistic_sorted,
    psi,
    psi_bin_counts,
    psi_reference,
    unseen_pvalue,
    wasserstein_pvalue,
    wasserstein_reference,
    wasserstein_statistic,
)
from rollbackd.events import Prediction
from rollbackd.rules.durations import format_duration

__all__ = [
    "Drift",
    "Baseline",
    "BASELINES",
    "DRIFT_BASELINES",
    "SameTime",
    "NUMERIC_TESTS",
    "CATEGORICAL_TESTS",
    "UNSEEN_MODES",
    "SCORE_COLUMN",
]

SCORE_COLUMN = "__score__"

NUMERIC_TESTS: tuple[str, ...] = ("ks", "cvm", "ad", "wasserstein", "psi")
CATEGORICAL_TESTS: tuple[str, ...] = ("chi2", "g", "js", "psi")
# Tests whose effect size lies in [0, 1] (G's V can reach 1.18; thresholds above 1 are moot).
_BOUNDED_EFFECT = frozenset({"ks", "cvm", "chi2", "g", "js"})
UNSEEN_MODES: tuple[str, ...] = ("ignore", "evidence", "drift")
BASELINES: tuple[str, ...] = ("file", "first_n", "previous_version", "rolling")
# Drift's own: the window one period earlier (SameTime); data_quality and the alibi detectors
# keep the shared four.
DRIFT_BASELINES: tuple[str, ...] = (*BASELINES, "same_time")

_NONE = type(None)


def _is_numeric_type(t: type) -> bool:
    return issubclass(t, (int, float, np.integer, np.floating)) and not issubclass(
        t, (bool, np.bool_)
    )


def _is_categorical_type(t: type) -> bool:
    return issubclass(t, (str, bool, np.bool_))


def _numeric_values(col: Sequence[Any] | np.ndarray) -> np.ndarray:
    """The finite numbers of a column as float64; strings, bools and None are dropped."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
        arr = col.astype(float, copy=False)
    else:
        types = set(map(type, col))
        if all(t is _NONE or _is_numeric_type(t) for t in types):
            # numpy turns None into NaN here, which the finiteness mask below drops.
            arr = np.array(col, dtype=float)
        else:
            arr = np.array([v for v in col if _is_numeric_type(type(v))], dtype=float)
    return arr[np.isfinite(arr)]


def _category_counts(col: Sequence[Any]) -> Counter[Any]:
    """Counts of the str/bool values of a column; numbers and None are not categories."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "fiuc":
        return Counter()
    types = set(map(type, col))
    if any(issubclass(t, (bool, np.bool_)) for t in types) and any(
        _is_numeric_type(t) for t in types
    ):
        # True == 1.0 would share one Counter slot; take the categories out first.
        return Counter(v for v in col if _is_categorical_type(type(v)))
    counts = Counter(col)
    if not all(_is_categorical_type(t) for t in types):
        for key in [k for k in counts if not _is_categorical_type(type(k))]:
            del counts[key]
    return counts


def _column_kind(col: Sequence[Any] | np.ndarray) -> str | None:
    """``numeric`` when numbers are at least half of the non-null values (a numeric feature
    with a few sentinel strings stays numeric), ``categorical`` when there are str/bool values,
    else ``None`` (nothing usable)."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
        return "numeric" if col.shape[0] and np.isfinite(col).any() else None
    return _kind_of_counts(*_kind_counts(col))


def _kind_counts(col: Sequence[Any]) -> tuple[int, int]:
    """How many values of a column are numbers (NaN included) and how many str/bool."""
    kinds = Counter(map(type, col))
    n_num = sum(c for t, c in kinds.items() if _is_numeric_type(t))
    n_cat = sum(c for t, c in kinds.items() if _is_categorical_type(t))
    return n_num, n_cat


def _kind_of_counts(n_num: int, n_cat: int) -> str | None:
    if n_num and n_num >= n_cat:
        return "numeric"
    return "categorical" if n_cat else None


def _dominant_version(versions: Mapping[str, int]) -> str:
    # Ties go to the version that appeared later in the window: the newer one is running.
    best, best_n = "", -1
    for version, count in versions.items():
        if count >= best_n:
            best, best_n = version, count
    return best


# -- baselines -----------------------------------------------------------------------------------

S = TypeVar("S")
Columns = dict[str, Sequence[Any]]


def _predictions_of(window: Window, version: str | None, limit: int | None) -> Sequence[Prediction]:
    """The window's predictions of ``version`` (all when None), the first ``limit`` of them."""
    preds: Sequence[Prediction] = window.predictions
    if version is not None and not (len(window.versions) == 1 and version in window.versions):
        preds = [p for p in preds if p.model_version == version]
    return preds if limit is None or len(preds) <= limit else preds[:limit]


def _window_columns(
    window: Window,
    version: str | None,
    names: Sequence[str] | None,
    with_score: bool,
    limit: int | None = None,
) -> tuple[Columns, int]:
    """The window's columns (name -> values, ``None`` where absent), restricted to one version's
    predictions (all when ``version`` is None) and to the first ``limit`` of them."""
    whole = version is None or (len(window.versions) == 1 and version in window.versions)
    if whole and window.n <= _FEW and (limit is None or window.n <= limit):
        return _few_columns(window.predictions, names, with_score), window.n
    if whole and (limit is None or window.n <= limit):
        # The common case: the window's cached columns are used as they are.
        wanted = window.feature_names if names is None else names
        cols: Columns = {n: window.feature(n) for n in wanted if n != SCORE_COLUMN}
        if with_score:
            cols[SCORE_COLUMN] = [p.score for p in window.predictions]
        return cols, window.n
    preds = _predictions_of(window, version, limit)
    if names is None:
        seen: set[str] = set()
        for p in preds:
            seen.update(p.features)
        wanted = sorted(seen)
    else:
        wanted = list(names)
    cols = {n: [p.features.get(n) for p in preds] for n in wanted if n != SCORE_COLUMN}
    if with_score:
        cols[SCORE_COLUMN] = [p.score for p in preds]
    return cols, len(preds)


# At fleet size most windows hold a handful of predictions, all of them taken into a reference
# being built and none tested. Read from the predictions directly, such a window's columns
# cost a fraction of the Window's cached ones (four cached properties and a transposition, a
# fixed cost that only pays off on larger windows); the values are the same objects, in the
# same order, under the same names (Window.feature_names: sorted, None where absent).
_FEW = 32


def _few_columns(preds: Sequence[Prediction], names: Sequence[str] | None, with_score: bool) -> Columns:
    cols = _feature_columns([p.features for p in preds], names)
    if with_score:
        cols[SCORE_COLUMN] = [p.score for p in preds]
    return cols


def _feature_columns(feats: Sequence[Mapping[str, Any]], names: Sequence[str] | None) -> Columns:
    """The columns of feature dicts (name -> values, ``None`` where absent): ``names`` (the
    score's excepted), else every name a dict holds, sorted."""
    wanted = [n for n in (sorted(set().union(*feats)) if names is None else names) if n != SCORE_COLUMN]
    rows: list[Any] | None = None
    if len(wanted) > 1:  # every dict holding every name (the usual case): read in one C call each
        try:
            rows = list(map(itemgetter(*wanted), feats))
        except KeyError:
            pass
    if rows is None:
        rows = [tuple(map(f.get, wanted)) for f in feats]
    return dict(zip(wanted, map(list, zip(*rows)))) if feats else {n: [] for n in wanted}


class _Chunks:
    """Columns of consecutive windows, joined on demand (aligned: None where a name is absent)."""

    __slots__ = ("parts", "n")

    def __init__(self) -> None:
        self.parts: deque[tuple[Columns, int]] = deque()
        self.n = 0

    def add(self, cols: Columns, n: int) -> None:
        if n:
            self.parts.append((cols, n))
            self.n += n

    def take(self, window: Window, version: str | None, names: Sequence[str] | None,
             with_score: bool, limit: int | None) -> None:
        self.add(*_window_columns(window, version, names, with_score, limit))

    def keep_last(self, size: int) -> None:
        while self.parts and self.n - self.parts[0][1] >= size:
            self.n -= self.parts.popleft()[1]

    def columns(self, last: int | None = None) -> Columns:
        names: dict[str, None] = {}
        for cols, _ in self.parts:
            names.update(dict.fromkeys(cols))
        skip = 0 if last is None else max(self.n - last, 0)
        out: Columns = {}
        for name in names:
            joined: list[Any] = []
            for cols, n in self.parts:
                col = cols.get(name)
                joined.extend([None] * n if col is None else col)
            out[name] = joined[skip:] if skip else joined
        return out


class Gathered:
    """What a drift test needs of one column of a reference being built: its finite numbers
    (float64, in the order they came), its str/bool values' counts (in order of first
    appearance) and how many values were numbers (NaN included) and categories, which decide
    the column's kind. Exactly what the test reads of the raw column, a few bytes per value."""

    __slots__ = ("numbers", "counts", "n_num", "n_cat")

    def __init__(self) -> None:
        self.numbers: np.ndarray = _NO_NUMBERS
        self.counts: dict[Any, int] = {}
        self.n_num = 0
        self.n_cat = 0

    def add(self, col: Sequence[Any]) -> None:
        types = set(map(type, col))
        if len(types) == 1 and float in types:  # the usual numeric column, at a third of the cost
            self.n_num += len(col)
            values = np.array(col, dtype=float)
            values = values[np.isfinite(values)]
            self.numbers = np.concatenate((self.numbers, values)) if self.numbers.shape[0] else values
            return
        n_num, n_cat = _kind_counts(col)
        if n_num:
            self.n_num += n_num
            values = _numeric_values(col)
            if values.shape[0]:
                self.numbers = np.concatenate((self.numbers, values)) if self.numbers.shape[0] else values
        if n_cat:
            self.n_cat += n_cat
            counts = self.counts
            for v in col:
                if _is_categorical_type(type(v)):
                    counts[v] = counts.get(v, 0) + 1

    @property
    def kind(self) -> str | None:
        return _kind_of_counts(self.n_num, self.n_cat)


_NO_NUMBERS = np.zeros(0)
_NO_NUMBERS.flags.writeable = False  # shared by every empty Gathered: replaced, never changed


class PartialReference:
    """The first predictions of a ``first_n`` reference while it is built, kept as
    :class:`Gathered` columns instead of the raw values (5,000 predictions x 10 features
    would be 50,000 Python objects per deployment, and the memory they pin).

    A window's predictions are staged as they are (their feature dicts and scores: one
    ``extend`` per window, the usual window at fleet size holding 2-3 predictions) and
    gathered by the ``STAGE`` (or at the end), so the per-column work is done on batches.
    """

    __slots__ = ("n", "_feats", "_scores", "_names", "_with_score", "_columns")
    STAGE = 32

    def __init__(self) -> None:
        self.n = 0
        self._names: Sequence[str] | None = None  # the baseline's, given with each window
        self._with_score = False
        self._feats: list[Mapping[str, Any]] = []
        self._scores: list[float | None] = []
        self._columns: dict[str, Gathered] = {}

    def take(self, window: Window, version: str | None, names: Sequence[str] | None,
             with_score: bool, limit: int | None) -> None:
        preds = _predictions_of(window, version, limit)
        self._names, self._with_score = names, with_score
        self._feats.extend(map(_get_features, preds))
        if with_score:
            self._scores.extend(map(_get_score, preds))
        self.n += len(preds)
        if len(self._feats) >= self.STAGE:
            self._gather()

    def _gather(self) -> None:
        cols = _feature_columns(self._feats, self._names)
        if self._with_score:
            cols[SCORE_COLUMN] = self._scores
        gathered = self._columns
        for name, col in cols.items():
            g = gathered.get(name)
            if g is None:
                g = gathered[name] = Gathered()
            g.add(col)
        self._feats, self._scores = [], []

    def columns(self) -> dict[str, Gathered]:
        """Every column gathered (name -> :class:`Gathered`), names as the raw columns had."""
        if self._feats or not self._columns:
            self._gather()
        return self._columns


_get_features = attrgetter("features")
_get_score = attrgetter("score")


def wants_score(include_score: bool, features: Sequence[str] | None) -> bool:
    """Whether a detector's reference must keep the scores: asked for, or named as a feature."""
    return include_score or (features is not None and SCORE_COLUMN in features)


class Baseline(Generic[S]):
    """Which reference a window is compared with, and its summary (computed once per reference).

    ``mode`` (``None``: ``file`` when a reference is given, else ``first_n``):

    - ``file``: the given :class:`Reference` (``None``: no verdicts, "no reference file");
    - ``first_n``: the first ``reference_size`` predictions of the running version (the
      window's most frequent ``model_version``); the windows that build it are not tested, and
      a new running version starts a new one;
    - ``previous_version``: the last ``reference_size`` predictions of the version that ran
      before the current one. On a return to a version that ran earlier (a rollback), its own
      last predictions from that earlier run: a rolled-back version is never the standard;
    - ``rolling``: the ``rolling_windows`` non-empty windows before the current one.

    ``summarise`` turns raw columns (``SCORE_COLUMN`` holds scores) into what the detector
    precomputes; it runs when the reference changes (for ``rolling``, every window).
    """

    # What a checkpoint keeps (daemon/snapshot.py); the rest is configuration. ``summary`` is
    # immutable once made (replaced, never changed): a checkpoint writes it once, as a blob
    # named by its digest, except for a rolling baseline, which makes a new one every window.
    STATE = ("summary", "version", "_build", "_build_version", "_tails", "_running", "_recent")
    BLOBS: tuple[str, ...] = ("summary",)

    def __init__(
        self,
        mode: str | None,
        *,
        summarise: Callable[[Mapping[str, Any]], S],
        reference: Reference | None = None,
        reference_size: int = 5000,
        rolling_windows: int = 10,
        names: Sequence[str] | None = None,
        with_score: bool = False,
        max_versions: int = 3,
        build: Callable[[], "_Chunks | PartialReference"] = _Chunks,
        summary_key: Any = None,
    ) -> None:
        if mode is None:
            mode = "file" if reference is not None else "first_n"
        if mode not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {mode!r}")
        self.mode = mode
        if mode == "rolling":
            self.BLOBS = ()
        self.reference = reference
        self.reference_size = reference_size
        self.rolling_windows = rolling_windows
        self.names = None if names is None else list(names)
        self.with_score = with_score
        self.max_versions = max_versions
        self._summarise = summarise
        self._new_build = build
        self._given = (
            self._summary_of(reference, summary_key) if mode == "file" and reference is not None else None
        )
        self._reset()

    def _summary_of(self, reference: Reference, key: Any) -> S:
        """The reference's summary; made once per reference and ``key`` (what the summary
        depends on besides the columns) when the reference keeps its summaries."""
        shared = reference.summaries
        if shared is None or key is None:
            return self._summarise(reference.columns)
        if key not in shared:
            shared[key] = self._summarise(reference.columns)
        return shared[key]

    def _reset(self) -> None:
        self.summary: S | None = self._given
        self.version: str | None = None  # the version the reference was taken from
        self._build = self._new_build()  # first_n
        self._build_version: str | None = None
        self._tails: dict[str, _Chunks] = {}  # previous_version: last predictions per version
        self._running: str | None = None
        self._recent = _Chunks()  # rolling

    @property
    def progress(self) -> dict[str, int]:
        """How far the reference being built has come (for "building reference" evidence)."""
        if self.mode == "rolling":
            return {
                "reference_windows": len(self._recent.parts),
                "rolling_windows": self.rolling_windows,
            }
        built = self._build.n if self.summary is None else self.reference_size
        return {"reference_n": built, "reference_size": self.reference_size}

    def admit(self, window: Window, min_samples: int) -> str:
        """``ready`` when the window is to be tested: it holds predictions, the reference is
        there (the window is taken in first, see :meth:`observe`) and ``min_samples`` is met;
        else the reason (``empty``, ``few`` or the reference's state)."""
        if window.n == 0:
            return "empty"
        state = self.observe(window)
        if state != "ready":
            return state
        return "few" if window.n < min_samples else "ready"

    def not_tested(self, status: str | None, n: int, threshold: float, min_samples: int) -> Measurement | None:
        """The "insufficient data" verdict for a window :meth:`admit` did not let through
        (``status`` its answer, None before any window), or None when it was tested."""
        if status is None:
            return Measurement.insufficient_data(threshold, 0, "no window yet")
        if status == "empty":
            return Measurement.insufficient_data(threshold, 0, "no predictions in window")
        if status == "building":
            return Measurement.insufficient_data(threshold, n, "building reference", **self.progress)
        if status in ("no previous version", "no reference file"):
            return Measurement.insufficient_data(threshold, n, status)
        if status == "few":
            return Measurement.insufficient_data(
                threshold, n, f"fewer than min_samples={min_samples} predictions"
            )
        return None

    def observe(self, window: Window) -> str:
        """Take in a non-empty window before it is tested; say whether it has a reference.

        Returns ``ready``, ``building`` (first_n, rolling), ``no previous version`` or
        ``no reference file``.
        """
        if self.mode == "file":
            return "ready" if self.summary is not None else "no reference file"
        if self.mode == "first_n":
            return self._first_n(window)
        if self.mode == "previous_version":
            return self._previous_version(window)
        return self._rolling(window)

    def _first_n(self, window: Window) -> str:
        version = _dominant_version(window.versions)
        if self.summary is not None and version != self.version:
            self.summary, self.version = None, None
        if self.summary is not None:
            return "ready"
        if version != self._build_version:
            self._build, self._build_version = self._new_build(), version
        need = self.reference_size - self._build.n
        self._build.take(window, version, self.names, self.with_score, need)
        if self._build.n >= self.reference_size:
            self.summary = self._summarise(self._build.columns())
            self.version = version
            self._build, self._build_version = self._new_build(), None
        return "building"

    def _previous_version(self, window: Window) -> str:
        version = _dominant_version(window.versions)
        if version != self._running:
            if self._running is not None:
                base = version if version in self._tails else self._running
                tail = self._tails.get(base)
                if tail is not None and tail.n:
                    self.summary = self._summarise(tail.columns(self.reference_size))
                    self.version = base
            self._running = version
        tail = self._tails.pop(version, None) or _Chunks()
        self._tails[version] = tail  # most recently running last
        tail.add(*_window_columns(window, version, self.names, self.with_score))
        tail.keep_last(self.reference_size)
        while len(self._tails) > self.max_versions:
            del self._tails[next(iter(self._tails))]
        return "ready" if self.summary is not None else "no previous version"

    def _rolling(self, window: Window) -> str:
        ready = len(self._recent.parts) >= self.rolling_windows
        if ready:
            self.summary = self._summarise(self._recent.columns())
        self._recent.add(*_window_columns(window, None, self.names, self.with_score))
        while len(self._recent.parts) > self.rolling_windows:
            self._recent.n -= self._recent.parts.popleft()[1]
        return "ready" if ready else "building"


class WindowSummary(NamedTuple):
    """A window as ``same_time`` keeps it for a period: its prediction count and, per column,
    a sorted float32 sample of at most ``same_time_size`` values (numeric) or the category
    counts (categorical); None when the column held nothing usable."""

    n: int
    columns: dict[str, np.ndarray | dict[Any, int] | None]


def order_statistics(values: np.ndarray, size: int) -> np.ndarray:
    """``size`` evenly spaced order statistics of the sorted ``values`` (all when there are no
    more than ``size``): the values at ranks ``floor((i + 1/2) n / size)``. Deterministic, so a
    replay keeps byte-identical references; the ECDF of the result is within ``1/size`` of that
    of ``values`` everywhere."""
    n = values.shape[0]
    if n <= size:
        return values
    return values[((np.arange(size) + 0.5) * (n / size)).astype(np.int64)]


def _compact_column(col: Sequence[Any], size: int) -> np.ndarray | dict[Any, int] | None:
    kind = _column_kind(col)
    if kind == "numeric":
        values = _numeric_values(col)
        if values.shape[0] == 0:
            return None
        values.sort()
        # float32 rounding is monotone: the sample stays sorted.
        return order_statistics(values, size).astype(np.float32)
    if kind == "categorical":
        counts = _category_counts(col)
        return dict(counts) if counts else None
    return None


class SameTime(Generic[S]):
    """``baseline: same_time``: the window is compared with the window that ended one
    ``period`` earlier (a :class:`~rollbackd.detectors.seasonal.SeasonalStore` of
    :class:`WindowSummary`), which needs ``min_samples`` predictions of its own.

    The same interface as :class:`Baseline` (``admit``, ``not_tested``, ``summary``, ``mode``);
    ``summary`` is the detector's reference summary made from the earlier window's compact
    one, anew for every window.
    """

    STATE = ("_store", "reference_end", "reference_n")
    mode = "same_time"
    version = None

    def __init__(
        self,
        period: float,
        *,
        summarise: Callable[[Mapping[str, Any]], S],
        size: int,
        names: Sequence[str] | None = None,
        with_score: bool = False,
    ) -> None:
        self.period = period
        self.size = size
        self.names = None if names is None else list(names)
        self.with_score = with_score
        self._summarise = summarise
        self._store: SeasonalStore[WindowSummary] = SeasonalStore(period)
        self._reset()

    def _reset(self) -> None:
        self._store._reset()
        self.summary: S | None = None
        # The earlier window last compared with (its end and prediction count).
        self.reference_end: float | None = None
        self.reference_n: int | None = None

    @property
    def _label(self) -> str:
        return f"same_time, period {format_duration(self.period)}"

    def admit(self, window: Window, min_samples: int) -> str:
        """``ready``, ``empty``, ``few``, ``no earlier window`` or ``few earlier``. Every window
        is kept (summarised) for the one a period later, whatever its own verdict."""
        cols, n = _window_columns(window, None, self.names, self.with_score)
        earlier = self._store.get(window.end - self.period)
        self._store.put(
            window.end,
            WindowSummary(n, {name: _compact_column(col, self.size) for name, col in cols.items()}),
        )
        self.summary = None
        self.reference_end = self.reference_n = None
        if n == 0:
            return "empty"
        if earlier is None or earlier[1].n == 0:
            return "no earlier window"
        self.reference_end, self.reference_n = earlier[0], earlier[1].n
        if earlier[1].n < min_samples:
            return "few earlier"
        if n < min_samples:
            return "few"
        self.summary = self._summarise(earlier[1].columns)
        return "ready"

    def not_tested(
        self, status: str | None, n: int, threshold: float, min_samples: int
    ) -> Measurement | None:
        if status == "no earlier window":
            return Measurement.insufficient_data(
                threshold, n, f"no window one period earlier ({self._label})"
            )
        if status == "few earlier":
            return Measurement.insufficient_data(
                threshold,
                n,
                f"the window one period earlier has fewer than min_samples={min_samples} "
                f"predictions ({self._label})",
                reference_n=self.reference_n,
            )
        if status is None:
            return Measurement.insufficient_data(threshold, 0, "no window yet")
        if status == "empty":
            return Measurement.insufficient_data(threshold, 0, "no predictions in window")
        if status == "few":
            return Measurement.insufficient_data(
                threshold, n, f"fewer than min_samples={min_samples} predictions"
            )
        return None


# -- drift: reference summaries and tests ---------------------------------------------------------


class _Numeric(NamedTuple):
    values: np.ndarray  # sorted finite values
    prepared: Any  # what the numeric test precomputes (None for ks)


class _Categorical(NamedTuple):
    keys: tuple[Any, ...]
    counts: np.ndarray
    index: dict[Any, int]
    singletons: int  # categories seen once (Good–Turing)


class _Tested(NamedTuple):
    feature: str
    test: str
    statistic: float
    p_value: float
    effect: float
    n: int
    extra: dict[str, Any]


class _Pending(NamedTuple):
    feature: str
    statistic: float
    effect: float
    n: int
    parg: Any  # what the test's batched p-value function needs
    extra: dict[str, Any]


_Summary = dict[str, "_Numeric | _Categorical | None"]


def _categorical_reference(counts: Counter[Any]) -> _Categorical:
    keys = tuple(counts)
    arr = np.fromiter(counts.values(), dtype=float, count=len(keys))
    return _Categorical(
        keys, arr, {k: i for i, k in enumerate(keys)}, int(np.count_nonzero(arr == 1.0))
    )


def _prepare_numeric(values: np.ndarray, test: str, bins: int) -> Any:
    if test == "cvm":
        return cvm_reference(values)
    if test == "ad":
        return ad_reference(values)
    if test == "wasserstein":
        return wasserstein_reference(values)
    if test == "psi":
        return psi_reference(values, bins)
    return None


def _measure_numeric(
    test: str, xs: np.ndarray, ref: _Numeric
) -> tuple[float, float, Any, dict[str, Any]]:
    """``(statistic, effect, p-value input, extra evidence)`` of one numeric feature."""
    n, m = xs.shape[0], ref.values.shape[0]
    if test == "ks":
        d = ks_statistic_sorted(xs, ref.values)
        return d, d, (d, n, m), {}
    if test == "cvm":
        t = cvm_statistic(xs, ref.prepared)
        return t, math.sqrt(max(t, 0.0) * (n + m) / (n * m)), (t, n, m), {}
    if test == "ad":
        res = ad_statistic(xs, ref.prepared)
        if res is None:
            return 0.0, 0.0, None, {}
        a2, t = res
        return t, math.sqrt(max(a2, 0.0) * (n + m) / (n * m)), t, {}
    if test == "wasserstein":
        prep = ref.prepared
        w = wasserstein_statistic(xs, prep)
        p = wasserstein_pvalue(w, n, m, prep)
        return w, w / prep.scale, p, {"scale": prep.scale_kind}
    # psi
    prep = ref.prepared
    value, dof = psi(psi_bin_counts(xs, prep.edges), prep.counts)
    return value, value, (value * n * m / (n + m), dof), {}


def _measure_categorical(
    test: str, a: np.ndarray, b: np.ndarray
) -> tuple[float, float, Any]:
    """``(statistic, effect, p-value input)`` of one categorical feature: window counts ``a``
    and reference counts ``b`` over the union of categories."""
    n, m = float(a.sum()), float(b.sum())
    k = a.shape[0]
    if test == "chi2":
        stat, dof = chi2_2xk(a, b)
        return stat, cramers_v(stat, n + m, 2, k), (stat, dof)
    if test == "g":
        stat, dof = g_2xk(a, b)
        return stat, cramers_v(stat, n + m, 2, k), (stat, dof)
    if test == "js":
        d = js_distance(a, b)
        return d, d, (js_chi2_statistic(d, int(n), int(m)), k - 1)
    value, dof = psi(a, b)
    return value, value, (value * n * m / (n + m), dof)


def _pvalues(test: str, pargs: list[Any]) -> list[float]:
    """The p-values of one test's batch of features, in one vectorised call where possible."""
    if test in ("ks", "cvm"):
        stat, n, m = (np.array(col) for col in zip(*pargs))
        return (ks_pvalues_fast if test == "ks" else cvm_pvalues)(stat, n, m).tolist()
    if test == "ad":
        return [1.0 if t is None else ad_pvalue(t) for t in pargs]
    if test == "wasserstein":
        return [float(p) for p in pargs]
    # chi-square reference distribution: chi2, g, js, psi
    return chi2_pvalues(np.array([p[0] for p in pargs]), np.array([p[1] for p in pargs])).tolist()


def _parse_tests(test: str | Mapping[str, str]) -> tuple[str, str]:
    if isinstance(test, str):
        if test not in NUMERIC_TESTS and test not in CATEGORICAL_TESTS:
            raise ValueError(
                f"test must be a test name or {{numeric: ..., categorical: ...}}; numeric tests: "
                f"{', '.join(NUMERIC_TESTS)}; categorical tests: {', '.join(CATEGORICAL_TESTS)}; "
                f"got {test!r}"
            )
        return (
            test if test in NUMERIC_TESTS else "ks",
            test if test in CATEGORICAL_TESTS else "chi2",
        )
    if not isinstance(test, Mapping) or set(test) - {"numeric", "categorical"}:
        raise ValueError(
            f"test must be a test name or a mapping with keys numeric and categorical; got {test!r}"
        )
    numeric = test.get("numeric", "ks")
    categorical = test.get("categorical", "chi2")
    if numeric not in NUMERIC_TESTS:
        raise ValueError(f"test.numeric must be one of {', '.join(NUMERIC_TESTS)}; got {numeric!r}")
    if categorical not in CATEGORICAL_TESTS:
        raise ValueError(
            f"test.categorical must be one of {', '.join(CATEGORICAL_TESTS)}; got {categorical!r}"
        )
    return numeric, categorical


@register("drift")
class Drift:
    """Two-sample drift tests of each feature in the window against a reference sample.

    A feature's kind is decided from the reference. Numeric features (numbers; None, NaN and
    strings dropped) get ``test.numeric``: ``ks`` (default; effect D), ``cvm`` (effect: the
    root mean squared ECDF gap over the pooled sample), ``ad`` (k-sample Anderson–Darling
    with k = 2; effect: the same gap with AD's weight), ``wasserstein`` (effect: W1 over the
    reference's IQR) or ``psi`` (``bins`` reference-quantile bins; effect: PSI). Categorical
    ones (str/bool) get ``test.categorical``: ``chi2`` (default; Cramér's V), ``g`` (V from G),
    ``js`` (the JS distance in bits) or ``psi``. Every test reports a p-value (docs/detectors.md
    says how it is obtained for the distances). ``test`` is one name (applied to the kind(s)
    it exists for) or ``{numeric: ..., categorical: ...}``.

    The family's p-values are adjusted by ``correction`` (``holm``, ``bonferroni``, ``bh`` or
    ``none``) and a feature is *drifted* when its adjusted p-value is below ``alpha``.
    ``value`` (and ``effect_size``) is the largest effect among drifted features, 0.0 if none;
    ``p_value`` is the smallest adjusted p-value; ``sample_size`` is the window's prediction
    count. A rule with ``threshold`` and ``alpha`` thus needs both a large and a significant
    drift.

    Categories the reference lacks are, with ``unseen_categories``: ``ignore``d (still part of
    the test's table), reported in ``evidence`` (default: count and share per feature; their
    names only with ``report_values``), or tested as ``drift``: one more family member per
    categorical feature, test ``unseen``, a binomial test against Good–Turing's missing mass,
    effect the window's share of unseen values.

    The reference comes from ``baseline`` (see :class:`Baseline`): ``file`` (default when a
    :class:`Reference` is given), ``first_n`` (default otherwise; ``reference_size``),
    ``previous_version`` or ``rolling`` (``rolling_windows``). It is summarised once
    (sorted values, tie terms, integrals, bin edges, category counts) and reused by every
    window.

    ``baseline: same_time`` with ``period`` (``1d``, ``7d``, seconds) compares each window with
    the window that ended one period earlier (:class:`SameTime`), so a daily or weekly cycle is
    not drift; that window needs ``min_samples`` predictions too, and without it (the first
    period, a gap) there is no verdict. Each window is kept for a period as at most
    ``same_time_size`` evenly spaced order statistics per numeric feature (float32) and the
    counts per categorical one. The test is the same, with the kept values as the reference
    sample: its ECDF is within ``1/same_time_size`` of the earlier window's, and the p-value
    counts it as a sample of the kept size (conservative when the window held more).
    """

    # What a checkpoint keeps (daemon/snapshot.py): the moving state made in _reset (the
    # baseline's own declared state within it).
    STATE = ("_baseline", "_n", "_status", "_tested", "_untested")

    needs_reference = True

    def __init__(
        self,
        threshold: float,
        min_samples: int = 1,
        features: Sequence[str] | None = None,
        include_score: bool = False,
        test: str | Mapping[str, str] = "ks",
        bins: int = 10,
        unseen_categories: str = "evidence",
        report_values: bool = False,
        correction: str = "holm",
        alpha: float = 0.01,
        baseline: str | None = None,
        reference_size: int = 5000,
        rolling_windows: int = 10,
        max_evidence_features: int = 10,
        period: float | str | None = None,
        same_time_size: int = 1000,
        reference: Reference | None = None,
    ) -> None:
        numeric_test, categorical_test = _parse_tests(test)
        bounded = numeric_test in _BOUNDED_EFFECT and categorical_test in _BOUNDED_EFFECT
        if bounded and not 0.0 <= threshold <= 1.0:
            raise ValueError(
                "threshold must be in [0, 1] (an effect size of "
                f"{numeric_test}/{categorical_test}), got {threshold}"
            )
        if not (threshold >= 0.0 and math.isfinite(threshold)):
            raise ValueError(f"threshold must be >= 0 (an effect size), got {threshold}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        check_feature_names(features)
        if not isinstance(bins, int) or not 2 <= bins <= 1000:
            raise ValueError(f"bins must be an integer in [2, 1000], got {bins!r}")
        if unseen_categories not in UNSEEN_MODES:
            raise ValueError(
                f"unseen_categories must be one of {', '.join(UNSEEN_MODES)}; "
                f"got {unseen_categories!r}"
            )
        if correction not in CORRECTIONS:
            raise ValueError(
                f"correction must be one of {', '.join(CORRECTIONS)}; got {correction!r}"
            )
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if baseline is not None and baseline not in DRIFT_BASELINES:
            raise ValueError(
                f"baseline must be one of {', '.join(DRIFT_BASELINES)}; got {baseline!r}"
            )
        if reference_size < 1:
            raise ValueError(f"reference_size must be >= 1, got {reference_size}")
        if rolling_windows < 1:
            raise ValueError(f"rolling_windows must be >= 1, got {rolling_windows}")
        if max_evidence_features < 0:
            raise ValueError(f"max_evidence_features must be >= 0, got {max_evidence_features}")
        seconds = parse_period(period, baseline == "same_time", "baseline: same_time")
        if not (isinstance(same_time_size, int) and 2 <= same_time_size <= 1_000_000):
            raise ValueError(f"same_time_size must be an integer in [2, 1000000], got {same_time_size!r}")
        self.threshold = threshold
        self.min_samples = min_samples
        self.features = None if features is None else list(features)
        self.include_score = include_score
        self.test = test
        self.bins = bins
        self.unseen_categories = unseen_categories
        self.report_values = report_values
        self.correction = correction
        self.alpha = alpha
        self.baseline = baseline
        self.reference_size = reference_size
        self.rolling_windows = rolling_windows
        self.max_evidence_features = max_evidence_features
        self.period = period
        self.same_time_size = same_time_size
        self.reference = reference
        self._numeric_test = numeric_test
        self._categorical_test = categorical_test
        self._baseline: Baseline[_Summary] | SameTime[_Summary]
        if seconds is not None:
            self._baseline = SameTime(
                seconds,
                summarise=self._summarise,
                size=same_time_size,
                names=self.features,
                with_score=wants_score(include_score, self.features),
            )
        else:
            # A given reference is configuration, not moving state: Baseline summarises it once.
            self._baseline = Baseline(
                baseline or None,
                summarise=self._summarise,
                reference=reference,
                reference_size=reference_size,
                rolling_windows=rolling_windows,
                names=self.features,
                with_score=wants_score(include_score, self.features),
                build=PartialReference,
                # Everything _summarise reads besides the columns.
                summary_key=("drift", numeric_test, bins, None if features is None else tuple(features),
                             include_score),
            )
        self._reset()

    def _reset(self) -> None:
        self._baseline._reset()
        self._n: int | None = None
        self._status: str | None = None
        self._tested: list[_Tested] = []
        self._untested: list[str] = []

    # -- reference ---------------------------------------------------------------------------

    def _names(self, available: Iterable[str]) -> list[str]:
        if self.features is not None:
            names = list(dict.fromkeys(self.features))
        else:
            names = sorted(n for n in available if n != SCORE_COLUMN)
        if self.include_score and SCORE_COLUMN not in names:
            names.append(SCORE_COLUMN)
        return names

    def _summarise(self, columns: Mapping[str, Any]) -> _Summary:
        return {
            name: (self._reference_column(columns[name]) if name in columns else None)
            for name in self._names(columns)
        }

    def _reference_column(
        self, col: Sequence[Any] | np.ndarray | dict[Any, int] | None
    ) -> _Numeric | _Categorical | None:
        if col is None:  # a same_time window's column that held nothing usable
            return None
        if type(col) is Gathered:  # a first_n reference, gathered while it was built
            kind = col.kind
            if kind == "numeric":
                return self._numeric_reference(np.sort(col.numbers))
            return _categorical_reference(Counter(col.counts)) if kind == "categorical" else None
        if isinstance(col, dict):  # a same_time window's categorical column: its counts
            return _categorical_reference(Counter(col))
        kind = _column_kind(col)
        if kind == "numeric":
            return self._numeric_reference(np.sort(_numeric_values(col)))
        if kind == "categorical":
            return _categorical_reference(_category_counts(col))
        return None

    def _numeric_reference(self, values: np.ndarray) -> _Numeric | None:
        if values.shape[0] == 0:
            return None
        if self._numeric_test == "ks":
            # KS only counts reference values below and at the window's (searchsorted on the
            # values widened to float64, which is exact): a reference whose every value is a
            # float32 (integers below 2**24, halves, quarters...) is kept in half the bytes
            # with the same verdicts. The other tests do arithmetic on the values: float64.
            narrow = values.astype(np.float32)
            if np.array_equal(narrow, values):
                values = narrow
        return _Numeric(values, _prepare_numeric(values, self._numeric_test, self.bins))

    # -- windows -----------------------------------------------------------------------------

    def update(self, window: Window) -> None:
        self._n = window.n
        self._tested, self._untested = [], []
        state = self._baseline.admit(window, self.min_samples)
        self._status = "tested" if state == "ready" else state
        if state == "ready":
            self._test(window)

    def _test(self, window: Window) -> None:
        ref_summary = self._baseline.summary
        assert ref_summary is not None
        pending: dict[str, list[_Pending]] = {}
        untested: list[str] = []
        unseen_mode = self.unseen_categories
        for name, ref in ref_summary.items():
            if ref is None:
                untested.append(name)
                continue
            if isinstance(ref, _Numeric):
                col = window.scores if name == SCORE_COLUMN else window.feature(name)
                x = _numeric_values(col)
                if x.shape[0] == 0:
                    untested.append(name)
                    continue
                x.sort()
                test = self._numeric_test
                stat, effect, parg, extra = _measure_numeric(test, x, ref)
                pending.setdefault(test, []).append(
                    _Pending(name, stat, effect, int(x.shape[0]), parg, extra)
                )
                continue
            counts = _category_counts(window.feature(name))
            n_win = sum(counts.values())
            if n_win == 0:
                untested.append(name)
                continue
            index = ref.index
            new = [k for k in counts if k not in index]
            a = np.zeros(len(ref.keys) + len(new))
            for key, c in counts.items():
                i = index.get(key)
                if i is not None:
                    a[i] = c
            for j, key in enumerate(new):
                a[len(ref.keys) + j] = counts[key]
            b = np.concatenate([ref.counts, np.zeros(len(new))]) if new else ref.counts
            test = self._categorical_test
            stat, effect, parg = _measure_categorical(test, a, b)
            extra: dict[str, Any] = {}
            if unseen_mode != "ignore":
                n_unseen = int(sum(counts[k] for k in new))
                extra = {"unseen": len(new), "unseen_share": n_unseen / n_win}
                if self.report_values:
                    top = sorted(new, key=lambda k: (-counts[k], str(k)))[:5]
                    extra["unseen_values"] = [str(k) for k in top]
                if unseen_mode == "drift":
                    m_ref = int(ref.counts.sum())
                    p_unseen = unseen_pvalue(n_unseen, n_win, ref.singletons, m_ref)
                    pending.setdefault("unseen", []).append(
                        _Pending(name, float(n_unseen), n_unseen / n_win, n_win, p_unseen, {})
                    )
            pending.setdefault(test, []).append(_Pending(name, stat, effect, n_win, parg, extra))
        tested: list[_Tested] = []
        for test, items in pending.items():
            ps = (
                [float(it.parg) for it in items]
                if test == "unseen"
                else _pvalues(test, [it.parg for it in items])
            )
            tested.extend(
                _Tested(it.feature, test, it.statistic, p, it.effect, it.n, it.extra)
                for it, p in zip(items, ps)
            )
        self._tested = tested
        self._untested = untested

    def evaluate(self, now: float) -> Measurement:
        status, n = self._status, self._n or 0
        waiting = self._baseline.not_tested(status, n, self.threshold, self.min_samples)
        if waiting is not None:
            return waiting
        if not self._tested:
            return Measurement.insufficient_data(
                self.threshold, n, "no testable features", untested=list(self._untested)
            )
        tested = self._tested
        adjusted = adjust_pvalues([t.p_value for t in tested], self.correction).tolist()
        order = sorted(
            range(len(tested)), key=lambda i: (adjusted[i], tested[i].feature, tested[i].test)
        )
        drifted = [i for i in order if adjusted[i] < self.alpha]
        value = max((tested[i].effect for i in drifted), default=0.0)
        top = [
            {
                "feature": tested[i].feature,
                "test": tested[i].test,
                "statistic": tested[i].statistic,
                "p_value": tested[i].p_value,
                "p_adjusted": adjusted[i],
                "effect": tested[i].effect,
                "n": tested[i].n,
                **tested[i].extra,
            }
            for i in order[: self.max_evidence_features]
        ]
        evidence: dict[str, Any] = {
            "drifted": list(dict.fromkeys(tested[i].feature for i in drifted)),
            "tested": len(tested),
            "correction": self.correction,
            "untested": list(self._untested),
            "features": top,
        }
        if self._baseline.mode == "previous_version":
            evidence["reference_version"] = self._baseline.version
        elif isinstance(self._baseline, SameTime):
            evidence["reference_end"] = self._baseline.reference_end
            evidence["reference_n"] = self._baseline.reference_n
        return Measurement(
            value=value,
            threshold=self.threshold,
            sample_size=n,
            p_value=min(adjusted),
            effect_size=value,
            evidence=evidence,
        )
