"""Anchors: the ledger's chain heads, signed and kept outside it.

A chain shows an edited, inserted, moved or deleted row by itself, but not that its *last*
rows are gone, nor (without a key) that it was rewritten and re-linked from some row on: only a
copy of its head kept somewhere else shows that. An anchor is that copy: for each chain, the
``chain_seq`` and ``hash`` of its last row, with the ledger's id, the run and time,
signed with HMAC-SHA256 under the ledger key (a plain SHA-256 checksum without one). Anchors go
to :class:`AnchorSink` s: an append-only file of JSON lines (:class:`AnchorFile`), and any other
place the daemon is given (the Kafka decisions topic). ``rollbackd audit verify --anchors FILE``
(:func:`verify_ledger`) checks the ledger against every one.

A live daemon rewinds its alert and incident rows written after its last checkpoint when it
restarts (:meth:`Ledger.rewind`): those rows are not final, so an anchor covers them only up to
the checkpoint's marks, published once the checkpoint is on disk. An honest restart never cuts
an anchored row; a cut anchored row is never a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import structlog

from rollbackd.daemon.ledger import (
    _SCHEMA, REWOUND, RUN_CHAINED, Ledger, LedgerMeta, chain_name, key_id, link, row_hash,
)

__all__ = ["AnchorSink", "AnchorFile", "Anchoring", "sign_anchor", "anchor_problem", "read_anchors",
           "ledger_key", "MIN_KEY_BYTES", "verify_ledger", "AuditReport", "ChainBreak", "AuditRefused"]

log = structlog.get_logger("rollbackd.audit")

ANCHOR_VERSION = 1
MIN_KEY_BYTES = 16


@runtime_checkable
class AnchorSink(Protocol):
    """Somewhere outside the ledger that keeps anchors: an append-only file, a Kafka topic.

    ``publish`` gets the signed anchor as a JSON-ready dict (see :func:`sign_anchor`) and keeps
    it as it is; written as one JSON line, ``rollbackd audit verify --anchors`` reads it back.
    A Kafka sink produces ``json.dumps(anchor)`` to the decisions topic (key
    ``anchor/<ledger_id>``); dumping those records one per line makes an anchor file. It may
    raise: the daemon logs and counts a failed publish and goes on."""

    def publish(self, anchor: dict[str, Any]) -> None: ...


class AnchorFile:
    """Appends each anchor as one JSON line, synced to disk before ``publish`` returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def publish(self, anchor: dict[str, Any]) -> None:
        line = (json.dumps(anchor, sort_keys=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one line: appends from several processes do not mix
            os.fsync(fd)
        finally:
            os.close(fd)


def _body(anchor: Mapping[str, Any]) -> bytes:
    content = {k: v for k, v in anchor.items() if k != "mac"}
    return b"rollbackd anchor\n" + json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def sign_anchor(anchor: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """``anchor`` with its ``mac``: ``hmac-sha256:…`` under ``key``, or ``sha256:…`` (a checksum
    anyone can recompute) without one."""
    if key is None:
        return {**anchor, "mac": "sha256:" + hashlib.sha256(_body(anchor)).hexdigest()}
    return {**anchor, "mac": "hmac-sha256:" + hmac.new(key, _body(anchor), hashlib.sha256).hexdigest()}


def anchor_problem(anchor: Mapping[str, Any], key: bytes | None) -> str | None:
    """Why ``anchor`` cannot be trusted as it is, or None."""
    mac = anchor.get("mac")
    if not isinstance(mac, str):
        return "it has no signature"
    if key is not None and not mac.startswith("hmac-sha256:"):
        return "it is not signed with a key (the ledger is keyed)"
    if not hmac.compare_digest(sign_anchor(dict(anchor), key if mac.startswith("hmac") else None)["mac"], mac):
        return ("its signature does not match: it was altered, forged, or signed with another key"
                if mac.startswith("hmac") else "its checksum does not match: it was altered")
    return None


def read_anchors(path: str | Path) -> list[tuple[int, dict[str, Any] | str]]:
    """``(line number, anchor)`` for each line of an anchor file, or ``(line number, why it is
    not one)``: a damaged line is reported, never a traceback."""
    out: list[tuple[int, dict[str, Any] | str]] = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                anchor = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                out.append((n, f"not JSON ({exc})"))
                continue
            chains = anchor.get("chains") if isinstance(anchor, dict) else None
            if not isinstance(chains, dict) or not all(
                isinstance(c, dict) and isinstance(c.get("seq"), int) and isinstance(c.get("hash"), str)
                for c in chains.values()
            ):
                out.append((n, "not a rollbackd anchor (no chains with seq and hash)"))
                continue
            out.append((n, anchor))
    return out


def chain_heads(ledger: Ledger, bounds: Mapping[str, int] | None) -> dict[str, dict[str, Any]]:
    """Chain -> ``{"seq", "hash"}`` of its last row (one indexed lookup per chain: this runs
    on the processing thread at every checkpoint, so nothing here counts rows): every shared chain and this run's
    chains. ``bounds`` (table -> last ``seq``, a checkpoint's marks) limits the rewound tables;
    a rewound table missing from ``bounds`` is left out (none of its rows is final yet)."""
    heads: dict[str, dict[str, Any]] = {}
    for table in _SCHEMA:
        where, args = "1", []
        if table in RUN_CHAINED:
            where, args = "run_id = ?", [ledger.run_id]
            if table in REWOUND and bounds is not None:
                if table not in bounds:
                    continue
                where, args = "run_id = ? and seq <= ?", [ledger.run_id, bounds[table]]
        last = ledger.db.execute(
            f"select hash, chain_seq from {table} where {where} order by seq desc limit 1", args,
        ).fetchone()
        if last is not None and last[0] is not None:
            heads[chain_name(table, ledger.run_id)] = {"seq": last[1] or 0, "hash": last[0]}
    return heads


class Anchoring:
    """Publishes anchors of one ledger writer's chains (its run's and the shared ones) to
    ``sinks``. ``rewound``: the writer is a live daemon whose restart rewinds its alert and
    incident rows to its checkpoint; they are then anchored only up to the marks of a
    checkpoint that is on disk (``publish(at, marks)`` right after saving it)."""

    def __init__(self, ledger: Ledger, sinks: Sequence[AnchorSink], *, rewound: bool = False) -> None:
        self.ledger = ledger
        self.sinks = list(sinks)
        self.rewound = rewound
        self.marks: dict[str, int] | None = {} if rewound else None
        self.published = 0
        self.failed = 0
        self._last: dict[str, dict[str, Any]] | None = None

    def publish(self, at: float, marks: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        """Anchor the heads now (``at``: wall-clock Unix seconds); ``marks``: the checkpoint just
        saved. Nothing is published when no head moved since the last anchor."""
        if marks is not None and self.rewound:
            self.marks = dict(marks)
        chains = chain_heads(self.ledger, self.marks)
        if not chains or chains == self._last:
            return None
        meta = self.ledger.meta
        anchor = sign_anchor({
            "anchor": ANCHOR_VERSION, "ledger_id": meta.ledger_id, "key_id": meta.key_id,
            "run_id": self.ledger.run_id, "start": self.ledger.start, "at": at,
            "wall": datetime.fromtimestamp(at, timezone.utc).isoformat(), "chains": chains,
        }, self.ledger.key)
        for sink in self.sinks:
            try:
                sink.publish(anchor)
            except Exception as exc:  # an anchor not kept weakens the audit; it never stops the daemon
                self.failed += 1
                log.error("ledger.anchor_failed", sink=type(sink).__name__, error=str(exc))
        self.published += 1
        self._last = chains
        return anchor


def ledger_key(key_file: str | None, key_text: str | None) -> bytes | None:
    """The ledger key from a key file (``--ledger-key-file`` / ``ROLLBACKD_LEDGER_KEY_FILE``;
    its bytes, without surrounding whitespace) or from ``ROLLBACKD_LEDGER_KEY`` (its UTF-8
    bytes); None when neither is set. Raises ``ValueError`` saying what is wrong."""
    if key_file and key_text:
        raise ValueError("both a ledger key file and ROLLBACKD_LEDGER_KEY are set: give one")
    if key_file:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"ledger key file {key_file}: {exc.strerror or exc}") from None
        where = f"ledger key file {key_file}"
    elif key_text:
        key, where = key_text.encode(), "ROLLBACKD_LEDGER_KEY"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{where}: a ledger key must be at least {MIN_KEY_BYTES} bytes, got {len(key)} "
                         "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')")
    return key


# Verification ---------------------------------------------------------------------------
class AuditRefused(Exception):
    """The ledger cannot be checked as asked (a keyed ledger without its key, another key)."""


@dataclass(frozen=True, slots=True)
class ChainBreak:
    table: str
    seq: int | None
    run_id: str | None
    reason: str

    def __str__(self) -> str:
        run = f" (run {self.run_id})" if self.run_id else ""
        where = f"{self.table} row seq={self.seq}" if self.seq is not None else self.table
        return f"{where}{run}: {self.reason}"


@dataclass(slots=True)
class AuditReport:
    rows: int = 0
    legacy: int = 0  # rows written by a rollbackd before chain_seq and keys: checked by its rules
    unchained: int = 0  # rows written before the ledger had any chain: not verifiable
    ledger_id: str | None = None
    key_id: str | None = None  # None: the ledger is chained with plain SHA-256
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)  # chain -> (chain_seq, hash)
    anchors: int = 0  # anchors checked
    last_anchor: str | None = None  # the newest anchor's wall time
    unfinished: list[tuple[str, int | None, str]] = field(default_factory=list)  # run, start, started_wall
    breaks: list[ChainBreak] = field(default_factory=list)


@dataclass(slots=True)
class _Chain:
    hash: str = ""
    seq: int = 0  # chain_seq of the last row (0: none yet, or only legacy rows)
    rows: int = 0
    started: bool = False  # a linked row was seen: a later row without a link is a break
    broken: bool = False
    at: dict[int, str] = field(default_factory=dict)  # chain_seq -> hash, where an anchor asks



def verify_ledger(path: str | Path, key: bytes | None = None,
                  anchors: Sequence[tuple[int, dict[str, Any] | str]] = ()) -> AuditReport:
    """Check the ledger at ``path`` (read-only): every chain, link by link, then every anchor.
    Only the first break of each chain is reported: everything after it is unverifiable.
    Raises :class:`AuditRefused` for a keyed ledger without its key (or with another)."""
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    report = AuditReport()
    try:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
        meta = _meta(conn, tables, report)
        if meta is not None and not meta.ledger_id:
            return report  # without its meta row, no link of the ledger can be checked
        if meta is not None:
            _check_key(meta, key, report)
            key = key if meta.key_id is not None else None
            for table in meta.tables:
                if table not in tables:
                    report.breaks.append(ChainBreak(table, None, None,
                                                    "table is missing: it was dropped (every row of it is gone)"))
        elif key is not None or any(isinstance(a, dict) for _, a in anchors):
            # Only a ledger no rollbackd with keys and anchors ever opened lacks its meta row;
            # one that had a key or published anchors lost it (and maybe was re-linked as format 1).
            report.breaks.append(ChainBreak("meta", None, None, "the ledger has no meta row, yet it "
                                            + ("was given a key" if key is not None else "has anchors")
                                            + ": its meta table was dropped and its chains rewritten"))
        wanted: dict[str, set[int]] = {}
        for _, anchor in anchors:
            if isinstance(anchor, dict):
                for name, head in anchor["chains"].items():
                    wanted.setdefault(name, set()).add(head["seq"])
        chains: dict[str, _Chain] = {}
        for table in [t for t in _SCHEMA if t in tables]:
            try:
                _walk(conn, table, meta, key, report, chains, wanted)
            except sqlite3.Error as exc:
                report.breaks.append(ChainBreak(table, None, None, f"table cannot be read ({exc})"))
        report.heads = {n: (c.seq, c.hash) for n, c in sorted(chains.items()) if c.started}
        if meta is not None:
            _check_anchors(anchors, meta, key, chains, report)
            _unfinished(conn, report)
    finally:
        conn.close()
    return report


def _meta(conn: sqlite3.Connection, tables: set[str], report: AuditReport) -> LedgerMeta | None:
    row = None
    if "meta" in tables:
        try:
            row = conn.execute("select seq, value from meta where name = 'ledger' order by seq limit 1").fetchone()
        except sqlite3.Error:
            row = None
    if row is None:
        # A ledger from before chain_seq: fine if no row has one, else its meta was removed.
        for t in [t for t in _SCHEMA if t in tables and t != "meta"]:
            try:
                hit = conn.execute(f"select seq from {t} where chain_seq is not null limit 1").fetchone()
            except sqlite3.Error:
                continue  # no chain_seq column: written before it existed
            if hit is not None:
                report.breaks.append(ChainBreak("meta", None, None, "the ledger's meta row is missing (deleted, "
                                                "or its table dropped) though its rows carry chain_seq"))
                return LedgerMeta("", None, (), {})
        return None
    try:
        meta = LedgerMeta.from_json(row["value"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        report.breaks.append(ChainBreak("meta", row["seq"], None, f"the ledger's meta row is unreadable ({exc})"))
        return LedgerMeta("", None, (), {})
    report.ledger_id, report.key_id = meta.ledger_id, meta.key_id
    return meta


def _check_key(meta: LedgerMeta, key: bytes | None, report: AuditReport) -> None:
    if meta.key_id is not None and key is None:
        raise AuditRefused(f"the ledger is keyed (key id {meta.key_id}): give its key (ROLLBACKD_LEDGER_KEY, "
                           "ROLLBACKD_LEDGER_KEY_FILE or --ledger-key-file) to verify it")
    if meta.key_id is not None and key is not None and key_id(key) != meta.key_id:
        raise AuditRefused(f"the key given (id {key_id(key)}) is not the ledger's (id {meta.key_id})")
    if meta.key_id is None and key is not None:
        report.breaks.append(ChainBreak("meta", None, None, "the ledger says it was made without a key, but a key "
                                        "was given: it was made unkeyed, or its meta row was rewritten to drop the key"))


def _walk(conn: sqlite3.Connection, table: str, meta: LedgerMeta | None, key: bytes | None,
          report: AuditReport, chains: dict[str, _Chain], wanted: dict[str, set[int]]) -> None:
    legacy_until = meta.legacy.get(table, 0) if meta is not None else None
    for r in conn.execute(f"select * from {table} order by seq"):
        report.rows += 1
        row = dict(r)
        run_id = row.get("run_id") if table in RUN_CHAINED else None
        name = chain_name(table, run_id if isinstance(run_id, str) else repr(run_id))
        chain = chains.setdefault(name, _Chain())
        if chain.broken:
            continue
        legacy = legacy_until is None or row["seq"] <= legacy_until
        if legacy and row.get("hash") is None and not chain.started:
            report.unchained += 1  # written before the ledger had any chain
            continue
        why = _blob(table, row) or (
            _legacy_link(row, chain, report) if legacy else _link(row, chain, name, meta, key))
        if why is not None:
            report.breaks.append(ChainBreak(table, row.get("seq"), run_id if isinstance(run_id, str) else None, why))
            chain.broken = True
            continue
        chain.rows += 1
        if chain.seq in wanted.get(name, ()):
            chain.at[chain.seq] = chain.hash


def _blob(table: str, row: dict[str, Any]) -> str | None:
    for col, value in row.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            kind = {str: "text", int: "an integer", float: "a number"}.get(_SCHEMA[table].get(col, str), "text")
            return f"column {col} holds a BLOB where {kind} belongs (the row was altered)"
    return None


def _legacy_link(row: dict[str, Any], chain: _Chain, report: AuditReport) -> str | None:
    """A row of a ledger from before chain_seq: linked by ``row_hash``, or not at all."""
    if row.get("hash") is None:
        return "hash missing (set to NULL)"
    if row.get("chain_seq") is not None:
        return "chain_seq set on a row written before the ledger had chain_seq (the row was altered)"
    if (row.get("prev_hash") or "") != chain.hash:
        return "prev_hash does not match the previous row (a row was deleted or inserted)"
    if row_hash(chain.hash, row) != row["hash"]:
        return "content does not match its hash (the row was edited)"
    report.legacy += 1
    chain.hash, chain.started = row["hash"], True
    return None


def _link(row: dict[str, Any], chain: _Chain, name: str, meta: LedgerMeta | None, key: bytes | None) -> str | None:
    missing = [c for c in ("chain_seq", "prev_hash", "hash") if row.get(c) is None]
    if missing:
        return f"{'/'.join(missing)} missing (set to NULL, or the row was inserted without a link)"
    n = row["chain_seq"]
    if not isinstance(n, int) or n != chain.seq + 1:
        if isinstance(n, int) and n > chain.seq + 1:
            return (f"chain_seq {n} where {chain.seq + 1} belongs: row(s) {chain.seq + 1}..{n - 1} of the chain "
                    "were deleted, or rows are out of order")
        return (f"chain_seq {n!r} where {chain.seq + 1} belongs: a row was inserted, copied or moved "
                "(rows are out of order)")
    if row["prev_hash"] != chain.hash:
        return "prev_hash does not match the previous row's hash (a row was deleted, inserted or moved)"
    assert meta is not None
    if link(key, meta.ledger_id, name, n, chain.hash, row) != row["hash"]:
        if key is not None:
            return ("its MAC does not match: the row was edited, copied from another ledger or chain, or "
                    "its chain recomputed without the key")
        return "content does not match its hash (the row was edited, or copied from another ledger or chain)"
    chain.hash, chain.seq, chain.started = row["hash"], n, True
    return None


def _check_anchors(anchors: Sequence[tuple[int, dict[str, Any] | str]], meta: LedgerMeta, key: bytes | None,
                   chains: dict[str, _Chain], report: AuditReport) -> None:
    for line, anchor in anchors:
        if isinstance(anchor, str):
            report.breaks.append(ChainBreak("anchors", None, None, f"line {line}: {anchor}"))
            continue
        when = anchor.get("wall") or anchor.get("at")
        problem = anchor_problem(anchor, key)
        if problem is None and anchor.get("ledger_id") != meta.ledger_id:
            problem = (f"it is of another ledger (id {anchor.get('ledger_id')}; this one is {meta.ledger_id}): "
                       "the ledger file was replaced, or this is another ledger's anchor file")
        if problem is not None:
            report.breaks.append(ChainBreak("anchors", None, None, f"line {line} ({when}): {problem}"))
            continue
        report.anchors += 1
        report.last_anchor = str(when)
        for name, head in sorted(anchor["chains"].items()):
            why = _against(chains.get(name), head)
            if why is not None:
                report.breaks.append(ChainBreak(name, None, None, f"{why} (anchor line {line}, {when}, "
                                                f"up to chain_seq {head['seq']})"))


def _against(chain: _Chain | None, head: Mapping[str, Any]) -> str | None:
    if chain is None or chain.rows == 0:
        return "chain is missing: every row of it was deleted, or its table dropped"
    if chain.broken and head["seq"] not in chain.at:
        return None  # reported where it broke
    if head["seq"] not in chain.at:
        return (f"chain ends at chain_seq {chain.seq}, short of the anchor: its last "
                f"{head['seq'] - chain.seq} row(s) were deleted")
    if chain.at[head["seq"]] != head["hash"]:
        return f"row chain_seq {head['seq']} differs from the anchor: the chain was rewritten and re-linked"
    return None


def _unfinished(conn: sqlite3.Connection, report: AuditReport) -> None:
    """Starts with no ``run_ends`` row: killed, crashed, or still running."""
    try:
        rows = conn.execute(
            "select r.run_id, r.start, r.started_wall from runs r where r.start is not null and not exists"
            " (select 1 from run_ends e where e.run_id = r.run_id and e.start = r.start) order by r.seq"
        ).fetchall()
    except sqlite3.Error:
        return  # a table missing is reported as such
    report.unfinished = [(str(r[0]), r[1], str(r[2])) for r in rows]
