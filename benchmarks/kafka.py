"""End to end on Kafka: throughput of one ``rollbackd run`` and the delay from a breach to its rollback.

    .venv/bin/python benchmarks/kafka.py [--at HEAD] [--events 1000000] [--repeat 3] [--partitions 1]
                                         [--live-runs 2] [--deployments 20] [--rounds 4] [--speed 4]
                                         [--skip-throughput | --skip-live]

Everything runs against a real broker: the test harness's Apache Kafka 4 node
(``tests/kafka_broker.py``) or the cluster named by ``KAFKA_BOOTSTRAP_SERVERS``, on the same
machine. The daemon is always the real console script, ``rollbackd run --config RULES
--bootstrap-servers ... --group-id ... --topic ... --http 127.0.0.1:PORT``, as a subprocess with
its default settings (batch 5000, checkpoint and commit every 5 s, ledger, decision log,
console notifier). Rollbacks go to the ``webhook`` backend, pointed at a real HTTP server on
loopback in this process (``tests/loopback.py``) that notes the time each request arrives.
Topics have one partition unless ``--partitions`` says otherwise (the daemon then runs one task,
with its own event time, per partition).

The code measured is the working tree's, or with ``--at REV`` that of a commit: ``git archive
REV rollbackd`` is unpacked into a temporary folder and the benchmark runs again with it first on
``PYTHONPATH`` (daemon, replay control and helpers alike), so a half-edited working tree does not
leak into the numbers. ``code`` in the results names the commit and any uncommitted changes.

Rules: the default rules are ``rollbackd/examples/demo.yaml`` (what ``rollbackd demo`` runs:
serving error rate with rollback, p99 latency, model error, feature drift, all on 1-minute
windows, lateness 30 s, join horizon 1 h). Its ``deployments`` section names the demo's
deployment, so a temporary copy names the benchmark's deployments instead, with the same
settings and a webhook backend; the rules themselves are unchanged.

1. Throughput. ``benchmark_scenario`` (two deployments, 10 features, 60 % labelled, one hour of
   traffic, about 1 million events, no faults; generated once into ``.cache/bench``) is
   published (``rollbackd.daemon.kafka.publish``, keyed by deployment) to a fresh topic. Each
   repeat starts a daemon in a new consumer group, so it reads the whole pre-filled topic, and
   scrapes its ``/metrics`` every ``--scrape-every`` seconds (0.25): ``rollbackd_daemon_events_total``
   counts the events handed to the pipeline (which ingests them, then advances windows,
   detectors, alerts and incidents before the next read). Each scrape also reads the daemon's CPU
   time per thread and the machine's from ``/proc``. The rate is taken between two scrapes inside
   the run, the first that has seen events and the last before the topic is done: both counts
   are exact, so start-up (imports, group join) and the scrape interval do not blur it, and they
   span almost every event. ``to_end_s`` runs from the first scrape with events to the first that
   saw them all (an upper bound). Then SIGTERM: the daemon checkpoints and commits, and the
   group's committed offsets must equal the topic's end (checked). ``--http`` is how the daemon
   runs in production; four scrapes a second cost it little.

   The control: after each daemon run the same file of events goes through the replay core with
   the same rules (``rollbackd.daemon.replay.replay``, batch 5000, in a child process, timed as
   ``benchmarks/replay.py`` times it). ``daemon_over_replay`` compares the two under the same
   machine load. ``events_per_main_thread_cpu_s`` is the rate per CPU-second of the daemon's main
   thread (the one running the pipeline; librdkafka's threads are counted apart): a rough
   estimate of what a core of its own would give. On a shared virtual machine, CPU time per
   event also grows with contention, so it is not a fixed cost either.

2. Action delay. A live topic is fed, in accelerated event time (``--speed``, 4x by default:
   one event-time second every 0.25 s of wall time), by a producer in this process. Each of
   ``--deployments`` deployments (``live-00``...) runs ``Scenario`` traffic (``--rate``
   predictions per event-second, outcomes 2.5-25 event-seconds later). ``--rounds`` times per
   deployment, a bad version fails 25 % of requests for 25 event-seconds, then version 1 is
   deployed again (as the rollback would do) and serves healthy traffic for 35 event-seconds.
   The deployments' schedules are staggered so that breaches close on different window
   boundaries. The rules are the default rules on 5-second windows (``--window``): the same four
   rules and thresholds, ``for`` three windows (as demo.yaml's ``for: 2m`` on 1-minute windows),
   ``keep_firing_for`` two windows, ``known_good_after`` 20 s, ``cooldown`` 0 s, no loop guard,
   lateness unchanged (30 s, ``--lateness``), and ``group_wait`` 0 s so that the rollback runs at
   the window close that makes the alert fire. ``group_wait`` is a deliberate hold on notices and
   actions; with it, the same measurement would start at the event that moved the watermark past
   the incident's opening plus ``group_wait``. The daemon has joined the group before the first
   event is produced.

   Where the delay starts. Event time decides: the window ``[T - size, T)`` whose close makes
   the alert fire (the ``for`` condition is met at its close) is evaluated when the watermark,
   the largest event time seen minus the lateness, reaches ``T``, i.e. when the first event with
   ``ts >= T + lateness`` is ingested. The rollback is decided in that step, and its decision log
   line says ``ts = T``. The delay runs from the wall time the producer handed that event to the
   Kafka client (read before ``produce``, so the producer's batching, ``linger.ms=5``, counts)
   to the time the webhook server received the rollback request. It covers producing, the
   broker, the consumer's batching (``read`` returns after 0.5 s, its ``poll_timeout``, or 5000
   messages), decoding, ingesting, windows and detectors, the alert and incident steps, the
   ledger's outbox row, the HTTP call, and any checkpoint the daemon happens to be writing.
   ``from_window_last_event_s`` is measured from the last event of the breaching window instead:
   the lateness comes on top, paid in event time by design (30 event-seconds: 7.5 s of wall
   time at 4x, 30 s in real time), whatever the daemon does. Each rollback line of the decision
   log is matched to its webhook request by the idempotency key. With several partitions, "the
   first event" is the first on the deployment's partition, whose task's watermark closes the
   window.

Results go to ``benchmarks/results/kafka.json`` (a run with ``--skip-*`` keeps the other part's
last result); a summary is printed. The machine has 2 cores, shared by the broker, the producer,
the daemon and whatever else runs on it: the numbers are medians of repeats, recorded with the
load average and how busy the whole machine was.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.append(str(ROOT))  # the checkout, unless rollbackd is importable already (PYTHONPATH, install)
sys.path.insert(0, str(ROOT / "tests"))

THROUGHPUT_TARGET = 80_000  # events/s
DELAY_TARGET = 2.0  # seconds, p99
START = 1_790_000_000.0  # event time of the live scenarios (Unix seconds)
BAD_FOR = 25.0  # event seconds a bad version serves before version 1 is deployed again
GOOD_FOR = 35.0  # event seconds of healthy traffic between two bad versions
WARMUP = 30.0  # event seconds before the first bad version (version 1 becomes known-good)
ERROR_RATE = 0.25  # share of failed requests of a bad version
CLK = time.monotonic  # one clock for the producer's and the webhook server's stamps


# ---------------------------------------------------------------------------------------------
# Rules


def default_rules() -> dict[str, Any]:
    import yaml

    text = (resources.files("rollbackd") / "examples" / "demo.yaml").read_text()
    return yaml.safe_load(text)


def throughput_rules(url: str, deployments: list[str]) -> str:
    """demo.yaml with the benchmark's deployments (same settings, webhook backend)."""
    import yaml

    rules = default_rules()
    (template,) = rules["deployments"].values()
    rules["deployments"] = {
        d: {**template, "backend": {"type": "webhook", "url": f"{url}/rollback/{d}"}} for d in deployments
    }
    return "# benchmarks/kafka.py: rollbackd/examples/demo.yaml, deployments replaced\n" + yaml.safe_dump(
        rules, sort_keys=False)


def live_rules(url: str, deployments: list[str], window: float, lateness: float) -> str:
    """demo.yaml's rules on ``window``-second windows, acting at once (group_wait 0)."""
    import yaml

    rules = default_rules()
    (template,) = rules["deployments"].values()
    rules["settings"]["lateness"] = f"{lateness:g}s"
    rules["grouping"]["group_wait"] = "0s"
    rules["deployments"] = {
        d: {**template, "backend": {"type": "webhook", "url": f"{url}/rollback/{d}"},
            "known_good_after": "20s", "cooldown": "0s", "loop_guard": False}
        for d in deployments
    }
    for rule in rules["rules"]:
        rule["window"] = {"size": f"{window:g}s"}
        rule["for"] = "3 windows"  # demo: `for: 2m` (or `3 windows`) on 1-minute windows
        rule["keep_firing_for"] = f"{2 * window:g}s"
    return "# benchmarks/kafka.py: demo.yaml's rules on short windows\n" + yaml.safe_dump(rules, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# The daemon as a subprocess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rollbackd_exe() -> list[str]:
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-c", "from rollbackd.cli import main; main()"]


_METRIC = re.compile(r"^(rollbackd_[a-z_]+)(\{[^}]*\})? ([-+0-9.eE]+|NaN)$", re.M)


def parse_metrics(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    out: dict[str, float] = {}
    for name, _labels, value in _METRIC.findall(text):
        if value != "NaN":
            out[name] = out.get(name, 0.0) + float(value)
    return out


class DaemonProcess:
    """``rollbackd run`` in a work folder, with its ops endpoint on a free loopback port."""

    extra: list[str] = []  # --daemon-arg

    def __init__(self, workdir: Path, rules: Path, bootstrap: str, topic: str, group: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.cmd = [*rollbackd_exe(), "run", "--config", str(rules), "--bootstrap-servers", bootstrap,
                    "--group-id", group, "--topic", topic, "--http", f"127.0.0.1:{self.port}", *self.extra]
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = open(workdir / "daemon.out", "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=workdir, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.started = CLK()
        self.scrape_s: list[float] = []  # wall seconds of each /metrics scrape that answered
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics_text(self, timeout: float = 2.0) -> str | None:
        t0 = CLK()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as r:
                text = r.read().decode()
        except OSError:
            return None
        if self.ready:  # after the first answer: start-up (imports, the port opening) is not a scrape's cost
            self.scrape_s.append(CLK() - t0)
        self.ready = True
        return text

    def metrics(self, timeout: float = 2.0) -> dict[str, float] | None:
        """Unlabelled samples, and labelled ones summed per name; None while not serving."""
        return parse_metrics(self.metrics_text(timeout))

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds by thread name (the main thread runs the pipeline; ``rdk:*`` are librdkafka's)."""
        out: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                comm = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            name = "main" if task.name == str(self.proc.pid) else (
                "librdkafka" if comm.startswith("rdk:") else "other")
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM (finish the batch, checkpoint, commit, close); seconds until it exited."""
        t0 = CLK()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()
        return CLK() - t0

    def tail(self, n: int = 3000) -> str:
        try:
            return (self.workdir / "daemon.out").read_text("utf-8", "replace")[-n:]
        except OSError:
            return ""


def batch_times(text: str | None) -> dict[str, Any]:
    """The daemon's ``rollbackd_batch_processing_seconds`` histogram (``step``: ingest, advance,
    actions, and the checkpoint when one is due): count, mean, and batches slower than each bound."""
    if not text:
        return {}
    name = "rollbackd_batch_processing_seconds"
    buckets = {float(le): float(v) for le, v in re.findall(
        rf'^{name}_bucket{{le="([0-9.e+]+)"}} ([0-9.e+]+)$', text, re.M)}
    count = re.search(rf"^{name}_count ([0-9.e+]+)$", text, re.M)
    total = re.search(rf"^{name}_sum ([0-9.e+]+)$", text, re.M)
    if not count or not total or not float(count.group(1)):
        return {}
    n = float(count.group(1))
    return {"count": int(n), "mean_s": float(total.group(1)) / n,
            "slower_than_s": {f"{le:g}": int(n - c) for le, c in sorted(buckets.items()) if le >= 0.1 and n - c}}


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in got)
    finally:
        c.close()


def topic_end(bootstrap: str, topic: str, partitions: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}"})
    try:
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions))
    finally:
        c.close()


def create_topic(bootstrap: str, partitions: int, prefix: str) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)
    deadline = CLK() + 30
    while CLK() < deadline:  # metadata of every partition has a leader
        md = admin.list_topics(topic, timeout=5).topics.get(topic)
        if md is not None and md.error is None and len(md.partitions) == partitions and all(
                p.leader >= 0 for p in md.partitions.values()):
            break
        time.sleep(0.1)
    return topic


def delete_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the result is in
    try:
        admin.delete_topics([topic])[topic].result(30)
    except Exception as exc:  # cleanup only
        print(f"  (could not delete topic {topic}: {exc})")


def wait_group_stable(bootstrap: str, group: str, daemon: DaemonProcess, timeout: float = 60.0) -> float:
    """Until the daemon is a member of ``group`` with partitions assigned; seconds waited."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    t0 = CLK()
    while CLK() - t0 < timeout:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.tail()}")
        try:
            desc = admin.describe_consumer_groups([group])[group].result(5)
            if desc.state == ConsumerGroupState.STABLE and any(
                    m.assignment.topic_partitions for m in desc.members):
                return CLK() - t0
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"group {group} did not become stable in {timeout}s:\n{daemon.tail()}")


# ---------------------------------------------------------------------------------------------
# 1. Throughput


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def throughput_run(bootstrap: str, topic: str, partitions: int, rules: Path, workdir: Path, total: int,
                   scrape_every: float, timeout: float) -> dict[str, Any]:
    group = f"bench-{uuid.uuid4().hex[:8]}"
    d = DaemonProcess(workdir, rules, bootstrap, topic, group)
    # (wall, events, daemon CPU s by thread, machine (busy, total) CPU s)
    samples: list[tuple[float, float, dict[str, float], tuple[float, float]]] = []
    last: dict[str, float] = {}
    last_text: str | None = None
    try:
        while True:
            if not d.alive():
                raise RuntimeError(f"daemon exited with {d.proc.returncode}:\n{d.tail()}")
            if CLK() - d.started > timeout:
                raise RuntimeError(f"{total:,} events not processed within {timeout}s:\n{d.tail()}")
            text = d.metrics_text()
            m = parse_metrics(text)
            now, threads, machine = CLK(), d.thread_cpu(), machine_cpu()
            if m is not None and "rollbackd_daemon_events_total" in m:
                n = m["rollbackd_daemon_events_total"]
                last, last_text = m, text
                if n > 0:
                    samples.append((now, n, threads, machine))
                if n >= total:
                    break
            time.sleep(scrape_every)
    finally:
        stop_s = d.stop()
    first, done = samples[0], samples[-1]
    inside = [s for s in samples if s[1] < total]
    # Two exact counts inside the run; the whole run if they cover too little of it.
    end = inside[-1] if len(inside) >= 2 and inside[-1][1] - first[1] >= total / 2 else done
    events, seconds = end[1] - first[1], end[0] - first[0]
    cpu = {k: end[2].get(k, 0.0) - first[2].get(k, 0.0) for k in end[2]}
    busy, all_ = end[3][0] - first[3][0], end[3][1] - first[3][1]
    committed = committed_total(bootstrap, group, topic, partitions)
    return {
        "events": int(done[1]),
        "events_per_s": events / seconds,
        "measured_events": int(events),
        "measured_s": seconds,
        "to_end_s": done[0] - first[0],
        "first_events_after_s": first[0] - d.started,
        "daemon_cpu_s_per_million_events": {k: v / events * 1e6 for k, v in sorted(cpu.items())},
        "events_per_main_thread_cpu_s": events / cpu["main"] if cpu.get("main") else None,
        "daemon_cpu_share": sum(cpu.values()) / seconds,
        "main_thread_cpu_share": cpu.get("main", 0.0) / seconds,
        "machine_busy_share": busy / all_ if all_ else None,  # of all CPUs, everything running
        "stop_s": stop_s,
        "exit_code": d.proc.returncode,
        "committed": committed,
        "batch_processing": batch_times(last_text),
        "scrape_s": quantiles(d.scrape_s),
        "counters": {k.removeprefix("rollbackd_"): v for k, v in last.items()
                     if k in ("rollbackd_events_late_total", "rollbackd_incidents_opened_total",
                              "rollbackd_labels_pending", "rollbackd_events_rejected_total")},
    }


_REPLAY_CHILD = """
import json, sys, time
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.rules.loader import load_config
config = load_config(sys.argv[2])
pipeline = build_pipeline(config)
t0, c0 = time.perf_counter(), time.thread_time()
result = replay(open_recording(sys.argv[1], config), pipeline, batch_size=5000)
print(json.dumps({"events": result.events, "seconds": time.perf_counter() - t0, "cpu": time.thread_time() - c0}))
"""


def replay_reference(recording: Path, rules: Path, cwd: Path) -> dict[str, Any]:
    """The same events and rules through the replay core from a file, in a child process, timed
    as ``benchmarks/replay.py`` times it (the loop only): the control for the machine's load."""
    run = subprocess.run([sys.executable, "-c", _REPLAY_CHILD, str(recording), str(rules)], cwd=cwd,
                         check=True, capture_output=True, text=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return {"events": out["events"], "seconds": out["seconds"], "events_per_s": out["events"] / out["seconds"],
            "events_per_cpu_s": out["events"] / out["cpu"], "recording": recording.name}


def throughput(bootstrap: str, args: argparse.Namespace, url: str, work: Path) -> dict[str, Any]:
    from rollbackd.daemon.kafka import publish

    from replay import cached_recording  # benchmarks/replay.py, beside this script

    cache = Path(args.cache)
    recording = cached_recording(cache, args.events, ".jsonl.gz")
    plain = cache / f"bench-{args.events}.jsonl"  # benchmarks/replay.py's copy, if there
    rules = work / "throughput-rules.yaml"
    rules.write_text(throughput_rules(url, ["bench-a", "bench-b"]))
    topic = create_topic(bootstrap, args.partitions, "bench-e2e")
    try:
        t0 = time.perf_counter()
        produced = publish(bootstrap, topic, str(recording))
        produce_s = time.perf_counter() - t0
        end = topic_end(bootstrap, topic, args.partitions)
        assert end == produced, (end, produced)
        print(f"published {produced:,} events to {topic} ({args.partitions} partition(s)) in {produce_s:.1f}s")
        runs = []
        for i in range(args.repeat):
            load = os.getloadavg()[0]
            run = throughput_run(bootstrap, topic, args.partitions, rules, work / f"throughput-{i + 1}",
                                 produced, args.scrape_every, args.timeout)
            run["loadavg_1m_before"] = load
            if run["committed"] != produced or run["exit_code"] != 0:
                raise RuntimeError(f"run {i + 1}: committed {run['committed']} of {produced}, exit {run['exit_code']}")
            if args.replay_reference:
                run["replay_reference"] = replay_reference(plain if plain.exists() else recording, rules, work)
                run["daemon_over_replay"] = run["events_per_s"] / run["replay_reference"]["events_per_s"]
            runs.append(run)
            ref = (f", replay of the same {run['replay_reference']['events_per_s']:,.0f} events/s "
                   f"({run['replay_reference']['events_per_cpu_s']:,.0f} per CPU-s)"
                   if args.replay_reference else "")
            print(f"  run {i + 1}: {run['events_per_s']:,.0f} events/s ({run['measured_events']:,} events in "
                  f"{run['measured_s']:.2f}s; all {produced:,} within {run['to_end_s']:.1f}s), "
                  f"main thread {run['main_thread_cpu_share']:.0%} of a core = "
                  f"{run['events_per_main_thread_cpu_s'] or 0:,.0f} events per CPU-s, "
                  f"machine busy {run['machine_busy_share']:.0%}, "
                  f"first events {run['first_events_after_s']:.1f}s after start, stop {run['stop_s']:.1f}s, "
                  f"load {load:.1f}{ref}")
    finally:
        delete_topic(bootstrap, topic)
    rates = [r["events_per_s"] for r in runs]
    return {
        "events": produced,
        "partitions": args.partitions,
        "publish_events_per_s": produced / produce_s,
        "events_per_s": {"median": statistics.median(rates), "best": max(rates), "all": rates},
        "events_per_main_thread_cpu_s": {
            "median": statistics.median(r["events_per_main_thread_cpu_s"] or 0 for r in runs)},
        "replay_reference_events_per_s": (
            {"median": statistics.median(r["replay_reference"]["events_per_s"] for r in runs),
             "per_cpu_s_median": statistics.median(r["replay_reference"]["events_per_cpu_s"] for r in runs),
             "daemon_over_replay_median": statistics.median(r["daemon_over_replay"] for r in runs)}
            if args.replay_reference else None),
        "target_events_per_s": THROUGHPUT_TARGET,
        "meets_target": {"median": statistics.median(rates) >= THROUGHPUT_TARGET, "best": max(rates) >= THROUGHPUT_TARGET},
        "runs": runs,
        "rules": "rollbackd/examples/demo.yaml, deployments bench-a and bench-b with a webhook backend",
        "scenario": "benchmark_scenario: 2 deployments, 8 numeric + 2 categorical features, 60 % labelled, "
                    "1 h, no faults",
    }


# ---------------------------------------------------------------------------------------------
# 2. Action delay


class Hook:
    """The webhook server: answers 200 and notes when each request arrived."""

    def __init__(self) -> None:
        from loopback import LoopbackServer, Reply

        self.calls: list[tuple[float, Any]] = []
        self._lock = threading.Lock()

        def responder(request: Any) -> Any:
            with self._lock:
                self.calls.append((CLK(), request))
            return Reply(200, body={"ok": True})

        self.server = LoopbackServer(responder)
        self.url = self.server.url

    def take(self) -> list[tuple[float, Any]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls

    def close(self) -> None:
        self.server.close()


def live_plan(args: argparse.Namespace, run: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """One Scenario per deployment, and the bad versions each will deploy."""
    from rollbackd.scenarios import Fault, Scenario

    n, rounds = args.deployments, args.rounds
    period = BAD_FOR + GOOD_FOR
    duration = WARMUP + period + rounds * period + args.lateness + 3 * args.window
    scenarios, bad = [], []
    for i in range(n):
        name = f"live-{i:02d}"
        versions: list[tuple[float, str]] = [(0.0, "1")]
        faults = []
        for k in range(rounds):
            at = round(WARMUP + i * period / n + k * period, 3)
            version = str(k + 2)
            versions += [(at, version), (at + BAD_FOR, "1")]
            faults.append(Fault("error_rate", start=at, magnitude=ERROR_RATE, version=version))
            bad.append({"deployment": name, "version": version, "deployed": START + at})
        scenarios.append(Scenario(
            name=name, start=START, duration=duration, rate=args.rate, deployments=(name,),
            versions=tuple(versions), faults=tuple(faults), label_delay=(2.5, 25.0),
            seed=1000 * run + i,
        ))
    return scenarios, bad


def live_events(scenarios: list[Any]) -> tuple[list[bytes], list[float], list[bytes]]:
    """The scenarios' lines merged in event-time order, with each line's ts and key."""
    import msgspec

    from rollbackd.scenarios import generate

    class TS(msgspec.Struct):
        ts: float
        deployment: str

    dec = msgspec.json.Decoder(TS).decode
    streams = []
    for s in scenarios:
        lines = list(generate(s))
        streams.append([(dec(line).ts, j, line) for j, line in enumerate(lines)])
    lines, ts, keys = [], [], []
    key = {s.deployments[0]: s.deployments[0].encode() for s in scenarios}
    for t, _, line in heapq.merge(*streams):
        lines.append(line)
        ts.append(t)
        keys.append(key[dec(line).deployment])
    return lines, ts, keys


def produce_paced(bootstrap: str, topic: str, lines: list[bytes], ts: list[float], keys: list[bytes],
                  speed: float) -> tuple[list[float], dict[bytes, int], dict[str, float]]:
    """Produces in event-time order, event time ``speed`` times faster than wall time; returns the
    wall time each line was handed to the client (read before the produce call) and each key's
    partition."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                  "linger.ms": 5, "partitioner": "murmur2_random"})
    failures: list[Any] = []
    partition_of: dict[bytes, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(err)
        else:
            partition_of[msg.key()] = msg.partition()

    n = len(lines)
    stamps = [0.0] * n
    ts0 = ts[0]
    t0 = CLK() + 0.2
    behind = 0.0
    i = 0
    produce, poll = p.produce, p.poll
    while i < n:
        due = t0 + (ts[i] - ts0) / speed
        now = CLK()
        if due > now:
            poll(0)
            time.sleep(due - now)
            now = CLK()
        behind = max(behind, now - due)
        upto = ts0 + (now - t0) * speed
        j = bisect.bisect_right(ts, upto, i)
        for k in range(i, max(j, i + 1)):
            while True:
                try:
                    produce(topic, lines[k], keys[k], on_delivery=delivered)
                    break
                except BufferError:
                    poll(0.01)
            stamps[k] = now
        poll(0)
        i = max(j, i + 1)
        if failures:
            raise RuntimeError(f"produce failed: {failures[0]}")
    left = p.flush(30)
    if left or failures:
        raise RuntimeError(f"produce: {left} unacknowledged, failures {failures[:1]}")
    return stamps, partition_of, {"seconds": stamps[-1] - stamps[0], "max_behind_s": behind,
                    "events_per_s": n / max(stamps[-1] - stamps[0], 1e-9)}


def quantiles(xs: list[float]) -> dict[str, float]:
    import numpy as np

    if not xs:
        return {}
    a = np.asarray(xs)
    return {"n": len(xs), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "min": float(a.min()),
            "mean": float(a.mean())}


def live_run(bootstrap: str, args: argparse.Namespace, hook: Hook, work: Path, run: int,
             rules_text: Any = live_rules) -> dict[str, Any]:
    """One live run; ``rules_text(url, deployments, window, lateness)`` writes its rules
    (``benchmarks/effects.py`` adds a Slack notifier and slow edges)."""
    workdir = work / f"live-{run}"
    workdir.mkdir(parents=True, exist_ok=True)
    scenarios, bad = live_plan(args, run)
    deployments = [s.deployments[0] for s in scenarios]
    rules = workdir / "rules.yaml"
    rules.write_text(rules_text(hook.url, deployments, args.window, args.lateness))
    t0 = time.perf_counter()
    lines, ts, keys = live_events(scenarios)
    print(f"  live run {run}: {len(lines):,} events of {len(deployments)} deployments over "
          f"{ts[-1] - ts[0]:.0f} event-seconds (generated in {time.perf_counter() - t0:.1f}s), "
          f"{len(bad)} bad versions, speed {args.speed:g}x")
    topic = create_topic(bootstrap, args.partitions, "bench-live")
    group = f"live-{uuid.uuid4().hex[:8]}"
    hook.take()
    d = DaemonProcess(workdir, rules, bootstrap, topic, group)
    try:
        joined = wait_group_stable(bootstrap, group, d)
        cpu0 = d.cpu_seconds()
        load = os.getloadavg()[0]
        stamps, partition_of, producer = produce_paced(bootstrap, topic, lines, ts, keys, args.speed)
        # Every event read, and the webhook calls that follow from them.
        deadline = CLK() + 60
        while CLK() < deadline:
            m = d.metrics() or {}
            if m.get("rollbackd_daemon_events_total", 0) >= len(lines):
                break
            if not d.alive():
                raise RuntimeError(f"daemon exited with {d.proc.returncode}:\n{d.tail()}")
            time.sleep(0.2)
        time.sleep(1.0)
        cpu = d.cpu_seconds() - cpu0
        text = d.metrics_text()
        metrics = parse_metrics(text) or {}
    finally:
        d.stop()
        delete_topic(bootstrap, topic)
    calls = hook.take()
    decisions = [json.loads(x) for x in (workdir / "rollbackd.decisions.jsonl").read_text().splitlines()]
    rollbacks = [r for r in decisions if r["kind"] == "action" and r["action"] == "rollback"]
    opened = [r for r in decisions if r["kind"] == "incident" and r["state"] == "opened"]
    by_key: dict[str, list[float]] = {}
    for wall, req in calls:
        by_key.setdefault(req.header("Idempotency-Key") or "", []).append(wall)
    per_dep: dict[str, list[int]] = {}
    per_part: dict[int, list[int]] = {}
    for idx, k in enumerate(keys):
        per_dep.setdefault(k.decode(), []).append(idx)
        per_part.setdefault(partition_of[k], []).append(idx)
    part_ts = {p: [ts[j] for j in idx] for p, idx in per_part.items()}
    lateness = args.lateness
    expected = {(b["deployment"], b["version"]) for b in bad}
    incidents = []
    for r in rollbacks:
        walls = by_key.get(r.get("idempotency_key") or "", [])
        item = {"deployment": r["deployment"], "from_version": r.get("from_version"),
                "to_version": r.get("to_version"), "status": r["status"], "ts": r["ts"],
                "calls": len(walls), "expected": (r["deployment"], r.get("from_version")) in expected}
        if r["status"] == "succeeded" and walls:
            due = r["ts"]
            # The event that moved the watermark of the deployment's partition to `due`.
            part = partition_of[r["deployment"].encode()]
            w = bisect.bisect_left(part_ts[part], due + lateness)
            dep_idx = per_dep[r["deployment"]]
            pos = bisect.bisect_left([ts[j] for j in dep_idx], due) - 1  # its window's last event
            if w < len(part_ts[part]):
                w = per_part[part][w]
                item["delay_s"] = walls[0] - stamps[w]
                item["watermark_event_ts"] = ts[w]
                item["at_s"] = stamps[w] - stamps[0]  # wall seconds into the run
            if pos >= 0:
                item["from_window_last_event_s"] = walls[0] - stamps[dep_idx[pos]]
        incidents.append(item)
    measured = [x for x in incidents if "delay_s" in x and x["expected"]]
    delays = [x["delay_s"] for x in measured]
    found = {(x["deployment"], x["from_version"]) for x in incidents if x["status"] == "succeeded"}
    result = {
        "events": len(lines),
        "event_seconds": ts[-1] - ts[0],
        "deployments": len(deployments),
        "bad_versions": len(bad),
        "incidents_opened": len(opened),
        "rollbacks": {s: sum(1 for x in incidents if x["status"] == s) for s in sorted({x["status"] for x in incidents})},
        "webhook_calls": len(calls),
        "duplicate_calls": sum(max(0, len(v) - 1) for v in by_key.values()),
        "missed_bad_versions": sorted(f"{d}@{v}" for d, v in expected - found),
        "unexpected_rollbacks": sum(1 for x in incidents if not x["expected"]),
        "group_join_s": joined,
        "loadavg_1m_before": load,
        "producer": producer,
        "daemon_cpu_share": cpu / max(producer["seconds"], 1e-9),
        "late_events": metrics.get("rollbackd_events_late_total"),
        "batch_processing": batch_times(text),
        "slowest": [{k: x[k] for k in ("deployment", "ts", "at_s", "delay_s")}
                    for x in sorted(measured, key=lambda x: -x["delay_s"])[:5]],
        "delay_s": quantiles(delays),
        "from_window_last_event_s": quantiles([x["from_window_last_event_s"] for x in measured
                                               if "from_window_last_event_s" in x]),
        "incidents": incidents,
    }
    q = result["delay_s"]
    if q:
        print(f"  live run {run}: {len(delays)} rollbacks measured, delay p50 {q['p50']:.3f}s p90 {q['p90']:.3f}s "
              f"p99 {q['p99']:.3f}s max {q['max']:.3f}s; producer {producer['events_per_s']:,.0f} events/s "
              f"(at most {producer['max_behind_s'] * 1000:.0f} ms behind), daemon CPU {result['daemon_cpu_share']:.0%}, "
              f"incidents {len(opened)}, missed {len(result['missed_bad_versions'])}, "
              f"duplicate calls {result['duplicate_calls']}, load {load:.1f}")
    else:
        print(f"  live run {run}: no rollback measured; see {workdir}")
    return result


def live(bootstrap: str, args: argparse.Namespace, hook: Hook, work: Path) -> dict[str, Any]:
    runs = [live_run(bootstrap, args, hook, work, r + 1) for r in range(args.live_runs)]
    pooled = [x["delay_s"] for r in runs for x in r["incidents"] if "delay_s" in x and x["expected"]]
    window_pooled = [x["from_window_last_event_s"] for r in runs for x in r["incidents"]
                     if "from_window_last_event_s" in x and x["expected"]]
    q = quantiles(pooled)
    return {
        "delay_s": q,
        "from_window_last_event_s": quantiles(window_pooled),
        "per_run_p99_s": [r["delay_s"].get("p99") for r in runs],
        "per_run_p50_s": [r["delay_s"].get("p50") for r in runs],
        "target_p99_s": DELAY_TARGET,
        "meets_target": bool(q) and q["p99"] < DELAY_TARGET,
        "settings": {
            "deployments": args.deployments, "rounds": args.rounds, "rate_per_deployment": args.rate,
            "speed": args.speed, "window_s": args.window, "lateness_s": args.lateness,
            "partitions": args.partitions, "bad_for_s": BAD_FOR, "good_for_s": GOOD_FOR,
            "error_rate_of_bad_versions": ERROR_RATE,
            "rules": "demo.yaml's four rules on --window windows, for 3 windows, keep_firing_for 2 windows, "
                     "group_wait 0s, known_good_after 20s, cooldown 0s, loop_guard false, webhook backend",
        },
        "runs": [{k: v for k, v in r.items() if k != "incidents"} | {"delays_s": sorted(
            round(x["delay_s"], 4) for x in r["incidents"] if "delay_s" in x and x["expected"])} for r in runs],
    }


# ---------------------------------------------------------------------------------------------


def code_measured(snapshot: str | None) -> dict[str, Any]:
    """Where the rollbackd the daemon runs comes from, and its commit when that is a git checkout."""
    import rollbackd

    src = Path(rollbackd.__file__).resolve().parent.parent
    out: dict[str, Any] = {"rollbackd": str(src), "version": rollbackd.__version__}

    def git(*a: str) -> str | None:
        try:
            run = subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True, timeout=10)
        except OSError:
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    if snapshot:
        sha = os.environ.get("ROLLBACKD_BENCH_COMMIT", "unknown")
        out.update(rollbackd=f"git archive {sha} (--at)", git_head=sha, uncommitted_changes=[])
        return out
    head = git("rev-parse", "HEAD")
    out["git_head"] = head or "unknown (not a git checkout)"
    out["uncommitted_changes"] = sorted(
        line.split(None, 1)[1] for line in (git("status", "--porcelain", "--", "rollbackd") or "").splitlines()
    ) if head else None
    return out


def reexec_at(rev: str) -> None:
    """Runs this benchmark again with the ``rollbackd`` package of commit ``rev`` first on the
    path (``git archive``; the repository and the working tree are not touched)."""
    import io
    import tarfile

    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix=f"rollbackd-{sha[:10]}-"))
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "rollbackd"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--at" or a.startswith("--at="):
            skip = a == "--at"
            continue
        argv.append(a)
    path = os.pathsep.join(p for p in (str(dest), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "ROLLBACKD_BENCH_COMMIT": sha, "ROLLBACKD_BENCH_SNAPSHOT": str(dest)}
    print(f"measuring rollbackd at {sha[:10]} ({rev}) from {dest}", flush=True)
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--at", metavar="REV", help="measure the rollbackd of this commit (e.g. HEAD), not the working tree")
    ap.add_argument("--events", type=int, default=1_000_000, help="throughput: events in the pre-filled topic")
    ap.add_argument("--repeat", type=int, default=3, help="throughput: daemon runs over the topic")
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--scrape-every", type=float, default=0.25, help="seconds between /metrics scrapes")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds a throughput run may take")
    ap.add_argument("--no-replay-reference", dest="replay_reference", action="store_false",
                    help="throughput: skip the file replay of the same events after each daemon run")
    ap.add_argument("--live-runs", type=int, default=2, help="action delay: runs (each a fresh topic and daemon)")
    ap.add_argument("--deployments", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4, help="bad versions per deployment and live run")
    ap.add_argument("--rate", type=float, default=50.0, help="predictions per event-second per deployment")
    ap.add_argument("--speed", type=float, default=4.0, help="event seconds per wall second")
    ap.add_argument("--window", type=float, default=5.0, help="window size of the live rules, seconds")
    ap.add_argument("--lateness", type=float, default=30.0, help="settings.lateness of the live rules, seconds")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `rollbackd run` (repeatable), e.g. --daemon-arg=--checkpoint-every=60")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (daemon output, ledgers)")
    ap.add_argument("--out", default=str(HERE / "results" / "kafka.json"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench"))
    args = ap.parse_args()
    if args.at:
        reexec_at(args.at)
    snapshot = os.environ.get("ROLLBACKD_BENCH_SNAPSHOT")
    DaemonProcess.extra = list(args.daemon_arg)

    import confluent_kafka

    from kafka_broker import KAFKA_VERSION, resolve_cluster

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="rollbackd-bench-kafka-"))
    cluster = resolve_cluster()
    t0 = time.perf_counter()
    cluster.start()
    broker_start = time.perf_counter() - t0
    print(f"broker at {cluster.bootstrap} (ready in {broker_start:.1f}s); work folder {work}")
    hook = Hook()
    result: dict[str, Any] = {"benchmark": "kafka"}
    try:
        if not args.skip_throughput:
            print(f"throughput: one `rollbackd run` over a pre-filled topic, {args.repeat} run(s)")
            result["throughput"] = throughput(cluster.bootstrap, args, hook.url, work)
        if not args.skip_live:
            print(f"action delay: {args.live_runs} live run(s)")
            result["action_delay"] = live(cluster.bootstrap, args, hook, work)
    finally:
        hook.close()
        getattr(cluster, "close", cluster.stop)()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if snapshot:
                shutil.rmtree(snapshot, ignore_errors=True)

    result["code"] = code_measured(snapshot)
    result["versions"] = {
        "kafka_broker": KAFKA_VERSION if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else "external",
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
    }
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                         "note": "broker, producer and daemon on the same machine, shared with other jobs",
                         "loadavg_1m_end": os.getloadavg()[0]}
    result["broker_start_s"] = broker_start
    result["daemon_args"] = args.daemon_arg
    result["total_s"] = time.perf_counter() - started
    out = Path(args.out)
    if out.exists():  # a partial run keeps the other part's last result
        try:
            old = json.loads(out.read_text())
            for part in ("throughput", "action_delay"):
                if part not in result and part in old:
                    result[part] = old[part]
        except ValueError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    print(f"\n=== summary ({result['total_s']:.0f}s) -> {out}")
    if "throughput" in result:
        t = result["throughput"]
        print(f"throughput: median {t['events_per_s']['median']:,.0f} events/s, best {t['events_per_s']['best']:,.0f} "
              f"(target >= {THROUGHPUT_TARGET:,}: median {'meets' if t['meets_target']['median'] else 'misses'} it, "
              f"best {'meets' if t['meets_target']['best'] else 'misses'} it), "
              f"{t['events_per_main_thread_cpu_s']['median']:,.0f} events per CPU-second of the daemon's main thread")
    if "action_delay" in result and result["action_delay"]["delay_s"]:
        a = result["action_delay"]
        q = a["delay_s"]
        print(f"action delay over {q['n']} rollbacks: p50 {q['p50']:.3f}s, p99 {q['p99']:.3f}s, max {q['max']:.3f}s "
              f"(target p99 < {DELAY_TARGET:g}s: {'met' if a['meets_target'] else 'NOT met'}); "
              f"from the breaching window's last event (lateness {args.lateness:g} event-s at {args.speed:g}x): "
              f"p50 {a['from_window_last_event_s']['p50']:.2f}s")


if __name__ == "__main__":
    main()
