"""The audit ledger on a real SQLite file."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rollbackd.daemon.ledger import _SCHEMA, Ledger

T0 = 1_790_000_000.0
TABLES = {"runs", "run_ends", "rewinds", "meta", "alert_transitions", "incidents", "actions", "counters"}


def alert_rec(**kw) -> dict:
    rec = {
        "ts": T0, "kind": "alert", "alert_id": "a1", "rule": "error-rate", "deployment": "fraud",
        "variant": "canary", "severity": "critical", "state": "firing", "previous": "pending",
        "incident_id": "inc-1",
        "measurement": {"value": 0.2, "threshold": 0.05, "p_value": 1e-9, "sample_size": 400,
                        "evidence": {"errors": 80}},
        "window": [T0 - 60, T0],
    }
    rec.update(kw)
    return rec


def rollback_rec(**kw) -> dict:
    rec = {
        "ts": T0 + 30, "kind": "action", "action": "rollback", "incident_id": "inc-1",
        "deployment": "fraud", "variant": "canary", "rule": "error-rate", "from_version": "v2",
        "to_version": "v1", "idempotency_key": "inc-1:rollback:canary:v1", "status": "started",
    }
    rec.update(kw)
    return rec


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ledger.db"


def raw(path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_new_file_gets_every_table_in_wal_mode(path):
    Ledger(path, "r1").close()
    tables = {name for (name,) in raw(path, "select name from sqlite_master where type='table'")}
    assert tables == set(_SCHEMA) and TABLES <= tables
    assert raw(path, "pragma journal_mode") == [("wal",)]
    indexes = {n for (n,) in raw(path, "select name from sqlite_master where type='index'")}
    assert len(indexes) == 3


def test_rows_are_written_with_the_run_id_and_read_back_in_order(path):
    led = Ledger(path, "live-1")
    led.start_run("live", "kafka://broker/predictions", None, "2026-09-21T14:13:20Z")
    led.alert(alert_rec())
    led.incident({"ts": T0, "kind": "incident", "state": "opened", "incident_id": "inc-1",
                  "deployment": "fraud", "variant": "canary", "rule": "error-rate",
                  "severity": "critical", "version": "v2"})
    led.action(rollback_rec(), "started")
    led.action(rollback_rec(status="succeeded", attempts=2, detail="200 OK"), "finished")
    led.counters([("predictions", 1200), ("late", 3)])
    led.finish_run({"alerts": 1}, "2026-09-21T15:00:00Z")
    led.close()

    # Read back from a separate connection: everything was committed.
    led = Ledger(path, "live-1")
    (run,) = led.rows("runs")
    assert {k: run[k] for k in ("run_id", "start", "mode", "source", "config")} == {
        "run_id": "live-1", "start": 1, "mode": "live", "source": "kafka://broker/predictions", "config": "",
    }
    (end,) = led.rows("run_ends")
    assert (end["run_id"], end["start"], end["finished_wall"]) == ("live-1", 1, "2026-09-21T15:00:00Z")
    assert json.loads(end["summary"]) == {"alerts": 1}
    (tr,) = led.rows("alert_transitions")
    assert (tr["alert_id"], tr["previous"], tr["state"], tr["incident_id"]) == ("a1", "pending", "firing", "inc-1")
    assert (tr["value"], tr["threshold"], tr["p_value"], tr["sample_size"]) == (0.2, 0.05, 1e-9, 400)
    assert (tr["window_start"], tr["window_end"]) == (T0 - 60, T0)
    assert json.loads(tr["measurement"])["evidence"] == {"errors": 80}
    (inc,) = led.rows("incidents")
    assert (inc["change"], inc["incident_id"], inc["severity"]) == ("opened", "inc-1", "critical")
    assert json.loads(inc["data"])["version"] == "v2"
    started, finished = led.rows("actions", incident_id="inc-1")
    assert (started["phase"], started["status"], started["attempts"]) == ("started", "started", None)
    assert (finished["phase"], finished["status"], finished["attempts"], finished["detail"]) == (
        "finished", "succeeded", 2, "200 OK",
    )
    assert started["seq"] < finished["seq"]
    assert [(c["name"], c["value"]) for c in led.rows("counters")] == [("predictions", 1200), ("late", 3)]
    led.close()


def test_an_action_start_is_durable_before_the_action_runs(path):
    led = Ledger(path, "r1")
    led.action(rollback_rec(), "started")
    # Another process looking now (the daemon might crash inside the backend call) sees it.
    assert raw(path, "select phase, status from actions") == [("started", "started")]
    led.close()


def test_runs_are_kept_apart_in_one_file(path):
    live = Ledger(path, "live")
    live.start_run("live", "kafka", None, "w1")
    live.alert(alert_rec(alert_id="live-alert"))
    live.close()
    drill = Ledger(path, "drill")  # reopening an existing file: tables are reused, not recreated
    drill.start_run("drill", "file.jsonl", "rules.yaml", "w2")
    drill.alert(alert_rec(alert_id="drill-alert"))
    drill.finish_run({"drill": True})
    assert [r["alert_id"] for r in drill.rows("alert_transitions", run_id="drill")] == ["drill-alert"]
    assert [r["alert_id"] for r in drill.rows("alert_transitions", run_id="live")] == ["live-alert"]
    assert [r["alert_id"] for r in drill.rows("alert_transitions")] == ["live-alert", "drill-alert"]
    # finish_run only ended its own run.
    assert [(r["run_id"], r["start"]) for r in drill.rows("runs")] == [("live", 1), ("drill", 1)]
    assert [(r["run_id"], r["start"], r["summary"]) for r in drill.rows("run_ends")] == [
        ("drill", 1, '{"drill":true}'),
    ]
    drill.close()


def test_each_start_of_a_run_gets_its_own_row_and_only_its_own_end(path):
    """A live daemon restarts under the same run id: each start is a `runs` row of its own, and
    a start that was killed (no finish_run) stays without an end, whatever later starts do."""
    from rollbackd.daemon.audit import verify_ledger

    first = Ledger(path, "live-g")
    first.start_run("live", "kafka", None, "w1")
    first.close()  # SIGKILLed: no finish_run
    for wall in ("w2", "w3"):
        led = Ledger(path, "live-g")
        led.start_run("live", "kafka", None, wall)
        led.finish_run({"wall": wall}, wall + "-end")
        led.close()
    assert raw(path, "select run_id, start, started_wall from runs order by seq") == [
        ("live-g", 1, "w1"), ("live-g", 2, "w2"), ("live-g", 3, "w3"),
    ]
    assert raw(path, "select start, finished_wall from run_ends order by seq") == [(2, "w2-end"), (3, "w3-end")]
    report = verify_ledger(path)
    assert report.breaks == [] and report.unfinished == [("live-g", 1, "w1")]


def test_a_start_numbers_on_from_a_ledger_with_unnumbered_runs(path):
    con = sqlite3.connect(path)
    con.execute("create table runs (seq integer primary key, run_id text, mode text, source text, config text,"
                " started_wall text, summary text)")
    con.execute("insert into runs (run_id, mode) values ('live-g', 'live')")
    con.commit()
    con.close()
    led = Ledger(path, "live-g")
    led.start_run("live", "kafka", None, "w")
    assert led.start == 2
    led.close()


def test_an_in_memory_ledger_works_without_wal():
    led = Ledger(":memory:", "r")
    led.alert(alert_rec(measurement={}, window=None))
    (tr,) = led.rows("alert_transitions")
    assert (tr["value"], tr["window_start"], tr["measurement"]) == (None, None, "{}")
    led.close()
