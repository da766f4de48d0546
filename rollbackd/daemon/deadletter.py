"""Where rejected inputs are kept: the contract promises bad events are never dropped silently.

A dead-letter record is ``Rejected.to_record()``: ``{"reason", "detail", "position", "raw"}`` plus
``"raw_encoding"`` when the raw bytes were not valid UTF-8. Keys are sorted and separators fixed, so
a replay writes the same file byte for byte.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, runtime_checkable

from rollbackd.events import Rejected

__all__ = ["DeadLetterSink", "JsonlDeadLetter", "NullDeadLetter", "encode_dead_letter"]


@runtime_checkable
class DeadLetterSink(Protocol):
    """Keeps rejected inputs. ``count`` is how many were put since the sink was made."""

    count: int

    def put(self, rejected: Rejected) -> None: ...

    def flush(self) -> None:
        """Hands everything put so far to the OS; the engine calls it before committing a position."""
        ...

    def close(self) -> None: ...


def encode_dead_letter(rejected: Rejected) -> bytes:
    """One dead-letter record as a JSON line (with the trailing newline)."""
    return (
        json.dumps(rejected.to_record(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        + "\n"
    ).encode("utf-8")


class JsonlDeadLetter:
    """Appends one JSON object per rejected input to a file.

    The file is opened by the first ``put`` or ``flush``, whichever comes first, and ``close``
    creates it if neither did: after a run it exists, empty when nothing was rejected, so a
    script can always read it. Making the sink opens nothing, so a run that fails before it
    starts (a missing recording) leaves no stray file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.count = 0
        self._file: Any = None

    def _open(self) -> Any:
        if self._file is None:
            self._file = open(self.path, "ab")
        return self._file

    def put(self, rejected: Rejected) -> None:
        self._open().write(encode_dead_letter(rejected))
        self.count += 1

    def flush(self) -> None:
        self._open().flush()

    def close(self) -> None:
        f = self._open()
        if not f.closed:
            f.flush()
            f.close()

    def __enter__(self) -> JsonlDeadLetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullDeadLetter:
    """Counts rejected inputs and keeps none: the choice when no dead-letter file is configured."""

    def __init__(self) -> None:
        self.count = 0

    def put(self, rejected: Rejected) -> None:
        self.count += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
