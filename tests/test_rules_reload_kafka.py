"""SIGHUP to a real `rollbackd run` subprocess on a real Kafka broker: a broken rules file changes
nothing and raises a notice; a good one adding a rule is applied between batches, the new rule is
evaluated from the next window on, and the old rules decide exactly as a replay without the reload."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from test_daemon_kafka import Daemon, reference_decisions, wait_committed, write_lines

from rollbackd.daemon.kafka import publish
from rollbackd.scenarios import BUILTIN, generate

pytestmark = pytest.mark.kafka

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"
NEW_RULE = {"name": "p50-latency", "detector": "latency", "params": {"quantile": 0.5}, "threshold": 1e9,
            "window": {"size": "1m"}, "min_samples": 10, "severity": "info", "actions": ["notify"]}


def reloads(db: Path) -> list[dict]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("select * from rule_reloads order by seq")]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def wait_reloads(db: Path, n: int, proc, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = reloads(db)
        if len(rows) >= n:
            return rows
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}: {proc.stderr.read()[-3000:]!r}")
        time.sleep(0.1)
    raise AssertionError(f"{n} reload(s) expected in the ledger, got {reloads(db)}")


def test_sighup_reloads_the_rules_of_a_running_daemon(kafka_bootstrap, topic, tmp_path):
    lines = list(generate(BUILTIN["sustained_errors"]))
    n = len(lines)
    recording = write_lines(tmp_path / "all.jsonl", lines)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.read_text())
    expected = reference_decisions(recording, rules, tmp_path)
    name = topic(partitions=1)
    group = f"g-{name}"
    daemon = Daemon(tmp_path, rules, kafka_bootstrap, name, group, "--measurements-out", "m.jsonl")
    publish(kafka_bootstrap, name, str(write_lines(tmp_path / "a.jsonl", lines[: n // 2])))
    proc = daemon.start()
    wait_committed(kafka_bootstrap, group, name, n // 2, proc)

    good = yaml.safe_load(RULES.read_text())
    rules.write_text("version: 1\nrules:\n  - {name: x, detector: nope, threshold: 1}\n")
    proc.send_signal(signal.SIGHUP)
    (failed,) = wait_reloads(tmp_path / "rollbackd.db", 1, proc)
    assert (failed["result"], failed["trigger"]) == ("failed", "SIGHUP")
    assert "nope" in failed["detail"]

    good["rules"].append(NEW_RULE)
    rules.write_text(yaml.safe_dump(good, sort_keys=False))
    proc.send_signal(signal.SIGHUP)
    ok = wait_reloads(tmp_path / "rollbackd.db", 2, proc)[1]
    assert (ok["result"], ok["added"], ok["changed"], ok["removed"]) == ("ok", "p50-latency", "", "")

    publish(kafka_bootstrap, name, str(write_lines(tmp_path / "b.jsonl", lines[n // 2:])))
    wait_committed(kafka_bootstrap, group, name, n, proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "reload of" in out and "the running rules are kept" in out  # the console notice
    # The old rules never noticed: the decisions of a replay without any reload.
    assert (tmp_path / "rollbackd.decisions.jsonl").read_bytes() == expected
    measured = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    new = [m["window_end_epoch"] for m in measured if m.get("rule") == "p50-latency"]
    old = [m["window_end_epoch"] for m in measured if m.get("rule") == "serving-error-rate"]
    assert new, "the new rule is evaluated"
    # Not from the start (it came with the reload, half-way), then at every window after it,
    # as the rule beside it with the same window.
    assert min(new) > min(old)
    assert new == [t for t in old if t >= min(new)]
