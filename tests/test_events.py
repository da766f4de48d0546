"""Event contract v1: the decoder, and the decoder against the JSON Schema users validate with."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from rollbackd.events import (
    DEFAULT_MAX_EVENT_BYTES,
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
from rollbackd.schema import EVENT_SCHEMA_FILE, event_schema

# The three examples on the contract page, verbatim.
EXAMPLE_PREDICTION = b'{"type":"prediction","id":"r-000193","ts":"2026-11-20T10:15:02.114Z","deployment":"fraud-scorer","model_version":"14","variant":"canary","features":{"amount":112.5,"country":"DE","n_tx_24h":3},"prediction":0,"score":0.071,"latency_ms":8.4,"error":null}'
EXAMPLE_OUTCOME = b'{"type":"outcome","id":"r-000193","ts":"2026-11-20T11:40:00Z","deployment":"fraud-scorer","label":0}'
EXAMPLE_DEPLOY = b'{"type":"deploy","ts":"2026-11-20T09:00:00Z","deployment":"fraud-scorer","model_version":"14","variant":"canary","traffic":0.1,"attrs":{"git_sha":"9f2c1e7","dataset_id":"tx-2026-11-18"}}'

# 2026-11-20T10:15:02Z, checked against the standard library in test_epoch_constant.
T0 = 1795169702

DECODER = EventDecoder()
VALIDATOR = Draft202012Validator(event_schema())


def P(**fields: object) -> bytes:
    """A minimal valid prediction with ``fields`` changed (None removes a field)."""
    ev: dict[str, object] = {
        "type": "prediction", "id": "r-1", "ts": T0, "deployment": "d", "model_version": "1",
    }
    ev.update(fields)
    return json.dumps({k: v for k, v in ev.items() if v is not None}).encode()


def O(**fields: object) -> bytes:
    ev: dict[str, object] = {"type": "outcome", "id": "r-1", "ts": T0, "deployment": "d", "label": 1}
    ev.update(fields)
    return json.dumps({k: v for k, v in ev.items() if v is not None}).encode()


def D(**fields: object) -> bytes:
    ev: dict[str, object] = {"type": "deploy", "ts": T0, "deployment": "d", "model_version": "1"}
    ev.update(fields)
    return json.dumps({k: v for k, v in ev.items() if v is not None}).encode()


def schema_accepts(raw: bytes) -> bool:
    """What a producer validating with the JSON Schema would conclude about ``raw``."""

    def no_constants(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except ValueError:  # also UnicodeDecodeError
        return False
    return VALIDATOR.is_valid(doc)


# ---------------------------------------------------------------------------------------------
# Valid events decode to the right typed values


def test_epoch_constant() -> None:
    assert dt.datetime(2026, 11, 20, 10, 15, 2, tzinfo=dt.timezone.utc).timestamp() == T0


def test_contract_example_prediction() -> None:
    ev = DECODER.decode(EXAMPLE_PREDICTION)
    assert ev == Prediction(
        id="r-000193",
        ts=T0 + 0.114,
        deployment="fraud-scorer",
        model_version="14",
        variant="canary",
        features={"amount": 112.5, "country": "DE", "n_tx_24h": 3.0},
        prediction=0.0,
        score=0.071,
        latency_ms=8.4,
        error=None,
        attrs={},
    )
    assert type(ev.ts) is float
    assert ev.ts == 1795169702.114


def test_contract_example_outcome() -> None:
    ev = DECODER.decode(EXAMPLE_OUTCOME)
    assert ev == Outcome(id="r-000193", ts=float(T0 + 5098), deployment="fraud-scorer", label=0.0)


def test_contract_example_deploy() -> None:
    ev = DECODER.decode(EXAMPLE_DEPLOY)
    assert ev == Deploy(
        ts=float(T0 - 4502),
        deployment="fraud-scorer",
        model_version="14",
        variant="canary",
        traffic=0.1,
        attrs={"git_sha": "9f2c1e7", "dataset_id": "tx-2026-11-18"},
    )


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-20T10:15:02.114Z",
        "2026-11-20T10:15:02.114z",
        "2026-11-20t10:15:02.114Z",
        "2026-11-20T10:15:02.114+00:00",
        "2026-11-20T10:15:02.114-00:00",
        "2026-11-20T11:15:02.114+01:00",
        "2026-11-20T05:15:02.114-05:00",
        "2026-11-21T00:00:02.114+13:45",
        "2026-11-20T10:15:02.114000Z",
        "2026-11-20T10:15:02.1140001Z",  # beyond microseconds: rounded to the microsecond
    ],
)
def test_rfc3339_with_offset_is_unix_seconds_exactly(ts: str) -> None:
    ev = DECODER.decode(O(ts=ts))
    assert isinstance(ev, Outcome)
    assert ev.ts == 1795169702.114


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (T0, float(T0)),
        (T0 + 0.25, T0 + 0.25),
        (0, 0.0),
        (-1.5, -1.5),
        (TS_MIN, TS_MIN),
        (TS_MAX, TS_MAX),
        (-62135596800, TS_MIN),
        (253402300799, TS_MAX),
    ],
)
def test_numeric_ts_is_unix_seconds(ts: float, expected: float) -> None:
    ev = DECODER.decode(O(ts=ts))
    assert isinstance(ev, Outcome)
    assert type(ev.ts) is float and ev.ts == expected


def test_leap_second_is_the_first_second_of_the_next_minute() -> None:
    # RFC 3339 allows :60; POSIX time (and calendar.timegm) counts it as the next second.
    new_year_2017 = 1483228800.0
    assert DECODER.decode(O(ts="2016-12-31T23:59:60Z")).ts == new_year_2017
    assert DECODER.decode(O(ts="2016-12-31T23:59:60.5Z")).ts == new_year_2017 + 0.5
    assert DECODER.decode(O(ts="2017-01-01T00:59:60+01:00")).ts == new_year_2017
    bad = DECODER.decode(O(ts="2016-12-31T23:59:60Z", label=None))
    assert isinstance(bad, Rejected) and bad.reason == "missing_field"
    assert bad.raw == O(ts="2016-12-31T23:59:60Z", label=None)  # the input, not the rewrite
    assert DECODER.decode(O(ts="2016-12-31T23:59:61Z")).reason == "wrong_type"


def test_defaults() -> None:
    p = DECODER.decode(P())
    assert p == Prediction(id="r-1", ts=float(T0), deployment="d", model_version="1")
    assert (p.variant, p.features, p.attrs) == ("primary", {}, {})
    assert (p.prediction, p.score, p.latency_ms, p.error) == (None, None, None, None)
    d = DECODER.decode(D())
    assert (d.variant, d.traffic, d.attrs) == ("primary", None, {})


def test_value_types_survive() -> None:
    p = DECODER.decode(P(features={"b": True, "s": "x", "n": None, "f": 1.5}, prediction="fraud", error="E503"))
    assert p.features == {"b": True, "s": "x", "n": None, "f": 1.5}
    assert type(p.features["b"]) is bool
    assert p.prediction == "fraud" and p.error == "E503"
    assert DECODER.decode(O(label=True)).label is True
    assert DECODER.decode(O(label="spam")).label == "spam"
    assert DECODER.decode(O(label=3.25)).label == 3.25


def test_unknown_fields_are_ignored() -> None:
    ev = DECODER.decode(P(x_custom={"nested": [1, 2, None]}, later_field="v2"))
    assert ev == DECODER.decode(P())


def test_trailing_whitespace_and_cr_are_tolerated() -> None:
    assert DECODER.decode(O() + b"\r") == DECODER.decode(O())
    assert DECODER.decode(b"  " + O() + b"\n") == DECODER.decode(O())


# ---------------------------------------------------------------------------------------------
# Each reject reason, with a concrete bad line


@pytest.mark.parametrize(
    ("reason", "raw"),
    [
        ("invalid_json", b'{"type":"outcome","id":"r-1"'),
        ("invalid_json", b"not json at all"),
        ("missing_field", b'{"type":"outcome","id":"r-1","ts":1795169702,"deployment":"d"}'),
        ("wrong_type", b'{"type":"outcome","id":7,"ts":1795169702,"deployment":"d","label":1}'),
        ("out_of_range", b'{"type":"prediction","id":"r","ts":1,"deployment":"d","model_version":"1","score":1.5}'),
        ("non_finite", b'{"type":"outcome","id":"r-1","ts":1e999,"deployment":"d","label":1}'),
        ("unknown_type", b'{"type":"feedback","id":"r-1","ts":1795169702,"deployment":"d"}'),
    ],
)
def test_one_reject_per_reason(reason: str, raw: bytes) -> None:
    rej = DECODER.decode(raw, position={"offset": 5})
    assert isinstance(rej, Rejected)
    assert rej.reason == reason
    assert rej.raw == raw
    assert rej.position == {"offset": 5}
    assert rej.detail


def test_oversize_with_a_small_limit() -> None:
    small = EventDecoder(max_event_bytes=64)
    raw = P(features={"blob": "x" * 10_000})
    rej = small.decode(raw, "here")
    assert isinstance(rej, Rejected) and rej.reason == "oversize"
    assert rej.raw == raw[:4096]
    assert rej.detail == f"{len(raw)} bytes > limit 64"
    assert rej.position == "here"
    ok = b'{"type":"outcome","id":"1","ts":1,"deployment":"d","label":1}'
    assert len(ok) <= 64 and isinstance(small.decode(ok), Outcome)
    assert isinstance(small.decode(ok + b" " * (64 - len(ok))), Outcome)  # exactly at the limit
    assert small.decode(ok + b" " * (65 - len(ok))).reason == "oversize"


def test_every_reason_is_covered() -> None:
    # Not in the corpus: the schema cannot express a size or a depth, and decoder_error is a
    # bug that no input should reach (test_events_hostile.py checks that).
    assert set(REJECT_REASONS) == {r for r, _, _ in CORPUS_INVALID} | {"oversize", "too_deep", "decoder_error"}


@pytest.mark.parametrize("bad", [0, -1])
def test_decoder_limit_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="max_event_bytes"):
        EventDecoder(max_event_bytes=bad)
    assert EventDecoder().max_event_bytes == DEFAULT_MAX_EVENT_BYTES


def test_naive_timestamp_is_rejected() -> None:
    rej = DECODER.decode(O(ts="2026-11-20T10:15:02"))
    assert isinstance(rej, Rejected) and rej.reason == "wrong_type"
    assert "timezone" in rej.detail


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"outcome","id":"r","ts":NaN,"deployment":"d","label":1}',
        b'{"type":"outcome","id":"r","ts":Infinity,"deployment":"d","label":1}',
        b'{"type":"outcome","id":"r","ts":-Infinity,"deployment":"d","label":1}',
        b'{"type":"outcome","id":"r","ts":1e999,"deployment":"d","label":1}',
        b'{"type":"outcome","id":"r","ts":1,"deployment":"d","label":-1e999}',
        b'{"type":"outcome","id":"r","ts":1,"deployment":"d","label":1' + b"0" * 400 + b"}",
        b'{"type":"prediction","id":"r","ts":1,"deployment":"d","model_version":"1","features":{"a":1e999}}',
        b'{"type":"prediction","id":"r","ts":1,"deployment":"d","model_version":"1","features":{"a":NaN}}',
        b'{"type":"prediction","id":"r","ts":1,"deployment":"d","model_version":"1","prediction":1e999}',
        b'{"type":"prediction","id":"r","ts":1,"deployment":"d","model_version":"1","score":1e999}',
        b'{"type":"prediction","id":"r","ts":1,"deployment":"d","model_version":"1","latency_ms":1e999}',
        b'{"type":"deploy","ts":1,"deployment":"d","model_version":"1","traffic":-1e999}',
    ],
)
def test_non_finite_numbers_are_rejected(raw: bytes) -> None:
    rej = DECODER.decode(raw)
    assert isinstance(rej, Rejected)
    assert rej.reason in ("invalid_json", "non_finite")


def test_invalid_utf8_is_rejected_not_raised() -> None:
    raw = b'{"type":"outcome","id":"r-\xff","ts":1,"deployment":"d","label":1}'
    rej = DECODER.decode(raw, 3)
    assert isinstance(rej, Rejected) and rej.reason == "invalid_json" and rej.position == 3
    rec = rej.to_record()
    assert rec["raw_encoding"] == "utf-8-backslashreplace" and "\\xff" in rec["raw"]


def test_rejected_record_shape() -> None:
    rej = DECODER.decode(b"{oops", {"offset": 0, "line": 1})
    assert rej.to_record() == {
        "reason": "invalid_json",
        "detail": rej.detail,
        "position": {"offset": 0, "line": 1},
        "raw": "{oops",
    }


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_decoder_never_raises_on_bytes(raw: bytes) -> None:
    out = DECODER.decode(raw)
    if isinstance(out, Rejected):
        assert out.reason in REJECT_REASONS


def test_decode_lines_is_decode_of_each_line() -> None:
    """The batch path: one C loop while lines decode, each bad line rejected on its own."""
    good = [P(), O(), D(), P(ts="2016-12-31T23:59:60Z")]  # the last one through the leap fix
    bad = [b"", b"{oops", O(label=None), P(score=1.5), b"\xff\xfe", O(ts="2026-11-20T10:15:02")]
    cases = [good, bad, [bad[1], *good], [*good, bad[1]], good + bad + good, bad + good + bad, []]
    for lines in cases:
        assert DECODER.decode_lines(lines) == [DECODER.decode(raw) for raw in lines]
    small = EventDecoder(max_event_bytes=120)
    lines = [O(), P(features={"blob": "x" * 200}), b"{oops", O(id="r-2")]
    out = small.decode_lines(lines)
    assert out == [small.decode(raw) for raw in lines]
    assert [getattr(r, "reason", None) for r in out] == [None, "oversize", "invalid_json", None]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([P(), O(), D(), b"", b"{oops", P(score=2.0), O(id=7)]), max_size=12))
def test_decode_lines_on_any_mix(lines: list[bytes]) -> None:
    assert DECODER.decode_lines(lines) == [DECODER.decode(raw) for raw in lines]


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([P, O, D]),
    st.sampled_from(
        ["type", "id", "ts", "deployment", "model_version", "variant", "features", "prediction",
         "score", "latency_ms", "error", "attrs", "label", "traffic"]
    ),
    JSONISH,
)
def test_decoder_never_raises_on_mutated_events(make, field: str, value: object) -> None:
    raw = make(**{field: value}) if value is not None else make()
    raw = raw.replace(b"Infinity", b"1e999")  # json.dumps writes non-standard literals
    out = DECODER.decode(raw)
    if isinstance(out, Rejected):
        assert out.reason in REJECT_REASONS
        assert not schema_accepts(raw) or out.reason == "non_finite"
    else:
        assert schema_accepts(raw)


# ---------------------------------------------------------------------------------------------
# The JSON Schema


def test_schema_is_valid_draft_2020_12_and_ships_as_package_data() -> None:
    schema = event_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    import rollbackd.schema as pkg

    assert (Path(pkg.__file__).parent / EVENT_SCHEMA_FILE).is_file()
    assert event_schema() is not schema  # callers may mutate their copy


def test_schema_defaults_match_the_records() -> None:
    defs = event_schema()["$defs"]
    assert defs["prediction"]["properties"]["variant"]["default"] == Prediction.__struct_defaults__[0]
    assert defs["deploy"]["properties"]["variant"]["default"] == "primary"
    # Every field of every record is described, and the required ones agree.
    for name, cls in (("prediction", Prediction), ("outcome", Outcome), ("deploy", Deploy)):
        props = defs[name]["properties"]
        assert set(props) == set(cls.__struct_fields__) | {"type"}
        n_required = len(cls.__struct_fields__) - len(cls.__struct_defaults__)
        assert set(defs[name]["required"]) == set(cls.__struct_fields__[:n_required]) | {"type"}


# (expected reason, line, why) for inputs both the decoder and the schema must refuse.
CORPUS_INVALID: list[tuple[str, bytes, str]] = [
    ("invalid_json", b"", "empty"),
    ("invalid_json", b"{", "truncated"),
    ("invalid_json", O() + b" " + O(), "two documents"),
    ("invalid_json", b"{'type':'outcome'}", "single quotes"),
    ("invalid_json", b'{"type":"outcome","id":"r","ts":NaN,"deployment":"d","label":1}', "NaN literal"),
    ("invalid_json", b'{"type":"outcome","id":"r","ts":1,"deployment":"d","label":1,}', "trailing comma"),
    ("invalid_json", b'{"type":"outcome","id":"\xff","ts":1,"deployment":"d","label":1}', "bad UTF-8 in a field"),
    ("missing_field", b'{"id":"r","ts":1,"deployment":"d","label":1}', "no type"),
    ("missing_field", O(label=None), "outcome without label"),
    ("missing_field", O(ts=None), "outcome without ts"),
    ("missing_field", P(model_version=None), "prediction without model_version"),
    ("missing_field", D(deployment=None), "deploy without deployment"),
    ("wrong_type", b"[]", "array at top level"),
    ("wrong_type", b'"prediction"', "string at top level"),
    ("wrong_type", b'{"type":1}', "numeric type"),
    ("wrong_type", O(ts="2026-11-20T10:15:02"), "naive timestamp"),
    ("wrong_type", O(ts="2026-11-20"), "date only"),
    ("wrong_type", O(ts="1795169702"), "number in a string"),
    ("wrong_type", O(ts="2026-11-20T10:15:02+01"), "offset without minutes"),
    ("wrong_type", O(ts="2026-13-01T00:00:00Z"), "month 13"),
    ("wrong_type", O(ts="0000-01-01T00:00:00Z"), "year 0"),
    ("wrong_type", O(ts=True), "boolean ts"),
    ("wrong_type", O(label=[1]), "array label"),
    ("wrong_type", P(score="0.5"), "score as a string"),
    ("wrong_type", P(score=True), "score as a boolean"),
    ("wrong_type", P(features={"a": [1, 2]}), "array feature"),
    ("wrong_type", P(features={"a": {"b": 1}}), "object feature"),
    ("wrong_type", P(attrs={"region": 1}), "numeric attr"),
    ("wrong_type", P(variant=3), "numeric variant"),
    ("wrong_type", P(error=503), "numeric error"),
    ("wrong_type", P(id=7), "numeric id"),
    ("wrong_type", D(model_version=14), "numeric model_version"),
    ("out_of_range", P(score=1.5), "score above 1"),
    ("out_of_range", P(score=-0.01), "score below 0"),
    ("out_of_range", P(latency_ms=-1), "negative latency"),
    ("out_of_range", D(traffic=1.01), "traffic above 1"),
    ("ts_out_of_range", O(ts=1e300), "ts 1e300"),
    ("ts_out_of_range", O(ts=-1e300), "ts -1e300"),
    ("ts_out_of_range", O(ts=1e12), "ts in year 33658"),
    ("ts_out_of_range", O(ts=TS_MAX + 1), "ts one second after 9999"),
    ("ts_out_of_range", O(ts=TS_MIN - 1), "ts one second before year 1"),
    ("name_too_long", P(deployment="d" * (MAX_NAME_LENGTH + 1)), "long deployment"),
    ("name_too_long", P(id="r" * (MAX_NAME_LENGTH + 1)), "long id"),
    ("name_too_long", D(model_version="1" * (MAX_NAME_LENGTH + 1)), "long model_version"),
    ("name_too_long", P(variant="v" * (MAX_NAME_LENGTH + 1)), "long variant"),
    ("name_too_long", O(deployment="\u00e9" * (MAX_NAME_LENGTH + 1)), "long non-ASCII deployment"),
    ("name_too_long", P(features={"f" * (MAX_NAME_LENGTH + 1): 1}), "long feature name"),
    ("name_too_long", D(attrs={"a" * (MAX_NAME_LENGTH + 1): "x"}), "long attribute name"),
    ("too_many_features", P(features={f"f{i}": i for i in range(MAX_FEATURES + 1)}), "too many features"),
    ("too_many_attrs", D(attrs={f"a{i}": "x" for i in range(MAX_ATTRS + 1)}), "too many attrs"),
    ("non_finite", P(latency_ms=0.5).replace(b"0.5", b"-1e999"), "latency overflows a double"),
    ("non_finite", O(ts=1.0).replace(b"1.0", b"1e999"), "ts overflows a double"),
    ("non_finite", O(ts=1.0).replace(b"1.0", b"1" * 5000), "ts with 5,000 digits"),
    ("non_finite", P(score=0.5).replace(b"0.5", b"-1e999"), "score overflows a double"),
    ("unknown_type", O(type="feedback"), "unknown type"),
    ("unknown_type", O(type="Prediction"), "types are case-sensitive"),
]

# Lines both must accept.
CORPUS_VALID: list[tuple[bytes, str]] = [
    (EXAMPLE_PREDICTION, "contract example"),
    (EXAMPLE_OUTCOME, "contract example"),
    (EXAMPLE_DEPLOY, "contract example"),
    (P(), "minimal prediction"),
    (O(), "minimal outcome"),
    (D(), "minimal deploy"),
    (P(ts=T0 + 0.5), "fractional Unix seconds"),
    (P(ts=-5), "negative Unix seconds"),
    (O(ts="2026-11-20T10:15:02+05:30"), "positive offset"),
    (O(ts="2026-11-20T10:15:02.123456789-08:00"), "nanoseconds and negative offset"),
    (O(ts="2026-11-20t10:15:02z"), "lower-case t and z (RFC 3339 5.6)"),
    (O(ts="2016-12-31T23:59:60Z"), "leap second"),
    (O(ts="0001-01-01T00:00:00Z"), "year 1"),
    (O(ts="9999-12-31T23:59:59Z"), "last second of 9999"),
    (O(ts="0001-01-01T00:00:00Z"), "first second of year 1"),
    (O(ts=TS_MIN), "ts at the lower bound"),
    (O(ts=TS_MAX), "ts at the upper bound"),
    (O(ts=0), "1970"),
    (P(deployment="d" * MAX_NAME_LENGTH, id="\u00e9" * MAX_NAME_LENGTH), "names at the bound"),
    (P(features={"f" * MAX_NAME_LENGTH: 1}), "feature name at the bound"),
    (P(features={f"f{i}": i for i in range(MAX_FEATURES)}), "features at the bound"),
    (D(attrs={f"a{i}": "x" for i in range(MAX_ATTRS)}), "attrs at the bound"),
    (P(x=json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))), "unknown field at the depth bound"),
    (O(label=True), "boolean label"),
    (O(label="fraud"), "string label"),
    (O(label=0.37), "regression target"),
    (P(features={"a": 1, "b": "x", "c": True, "d": None}), "every feature type"),
    (P(prediction=None, score=None, latency_ms=None, error=None), "null optionals"),
    (P(prediction=True), "boolean prediction"),
    (P(score=0), "score 0"),
    (P(score=1), "score 1"),
    (P(latency_ms=0), "zero latency"),
    (P(error="TIMEOUT"), "failed call"),
    (P(attrs={"region": "eu", "tenant": ""}), "attrs"),
    (P(variant="shadow"), "variant"),
    (D(traffic=0), "traffic 0"),
    (D(traffic=1, attrs={"git_sha": "abc"}), "traffic 1 and provenance"),
    (D(traffic=None), "null traffic"),
    (P(x_added_in_v1_1={"anything": [1, None]}), "unknown top-level field"),
    (P(id="", deployment="", model_version=""), "empty strings"),
    (P(id="r-\u00e9\u4e2d\U0001f600"), "non-ASCII"),
    (b'  {"type":"outcome","id":"r","ts":1,"deployment":"d","label":1}  ', "surrounding whitespace"),
]


@pytest.mark.parametrize(("raw", "why"), CORPUS_VALID, ids=[w for _, w in CORPUS_VALID])
def test_corpus_valid_both_accept(raw: bytes, why: str) -> None:
    ev = DECODER.decode(raw)
    assert not isinstance(ev, Rejected), ev
    assert schema_accepts(raw), why


@pytest.mark.parametrize(
    ("reason", "raw", "why"), CORPUS_INVALID, ids=[w for _, _, w in CORPUS_INVALID]
)
def test_corpus_invalid_both_refuse(reason: str, raw: bytes, why: str) -> None:
    rej = DECODER.decode(raw)
    assert isinstance(rej, Rejected), why
    assert rej.reason == reason, (why, rej.detail)
    assert not schema_accepts(raw), why


# Where the two legitimately differ: (line, decoder accepts, schema accepts, why). Asserted, so a
# change on either side shows up here.
KNOWN_DIFFERENCES: list[tuple[bytes, bool, bool, str]] = [
    # A regular expression does not know the calendar; the format "date-time" annotation does,
    # for validators that check formats.
    (O(ts="2026-02-30T00:00:00Z"), False, True, "day 30 of February"),
    # Tolerated by the decoder, not RFC 3339: producers must not rely on them.
    (O(ts="2026-11-20T10:15:02+0100"), True, False, "offset without colon"),
    (O(ts="2026-11-20 10:15:02Z"), True, False, "space instead of T"),
    # JSON Schema has no notion of a finite double: Python's json turns 1e999 into inf. (For
    # ts the schema's maximum refuses it too: see the corpus.)
    (P(latency_ms=1.0).replace(b"1.0", b"1e999"), False, True, "latency_ms overflows a double"),
    # Size is a transport limit, not a schema property.
    (P(features={"blob": "x" * (DEFAULT_MAX_EVENT_BYTES + 1)}), False, True, "oversize"),
    # A lone surrogate escape is legal JSON syntax but no Unicode text (I-JSON forbids it).
    (b'{"type":"outcome","id":"\\ud800","ts":1,"deployment":"d","label":1}', False, True, "lone surrogate"),
    # Depth is a bound of the decoder (msgspec recurses into a skipped value); a schema has none.
    (P(x=json.loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)), False, True, "unknown field one level too deep"),
    # ts names an instant in 0001..9999 UTC; the pattern checks the written date, not the instant.
    (O(ts="9999-12-31T23:59:60Z"), False, True, "leap second at the end of 9999"),
    (O(ts="9999-12-31T23:59:59.5Z"), False, True, "half a second into the last second of 9999"),
    (O(ts="9999-12-31T23:59:59-01:00"), False, True, "9999 local time, year 10000 in UTC"),
    (O(ts="0001-01-01T00:00:00+01:00"), False, True, "year 1 local time, year 0 in UTC"),
    # Bytes in a field rollbackd ignores are never read; the schema needs the whole text.
    (b'{"type":"outcome","id":"r","ts":1,"deployment":"d","label":1,"x":"\xff"}', True, False, "bad UTF-8 in an unknown field"),
]


@pytest.mark.parametrize(
    ("raw", "decoder", "schema", "why"), KNOWN_DIFFERENCES, ids=[w for *_, w in KNOWN_DIFFERENCES]
)
def test_known_differences(raw: bytes, decoder: bool, schema: bool, why: str) -> None:
    assert (not isinstance(DECODER.decode(raw), Rejected)) is decoder, why
    assert schema_accepts(raw) is schema, why


# ---------------------------------------------------------------------------------------------
# Generated valid events: both must accept, and the decoder must read back what was written

OFFSETS = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: dt.timedelta(minutes=m))


def _rfc3339(moment: dt.datetime, offset: dt.timedelta, zulu: bool, digits: int) -> str:
    local = moment + offset  # wall-clock time at that offset
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
        f"T{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
    )
    if digits:
        text += "." + f"{local.microsecond:06d}"[:digits]
    if zulu and not offset:
        return text + "Z"
    sign = "-" if offset < dt.timedelta(0) else "+"
    minutes = abs(offset) // dt.timedelta(minutes=1)
    return text + f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[object, float]:
    """A ``ts`` value and the Unix seconds it stands for."""
    if draw(st.booleans()):
        ts = draw(st.integers(int(TS_MIN), int(TS_MAX)) | st.floats(TS_MIN, TS_MAX))
        return ts, float(ts)
    moment = draw(st.datetimes(dt.datetime(1, 1, 2), dt.datetime(9999, 12, 30)))
    digits = draw(st.sampled_from([0, 3, 6]))
    moment = moment.replace(microsecond=int(f"{moment.microsecond:06d}"[:digits] or 0) * 10 ** (6 - digits))
    text = _rfc3339(moment, draw(OFFSETS), draw(st.booleans()), digits)
    expected = moment.replace(tzinfo=dt.timezone.utc).timestamp()
    return text, expected


NAMES = st.text(max_size=12)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
NUMBER = st.integers(-(10**18), 10**18) | FINITE
SCALAR = st.none() | st.booleans() | NUMBER | NAMES
UNIT = st.integers(0, 1) | st.floats(0, 1)
ATTRS = st.dictionaries(NAMES, NAMES, max_size=4)


def _event(kind: str, required: dict, optional: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"type": st.just(kind), "ts": timestamps(), "deployment": NAMES, **required},
        optional={"x_unknown": st.none() | NAMES | st.lists(st.integers(), max_size=3), **optional},
    )


EVENTS = st.one_of(
    _event(
        "prediction",
        {"id": NAMES, "model_version": NAMES},
        {
            "variant": NAMES,
            "features": st.dictionaries(NAMES, SCALAR, max_size=5),
            "prediction": SCALAR,
            "score": st.none() | UNIT,
            "latency_ms": st.none() | st.integers(0, 10**6) | st.floats(0, allow_infinity=False),
            "error": st.none() | NAMES,
            "attrs": ATTRS,
        },
    ),
    _event("outcome", {"id": NAMES, "label": st.booleans() | NUMBER | NAMES}, {}),
    _event(
        "deploy",
        {"model_version": NAMES},
        {"variant": NAMES, "traffic": st.none() | UNIT, "attrs": ATTRS},
    ),
)


def _same(decoded: object, written: object) -> bool:
    if written is None or type(written) is bool:
        return decoded is written
    if type(written) is str:
        return decoded == written
    return type(decoded) is float and decoded == float(written)


@settings(max_examples=400, deadline=None)
@given(EVENTS, st.booleans())
def test_generated_valid_events_pass_both(doc: dict, ascii_only: bool) -> None:
    ts, expected_ts = doc["ts"]
    doc = {**doc, "ts": ts}
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert schema_accepts(raw), raw
    ev = DECODER.decode(raw)
    assert not isinstance(ev, Rejected), (raw, ev)
    assert type(ev).__name__.lower() == doc["type"]
    assert type(ev.ts) is float and math.isfinite(ev.ts)
    assert ev.ts == expected_ts
    for field in type(ev).__struct_fields__:
        if field == "ts":
            continue
        if field not in doc:
            assert getattr(ev, field) == getattr(type(ev)(**_required(ev)), field)  # the default
        elif field in ("features", "attrs"):
            got = getattr(ev, field)
            assert got.keys() == doc[field].keys()
            assert all(_same(got[k], v) for k, v in doc[field].items())
        else:
            assert _same(getattr(ev, field), doc[field]), field


def _required(ev: object) -> dict:
    cls = type(ev)
    n = len(cls.__struct_fields__) - len(cls.__struct_defaults__)
    return {f: getattr(ev, f) for f in cls.__struct_fields__[:n]}


def test_examples_on_the_contract_page_are_valid() -> None:
    page = (Path(__file__).parents[1] / "docs" / "event-contract.md").read_text("utf-8")
    page = page[: page.index("## What happens to an event")]  # after it: deliberately bad lines
    blocks = page.split("```json\n")[1:]
    lines = [line.encode() for block in blocks for line in block.split("```")[0].splitlines()]
    assert len(lines) == 6
    for raw in lines:
        assert not isinstance(DECODER.decode(raw), Rejected), raw
        assert schema_accepts(raw), raw
    assert EXAMPLE_PREDICTION in lines and EXAMPLE_OUTCOME in lines and EXAMPLE_DEPLOY in lines


def test_schema_bounds_are_the_decoders() -> None:
    """Each bound is defined once in rollbackd.events; the schema repeats it, and must agree."""
    defs = event_schema()["$defs"]
    number_ts = next(b for b in defs["timestamp"]["oneOf"] if b["type"] == "number")
    assert (number_ts["minimum"], number_ts["maximum"]) == (TS_MIN, TS_MAX)
    assert defs["name"]["maxLength"] == MAX_NAME_LENGTH
    for kind, fields in (("prediction", ("id", "deployment", "model_version", "variant")),
                         ("outcome", ("id", "deployment")), ("deploy", ("deployment", "model_version", "variant"))):
        for field in fields:
            assert defs[kind]["properties"][field]["$ref"] == "#/$defs/name", (kind, field)
    features = defs["prediction"]["properties"]["features"]
    assert (features["maxProperties"], features["propertyNames"]["maxLength"]) == (MAX_FEATURES, MAX_NAME_LENGTH)
    assert (defs["attrs"]["maxProperties"], defs["attrs"]["propertyNames"]["maxLength"]) == (MAX_ATTRS, MAX_NAME_LENGTH)
    page = (Path(__file__).parents[1] / "docs" / "event-contract.md").read_text("utf-8")
    bounds = page[page.index("## Bounds"): page.index("## What happens")]
    for reason in ("oversize", "too_deep", "ts_out_of_range", "name_too_long", "too_many_features", "too_many_attrs"):
        assert f"`{reason}`" in bounds
    assert f"{MAX_DEPTH} levels" in bounds and f"{MAX_NAME_LENGTH} characters" in bounds
    assert f"{MAX_FEATURES:,}" in bounds and f"{MAX_ATTRS:,}" in bounds
    table = page[page.index("## What happens"):]
    assert all(f"| `{reason}` |" in table for reason in REJECT_REASONS)
