"""KafkaSource read + decode throughput on a pre-filled topic of 1 million contract events.

    python benchmarks/kafka_consume.py [--events 1000000] [--batch-size 8192] [--repeat 3]

The events are ``benchmark_scenario`` (two deployments, 10 features, 60 % labelled), generated once
into a cache folder and produced with ``rollbackd.daemon.kafka.publish`` (keyed by deployment) to a
fresh topic on the test harness broker (tests/kafka_broker.py), or on the cluster named by
``KAFKA_BOOTSTRAP_SERVERS``. Each run then reads the whole topic with a new consumer group
(``stop_at_end``), decoding every value; the time runs from the first message to the end, so the
group join is not counted (it is reported apart). A raw ``Consumer.consume`` loop without decoding
is measured too, to show what decoding costs. The broker runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def read_with_source(bootstrap: str, topic: str, batch_size: int) -> dict[str, float]:
    from rollbackd.daemon.kafka import KafkaSource

    created = time.perf_counter()
    src = KafkaSource(bootstrap, f"bench-{uuid.uuid4().hex[:8]}", topic, stop_at_end=True, poll_timeout=0.5)
    events = rejects = 0
    first = None
    while (batch := src.read(batch_size)) is not None:
        if first is None and (batch.events or batch.rejects):
            first = time.perf_counter()
        events += len(batch.events)
        rejects += len(batch.rejects)
    end = time.perf_counter()
    src.close()
    assert first is not None
    n = events + rejects
    return {"events": events, "rejects": rejects, "seconds": end - first, "join_seconds": first - created,
            "events_per_s": n / (end - first)}


def read_raw(bootstrap: str, topic: str, batch_size: int, total: int) -> dict[str, float]:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    n = 0
    first = None
    while n < total:
        msgs = c.consume(batch_size, 0.5)
        if msgs and first is None:
            first = time.perf_counter()
        n += sum(1 for m in msgs if m.error() is None)
    end = time.perf_counter()
    c.close()
    assert first is not None
    return {"messages": n, "seconds": end - first, "messages_per_s": n / (end - first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "kafka_consume.json"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench"))
    args = ap.parse_args()

    import confluent_kafka
    from confluent_kafka.admin import AdminClient, NewTopic

    from kafka_broker import KAFKA_VERSION, resolve_cluster
    from rollbackd.daemon.kafka import publish

    from replay import cached_recording  # benchmarks/replay.py, beside this script

    cache = Path(args.cache)
    recording = cached_recording(cache, args.events, ".jsonl.gz")

    cluster = resolve_cluster()
    t0 = time.perf_counter()
    cluster.start()
    broker_start = time.perf_counter() - t0
    print(f"broker at {cluster.bootstrap} (ready in {broker_start:.1f}s)")
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
        admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result(30)
        time.sleep(1.0)
        t0 = time.perf_counter()
        produced = publish(cluster.bootstrap, topic, str(recording))
        produce_s = time.perf_counter() - t0
        print(f"produced {produced:,} messages in {produce_s:.1f}s = {produced / produce_s:,.0f} msgs/s")

        runs = []
        for i in range(args.repeat):
            run = read_with_source(cluster.bootstrap, topic, args.batch_size)
            assert run["events"] + run["rejects"] == produced, run
            runs.append(run)
            print(f"KafkaSource run {i + 1}: {produced:,} events in {run['seconds']:.2f}s = "
                  f"{run['events_per_s']:,.0f} events/s (group join {run['join_seconds']:.2f}s)")
        raw = read_raw(cluster.bootstrap, topic, args.batch_size, produced)
        print(f"raw consume (no decode): {raw['messages_per_s']:,.0f} msgs/s")
        admin.delete_topics([topic])[topic].result(30)
    finally:
        close = getattr(cluster, "close", cluster.stop)
        close()

    best = max(runs, key=lambda r: r["events_per_s"])
    result = {
        "benchmark": "kafka_consume",
        "events": produced,
        "partitions": args.partitions,
        "batch_size": args.batch_size,
        "events_per_s": {"best": best["events_per_s"], "all": [r["events_per_s"] for r in runs]},
        "group_join_s": [r["join_seconds"] for r in runs],
        "raw_consume_msgs_per_s": raw["messages_per_s"],
        "publish_msgs_per_s": produced / produce_s,
        "broker_start_s": broker_start,
        "versions": {
            "kafka_broker": KAFKA_VERSION if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else "external",
            "confluent_kafka": confluent_kafka.__version__,
            "librdkafka": confluent_kafka.libversion()[0],
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "broker on the same machine"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"best {result['events_per_s']['best']:,.0f} events/s -> {args.out}")


if __name__ == "__main__":
    main()
