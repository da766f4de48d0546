"""Scale-out on a real Kafka broker: one task per partition, state handed over through a
compacted state topic, every decision in a decisions topic.

Two deployments, each on its own partition of one topic, both break after a version change.
A single instance, and two instances of which one is SIGKILLed mid-stream, must reach the same
decisions as a replay of the recording, with exactly one rollback call per deployment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from loopback import LoopbackServer
from live_reference import live_reference

from rollbackd.daemon.scaleout import decision_id
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, generate

pytestmark = pytest.mark.kafka

DEPLOYMENTS = ("dep-a", "dep-b")
RULES = (Path(__file__).parent / "data" / "e2e-rules.yaml").read_text()


def rules_for(tmp_path: Path, url: str) -> Path:
    block = RULES[RULES.index("  demo-scorer:"):RULES.index("rules:")]
    body = block.replace("backend: {type: log}", f'backend: {{type: webhook, url: "{url}", max_attempts: 3}}')
    text = RULES.replace(block, "".join(body.replace("demo-scorer", d) for d in DEPLOYMENTS))
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def lines() -> list[bytes]:
    scenario = dataclasses.replace(BUILTIN["sustained_errors"], deployments=DEPLOYMENTS, duration=1500.0)
    return list(generate(scenario))


def reference(lines: list[bytes], rules: Path, tmp_path: Path) -> list[str]:
    """A replay's decisions (no end-of-stream flush: a live run stops at its watermark), sorted."""
    path = tmp_path / "all.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    out = live_reference(path, load_config(rules), tmp_path / "reference.jsonl", webhook_deployments=DEPLOYMENTS)
    return sorted(out.decode().splitlines())


def produce(bootstrap: str, topic: str, lines: list[bytes]) -> dict[int, int]:
    """Each deployment's events to its own partition (dep-a → 0, dep-b → 1), in order."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    counts = {0: 0, 1: 0}
    for line in lines:
        try:
            dep = json.loads(line).get("deployment")
        except ValueError:
            dep = None
        part = DEPLOYMENTS.index(dep) if dep in DEPLOYMENTS else 0
        while True:
            try:
                p.produce(topic, line, key=str(dep).encode(), partition=part)
                break
            except BufferError:
                p.poll(0.05)
        counts[part] += 1
    assert p.flush(30) == 0
    return counts


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    except KafkaException:  # e.g. NOT_COORDINATOR while the group coordinator loads: ask again
        return {}
    finally:
        c.close()


def wait_until(check, procs, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for proc in procs:
            if proc.poll() is not None and proc.returncode not in (0, -9):
                raise AssertionError(f"daemon exited with {proc.returncode}: {log_of(proc)[-3000:]}")
        time.sleep(0.2)
    logs = "\n".join(f"--- daemon {proc.log.parent.name} log tail:\n{log_of(proc)[-4000:]}"
                     for proc in procs if getattr(proc, "log", None))
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def start(tmp_path: Path, name: str, rules: Path, bootstrap: str, topic: str, group: str, *extra: str):
    cwd = tmp_path / name
    cwd.mkdir(exist_ok=True)
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent)) or "rollbackd"
    cmd = [exe, "--log-level", "info", "run", "--config", str(rules), "--bootstrap-servers", bootstrap, "--group-id", group,
           "--topic", topic, "--checkpoint-every", "0.3", "--idle-after", "3600", "--batch-size", "500",
           "--kafka-config", "session.timeout.ms=6000", "--kafka-config", "heartbeat.interval.ms=1000",
           *extra]
    # Output to files: a pipe nobody reads would fill up and stall the daemon.
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=open(cwd / "stdout.log", "w"),
                            stderr=open(cwd / "stderr.log", "w"), text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.log = cwd / "stderr.log"  # type: ignore[attr-defined]
    return proc


def log_of(proc) -> str:
    return proc.log.read_text()


def topic_decisions(bootstrap: str, topic: str) -> list[dict]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False,
                  "enable.partition.eof": True})
    meta = c.list_topics(topic, timeout=10).topics[topic]
    parts = sorted(meta.partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out, ends = [], set()
    deadline = time.monotonic() + 30
    while len(ends) < len(parts) and time.monotonic() < deadline:
        for m in c.consume(500, 1.0):
            if m.error() is None and not (m.key() or b"").startswith(b"anchor/"):  # decisions only
                out.append(json.loads(m.value()))
            else:
                ends.add(m.partition())
    c.close()
    return out


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0, log_of(proc)[-3000:]


def test_one_instance_on_two_partitions_decides_as_the_replay(kafka_bootstrap, topic, tmp_path, lines):
    name = topic(partitions=2)
    with LoopbackServer() as hook:
        rules = rules_for(tmp_path, hook.url + "/rollback")
        expected = reference(lines, rules, tmp_path)
        counts = produce(kafka_bootstrap, name, lines)
        group = f"g-{name}"
        proc = start(tmp_path, "solo", rules, kafka_bootstrap, name, group)
        wait_until(lambda: committed(kafka_bootstrap, group, name) == counts, [proc], what="offsets")
        time.sleep(3)  # partition_idle_after: the shorter stream's task follows the other's clock
        stop(proc)
        keys = sorted(r.header("Idempotency-Key") for r in hook.requests)
    got = sorted((tmp_path / "solo" / "rollbackd.decisions.jsonl").read_text().splitlines())
    assert got == expected
    rollbacks = [json.loads(x) for x in expected if '"action":"rollback"' in x]
    assert len(rollbacks) == 2 and len(keys) == 2 and len(set(keys)) == 2


def test_two_instances_one_killed_hand_over_state_and_decide_as_one(kafka_bootstrap, topic, tmp_path, lines):
    name = topic(partitions=2)
    state = f"{name}-state"
    group = f"g-{name}"
    half = len(lines) // 2
    with LoopbackServer() as hook:
        rules = rules_for(tmp_path, hook.url + "/rollback")
        expected = reference(lines, rules, tmp_path)
        extra = ("--state-topic", state)
        first = produce(kafka_bootstrap, name, lines[:half])
        a = start(tmp_path, "a", rules, kafka_bootstrap, name, group, *extra)
        wait_until(lambda: committed(kafka_bootstrap, group, name) == first, [a], what="A's first half")
        # B joins: one partition moves to it, with its state, through the state topic.
        b = start(tmp_path, "b", rules, kafka_bootstrap, name, group, *extra)
        wait_until(lambda: "task.restored" in log_of(b), [a, b], what="B restoring a task")
        held_by_a = 1 - int(re.search(r"task\.restored .* task=(\d)", log_of(b)).group(1))
        total = produce(kafka_bootstrap, name, lines[half:])
        total = {p: first[p] + total[p] for p in first}
        # A dies mid-stream, right after a checkpoint into the second half (no revoke, no last
        # checkpoint): B takes its partition over from the state topic.
        wait_until(lambda: committed(kafka_bootstrap, group, name).get(held_by_a, 0) > first[held_by_a], [a],
                   what="A checkpointing into the second half")
        a.kill()
        a.wait(30)
        wait_until(lambda: committed(kafka_bootstrap, group, name) == total, [b], timeout=120,
                   what="B finishing both partitions")
        time.sleep(3)
        stop(b)
        keys = [r.header("Idempotency-Key") for r in hook.requests]
    published = topic_decisions(kafka_bootstrap, f"{state}.decisions")
    by_id: dict[str, dict] = {}
    for rec in published:
        did = rec.pop("decision_id")
        assert did == decision_id(rec)
        by_id.setdefault(did, rec)
    got = sorted(json.dumps(r, sort_keys=True, separators=(",", ":")) for r in by_id.values())
    assert got == [json.dumps(json.loads(x), sort_keys=True, separators=(",", ":")) for x in expected]
    assert len(published) == len(by_id), "no decision published twice"
    assert len(set(keys)) == 2, f"one rollback per deployment, got {keys}"
    # A key is called again only when A was killed between the call and recording its outcome
    # (the documented window: the call is repeated with the same idempotency key, which the
    # backend deduplicates). Anything else called twice is a double rollback.
    a_log = log_of(a)
    in_flight_at_kill = {k for k in set(keys) if f"idempotency_key={k}" in a_log
                         and not re.search(rf"rollback\.succeeded .*incident={k.split(':')[0]}\b", a_log)}
    repeated = {k for k in keys if keys.count(k) > 1}
    assert repeated <= in_flight_at_kill and all(keys.count(k) <= 2 for k in keys), (keys, in_flight_at_kill)
