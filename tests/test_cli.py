"""The command line as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"


def rollbackd(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "rollbackd.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, input=stdin, capture_output=True, timeout=120)


def test_help_lists_the_commands(tmp_path):
    out = rollbackd("--help", cwd=tmp_path)
    assert out.returncode == 0
    for cmd in (b"replay", b"validate", b"demo", b"simulate"):
        assert cmd in out.stdout


def test_validate_reports_every_error_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: a\n"
        "    detector: nope\n"
        "    threshold: x\n"
        "  - name: b\n"
        "    detector: latency\n"
        "    threshold: 1\n"
        "    severity: huge\n"
    )
    out = rollbackd("validate", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    err = out.stderr.decode()
    assert f"{bad}:4:" in err and "rules[0].detector" in err
    assert f"{bad}:5:" in err and "rules[0].threshold" in err
    assert f"{bad}:9:" in err and "rules[1].severity" in err
    assert "3 error(s)" in err


def test_validate_accepts_a_good_file(tmp_path):
    out = rollbackd("validate", str(RULES), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert b"OK" in out.stdout and b"serving-error-rate" in out.stdout
    assert (b"  demo-scorer: backend log, policy rollback, cooldown 30m, loop guard 3 per 1d, no approval, "
            b"verify within 15m, known-good after 10m and 1000 predictions, dry run off (global)\n") in out.stdout


def test_simulate_then_replay_from_stdin_writes_decisions_ledger_and_dead_letters(tmp_path):
    rec = tmp_path / "s.jsonl"
    assert rollbackd("simulate", "sustained_errors", "--out", str(rec), cwd=tmp_path).returncode == 0
    data = rec.read_bytes() + b"{not json\n"
    out = rollbackd(
        "replay", "-", "--config", str(RULES), "--decisions-out", "d.jsonl", "--db", "l.db",
        "--notifier", "none", "--summary-json", cwd=tmp_path, stdin=data,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["rejected"] == {"invalid_json": 1}
    dead = (tmp_path / "stdin.rejected.jsonl").read_text().splitlines()
    assert len(dead) == 1 and json.loads(dead[0])["raw"] == "{not json"
    decisions = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    rollbacks = [d for d in decisions if d["kind"] == "action" and d["action"] == "rollback"]
    assert [(r["from_version"], r["to_version"]) for r in rollbacks] == [("2", "1")]
    assert (tmp_path / "l.db").exists()


def test_replay_with_a_bad_rules_file_exits_nonzero_before_reading(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: [{name: x}]\n")
    (tmp_path / "does-not-matter.jsonl").write_text("")
    out = rollbackd("replay", "does-not-matter.jsonl", "--config", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert b"rules[0]" in out.stderr


@pytest.mark.slow
def test_demo_shows_the_incident_and_the_rollback(tmp_path):
    out = rollbackd("demo", "--out-dir", str(tmp_path / "demo"), "--db", "demo.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "incident timeline" in text
    assert "rollback  2 -> 1  succeeded" in text
    assert "OPENED" in text  # the console notice
    assert (tmp_path / "demo.db").exists()


def test_silence_add_list_expire_and_replay_applies_it_by_event_time(tmp_path):
    rec = tmp_path / "s.jsonl"
    assert rollbackd("simulate", "sustained_errors", "--out", str(rec), cwd=tmp_path).returncode == 0
    # The recording starts at 1790000000 (2026-09-21T14:13:20Z); v2 fails from +900 s.
    out = rollbackd("silence", "add", "--deployment", "demo-scorer", "--for", "1h",
                    "--starts-at", "2026-09-21T14:20:00Z", "--reason", "load test of v2",
                    "--by", "alice", "--db", "l.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    sil_id = out.stdout.split(b":")[0].decode()
    listed = rollbackd("silence", "list", "--all", "--db", "l.db", cwd=tmp_path)
    assert sil_id.encode() in listed.stdout and b"load test of v2" in listed.stdout

    summaries = []

    def replay_rollbacks() -> list[dict]:
        out = rollbackd("replay", str(rec), "--config", str(RULES), "--db", "l.db",
                        "--decisions-out", "d.jsonl", "--notifier", "none", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        summaries.append(out.stdout.decode())
        lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
        return [d for d in lines if d["kind"] == "action" and d["action"] == "rollback"]

    assert replay_rollbacks() == []
    # "incidents: 0" alone would not say why: the summary names what muted the alerts
    muted = [x for x in summaries[0].splitlines() if x.startswith("alerts muted")]
    assert len(muted) == 1 and f"by {sil_id}" in muted[0], summaries[0]
    # Expired before the fault began (event time): the replay rolls back again.
    out = rollbackd("silence", "expire", sil_id, "--at", "2026-09-21T14:21:00Z", "--by", "bob",
                    "--db", "l.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [r["to_version"] for r in replay_rollbacks()] == ["1"]
    assert rollbackd("silence", "expire", "sil-nope", "--db", "l.db", cwd=tmp_path).returncode == 1


def test_drill_backtest_report_and_test_rules_commands(tmp_path):
    rec = tmp_path / "s.jsonl.gz"
    truth = tmp_path / "s.truth.yaml"
    out = rollbackd("simulate", "sustained_errors", "--out", str(rec), "--truth", str(truth), cwd=tmp_path)
    assert out.returncode == 0 and truth.exists(), out.stderr

    out = rollbackd("drill", str(rec), "-c", str(RULES), "--out-dir", "d", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert b"[DRILL] OPENED inc-2cc2bbac8759" in out.stdout and b"report: d/report.html" in out.stdout
    assert (tmp_path / "d" / "report.html").read_text().count("<svg") >= 1

    out = rollbackd("report", "inc-2cc2bbac8759", "--db", "d/drill.db", "--out", "inc.html", cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "inc.html").exists(), out.stderr
    assert rollbackd("report", "inc-000000000000", "--db", "d/drill.db", cwd=tmp_path).returncode == 1

    b = tmp_path / "b.yaml"
    b.write_text(RULES.read_text().replace("threshold: 0.05\n", "threshold: 0.5\n"))
    out = rollbackd("backtest", str(rec), "-c", str(RULES), "--against", str(b), "--truth", str(truth), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    # pending, firing, opened, the rollback, and three notices: opened, rollback started, its outcome
    assert "difference: 7 decision(s) only under A, 0 only under B" in text
    assert "serving-error-rate  1       1         0       2m40s" in text

    tests = tmp_path / "rules.test.yaml"
    tests.write_text(
        f"rule_files: [{RULES}]\n"
        "tests:\n"
        "  - name: fires\n"
        "    input: {scenario: sustained_errors}\n"
        "    expect: [{rule: serving-error-rate, deployment: demo-scorer, state: firing, at_or_before: 18m}]\n"
    )
    out = rollbackd("test-rules", str(tests), cwd=tmp_path)
    assert out.returncode == 0 and b"1 passed, 0 failed" in out.stdout, out.stdout
    tests.write_text(tests.read_text().replace("18m", "16m"))
    out = rollbackd("test-rules", str(tests), cwd=tmp_path)
    assert out.returncode == 1 and b"- expected: serving-error-rate demo-scorer/* firing at or before +16m" in out.stdout


def runs_rows(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from runs").fetchone()[0]


def refused(out: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 with a short ``Error: ...`` and no Python traceback."""
    err = out.stderr.decode()
    assert out.returncode == 2, (out.returncode, err)
    assert "Traceback" not in err and "Error: " in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("args,words", [
    (["nosuch.jsonl"], ["'RECORDING'", "does not exist"]),
    (["."], ["'RECORDING'", "is a directory"]),
    (["s.jsonl", "--batch-size", "0"], ["'--batch-size'"]),
    (["s.jsonl", "--decisions-out", "/nonexistent/d.jsonl"], ["'--decisions-out'", "/nonexistent"]),
    (["s.jsonl", "--dead-letter", "/nonexistent/r.jsonl"], ["'--dead-letter'", "/nonexistent"]),
    (["s.jsonl", "--db", "/nonexistent/q.db"], ["'--db'", "/nonexistent"]),
    (["s.jsonl", "--db", "s.jsonl"], ["s.jsonl: cannot open the ledger (file is not a database)"]),
])
def test_replay_refuses_bad_paths_and_numbers_before_writing_a_run(tmp_path, args, words):
    from rollbackd.daemon.ledger import Ledger

    (tmp_path / "s.jsonl").write_text('{"a": 1}\n')
    Ledger(tmp_path / "l.db").close()
    db = [] if "--db" in args else ["--db", "l.db"]
    out = rollbackd("replay", *args, "-c", str(RULES), "--notifier", "none", *db, cwd=tmp_path)
    refused(out, *words)
    assert runs_rows(tmp_path / "l.db") == 0
    assert (tmp_path / "s.jsonl").read_text() == '{"a": 1}\n'  # the non-ledger file is left alone


@pytest.mark.parametrize("args,words", [
    (["simulate", "stationary", "--out", "/nonexistent/dir/x.jsonl.gz"], ["'--out'", "/nonexistent/dir"]),
    (["simulate", "stationary", "--out", "x.jsonl", "--truth", "/nonexistent/t.yaml"], ["'--truth'"]),
    (["demo", "--db", "/nonexistent/q.db"], ["'--db'"]),
    (["demo", "--out-dir", "f/sub"], ["--out-dir f/sub"]),
    (["drill", "s.jsonl", "-c", str(RULES), "--out-dir", "f/sub"], ["--out-dir f/sub"]),
    (["run", "-c", str(RULES), "--bootstrap-servers", "127.0.0.1:1", "--batch-size", "0"], ["'--batch-size'"]),
    (["run", "-c", str(RULES), "--bootstrap-servers", "127.0.0.1:1", "--checkpoint-every", "0"],
     ["'--checkpoint-every'"]),
    (["run", "-c", str(RULES), "--bootstrap-servers", "127.0.0.1:1", "--blind-after", "-5"], ["'--blind-after'"]),
    (["run", "-c", str(RULES), "--bootstrap-servers", "127.0.0.1:1", "--idle-after", "0"], ["'--idle-after'"]),
    (["run", "-c", str(RULES), "--bootstrap-servers", "127.0.0.1:1", "--db", "s.jsonl"],
     ["s.jsonl: cannot open the ledger"]),
    (["run", "-c", str(RULES), "--bootstrap-servers", "127.0.0.1:1", "--checkpoint", "/nonexistent/c"],
     ["'--checkpoint'"]),
    (["record", "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--out", "r.jsonl", "--max-events", "0"],
     ["'--max-events'"]),
    (["record", "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--out", "/nonexistent/r.jsonl"],
     ["'--out'"]),
    (["report", "--db", "s.jsonl"], ["s.jsonl: not a rollbackd ledger"]),
    (["report", "--db", "l.db", "--out", "/nonexistent/r.html"], ["'--out'"]),
    (["backtest", "s.jsonl", "-c", str(RULES), "--truth", "s.jsonl"], ["s.jsonl: "]),
])
def test_other_commands_refuse_bad_paths_without_a_traceback(tmp_path, args, words):
    (tmp_path / "s.jsonl").write_text('{"not": "yaml truth"}\n{"a": 1}\n')
    (tmp_path / "f").write_text("a file where a folder is expected")
    out = rollbackd(*args, cwd=tmp_path)
    err = out.stderr.decode()
    assert out.returncode == 2 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("args", [
    ["silence", "list"], ["silence", "expire", "sil-1"], ["incidents", "list"], ["incidents", "show", "inc-1"],
    ["audit", "verify"], ["report", "inc-1"],
])
def test_commands_that_read_a_ledger_refuse_a_missing_one_and_do_not_create_it(tmp_path, args):
    out = rollbackd(*args, "--db", "typo2.db", cwd=tmp_path)
    refused(out, "typo2.db: no such ledger")
    assert not (tmp_path / "typo2.db").exists()
    (tmp_path / "not.db").write_text("not a ledger\n")
    out = rollbackd(*args, "--db", "not.db", cwd=tmp_path)
    refused(out, "not.db: not a rollbackd ledger")


def test_silence_add_says_which_ledger_it_created_and_checks_names_against_the_rules(tmp_path):
    base = ["silence", "add", "--for", "1h", "--reason", "r", "--by", "alice", "--db", "new.db"]
    out = rollbackd(*base, "--deployment", "demo-scorr", "-c", str(RULES), cwd=tmp_path)
    refused(out, "has no deployment 'demo-scorr'; did you mean 'demo-scorer'?")
    out = rollbackd(*base, "--deployment", "demo-scorer", "--rule", "serving-error-rat", "-c", str(RULES),
                    cwd=tmp_path)
    refused(out, "has no rule 'serving-error-rat'; did you mean 'serving-error-rate'?")
    assert not (tmp_path / "new.db").exists()
    out = rollbackd(*base, "--deployment", "demo-scorer", "--rule", "serving-error-rate", "-c", str(RULES),
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"created a new ledger {tmp_path / 'new.db'}".encode() in out.stderr
    out = rollbackd(*base, "--deployment", "demo-scorer", cwd=tmp_path)  # no rules file: not checked
    assert out.returncode == 0 and b"created" not in out.stderr, out.stderr
    listed = rollbackd("silence", "list", "--db", "new.db", cwd=tmp_path)
    assert listed.stdout.count(b"demo-scorer") == 2


def test_approve_refuses_a_missing_ledger_and_an_incident_with_nothing_waiting(tmp_path):
    from rollbackd.daemon.ledger import Ledger

    out = rollbackd("approve", "inc-a", "--by", "alice", "--db", "mixed.db", cwd=tmp_path)
    refused(out, "mixed.db: no such ledger")
    assert not (tmp_path / "mixed.db").exists()

    ledger = Ledger(tmp_path / "l.db", run_id="r1")
    ledger.start_run("replay", "x", "rules.yaml", "wall")
    base = {"kind": "action", "action": "rollback", "deployment": "demo-scorer", "variant": "primary", "ts": 10.0}
    ledger.incident({"ts": 1.0, "incident_id": "inc-quiet", "state": "opened", "deployment": "demo-scorer"})
    ledger.incident({"ts": 1.0, "incident_id": "inc-a", "state": "opened", "deployment": "demo-scorer"})
    ledger.action({**base, "incident_id": "inc-a", "status": "pending_approval"}, "finished")
    ledger.incident({"ts": 1.0, "incident_id": "inc-b", "state": "opened", "deployment": "demo-scorer"})
    ledger.action({**base, "incident_id": "inc-b", "status": "pending_approval"}, "finished")
    ledger.action({**base, "incident_id": "inc-b", "status": "skipped"}, "finished")  # settled
    ledger.close()

    def approvals() -> int:
        import sqlite3

        with sqlite3.connect(tmp_path / "l.db") as conn:
            return conn.execute("select count(*) from approvals").fetchone()[0]

    refused(rollbackd("approve", "inc-nope", "--by", "alice", "--db", "l.db", cwd=tmp_path),
            "l.db: no incident inc-nope")
    ledger = Ledger(tmp_path / "l.db", run_id="r1")
    ledger.action({**base, "incident_id": "inc-c", "status": "succeeded"}, "finished")
    ledger.close()
    refused(rollbackd("approve", "inc-quiet", "--by", "alice", "--db", "l.db", cwd=tmp_path),
            "inc-quiet: no rollback of it waited for approval in l.db (it has no rollback)")
    refused(rollbackd("approve", "inc-c", "--by", "alice", "--db", "l.db", cwd=tmp_path),
            "inc-c: no rollback of it waited for approval in l.db (its last rollback is succeeded)")
    assert approvals() == 0
    out = rollbackd("approve", "inc-a", "--by", "alice", "--db", "l.db", cwd=tmp_path)
    assert out.returncode == 0 and b"inc-a: approved by alice" in out.stdout, out.stderr
    assert b"warning" not in out.stderr
    # A settled wait (timeout or an earlier answer): recorded for a replay, with a warning.
    out = rollbackd("approve", "inc-b", "--reject", "--by", "alice", "--db", "l.db", cwd=tmp_path)
    assert out.returncode == 0 and b"inc-b: rejected by alice" in out.stdout, out.stderr
    assert b"warning: inc-b: its wait is settled already (run r1: skipped)" in out.stderr
    assert approvals() == 2


def test_every_command_and_option_has_help():
    import click

    from rollbackd.cli import main

    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        if not (cmd.help or cmd.short_help):
            missing.append(path)
        missing.extend(f"{path} {p.opts[0]}" for p in cmd.params if isinstance(p, click.Option) and not p.help)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(main, "rollbackd")
    assert missing == []


def test_group_help_describes_its_subcommands(tmp_path):
    out = rollbackd("silence", "--help", cwd=tmp_path).stdout.decode()
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for sub in ("add", "expire", "list"):
        assert len(lines[sub].split()) > 1, out  # a description beside the name


def test_simulate_help_lists_every_builtin_scenario(tmp_path):
    from rollbackd.scenarios import BUILTIN

    out = rollbackd("simulate", "--help", cwd=tmp_path).stdout.decode()
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert set(BUILTIN) <= listed, out


@pytest.mark.parametrize("option", [["--log-level", "debug"], ["--log-json"]])
def test_a_global_option_after_the_subcommand_says_where_it_goes(tmp_path, option):
    out = rollbackd("incidents", "list", *option, cwd=tmp_path)
    refused(out, f"{option[0]} is an option of rollbackd itself: put it before the subcommand")


def test_dry_run_on_the_command_line_beats_a_deployments_and_a_rules_dry_run_false(tmp_path):
    """--dry-run is an operator's override: a production rules file whose deployment and rule
    say dry_run: false must still not reach its real webhook."""
    from loopback import LoopbackServer

    rec = tmp_path / "s.jsonl"
    assert rollbackd("simulate", "sustained_errors", "--out", str(rec), cwd=tmp_path).returncode == 0
    with LoopbackServer() as hook:
        text = (RULES.read_text()
                .replace("backend: {type: log}", f"backend: {{type: webhook, url: '{hook.url}/rollback'}}\n    dry_run: false")
                .replace("    actions: [notify, rollback]", "    actions: [notify, rollback]\n    dry_run: false", 1))
        rules = tmp_path / "prod.yaml"
        rules.write_text(text)
        out = rollbackd("replay", str(rec), "--config", str(rules), "--dry-run", "--notifier", "none",
                        "--decisions-out", "d.jsonl", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert hook.requests == []
        # without the flag the same file rolls back for real: the test can fail
        out = rollbackd("replay", str(rec), "--config", str(rules), "--notifier", "none", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert len(hook.requests) == 1
    decisions = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    (rb,) = [d for d in decisions if d["kind"] == "action" and d["action"] == "rollback"]
    assert (rb["status"], rb["dry_run"]) == ("dry_run", True)
