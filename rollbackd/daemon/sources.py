"""Where events come from: one small protocol, a recording (file or stdin) source, a null source.

A source hands out batches (:class:`Batch`) of decoded events plus the inputs that broke the contract,
each batch ending at an opaque, JSON-able position from which a later run can resume. The engine
calls ``commit(position)`` once everything before that position is processed; for a recording
that is a no-op, for Kafka it commits offsets.
"""

from __future__ import annotations

import gzip
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Protocol, runtime_checkable

from rollbackd.events import Event, EventDecoder, Rejected

__all__ = [
    "Batch",
    "EventSource",
    "RecordingSource",
    "NullSource",
    "open_source",
]

_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20
_RAW_PREFIX = 4096


@dataclass(frozen=True, slots=True)
class Batch:
    """What one ``read`` returned.

    ``events`` are decoded and in input order; ``rejects`` carry their own ``position``;
    ``position`` is where the next read resumes (opaque and JSON-able: store it, pass it back as
    a source's ``start``).
    """

    events: list[Event]
    rejects: list[Rejected]
    position: Any
    # A partitioned source (Kafka) also hands out ``events`` split by partition number, in order
    # within each: the live daemon keeps one pipeline (task) per partition, as Kafka Streams does.
    parts: dict[int, list[Event]] | None = None


@runtime_checkable
class EventSource(Protocol):
    """A stream of contract-v1 events."""

    def read(self, max_events: int) -> Batch | None:
        """At most ``max_events`` inputs (events and rejects together).

        ``None`` means exhausted (finite sources only); a live source returns an empty batch when
        nothing is available.
        """
        ...

    def commit(self, position: Any) -> None:
        """Everything before ``position`` (a ``Batch.position``) has been processed."""
        ...

    def close(self) -> None: ...


class NullSource:
    """A source with nothing in it: the choice when no input is configured."""

    def read(self, max_events: int) -> Batch | None:
        return None

    def commit(self, position: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Prefixed:
    """A non-seekable stream with the bytes already read to sniff its format put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream
        self._read = getattr(stream, "read1", stream.read)
        self.name = getattr(stream, "name", "")

    def read(self, size: int = -1) -> bytes:
        if self._head:
            head, self._head = self._head, b""
            return head
        # A short read is allowed and keeps a live pipe from waiting for a full buffer.
        return self._read(size)

    read1 = read


@dataclass(slots=True)
class _Skip:
    """An over-long line being discarded without holding it in memory."""

    offset: int
    line: int
    prefix: bytes
    length: int
    last: bytes


class RecordingSource:
    """Events from a JSON Lines recording: a file (plain or gzip), a binary stream, or stdin.

    Gzip is recognised by its magic bytes, whatever the file is called. Blank lines are skipped,
    a trailing ``\\r`` is dropped, a UTF-8 byte order mark at the start is ignored. A line longer
    than the decoder's ``max_event_bytes`` is rejected as ``oversize`` without being held in
    memory. A gzip stream that is cut short or corrupt ends the source cleanly after one
    ``invalid_json`` reject carrying the incomplete last line (possibly empty).

    Positions are ``{"offset": int, "line": int}``: the byte offset of the next line in the
    decompressed stream and the number of lines before it. ``start`` takes such a position (a
    ``"line"`` may be left out; it is then recounted) and resumes there. A position past the end
    leaves the source exhausted.

    Standard input (``"-"``) and other non-seekable streams are read as data arrives: a read
    blocks until some is there, then returns what has come rather than waiting for a full batch.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | BinaryIO,
        decoder: EventDecoder | None = None,
        start: Any = None,
    ) -> None:
        self._decoder = decoder if decoder is not None else EventDecoder()
        self._start_offset, self._start_line = _parse_start(start)
        self._owned: BinaryIO | None = None
        if isinstance(path, (str, os.PathLike)):
            if os.fspath(path) == "-":
                if sys.stdin is None:
                    raise ValueError("standard input is not available")
                self._raw: BinaryIO = sys.stdin.buffer
                self.name = "<stdin>"
            else:
                self._raw = self._owned = open(path, "rb")
                self.name = os.fspath(path)
        else:
            self._raw = path
            self.name = str(getattr(path, "name", "<stream>"))
        self.compressed: bool | None = None  # known after the first read
        self._stream: Any = None
        self._read_chunk: Callable[[int], bytes] = self._raw.read
        self._gzip: gzip.GzipFile | None = None
        self._live = False
        self._closed = False
        self._ended = False  # no more bytes will come
        self._truncation: str | None = None
        self._lines: list[bytes] = []
        self._i = 0
        self._cr = False
        self._unterminated = False
        self._tail = b""
        self._first = b""  # read to sniff the format, not yet split
        self._skip: _Skip | None = None
        self._pending: Rejected | None = None
        self._pending_next: tuple[int, int] = (0, 0)
        self._offset = 0
        self._line = 0

    @property
    def position(self) -> dict[str, int]:
        """Where the next read resumes."""
        return {"offset": self._offset, "line": self._line}

    def read(self, max_events: int) -> Batch | None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        if self._closed:
            raise ValueError("read from a closed source")
        if self._stream is None:
            self._open()
        events: list[Event] = []
        rejects: list[Rejected] = []
        n = 0
        decode_lines = self._decoder.decode_lines
        while n < max_events:
            if self._pending is not None:
                rejects.append(self._pending)
                self._offset, self._line = self._pending_next
                self._pending = None
                n += 1
                continue
            lines = self._lines
            i = self._i
            if i >= len(lines):
                if n and self._live:
                    break
                if not self._fill():
                    break
                continue
            segment = lines[i : i + max_events - n]
            self._i = i + len(segment)
            # The common case (no \r, no reject) runs as C loops: map, the type scan, extend.
            texts = [t[:-1] if t[-1:] == b"\r" else t for t in segment] if self._cr else segment
            decoded = decode_lines(texts)
            blanks = 0
            if Rejected in map(type, decoded):
                blanks = self._sort_out(decoded, segment, texts, events, rejects)
            else:
                events.extend(decoded)
            self._offset += sum(map(len, segment)) + len(segment)
            self._line += len(segment)
            if self._unterminated and self._i == len(lines):
                self._offset -= 1
            n += len(segment) - blanks
        if not n and self._ended and self._i >= len(self._lines) and self._pending is None:
            return None
        return Batch(events, rejects, self.position)

    def _sort_out(
        self,
        decoded: list[Any],
        segment: list[bytes],
        texts: list[bytes],
        events: list[Event],
        rejects: list[Rejected],
    ) -> int:
        """Splits a segment with rejects into events and positioned rejects; returns blanks."""
        blanks = 0
        offset = self._offset
        for k, ev in enumerate(decoded):
            start = offset
            offset += len(segment[k]) + 1
            if ev.__class__ is not Rejected:
                events.append(ev)
            elif not texts[k].strip():
                blanks += 1
            else:
                position = {"offset": start, "line": self._line + k + 1}
                rejects.append(Rejected(ev.reason, ev.detail, ev.raw, position))
        return blanks

    def commit(self, position: Any) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gzip is not None:
            self._gzip.close()
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> RecordingSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        raw = self._raw
        seekable = _seekable(raw)
        self._live = not seekable
        head = _read_exact(raw, 2)
        stream: Any
        if seekable:
            raw.seek(-len(head), os.SEEK_CUR)
            stream = raw
        else:
            stream = _Prefixed(head, raw)
        self.compressed = head == _GZIP_MAGIC
        if self.compressed:
            stream = self._gzip = gzip.GzipFile(fileobj=stream, mode="rb")
        self._stream = stream
        self._read_chunk = getattr(stream, "read1", stream.read)
        if self._start_offset:
            self._seek_start(seekable and not self.compressed)
        else:
            first = self._next_chunk()
            while len(first) < len(_UTF8_BOM) and not self._ended:
                first += self._next_chunk()
            if first.startswith(_UTF8_BOM):
                first = first[len(_UTF8_BOM) :]
                self._offset = len(_UTF8_BOM)
            self._first = first

    def _seek_start(self, can_seek: bool) -> None:
        target = self._start_offset
        if can_seek and self._start_line is not None:
            base = self._stream.tell()
            end = self._stream.seek(0, os.SEEK_END)
            self._stream.seek(base + min(target, end - base))
            self._offset = min(target, end - base)
            self._line = self._start_line
            return
        lines = 0
        while self._offset < target:
            chunk = self._next_chunk(min(_CHUNK, target - self._offset))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            self._offset += len(chunk)
        self._line = self._start_line if self._start_line is not None else lines

    def _next_chunk(self, size: int = 0) -> bytes:
        if self._ended:
            return b""
        try:
            chunk = self._read_chunk(size or _CHUNK)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            self._truncation = f"{type(exc).__name__}: {exc}"
            chunk = b""
        if not chunk:
            self._ended = True
        return chunk

    def _fill(self) -> bool:
        """Loads the next complete lines (or one pending reject); False when nothing is left.

        Called only once every earlier line is consumed, so ``self._offset`` is where
        ``self._tail`` starts.
        """
        limit = self._decoder.max_event_bytes + 1  # a line of exactly the limit may end in \r
        self._lines = []
        self._i = 0
        while True:
            if self._first:
                chunk, self._first = self._first, b""
            else:
                chunk = self._next_chunk()
            skip = self._skip
            if skip is not None:
                nl = chunk.find(b"\n")
                if len(skip.prefix) < _RAW_PREFIX:
                    skip.prefix += chunk[: min(_RAW_PREFIX - len(skip.prefix), len(chunk) if nl < 0 else nl)]
                if chunk and nl < 0:
                    skip.length += len(chunk)
                    skip.last = chunk[-1:]
                    continue
                self._skip = None
                if nl < 0:  # the stream ended inside the line
                    length, consumed = skip.length - (skip.last == b"\r"), skip.length
                else:
                    last = chunk[nl - 1 : nl] if nl else skip.last
                    length = skip.length + nl - (last == b"\r")
                    consumed = skip.length + nl + 1
                    chunk = chunk[nl + 1 :]
                self._pending = Rejected(
                    "oversize",
                    f"{length} bytes > limit {self._decoder.max_event_bytes}",
                    skip.prefix[:length],  # without a \r that ended a short line
                    {"offset": skip.offset, "line": skip.line},
                )
                self._pending_next = (skip.offset + consumed, skip.line)
                self._tail = b""
                if chunk:
                    self._split(chunk, skip.offset + consumed, skip.line, limit)
                return True
            if not chunk:
                tail, self._tail = self._tail, b""
                if self._truncation is not None:
                    self._pending = Rejected(
                        "invalid_json",
                        f"input ends inside a line: truncated or corrupt gzip stream ({self._truncation})",
                        tail,
                        {"offset": self._offset, "line": self._line + 1},
                    )
                    self._pending_next = (self._offset + len(tail), self._line + (1 if tail else 0))
                    self._truncation = None
                    return True
                if tail:
                    self._lines = [tail]
                    self._unterminated = True
                    self._cr = tail.endswith(b"\r")
                    return True
                return False
            data = self._tail + chunk if self._tail else chunk
            if self._split(data, self._offset, self._line, limit):
                return True

    def _split(self, data: bytes, offset: int, line: int, limit: int) -> bool:
        """Splits ``data`` (which starts at ``offset``) into complete lines and a tail."""
        lines = data.split(b"\n")
        tail = lines.pop()
        if len(tail) > limit:
            start = offset + len(data) - len(tail)
            self._skip = _Skip(start, line + len(lines) + 1, tail[:_RAW_PREFIX], len(tail), tail[-1:])
            tail = b""
        self._tail = tail
        if not lines:
            return False
        self._lines = lines
        self._i = 0
        self._cr = b"\r" in data
        return True


def _parse_start(start: Any) -> tuple[int, int | None]:
    if start is None:
        return 0, None
    offset = start.get("offset") if isinstance(start, dict) else None
    line = start.get("line") if isinstance(start, dict) else None
    if type(offset) is not int or offset < 0 or not (line is None or (type(line) is int and line >= 0)):
        raise ValueError(
            f"start must be a recording position {{'offset': int >= 0, 'line': int >= 0}}, got {start!r}"
        )
    return offset, line


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _read_exact(stream: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def open_source(spec: str, decoder: EventDecoder | None = None) -> EventSource:
    """The source a spec names: ``-`` for stdin, ``null:`` for none, else a recording path.

    ``file:PATH`` also names a recording.
    """
    if spec == "-":
        return RecordingSource("-", decoder)
    if spec == "null:":
        return NullSource()
    if spec.startswith("file://"):
        return RecordingSource(spec[len("file://") :], decoder)
    if spec.startswith("file:"):
        return RecordingSource(spec[len("file:") :], decoder)
    scheme, sep, _ = spec.partition("://")
    if sep and scheme.isidentifier():
        raise ValueError(
            f"unsupported source {spec!r}: expected a recording path, file:PATH, '-' (stdin) or 'null:'"
        )
    return RecordingSource(spec, decoder)
