"""Every evaluation as data: one record per detector evaluation, as JSON Lines or Parquet.

The decision log holds transitions only; ``--measurements-out FILE`` (replay, drill, run)
writes what each detector measured at every window boundary, whether or not anything changed:
the rule, the deployment × variant, the version and slice the window held, its span, the
value, p-value, threshold and sample size, and the verdict the alert state machine drew from
it (``rules.alerts.verdict``: the same function, so the file cannot disagree with the engine).

A :class:`MeasurementWriter` is a measurement tap (``Edges.tap``: the pipeline calls
``measure(now, rule, deployment, variant, measurement, window)`` after each evaluation) that
writes each record and hands the call on to another tap (``tee``, e.g. the report's
``MeasurementTap``). Records carry event time only, keys sorted and floats printed
shortest-round-trip (the decision log's encoder): the same replay writes the same bytes.

Writing never stops the engine: a failed write is logged (``measurements.write_failed``) and
counted, and the writer stops writing; the evaluations go on.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import msgspec
import structlog

from rollbackd.daemon.clock import iso
from rollbackd.detectors.base import Measurement
from rollbackd.rules.alerts import verdict
from rollbackd.rules.model import Config, RuleSpec

__all__ = [
    "FIELDS",
    "MeasurementTapLike",
    "MeasurementWriter",
    "ParquetUnavailable",
    "TrailingWindow",
    "check_measurements_path",
    "evaluation_record",
    "is_parquet",
    "LoadedMeasurements",
    "load_measurements",
    "open_measurements",
    "window_version",
]

log = structlog.get_logger("rollbackd")

# Every record has exactly these keys (in the file sorted, as the decision log's are).
FIELDS = (
    "ts", "rule", "detector", "deployment", "variant", "version", "slice", "share",
    "window_start", "window_end", "window_start_epoch", "window_end_epoch",
    "value", "threshold", "p_value", "effect_size", "sample_size",
    "verdict", "insufficient", "evidence",
)

VERDICTS = ("breach", "ok", "insufficient", "not_evaluated")


@runtime_checkable
class FollowsRules(Protocol):
    """A tap that keeps something of each rule: told when a reload changes them."""

    def rules_changed(self, config: Config) -> None: ...


class MeasurementTapLike(Protocol):
    """What the pipeline calls after each evaluation (``Edges.tap``)."""

    def measure(
        self, ts: float, rule: str, deployment: str, variant: str, measurement: Any, window: Any = None
    ) -> None: ...


class ParquetUnavailable(ValueError):
    """A ``.parquet`` measurements file was asked for and pyarrow is not installed."""


def is_parquet(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".parquet", ".pq")


def check_measurements_path(path: str | Path) -> None:
    """Raise :class:`ParquetUnavailable` (naming the extra) when ``path`` needs pyarrow and it
    cannot be imported: said at start-up, before any event is read."""
    if not is_parquet(path):
        return
    try:
        importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ParquetUnavailable(
            f"{path}: writing Parquet needs pyarrow, the 'parquet' extra: pip install 'rollbackd[parquet]' "
            "(or give a .jsonl file)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Records


def window_version(window: Any) -> str | None:
    """The version a window is judged as: the one the pipeline split it by (``Window.version``),
    else the version serving most of its predictions, a tie going to the greater name, as the
    pipeline picks a pane's running version; None for a window without predictions."""
    if window is None:
        return None
    if window.version is not None:
        return str(window.version)
    versions: Mapping[str, int] = window.versions if window.predictions else {}
    if not versions:
        return None
    return str(max(versions, key=lambda v: (versions[v], v)))


def _share(window: Any) -> str | None:
    if window is None:
        return None
    return "slice" if window.segment is not None else "version" if window.version is not None else None


def _insufficient(rule: RuleSpec, m: Measurement) -> str:
    """Why :func:`verdict` gave no verdict (its conditions, in its order)."""
    if m.insufficient:
        return m.insufficient
    if m.value is None:
        return "no value"
    if m.sample_size < rule.min_samples:
        return f"{m.sample_size} samples, fewer than min_samples {rule.min_samples}"
    return "value is not a number"


def evaluation_record(
    rule: RuleSpec, ts: float, deployment: str, variant: str, m: Measurement, window: Any
) -> dict[str, Any]:
    """One evaluation as a record of :data:`FIELDS`."""
    rec = m.to_record()  # non-finite numbers become null
    breaching = verdict(rule, m)
    start = window.start if window is not None else None
    end = window.end if window is not None else ts
    return {
        "ts": ts,
        "rule": rule.name,
        "detector": rule.detector,
        "deployment": deployment,
        "variant": variant,
        "version": window_version(window),
        "slice": None if window is None else window.segment,
        # "version" / "slice": the evaluation of one version's or one slice's share of the
        # window (daemon/splits.py); null: of the whole window.
        "share": _share(window),
        "window_start": None if start is None else iso(start),
        "window_end": iso(end),
        "window_start_epoch": start,
        "window_end_epoch": end,
        "value": rec.get("value"),
        "threshold": rec.get("threshold"),
        "p_value": rec.get("p_value"),
        "effect_size": rec.get("effect_size"),
        "sample_size": int(m.sample_size),
        "verdict": "insufficient" if breaching is None else "breach" if breaching else "ok",
        "insufficient": _insufficient(rule, m) if breaching is None else None,
        "evidence": dict(m.evidence) if m.evidence else {},
    }


@dataclass(frozen=True, slots=True)
class TrailingWindow:
    """A rule's window that a finite recording ended inside: it never closed, so it was not
    evaluated. ``start``/``end`` are the window's span as it would have closed; ``data_from``
    to ``data_until`` is the event time of the data no window of the rule evaluated."""

    rule: str
    detector: str
    deployment: str
    variant: str
    start: float
    end: float
    data_from: float
    data_until: float
    predictions: int
    labels: int

    def to_record(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "deployment": self.deployment, "variant": self.variant,
            "window_start": iso(self.start), "window_end": iso(self.end),
            "window_start_epoch": self.start, "window_end_epoch": self.end,
            "data_from": self.data_from, "data_until": self.data_until,
            "predictions": self.predictions, "labels": self.labels,
        }

    def measurement_record(self) -> dict[str, Any]:
        """The line of a measurements file that says this window was not evaluated."""
        return {
            "ts": self.data_until,
            "rule": self.rule,
            "detector": self.detector,
            "deployment": self.deployment,
            "variant": self.variant,
            "version": None,
            "slice": None,
            "share": None,
            "window_start": iso(self.start),
            "window_end": iso(self.end),
            "window_start_epoch": self.start,
            "window_end_epoch": self.end,
            "value": None,
            "threshold": None,
            "p_value": None,
            "effect_size": None,
            "sample_size": self.predictions,
            "verdict": "not_evaluated",
            "insufficient": (f"the recording ended at {iso(self.data_until)}, inside this window: "
                             f"{self.predictions} predictions and {self.labels} labels from "
                             f"{iso(self.data_from)} were not evaluated"),
            "evidence": {"data_from": self.data_from, "data_until": self.data_until,
                         "predictions": self.predictions, "labels": self.labels},
        }


# ---------------------------------------------------------------------------------------------
# Encoding


def _enc_hook(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if tolist is not None:
        return tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)  # evidence is for reading: a value JSON cannot hold is written as text


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook, order="sorted")


def encode_record(rec: Mapping[str, Any]) -> bytes:
    return _encoder.encode(rec)


class _Sink(Protocol):
    def write(self, rec: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _JsonLines:
    """JSON Lines through a bounded buffer (``buffer_size`` bytes; a full buffer is written)."""

    def __init__(self, path: Path, append: bool, buffer_size: int) -> None:
        self._fh: IO[bytes] = open(path, "ab" if append else "wb", buffering=buffer_size)

    def write(self, rec: dict[str, Any]) -> None:
        self._fh.write(encode_record(rec) + b"\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class _Parquet:
    """Flat columns, one row group per ``rows`` records; ``evidence`` as JSON text,
    ``window_start``/``window_end`` as UTC timestamps. Readable once closed (the footer)."""

    def __init__(self, path: Path, rows: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self.schema = pa.schema([
            ("ts", pa.float64()), ("rule", pa.string()), ("detector", pa.string()),
            ("deployment", pa.string()), ("variant", pa.string()), ("version", pa.string()),
            ("slice", pa.string()), ("share", pa.string()),
            ("window_start", pa.timestamp("us", tz="UTC")), ("window_end", pa.timestamp("us", tz="UTC")),
            ("window_start_epoch", pa.float64()), ("window_end_epoch", pa.float64()),
            ("value", pa.float64()), ("threshold", pa.float64()), ("p_value", pa.float64()),
            ("effect_size", pa.float64()), ("sample_size", pa.int64()),
            ("verdict", pa.string()), ("insufficient", pa.string()), ("evidence", pa.string()),
        ])
        self.rows = rows
        self._buffer: list[dict[str, Any]] = []
        self._writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, rec: dict[str, Any]) -> None:
        self._buffer.append(rec)
        if len(self._buffer) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        for rec in rows:
            for name in self.schema.names:
                value = rec.get(name)
                if name in ("window_start", "window_end"):
                    epoch = rec.get(f"{name}_epoch")
                    value = None if epoch is None else round(epoch * 1_000_000)
                elif name == "evidence":
                    value = encode_record(value or {}).decode()
                columns[name].append(value)
        arrays = [self._pa.array(columns[f.name], type=f.type) for f in self.schema]
        self._writer.write_table(self._pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._writer.close()


# ---------------------------------------------------------------------------------------------
# The writer


class MeasurementWriter:
    """A measurement tap that writes every evaluation to a file and passes it on to ``tee``.

    Runs on the processing thread. ``flush_every`` (event-time seconds; None: only when the
    buffer fills and at close) lets a live daemon's file follow its evaluations. A write
    that fails is logged and counted (``errors``); the writer stops (``stopped``) and the
    daemon goes on. ``written`` counts the records written (``not_evaluated`` ones included),
    ``evaluations`` the evaluations seen.
    """

    def __init__(
        self,
        sink: _Sink,
        config: Config,
        *,
        path: str | Path = "",
        tee: MeasurementTapLike | None = None,
        flush_every: float | None = None,
    ) -> None:
        self._sink = sink
        self.path = str(path)
        self.tee = tee
        self.flush_every = flush_every
        self._rules = {r.name: r for r in config.rules}
        self._flushed_at = -math.inf
        self.evaluations = 0
        self.written = 0
        self.errors = 0
        self.stopped = False
        self.closed = False

    def measure(
        self, ts: float, rule: str, deployment: str, variant: str, measurement: Any, window: Any = None
    ) -> None:
        if self.tee is not None:
            self.tee.measure(ts, rule, deployment, variant, measurement, window)
        self.evaluations += 1
        spec = self._rules.get(rule)
        if self.stopped or spec is None or not isinstance(measurement, Measurement):
            return
        self._write(evaluation_record(spec, ts, deployment, variant, measurement, window))
        if self.flush_every is not None and not self.stopped and ts >= self._flushed_at + self.flush_every:
            self._flushed_at = ts
            self._guarded(self._sink.flush)

    def rules_changed(self, config: Config) -> None:
        """The rules were reloaded: records of a new or changed rule carry its new definition."""
        self._rules = {r.name: r for r in config.rules}
        if isinstance(self.tee, FollowsRules):
            self.tee.rules_changed(config)

    def not_evaluated(self, windows: Iterable[TrailingWindow]) -> None:
        """One ``not_evaluated`` line per trailing window a replay ended inside."""
        for w in windows:
            if self.stopped:
                return
            self._write(w.measurement_record())

    def _write(self, rec: dict[str, Any]) -> None:
        if self._guarded(lambda: self._sink.write(rec)):
            self.written += 1

    def _guarded(self, call: Any) -> bool:
        try:
            call()
        except (OSError, ValueError) as exc:  # a full disk, a closed file: the engine goes on
            self.errors += 1
            self.stopped = True
            log.error("measurements.write_failed", path=self.path, error=f"{type(exc).__name__}: {exc}",
                      written=self.written)
            try:
                self._sink.close()
            except (OSError, ValueError):
                pass
            return False
        return True

    def close(self) -> None:
        """Write what is buffered and close the file (once; a failure is logged and counted)."""
        if self.closed:
            return
        self.closed = True
        if not self.stopped:
            self._guarded(self._sink.close)


def open_measurements(
    path: str | Path,
    config: Config,
    *,
    tee: MeasurementTapLike | None = None,
    append: bool = False,
    flush_every: float | None = None,
    buffer_size: int = 1 << 16,
    parquet_rows: int = 8192,
) -> MeasurementWriter:
    """A writer to ``path``: Parquet for ``.parquet``/``.pq`` (raises :class:`ParquetUnavailable`
    without pyarrow), else JSON Lines (``append``: kept, written after). Raises ``OSError``
    when the file cannot be opened."""
    p = Path(path)
    check_measurements_path(p)
    if is_parquet(p):
        if append:
            raise ValueError(f"{path}: a Parquet file cannot be appended to; give a .jsonl file")
        sink: _Sink = _Parquet(p, parquet_rows)
    else:
        sink = _JsonLines(p, append, buffer_size)
    return MeasurementWriter(sink, config, path=p, tee=tee, flush_every=flush_every)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class LoadedMeasurements:
    records: list[dict[str, Any]]
    skipped: int = 0  # lines that were not a measurement record


def load_measurements(path: str | Path) -> LoadedMeasurements:
    """A measurements file (JSON Lines or Parquet) as records; lines that are not a record of
    :data:`FIELDS` (malformed JSON, a missing key) are skipped and counted. Raises ``OSError``
    for a file that cannot be read, :class:`ParquetUnavailable` for Parquet without pyarrow,
    ``ValueError`` for a Parquet file pyarrow cannot read."""
    if is_parquet(path):
        return LoadedMeasurements(list(_read_parquet(Path(path))))
    out: list[dict[str, Any]] = []
    skipped = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(rec, dict) or not _well_formed(rec):
                skipped += 1
                continue
            out.append(rec)
    return LoadedMeasurements(out, skipped)


def _well_formed(rec: Mapping[str, Any]) -> bool:
    if not all(k in rec for k in ("ts", "rule", "deployment", "variant", "verdict")):
        return False
    if not isinstance(rec["ts"], (int, float)) or rec["verdict"] not in VERDICTS:
        return False
    return all(rec.get(k) is None or isinstance(rec[k], (int, float)) for k in ("value", "threshold"))


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    check_measurements_path(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:
        raise ValueError(f"{path}: {exc}") from None
    names = table.column_names
    cols: dict[str, Sequence[Any]] = {}
    for name in names:
        if name in ("window_start", "window_end"):
            continue  # the epoch columns say the same; the text form is made below
        cols[name] = table.column(name).to_pylist()
    for i in range(table.num_rows):
        rec = {name: cols[name][i] for name in cols}
        for edge in ("window_start", "window_end"):
            epoch = rec.get(f"{edge}_epoch")
            rec[edge] = None if epoch is None else iso(epoch)
        try:
            rec["evidence"] = json.loads(rec.get("evidence") or "{}")
        except ValueError:
            rec["evidence"] = {}
        yield rec
