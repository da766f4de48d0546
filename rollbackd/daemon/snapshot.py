"""State that is written down and read back, without pickle: an explicit, versioned schema.

Three things leave the process and come back: a pipeline's snapshot (``Pipeline.snapshot()``),
the checkpoint file (``run.Checkpoint``) and a task's state record on the state topic
(``scaleout.GroupState``). A state record comes from a Kafka topic that anyone with produce
rights can write to, and a checkpoint file from a disk others may reach: reading one must
never run code. So nothing here is pickled; each is a *frame*:

    b"RBDS" | kind (1 byte) | SCHEMA (2 bytes, big-endian) | CRC-32 of the body (4 bytes) | body

and the body is msgpack, decoded by msgspec into plain values only (None, bool, int, float,
str, bytes, lists). Everything else is spelled out in tagged lists and rebuilt by this module
from an explicit registry (:data:`RECORDS`): a type that is not listed cannot come back, and
the ones that are listed are rebuilt without running their constructors (their fields are
set, a NamedTuple or a msgspec struct is built from its fields). numpy arrays are
``(dtype, shape, bytes)`` with the dtype from a whitelist. A detector is never rebuilt from a
record: the pipeline makes it from the rule, as for a new deployment, and this module sets
the fields its class declares in ``STATE`` (a tuple of attribute names; a field whose value
is an object that declares ``STATE`` itself, a detector's ``Baseline``, is restored into the
object the constructor made). A detector class without ``STATE`` is not checkpointed: it
starts afresh after a restore, as one of a changed rule does.

A frame that is truncated, corrupt (CRC), not a frame at all (a pickle from a rollbackd
before schema 3), of another kind, of a schema this rollbackd does not read, or whose body
does not fit the schema raises :class:`StateError` with the reason; nothing it holds is
used. The CRC catches accidents, not forgery: a forged frame that fits the schema is read as
data (wrong numbers at worst), never as code.

Restores across releases are decided by :data:`SCHEMA` alone, never by the package version:
bump it when a registered type or a ``STATE`` loses or renames a field, or changes a field's
meaning. A field added with a default needs no bump (an older record lacks it: it gets the
default).

Large immutable values (a complete drift reference: 8 features x 5,000 float64 is ~0.45 MB
per deployment) are *blobs*: see :class:`Blobs`. The snapshot names each by its SHA-256
digest (``["B", digest]``), and the caller keeps the blob's bytes beside it (the checkpoint
file in ``<checkpoint>.refs/``, a state record in the state topic's refs topic); a restore is
handed the blobs it needs by digest.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
import threading
import weakref
import zlib
from collections import Counter, deque
from typing import Any, Callable, Hashable, Iterable, Mapping

import msgspec
import numpy as np

from rollbackd.errors import Fatal

__all__ = [
    "SCHEMA",
    "StateError",
    "Blobs",
    "frame",
    "kind_of",
    "unframe",
    "encode_state",
    "decode_state",
    "is_digest",
    "to_plain",
    "from_plain",
    "BlobReader",
    "BlobRef",
    "DEFER",
    "DeclaredStates",
    "blob_values",
    "Plain",
    "Declared",
    "checkpointed",
    "restore_detector",
    "register",
]

#: The schema of every frame this module writes. 1 and 2 were pickles (before there was a
#: frame); 3 is the first schema of frames.
SCHEMA = 3
#: Schemas this rollbackd reads.
READS = (3,)

MAGIC = b"RBDS"
_HEADER = struct.Struct(">4sBHI")
# "parts": the head of a record too large for one Kafka message, written as parts (daemon/scaleout.py).
KINDS = {"pipeline": 1, "checkpoint": 2, "state": 3, "blob": 4, "parts": 5}
_KIND_NAMES = {v: k for k, v in KINDS.items()}

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()

# msgpack's integers: int64 and uint64. Others are written as text.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

# Array dtypes a snapshot may hold (no object arrays: their elements go through to_plain).
_DTYPES = frozenset(
    np.dtype(t).str
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.float16, np.float32, np.float64)
)


class StateError(Fatal, ValueError):
    """A checkpoint or state record that cannot be used: corrupt, forged, truncated, of an
    unknown schema or kind. Nothing from it was used. Fatal: waiting does not mend a record,
    and a partition never starts without the state it had; the daemon stops with the message."""


# -- frames ----------------------------------------------------------------------------------


def frame(kind: str, body: Any, blobs: "Blobs | None" = None,
          refs: "Callable[[Any], Any] | None" = None) -> bytes:
    """``body`` (plain values, registered records, arrays) as a frame of ``kind``. ``refs``
    turns the :class:`BlobRef`\\ s a :class:`Plain` tree holds into plain values."""
    encoder = _ENCODER if refs is None else msgspec.msgpack.Encoder(enc_hook=refs)
    payload = encoder.encode(to_plain(body, blobs))
    return _HEADER.pack(MAGIC, KINDS[kind], SCHEMA, zlib.crc32(payload)) + payload


def kind_of(data: Any) -> str | None:
    """The kind of frame ``data`` is, from its header alone (nothing is decoded); None when it
    is not a frame."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _HEADER.size or data[:4] != MAGIC:
        return None
    return _KIND_NAMES.get(data[4])


def unframe(kind: str, data: bytes, blobs: BlobReader | None = None, what: str = "") -> Any:
    """The body of a frame of ``kind``; :class:`StateError` when it is not one this rollbackd
    reads. ``blobs``: the blobs the frame may name, by digest (bytes, or values already
    decoded); ``what`` names the source in messages (a path, a topic partition)."""
    where = f"{what}: " if what else ""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"{where}not a rollbackd {kind} record (got {type(data).__name__})")
    data = bytes(data)
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        if data[:1] == b"\x80":
            raise StateError(
                f"{where}a pickled {kind} written by a rollbackd before schema {SCHEMA}: refused "
                "(pickles are never loaded, they can run code)")
        raise StateError(f"{where}not a rollbackd {kind} record (no RBDS header)")
    _, code, schema, crc = _HEADER.unpack_from(data)
    if code != KINDS[kind]:
        raise StateError(f"{where}a {_KIND_NAMES.get(code, f'kind {code}')} record, not a {kind}")
    if schema not in READS:
        raise StateError(
            f"{where}{kind} of schema {schema}; this rollbackd reads schema "
            f"{', '.join(map(str, READS))}")
    payload = data[_HEADER.size:]
    if zlib.crc32(payload) != crc:
        raise StateError(f"{where}{kind} record is corrupt or truncated (checksum mismatch)")
    try:
        plain = _DECODER.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise StateError(f"{where}{kind} record does not decode: {exc}") from None
    try:
        return from_plain(plain, blobs)
    except StateError as exc:
        raise StateError(f"{where}{exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError, msgspec.MsgspecError) as exc:
        raise StateError(f"{where}{kind} record does not fit schema {schema}: "
                         f"{type(exc).__name__}: {exc}") from None


# -- a task's state record (scale-out: daemon/scaleout.py) -----------------------------------------


def encode_state(state: Mapping[str, Any]) -> bytes:
    """A task's state record: its pipeline snapshot (bytes), the input offsets it covers, the
    decisions-topic offset, the blind state (plain values), the digests of the blobs the
    snapshot names (``refs``: kept in the refs topic)."""
    return frame("state", dict(state))


def decode_state(data: Any, what: str) -> dict[str, Any]:
    """The state record :func:`encode_state` wrote; :class:`StateError` when it is not one."""
    state = unframe("state", data, what=what)
    if type(state) is not dict or type(state.get("pipeline")) is not bytes:
        raise StateError(f"{what}: a state record without a pipeline snapshot")
    position = state.get("position")
    if position is not None and (type(position) is not dict or not all(
            type(k) is str and type(v) is int for k, v in position.items())):
        raise StateError(f"{what}: a state record whose position is not offsets by partition")
    refs = state.get("refs")
    if refs is not None and (type(refs) is not list or not all(is_digest(d) for d in refs)):
        raise StateError(f"{what}: a state record whose refs are not SHA-256 digests")
    return state


def is_digest(x: Any) -> bool:
    """A blob's name: a SHA-256 digest in lowercase hex."""
    return type(x) is str and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


# -- blobs: large immutable values, written once and named by digest ------------------------


class Blobs:
    """Content-addressed values of one snapshot: ``["B", digest]`` in the snapshot, the bytes
    beside it. ``digests`` are every blob the last snapshot named; ``new`` the ones it encoded
    that no earlier snapshot of this owner had (the caller persists those).

    An immutable value is encoded once per owner: :meth:`put` remembers the digest of each value
    object (held, so its ``id`` stays unique) until a snapshot no longer names it.

    Two ways a value gets its digest. :meth:`put` encodes and hashes it at once, on the calling
    thread (``Pipeline.snapshot``). :meth:`name` (``Pipeline.freeze``) never does: a value not
    encoded yet is written *inline* (``["Bi", frame]``) by the thread that encodes the snapshot
    (:meth:`inline`, which keeps its digest and bytes), and the next snapshot names it and hands
    its bytes over as new. So a new reference costs the processing thread nothing, at the price
    of being written twice: inline in one checkpoint, then once as a blob.
    """

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, str]] = {}
        self._named: dict[int, tuple[Any, str]] = {}
        # Encoded inline by a writer thread, not handed over as a blob yet: id -> (value, digest, bytes).
        self._made: dict[int, tuple[Any, str, bytes]] = {}
        self._inlined: set[int] = set()  # values the snapshot being taken writes inline
        self._lock = threading.Lock()  # _made: written by the writer thread
        self.new: dict[str, bytes] = {}
        self.digests: set[str] = set()

    def begin(self) -> None:
        self._named = {}
        self._inlined = set()
        self.new = {}
        self.digests = set()

    def put(self, value: Any) -> str:
        known = self._known.get(id(value)) or self._named.get(id(value))
        if known is None:
            made = self._take_made(value)
            if made is None:
                data = frame("blob", value)
                made = (hashlib.sha256(data).hexdigest(), data)
            known = (value, made[0])
            self.new[made[0]] = made[1]
        self._named[id(value)] = known
        self.digests.add(known[1])
        return known[1]

    def name(self, value: Any) -> str | None:
        """The digest this snapshot names ``value`` by, or None: it was never encoded, and the
        snapshot's encoder writes it inline (:meth:`inline`). Never encodes nor hashes."""
        known = self._known.get(id(value)) or self._named.get(id(value))
        if known is None:
            made = self._take_made(value)
            if made is None:
                self._inlined.add(id(value))
                return None
            known = (value, made[0])
            self.new[made[0]] = made[1]
        self._named[id(value)] = known
        self.digests.add(known[1])
        return known[1]

    def inline(self, value: Any) -> bytes:
        """``value``'s blob frame, for a snapshot that writes it inline (any thread); its digest
        and bytes are kept for the next snapshot to name it by."""
        data = frame("blob", value)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._made[id(value)] = (value, digest, data)
        return data

    def seed(self, reader: "BlobReader") -> None:
        """The blobs a restore read are persisted already: named by their digest from now on."""
        for digest, value in reader.decoded.items():
            self._known[id(value)] = (value, digest)

    def _take_made(self, value: Any) -> tuple[str, bytes] | None:
        with self._lock:
            made = self._made.pop(id(value), None)
        return None if made is None or made[0] is not value else made[1:]

    def end(self) -> None:
        self._known = self._named
        self._named = {}
        with self._lock:  # forget what no snapshot writes any more
            self._made = {k: v for k, v in self._made.items() if k in self._inlined}


class BlobRef:
    """A blob in a :class:`Plain` tree converted with :data:`DEFER`: named by its digest or
    written inline when the tree is encoded (:func:`blob_refs`), as decided when the snapshot
    was taken (:meth:`Blobs.name`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Defer:
    """:data:`DEFER`'s type."""


#: ``to_plain(x, DEFER)``: blobs become :class:`BlobRef`\ s, resolved when encoded.
DEFER = _Defer()


def blob_refs(names: Mapping[int, str], blobs: Blobs) -> Callable[[Any], Any]:
    """The ``refs`` of :func:`frame` for a snapshot whose blobs ``names`` (value id -> digest)
    names; any other :class:`BlobRef` is written inline (once per value)."""
    inlined: dict[int, bytes] = {}

    def resolve(obj: Any) -> Any:
        if type(obj) is not BlobRef:
            raise StateError(f"cannot checkpoint a {type(obj).__module__}.{type(obj).__qualname__}")
        key = id(obj.value)
        digest = names.get(key)
        if digest is not None:
            return ["B", digest]
        data = inlined.get(key)
        if data is None:
            data = inlined[key] = blobs.inline(obj.value)
        return ["Bi", data]

    return resolve


def blob_values(obj: Any) -> list[Any]:
    """The values ``obj``'s declared state writes as blobs: its ``BLOBS`` fields and those of the
    declared-state objects among its fields. (One held deeper, in a container, is missed: it is
    then written inline, which is exact too.)"""
    out: list[Any] = []
    blobbed = getattr(obj, "BLOBS", ())
    for f in type(obj).STATE:
        v = getattr(obj, f)
        if v is None:
            continue
        if f in blobbed:
            out.append(v)
        elif isinstance(getattr(type(v), "STATE", None), tuple):
            out.extend(blob_values(v))
    return out


class DeclaredStates:
    """The plain forms of objects that change in place, at points their owner knows (a
    pipeline's detectors: when a window closes), by key: each converted at most once per change,
    and not on the thread that changes them.

    :meth:`take` (processing thread) returns a :class:`Taken`: the plain form of each object not
    changed since it was last converted, the others *owed*. :meth:`Taken.settle` (writer thread)
    converts the owed ones. The owner calls :meth:`changing` before it changes an object: one
    still owed to a taken snapshot is converted then, first (copy on write), so a snapshot holds
    each object as it was when taken, however late it is encoded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> (object, plain form, its blob values): valid until changing(key)
        self._plain: dict[Hashable, tuple[Any, Any, list[Any]]] = {}
        # key -> (object, the Taken that wait for its plain form)
        self._owed: dict[Hashable, tuple[Any, list[weakref.ref["Taken"]]]] = {}

    def changing(self, key: Hashable) -> None:
        self.changing_many((key,))

    def changing_many(self, keys: Iterable[Hashable]) -> None:
        """:meth:`changing` for each of ``keys``, under one lock (a boundary of a fleet changes
        thousands of detectors; between checkpoints there is nothing to do for them, and
        ``keys`` is not even read)."""
        with self._lock:
            plain, owed = self._plain, self._owed
            if not plain and not owed:
                return
            for key in keys:
                plain.pop(key, None)
                due = owed.pop(key, None)
                if due is not None:
                    self._pay(key, due, keep=False)

    def take(self, objects: Mapping[Hashable, Any]) -> "Taken":
        taken = Taken(self, list(objects))
        with self._lock:
            if len(self._plain) > len(objects):  # objects gone: forget them
                self._plain = {k: v for k, v in self._plain.items() if k in objects}
            ref = weakref.ref(taken)
            for key, obj in objects.items():
                known = self._plain.get(key)
                if known is not None and known[0] is obj:
                    taken.plain[key] = known[1]
                    taken.blobs.extend(known[2])
                    continue
                owed = self._owed.get(key)
                if owed is not None and owed[0] is not obj:  # replaced, so never changed again
                    self._pay(key, owed, keep=False)
                    owed = None
                if owed is None:
                    owed = self._owed[key] = (obj, [])
                owed[1][:] = [r for r in owed[1] if r() is not None]
                owed[1].append(ref)
                taken.blobs.extend(blob_values(obj))
        return taken

    def _settle(self, taken: "Taken") -> None:
        for key in taken.keys:
            if key in taken.plain:
                continue
            with self._lock:
                owed = self._owed.pop(key, None)
                if owed is not None:
                    self._pay(key, owed, keep=True)

    def _pay(self, key: Hashable, owed: tuple[Any, list[weakref.ref["Taken"]]], keep: bool) -> None:
        # Under the lock: the owner waits in changing() until the object is converted.
        obj, waiting = owed
        plain = to_plain(obj, DEFER)
        for ref in waiting:
            t = ref()
            if t is not None:
                t.plain[key] = plain
        if keep:
            self._plain[key] = (obj, plain, blob_values(obj))


class Taken:
    """What :meth:`DeclaredStates.take` took: ``plain`` by key (complete after :meth:`settle`),
    ``blobs`` the blob values they hold."""

    __slots__ = ("_states", "keys", "plain", "blobs", "__weakref__")

    def __init__(self, states: DeclaredStates, keys: list[Hashable]) -> None:
        self._states, self.keys = states, keys
        self.plain: dict[Hashable, Any] = {}
        self.blobs: list[Any] = []

    def settle(self) -> dict[Hashable, "Plain"]:
        """Every object's plain form, in the order taken (converting those still owed)."""
        self._states._settle(self)
        return {k: Plain(self.plain[k]) for k in self.keys}


class BlobReader:
    """The blobs a restore was handed (bytes by digest): each checked against its digest and
    decoded once, however many detectors name it."""

    def __init__(self, raw: Mapping[str, bytes] | None = None) -> None:
        self._raw = raw or {}
        self._decoded: dict[str, Any] = {}

    @property
    def decoded(self) -> Mapping[str, Any]:
        """The blobs read so far, by digest."""
        return self._decoded

    def get(self, digest: Any) -> Any:
        if type(digest) is not str:
            raise StateError(f"a blob reference that is not a digest: {digest!r}")
        if digest in self._decoded:
            return self._decoded[digest]
        data = self._raw.get(digest)
        if data is None:
            raise StateError(f"blob {digest[:16]} is missing (its file or record was not kept)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise StateError(f"blob {digest[:16]} does not match its digest")
        value = self._decoded[digest] = unframe("blob", data, what=f"blob {digest[:16]}")
        return value


class Declared:
    """A declared state (``["S", field, value, ...]``) as read: plain until
    :func:`restore_detector` sets it on the object built from config."""

    __slots__ = ("plain",)

    def __init__(self, plain: list[Any]) -> None:
        self.plain = plain


# -- the registry ---------------------------------------------------------------------------


class _Record:
    __slots__ = ("name", "cls", "fields", "defaults", "build")

    def __init__(self, name: str, cls: type, fields: tuple[str, ...],
                 defaults: dict[str, Callable[[], Any]], build: Callable[[dict[str, Any]], Any]) -> None:
        self.name, self.cls, self.fields, self.defaults, self.build = name, cls, fields, defaults, build


RECORDS: dict[str, _Record] = {}
_BY_TYPE: dict[type, _Record] = {}
_ENUMS: dict[str, type[enum.Enum]] = {}
# Types with their own encoding: type -> (tag, encode); tag -> decode.
_CUSTOM_ENCODE: dict[type, tuple[str, Callable[[Any], Any]]] = {}
_CUSTOM_DECODE: dict[str, Callable[[Any], Any]] = {}


def register(cls: type, name: str | None = None) -> type:
    """Allow ``cls`` in snapshots: a dataclass, a NamedTuple, a msgspec struct, a class with
    ``__slots__``, or an Enum. Its fields are written by name; it is rebuilt without calling
    its constructor."""
    name = name or cls.__name__
    if name in RECORDS or name in _ENUMS:
        raise ValueError(f"{name} is registered already")
    if issubclass(cls, enum.Enum):
        _ENUMS[name] = cls
        _BY_TYPE[cls] = _Record(name, cls, (), {}, lambda v: None)
        return cls
    defaults: dict[str, Callable[[], Any]] = {}
    if issubclass(cls, msgspec.Struct):
        fields = tuple(cls.__struct_fields__)
        build: Callable[[dict[str, Any]], Any] = lambda v, c=cls, f=fields: c(*[v[k] for k in f])
        for k, d in zip(reversed(fields), reversed(cls.__struct_defaults__)):
            defaults[k] = (lambda d=d: d) if not isinstance(d, (list, dict, set)) else (lambda d=d: type(d)(d))
    elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
        fields = tuple(cls._fields)  # type: ignore[attr-defined]
        build = lambda v, c=cls, f=fields: tuple.__new__(c, [v[k] for k in f])
        for k, d in getattr(cls, "_field_defaults", {}).items():
            defaults[k] = lambda d=d: d
    elif dataclasses.is_dataclass(cls):
        dfields = dataclasses.fields(cls)
        fields = tuple(f.name for f in dfields)
        for f in dfields:
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = lambda d=f.default: d
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory
        build = lambda v, c=cls: _setattrs(object.__new__(c), v)
    else:
        slots = getattr(cls, "__slots__", None)
        if not slots:
            raise ValueError(f"{name}: only dataclasses, NamedTuples, structs, slotted classes and enums")
        fields = tuple(slots)
        build = lambda v, c=cls: _setattrs(object.__new__(c), v)
    record = _Record(name, cls, fields, defaults, build)
    RECORDS[name] = record
    _BY_TYPE[cls] = record
    return cls


def register_custom(cls: type, tag: str, encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> None:
    """``cls`` has its own plain form (``encode(value)``, plain values; ``decode`` builds it)."""
    _CUSTOM_ENCODE[cls] = (tag, encode)
    _CUSTOM_DECODE[tag] = decode


def _setattrs(obj: Any, values: dict[str, Any]) -> Any:
    for k, v in values.items():
        object.__setattr__(obj, k, v)  # frozen dataclasses too
    return obj


# -- values <-> plain trees ------------------------------------------------------------------
# A plain tree is what msgpack holds: None, bool, int, float, str, bytes, and lists. Every
# list is tagged by its first element:
#   ["l", *items] list, ["t", *items] tuple, ["s", ...] set, ["f", ...] frozenset,
#   ["d", k, v, ...] dict, ["c", k, n, ...] Counter, ["q", maxlen, *items] deque,
#   ["i", "123..."] an int beyond 64 bits, ["a", dtype, shape, bytes] array,
#   ["ao", shape, *items] object array, ["n", dtype, bytes] numpy scalar,
#   ["e", name, value] enum, ["o", name, field, value, ...] record,
#   ["S", field, value, ...] the declared state of an object rebuilt from config,
#   ["B", digest] a blob, ["Bi", frame] a blob written inline, [tag, ...] a custom type.

_SCALARS = (type(None), bool, float, str, bytes)


class Plain:
    """A value converted by :func:`to_plain` already (on the processing thread, while the
    rest is encoded later on a writer thread): written as it is."""

    __slots__ = ("tree",)

    def __init__(self, tree: Any) -> None:
        self.tree = tree


def to_plain(x: Any, blobs: Blobs | _Defer | None = None) -> Any:
    t = type(x)
    if t in _SCALARS:
        return x
    if t is int:
        return x if _INT_MIN <= x <= _INT_MAX else ["i", str(x)]
    if t is list:
        return ["l", *[to_plain(v, blobs) for v in x]]
    if t is dict:
        out: list[Any] = ["d"]
        for k, v in x.items():
            out.append(to_plain(k, blobs))
            out.append(to_plain(v, blobs))
        return out
    if t is tuple:
        return ["t", *[to_plain(v, blobs) for v in x]]
    record = _BY_TYPE.get(t)
    if record is not None:
        if isinstance(x, enum.Enum):
            return ["e", record.name, to_plain(x.value)]
        out = ["o", record.name]
        for f in record.fields:
            out.append(f)
            out.append(to_plain(getattr(x, f), blobs))
        return out
    custom = _CUSTOM_ENCODE.get(t)
    if custom is not None:
        return [custom[0], custom[1](x)]
    if t is Plain:
        return x.tree
    if t is np.ndarray:
        if x.dtype.str in _DTYPES:
            return ["a", x.dtype.str, list(x.shape), np.ascontiguousarray(x).tobytes()]
        if x.dtype == object:
            return ["ao", list(x.shape), *[to_plain(v, blobs) for v in x.ravel().tolist()]]
        raise StateError(f"cannot checkpoint an array of dtype {x.dtype}")
    if isinstance(x, np.generic) and x.dtype.str in _DTYPES:
        return ["n", x.dtype.str, x.tobytes()]
    if t is set or t is frozenset:
        return ["s" if t is set else "f", *[to_plain(v, blobs) for v in x]]
    if t is Counter:
        out = ["c"]
        for k, v in x.items():
            out.append(to_plain(k, blobs))
            out.append(to_plain(v, blobs))
        return out
    if t is deque:
        return ["q", x.maxlen, *[to_plain(v, blobs) for v in x]]
    if isinstance(getattr(t, "STATE", None), tuple):
        return ["S", *_state_pairs(x, blobs)]
    raise StateError(f"cannot checkpoint a {t.__module__}.{t.__qualname__} (not registered)")


def _state_pairs(obj: Any, blobs: Blobs | _Defer | None) -> list[Any]:
    out: list[Any] = []
    blobbed = getattr(obj, "BLOBS", ())  # an instance may opt out (a rolling baseline)
    for f in type(obj).STATE:
        v = getattr(obj, f)
        out.append(f)
        if f in blobbed and blobs is not None and v is not None:
            out.append(BlobRef(v) if blobs is DEFER else ["B", blobs.put(v)])  # type: ignore[union-attr]
        else:
            out.append(to_plain(v, blobs))
    return out


def from_plain(p: Any, blobs: BlobReader | None = None) -> Any:
    t = type(p)
    if t in _SCALARS or t is int:
        return p
    if t is not list or not p:
        raise StateError(f"unexpected {t.__name__} in a snapshot")
    tag = p[0]
    if tag == "l":
        return [from_plain(v, blobs) for v in p[1:]]
    if tag == "d":
        return {from_plain(p[i], blobs): from_plain(p[i + 1], blobs) for i in range(1, len(p), 2)}
    if tag == "t":
        return tuple(from_plain(v, blobs) for v in p[1:])
    if tag == "o":
        return _record(p, blobs)
    if tag == "a":
        _, dtype, shape, data = p
        if dtype not in _DTYPES:
            raise StateError(f"array dtype {dtype!r} is not allowed")
        if type(data) is not bytes or type(shape) is not list:
            raise StateError("malformed array")
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape([_int(s) for s in shape]).copy()
    if tag == "n":
        _, dtype, data = p
        if dtype not in _DTYPES or type(data) is not bytes:
            raise StateError(f"numpy scalar of dtype {dtype!r} is not allowed")
        return np.frombuffer(data, dtype=np.dtype(dtype))[0]
    if tag == "s":
        return {from_plain(v, blobs) for v in p[1:]}
    if tag == "f":
        return frozenset(from_plain(v, blobs) for v in p[1:])
    if tag == "c":
        return Counter({from_plain(p[i], blobs): from_plain(p[i + 1], blobs) for i in range(1, len(p), 2)})
    if tag == "q":
        maxlen = p[1]
        if maxlen is not None:
            _int(maxlen)
        return deque((from_plain(v, blobs) for v in p[2:]), maxlen=maxlen)
    if tag == "i":
        if type(p[1]) is not str or len(p[1]) > 400:
            raise StateError("malformed big integer")
        return int(p[1])
    if tag == "e":
        cls = _ENUMS.get(p[1])
        if cls is None:
            raise StateError(f"unknown enum {p[1]!r}")
        return cls(from_plain(p[2]))
    if tag == "ao":
        shape = [_int(s) for s in p[1]]
        arr = np.empty(len(p) - 2, dtype=object)
        arr[:] = [from_plain(v, blobs) for v in p[2:]]
        return arr.reshape(shape)
    if tag == "B":
        if blobs is None:
            raise StateError("a blob where none may be")
        return blobs.get(p[1])
    if tag == "Bi":  # a blob written inline (Blobs.name): its own frame, checked as one
        if type(p[1]) is not bytes:
            raise StateError("malformed inline blob")
        return unframe("blob", p[1], what="inline blob")
    if tag == "S":
        return Declared(p)
    decode = _CUSTOM_DECODE.get(tag)
    if decode is not None:
        return decode(p[1])
    raise StateError(f"unknown tag {tag!r}")


def _int(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise StateError(f"not a size: {x!r}")
    return x


def _record(p: list[Any], blobs: BlobReader | None) -> Any:
    record = RECORDS.get(p[1])
    if record is None:
        raise StateError(f"type {p[1]!r} is not one a snapshot may hold")
    values = {k: from_plain(v, blobs) for k, v in _pairs(p, 2, record.fields, record.name).items()}
    for f in record.fields:
        if f not in values:
            default = record.defaults.get(f)
            if default is None:
                raise StateError(f"{record.name} without its field {f!r}")
            values[f] = default()
    return record.build(values)


def _pairs(p: list[Any], start: int, allowed: tuple[str, ...], owner: str) -> dict[str, Any]:
    """The ``field, value`` pairs of ``p`` from ``start`` (values still plain)."""
    if (len(p) - start) % 2:
        raise StateError(f"{owner}: odd number of field entries")
    values: dict[str, Any] = {}
    for i in range(start, len(p), 2):
        name = p[i]
        if type(name) is not str or name not in allowed:
            raise StateError(f"{owner} has no field {name!r}")
        values[name] = p[i + 1]
    return values


# -- detectors: declared state set on an object built from config ------------------------------


def checkpointed(det: Any) -> bool:
    """Whether ``det``'s class declares the state a checkpoint keeps (``STATE``)."""
    return isinstance(getattr(type(det), "STATE", None), tuple)


def restore_detector(det: Any, state: Any, blobs: BlobReader | None = None) -> None:
    """Set the fields ``state`` (a detector's :class:`Declared` state, as a snapshot holds it)
    holds on ``det``, a detector the pipeline built from its rule. Only fields its class
    declares are set; one the state lacks (declared after it was written) keeps the value the
    constructor gave it."""
    if type(state) is not Declared:
        raise StateError(f"{type(det).__name__}: not a declared state")
    _restore_into(det, state.plain, blobs)


def _restore_into(obj: Any, state: Any, blobs: BlobReader | None) -> None:
    declared = getattr(type(obj), "STATE", None)
    owner = type(obj).__name__
    if not isinstance(declared, tuple):
        raise StateError(f"{owner} keeps no declared state")
    if type(state) is not list or not state or state[0] != "S":
        raise StateError(f"{owner}: not a declared state")
    nested: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for name, plain in _pairs(state, 1, declared, owner).items():
        if type(plain) is list and plain[:1] == ["S"]:
            nested[name] = plain
        else:
            values[name] = from_plain(plain, blobs)
    for name, plain in nested.items():
        _restore_into(getattr(obj, name, None), plain, blobs)
    for name, value in values.items():
        setattr(obj, name, value)


# -- what a snapshot may hold --------------------------------------------------------------------


def _register_builtin() -> None:
    from rollbackd.actions import base as actions_base
    from rollbackd.actions import intents
    from rollbackd.actions.policy import SafetyState
    from rollbackd.daemon.admission import DeploymentSeen
    from rollbackd.daemon.join import JoinStats, Pending
    from rollbackd.daemon.versions import VersionHistory, VersionSpan
    from rollbackd.daemon.windows import Pane, pane_columns, pane_from_columns
    from rollbackd.detectors import drift, latency, model_quality_measure, quality, stats
    from rollbackd.detectors.base import Labeled, Measurement
    from rollbackd.events import Deploy, Outcome, Prediction
    from rollbackd.rules.alerts import Alert, AlertState
    from rollbackd.rules.incidents import Incident, IncidentAlert

    for cls in (
        # events and the join buffer
        Prediction, Outcome, Deploy, Labeled, Pending, JoinStats, DeploymentSeen,
        # detectors' moving state
        Measurement, latency.LogSketch, drift._Chunks, drift.PartialReference, drift.Gathered,
        drift._Numeric, drift._Categorical,
        drift.WindowSummary, model_quality_measure.Tally,
        drift._Tested, drift._Pending, stats.CvmReference, stats.AdReference,
        stats.WassersteinReference, stats.PsiReference, quality._ColumnStats, quality._Profile,
        quality._Score,
        # alerts, incidents, versions, safety
        Alert, AlertState, Incident, IncidentAlert, VersionSpan, VersionHistory, SafetyState,
        # calls in flight
        intents.Record, intents.Notify, intents.Rollback, intents.Pause, intents.Confirm, intents.FollowUps,
        intents.Fill, actions_base.Notice, actions_base.AlertSummary, actions_base.RollbackPlan,
        actions_base.ActionResult,
    ):
        register(cls)

    def encode_pane(pane: Pane) -> Any:
        blob = pane_columns(pane)
        return blob if blob is not None else [to_plain(items) for items, _ in pane._lists()]

    def decode_pane(p: Any) -> Pane:
        if type(p) is bytes:
            return pane_from_columns(p)
        if type(p) is not list or len(p) != 3:
            raise StateError("malformed pane")
        lists = [from_plain(items) for items in p]
        for items, cls in zip(lists, (Prediction, Labeled, Deploy)):
            if type(items) is not list or any(type(x) is not cls for x in items):
                raise StateError(f"a pane's {cls.__name__} list holds something else")
        return Pane(*lists)

    register_custom(Pane, "P", encode_pane, decode_pane)


_register_builtin()
