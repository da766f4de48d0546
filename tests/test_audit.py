"""The ledger's hash chain: `rollbackd audit verify` passes on an untouched ledger and names the
first row that was edited or deleted; `rollbackd incidents list|show` read the same ledger."""

from __future__ import annotations

import math
import sqlite3

import pytest

from rollbackd.daemon.ledger import Ledger, verify_chain
from rollbackd.rules.silences import Silence
from test_cli import RULES, rollbackd


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """A ledger with one replayed run (an incident, a rollback) and a silence."""
    d = tmp_path_factory.mktemp("audit")
    rec = d / "s.jsonl"
    assert rollbackd("simulate", "sustained_errors", "--out", str(rec), cwd=d).returncode == 0
    out = rollbackd("silence", "add", "--deployment", "other", "--for", "1h", "--starts-at", "0",
                    "--reason", "r", "--by", "alice", "--db", "l.db", cwd=d)
    assert out.returncode == 0, out.stderr
    out = rollbackd("replay", str(rec), "--config", str(RULES), "--db", "l.db",
                    "--notifier", "none", cwd=d)
    assert out.returncode == 0, out.stderr
    return d


def _copy(src, dst):
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return dst


def test_untouched_ledger_verifies(replayed):
    out = rollbackd("audit", "verify", "--db", "l.db", cwd=replayed)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "chains intact" in text
    assert "head silences " in text and "head actions/" in text and "head runs " in text


def test_an_edited_row_fails_verification_naming_it(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "edited.db")
    with sqlite3.connect(db) as conn:
        seq = conn.execute(
            "select seq from actions where action = 'rollback' and phase = 'finished'"
        ).fetchone()[0]
        conn.execute("update actions set to_version = '7' where seq = ?", [seq])
    out = rollbackd("audit", "verify", "--db", str(db), cwd=tmp_path)
    assert out.returncode == 1
    err = out.stderr.decode()
    assert f"actions row seq={seq}" in err and "edited" in err


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(replayed, tmp_path):
    from rollbackd.daemon.ledger import row_hash

    db = _copy(replayed / "l.db", tmp_path / "rehashed.db")
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("select * from alert_transitions order by seq")]
    first = rows[0]
    first["state"] = "resolved"
    conn.execute("update alert_transitions set state = ?, hash = ? where seq = ?",
                 [first["state"], row_hash(first["prev_hash"], first), first["seq"]])
    conn.commit()
    conn.close()
    report = verify_chain(db)
    assert [(b.table, b.seq) for b in report.breaks] == [("alert_transitions", rows[1]["seq"])]
    assert "deleted or inserted" in report.breaks[0].reason


def test_a_deleted_row_breaks_the_chain(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "deleted.db")
    with sqlite3.connect(db) as conn:
        seqs = [r[0] for r in conn.execute("select seq from alert_transitions order by seq")]
        conn.execute("delete from alert_transitions where seq = ?", [seqs[0]])
    report = verify_chain(db)
    assert [(b.table, b.seq) for b in report.breaks] == [("alert_transitions", seqs[1])]


def test_values_hash_as_sqlite_stores_them(tmp_path):
    """Ints in float columns, NaN, bools and numbers in text columns come back from SQLite
    changed; the hash is taken of what is stored, so verification still passes."""
    ledger = Ledger(tmp_path / "l.db", run_id="r1")
    ledger.start_run("replay", "x", None, "2026-01-01T00:00:00Z")
    ledger.alert({"ts": 100, "alert_id": "a", "rule": "r", "deployment": "d", "variant": 3,
                  "state": "firing", "previous": "pending", "severity": "page",
                  "measurement": {"value": math.nan, "threshold": 1, "sample_size": 5.0}})
    ledger.action({"ts": 101, "action": "rollback", "deployment": "d", "attempts": 2.0,
                   "dry_run": True, "status": "succeeded"}, "finished")
    ledger.add_silence(Silence(id="s1", deployment="d", starts_at=0, ends_at=10, reason="x",
                               created_by="bob"), "now")
    ledger.expire_silence("s1", 5, "bob", "now")
    ledger.counters([("events", 3)])
    ledger.finish_run({"events": 3})  # the summary is outside the chain
    ledger.close()
    # A second process appends to the same run's chain (a restart with the same run id).
    again = Ledger(tmp_path / "l.db", run_id="r1")
    again.alert({"ts": 200, "alert_id": "a", "rule": "r", "deployment": "d", "variant": "v",
                 "state": "resolved", "measurement": {}})
    again.close()
    report = verify_chain(tmp_path / "l.db")
    assert report.breaks == [] and report.unchained == 0
    assert report.rows == 7


def test_a_rewind_keeps_the_chain_valid(tmp_path):
    ledger = Ledger(tmp_path / "l.db", run_id="r1")
    ledger.incident({"ts": 1, "incident_id": "i", "state": "opened", "deployment": "d"})
    marks = ledger.high_water()
    ledger.incident({"ts": 2, "incident_id": "i", "state": "resolved", "deployment": "d"})
    ledger.rewind(marks)
    ledger.incident({"ts": 2, "incident_id": "i", "state": "resolved", "deployment": "d"})
    ledger.close()
    assert verify_chain(tmp_path / "l.db").breaks == []


def test_a_ledger_from_before_the_chain_gains_one(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table incidents (seq integer primary key, run_id text, ts float,"
                     " incident_id text, change text, deployment text, variant text, rule text,"
                     " severity text, data text)")
        conn.execute("insert into incidents (run_id, ts, incident_id, change, deployment)"
                     " values ('old', 1, 'i', 'opened', 'd')")
    ledger = Ledger(db, run_id="old")
    ledger.incident({"ts": 2, "incident_id": "i", "state": "resolved", "deployment": "d"})
    ledger.close()
    report = verify_chain(db)
    assert report.breaks == [] and report.unchained == 1


def test_incidents_list_and_show(replayed):
    out = rollbackd("incidents", "list", "--db", "l.db", cwd=replayed)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert len(lines) == 1 and "demo-scorer" in lines[0] and "rollbacks 1" in lines[0]
    inc = lines[0].split()[0]
    out = rollbackd("incidents", "show", inc, "--db", "l.db", cwd=replayed)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert f"incident {inc}" in text
    assert "rollback  2 -> 1  succeeded" in text and "alert" in text and "window " in text
    missing = rollbackd("incidents", "show", "nope", "--db", "l.db", cwd=replayed)
    assert missing.returncode == 1


def _command_rules(tmp_path, counter):
    """The e2e rules with a command backend: a real program that prints what it did and counts
    its runs in a file."""
    import sys

    code = ("import sys; open(sys.argv[1], 'a').write('x'); "
            "print('helm rollback demo-scorer to', sys.argv[2])")
    backend = (f'backend: {{type: command, argv: ["{sys.executable}", "-c", "{code}", '
               f'"{counter}", "{{to_version}}"]}}')
    path = tmp_path / "cmd.yaml"
    path.write_text(RULES.read_text().replace("backend: {type: log}", backend))
    return path


def test_a_rollbacks_backend_output_is_kept_and_shown(tmp_path):
    import json

    counter = tmp_path / "runs"
    rules = _command_rules(tmp_path, counter)
    rec = tmp_path / "s.jsonl"
    assert rollbackd("simulate", "sustained_errors", "--out", str(rec), cwd=tmp_path).returncode == 0
    out = rollbackd("replay", str(rec), "--config", str(rules), "--db", "l.db", "--notifier", "none",
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert counter.read_text() == "x"
    ledger = Ledger(tmp_path / "l.db")
    (row,) = ledger.rows("actions", action="rollback", phase="finished")
    ledger.close()
    result = json.loads(row["data"])["result"]
    assert (result["returncode"], result["stdout"]) == (0, "helm rollback demo-scorer to 1\n")
    assert result["argv"][-2:] == [str(counter), "1"]
    show = rollbackd("incidents", "show", row["incident_id"], "--db", "l.db", cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.decode().splitlines()
    at = next(i for i, line in enumerate(lines) if "rollback  2 -> 1  succeeded" in line)
    assert lines[at + 1].startswith("      result {")
    assert json.loads(lines[at + 1].split("result ", 1)[1]) == result
    assert verify_chain(tmp_path / "l.db").breaks == []


def test_a_rollback_found_in_the_outbox_keeps_its_result(tmp_path):
    """A decision re-made after a restart (same run) does not run the command again and
    reports the recorded result."""
    from rollbackd.actions.base import NullNotifier
    from rollbackd.daemon.decisions import MemoryDecisions
    from rollbackd.daemon.replay import build_pipeline, open_recording, replay
    from rollbackd.rules.loader import load_config
    from rollbackd.scenarios import BUILTIN, write_recording

    counter = tmp_path / "runs"
    cfg = load_config(_command_rules(tmp_path, counter))
    rec = tmp_path / "s.jsonl"
    write_recording(BUILTIN["sustained_errors"], rec)
    got = []
    for _ in range(2):
        ledger, d = Ledger(tmp_path / "l.db", run_id="live"), MemoryDecisions()
        replay(open_recording(str(rec), cfg), build_pipeline(cfg, decisions=d, recorder=ledger, notifier=NullNotifier()))
        ledger.close()
        got.append([r for r in d.records if r.get("action") == "rollback"])
    assert counter.read_text() == "x"  # the second run found it done
    assert got[0][0]["result"]["stdout"] == "helm rollback demo-scorer to 1\n"
    assert got[1] == got[0]
