"""Reference data for drift and data-quality detectors, read from a file of the user's.

Three formats, chosen by the file name (or ``format``):

- JSON Lines (``.jsonl``, ``.json``, ``.ndjson``, optionally gzipped; the default): prediction
  events of the event contract; their ``features`` and ``score``;
- CSV (``.csv``, ``.csv.gz``): a header row of feature names, one row per prediction; a cell
  that parses as a number is a float, ``true``/``false`` (any case) a bool, an empty cell is
  missing, anything else a category;
- Parquet (``.parquet``, ``.pq``): one column per feature (needs the optional ``pyarrow``,
  ``pip install 'rollbackd[parquet]'``); numeric columns become floats (nulls missing),
  booleans bools, strings categories.

In CSV and Parquet a column named ``__score__`` is the model's score. Columns are aligned: the
i-th value of every column belongs to the i-th prediction, ``None`` (or NaN in a float
column) where the feature was missing, so null rates can be read off the reference.
"""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np

from rollbackd.daemon.sources import RecordingSource
from rollbackd.detectors.base import Reference
from rollbackd.events import Prediction

__all__ = ["load_reference", "ReferenceFileError", "REFERENCE_FORMATS", "SCORE_COLUMN"]

SCORE_COLUMN = "__score__"
REFERENCE_FORMATS = ("auto", "jsonl", "csv", "parquet")


class ReferenceFileError(ValueError):
    """A reference file that cannot be read (or needs a package that is not installed)."""


def load_reference(path: str | Path, limit: int = 100_000, format: str = "auto") -> Reference:
    """The first ``limit`` predictions of a reference file, as aligned columns per feature."""
    if format not in REFERENCE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(REFERENCE_FORMATS)}; got {format!r}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    fmt = _format_of(Path(path)) if format == "auto" else format
    if fmt == "csv":
        columns = _read_csv(Path(path), limit)
    elif fmt == "parquet":
        columns = _read_parquet(Path(path), limit)
    else:
        columns = _read_jsonl(path, limit)
    # One reference file may serve a whole fleet: its detectors share what they make of it.
    return Reference(source=str(path), columns=columns, summaries={})


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".csv":
        return "csv"
    if last in (".parquet", ".pq"):
        return "parquet"
    return "jsonl"


def _read_jsonl(path: str | Path, limit: int) -> dict[str, Any]:
    feats: list[Any] = []
    scores: list[float | None] = []
    source = RecordingSource(str(path))
    try:
        while len(feats) < limit and (batch := source.read(10_000)) is not None:
            for ev in batch.events:
                if type(ev) is Prediction and len(feats) < limit:
                    feats.append(ev.features)
                    scores.append(ev.score)
    finally:
        source.close()
    if not feats:
        raise ReferenceFileError(f"reference file {path} holds no prediction events")
    names: dict[str, None] = {}
    for f in feats:
        names.update(dict.fromkeys(f))
    columns: dict[str, Any] = {name: [f.get(name) for f in feats] for name in names}
    if any(s is not None for s in scores):
        columns[SCORE_COLUMN] = scores
    return columns


_BOOLS = {"true": True, "false": False}


def _cell(text: str) -> Any:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return _BOOLS.get(text.strip().lower(), text)
    return None if math.isnan(value) else value


def _read_csv(path: Path, limit: int) -> dict[str, Any]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:  # type: ignore[operator]
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise ReferenceFileError(f"reference file {path} has no header row")
            if len(set(header)) != len(header) or any(h == "" for h in header):
                raise ReferenceFileError(
                    f"reference file {path}: the header must name every column once, got {header}"
                )
            rows = []
            for line_no, row in enumerate(reader, start=2):
                if len(rows) >= limit:
                    break
                if not row:
                    continue
                if len(row) != len(header):
                    raise ReferenceFileError(
                        f"reference file {path}, line {line_no}: {len(row)} cells, "
                        f"the header has {len(header)}"
                    )
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReferenceFileError(f"reference file {path}: {exc}") from exc
    if not rows:
        raise ReferenceFileError(f"reference file {path} holds no rows")
    columns: dict[str, Any] = {}
    for name, raw in zip(header, zip(*rows)):
        try:
            # All cells numbers or empty: one float array, NaN where missing.
            columns[name] = np.array([c if c != "" else "nan" for c in raw], dtype=float)
        except ValueError:
            columns[name] = [_cell(c) for c in raw]
    return columns


def _read_parquet(path: Path, limit: int) -> dict[str, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ReferenceFileError(
            f"reference file {path} is Parquet, which needs pyarrow: "
            "pip install 'rollbackd[parquet]'"
        ) from exc
    try:
        pf = pq.ParquetFile(path)
        batches = []
        n = 0
        for batch in pf.iter_batches(batch_size=min(limit, 65_536)):
            batches.append(batch.slice(0, limit - n))
            n += min(batch.num_rows, limit - n)
            if n >= limit:
                break
        table = pa.Table.from_batches(batches, schema=pf.schema_arrow)
    except (OSError, pa.ArrowException) as exc:
        raise ReferenceFileError(f"reference file {path}: {exc}") from exc
    if table.num_rows == 0:
        raise ReferenceFileError(f"reference file {path} holds no rows")
    columns: dict[str, Any] = {}
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        if pa.types.is_dictionary(t):
            col = col.cast(t.value_type)
            t = col.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            columns[name] = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        else:
            columns[name] = col.to_pylist()
    return columns

