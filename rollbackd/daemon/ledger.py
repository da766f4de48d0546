"""The audit ledger: every alert transition, incident change and action, with its evidence.

SQLite through sqlite-utils, WAL journal. Rows are only ever inserted (an action has a
``started`` row and a ``finished`` row, a run start a ``runs`` row and its clean end a
``run_ends`` row, rather than an update), so the table reads as a log. Each row carries the
``run_id`` of the process that wrote it: one ledger can hold a live daemon's history and drills
or replays without mixing them.

Every row is also a link of a chain: ``chain_seq`` numbers the rows of its chain 1, 2, 3 … with
no gap, ``prev_hash`` is the link before it and ``hash`` is :func:`link`: HMAC-SHA256 under the
ledger key (``ROLLBACKD_LEDGER_KEY``) of the ledger's id, the chain's name, ``chain_seq``,
``prev_hash`` and the row, or plain SHA-256 of the same for a ledger made without a key. There is
one chain per table and run for the tables a run writes, one per table for the tables several
processes write (``runs``, ``silences``, ``approvals`` …). The ``meta`` chain's first row says
whether the ledger is keyed, the key's id (never the key) and the ledger's random id, which
binds every row to this file. Checking the chains and anchors is ``rollbackd.daemon.audit``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from rollbackd.rules.silences import Silence


def _sqlite_utils() -> Any:
    """``sqlite_utils``, imported without pandas.

    sqlite_utils imports pandas whenever it is installed (for DataFrame inserts and a column
    type the ledger never uses): measured, 63 MB of RSS in every process that opens a ledger,
    a fifth of a 1M-event ``rollbackd replay``. Hidden while sqlite_utils is first imported
    (``import pandas`` then raises ImportError, which it expects); an import of pandas after
    it, or one already done, is unaffected.
    """
    hide = "pandas" not in sys.modules
    if hide:
        sys.modules["pandas"] = None  # type: ignore[assignment]
    try:
        import sqlite_utils
    finally:
        if hide and sys.modules.get("pandas", False) is None:
            del sys.modules["pandas"]
    return sqlite_utils


sqlite_utils = _sqlite_utils()

__all__ = ["Ledger", "LedgerKeyError", "LedgerMeta", "link", "key_id", "digest_rows"]

_SCHEMA: dict[str, dict[str, type]] = {
    # One row per start of a run: a restarted daemon continues its run id under a new `start`.
    # `summary` is only filled in by ledgers from before `run_ends`.
    "runs": {"run_id": str, "start": int, "mode": str, "source": str, "config": str, "started_wall": str,
             "summary": str},
    # A start that ended cleanly (not SIGKILLed, not crashed): its closing statistics.
    "run_ends": {"run_id": str, "start": int, "finished_wall": str, "summary": str},
    # A restart dropped a run's rows written after its last checkpoint (they are re-derived).
    "rewinds": {"run_id": str, "start": int, "table_name": str, "kept_chain_seq": int, "dropped": int},
    "alert_transitions": {
        "run_id": str, "ts": float, "alert_id": str, "rule": str, "deployment": str,
        "variant": str, "previous": str, "state": str, "severity": str, "incident_id": str,
        "value": float, "threshold": float, "p_value": float, "sample_size": int,
        "window_start": float, "window_end": float, "measurement": str,
    },
    "incidents": {
        "run_id": str, "ts": float, "incident_id": str, "change": str, "deployment": str,
        "variant": str, "rule": str, "severity": str, "data": str,
    },
    "actions": {
        "run_id": str, "ts": float, "incident_id": str, "action": str, "phase": str,
        "status": str, "rule": str, "deployment": str, "variant": str, "from_version": str,
        "to_version": str, "idempotency_key": str, "attempts": int, "detail": str, "data": str,
    },
    "counters": {"run_id": str, "name": str, "value": int},
    "silences": {
        "id": str, "deployment": str, "rule": str, "variant": str, "starts_at": float,
        "ends_at": float, "reason": str, "created_by": str, "created_wall": str,
    },
    "silence_expiries": {"silence_id": str, "expired_at": float, "by": str, "created_wall": str},
    # A human's answer to a rollback waiting for approval; `at` is event time, like a silence's.
    "acknowledgements": {"incident_id": str, "by": str, "at": float, "source": str, "created_wall": str},
    "approvals": {
        "incident_id": str, "decision": str, "by": str, "at": float, "reason": str,
        "source": str, "created_wall": str,
    },
    # A reload of a running daemon's rules (SIGHUP, the file changed): applied (ok) or refused
    # (failed, the running rules kept); added/changed/removed: rule names, comma-separated.
    "rule_reloads": {
        "run_id": str, "start": int, "result": str, "trigger": str, "source": str, "digest": str,
        "added": str, "changed": str, "removed": str, "detail": str, "created_wall": str,
    },
    # What the ledger is: `name` = 'ledger', `value` = JSON (see LedgerMeta). Chained like the rest.
    "meta": {"name": str, "value": str},
}

# Tables whose rows are chained per run (the pipeline's own writing); the rest are chained
# per table, written by several processes (CLI, HTTP) under a write lock.
RUN_CHAINED = ("alert_transitions", "incidents", "actions", "counters")
# The tables a restart rewinds to its checkpoint (see Ledger.rewind): an anchor covers their
# rows only up to a checkpoint.
REWOUND = ("alert_transitions", "incidents")
_CHAIN_COLS = {"chain_seq": int, "prev_hash": str, "hash": str}
# Columns outside the row's content: `chain_seq` is bound by the link itself.
UNHASHED = {"seq", "chain_seq", "prev_hash", "hash"}
# Format 1 also left out `runs.summary`: its closing statistics, set by an update.
_UNHASHED_V1 = {"seq", "prev_hash", "hash", "summary"}
FORMAT = 2


def _stored(value: Any, kind: type | None) -> Any:
    """``value`` as SQLite will hand it back, so a row hashes the same at insert and verify."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if kind is float:
        if isinstance(value, (int, float)):
            f = float(value)
            return None if math.isnan(f) else f
    elif kind is int:
        if isinstance(value, float):
            if math.isnan(value):
                return None
            return int(value) if value.is_integer() else value
    elif kind is str and isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else str(value)
    elif isinstance(value, float) and math.isnan(value):
        return None
    return value


def _content(row: dict[str, Any], unhashed: set[str] = UNHASHED) -> dict[str, Any]:
    # None-valued columns are left out, so a column added to a table later does not change the
    # links of the rows written before it.
    return {k: v for k, v in row.items() if k not in unhashed and v is not None}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link(key: bytes | None, ledger_id: str, chain: str, chain_seq: int, prev: str, row: dict[str, Any]) -> str:
    """The chain link of one row: HMAC-SHA256 under ``key`` (SHA-256 without one) of the
    ledger's id, the chain, the row's place in it, the link before it and its content. The
    ledger id and chain bind a row to its place: the same row copied into another ledger or
    chain, or moved within its own, does not link."""
    body = _canonical({"ledger": ledger_id, "chain": chain, "n": chain_seq, "prev": prev, "row": _content(row)})
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """The link of a row written by a ledger of format 1 (before ``chain_seq`` and keys)."""
    body = json.dumps(_content(row, _UNHASHED_V1), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def key_id(key: bytes) -> str:
    """What the ledger and its anchors say about their key: enough to tell two keys apart,
    nothing that helps to find it."""
    return hmac.new(key, b"rollbackd ledger key id", hashlib.sha256).hexdigest()[:16]


def chain_name(table: str, run_id: str | None) -> str:
    return f"{table}/{run_id or ''}" if table in RUN_CHAINED else table


class LedgerKeyError(ValueError):
    """The key given does not fit the ledger (missing, another key, or a key for an unkeyed
    ledger): nothing is written."""


@dataclass(frozen=True, slots=True)
class LedgerMeta:
    """The ``meta`` chain's ``ledger`` row."""

    ledger_id: str
    key_id: str | None  # None: chained with plain SHA-256
    tables: tuple[str, ...]  # every table this ledger must have
    legacy: dict[str, int]  # table -> last seq written before the ledger had this format

    def to_json(self) -> str:
        return json.dumps({"id": self.ledger_id, "format": FORMAT, "keyed": self.key_id is not None,
                           "key_id": self.key_id, "tables": list(self.tables), "legacy": self.legacy},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LedgerMeta:
        d = json.loads(text)
        return cls(str(d["id"]), d.get("key_id"), tuple(d.get("tables") or ()),
                   {str(k): int(v) for k, v in (d.get("legacy") or {}).items()})


def _key_problem(meta: LedgerMeta, key: bytes | None) -> str | None:
    if meta.key_id is not None and key is None:
        return (f"the ledger is keyed (key id {meta.key_id}): set ROLLBACKD_LEDGER_KEY or "
                "ROLLBACKD_LEDGER_KEY_FILE to write to it")
    if meta.key_id is not None and key is not None and key_id(key) != meta.key_id:
        return (f"the key given (id {key_id(key)}) is not the ledger's (id {meta.key_id}); "
                "keys cannot be rotated in a ledger")
    if meta.key_id is None and key is not None:
        return ("the ledger was made without a key and cannot take one now: start a new ledger "
                "file to chain it under a key")
    return None


# What an action row keeps in `data` beside its columns; `result` is what the backend returned
# (what it changed, a command's captured output).
_ACTION_DATA = {
    "notice", "evidence", "thread", "reason", "backend", "dry_run", "approval", "result", "verification",
}


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class Ledger:
    """Appends chained rows to the ledger at ``path`` under ``run_id``. ``key``: the ledger key
    (bytes), or None for a ledger chained with plain SHA-256. A new file takes the key (or its
    absence) it is made with; a key that does not fit an existing ledger leaves it readable but
    makes every write raise :class:`LedgerKeyError` (``key_problem`` says why beforehand)."""

    def __init__(self, path: str | Path = "rollbackd.db", run_id: str = "run", key: bytes | None = None) -> None:
        self.path = str(path)
        self.run_id = run_id
        self.key = key
        self.start: int | None = None  # this process's start of its run (see start_run)
        self.db = sqlite_utils.Database(self.path)
        if self.path != ":memory:":
            self.db.enable_wal()
        for name, columns in _SCHEMA.items():
            table = self.db.table(name)
            if not table.exists():
                table.create({"seq": int, **columns, **_CHAIN_COLS}, pk="seq")
            else:  # a ledger from an older rollbackd: new rows fill the new columns
                have = table.columns_dict
                for col, kind in {**columns, **_CHAIN_COLS}.items():
                    if col not in have:
                        table.add_column(col, kind)
        self._heads: dict[str, tuple[str, int]] = {}  # chain -> (hash, chain_seq) of its last row
        for name, cols in (
            ("alert_transitions", ["run_id", "deployment", "ts"]),
            ("incidents", ["run_id", "incident_id"]),
            ("actions", ["run_id", "incident_id"]),
        ):
            self.db.table(name).create_index(cols, if_not_exists=True)
        self.meta = self._describe()
        self.key_problem = _key_problem(self.meta, key)

    def _describe(self) -> LedgerMeta:
        """The ledger's ``meta`` row, written (under the write lock) by whoever opens it first."""
        self._lock()
        try:
            row = self.db.execute("select value from meta where name = 'ledger' order by seq limit 1").fetchone()
            if row is not None:
                self.db.conn.commit()
                try:
                    return LedgerMeta.from_json(row[0])
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise LedgerKeyError(f"{self.path}: the ledger's meta row is unreadable ({exc}); "
                                         "see rollbackd audit verify") from None
            # Rows already here were written by an older rollbackd: verified by its rules.
            legacy = {t: n for t in _SCHEMA
                      if (n := self.db.execute(f"select coalesce(max(seq), 0) from {t}").fetchone()[0])}
            self.meta = LedgerMeta(secrets.token_hex(16), key_id(self.key) if self.key else None,
                                   tuple(_SCHEMA), legacy)
            self._chained("meta", {"name": "ledger", "value": self.meta.to_json()})
        except BaseException:
            self.db.conn.rollback()
            raise
        self.db.conn.commit()
        return self.meta

    def _lock(self) -> None:
        if self.db.conn.in_transaction:
            self.db.conn.commit()
        self.db.execute("begin immediate")

    def _insert(self, table: str, row: dict[str, Any], under_lock: Callable[[], dict[str, Any]] | None = None) -> None:
        if self.key_problem is not None:
            raise LedgerKeyError(f"{self.path}: {self.key_problem}")
        if table in RUN_CHAINED:
            # Only this process writes this run's chain: its head is cached after one read.
            self._chained(table, {"run_id": self.run_id, **row})
            return
        # Shared chains: read the head and append under SQLite's write lock, so two
        # processes appending at once cannot fork the chain.
        self._lock()
        try:
            self._heads.pop(table, None)
            self._chained(table, {**row, **(under_lock() if under_lock else {})})
        except BaseException:
            self.db.conn.rollback()
            raise
        self.db.conn.commit()

    def _chained(self, table: str, row: dict[str, Any]) -> None:
        types = _SCHEMA[table]
        row = {k: _stored(v, types.get(k)) for k, v in row.items()}
        run_id = row.get("run_id") if table in RUN_CHAINED else None
        name = chain_name(table, run_id)
        head = self._heads.get(name)
        if head is None:
            where, args = ("where run_id = ?", [run_id]) if table in RUN_CHAINED else ("", [])
            last = self.db.execute(
                f"select hash, chain_seq from {table} {where} order by seq desc limit 1", args
            ).fetchone()
            head = ((last[0] or "", last[1] or 0) if last else ("", 0))
        n = head[1] + 1
        digest = link(self.key, self.meta.ledger_id, name, n, head[0], row)
        self.db.table(table).insert({**row, "chain_seq": n, "prev_hash": head[0], "hash": digest}, alter=True)
        self._heads[name] = (digest, n)

    def start_run(self, mode: str, source: str, config: str | None, started_wall: str) -> None:
        """A ``runs`` row for this start of the run: a restart under the same run id (a live
        daemon's) gets the next ``start`` number."""
        def number() -> dict[str, Any]:
            last, rows = self.db.execute(
                "select coalesce(max(start), 0), count(*) from runs where run_id = ?", [self.run_id]
            ).fetchone()
            self.start = max(last, rows) + 1
            return {"start": self.start}

        self._insert("runs", {"run_id": self.run_id, "mode": mode, "source": source,
                              "config": config or "", "started_wall": started_wall}, under_lock=number)

    def finish_run(self, summary: dict[str, Any], finished_wall: str | None = None) -> None:
        """This start ended cleanly: a ``run_ends`` row. A start killed before it has none."""
        self._insert("run_ends", {"run_id": self.run_id, "start": self.start,
                                  "finished_wall": finished_wall, "summary": _json(summary)})

    def alert(self, rec: dict[str, Any]) -> None:
        m = rec.get("measurement") or {}
        window = rec.get("window") or [None, None]
        self._insert(
            "alert_transitions",
            {
                "ts": rec["ts"], "alert_id": rec["alert_id"], "rule": rec["rule"],
                "deployment": rec["deployment"], "variant": rec["variant"],
                "previous": rec.get("previous"), "state": rec["state"],
                "severity": rec.get("severity"), "incident_id": rec.get("incident_id"),
                "value": m.get("value"), "threshold": m.get("threshold"),
                "p_value": m.get("p_value"), "sample_size": m.get("sample_size"),
                "window_start": window[0], "window_end": window[1], "measurement": _json(m),
            },
        )

    def incident(self, rec: dict[str, Any]) -> None:
        self._insert(
            "incidents",
            {
                "ts": rec["ts"], "incident_id": rec["incident_id"], "change": rec["state"],
                "deployment": rec["deployment"], "variant": rec.get("variant"),
                "rule": rec.get("rule"), "severity": rec.get("severity"),
                "data": _json({k: v for k, v in rec.items() if k not in {"ts", "kind"}}),
            },
        )

    def action(self, rec: dict[str, Any], phase: str) -> None:
        self._insert(
            "actions",
            {
                "ts": rec["ts"], "incident_id": rec.get("incident_id"), "action": rec["action"],
                "phase": phase, "status": rec.get("status"), "rule": rec.get("rule"),
                "deployment": rec["deployment"], "variant": rec.get("variant"),
                "from_version": rec.get("from_version"), "to_version": rec.get("to_version"),
                "idempotency_key": rec.get("idempotency_key"), "attempts": rec.get("attempts"),
                "detail": rec.get("detail"),
                "data": _json({k: v for k, v in rec.items() if k in _ACTION_DATA}),
            },
        )
        # The outbox rule: an action's start is durable before it runs, and its end right after.
        self.db.conn.commit()

    def counters(self, values: Iterable[tuple[str, int]]) -> None:
        for name, value in values:
            self._insert("counters", {"name": name, "value": int(value)})

    def commit(self) -> None:
        self.db.conn.commit()

    def close(self) -> None:
        self.db.conn.commit()
        self.db.close()

    # The outbox and restarts --------------------------------------------------------------
    def finished_action(self, key: str) -> dict[str, Any] | None:
        """This run's finished row for an action key (a rollback's idempotency key, a notice's
        key), or None: after a restart, a decision re-made from the checkpoint finds what was
        already done instead of doing it twice."""
        rows = list(self.db.query(
            "select * from actions where run_id = ? and idempotency_key = ? and phase = 'finished'"
            " order by seq limit 1", [self.run_id, key],
        ))
        return rows[0] if rows else None

    def high_water(self) -> dict[str, int]:
        """The last row of each re-derivable table: saved with a checkpoint."""
        return {
            t: self.db.execute(f"select coalesce(max(seq), 0) from {t}").fetchone()[0]
            for t in ("alert_transitions", "incidents")
        }

    def rewind(self, marks: dict[str, int]) -> int:
        """Drop this run's alert and incident rows written after a checkpoint: the restarted
        pipeline re-derives them identically. Action rows stay: they are the outbox. The run's
        chain now ends at the kept rows (a suffix went, the links hold); a ``rewinds`` row says
        so. Anchors never cover rows after a checkpoint (see ``audit.Anchoring``)."""
        n = 0
        for table, seq in marks.items():
            dropped = self.db.execute(
                f"delete from {table} where run_id = ? and seq > ?", [self.run_id, seq]
            ).rowcount
            self._heads.pop(chain_name(table, self.run_id), None)
            if dropped:
                kept = self.db.execute(f"select chain_seq from {table} where run_id = ? order by seq desc limit 1",
                                       [self.run_id]).fetchone()
                self._insert("rewinds", {"run_id": self.run_id, "start": self.start, "table_name": table,
                                         "kept_chain_seq": kept[0] if kept else 0, "dropped": dropped})
            n += dropped
        self.db.conn.commit()
        return n

    def rules_reload(self, row: dict[str, Any]) -> None:
        """A reload of this run's rules, applied or refused (``rule_reloads``)."""
        self._insert("rule_reloads", {"run_id": self.run_id, "start": self.start, **row})

    # Silences ---------------------------------------------------------------------------
    # A silence is a row in `silences`; expiring one early adds a row to `silence_expiries`
    # (nothing is updated), and the effective end is the earlier of the two.
    def add_silence(self, silence: Silence, created_wall: str) -> None:
        self._insert("silences", {**silence.to_record(), "created_wall": created_wall})

    def expire_silence(self, silence_id: str, at: float, by: str, created_wall: str) -> bool:
        if not list(self.db.query("select 1 from silences where id = ?", [silence_id])):
            return False
        self._insert(
            "silence_expiries",
            {"silence_id": silence_id, "expired_at": at, "by": by, "created_wall": created_wall},
        )
        return True

    def silences(self) -> list[Silence]:
        rows = self.db.query(
            "select s.*, (select min(expired_at) from silence_expiries e where e.silence_id = s.id)"
            " as expired_at from silences s order by s.starts_at, s.id"
        )
        out = []
        for r in rows:
            ends = r["ends_at"] if r["expired_at"] is None else min(r["ends_at"], r["expired_at"])
            if ends <= r["starts_at"]:
                continue  # expired before it began: matches nothing
            out.append(Silence(
                id=r["id"], deployment=r["deployment"], starts_at=r["starts_at"], ends_at=ends,
                reason=r["reason"], created_by=r["created_by"], rule=r["rule"], variant=r["variant"],
            ))
        return out

    # Approvals --------------------------------------------------------------------------
    def add_approval(self, incident_id: str, decision: str, by: str, at: float, created_wall: str,
                     reason: str = "", source: str = "cli") -> None:
        if decision not in ("approve", "reject"):
            raise ValueError(f"decision must be approve or reject, got {decision!r}")
        self._insert("approvals", {
            "incident_id": incident_id, "decision": decision, "by": by, "at": at,
            "reason": reason, "source": source, "created_wall": created_wall,
        })

    def acknowledge(self, incident_id: str, by: str, at: float, created_wall: str, source: str = "slack") -> None:
        """Someone took the incident: its repeat notices stop (see rules/incidents.py)."""
        self._insert("acknowledgements", {"incident_id": incident_id, "by": by, "at": at,
                                          "source": source, "created_wall": created_wall})

    def acknowledgements(self) -> dict[str, list[dict[str, Any]]]:
        """Every acknowledgement, by incident and in event-time order: pushed into a pipeline,
        where one stops the incident's repeat notices from its time on."""
        out: dict[str, list[dict[str, Any]]] = {}
        for row in self.db.query("select incident_id, by, at, source from acknowledgements order by at, seq"):
            out.setdefault(row["incident_id"], []).append(row)
        return out

    def approvals(self, incident_id: str) -> list[dict[str, Any]]:
        """Every answer recorded for ``incident_id``, by event time."""
        return self.answers().get(incident_id, [])

    def answers(self) -> dict[str, list[dict[str, Any]]]:
        """Every recorded answer, by incident and in event-time order: pushed into a pipeline,
        which picks the first one from a listed approver that its event time has reached."""
        out: dict[str, list[dict[str, Any]]] = {}
        for row in self.db.query(
            "select incident_id, decision, by, at, reason, source from approvals order by at, seq"
        ):
            out.setdefault(row["incident_id"], []).append(row)
        return out

    # Reading ----------------------------------------------------------------------------
    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        clauses = " and ".join(f"{k} = ?" for k in where) or "1"
        return list(self.db.query(f"select * from {table} where {clauses} order by seq", list(where.values())))



def digest_rows(path: str | Path, run_id: str, start: float, end: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(incident rows, finished rollback rows)`` of ``run_id`` for a digest of ``[start, end)``:
    every row before ``end`` of the incidents that changed in the period or had not resolved
    by its start. Read-only, on a connection of its own (the digest runs on another thread)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        ids = [r[0] for r in conn.execute(
            "select distinct incident_id from incidents i where run_id = ? and ts < ? and (ts >= ? or"
            " not exists (select 1 from incidents r where r.run_id = i.run_id and"
            "  r.incident_id = i.incident_id and r.change = 'resolved' and r.ts < ?))",
            [run_id, end, start, start],
        )]
        marks = ",".join("?" * len(ids))
        incidents = [dict(r) for r in conn.execute(
            f"select * from incidents where run_id = ? and ts < ? and incident_id in ({marks}) order by seq",
            [run_id, end, *ids],
        )]
        actions = [dict(r) for r in conn.execute(
            f"select * from actions where run_id = ? and ts < ? and phase = 'finished' and action = 'rollback'"
            f" and incident_id in ({marks}) order by seq", [run_id, end, *ids],
        )]
    finally:
        conn.close()
    return incidents, actions
