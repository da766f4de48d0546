"""The decoder against hostile input: it never raises, and each bound rejects with its reason.

Issue 12: a value nested 1,000 deep in an unknown field raised RecursionError (and `replay`
exited with a traceback; on Kafka the daemon would crash on that message after every restart),
and ``"ts":"9999-12-31T23:59:60Z"`` raised OverflowError.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollbackd.events import (
    MAX_ATTRS,
    MAX_DEPTH,
    MAX_FEATURES,
    MAX_NAME_LENGTH,
    REJECT_REASONS,
    TS_MAX,
    TS_MIN,
    Deploy,
    EventDecoder,
    Outcome,
    Prediction,
    Rejected,
)

DECODER = EventDecoder()
OUTCOME = b'{"type":"outcome","id":"r","ts":1795169702,"deployment":"d","label":1}'


def outcome(ts: bytes = b"1795169702", extra: bytes = b"") -> bytes:
    return b'{"type":"outcome","id":"r","ts":' + ts + b',"deployment":"d","label":1' + extra + b"}"


def reason(raw: bytes) -> str | None:
    """The reject reason of ``raw`` (None if it decodes), the same through both entry points."""
    one = DECODER.decode(raw)
    assert DECODER.decode_lines([raw]) == [one]
    assert DECODER.decode_lines([OUTCOME, raw, OUTCOME]) == [DECODER.decode(OUTCOME), one, DECODER.decode(OUTCOME)]
    return one.reason if type(one) is Rejected else None


def nested(depth: int, kind: str = "[") -> bytes:
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


# ---------------------------------------------------------------------------------------------
# The cases of the issue, exactly


@pytest.mark.parametrize("kind", ["[", "{"])
def test_1000_deep_unknown_field_is_too_deep(kind: str) -> None:
    raw = outcome(extra=b',"x":' + nested(1000, kind))
    assert len(raw) < 8000  # about 2 KB as arrays, 6 KB as objects
    rej = DECODER.decode(raw, {"line": 7})
    assert type(rej) is Rejected
    assert (rej.reason, rej.position, rej.raw) == ("too_deep", {"line": 7}, raw)
    assert str(MAX_DEPTH) in rej.detail
    assert reason(raw) == "too_deep"


def test_deep_value_before_the_type_tag() -> None:
    # msgspec looks ahead for the tag, skipping (recursively) what comes before it.
    raw = b'{"x":' + nested(100_000) + OUTCOME[1:]
    assert reason(raw) == "too_deep"


@pytest.mark.parametrize("field", ["label", "features", "attrs", "score", "id"])
def test_deep_value_in_a_known_field(field: str) -> None:
    raw = json.dumps({"type": "prediction", "id": "r", "ts": 1, "deployment": "d", "model_version": "1"}).encode()
    raw = raw[:-1] + f',"{field}":'.encode() + nested(1000) + b"}"
    assert reason(raw) == "too_deep"


def test_unclosed_deep_nesting_is_too_deep() -> None:
    assert reason(b'{"x":' + b"[" * 5000) == "too_deep"
    assert reason(b"[" * 100_000) == "too_deep"


def test_depth_bound_exactly() -> None:
    # The event object is level 1, so an unknown field may hold MAX_DEPTH - 1 levels.
    assert reason(outcome(extra=b',"x":' + nested(MAX_DEPTH - 1))) is None
    assert reason(outcome(extra=b',"x":' + nested(MAX_DEPTH - 1, "{"))) is None
    assert reason(outcome(extra=b',"x":' + nested(MAX_DEPTH))) == "too_deep"
    assert reason(outcome(extra=b',"x":' + nested(MAX_DEPTH, "{"))) == "too_deep"


def test_brackets_in_strings_do_not_count() -> None:
    many = ("[{" * 5000 + '\\"' + "{[" * 5000).encode()
    raw = outcome(extra=b',"x":"' + many + b'","y":[' + b"[1]," * 1000 + b"2]")
    ev = DECODER.decode(raw)
    assert type(ev) is Outcome
    assert DECODER.decode_lines([raw]) == [ev]
    ev = DECODER.decode(json.dumps({"type": "outcome", "id": "[" * 200, "ts": 1, "deployment": "d", "label": "{" * 200}).encode())
    assert type(ev) is Outcome and ev.id == "[" * 200


def test_verdict_does_not_depend_on_the_callers_stack() -> None:
    """A replay and a live run decide the same: how deep the caller is changes nothing."""
    ok = outcome(extra=b',"x":' + nested(MAX_DEPTH - 1))
    deep = outcome(extra=b',"x":' + nested(MAX_DEPTH))
    far = outcome(extra=b',"x":' + nested(600))

    def at_depth(n: int) -> list[object]:
        if n:
            return at_depth(n - 1)
        return [DECODER.decode(ok), DECODER.decode(deep), DECODER.decode(far)]

    shallow = at_depth(0)
    assert [type(x) for x in shallow] == [Outcome, Rejected, Rejected]
    assert at_depth(800) == shallow


@pytest.mark.parametrize("ts", [b"1e300", b"-1e300", b"1e12", b"-1e12", b"253402300800", b"-62135596801"])
def test_ts_out_of_range(ts: bytes) -> None:
    rej = DECODER.decode(outcome(ts))
    assert type(rej) is Rejected and rej.reason == "ts_out_of_range"
    assert rej.detail == "Expected `ts` from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z - at `$.ts`"


@pytest.mark.parametrize(
    "ts",
    [
        '"9999-12-31T23:59:60Z"',  # the leap second of the issue: one second past the range
        '"9999-12-31T23:59:60.999Z"',
        '"9999-12-31T23:59:59-00:01"',
        '"0001-01-01T00:00:00+00:01"',
        '"0001-01-01T00:00:59+00:01"',
    ],
)
def test_date_strings_out_of_range(ts: str) -> None:
    assert reason(outcome(ts.encode())) == "ts_out_of_range"


@pytest.mark.parametrize(
    "ts",
    [
        '"0000-01-01T00:00:00Z"',  # year 0
        '"0000-12-31T23:59:60Z"',
        '"10000-01-01T00:00:00Z"',
        '"-0001-01-01T00:00:00Z"',
        '"2026-02-30T00:00:00Z"',
        '"2026-12-31T24:00:00Z"',
        '"2026-12-31T23:60:00Z"',
        '"2026-12-31T23:59:61Z"',
        '"2026-12-31T23:59:60+99:99"',
        '"9999-99-99T99:99:60Z"',
        '"9999-12-31T23:59:59.9999999Z"',  # msgspec rounds to the microsecond: year 10000
        '"2026-12-31T23:59:60' + "9" * 5000 + 'Z"',
    ],
)
def test_impossible_dates_are_wrong_type(ts: str) -> None:
    assert reason(outcome(ts.encode())) == "wrong_type"


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (b"0", 0.0),
        (b'"1970-01-01T00:00:00Z"', 0.0),
        (b'"1969-12-31T23:59:60Z"', 0.0),
        (b"-62135596800", TS_MIN),
        (b'"0001-01-01T00:00:00Z"', TS_MIN),
        (b"253402300799", TS_MAX),
        (b'"9999-12-31T23:59:59Z"', TS_MAX),
        (b'"9999-12-31T23:59:59+01:00"', TS_MAX - 3600),
        (b'"9999-12-31T22:59:60Z"', TS_MAX - 3599),
    ],
)
def test_any_real_time_decodes(ts: bytes, expected: float) -> None:
    """The decoder rejects only what cannot be a time at all; 1970 is a time (whether it is too
    old to use is the pipeline's call, not the decoder's)."""
    ev = DECODER.decode(outcome(ts))
    assert type(ev) is Outcome and ev.ts == expected


def test_5000_digit_integers() -> None:
    digits = b"1" * 5000  # past Python's int max str digits (4,300): int() raises ValueError
    assert reason(outcome(digits)) == "non_finite"
    assert reason(outcome(b"-" + digits)) == "non_finite"
    assert reason(outcome(b'"2016-12-31T23:59:60Z"', b',"x":' + digits)) is None  # leap second + unknown
    assert reason(outcome(extra=b',"x":' + digits)) is None  # unknown fields are not read
    assert reason(outcome(extra=b',"x":[' + digits + b"]")) is None
    feature = b'{"type":"prediction","id":"r","ts":1,"deployment":"d","model_version":"1","features":{"a":' + digits + b"}}"
    assert reason(feature) == "non_finite"


def test_non_finite_literals() -> None:
    for lit in (b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf"):
        assert reason(outcome(lit)) == "invalid_json"
    assert reason(outcome(b"1e999")) == "non_finite"
    assert reason(outcome(b"1e-999")) is None  # underflows to 0.0: a real (if odd) time
    assert DECODER.decode(outcome(b"1e-999")).ts == 0.0


# ---------------------------------------------------------------------------------------------
# Names and counts


def _shortest_named(name: str) -> bytes:
    return b'{"type":"deploy","ts":0,"deployment":"","model_version":"","attrs":{"' + name.encode() + b'":""}}'


def test_name_length_bound_in_the_shortest_event() -> None:
    """Names are measured only on lines long enough to hold a long one: this is the shortest."""
    assert type(DECODER.decode(_shortest_named("a" * MAX_NAME_LENGTH))) is Deploy
    assert reason(_shortest_named("a" * MAX_NAME_LENGTH)) is None
    assert reason(_shortest_named("a" * (MAX_NAME_LENGTH + 1))) == "name_too_long"
    assert reason(_shortest_named("\u00e9" * (MAX_NAME_LENGTH + 1))) == "name_too_long"


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["id", "deployment", "model_version", "variant", "feature", "attr"]),
    st.integers(MAX_NAME_LENGTH - 3, MAX_NAME_LENGTH + 3),
    st.sampled_from(["a", "\u00e9", "\U0001f600", '"', "\\"]),
    st.booleans(),
    st.integers(0, 200),
)
def test_name_bound_whatever_the_line(field: str, length: int, char: str, ascii_only: bool, pad: int) -> None:
    name = char * length
    ev: dict[str, object] = {"type": "prediction", "id": "r", "ts": 1, "deployment": "d", "model_version": "1"}
    if field == "feature":
        ev["features"] = {name: 1}
    elif field == "attr":
        ev["attrs"] = {name: "x"}
    else:
        ev[field] = name
    if pad:
        ev["error"] = "e" * pad
    raw = json.dumps(ev, ensure_ascii=ascii_only).encode()
    expected = "name_too_long" if length > MAX_NAME_LENGTH else None
    assert reason(raw) == expected


def test_counts() -> None:
    feats = {f"f{i}": i for i in range(MAX_FEATURES + 1)}
    raw = json.dumps({"type": "prediction", "id": "r", "ts": 1, "deployment": "d", "model_version": "1", "features": feats}).encode()
    assert reason(raw) == "too_many_features"
    attrs = {f"a{i}": "x" for i in range(MAX_ATTRS + 1)}
    raw = json.dumps({"type": "prediction", "id": "r", "ts": 1, "deployment": "d", "model_version": "1", "attrs": attrs}).encode()
    assert reason(raw) == "too_many_attrs"
    raw = json.dumps({"type": "deploy", "ts": 1, "deployment": "d", "model_version": "1", "attrs": attrs}).encode()
    assert reason(raw) == "too_many_attrs"


def test_unknown_fields_do_not_change_the_verdict() -> None:
    """The careful path (unknown fields dropped, decoded again) decides as the strict one."""
    base = {"type": "prediction", "id": "r", "ts": 1, "deployment": "d", "model_version": "1"}
    for change in ({}, {"score": 2}, {"ts": 1e300}, {"features": {"x" * 300: 1}}, {"id": 7}, {"type": "x"}, {"ts": "2016-12-31T23:59:60Z"}):
        doc = {**base, **change}
        plain = DECODER.decode(json.dumps(doc).encode())
        for extra in ({"z": [1, {"a": None}]}, {"zz": "\u00e9"}):
            for raw in (json.dumps({**extra, **doc}).encode(), json.dumps({**doc, **extra}).encode()):
                got = DECODER.decode(raw)
                if type(plain) is Rejected:
                    assert type(got) is Rejected and got.reason == plain.reason and got.raw == raw
                else:
                    assert got == plain


# ---------------------------------------------------------------------------------------------
# Anything at all


def _ok(out: object) -> None:
    if type(out) is Rejected:
        assert out.reason in REJECT_REASONS and out.reason != "decoder_error", out
        assert isinstance(out.detail, str) and out.detail
        out.to_record()
    else:
        assert type(out) in (Prediction, Outcome, Deploy)
        assert TS_MIN <= out.ts <= TS_MAX  # type: ignore[attr-defined]


NUMBERS = st.one_of(
    st.integers().map(lambda i: str(i).encode()),
    st.integers(1, 6000).map(lambda n: b"9" * n),
    st.integers(1, 6000).map(lambda n: b"-1" + b"0" * n),
    st.sampled_from([b"1e300", b"-1e300", b"1e999", b"-1e999", b"1e-400", b"-0", b"0.0", b"NaN",
                     b"Infinity", b"-Infinity", b"253402300799", b"253402300800", b"-62135596801",
                     b"1" + b"0" * 400, b"1." + b"0" * 5000, b"1e" + b"9" * 50]),
    st.floats().map(lambda f: repr(f).encode()),
)
DATES = st.builds(
    lambda y, mo, d, h, mi, s, frac, off: f'"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{off}"'.encode(),
    st.integers(0, 10000), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25),
    st.integers(0, 61), st.integers(0, 61),
    st.sampled_from(["", ".5", ".999999", ".9999999", "." + "9" * 300]),
    st.sampled_from(["Z", "z", "+00:00", "-01:00", "+23:59", "-23:59", "+24:00", "", "+0100"]),
)
DEEP = st.tuples(st.integers(0, 3000), st.sampled_from([b"[", b'{"a":']), st.booleans()).map(
    lambda t: t[1] * t[0] + b"1" + (b"]" if t[1] == b"[" else b"}") * (t[0] if t[2] else t[0] // 2)
)
STRINGS = st.one_of(
    st.text(max_size=20).map(lambda t: json.dumps(t).encode()),
    st.integers(0, 600).map(lambda n: b'"' + b"n" * n + b'"'),
    st.sampled_from([b'"\\ud800"', b'"\xff"', b'"unterminated', b'"[[[[{{{{"']),
)
VALUES = st.one_of(NUMBERS, DATES, DEEP, STRINGS, st.sampled_from([b"null", b"true", b"[]", b"{}"]))
FIELDS = st.sampled_from(["type", "id", "ts", "deployment", "model_version", "variant", "features",
                          "prediction", "score", "latency_ms", "error", "attrs", "label", "traffic", "x"])


@st.composite
def hostile_events(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([b'"prediction"', b'"outcome"', b'"deploy"', b'"other"', b"1"]))
    parts = [b'"type":' + kind, b'"id":"r"', b'"ts":1795169702', b'"deployment":"d"', b'"model_version":"1"', b'"label":1']
    for _ in range(draw(st.integers(1, 4))):
        field, value = draw(FIELDS), draw(VALUES)
        if field in ("features", "attrs") and draw(st.booleans()):
            value = b'{"' + draw(STRINGS)[1:-1] + b'":' + value + b"}"
        parts.insert(draw(st.integers(0, len(parts))), f'"{field}":'.encode() + value)
    return b"{" + b",".join(parts) + b"}"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode) | VALUES | hostile_events())
def test_decoder_never_raises(raw: bytes) -> None:
    out = DECODER.decode(raw)
    _ok(out)
    assert DECODER.decode_lines([raw]) == [out]


@settings(max_examples=100, deadline=None)
@given(st.lists(hostile_events() | st.just(OUTCOME) | st.binary(max_size=50), max_size=8))
def test_decode_lines_never_raises(lines: list[bytes]) -> None:
    out = DECODER.decode_lines(lines)
    assert out == [DECODER.decode(raw) for raw in lines]
    for x in out:
        _ok(x)


def test_name_cache_never_changes_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names found good are remembered (a cache, bounded by clearing); a long name is still
    rejected whatever the decoder has seen, and a good one accepted after a clear."""
    import rollbackd.events as events

    monkeypatch.setattr(events, "_GOOD_NAMES_MAX", 20)
    dec = EventDecoder()
    pad = "p" * 400  # long lines: the names are measured

    def pred(names: list[str]) -> bytes:
        return json.dumps({"type": "prediction", "id": "r", "ts": 1, "deployment": "d", "model_version": "1",
                           "error": pad, "features": {n: 1 for n in names}}).encode()

    lines = [pred([f"f{i}_{j}" for j in range(7)]) for i in range(10)]
    lines.insert(5, pred(["ok", "x" * (MAX_NAME_LENGTH + 1)]))
    lines.append(pred(["f0_0", "f9_6"]))
    out = dec.decode_lines(lines)
    assert [type(x).__name__ for x in out] == ["Prediction"] * 5 + ["Rejected"] + ["Prediction"] * 6
    assert out[5].reason == "name_too_long"
    assert len(dec._good_names) <= 20 + 7
    assert out == [EventDecoder().decode(raw) for raw in lines]
