"""Event contract v1: typed records and a decoder that never raises on bad input.

The contract is documented in ``docs/event-contract.md`` and as a JSON Schema in
``rollbackd/schema/event-contract-v1.json``. Decoding uses msgspec: measured here at
~1.3-1.9 M lines/s for typical prediction events, against ~170 k/s for the standard
``json`` module plus hand validation.
"""

from __future__ import annotations

import datetime as _dt
import re
from itertools import accumulate
from typing import Annotated, Any, NamedTuple, Union

import msgspec

__all__ = [
    "Prediction",
    "Outcome",
    "Deploy",
    "Event",
    "Rejected",
    "EventDecoder",
    "REJECT_REASONS",
    "DEFAULT_MAX_EVENT_BYTES",
    "MAX_DEPTH",
    "MAX_NAME_LENGTH",
    "MAX_FEATURES",
    "MAX_ATTRS",
    "TS_MIN",
    "TS_MAX",
]

DEFAULT_MAX_EVENT_BYTES = 1 << 20

# Bounds of the contract (docs/event-contract.md, "Bounds"). Each is defined here once; the JSON
# Schema repeats them as maxLength/maxProperties/minimum/maximum and a test checks they agree.

#: Arrays and objects nested in one event, the event object itself counting as level 1. Known
#: fields need 2; the bound exists because msgspec skips an unknown field by recursing, and past
#: Python's recursion limit (which depends on how deep the caller already is) that raises.
MAX_DEPTH = 32
#: Characters (code points) in ``id``, ``deployment``, ``model_version``, ``variant``, a feature
#: name or an attribute name: they become keys of in-memory tables, labels and ledger rows.
MAX_NAME_LENGTH = 256
#: Entries in one event's ``features`` and in its ``attrs``.
MAX_FEATURES = 1000
MAX_ATTRS = 1000
#: The instants ``ts`` may name, inclusive: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z, the
#: range of an RFC 3339 date-time and of ``datetime``. Anything in it can be formatted as a date
#: and moved by any realistic duration without a float overflowing or stopping to change;
#: ``1e300`` cannot. (Whether a time is too old or too far ahead to use is the pipeline's call.)
TS_MIN = -62135596800.0
TS_MAX = 253402300799.0

Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]
Timestamp = Union[
    Annotated[float, msgspec.Meta(ge=TS_MIN, le=TS_MAX)],
    Annotated[_dt.datetime, msgspec.Meta(tz=True)],
]
Scalar = Union[float, str, bool, None]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
# The names in these two are checked by EventDecoder (_long_name), not as ``dict[Name, ...]``:
# msgspec reuses a cached str for a plain key, and a constrained key cost 25 % of decoding time.
Features = Annotated[dict[str, Scalar], msgspec.Meta(max_length=MAX_FEATURES)]
Attrs = Annotated[dict[str, str], msgspec.Meta(max_length=MAX_ATTRS)]

_TS_PATH = "`$.ts`"
_TS_RANGE = "Expected `ts` from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


def _as_epoch(ts: float | _dt.datetime) -> float:
    if type(ts) is float:
        return ts
    epoch = ts.timestamp()  # type: ignore[union-attr]
    # The float form is range-checked by msgspec; a date-time in range can still name an
    # instant outside it through its offset (9999-12-31T23:59:59-01:00), or round up to it.
    if not TS_MIN <= epoch <= TS_MAX:
        raise ValueError(f"{_TS_RANGE} - at {_TS_PATH}")
    return epoch


def _long_name(ev: Event) -> str | None:
    """The detail for a feature or attribute name of ``ev`` longer than the bound, or None."""
    for field in ("features", "attrs"):
        names = getattr(ev, field, None)
        if names and max(map(len, names)) > MAX_NAME_LENGTH:
            # msgspec's own wording for a constrained key (as for ``deployment``).
            return f"Expected `str` of length <= {MAX_NAME_LENGTH} - at `key` in `$.{field}`"
    return None


# Measuring names is the one bound msgspec cannot check for free (see Features), so it is
# skipped where it cannot fail: the shortest event with a name is this one, plus the name's
# characters (at least one byte each in JSON), so a line of at most _NAME_FITS bytes holds no
# name over the bound. Longer lines are checked against the names already found good.
_SHORTEST_NAMED = b'{"type":"deploy","ts":0,"deployment":"","model_version":"","attrs":{"":""}}'
_NAME_FITS = len(_SHORTEST_NAMED) + MAX_NAME_LENGTH
_GOOD_NAMES_MAX = 1 << 16


# Unknown fields are forbidden *here*, not in the contract: an event without any decodes in one
# C call whose recursion is bounded by these types (depth 2). One with unknown fields fails
# that call and goes the careful way (EventDecoder._careful): depth checked, extra fields
# dropped, decoded again.


class Prediction(msgspec.Struct, tag_field="type", tag="prediction", gc=False, forbid_unknown_fields=True):
    """A served prediction. ``ts`` is normalised to Unix seconds on decode."""

    id: Name
    ts: Timestamp
    deployment: Name
    model_version: Name
    variant: Name = "primary"
    features: Features = {}
    prediction: Scalar = None
    score: Probability | None = None
    latency_ms: NonNegative | None = None
    error: str | None = None
    attrs: Attrs = {}

    def __post_init__(self) -> None:
        if type(self.ts) is not float:
            self.ts = _as_epoch(self.ts)


class Outcome(msgspec.Struct, tag_field="type", tag="outcome", gc=False, forbid_unknown_fields=True):
    """The ground truth for an earlier prediction with the same ``deployment`` and ``id``."""

    id: Name
    ts: Timestamp
    deployment: Name
    label: Union[float, str, bool]

    def __post_init__(self) -> None:
        if type(self.ts) is not float:
            self.ts = _as_epoch(self.ts)


class Deploy(msgspec.Struct, tag_field="type", tag="deploy", gc=False, forbid_unknown_fields=True):
    """A version started serving on a variant (sent by CI/CD)."""

    ts: Timestamp
    deployment: Name
    model_version: Name
    variant: Name = "primary"
    traffic: Probability | None = None
    attrs: Attrs = {}

    def __post_init__(self) -> None:
        if type(self.ts) is not float:
            self.ts = _as_epoch(self.ts)


Event = Union[Prediction, Outcome, Deploy]

REJECT_REASONS = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "out_of_range",
    "non_finite",
    "unknown_type",
    "oversize",
    "too_deep",
    "ts_out_of_range",
    "name_too_long",
    "too_many_features",
    "too_many_attrs",
    # Last resort: an exception the checks above did not foresee. Seeing it is a bug to report;
    # it exists so that such a bug costs one event, not the daemon.
    "decoder_error",
)


class Rejected(NamedTuple):
    """An input that broke the contract, with the reason it was rejected."""

    reason: str
    detail: str
    raw: bytes
    position: Any = None

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"reason": self.reason, "detail": self.detail, "position": self.position}
        try:
            rec["raw"] = self.raw.decode("utf-8")
        except UnicodeDecodeError:
            rec["raw"] = self.raw.decode("utf-8", "backslashreplace")
            rec["raw_encoding"] = "utf-8-backslashreplace"
        return rec


_BOUND = re.compile(r"` [<>]=? ")


def _classify(exc: msgspec.ValidationError) -> str:
    msg = str(exc)
    if msg.startswith("Object missing required field"):
        return "missing_field"
    if msg.startswith("Invalid value") and msg.endswith("`$.type`"):
        return "unknown_type"
    if msg.startswith("Number out of range"):
        return "non_finite"
    if msg.startswith("Expected"):
        if msg.startswith(_TS_RANGE) or (msg.endswith(_TS_PATH) and _BOUND.search(msg)):
            return "ts_out_of_range"
        if _BOUND.search(msg):
            return "out_of_range"
        if msg.startswith("Expected `str` of length <="):
            return "name_too_long"
        if msg.startswith("Expected `object` of length <="):
            return "too_many_attrs" if msg.endswith("`$.attrs`") else "too_many_features"
    return "wrong_type"


# A JSON string, escapes included (the unrolled form: no backtracking per character).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def _too_deep(raw: bytes) -> bool:
    """Whether ``raw`` opens more than :data:`MAX_DEPTH` arrays/objects at some point.

    Checked before msgspec sees the bytes, without recursion. The first test is two C scans
    and settles every ordinary event (it has fewer brackets than the limit in all); only a line
    with many brackets pays for the exact count: strings removed, then the running depth.
    """
    if raw.count(b"{") + raw.count(b"[") <= MAX_DEPTH:
        return False
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    # An unterminated string keeps its brackets: counting them can only over-estimate, and
    # such a line is invalid JSON anyway.
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH


def _deep_reject(raw: bytes, position: Any) -> Rejected:
    return Rejected("too_deep", f"arrays and objects nested deeper than {MAX_DEPTH} levels", raw, position)


_BAD_TS = "Invalid RFC3339 encoded datetime - at `$.ts`"
_LEAP_SECOND = re.compile(r"(\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d):60((?:\.\d+)?(?:[Zz]|[+-]\d\d:?\d\d))")


def _leap_second_to_next(raw: bytes) -> bytes | None:
    """RFC 3339 allows a leap second (``23:59:60Z``) that ``datetime`` cannot hold.

    Returns ``raw`` re-encoded with ``ts`` as Unix seconds, the leap second counted as the first
    second of the next minute (what POSIX time and ``calendar.timegm`` do), or None if ``ts`` is
    not such a timestamp. Only reached on the reject path, so it costs valid events nothing.
    ``raw`` must have passed :func:`_too_deep`: skipping a nested value recurses.
    """
    # The other fields stay raw bytes: what they hold (a huge integer, invalid UTF-8 in an
    # unknown field) is for the real decode to judge, not a reason to miss the leap second.
    try:
        obj = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
        ts = msgspec.json.decode(obj["ts"]) if "ts" in obj else None
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    m = _LEAP_SECOND.fullmatch(ts) if type(ts) is str else None
    if m is None:
        return None
    try:
        before = msgspec.convert(f"{m[1]}:59{m[2]}", _dt.datetime)
    except msgspec.ValidationError:
        return None
    # In seconds, not as a datetime plus a second: 9999-12-31T23:59:60Z has no datetime.
    # The event then fails the range check with its own reason.
    obj["ts"] = msgspec.Raw(msgspec.json.encode(before.timestamp() + 1.0))
    return msgspec.json.encode(obj)


_FIELDS = {
    cls.__struct_config__.tag: frozenset(cls.__struct_fields__) for cls in (Prediction, Outcome, Deploy)
}
_UNKNOWN_FIELD = "Object contains unknown field"


def _without_unknown_fields(raw: bytes) -> bytes | None:
    """``raw`` re-encoded with only the fields its ``type`` defines (plus ``type``), or None when
    it has no unknown field, or its type is not one of ours. ``raw`` must have passed
    :func:`_too_deep`: skipping a nested value recurses. Raises msgspec's errors on bad JSON."""
    obj = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    tag = msgspec.json.decode(obj["type"]) if "type" in obj else None
    fields = _FIELDS.get(tag) if type(tag) is str else None
    if fields is None or len(obj) == len(fields & obj.keys()) + 1:
        return None
    # The values stay raw bytes, in their order: the strict decode then meets the problems of
    # the known fields in the order it would have.
    return msgspec.json.encode({k: v for k, v in obj.items() if k in fields or k == "type"})


class EventDecoder:
    """Decodes one JSON document per call into an :data:`Event` or a :class:`Rejected`.

    It never raises on data: every violation of the contract, including each bound (nesting
    depth, ``ts`` range, name lengths, entry counts), comes back as a ``Rejected`` carrying one
    of :data:`REJECT_REASONS`.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes <= 0:
            raise ValueError(f"max_event_bytes must be > 0, got {max_event_bytes}")
        self.max_event_bytes = max_event_bytes
        self._decoder = msgspec.json.Decoder(Event)
        self._good_names: set[str] = set()  # feature and attribute names within the bound

    def decode(self, raw: bytes, position: Any = None) -> Event | Rejected:
        if len(raw) > self.max_event_bytes:
            return Rejected(
                "oversize", f"{len(raw)} bytes > limit {self.max_event_bytes}", raw[:4096], position
            )
        try:
            ev = self._decoder.decode(raw)
        except Exception:  # noqa: BLE001 - every failure is judged again, carefully
            return self._careful(raw, position)
        return self._named(ev, raw, position) if len(raw) > _NAME_FITS else ev

    def _named(self, ev: Event, raw: bytes, position: Any) -> Event | Rejected:
        """``ev``, or its rejection if a feature or attribute name is over the bound."""
        good = self._good_names
        cls = type(ev)
        if cls is Prediction:
            if ev.features.keys() <= good and (not ev.attrs or ev.attrs.keys() <= good):  # type: ignore[union-attr]
                return ev
        elif cls is not Deploy or ev.attrs.keys() <= good:  # type: ignore[union-attr]
            return ev
        detail = _long_name(ev)
        if detail is not None:
            return Rejected("name_too_long", detail, raw, position)
        if len(good) > _GOOD_NAMES_MAX:  # a cache, bounded; a name's verdict never depends on it
            good.clear()
        good.update(getattr(ev, "features", ()))
        good.update(ev.attrs)  # type: ignore[union-attr]
        return ev

    def _careful(self, raw: bytes, position: Any) -> Event | Rejected:
        """The path of an input the strict decode refused: a bad event, or a good one with
        unknown fields. Bounds first, then the JSON, then the contract; nothing escapes."""
        try:
            if _too_deep(raw):
                return _deep_reject(raw, position)
            try:
                known = _without_unknown_fields(raw)
            except msgspec.ValidationError:
                known = None  # not an object: the strict decode says so in its words
            ev = self._decoder.decode(raw if known is None else known)
        except msgspec.ValidationError as exc:
            if str(exc) == _BAD_TS and b":60" in raw:
                leap = _leap_second_to_next(raw)
                if leap is not None:
                    ev = self._careful(leap, position)
                    return ev._replace(raw=raw) if type(ev) is Rejected else ev
            reason = _classify(exc)
            # One wording for both forms of ts (msgspec's names the float bound it broke).
            detail = f"{_TS_RANGE} - at {_TS_PATH}" if reason == "ts_out_of_range" else str(exc)
            return Rejected(reason, detail, raw, position)
        except msgspec.DecodeError as exc:
            return Rejected("invalid_json", str(exc), raw, position)
        except UnicodeDecodeError as exc:
            # msgspec validates UTF-8 only in strings it converts, and raises this on the way.
            return Rejected("invalid_json", f"invalid UTF-8: {exc}", raw, position)
        except Exception as exc:  # noqa: BLE001 - the decoder must not take the daemon down
            return Rejected("decoder_error", f"{type(exc).__name__}: {exc}", raw, position)
        # No finiteness check needed: JSON has no NaN/Infinity literals and msgspec rejects
        # numbers that overflow a double ("Number out of range"), features included.
        return self._named(ev, raw, position)

    def decode_lines(self, lines: list[bytes]) -> list[Event | Rejected]:
        """``[self.decode(raw) for raw in lines]``, faster: the lines are decoded in one C loop
        and only a line that fails (or a batch holding one over the size limit) goes through
        :meth:`decode`, so each bad line is still rejected on its own with its reason."""
        out: list[Event | Rejected] = []
        longest = max(map(len, lines)) if lines else 0
        if longest > self.max_event_bytes:
            out.extend(map(self.decode, lines))
            return out
        it = iter(lines)
        while True:
            try:
                # extend() keeps what it appended before an exception; map() has then taken
                # exactly the line that failed from ``it``, and goes on after it.
                out.extend(map(self._decoder.decode, it))
                break
            except Exception:  # noqa: BLE001 - judged again, carefully
                out.append(self._careful(lines[len(out)], None))
        if longest > _NAME_FITS:
            # _named's first test inlined: this loop runs for every event of a batch with a
            # long line, and a call per event would cost more than the test.
            good = self._good_names
            for i, ev in enumerate(out):
                cls = type(ev)
                if cls is Prediction:
                    if not ev.attrs and ev.features.keys() <= good:  # type: ignore[union-attr]
                        continue
                elif cls is not Deploy:
                    continue
                if len(lines[i]) > _NAME_FITS:
                    out[i] = self._named(ev, lines[i], None)  # type: ignore[arg-type]
        return out
