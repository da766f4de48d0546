"""Reference data for drift detectors, read from a file of the user's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rollbackd.daemon.sources import RecordingSource
from rollbackd.detectors.base import Reference
from rollbackd.events import Prediction

__all__ = ["load_reference"]


def load_reference(path: str | Path, limit: int = 100_000) -> Reference:
    """Raw feature values (and ``__score__``) of the prediction events in a JSONL file."""
    columns: dict[str, list[Any]] = {}
    source = RecordingSource(str(path))
    n = 0
    try:
        while n < limit and (batch := source.read(10_000)) is not None:
            for ev in batch.events:
                if type(ev) is not Prediction or n >= limit:
                    continue
                for name, value in ev.features.items():
                    columns.setdefault(name, []).append(value)
                if ev.score is not None:
                    columns.setdefault("__score__", []).append(ev.score)
                n += 1
    finally:
        source.close()
    if n == 0:
        raise ValueError(f"reference file {path} holds no prediction events")
    return Reference(source=str(path), columns=columns)
