"""With --log-json every line on stderr is one JSON object: structlog's events, stdlib logging
(librdkafka's own lines through the Kafka clients' ``logger``, warnings), the start-up lines of
``rollbackd run``, and an uncaught exception. Run as real processes: logging is per process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROLLBACKD_", "KAFKA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _records(stderr: str) -> list[dict]:
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(rec, dict) and {"logged_at", "level", "event"} <= set(rec), line
        assert rec["logged_at"].endswith("Z") and rec["level"] in ("debug", "info", "warning", "error", "critical")
        records.append(rec)
    return records


def test_run_with_log_json_writes_only_json_during_a_broker_outage(tmp_path):
    """127.0.0.1:1 refuses at once: librdkafka logs each failed connection (plain text on stderr
    before, through an unconfigured stdlib logger)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollbackd.cli", "--log-json", "--log-level", "info", "run", "-c", str(RULES),
         "--bootstrap-servers", "127.0.0.1:1", "--http", "127.0.0.1:0"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        # Until librdkafka's first refused connection is logged (a start-up on a busy machine
        # can take seconds), then stop.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and not any("Connection refused" in x for x in lines):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:  # a slow stop is not this test's subject: its lines are
            proc.kill()
            proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    reader.join(5)
    out = proc.stdout.read()  # type: ignore[union-attr]
    err = "".join(lines)
    records = _records(err)
    events = [r["event"] for r in records]
    assert events[:2] == ["http.serving", "daemon.consuming"], events[:5]
    assert records[0]["url"].startswith("http://127.0.0.1:")
    assert records[1]["topics"] == ["predictions", "outcomes"] and records[1]["bootstrap_servers"] == "127.0.0.1:1"
    rdkafka = [r for r in records if r.get("logger") == "rollbackd.kafka.librdkafka"]
    assert rdkafka and "Connection refused" in rdkafka[0]["event"] and rdkafka[0]["level"] == "error"
    assert out == ""


SCRIPT = r'''
import logging, threading, warnings
import structlog
from confluent_kafka import Producer
from rollbackd.cli import _configure_logging
from rollbackd.daemon.kafka import librdkafka_log

_configure_logging("info", True)
logging.getLogger("some.library").warning("a %s line", "stdlib")
warnings.warn("deprecated thing")
structlog.get_logger("rollbackd.test").info("structured", n=1)
try:
    1 / 0
except ZeroDivisionError:
    structlog.get_logger("rollbackd.test").error("failed", exc_info=True)
producer = Producer({"bootstrap.servers": "127.0.0.1:1", "logger": librdkafka_log})
producer.produce("t", b"x")
producer.flush(1.5)
t = threading.Thread(target=lambda: 1 / 0, name="worker")
t.start(); t.join()
raise RuntimeError("uncaught")
'''


def test_stdlib_librdkafka_warnings_and_crashes_are_json(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    records = _records(done.stderr)
    by_event = {r["event"]: r for r in records}
    assert by_event["a stdlib line"]["logger"] == "some.library" and by_event["a stdlib line"]["level"] == "warning"
    assert any("deprecated thing" in r["event"] and r.get("logger") == "py.warnings" for r in records)
    assert by_event["structured"]["n"] == 1
    assert "ZeroDivisionError" in by_event["failed"]["exception"]
    assert any(r.get("logger") == "rollbackd.kafka.librdkafka" and "Connection refused" in r["event"] for r in records)
    assert by_event["thread.uncaught_exception"]["thread"] == "worker"
    assert "ZeroDivisionError" in by_event["thread.uncaught_exception"]["exception"]
    assert "RuntimeError: uncaught" in by_event["uncaught_exception"]["exception"]
