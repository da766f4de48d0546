"""Exactly-once on a real Kafka broker: a stalled instance that wakes up, a stalled broker and a
broker outage longer than the session timeout, each mid-stream, while events keep arriving.

Each run must end with the replay's decisions (as a multiset, and the alert and incident
decisions of each deployment in the replay's order), every event counted exactly once, none late,
and one webhook call per rollback. The daemons are `rollbackd run` subprocesses, so they can be
SIGSTOPped; the producer is paced, so partitions are read to their end (and then flagged so)
while more is on its way, as live.

Times are short: session.timeout.ms 6 s (the broker's minimum), checkpoints every 0.3 s, a
transaction timeout of 10 s (the daemon's floor).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from loopback import LoopbackServer
from live_reference import live_reference
from test_scaleout import RULES, log_of, start, stop, wait_until

from rollbackd.daemon.audit import verify_ledger
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, generate

pytestmark = pytest.mark.kafka

SESSION_TIMEOUT = 6.0


def rules_for(tmp_path: Path, url: str, deployments: tuple[str, ...]) -> Path:
    block = RULES[RULES.index("  demo-scorer:"):RULES.index("rules:")]
    body = block.replace("backend: {type: log}", f'backend: {{type: webhook, url: "{url}", max_attempts: 3}}')
    text = RULES.replace(block, "".join(body.replace("demo-scorer", d) for d in deployments))
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def scenario(deployments: tuple[str, ...]) -> list[bytes]:
    return list(generate(dataclasses.replace(BUILTIN["sustained_errors"], deployments=deployments, duration=1500.0)))


def reference(lines: list[bytes], rules: Path, tmp_path: Path, deployments: tuple[str, ...]) -> list[dict]:
    """The replay's decisions (no end-of-stream flush: a live run stops at its watermark)."""
    path = tmp_path / "all.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    out = live_reference(path, load_config(rules), tmp_path / "reference.jsonl", webhook_deployments=deployments)
    return [json.loads(x) for x in out.decode().splitlines()]


def partition_of(line: bytes, deployments: tuple[str, ...]) -> int:
    dep = json.loads(line).get("deployment")
    return deployments.index(dep) if dep in deployments else 0


def counts(lines: list[bytes], deployments: tuple[str, ...]) -> dict[int, int]:
    out = {p: 0 for p in range(len(deployments))}
    for line in lines:
        out[partition_of(line, deployments)] += 1
    return out


def produce(bootstrap: str, topic: str, lines: list[bytes], deployments: tuple[str, ...], seconds: float = 0.0) -> None:
    """Each deployment's events to its own partition, in order; spread over ``seconds``."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    chunk = 500
    started = time.monotonic()
    for i in range(0, len(lines), chunk):
        for line in lines[i:i + chunk]:
            while True:
                try:
                    p.produce(topic, line, partition=partition_of(line, deployments))
                    break
                except BufferError:
                    p.poll(0.05)
        p.poll(0)
        if seconds:
            ahead = started + seconds * (i + chunk) / len(lines) - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    assert p.flush(120) == 0


def paced(bootstrap: str, topic: str, lines: list[bytes], deployments: tuple[str, ...], seconds: float) -> threading.Thread:
    t = threading.Thread(target=produce, args=(bootstrap, topic, lines, deployments, seconds), daemon=True)
    t.start()
    return t


def is_anchor(m) -> bool:
    """The ledger's anchors share the decisions topic (key anchor/<ledger id>)."""
    return (m.key() or b"").startswith(b"anchor/")


def decisions_in(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(m.value()) for m in read_topic(bootstrap, topic) if not is_anchor(m)]


def read_topic(bootstrap: str, topic: str, isolation: str = "read_committed") -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                  "enable.auto.commit": False, "enable.partition.eof": True, "isolation.level": isolation})
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out, ends = [], set()
    deadline = time.monotonic() + 30
    while len(ends) < len(parts) and time.monotonic() < deadline:
        for m in c.consume(500, 0.2):
            if m.error() is None:
                out.append(m)
            else:
                ends.add(m.partition())
    c.close()
    return out


def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> dict[int, int]:
    """The group's committed offsets ({} while the coordinator cannot say: ask again)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    except KafkaException:
        return {}
    finally:
        c.close()


def canonical(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))


def assert_decides_as_the_replay(got: list[dict], expected: list[dict]) -> None:
    """As a multiset; and each deployment's alert and incident decisions in the replay's order
    (a call's outcome is written when the call answers, so it may come after decisions made
    meanwhile, live as in any run with the effect lanes)."""
    assert sorted(map(canonical, got)) == sorted(map(canonical, expected))

    def derived(recs: list[dict], dep: str) -> list[str]:
        return [canonical(r) for r in recs if r.get("deployment") == dep and r.get("kind") != "action"]

    for dep in sorted({r.get("deployment") for r in expected}):
        assert derived(got, dep) == derived(expected, dep), f"{dep}: order differs from the replay"


def last_counts(proc) -> tuple[dict, int]:
    """The tasks' event counters and the events read, from the daemon's ``daemon.stopped`` line."""
    stopped = [line for line in log_of(proc).splitlines() if "daemon.stopped" in line]
    assert stopped, log_of(proc)[-3000:]
    counted = ast.literal_eval(re.search(r"counted=(\{[^}]*\})", stopped[-1]).group(1))
    return counted, int(re.search(r"events=(\d+)", stopped[-1]).group(1))


def expected_counts(lines: list[bytes]) -> dict[str, int]:
    kinds = [json.loads(line).get("type") for line in lines]
    return {"predictions": kinds.count("prediction"), "outcomes": kinds.count("outcome"),
            "deploys": kinds.count("deploy")}


TWO = ("dep-a", "dep-b")
THREE = ("dep-a", "dep-b", "dep-c")


@pytest.fixture(scope="module")
def two() -> list[bytes]:
    return scenario(TWO)


@pytest.fixture(scope="module")
def three() -> list[bytes]:
    return scenario(THREE)


def test_an_instance_stalled_past_the_session_timeout_wakes_up_fenced(kafka_bootstrap, topic, tmp_path, two):
    """Two instances share two partitions; A is SIGSTOPped mid-stream (before the version change
    that leads to the rollbacks), B takes its partition when A's session times out and finishes
    the stream; A is SIGCONTed. A read-committed reader sees no record of A's after B took over,
    the replay's decisions once each, and each rollback was called once."""
    name = topic(partitions=2)
    state, group = f"{name}-state", f"g-{name}"
    cut = int(len(two) * 0.4)  # the version changes at 60 %
    with LoopbackServer() as hook:
        rules = rules_for(tmp_path, hook.url + "/rollback", TWO)
        expected = reference(two, rules, tmp_path, TWO)
        produce(kafka_bootstrap, name, two[:cut], TWO)
        first, total = counts(two[:cut], TWO), counts(two, TWO)
        a = start(tmp_path, "a", rules, kafka_bootstrap, name, group, "--state-topic", state)
        wait_until(lambda: committed(kafka_bootstrap, group, name, 2) == first, [a], what="A's first part")
        b = start(tmp_path, "b", rules, kafka_bootstrap, name, group, "--state-topic", state)
        wait_until(lambda: "task.restored" in log_of(b), [a, b], what="B taking a task over")
        feeder = paced(kafka_bootstrap, name, two[cut:], TWO, seconds=8.0)
        time.sleep(1.5)  # A is reading its partition's stream: events since its last commit
        a.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        feeder.join()
        wait_until(lambda: committed(kafka_bootstrap, group, name, 2) == total, [b], timeout=120,
                   what="B finishing both partitions")
        assert "task.restored" in log_of(b)
        assert time.monotonic() - stopped_at > SESSION_TIMEOUT
        a.send_signal(signal.SIGCONT)
        wait_until(lambda: "tasks.lost" in log_of(a), [a, b], what="A finding its partitions lost")
        wait_until(lambda: "task.restored" in log_of(a), [a, b], what="A getting a partition back")
        time.sleep(3)  # partition_idle_after: the shorter stream's task follows the other's clock
        stop(b)
        stop(a)
        keys = [r.header("Idempotency-Key") for r in hook.requests]
    published = decisions_in(kafka_bootstrap, f"{state}.decisions")
    ids = [rec.pop("decision_id") for rec in published]
    assert len(ids) == len(set(ids)), "no decision visible twice"
    assert_decides_as_the_replay(published, expected)
    rollbacks = [r for r in expected if r.get("action") == "rollback"]
    assert len(rollbacks) == 2 and sorted(keys) == sorted(r["idempotency_key"] for r in rollbacks), keys
    # No stale state record: each partition's committed records cover ever later offsets.
    records = read_topic(kafka_bootstrap, state)
    everything = read_topic(kafka_bootstrap, state, "read_uncommitted")
    for p in (0, 1):
        covered = [json.loads(dict(m.headers())["rollbackd-position"]).get(f"{name}:{p}", 0)
                   for m in records if m.partition() == p]
        assert covered == sorted(covered), f"state partition {p} went back: {covered}"
        assert covered[-1] == total[p]
    print(f"state records: {len(records)} committed, {len(everything) - len(records)} aborted")
    # Each instance's ledger (A's rewound when it was fenced) verifies against the anchors it
    # published to the decisions topic: an honest rewind never looks like a cut tail.
    anchors = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, f"{state}.decisions") if is_anchor(m)]
    for inst in ("a", "b"):
        db = tmp_path / inst / "rollbackd.db"
        ledger_id = verify_ledger(db).ledger_id
        mine = [(n, a) for n, a in enumerate(anchors, 1) if a["ledger_id"] == ledger_id]
        assert mine, f"{inst} published anchors to the decisions topic"
        report = verify_ledger(db, anchors=mine)
        assert report.breaks == [] and report.anchors == len(mine), (inst, report.breaks)


def outage_run(kafka_broker, topic, tmp_path, lines, outage, *extra: str) -> None:
    """One instance on three partitions; mid-stream the broker goes away (``outage``) for
    longer than the session timeout while the producer keeps sending."""
    bootstrap = kafka_broker.bootstrap
    name = topic(partitions=3)
    group = f"g-{name}"
    cut = int(len(lines) * 0.3)
    with LoopbackServer() as hook:
        rules = rules_for(tmp_path, hook.url + "/rollback", THREE)
        expected = reference(lines, rules, tmp_path, THREE)
        produce(bootstrap, name, lines[:cut], THREE)
        total = counts(lines, THREE)
        proc = start(tmp_path, "solo", rules, bootstrap, name, group, *extra)
        wait_until(lambda: sum(committed(bootstrap, group, name).values()) >= cut // 2, [proc], what="reading")
        feeder = paced(bootstrap, name, lines[cut:], THREE, seconds=16.0)
        time.sleep(4)
        outage()
        feeder.join()
        wait_until(lambda: committed(bootstrap, group, name) == total, [proc], timeout=120, what="the end")
        time.sleep(3)
        stop(proc)
        keys = [r.header("Idempotency-Key") for r in hook.requests]
    got = proc  # the decisions: the local log (file mode) or the decisions topic
    if "--state-topic" in extra:
        decisions = extra[extra.index("--state-topic") + 1] + ".decisions"
        got = decisions_in(bootstrap, decisions)
        ids = [rec.pop("decision_id") for rec in got]
        assert len(ids) == len(set(ids)), "no decision visible twice"
    else:
        got = [json.loads(x) for x in (tmp_path / "solo" / "rollbackd.decisions.jsonl").read_text().splitlines()]
    assert_decides_as_the_replay(got, expected)
    counted, read = last_counts(proc)
    assert counted.pop("late", 0) == 0, "no event late"
    assert counted == expected_counts(lines), "every event counted once"
    if "--state-topic" not in extra:  # a rewind reads again what the aborted transaction covered
        assert read == len(lines), "no event read twice"
    rollbacks = [r for r in expected if r.get("action") == "rollback"]
    assert len(rollbacks) == 3 and sorted(keys) == sorted(r["idempotency_key"] for r in rollbacks), keys


def test_a_broker_stalled_past_the_session_timeout_changes_no_decision(kafka_broker, topic, tmp_path, three):
    """SIGSTOP for twice the session timeout, checkpoint file: the session is lost, commits fail,
    partitions come back and resume where the in-memory state is; partitions flagged at their
    end before the stall follow no other partition's clock until the broker confirms the end."""

    def stall() -> None:
        kafka_broker.pause()
        time.sleep(2 * SESSION_TIMEOUT)
        kafka_broker.resume()

    outage_run(kafka_broker, topic, tmp_path, three, stall)


def test_a_broker_outage_past_the_session_timeout_changes_no_decision_exactly_once(kafka_broker, topic, tmp_path, three):
    """The broker stopped for twice the session timeout and started again, state topic and
    transactions: open transactions time out, the session is lost, every task is rewound to its
    committed state and reads on from there."""
    outage_run(kafka_broker, topic, tmp_path, three, lambda: kafka_broker.restart(down=2 * SESSION_TIMEOUT),
               "--state-topic", f"eos-{time.monotonic_ns()}-state")


# The mechanisms, one by one (a real broker, no daemon) ---------------------------------------


def _group_member(bootstrap: str, group: str, topic: str) -> Consumer:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "max.poll.interval.ms": 6000,
                  "auto.offset.reset": "earliest"})
    got: list = []
    c.subscribe([topic], on_assign=lambda consumer, parts: got.extend(parts))
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        c.poll(0.2)
    assert got, "no partition assigned"
    return c


def _headers(msgs: list) -> list[dict]:
    return [{k: v.decode() for k, v in (m.headers() or [])} for m in msgs]


def test_a_member_that_lost_its_partitions_cannot_commit(kafka_bootstrap, topic):
    """The transaction of an instance whose group membership is gone (it stopped polling past
    max.poll.interval.ms; a stall past the session timeout is the same to the coordinator)
    aborts: neither its state record nor its decision is visible to a read-committed reader,
    the group's offsets stay where they were, and the producer goes on with a valid member."""
    from rollbackd.daemon.scaleout import GroupState, TransactionFailed

    inputs, state, decisions = topic(1), topic(1), topic(1)
    group = f"g-{inputs}"
    zombie = _group_member(kafka_bootstrap, group, inputs)
    store = GroupState(kafka_bootstrap, group, state, decisions, transactional_id=f"t-{inputs}")
    rec = {"kind": "alert", "deployment": "d", "ts": 1.0}

    def commit(offset: int, member: Consumer) -> None:
        store.publish({**rec, "ts": float(offset)}, f"id-{offset}")
        position = {f"{inputs}:0": offset}
        store.commit({0: {"pipeline": b"", "position": position, "decisions_offset": 0}}, position,
                     member.consumer_group_metadata())

    commit(5, zombie)
    successor = _group_member(kafka_bootstrap, group, inputs)  # waits out the zombie's membership
    with pytest.raises(TransactionFailed) as failure:
        commit(9, zombie)
    assert not failure.value.in_doubt
    assert store.settle(5.0) == "aborted"
    committed_states = read_topic(kafka_bootstrap, state)
    assert [h["rollbackd-position"] for h in _headers(committed_states)] == [json.dumps({f"{inputs}:0": 5})]
    assert [json.loads(m.value())["decision_id"] for m in read_topic(kafka_bootstrap, decisions)] == ["id-5"]
    (tp,) = successor.committed([TopicPartition(inputs, 0)], timeout=10)
    assert tp.offset == 5
    commit(12, successor)
    assert [json.loads(m.value())["decision_id"] for m in read_topic(kafka_bootstrap, decisions)] == ["id-5", "id-12"]
    zombie.close()
    successor.close()
    store.close()


class _SlowCommit:
    """Fault injection: the producer's commit reaches the coordinator ``delay`` seconds late (an
    owner stalled between sending its offsets and committing)."""

    def __init__(self, producer, delay: float) -> None:
        self._producer, self._delay = producer, delay

    def __getattr__(self, name: str):
        return getattr(self._producer, name)

    def commit_transaction(self, timeout: float):
        time.sleep(self._delay)
        return self._producer.commit_transaction(timeout)


def test_a_new_owner_reads_a_task_only_once_no_transaction_is_open_on_it(kafka_bootstrap, topic):
    """The previous owner's commit is in flight (its records written, the commit not yet done):
    the new owner's load waits for it and reads the state it commits, never the one before it
    (which would make the in-flight decisions appear later, behind the new owner's back)."""
    from rollbackd.daemon.scaleout import GroupState

    inputs, state, decisions = topic(1), topic(1), topic(1)
    group = f"g-{inputs}"
    member = _group_member(kafka_bootstrap, group, inputs)
    old = GroupState(kafka_bootstrap, group, state, decisions, transactional_id=f"old-{inputs}")
    new = GroupState(kafka_bootstrap, group, state, decisions, transactional_id=f"new-{inputs}")

    def commit(offset: int) -> None:
        old.publish({"kind": "alert", "deployment": "d", "ts": float(offset)}, f"id-{offset}")
        position = {f"{inputs}:0": offset}
        old.commit({0: {"pipeline": b"", "position": position, "decisions_offset": 0}}, position,
                   member.consumer_group_metadata())

    commit(5)
    old.txn._producer = _SlowCommit(old.txn._producer, delay=3.0)
    late = threading.Thread(target=commit, args=(9,))
    late.start()
    time.sleep(1.0)  # its records are on the broker, the commit not yet sent
    started = time.monotonic()
    saved = new.load(0)
    waited = time.monotonic() - started
    late.join()
    assert saved is not None and saved["position"] == {f"{inputs}:0": 9}
    assert waited > 1.0, f"read after {waited:.1f} s: did not wait for the open transaction"
    member.close()
    old.close()
    new.close()


def test_a_partition_flagged_at_its_end_is_not_at_its_end_until_the_broker_says_so(kafka_bootstrap, topic):
    """The end-of-partition flag stays set while nothing is read (a stalled loop, a broker that
    resumes with a backlog): ``at_end`` asks the broker for the end offset and is True only on
    a fresh answer that the end is where the consumer is."""
    from rollbackd.daemon.kafka import KafkaSource
    from rollbackd.daemon.kafka_health import END_FRESH

    name = topic(1)
    lines = scenario(("dep-a",))[:300]
    produce(kafka_bootstrap, name, lines[:200], ("dep-a",))
    src = KafkaSource(kafka_bootstrap, f"g-{name}", name, poll_timeout=0.1)

    def read_until_at_end() -> int:
        n, deadline = 0, time.monotonic() + 20
        while time.monotonic() < deadline:
            batch = src.read(1000)
            n += len(batch.events)
            if src.at_end(0):
                return n
        raise AssertionError("never at its end")

    assert read_until_at_end() == 200
    produce(kafka_bootstrap, name, lines[200:], ("dep-a",))  # a backlog the loop has not read
    time.sleep(END_FRESH)  # what the broker said before it came is no longer believed
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert not src.at_end(0), "at its end by a stale flag, with 100 events unread"
        time.sleep(0.05)
    assert read_until_at_end() == 100
    src.close()
