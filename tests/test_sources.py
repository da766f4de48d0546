"""Recording sources (plain, gzip, streams, stdin), positions and resume, and dead-letter files."""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollbackd.daemon import sources
from rollbackd.daemon.deadletter import (
    DeadLetterSink,
    JsonlDeadLetter,
    NullDeadLetter,
    encode_dead_letter,
)
from rollbackd.daemon.sources import Batch, EventSource, NullSource, RecordingSource, open_source
from rollbackd.events import EventDecoder, Outcome, Prediction, Rejected


def outcome(i: int) -> bytes:
    return b'{"type":"outcome","id":"r-%d","ts":%d,"deployment":"d","label":%d}' % (i, 1795169702 + i, i % 2)


def prediction(i: int) -> bytes:
    return (
        b'{"type":"prediction","id":"r-%d","ts":"2026-11-20T10:15:02.114Z","deployment":"d",'
        b'"model_version":"14","features":{"amount":%d.5,"country":"DE"},"score":0.25}' % (i, i)
    )


def jsonl(lines: list[bytes], end: bytes = b"\n") -> bytes:
    return b"".join(line + end for line in lines)


class NonSeekable(io.RawIOBase):
    """A pipe-like stream: not seekable, and every read returns at most ``step`` bytes."""

    def __init__(self, data: bytes, step: int = 5) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def drain(src: EventSource, max_events: int = 1000) -> list[Batch]:
    batches = []
    while (batch := src.read(max_events)) is not None:
        batches.append(batch)
        assert len(batch.events) + len(batch.rejects) <= max_events
    assert src.read(max_events) is None  # stays exhausted
    return batches


def items(batches: list[Batch]) -> list[Any]:
    """Events and rejects of all batches, in input order (rejects sorted in by their offset)."""
    out: list[Any] = []
    for b in batches:
        out.extend(b.events)
        out.extend(b.rejects)
    return out


def ids(batches: list[Batch]) -> list[str]:
    return [e.id for b in batches for e in b.events]


MAKERS: dict[str, Callable[[Path, bytes], Any]] = {
    "plain": lambda p, data: (p.write_bytes(data), str(p))[1],
    "gzip": lambda p, data: (p.write_bytes(gzip.compress(data)), str(p))[1],
    "stream": lambda p, data: io.BytesIO(data),
    "gzip-stream": lambda p, data: io.BufferedReader(NonSeekable(gzip.compress(data), 7)),
    "pipe": lambda p, data: io.BufferedReader(NonSeekable(data, 7)),
}


@pytest.fixture(params=sorted(MAKERS))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., RecordingSource]:
    def _make(data: bytes, decoder: EventDecoder | None = None, start: Any = None) -> RecordingSource:
        return RecordingSource(MAKERS[request.param](tmp_path / "rec.jsonl", data), decoder, start)

    _make.kind = request.param  # type: ignore[attr-defined]
    return _make


# ---------------------------------------------------------------------------------------------
# The EventSource contract, on every kind of recording


def test_reads_every_event_in_order(make: Callable[..., RecordingSource]) -> None:
    lines = [prediction(i) if i % 3 else outcome(i) for i in range(250)]
    data = jsonl(lines)
    with make(data) as src:
        assert isinstance(src, EventSource)
        batches = drain(src, 64)
    assert ids(batches) == [f"r-{i}" for i in range(250)]
    assert all(not b.rejects for b in batches)
    assert batches[-1].position == {"offset": len(data), "line": 250}
    first, second = [e for b in batches for e in b.events][:2]
    assert isinstance(first, Outcome) and first.ts == 1795169702.0
    assert isinstance(second, Prediction) and second.ts == 1795169702.114


def test_positions_strictly_increase_and_batches_respect_the_size(
    make: Callable[..., RecordingSource],
) -> None:
    data = jsonl([outcome(i) if i % 4 else b"{bad" for i in range(100)])
    with make(data) as src:
        batches = drain(src, 7)
    offsets = [b.position["offset"] for b in batches]
    assert offsets == sorted(set(offsets))
    assert offsets[-1] == len(data)
    sizes = [len(b.events) + len(b.rejects) for b in batches]
    assert sum(sizes) == 100 and max(sizes) <= 7
    if make.kind in ("plain", "gzip", "stream"):  # type: ignore[attr-defined]
        assert sizes[:-1] == [7] * (len(sizes) - 1)  # a file fills every batch


def test_reject_positions_point_at_the_line(make: Callable[..., RecordingSource]) -> None:
    lines = [outcome(0), b"{bad", outcome(2), b'{"type":"outcome"}', b"[1]", outcome(5)]
    data = jsonl(lines)
    with make(data) as src:
        rejects = [r for b in drain(src, 2) for r in b.rejects]
    assert [(r.reason, r.position["line"]) for r in rejects] == [
        ("invalid_json", 2), ("missing_field", 4), ("wrong_type", 5),
    ]
    for r in rejects:
        assert data[r.position["offset"] :].startswith(r.raw + b"\n")


def test_blank_lines_are_skipped_not_rejected(make: Callable[..., RecordingSource]) -> None:
    data = b"\n" + outcome(0) + b"\n\n   \n\t\r\n" + outcome(1) + b"\n\n"
    with make(data) as src:
        batches = drain(src, 1)
    assert ids(batches) == ["r-0", "r-1"]
    assert not any(b.rejects for b in batches)
    assert batches[-1].position["offset"] <= len(data)


def test_crlf_lines(make: Callable[..., RecordingSource]) -> None:
    data = jsonl([outcome(0), b"{bad", outcome(2)], end=b"\r\n")
    with make(data) as src:
        batches = drain(src, 10)
    assert ids(batches) == ["r-0", "r-2"]
    [rej] = [r for b in batches for r in b.rejects]
    assert rej.raw == b"{bad"  # without the \r
    assert rej.position == {"offset": len(outcome(0)) + 2, "line": 2}
    assert batches[-1].position["offset"] == len(data)


def test_last_line_without_newline(make: Callable[..., RecordingSource]) -> None:
    data = outcome(0) + b"\n" + outcome(1)
    with make(data) as src:
        batches = drain(src, 10)
    assert ids(batches) == ["r-0", "r-1"]
    assert batches[-1].position == {"offset": len(data), "line": 2}


def test_utf8_byte_order_mark_is_ignored(make: Callable[..., RecordingSource]) -> None:
    data = b"\xef\xbb\xbf" + jsonl([outcome(0), b"{bad"])
    with make(data) as src:
        batches = drain(src)
    assert ids(batches) == ["r-0"]
    [rej] = [r for b in batches for r in b.rejects]
    assert rej.position == {"offset": 3 + len(outcome(0)) + 1, "line": 2}


def test_empty_input(make: Callable[..., RecordingSource]) -> None:
    with make(b"") as src:
        assert src.read(10) is None


def test_oversize_line_is_rejected_and_reading_goes_on(make: Callable[..., RecordingSource]) -> None:
    decoder = EventDecoder(max_event_bytes=500)
    huge = b'{"type":"outcome","id":"' + b"x" * 3_000_000 + b'"}'
    short_long = b'{"type":"outcome","id":"' + b"y" * 600 + b'"}'  # over the limit, in one chunk
    data = jsonl([outcome(0), huge, outcome(2), short_long, outcome(4)], end=b"\r\n")
    with make(data, decoder) as src:
        batches = drain(src, 2)
    assert ids(batches) == ["r-0", "r-2", "r-4"]
    rejects = [r for b in batches for r in b.rejects]
    assert [r.reason for r in rejects] == ["oversize", "oversize"]
    assert rejects[0].raw == huge[:4096]
    assert rejects[0].detail == f"{len(huge)} bytes > limit 500"
    assert rejects[0].position == {"offset": len(outcome(0)) + 2, "line": 2}
    assert rejects[1].raw == short_long
    assert rejects[1].detail == f"{len(short_long)} bytes > limit 500"
    assert rejects[1].position["line"] == 4
    assert batches[-1].position == {"offset": len(data), "line": 5}


def test_oversize_last_line_without_newline(make: Callable[..., RecordingSource]) -> None:
    decoder = EventDecoder(max_event_bytes=100)
    data = outcome(0) + b"\n" + b"z" * 2_500_000
    with make(data, decoder) as src:
        batches = drain(src)
    assert ids(batches) == ["r-0"]
    [rej] = [r for b in batches for r in b.rejects]
    assert (rej.reason, rej.detail, rej.raw) == ("oversize", "2500000 bytes > limit 100", b"z" * 4096)
    assert batches[-1].position == {"offset": len(data), "line": 2}


def test_an_enormous_line_is_never_held_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(outcome(0) + b"\n")
        for _ in range(48):
            f.write(b"x" * (1 << 20))
        f.write(b"\n" + outcome(1) + b"\n")
    tracemalloc.start()
    try:
        with RecordingSource(path) as src:
            batches = drain(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids(batches) == ["r-0", "r-1"]
    assert batches[0].rejects[0].reason == "oversize"
    assert peak < 8 << 20, peak  # a few 1 MiB chunks, not the 48 MiB line


def test_resume_from_every_position_returns_exactly_the_rest(
    make: Callable[..., RecordingSource],
) -> None:
    lines = [outcome(i) if i % 5 else b"{bad %d" % i for i in range(60)]
    lines.insert(30, b"")
    data = jsonl(lines)
    with make(data) as src:
        full = drain(src, 7)
    everything = items(full)
    seen = 0
    for batch in full:
        seen += len(batch.events) + len(batch.rejects)
        for start in (batch.position, {"offset": batch.position["offset"]}):
            with make(data, start=json.loads(json.dumps(start))) as again:
                assert items(drain(again, 7)) == everything[seen:]


def test_resume_past_the_end_is_exhausted(make: Callable[..., RecordingSource]) -> None:
    with make(jsonl([outcome(0)]), start={"offset": 10_000, "line": 1}) as src:
        assert src.read(5) is None


@pytest.mark.parametrize(
    "start", [{"offset": -1}, {"line": 3}, {"offset": "12"}, {"offset": 1.0}, 5, "x", {"offset": 1, "line": -2}]
)
def test_bad_start_positions_are_refused(start: Any) -> None:
    with pytest.raises(ValueError, match="start"):
        RecordingSource(io.BytesIO(b""), start=start)


def test_read_needs_a_positive_size_and_an_open_source() -> None:
    src = RecordingSource(io.BytesIO(jsonl([outcome(0)])))
    with pytest.raises(ValueError, match="max_events"):
        src.read(0)
    src.close()
    src.close()
    with pytest.raises(ValueError, match="closed"):
        src.read(1)


# ---------------------------------------------------------------------------------------------
# Gzip


def test_gzip_is_recognised_by_its_magic_bytes_not_its_name(tmp_path: Path) -> None:
    data = jsonl([outcome(i) for i in range(3)])
    disguised = tmp_path / "rec.jsonl"
    disguised.write_bytes(gzip.compress(data))
    plain = tmp_path / "rec.jsonl.gz"
    plain.write_bytes(data)
    for path, compressed in ((disguised, True), (plain, False)):
        with RecordingSource(path) as src:
            assert ids(drain(src)) == ["r-0", "r-1", "r-2"]
            assert src.compressed is compressed


def test_concatenated_gzip_members(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl([outcome(0)])) + gzip.compress(jsonl([outcome(1)])))
    with RecordingSource(path) as src:
        assert ids(drain(src)) == ["r-0", "r-1"]


def _read_damaged(compressed: bytes) -> tuple[list[str], list[Rejected]]:
    with RecordingSource(io.BytesIO(compressed)) as src:
        batches = drain(src, 100)
    return ids(batches), [r for b in batches for r in b.rejects]


def test_truncated_gzip_ends_cleanly_with_one_reject() -> None:
    # Decision: everything decompressed before the cut is delivered; the incomplete last line
    # (possibly empty) is rejected as invalid_json saying the stream was cut; then the source
    # is exhausted. Nothing raises, and the cut is never silent.
    lines = [prediction(i) for i in range(5000)]
    data = jsonl(lines)
    compressed = gzip.compress(data)
    for cut in (len(compressed) // 3, len(compressed) - 9, 12):
        got, rejects = _read_damaged(compressed[:cut])
        assert got == [f"r-{i}" for i in range(len(got))]
        [rej] = rejects
        assert rej.reason == "invalid_json" and "truncated" in rej.detail
        assert data[rej.position["offset"] :].startswith(rej.raw)
        assert rej.position["line"] == len(got) + 1
    assert len(_read_damaged(compressed[: len(compressed) // 3])[0]) > 100


def test_only_the_gzip_magic() -> None:
    got, [rej] = _read_damaged(b"\x1f\x8b")
    assert got == [] and rej.raw == b"" and rej.reason == "invalid_json"


def test_gzip_checksum_mismatch_is_reported_after_the_data() -> None:
    compressed = bytearray(gzip.compress(jsonl([outcome(0), outcome(1)])))
    compressed[-8] ^= 0xFF  # CRC32 in the trailer
    got, [rej] = _read_damaged(bytes(compressed))
    assert got == ["r-0", "r-1"]
    assert rej.raw == b"" and "CRC" in rej.detail


def test_corrupt_gzip_does_not_crash() -> None:
    compressed = bytearray(gzip.compress(jsonl([prediction(i) for i in range(3000)])))
    for i in range(len(compressed) // 2, len(compressed) // 2 + 64):
        compressed[i] ^= 0x5A
    got, rejects = _read_damaged(bytes(compressed))
    assert got[:10] == [f"r-{i}" for i in range(10)]
    assert "gzip" in rejects[-1].detail


def test_trailing_garbage_after_gzip() -> None:
    got, rejects = _read_damaged(gzip.compress(jsonl([outcome(0)])) + b"garbage")
    assert got == ["r-0"] and rejects[-1].reason == "invalid_json"


# ---------------------------------------------------------------------------------------------
# Standard input and live pipes


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl([outcome(0), outcome(1)])
    for payload in (data, gzip.compress(data)):
        for factory in (RecordingSource, open_source):
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(payload)))
            src = factory("-")
            assert ids(drain(src)) == ["r-0", "r-1"]
            src.close()
            assert not sys.stdin.buffer.closed  # not closed by a source that did not open it


def test_a_live_pipe_hands_out_what_has_arrived() -> None:
    r, w = os.pipe()
    reader = os.fdopen(r, "rb")
    writer = os.fdopen(w, "wb", buffering=0)
    src = RecordingSource(reader)
    got: list[Any] = []

    def read_once() -> None:
        got.append(src.read(1000))

    try:
        writer.write(jsonl([outcome(0), outcome(1)]) + outcome(2)[:10])
        t = threading.Thread(target=read_once)
        t.start()
        t.join(5)
        assert not t.is_alive(), "read waited for a full batch"
        assert [e.id for e in got[0].events] == ["r-0", "r-1"]
        writer.write(outcome(2)[10:] + b"\n")
        writer.close()
        assert ids(drain(src)) == ["r-2"]
    finally:
        if not writer.closed:
            writer.close()
        src.close()
        reader.close()


# ---------------------------------------------------------------------------------------------
# A model of the format, against every way of cutting the input into chunks and batches

LIMIT = 120
LINES = st.one_of(
    st.integers(0, 999).map(outcome),
    st.sampled_from([b"", b"   ", b"{bad", b"[]", b'{"type":"x"}', b"\xff\xfe"]),
    st.integers(LIMIT + 1, 700).map(lambda n: b"o" * n),
    st.integers(0, 20).map(lambda n: b'{"type":"outcome","id":"' + b"p" * n + b'","ts":1,"deployment":"d","label":1}'),
)


def model(data: bytes, limit: int) -> list[tuple]:
    """What a recording holds, computed the slow, obvious way."""
    decoder = EventDecoder(limit)
    offset = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    out: list[tuple] = []
    pieces = data[offset:].split(b"\n")
    for number, piece in enumerate(pieces, 1):
        start = offset
        offset += len(piece) + 1
        if number == len(pieces) and not piece:
            break
        line = piece[:-1] if piece.endswith(b"\r") else piece
        if not line.strip():
            continue
        got = decoder.decode(line, {"offset": start, "line": number})
        out.append(("reject", got.reason, got.raw, got.position) if isinstance(got, Rejected) else ("event", got))
    return out


def as_tuples(batches: list[Batch]) -> tuple[list[tuple], list[tuple]]:
    """(events, rejects) in input order, as the model writes them."""
    events = [("event", e) for b in batches for e in b.events]
    rejects = [("reject", r.reason, r.raw, r.position) for b in batches for r in b.rejects]
    return events, rejects


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(LINES, max_size=25),
    crlf=st.booleans(),
    final_newline=st.booleans(),
    bom=st.booleans(),
    kind=st.sampled_from(["plain", "gzip", "pipe"]),
    chunk=st.sampled_from([1, 2, 3, 7, 64, 4096]),
    max_events=st.integers(1, 6),
)
def test_matches_the_model(
    lines: list[bytes], crlf: bool, final_newline: bool, bom: bool, kind: str, chunk: int, max_events: int
) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines)
    if final_newline and lines:
        data += b"\n"
    expected = model(data, LIMIT)
    payload = gzip.compress(data) if kind == "gzip" else data

    def open_(start: Any = None) -> RecordingSource:
        stream = io.BufferedReader(NonSeekable(payload, chunk)) if kind == "pipe" else io.BytesIO(payload)
        return RecordingSource(stream, EventDecoder(LIMIT), start)

    with mock.patch.object(sources, "_CHUNK", chunk):
        with open_() as src:
            batches = drain(src, max_events)
        events, rejects = as_tuples(batches)
        assert events == [t for t in expected if t[0] == "event"]
        assert rejects == [t for t in expected if t[0] == "reject"]
        previous = 0
        for b in batches:  # each batch ends after its rejects and before the next batch's
            assert previous < b.position["offset"] <= len(data)
            assert all(previous <= r.position["offset"] < b.position["offset"] for r in b.rejects)
            previous = b.position["offset"]
        if len(batches) > 1:
            with open_(start=batches[0].position) as rest:
                assert as_tuples(drain(rest, max_events)) == as_tuples(batches[1:])


# ---------------------------------------------------------------------------------------------
# The factory and the null source


def test_open_source(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl([outcome(0)]))
    for spec in (str(path), f"file:{path}", f"file://{path}"):
        with open_source(spec) as src:
            assert isinstance(src, RecordingSource) and ids(drain(src)) == ["r-0"]
    null = open_source("null:")
    assert isinstance(null, NullSource) and isinstance(null, EventSource)
    assert null.read(10) is None
    null.commit({"offset": 1})
    null.close()
    with pytest.raises(ValueError, match="unsupported source"):
        open_source("kafka://broker:9092/events")
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "missing.jsonl"))


def test_open_source_passes_the_decoder(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl([outcome(0)]))
    with open_source(str(path), EventDecoder(max_event_bytes=10)) as src:
        [batch] = drain(src)
    assert batch.rejects[0].reason == "oversize"


def test_commit_is_a_no_op_for_recordings(tmp_path: Path) -> None:
    src = RecordingSource(io.BytesIO(jsonl([outcome(0), outcome(1)])))
    batch = src.read(1)
    src.commit(batch.position)
    assert ids([src.read(10)]) == ["r-1"]


# ---------------------------------------------------------------------------------------------
# Dead letters


def test_dead_letter_file(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    data = jsonl([outcome(0), b'{"b":1,"a":"\xc3\xa9"}', b"\xff{", outcome(3)])
    sink = JsonlDeadLetter(path)
    assert isinstance(sink, DeadLetterSink)
    with RecordingSource(io.BytesIO(data)) as src:
        for batch in drain(src):
            for rej in batch.rejects:
                sink.put(rej)
    assert sink.count == 2
    sink.close()
    sink.close()
    second = len(outcome(0)) + 1
    third = second + len(b'{"b":1,"a":"\xc3\xa9"}') + 1
    assert path.read_bytes() == (
        b'{"detail":"Object missing required field `type`","position":{"line":2,"offset":'
        + str(second).encode()
        + b'},"raw":"{\\"b\\":1,\\"a\\":\\"\xc3\xa9\\"}","reason":"missing_field"}\n'
        + b'{"detail":"JSON is malformed: invalid character (byte 0)","position":{"line":3,"offset":'
        + str(third).encode()
        + b'},"raw":"\\\\xff{","raw_encoding":"utf-8-backslashreplace","reason":"invalid_json"}\n'
    )
    for line in path.read_text("utf-8").splitlines():
        assert set(json.loads(line)) <= {"reason", "detail", "position", "raw", "raw_encoding"}


def test_dead_letter_file_appends_and_flushes(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    rej = Rejected("invalid_json", "x", b"{", {"offset": 0, "line": 1})
    with JsonlDeadLetter(path) as sink:
        sink.put(rej)
        sink.flush()
        assert path.read_bytes() == encode_dead_letter(rej)
    with JsonlDeadLetter(path) as sink:
        sink.put(rej)
    assert path.read_bytes() == encode_dead_letter(rej) * 2


def test_dead_letter_file_exists_even_when_nothing_was_rejected(tmp_path: Path) -> None:
    made, flushed, closed = tmp_path / "made.jsonl", tmp_path / "flushed.jsonl", tmp_path / "closed.jsonl"
    JsonlDeadLetter(made)
    assert not made.exists(), "making the sink opens nothing (a run that never starts leaves no file)"
    sink = JsonlDeadLetter(flushed)
    sink.flush()
    assert flushed.read_bytes() == b""
    sink.close()
    JsonlDeadLetter(closed).close()
    assert closed.read_bytes() == b""


def test_dead_letter_encoding_is_deterministic() -> None:
    a = Rejected("oversize", "9 bytes > limit 1", b"\x00\n\"", {"partition": 3, "offset": 7})
    assert encode_dead_letter(a) == encode_dead_letter(a._replace(position={"offset": 7, "partition": 3}))
    assert encode_dead_letter(a) == (
        b'{"detail":"9 bytes > limit 1","position":{"offset":7,"partition":3},'
        b'"raw":"\\u0000\\n\\"","reason":"oversize"}\n'
    )
    kafka = Rejected("invalid_json", "x", b"{", {0: 12, 1: 3})  # {partition: offset}
    assert json.loads(encode_dead_letter(kafka))["position"] == {"0": 12, "1": 3}


def test_null_dead_letter_counts() -> None:
    sink = NullDeadLetter()
    assert isinstance(sink, DeadLetterSink)
    sink.put(Rejected("invalid_json", "x", b"{"))
    sink.flush()
    sink.close()
    assert sink.count == 1
