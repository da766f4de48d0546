"""The decision log: one JSON object per line for every alert transition, incident change
and action, with its evidence. Keys are sorted and floats printed shortest-round-trip, so two
replays of the same recording with the same rules give byte-identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, Protocol

import msgspec

__all__ = ["DecisionSink", "DecisionLog", "MemoryDecisions", "NullDecisions", "encode_decision"]


def _enc_hook(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # numpy scalars
    if item is not None:
        return item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a decision")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook, order="sorted")


def encode_decision(rec: dict[str, Any]) -> bytes:
    return _encoder.encode(rec)


class DecisionSink(Protocol):
    def write(self, rec: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class DecisionLog:
    """Appends decisions to a JSON Lines file (or an open binary stream).

    ``append=True`` (the live daemon) keeps what the file holds; after a restart the daemon
    truncates it to the offset saved with its checkpoint, so no decision appears twice.
    """

    def __init__(self, target: str | Path | IO[bytes], append: bool = False) -> None:
        if isinstance(target, (str, Path)):
            self._fh: IO[bytes] = open(target, "ab" if append else "wb")
            self._owned = True
        else:
            self._fh, self._owned = target, False

    def write(self, rec: dict[str, Any]) -> None:
        self._fh.write(encode_decision(rec) + b"\n")

    def offset(self) -> int:
        self._fh.flush()
        return self._fh.tell()

    def truncate(self, offset: int) -> None:
        self._fh.flush()
        self._fh.truncate(offset)
        self._fh.seek(offset)

    def close(self) -> None:
        self._fh.flush()
        if self._owned:
            self._fh.close()


class MemoryDecisions:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(msgspec.json.decode(encode_decision(rec)))

    def close(self) -> None:
        pass


class NullDecisions:
    def write(self, rec: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
