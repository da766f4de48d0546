"""The ledger's audit: `rollbackd audit verify` passes on an untouched ledger (and after an honest
restart that rewound it) and exits 1 naming each tampering: an edited row, a middle deletion, a
tail deletion (against anchors), a dropped table, nulled links, a chain recomputed without the
key, a reordered row, a row copied from another ledger, a BLOB where text belongs.
`rollbackd incidents list|show` read the same ledger."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rollbackd.cli import main
from rollbackd.daemon.audit import AnchorFile, Anchoring, read_anchors, verify_ledger
from rollbackd.daemon.ledger import Ledger, key_id, link, row_hash
from rollbackd.rules.silences import Silence
from test_cli import RULES, rollbackd

KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "fedcba9876543210fedcba9876543210"


def cli(*args: str, cwd: Path, key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLBACKD_LEDGER_KEY")}
    if key is not None:
        env["ROLLBACKD_LEDGER_KEY"] = key
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "rollbackd.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, timeout=120)


def verify(db: Path, *extra: str, key: str | None = KEY):
    """`rollbackd audit verify` in this process: (exit code, stdout, stderr)."""
    out = CliRunner().invoke(main, ["audit", "verify", "--db", str(db), *extra],
                             env={"ROLLBACKD_LEDGER_KEY": key, "ROLLBACKD_LEDGER_KEY_FILE": None})
    assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
    return out.exit_code, out.stdout, out.stderr


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """A keyed ledger with one replayed run (an incident, a rollback), a silence, and the
    anchor the replay published next to it."""
    d = tmp_path_factory.mktemp("audit")
    rec = d / "s.jsonl"
    assert cli("simulate", "sustained_errors", "--out", str(rec), cwd=d).returncode == 0
    out = cli("silence", "add", "--deployment", "other", "--for", "1h", "--starts-at", "0",
              "--reason", "r", "--by", "alice", "--db", "l.db", cwd=d)
    assert out.returncode == 0, out.stderr
    out = cli("replay", str(rec), "--config", str(RULES), "--db", "l.db", "--notifier", "none", cwd=d)
    assert out.returncode == 0, out.stderr
    assert (d / "l.db.anchors").is_file()
    return d


def _copy(src: Path, dst: Path, anchors: bool = True) -> Path:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    if anchors and Path(f"{src}.anchors").exists():
        shutil.copy(f"{src}.anchors", f"{dst}.anchors")
    return dst


def _sql(db: Path, *statements: tuple[str, list]) -> None:
    with sqlite3.connect(db) as conn:
        for sql, args in statements:
            conn.execute(sql, args)


def _seqs(db: Path, table: str) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute(f"select seq from {table} order by seq")]


def test_an_untouched_keyed_ledger_verifies(replayed):
    code, out, err = verify(replayed / "l.db")
    assert code == 0, err
    assert "keyed (HMAC-SHA256, key id " + key_id(KEY.encode()) in out
    assert "head silences 1 " in out and "head actions/replay-" in out and "head runs 1 " in out
    assert "1 anchor(s) hold" in out and "chains intact" in out


def test_a_keyed_ledger_needs_its_key_to_verify(replayed):
    code, _, err = verify(replayed / "l.db", key=None)
    assert code == 2 and "the ledger is keyed" in err
    code, _, err = verify(replayed / "l.db", key=OTHER_KEY)
    assert code == 2 and "is not the ledger's" in err


def test_an_edited_row_fails_verification_naming_it(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "edited.db")
    with sqlite3.connect(db) as conn:
        seq = conn.execute("select seq from actions where action = 'rollback' and phase = 'finished'").fetchone()[0]
        conn.execute("update actions set to_version = '7' where seq = ?", [seq])
    code, _, err = verify(db)
    assert code == 1
    assert f"actions row seq={seq}" in err and "edited" in err


def test_a_middle_deletion_is_found(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "deleted.db")
    seqs = _seqs(db, "actions")
    _sql(db, ("delete from actions where seq = ?", [seqs[2]]))
    code, _, err = verify(db)
    assert code == 1
    assert f"actions row seq={seqs[3]}" in err and "chain_seq 4 where 3 belongs" in err and "deleted" in err


def test_a_deleted_last_row_shows_against_the_anchors_only(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "tail.db")
    _sql(db, ("delete from actions where seq = ?", [_seqs(db, "actions")[-1]]))
    code, _, err = verify(db)
    assert code == 1
    assert "actions/replay-" in err and "its last 1 row(s) were deleted" in err
    # Without anchors the chain alone cannot show it, and verify says so.
    os.unlink(f"{db}.anchors")
    code, out, _ = verify(db)
    assert code == 0 and "no anchors: rows cut off the end of a chain" in out


def test_five_rows_cut_from_three_tables_are_each_found(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "tail5.db")
    _sql(db, *[(f"delete from {t} where seq in (select seq from {t} order by seq desc limit {n})", [])
               for t, n in (("actions", 2), ("counters", 2), ("alert_transitions", 1))])
    code, _, err = verify(db)
    assert code == 1
    broken = [line for line in err.splitlines() if line.startswith("BROKEN")]
    assert len(broken) == 3
    for table, n in (("actions", 2), ("counters", 2), ("alert_transitions", 1)):
        assert any(line.startswith(f"BROKEN {table}/replay-") and f"its last {n} row(s) were deleted" in line
                   for line in broken), err


def test_a_runs_whole_actions_chain_deleted_is_found(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "chain.db")
    _sql(db, ("delete from actions", []))
    code, _, err = verify(db)
    assert code == 1 and "chain is missing" in err and "BROKEN actions/replay-" in err


@pytest.mark.parametrize("table", ["actions", "approvals"])
def test_a_dropped_table_is_found(replayed, tmp_path, table):
    db = _copy(replayed / "l.db", tmp_path / "dropped.db")
    _sql(db, (f"drop table {table}", []))
    code, _, err = verify(db)
    assert code == 1 and f"BROKEN {table}: table is missing: it was dropped" in err
    # Even without anchors: the ledger's meta row lists its tables.
    os.unlink(f"{db}.anchors")
    assert verify(db)[0] == 1


@pytest.mark.parametrize("column", ["hash", "prev_hash"])
def test_nulled_links_are_found(replayed, tmp_path, column):
    db = _copy(replayed / "l.db", tmp_path / "nulled.db", anchors=False)
    _sql(db, (f"update actions set {column} = null", []))
    code, out, err = verify(db)
    first = _seqs(db, "actions")[0]
    assert code == 1 and f"actions row seq={first}" in err and f"{column} missing (set to NULL" in err
    assert "predate the hash chain" not in out


def _relink(db: Path, table: str, key: bytes | None, ledger_id: str, edit: dict) -> None:
    """What a writer who knows the format does: edit the chain's first row and recompute every
    link after it (with ``key``; None for plain SHA-256)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute(f"select * from {table} order by seq")]
    rows[0].update(edit)
    prev = ""
    for row in rows:
        chain = f"{table}/{row['run_id']}"
        row["prev_hash"], row["hash"] = prev, link(key, ledger_id, chain, row["chain_seq"], prev, row)
        prev = row["hash"]
        sets = ", ".join(f"{k} = ?" for k in row if k != "seq")
        conn.execute(f"update {table} set {sets} where seq = ?", [*(v for k, v in row.items() if k != "seq"), row["seq"]])
    conn.commit()
    conn.close()


def _ledger_id(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return json.loads(conn.execute("select value from meta where name = 'ledger'").fetchone()[0])["id"]


def test_a_chain_recomputed_without_the_key_is_found(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "rekeyed.db", anchors=False)
    seq = _seqs(db, "alert_transitions")[0]
    _relink(db, "alert_transitions", None, _ledger_id(db), {"state": "resolved"})
    code, _, err = verify(db)
    assert code == 1
    assert f"alert_transitions row seq={seq}" in err and "MAC does not match" in err
    assert "recomputed without the key" in err
    # So is one recomputed under a key of the attacker's own.
    db = _copy(replayed / "l.db", tmp_path / "rekeyed2.db", anchors=False)
    _relink(db, "alert_transitions", OTHER_KEY.encode(), _ledger_id(db), {"state": "resolved"})
    assert verify(db)[0] == 1


def test_without_a_key_a_recomputed_chain_shows_only_against_anchors(tmp_path):
    rec = tmp_path / "s.jsonl"
    assert cli("simulate", "sustained_errors", "--out", str(rec), cwd=tmp_path, key=None).returncode == 0
    out = cli("replay", str(rec), "--config", str(RULES), "--db", "u.db", "--notifier", "none",
              cwd=tmp_path, key=None)
    assert out.returncode == 0, out.stderr
    db = tmp_path / "u.db"
    _relink(db, "alert_transitions", None, _ledger_id(db), {"state": "resolved"})
    code, _, err = verify(db, key=None)
    assert code == 1
    assert "BROKEN alert_transitions/replay-" in err and "differs from the anchor" in err
    os.unlink(f"{db}.anchors")
    code, out, _ = verify(db, key=None)
    assert code == 0
    assert "not keyed: anyone who can write the ledger can rewrite a chain" in out


def test_a_reordered_row_is_found(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "reordered.db", anchors=False)
    a, b = _seqs(db, "actions")[1:3]
    _sql(db, ("update actions set seq = -1 where seq = ?", [a]), ("update actions set seq = ? where seq = ?", [a, b]),
         ("update actions set seq = ? where seq = -1", [b]))
    code, _, err = verify(db)
    assert code == 1 and f"actions row seq={a}" in err and "out of order" in err


def _twin(path: Path, key: bytes, version: str) -> None:
    led = Ledger(path, run_id="live-g", key=key)
    led.start_run("live", "kafka", None, "w")
    for phase, status in (("started", "started"), ("finished", "succeeded")):
        led.action({"ts": 1.0, "action": "rollback", "deployment": "d", "to_version": version,
                    "incident_id": "i", "status": status}, phase)
    led.close()


@pytest.mark.parametrize("other_key", [KEY, OTHER_KEY])
def test_a_row_copied_from_another_ledger_is_found(tmp_path, other_key):
    """Another ledger under the same key (staging, a copy made earlier) holds a real row that
    says what the attacker wants: the row, link and all, does not fit this ledger."""
    _twin(tmp_path / "prod.db", KEY.encode(), "1")
    _twin(tmp_path / "other.db", other_key.encode(), "9")
    with sqlite3.connect(tmp_path / "other.db") as src:
        cols = [r[1] for r in src.execute("pragma table_info(actions)")]
        row = src.execute("select * from actions where phase = 'finished'").fetchone()
    _sql(tmp_path / "prod.db", ("delete from actions where phase = 'finished'", []),
         (f"insert into actions ({', '.join(cols)}) values ({', '.join('?' * len(cols))})", list(row)))
    code, _, err = verify(tmp_path / "prod.db")
    assert code == 1 and f"actions row seq={row[0]} (run live-g)" in err


def test_a_blob_where_text_belongs_is_an_error_not_a_traceback(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "blob.db")
    seq = _seqs(db, "actions")[1]
    _sql(db, ("update actions set detail = ? where seq = ?", [b"\x00\xff", seq]))
    code, _, err = verify(db)
    assert code == 1
    assert f"actions row seq={seq}" in err and "column detail holds a BLOB where text belongs" in err
    out = cli("audit", "verify", "--db", str(db), cwd=tmp_path)
    assert out.returncode == 1 and b"Traceback" not in out.stderr


def test_a_forged_anchor_is_refused(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "forged.db")
    anchor = json.loads(Path(f"{db}.anchors").read_text())
    chain = next(c for c in anchor["chains"] if c.startswith("actions/"))
    anchor["chains"][chain]["seq"] -= 1  # to excuse a cut tail
    Path(f"{db}.anchors").write_text(json.dumps(anchor) + "\n")
    code, _, err = verify(db)
    assert code == 1 and "anchors: line 1" in err and "signature does not match" in err


def test_a_ledger_cannot_be_written_under_another_key_or_none(replayed, tmp_path):
    db = _copy(replayed / "l.db", tmp_path / "w.db")
    assert "ROLLBACKD_LEDGER_KEY" in Ledger(db).key_problem
    for key in (None, OTHER_KEY):
        out = cli("silence", "add", "--deployment", "x", "--for", "1h", "--reason", "r", "--by", "b",
                  "--db", str(db), cwd=tmp_path, key=key)
        assert out.returncode == 2 and b"Traceback" not in out.stderr, out.stderr
    assert verify(db)[0] == 0
    unkeyed = tmp_path / "u.db"
    Ledger(unkeyed).close()
    assert "made without a key" in Ledger(unkeyed, key=KEY.encode()).key_problem


def test_the_key_comes_from_a_file_and_must_be_long_enough(replayed, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    out = CliRunner().invoke(main, ["audit", "verify", "--db", str(replayed / "l.db"), "--ledger-key-file",
                                    str(key_file)], env={"ROLLBACKD_LEDGER_KEY": None})
    assert out.exit_code == 0, out.output
    key_file.write_text("short")
    out = CliRunner().invoke(main, ["audit", "verify", "--db", str(replayed / "l.db"), "--ledger-key-file",
                                    str(key_file)], env={"ROLLBACKD_LEDGER_KEY": None})
    assert out.exit_code == 2 and "at least 16 bytes" in out.output


# Restarts ---------------------------------------------------------------------------------
def test_an_honest_restart_verifies_and_a_cut_after_it_does_not(tmp_path):
    """A live daemon crashes after a checkpoint; its restart rewinds the rows written since
    (re-deriving them). The anchors covered only checkpointed rows: verify passes. Cutting an
    anchored row afterwards is not mistaken for a rewind."""
    from test_daemon_restart import BATCH, ManualClock

    from rollbackd.daemon.decisions import DecisionLog
    from rollbackd.daemon.replay import build_pipeline
    from rollbackd.daemon.run import Checkpoint, Daemon, RunSettings
    from rollbackd.daemon.sources import RecordingSource
    from rollbackd.rules.loader import load_config
    from rollbackd.scenarios import BUILTIN, write_recording

    config = load_config(RULES)
    recording = tmp_path / "s.jsonl"
    write_recording(BUILTIN["sustained_errors"], recording)
    db = tmp_path / "ledger.db"

    def live(crash_after: int | None, checkpoint_at: set[int]) -> None:
        cp = Checkpoint.load(str(tmp_path / "state.ckpt"))
        source = RecordingSource(str(recording), start=cp.position if cp is not None else None)
        ledger = Ledger(db, run_id="live-test", key=KEY.encode())
        ledger.start_run("live", "file", None, "w")
        decisions = DecisionLog(tmp_path / "decisions.jsonl", append=True)
        pipeline = build_pipeline(config, decisions=decisions, recorder=ledger)
        anchoring = Anchoring(ledger, [AnchorFile(f"{db}.anchors")], rewound=True)
        daemon = Daemon(pipeline, source, ledger=ledger, decisions=decisions, clock=ManualClock(),
                        anchoring=anchoring,
                        settings=RunSettings(checkpoint_path=str(tmp_path / "state.ckpt"), checkpoint_every=1e9,
                                             batch_size=BATCH, idle_after=1e9))
        daemon.restore()
        i = 0
        while (batch := source.read(BATCH)) is not None:
            daemon.step(batch)
            i += 1
            if i in checkpoint_at:
                daemon.checkpoint()
                daemon.flush_checkpoint()  # durable (the writer's thread) before the crash
            if i == crash_after:  # dead: no checkpoint, no run end, no last anchor
                decisions.close()
                ledger.close()
                return
        daemon.checkpoint()
        daemon.flush_checkpoint()
        ledger.finish_run({"ok": True}, "w2")
        anchoring.publish(ManualClock().now())
        decisions.close()
        ledger.close()

    live(crash_after=36, checkpoint_at={30})
    with sqlite3.connect(db) as conn:
        written = conn.execute("select count(*) from alert_transitions").fetchone()[0]
    live(crash_after=None, checkpoint_at=set())
    with sqlite3.connect(db) as conn:
        rewinds = conn.execute("select table_name, dropped from rewinds").fetchall()
        starts = conn.execute("select start from runs where run_id = 'live-test' order by seq").fetchall()
        ends = conn.execute("select start from run_ends").fetchall()
    assert written > 0 and rewinds and all(n > 0 for _, n in rewinds), "the restart rewound rows"
    assert starts == [(1,), (2,)] and ends == [(2,)]
    code, out, err = verify(db)
    assert code == 0, err
    assert "run live-test start 1 (started w) has no end: it was killed or crashed" in out
    anchored = [a["chains"] for _, a in read_anchors(f"{db}.anchors")]
    assert len(anchored) >= 3 and any("alert_transitions/live-test" in c for c in anchored)
    # Now a cut of the last (anchored) alert transition: a tampering, not a rewind.
    _sql(db, ("delete from alert_transitions where seq = (select max(seq) from alert_transitions)", []))
    code, _, err = verify(db)
    assert code == 1 and "BROKEN alert_transitions/live-test" in err and "were deleted" in err


def test_anchors_before_the_first_checkpoint_leave_out_what_a_restart_rewinds(tmp_path):
    ledger = Ledger(tmp_path / "l.db", run_id="live-g")
    anchoring = Anchoring(ledger, [], rewound=True)
    ledger.incident({"ts": 1, "incident_id": "i", "state": "opened", "deployment": "d"})
    ledger.action({"ts": 1, "action": "notify", "deployment": "d"}, "finished")
    assert set(anchoring.publish(10.0)["chains"]) == {"meta", "actions/live-g"}
    marks = ledger.high_water()
    ledger.incident({"ts": 2, "incident_id": "i", "state": "resolved", "deployment": "d"})
    chains = anchoring.publish(11.0, marks)["chains"]
    assert chains["incidents/live-g"]["seq"] == 1  # the row after the marks is not final yet
    assert anchoring.publish(12.0) is None  # nothing moved
    ledger.close()


@pytest.mark.parametrize("bounded", [True, False])
def test_a_rewind_that_re_derives_other_rows_stays_honest_only_with_bounded_anchors(tmp_path, bounded):
    """After a restart the re-derived rows need not be the same (other batch boundaries, a rule
    changed): anchors bounded by the checkpoint's marks never covered them; an anchor of
    everything would call the honest restart a tampering."""
    db = tmp_path / "l.db"
    ledger = Ledger(db, run_id="live-g", key=KEY.encode())
    anchoring = Anchoring(ledger, [AnchorFile(f"{db}.anchors")], rewound=bounded)
    ledger.incident({"ts": 1, "incident_id": "i", "state": "opened", "deployment": "d"})
    marks = ledger.high_water()  # the checkpoint
    ledger.incident({"ts": 2, "incident_id": "i", "state": "resolved", "deployment": "d"})
    anchoring.publish(10.0, marks)
    ledger.close()
    again = Ledger(db, run_id="live-g", key=KEY.encode())  # the restart
    again.rewind(marks)
    again.incident({"ts": 3, "incident_id": "i", "state": "resolved", "deployment": "d"})
    again.close()
    code, _, err = verify(db)
    assert code == (0 if bounded else 1), err


# The chain itself ---------------------------------------------------------------------------
def test_values_hash_as_sqlite_stores_them(tmp_path):
    """Ints in float columns, NaN, bools and numbers in text columns come back from SQLite
    changed; the link is taken of what is stored, so verification still passes."""
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
    ledger.finish_run({"events": 3})
    ledger.close()
    # A second process appends to the same run's chain (a restart with the same run id).
    again = Ledger(tmp_path / "l.db", run_id="r1")
    again.alert({"ts": 200, "alert_id": "a", "rule": "r", "deployment": "d", "variant": "v",
                 "state": "resolved", "measurement": {}})
    again.close()
    report = verify_ledger(tmp_path / "l.db")
    assert report.breaks == [] and report.unchained == 0 and report.legacy == 0
    assert report.rows == 9  # meta, runs, run_ends, 2 alerts, action, silence, expiry, counter
    assert report.heads["alert_transitions/r1"][0] == 2


def test_a_rewind_keeps_the_chain_valid_and_is_recorded(tmp_path):
    ledger = Ledger(tmp_path / "l.db", run_id="r1")
    ledger.incident({"ts": 1, "incident_id": "i", "state": "opened", "deployment": "d"})
    marks = ledger.high_water()
    ledger.incident({"ts": 2, "incident_id": "i", "state": "resolved", "deployment": "d"})
    assert ledger.rewind(marks) == 1
    ledger.incident({"ts": 2, "incident_id": "i", "state": "resolved", "deployment": "d"})
    ledger.close()
    report = verify_ledger(tmp_path / "l.db")
    assert report.breaks == [] and report.heads["incidents/r1"][0] == 2
    with sqlite3.connect(tmp_path / "l.db") as conn:
        assert conn.execute("select table_name, kept_chain_seq, dropped from rewinds").fetchall() == [
            ("incidents", 1, 1)]


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
    report = verify_ledger(db)
    assert report.breaks == [] and report.unchained == 1


def test_a_ledger_of_the_first_chain_format_is_checked_by_its_rules_then_continued(tmp_path):
    """Rows written by a rollbackd before chain_seq and keys (sha256 of prev + row) stay
    verifiable; a key taken on then chains the new rows with HMAC."""
    db = tmp_path / "v1.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table incidents (seq integer primary key, run_id text, ts float, incident_id text,"
                     " change text, deployment text, variant text, rule text, severity text, data text,"
                     " prev_hash text, hash text)")
        prev = ""
        for ts in (1.0, 2.0):
            row = {"run_id": "old", "ts": ts, "incident_id": "i", "change": "opened", "deployment": "d"}
            h = row_hash(prev, row)
            conn.execute("insert into incidents (run_id, ts, incident_id, change, deployment, prev_hash, hash)"
                         " values (?, ?, ?, ?, ?, ?, ?)", [*row.values(), prev, h])
            prev = h
    ledger = Ledger(db, run_id="old", key=KEY.encode())
    ledger.incident({"ts": 3, "incident_id": "i", "state": "resolved", "deployment": "d"})
    ledger.close()
    report = verify_ledger(db, KEY.encode())
    assert report.breaks == [] and report.legacy == 2 and report.heads["incidents/old"][0] == 1
    _sql(db, ("update incidents set change = 'resolved' where seq = 1", []))
    assert "edited" in str(verify_ledger(db, KEY.encode()).breaks[0])


# Reading the ledger -------------------------------------------------------------------------
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
    code = ("import sys; open(sys.argv[1], 'a').write('x'); "
            "print('helm rollback demo-scorer to', sys.argv[2])")
    backend = (f'backend: {{type: command, argv: ["{sys.executable}", "-c", "{code}", '
               f'"{counter}", "{{to_version}}"]}}')
    path = tmp_path / "cmd.yaml"
    path.write_text(RULES.read_text().replace("backend: {type: log}", backend))
    return path


def test_a_rollbacks_backend_output_is_kept_and_shown(tmp_path):
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
    assert verify_ledger(tmp_path / "l.db").breaks == []


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


@pytest.mark.kafka
def test_a_live_daemon_killed_twice_leaves_a_ledger_that_verifies(kafka_bootstrap, topic, tmp_path, monkeypatch):
    """`rollbackd run` on a real broker, SIGKILLed twice and stopped: every start is its own
    run row, the killed ones stay without an end, and the keyed ledger verifies against the
    anchors the daemon published at its checkpoints, rewinds and all."""
    import signal

    from test_daemon_kafka import Daemon, wait_committed, write_lines

    from rollbackd.daemon.kafka import publish
    from rollbackd.scenarios import BUILTIN, generate

    monkeypatch.setenv("ROLLBACKD_LEDGER_KEY", KEY)
    lines = list(generate(BUILTIN["sustained_errors"]))
    name = topic(partitions=1)
    n = len(lines)
    daemon = Daemon(tmp_path, RULES, kafka_bootstrap, name, f"g-{name}")
    published = 0
    for i, part in enumerate([lines[: n // 3], lines[n // 3: 2 * n // 3], lines[2 * n // 3:]]):
        publish(kafka_bootstrap, name, str(write_lines(tmp_path / f"part{i}.jsonl", part)))
        published += len(part)
        proc = daemon.start()
        wait_committed(kafka_bootstrap, f"g-{name}", name, published, proc)
        if i < 2:
            proc.kill()
            proc.wait(timeout=30)
        else:
            daemon.signal(signal.SIGTERM)
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
    db = tmp_path / "rollbackd.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("select start from runs order by seq").fetchall() == [(1,), (2,), (3,)]
        assert conn.execute("select start from run_ends").fetchall() == [(3,)]
    code, out, err = verify(db)
    assert code == 0, err
    assert out.count("has no end: it was killed or crashed") == 2
    assert len(read_anchors(f"{db}.anchors")) >= 3
    _sql(db, ("delete from actions where seq = (select max(seq) from actions)", []))
    code, _, err = verify(db)
    assert code == 1 and f"BROKEN actions/live-g-{name}" in err


def test_a_keyed_ledger_is_read_without_its_key(replayed):
    out = cli("silence", "list", "--db", "l.db", "--all", cwd=replayed, key=None)
    assert out.returncode == 0 and b"other" in out.stdout, out.stderr


def test_a_keyed_ledger_rewritten_as_an_old_unkeyed_one_is_found(replayed, tmp_path):
    """Drop the meta table, blank chain_seq and re-link every row by the first format's
    unkeyed rule: a ledger that looks older than keys. The key (or the anchors) says otherwise."""
    db = _copy(replayed / "l.db", tmp_path / "downgraded.db")
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    conn.execute("drop table meta")
    for (table,) in conn.execute("select name from sqlite_master where type = 'table'").fetchall():
        prev: dict[str, str] = {}
        for r in conn.execute(f"select * from {table} order by seq").fetchall():
            row = {**dict(r), "chain_seq": None}
            chain = str(row.get("run_id"))
            row["prev_hash"] = prev.get(chain, "")
            row["hash"] = prev[chain] = row_hash(row["prev_hash"], row)
            conn.execute(f"update {table} set chain_seq = null, prev_hash = ?, hash = ? where seq = ?",
                         [row["prev_hash"], row["hash"], row["seq"]])
    conn.commit()
    conn.close()
    code, _, err = verify(db)
    assert code == 1 and "the ledger has no meta row, yet it was given a key" in err
    code, _, err = verify(db, key=None)
    assert code == 1 and "yet it has anchors" in err
