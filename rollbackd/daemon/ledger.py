"""The audit ledger: every alert transition, incident change and action, with its evidence.

SQLite through sqlite-utils, WAL journal. Rows are only ever inserted (an action has a
``started`` row and a ``finished`` row rather than an update), so the table reads as a log.
Each row carries the ``run_id`` of the process that wrote it: one ledger can hold a live
daemon's history and drills or replays without mixing them.

Every row is also a link of a hash chain (``prev_hash``, ``hash = sha256(prev_hash +
canonical JSON of the row)``): one chain per table and run for the tables a run writes, one per
table for ``runs``, ``silences``, ``silence_expiries``, ``approvals`` and ``acknowledgements``. ``verify_chain`` finds
the first row that was edited, inserted or deleted out of turn (``rollbackd audit verify``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from rollbackd.rules.silences import Silence

__all__ = ["Ledger", "ChainBreak", "verify_chain", "digest_rows"]

_SCHEMA: dict[str, dict[str, type]] = {
    "runs": {"run_id": str, "mode": str, "source": str, "config": str, "started_wall": str, "summary": str},
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
}

# Tables whose rows are chained per run (the pipeline's own writing); the rest are chained
# per table, written by several processes (CLI, HTTP) under a write lock.
_RUN_CHAINED = ("alert_transitions", "incidents", "actions", "counters")
_CHAIN_COLS = ("prev_hash", "hash")
# Columns outside the chain: `runs.summary` is the run's closing statistics, set once by an
# update when the run ends; it is derived from the chained rows, not evidence itself.
_UNHASHED = {"seq", "prev_hash", "hash", "summary"}


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


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """The chain link of one row: None-valued columns are left out, so a column added to a
    table later does not change the hashes of the rows written before it."""
    content = {k: v for k, v in row.items() if k not in _UNHASHED and v is not None}
    body = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


# What an action row keeps in `data` beside its columns; `result` is what the backend returned
# (what it changed, a command's captured output).
_ACTION_DATA = {
    "notice", "evidence", "thread", "reason", "backend", "dry_run", "approval", "result", "verification",
}


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class Ledger:
    def __init__(self, path: str | Path = "rollbackd.db", run_id: str = "run") -> None:
        self.path = str(path)
        self.run_id = run_id
        self.db = sqlite_utils.Database(self.path)
        if self.path != ":memory:":
            self.db.enable_wal()
        for name, columns in _SCHEMA.items():
            table = self.db.table(name)
            if not table.exists():
                table.create({"seq": int, **columns, "prev_hash": str, "hash": str}, pk="seq")
            else:
                for col in _CHAIN_COLS:  # a ledger from before the chain: new rows are chained
                    if col not in table.columns_dict:
                        table.add_column(col, str)
        self._heads: dict[tuple[str, str], str] = {}
        for name, cols in (
            ("alert_transitions", ["run_id", "deployment", "ts"]),
            ("incidents", ["run_id", "incident_id"]),
            ("actions", ["run_id", "incident_id"]),
        ):
            self.db.table(name).create_index(cols, if_not_exists=True)

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        if table in _RUN_CHAINED:
            # Only this process writes this run's chain: its head is cached after one read.
            self._chained(table, {"run_id": self.run_id, **row}, self.run_id)
            return
        # Shared chains: read the head and append under SQLite's write lock, so two
        # processes appending at once cannot fork the chain.
        if self.db.conn.in_transaction:
            self.db.conn.commit()
        self.db.execute("begin immediate")
        try:
            self._heads.pop((table, ""), None)
            self._chained(table, row, None)
        except BaseException:
            self.db.conn.rollback()
            raise
        self.db.conn.commit()

    def _chained(self, table: str, row: dict[str, Any], run_id: str | None) -> None:
        types = _SCHEMA[table]
        row = {k: _stored(v, types.get(k)) for k, v in row.items()}
        key = (table, run_id or "")
        prev = self._heads.get(key)
        if prev is None:
            where, args = ("where run_id = ?", [run_id]) if run_id is not None else ("", [])
            last = self.db.execute(
                f"select hash from {table} {where} order by seq desc limit 1", args
            ).fetchone()
            prev = (last[0] if last else None) or ""
        digest = row_hash(prev, row)
        self.db.table(table).insert({**row, "prev_hash": prev, "hash": digest}, alter=True)
        self._heads[key] = digest

    def start_run(self, mode: str, source: str, config: str | None, started_wall: str) -> None:
        self._insert("runs", {"run_id": self.run_id, "mode": mode, "source": source,
                              "config": config or "", "started_wall": started_wall})

    def finish_run(self, summary: dict[str, Any]) -> None:
        self.db.execute(
            "update runs set summary = ? where run_id = ?", [_json(summary), self.run_id]
        )
        self.db.conn.commit()

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
        pipeline re-derives them identically. Action rows stay: they are the outbox."""
        n = 0
        for table, seq in marks.items():
            n += self.db.execute(
                f"delete from {table} where run_id = ? and seq > ?", [self.run_id, seq]
            ).rowcount
            # The run's chain now ends at the kept rows: a suffix went, the links hold.
            self._heads.pop((table, self.run_id), None)
        self.db.conn.commit()
        return n

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
        """Someone took the incident: recorded for the timeline, changes no decision."""
        self._insert("acknowledgements", {"incident_id": incident_id, "by": by, "at": at,
                                          "source": source, "created_wall": created_wall})

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


# Audit ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChainBreak:
    table: str
    seq: int
    run_id: str | None
    reason: str

    def __str__(self) -> str:
        run = f" (run {self.run_id})" if self.run_id else ""
        return f"{self.table} row seq={self.seq}{run}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    rows: int
    unchained: int  # rows written before the ledger had a chain
    heads: dict[str, str]  # chain -> hash of its last row: keep a copy elsewhere to detect truncation
    breaks: list[ChainBreak]


def verify_chain(path: str | Path) -> ChainReport:
    """Recompute every chain of the ledger at ``path`` (read-only); a row that was edited,
    inserted or deleted out of turn breaks its chain from that row on. Only the first break of
    each chain is reported: everything after it is unverifiable."""
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    rows = unchained = 0
    heads: dict[str, str] = {}
    breaks: list[ChainBreak] = []
    try:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
        for table in _SCHEMA:
            if table not in tables:
                continue
            per_run = table in _RUN_CHAINED
            last: dict[str, str] = {}
            started: set[str] = set()
            broken: set[str] = set()
            for r in conn.execute(f"select * from {table} order by seq"):
                rows += 1
                row = dict(r)
                chain = row.get("run_id") or "" if per_run else ""
                name = f"{table}/{chain}" if per_run else table
                if chain in broken:
                    continue
                if row.get("hash") is None:
                    if chain in started:
                        breaks.append(ChainBreak(table, row["seq"], row.get("run_id"), "hash missing"))
                        broken.add(chain)
                    else:
                        unchained += 1
                    continue
                prev = last.get(chain, "")
                if (row.get("prev_hash") or "") != prev:
                    breaks.append(ChainBreak(
                        table, row["seq"], row.get("run_id"),
                        "prev_hash does not match the previous row (a row was deleted or inserted)",
                    ))
                    broken.add(chain)
                    continue
                if row_hash(prev, row) != row["hash"]:
                    breaks.append(ChainBreak(table, row["seq"], row.get("run_id"),
                                             "content does not match its hash (the row was edited)"))
                    broken.add(chain)
                    continue
                started.add(chain)
                last[chain] = heads[name] = row["hash"]
    finally:
        conn.close()
    return ChainReport(rows, unchained, dict(sorted(heads.items())), breaks)


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
