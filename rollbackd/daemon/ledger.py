"""The audit ledger: every alert transition, incident change and action, with its evidence.

SQLite through sqlite-utils, WAL journal. Rows are only ever inserted (an action has a
``started`` row and a ``finished`` row rather than an update), so the table reads as a log.
Each row carries the ``run_id`` of the process that wrote it: one ledger can hold a live
daemon's history and drills or replays without mixing them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from rollbackd.rules.silences import Silence

__all__ = ["Ledger"]

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
                table.create({"seq": int, **columns}, pk="seq")
        for name, cols in (
            ("alert_transitions", ["run_id", "deployment", "ts"]),
            ("incidents", ["run_id", "incident_id"]),
            ("actions", ["run_id", "incident_id"]),
        ):
            self.db.table(name).create_index(cols, if_not_exists=True)

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        row = {"run_id": self.run_id, **row}
        self.db.table(table).insert(row, alter=True)

    def start_run(self, mode: str, source: str, config: str | None, started_wall: str) -> None:
        self._insert("runs", {"mode": mode, "source": source, "config": config or "", "started_wall": started_wall})

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
                "data": _json({k: v for k, v in rec.items() if k in {"notice", "evidence", "thread", "reason", "backend", "dry_run"}}),
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
        self.db.conn.commit()
        return n

    # Silences ---------------------------------------------------------------------------
    # A silence is a row in `silences`; expiring one early adds a row to `silence_expiries`
    # (nothing is updated), and the effective end is the earlier of the two.
    def add_silence(self, silence: Silence, created_wall: str) -> None:
        self.db.table("silences").insert({**silence.to_record(), "created_wall": created_wall})
        self.db.conn.commit()

    def expire_silence(self, silence_id: str, at: float, by: str, created_wall: str) -> bool:
        if not list(self.db.query("select 1 from silences where id = ?", [silence_id])):
            return False
        self.db.table("silence_expiries").insert(
            {"silence_id": silence_id, "expired_at": at, "by": by, "created_wall": created_wall}
        )
        self.db.conn.commit()
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

    # Reading ----------------------------------------------------------------------------
    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        clauses = " and ".join(f"{k} = ?" for k in where) or "1"
        return list(self.db.query(f"select * from {table} where {clauses} order by seq", list(where.values())))
