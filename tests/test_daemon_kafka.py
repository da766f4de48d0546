"""`rollbackd run` against a real Kafka broker: the same decisions as a replay, through
SIGTERM, SIGKILL and a broker outage, with no lost and no duplicate rollback.

The daemon runs as a real subprocess of the console script (signals included); rollbacks go
to a real HTTP server on loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from loopback import LoopbackServer
from live_reference import live_reference

from rollbackd.daemon.kafka import publish
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, generate

pytestmark = pytest.mark.kafka

RULES_TEMPLATE = (Path(__file__).parent / "data" / "e2e-rules.yaml").read_text()


def rules_with_webhook(tmp_path: Path, url: str) -> Path:
    text = RULES_TEMPLATE.replace(
        "backend: {type: log}", f'backend: {{type: webhook, url: "{url}", max_attempts: 3}}'
    ).replace("notifier: {type: console}", "notifier: {type: console}")
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def reference_decisions(recording: Path, rules: Path, tmp_path: Path, webhook: bool = False) -> bytes:
    """What a replay decides, up to the watermark a live run reaches; with ``webhook``, rollbacks
    go to a webhook server of its own, as the live run's do."""
    return live_reference(recording, load_config(rules), tmp_path / "reference.jsonl",
                          webhook_deployments=["demo-scorer"] if webhook else [])


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


_COORDINATOR_MOVING = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                       KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT}


def committed(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed offset, or -1 while the broker cannot say (a retriable error such as
    NOT_COORDINATOR while the group coordinator loads or moves: the caller asks again)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        (tp,) = c.committed([TopicPartition(topic, 0)], timeout=10)
        return max(tp.offset, 0)
    except KafkaException as exc:
        err = exc.args[0]
        if not (err.retriable() or err.code() in _COORDINATOR_MOVING):
            raise
        return -1
    finally:
        c.close()


def wait_committed(bootstrap: str, group: str, topic: str, at_least: int, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if committed(bootstrap, group, topic) >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}: {proc.stderr.read()[-3000:]!r}")
        time.sleep(0.2)
    raise AssertionError(f"offsets of {group} did not reach {at_least} in {timeout}s")


class Daemon:
    def __init__(self, tmp_path: Path, rules: Path, bootstrap: str, topic: str, group: str, *extra: str):
        exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
        self.cmd = [exe or "rollbackd", "run", "--config", str(rules), "--bootstrap-servers", bootstrap,
                    "--group-id", group, "--topic", topic, "--checkpoint-every", "0.3",
                    "--idle-after", "3600", "--batch-size", "2000",
                    # A SIGKILLed member holds its partitions until its session times out.
                    "--kafka-config", "session.timeout.ms=6000", "--kafka-config", "heartbeat.interval.ms=1000",
                    *extra]
        self.cwd = tmp_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        return self.proc

    def signal(self, sig: int) -> str:
        assert self.proc is not None
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture(scope="module")
def recording_lines() -> list[bytes]:
    return list(generate(BUILTIN["sustained_errors"]))


def test_run_matches_replay_through_sigkill_and_sigterm(kafka_bootstrap, topic, tmp_path, recording_lines):
    name = topic(partitions=1)
    n = len(recording_lines)
    recording = write_lines(tmp_path / "all.jsonl", recording_lines)
    thirds = [recording_lines[: n // 3], recording_lines[n // 3: 2 * n // 3], recording_lines[2 * n // 3:]]
    with LoopbackServer() as hook:
        rules = rules_with_webhook(tmp_path, hook.url + "/rollback")
        expected = reference_decisions(recording, rules, tmp_path, webhook=True)
        group = f"g-{name}"
        daemon = Daemon(tmp_path, rules, kafka_bootstrap, name, group)
        published = 0
        for i, part in enumerate(thirds):
            publish(kafka_bootstrap, name, str(write_lines(tmp_path / f"part{i}.jsonl", part)))
            published += len(part)
            proc = daemon.start()
            wait_committed(kafka_bootstrap, group, name, published, proc)
            if i < 2:
                proc.kill()  # SIGKILL: no last checkpoint, no clean close
                proc.wait(timeout=30)
            else:
                out = daemon.signal(signal.SIGTERM)
                assert proc.returncode == 0, proc.stderr.read()[-3000:]
        keys = [r.header("Idempotency-Key") for r in hook.requests]
    assert (tmp_path / "rollbackd.decisions.jsonl").read_bytes() == expected
    assert len(keys) == 1, f"exactly one rollback call, got {keys}"
    assert "OPENED" in out or b"OPENED" not in expected  # notices printed by the last process


def test_broker_outage_raises_blind_notice_then_recovers_without_loss(
    kafka_bootstrap, kafka_broker, topic, tmp_path, recording_lines
):
    name = topic(partitions=1)
    n = len(recording_lines)
    recording = write_lines(tmp_path / "all.jsonl", recording_lines)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_TEMPLATE)
    expected = reference_decisions(recording, rules, tmp_path)
    group = f"g-{name}"
    publish(kafka_bootstrap, name, str(write_lines(tmp_path / "a.jsonl", recording_lines[: n // 2])))
    daemon = Daemon(tmp_path, rules, kafka_bootstrap, name, group, "--blind-after", "2")
    proc = daemon.start()
    wait_committed(kafka_bootstrap, group, name, n // 2, proc)
    kafka_broker.stop()
    time.sleep(8)
    kafka_broker.start()
    publish(kafka_bootstrap, name, str(write_lines(tmp_path / "b.jsonl", recording_lines[n // 2:])))
    wait_committed(kafka_bootstrap, group, name, n, proc, timeout=120)
    out = daemon.signal(signal.SIGTERM)
    assert proc.returncode == 0
    assert "[BLIND]" in out and "[RESOLVED]" in out
    assert (tmp_path / "rollbackd.decisions.jsonl").read_bytes() == expected


def test_malformed_messages_go_to_the_dead_letter_topic_and_processing_goes_on(
    kafka_bootstrap, topic, tmp_path, recording_lines
):
    name, dlq = topic(partitions=1), topic(partitions=1)
    bad = [b"{not json", b'{"type":"prediction","id":"x"}']
    lines = recording_lines[:3000] + bad + recording_lines[3000:6000]
    publish(kafka_bootstrap, name, str(write_lines(tmp_path / "mixed.jsonl", lines)))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_TEMPLATE)
    group = f"g-{name}"
    daemon = Daemon(tmp_path, rules, kafka_bootstrap, name, group, "--dead-letter-topic", dlq)
    proc = daemon.start()
    wait_committed(kafka_bootstrap, group, name, len(lines), proc)
    daemon.signal(signal.SIGTERM)
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"check-{dlq}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([dlq])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        got.extend(m for m in c.consume(10, 1.0) if m.error() is None)
    c.close()
    assert [m.value() for m in got] == bad
    reasons = [dict(m.headers())["rollbackd-reason"] for m in got]
    assert reasons == [b"invalid_json", b"missing_field"]
