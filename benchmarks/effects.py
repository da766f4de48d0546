"""Slow edges on Kafka: throughput and action delay of ``rollbackd run`` with fast, slow and
black-holed effects, in one run.

    .venv/bin/python benchmarks/effects.py [--quick] [--modes fast,slow,blackhole] [--repeat 1]
                                           [--deployments 10] [--rounds 3] [--speed 4] ...

Why: the live daemon runs rollbacks and notices off its processing thread, one lane per
deployment (``rollbackd/daemon/executor.py``). This measures that a slow or dead edge costs the
daemon neither throughput nor the rollback delay of the deployments whose own edges are fast.

Everything is ``benchmarks/kafka.py``'s machinery, imported: the real broker
(``tests/kafka_broker.py``), the daemon as the real console script with ``--http``, its scrapes,
per-thread CPU from ``/proc``, the live workload (``live_plan``: each deployment runs healthy
traffic and, ``--rounds`` times, a bad version failing 25 % of requests for 25 event-seconds),
the paced producer and the delay analysis (``live_run``). What this file adds is the edges and
the modes. Every deployment has its own webhook path and its own Slack channel
(``slack_channel``), answered by two HTTP servers on loopback in this process (the webhook
receiver, and a Slack Web API stand-in, ``tests/loopback.py`` ``SlackAPI``, reached through
``settings.notifier: {type: slack, base_url: ...}``). The rules are ``kafka.live_rules`` (the
demo rules on 5-second windows, ``group_wait`` 0) plus that notifier; each webhook has a 15 s
client timeout and the default retry policy (4 attempts with backoff).

Modes (``--modes``), each a throughput run and a live run on the same workloads:

- ``fast``: every webhook and Slack channel answers at once;
- ``slow``: for half of the deployments (the "slow" ones: ``live-01``, ``live-03``, ...) the
  webhook and the Slack channel answer each call after ``--slow`` seconds (10);
- ``blackhole``: the slow half's webhook accepts the connection, reads the request and never
  answers (its client times out and retries); Slack answers at once;
- ``slack-all``: every Slack channel answers after ``--slow`` seconds, webhooks at once. Every
  deployment's rollback edge is fast and its notices are slow (the two halves are alike here):
  a rollback must not wait for the notices of its deployment's earlier incidents.

Measured, per mode:

1. Throughput: the live workload of every deployment at ``--throughput-rate`` predictions per
   event-second is published once to a topic (no pacing); each run is a new consumer group that
   reads all of it (``kafka.throughput_run``: the rate between two exact ``/metrics`` counts,
   CPU-seconds of the daemon's threads over the same span: events per CPU-second of the main
   thread, which runs the pipeline, and of the whole daemon). Every incident in it acts, so the
   effects run (and, in the slow modes, queue) while events are read. ``/metrics`` is scraped
   every ``--scrape-every`` seconds (0.1) and each scrape timed: p50/p99 of scrape latency.
2. Action delay (``kafka.live_run``): the live workload paced at ``--speed``x; the delay runs
   from the wall time the producer handed over the event that moved the watermark past the
   breaching window to the time the webhook server received the rollback request. Reported
   separately for the deployments whose own edges are fast (the target) and the slow ones.

Target (issue 12): in ``slow`` and ``blackhole``, throughput and the fast deployments' delay
within 10 % of the ``fast`` mode. Results: ``benchmarks/results/effects.json`` and ``.md``.
The machine has 2 cores shared with other jobs: ratios of single runs carry that noise (the
``--repeat`` option interleaves the modes and takes medians).

``--quick`` (about 5 minutes): 6 deployments, 2 rounds, 8x, throughput workload at 200
predictions per event-second (~440k events), one repeat.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load_kafka_benchmark() -> Any:
    """``benchmarks/kafka.py`` as a module (not ``import kafka``: a Kafka client package may own
    that name)."""
    spec = importlib.util.spec_from_file_location("bench_kafka", HERE / "kafka.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kafka"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_kafka_benchmark()  # puts the checkout and tests/ on sys.path too

TOKEN = "xoxb-bench-effects"
TARGET_RATIO = 0.9  # within 10 % of the fast mode
MODES = ("fast", "slow", "blackhole", "slack-all")
DEFAULT_MODES = MODES
WEBHOOK_TIMEOUT = 15.0  # client timeout of every webhook: a 10 s answer succeeds


# ---------------------------------------------------------------------------------------------
# The edges


class Edges:
    """The webhook receiver (``/rollback/<deployment>``) and the Slack Web API stand-in, shared
    by every run. ``set_mode`` says how each answers: at once, after ``slow`` seconds, or never
    (the request is held until the server closes). Notes when each request arrived.

    Quacks like ``kafka.Hook`` for ``kafka.live_run`` (``url``, ``take()``: webhook calls)."""

    def __init__(self, slow: float) -> None:
        from loopback import LoopbackServer

        self.slow = slow
        self.webhook_hold: dict[str, float | None] = {}  # deployment -> seconds (None: never)
        self.slack_hold: dict[str, float | None] = {}  # channel -> seconds
        self.calls: list[tuple[float, Any]] = []
        self.taken: list[tuple[float, Any]] = []  # the last take()'s
        self.slack_calls: list[tuple[float, Any]] = []
        self._lock = threading.Lock()
        from loopback import SlackAPI

        self._slack_api = SlackAPI(TOKEN)
        self.webhook = LoopbackServer(self._hook)
        self.slack = LoopbackServer(self._slack)
        self.url = self.webhook.url

    def set_mode(self, mode: str, deployments: list[str], slow: set[str]) -> None:
        hold = {"fast": (0.0, 0.0), "slow": (self.slow, self.slow), "blackhole": (None, 0.0),
                "slack-all": (0.0, self.slow)}
        webhook, slack = hold[mode]
        slowed = set(deployments) if mode == "slack-all" else slow
        self.webhook_hold = {d: webhook if d in slow else 0.0 for d in deployments}
        self.slack_hold = {f"#{d}": slack if d in slowed else 0.0 for d in deployments}

    @staticmethod
    def _held(reply: Any, hold: float | None) -> Any:
        return dataclasses.replace(reply, delay=3600.0 if hold is None else hold)

    def _hook(self, request: Any) -> Any:
        from loopback import Reply

        with self._lock:
            self.calls.append((bench.CLK(), request))
        deployment = request.path.rsplit("/", 1)[-1]
        return self._held(Reply(200, body={"ok": True}), self.webhook_hold.get(deployment, 0.0))

    def _slack(self, request: Any) -> Any:
        with self._lock:
            self.slack_calls.append((bench.CLK(), request))
        return self._held(self._slack_api(request), self.slack_hold.get(_field(request, "channel"), 0.0))

    def take(self) -> list[tuple[float, Any]]:
        with self._lock:
            calls, self.calls = self.calls, []
        self.taken = calls
        return calls

    def take_slack(self) -> list[tuple[float, Any]]:
        with self._lock:
            calls, self.slack_calls = self.slack_calls, []
        return calls

    def close(self) -> None:
        self.webhook.close()
        self.slack.close()


def _field(request: Any, name: str) -> str | None:
    try:
        return request.json().get(name)
    except ValueError:
        return request.form().get(name)


def rules_with_edges(edges: Edges) -> Callable[[str, list[str], float, float], str]:
    """``kafka.live_rules`` plus the Slack notifier, a channel per deployment and the webhook
    timeout."""

    def text(url: str, deployments: list[str], window: float, lateness: float) -> str:
        import yaml

        rules = yaml.safe_load(bench.live_rules(url, deployments, window, lateness))
        rules["settings"]["notifier"] = {"type": "slack", "channel": "#oncall", "timeout": 30,
                                         "base_url": f"{edges.slack.url}/api/"}
        for name, spec in rules["deployments"].items():
            spec["slack_channel"] = f"#{name}"
            spec["backend"]["timeout"] = WEBHOOK_TIMEOUT
        return "# benchmarks/effects.py: kafka.live_rules, a Slack notifier, a channel per deployment\n" + \
            yaml.safe_dump(rules, sort_keys=False)

    return text


# ---------------------------------------------------------------------------------------------
# Runs


def workload(args: argparse.Namespace, rate: float) -> tuple[list[bytes], list[float], list[bytes], list[Any]]:
    """``kafka.live_plan`` at ``rate``: lines, their event times and keys, and the bad versions."""
    plan_args = argparse.Namespace(**{**vars(args), "rate": rate})
    scenarios, bad = bench.live_plan(plan_args, 1)
    lines, ts, keys = bench.live_events(scenarios)
    return lines, ts, keys, bad


def throughput_run(bootstrap: str, args: argparse.Namespace, edges: Edges, topic: str, total: int,
                   deployments: list[str], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    rules = work / "rules.yaml"
    rules.write_text(rules_with_edges(edges)(edges.url, deployments, args.window, args.lateness))
    edges.take(), edges.take_slack()
    load = os.getloadavg()[0]
    run = bench.throughput_run(bootstrap, topic, 1, rules, work, total, args.scrape_every, args.timeout)
    if run["committed"] != total or run["exit_code"] != 0:
        raise RuntimeError(f"committed {run['committed']} of {total}, exit {run['exit_code']}")
    cpu = run["daemon_cpu_s_per_million_events"]
    run["events_per_daemon_cpu_s"] = 1e6 / sum(cpu.values()) if sum(cpu.values()) else None
    run["loadavg_1m_before"] = load
    run["webhook_calls"] = len(edges.take())
    run["slack_calls"] = len(edges.take_slack())
    return run


def live_run(bootstrap: str, args: argparse.Namespace, edges: Edges, slow: set[str], work: Path) -> dict[str, Any]:
    edges.take_slack()
    result = bench.live_run(bootstrap, args, edges, work, 1, rules_text=rules_with_edges(edges))
    result["slack_calls"] = len(edges.take_slack())
    incidents = result.pop("incidents")
    # A call still out when the daemon stopped has no line in the decision log (only finished
    # calls do): count the rollback requests that reached the webhook from the server's side.
    keys = {d: {r.header("Idempotency-Key") for _, r in edges.taken if r.path.endswith(f"/{d}")}
            for d in {x["deployment"] for x in incidents} | {r.path.rsplit("/", 1)[-1] for _, r in edges.taken}}
    for group, members in (("fast", lambda d: d not in slow), ("slow", lambda d: d in slow)):
        mine = [x for x in incidents if members(x["deployment"]) and x["expected"]]
        result[f"{group}_deployments"] = {
            "bad_versions": args.rounds * sum(1 for d in keys if members(d)),
            "rollback_requests_at_webhook": sum(len(k) for d, k in keys.items() if members(d)),
            "rollbacks": len(mine),
            "reached_webhook": sum(1 for x in mine if x["calls"]),
            "delay_s": bench.quantiles([x["delay_s"] for x in mine if "delay_s" in x]),
            "delays_s": sorted(round(x["delay_s"], 4) for x in mine if "delay_s" in x),
        }
    return result


def median_of(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for r in runs:
        for p in path:
            r = r.get(p) if isinstance(r, dict) else None
        if isinstance(r, (int, float)):
            values.append(float(r))
    return statistics.median(values) if values else None


def summarise(modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the medians over repeats, and the ratios to the fast mode."""
    out: dict[str, Any] = {}
    for mode, runs in modes.items():
        tp, live = runs["throughput"], runs["live"]
        out[mode] = {
            "events_per_s": median_of(tp, "events_per_s"),
            "events_per_main_thread_cpu_s": median_of(tp, "events_per_main_thread_cpu_s"),
            "events_per_daemon_cpu_s": median_of(tp, "events_per_daemon_cpu_s"),
            "scrape_p50_s": median_of(tp, "scrape_s", "p50"),
            "scrape_p99_s": median_of(tp, "scrape_s", "p99"),
            "scrapes": sum(r["scrape_s"].get("n", 0) for r in tp),
            "fast_delay_p50_s": median_of(live, "fast_deployments", "delay_s", "p50"),
            "fast_delay_p90_s": median_of(live, "fast_deployments", "delay_s", "p90"),
            "fast_delay_max_s": median_of(live, "fast_deployments", "delay_s", "max"),
            "slow_delay_p50_s": median_of(live, "slow_deployments", "delay_s", "p50"),
            "slow_delay_max_s": median_of(live, "slow_deployments", "delay_s", "max"),
            "fast_requests": sum(r["fast_deployments"]["rollback_requests_at_webhook"] for r in live),
            "fast_bad_versions": sum(r["fast_deployments"]["bad_versions"] for r in live),
            "slow_requests": sum(r["slow_deployments"]["rollback_requests_at_webhook"] for r in live),
            "slow_bad_versions": sum(r["slow_deployments"]["bad_versions"] for r in live),
            "missed_bad_versions": sorted({m for r in live for m in r["missed_bad_versions"]}),
        }
    fast = out.get("fast")
    if fast:
        for mode, s in out.items():
            ratios = {k: (s[k] / fast[k] if s[k] is not None and fast[k] else None)
                      for k in ("events_per_s", "events_per_main_thread_cpu_s", "fast_delay_p50_s",
                                "fast_delay_p90_s")}
            s["vs_fast"] = ratios
            s["within_10_percent"] = {
                "throughput": ratios["events_per_s"] is not None and ratios["events_per_s"] >= TARGET_RATIO,
                "delay_p50": ratios["fast_delay_p50_s"] is not None
                and ratios["fast_delay_p50_s"] <= 1 / TARGET_RATIO,
                "delay_p90": ratios["fast_delay_p90_s"] is not None
                and ratios["fast_delay_p90_s"] <= 1 / TARGET_RATIO,
            }
    return out


# ---------------------------------------------------------------------------------------------
# Report


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Effects off the processing thread: fast, slow and black-holed edges",
        "",
        f"`benchmarks/effects.py{' --quick' if s['quick'] else ''}` at {result['code'].get('git_head', '?')[:10]}"
        f"{' (uncommitted changes)' if result['code'].get('uncommitted_changes') else ''}; "
        f"{result['machine']['cpus']} CPUs shared with other jobs (load {result['machine']['loadavg_1m_start']:.1f} "
        f"at the start, {result['machine']['loadavg_1m_end']:.1f} at the end); broker, producer and daemon on "
        f"the same machine. Total {result['total_s']:.0f} s wall, {result['cpu_s']['this_process']:.0f} CPU-s "
        f"in this process (edges, producer), {result['cpu_s']['children']:.0f} CPU-s in child processes "
        "(the daemons, the broker's JVM is not a child and is not counted).",
        "",
        f"Workloads: {s['deployments']} deployments (slow: {', '.join(s['slow_deployments'])}), {s['rounds']} bad "
        f"versions each; throughput: {result['throughput_events']:,} events published beforehand "
        f"({s['throughput_rate']:g} predictions per event-second per deployment); action delay: "
        f"{s['rate']:g} predictions per event-second at {s['speed']:g}x. Slow edges answer after {s['slow']:g} s; "
        f"webhook client timeout {WEBHOOK_TIMEOUT:g} s, 4 attempts. {s['repeat']} repeat(s), medians.",
        "",
        "| mode | events/s | events per main-thread CPU-s | per daemon CPU-s | /metrics p50 / p99 ms (scrapes) "
        "| fast deployments' delay p50 / p90 / max s (rollbacks at the webhook / bad versions) "
        "| slow deployments' delay p50 / max s (at the webhook / bad versions) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    for mode, m in result["summary"].items():
        lines.append(
            f"| {mode} | {f(m['events_per_s'], ',.0f')} | {f(m['events_per_main_thread_cpu_s'], ',.0f')} "
            f"| {f(m['events_per_daemon_cpu_s'], ',.0f')} "
            f"| {f(m['scrape_p50_s'] and m['scrape_p50_s'] * 1000, '.1f')} / "
            f"{f(m['scrape_p99_s'] and m['scrape_p99_s'] * 1000, '.1f')} ({m['scrapes']}) "
            f"| {f(m['fast_delay_p50_s'], '.3f')} / {f(m['fast_delay_p90_s'], '.3f')} / "
            f"{f(m['fast_delay_max_s'], '.3f')} ({m['fast_requests']}/{m['fast_bad_versions']}) "
            f"| {f(m['slow_delay_p50_s'], '.2f')} / {f(m['slow_delay_max_s'], '.2f')} "
            f"({m['slow_requests']}/{m['slow_bad_versions']}) |")
    lines += ["", "Against the fast mode (target: within 10 %):", ""]
    for mode, m in result["summary"].items():
        if mode == "fast" or "vs_fast" not in m:
            continue
        r, ok = m["vs_fast"], m["within_10_percent"]
        lines.append(
            f"- {mode}: throughput {f(r['events_per_s'], '.2f')}x ({'within' if ok['throughput'] else 'NOT within'}), "
            f"per main-thread CPU-s {f(r['events_per_main_thread_cpu_s'], '.2f')}x; fast deployments' delay "
            f"p50 {f(r['fast_delay_p50_s'], '.2f')}x ({'within' if ok['delay_p50'] else 'NOT within'}), "
            f"p90 {f(r['fast_delay_p90_s'], '.2f')}x ({'within' if ok['delay_p90'] else 'NOT within'})")
    lines += ["", "A delay is measured for a rollback whose outcome is in the decision log; a call still out "
              "when the daemon stopped counts only as a request at the webhook.",
              "", "/metrics latency is of the throughput runs' scrapes after the first. The consumer "
              "lag a scrape shows is the one the processing loop took from librdkafka's statistics: a "
              "scrape makes no broker round trip.",
              "", "See the module docstring of `benchmarks/effects.py` for what each number measures.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 4 minutes: 6 deployments, 2 rounds, 8x")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the modes, interleaved; medians")
    ap.add_argument("--deployments", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="bad versions per deployment")
    ap.add_argument("--rate", type=float, default=50.0, help="live run: predictions per event-second per deployment")
    ap.add_argument("--throughput-rate", type=float, default=250.0,
                    help="throughput run: predictions per event-second per deployment (published beforehand)")
    ap.add_argument("--speed", type=float, default=4.0, help="live run: event seconds per wall second")
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--lateness", type=float, default=30.0)
    ap.add_argument("--slow", type=float, default=10.0, help="seconds a slow edge takes to answer")
    ap.add_argument("--scrape-every", type=float, default=0.1, help="seconds between /metrics scrapes")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a throughput run may take")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", default=str(HERE / "results" / "effects.json"))
    args = ap.parse_args()
    if args.quick:
        args.deployments, args.rounds, args.speed, args.throughput_rate = 6, 2, 8.0, 200.0
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    args.partitions = 1
    args.deployments = max(2, args.deployments)
    os.environ["SLACK_BOT_TOKEN"] = TOKEN  # the daemons' notifier reads it

    from kafka_broker import resolve_cluster

    from rollbackd.daemon.kafka import publish

    started, load0 = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="rollbackd-bench-effects-"))
    cluster = resolve_cluster()
    cluster.start()
    print(f"broker at {cluster.bootstrap}; work folder {work}")
    edges = Edges(args.slow)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"throughput": [], "live": []} for m in modes}
    try:
        lines, _ts, _keys, _bad = workload(args, args.throughput_rate)
        deployments = sorted({k.decode() for k in _keys})
        slow = set(deployments[1::2])
        recording = work / "throughput.jsonl"
        recording.write_bytes(b"".join(line + b"\n" for line in lines))
        topic = bench.create_topic(cluster.bootstrap, 1, "bench-effects")
        total = publish(cluster.bootstrap, topic, str(recording))
        print(f"published {total:,} events of {len(deployments)} deployments to {topic}; slow: {sorted(slow)}")
        for r in range(args.repeat):
            for mode in modes:
                edges.set_mode(mode, deployments, slow)
                tp = throughput_run(cluster.bootstrap, args, edges, topic, total, deployments,
                                    work / f"{mode}-{r + 1}" / "throughput")
                print(f"  {mode}: throughput {tp['events_per_s']:,.0f} events/s, "
                      f"{tp['events_per_main_thread_cpu_s'] or 0:,.0f} per main-thread CPU-s, "
                      f"{tp['events_per_daemon_cpu_s'] or 0:,.0f} per daemon CPU-s; /metrics p50 "
                      f"{tp['scrape_s'].get('p50', 0) * 1000:.1f} ms p99 {tp['scrape_s'].get('p99', 0) * 1000:.1f} ms "
                      f"over {tp['scrape_s'].get('n', 0)} scrapes; {tp['webhook_calls']} webhook and "
                      f"{tp['slack_calls']} Slack calls; stop {tp['stop_s']:.1f}s")
                live = live_run(cluster.bootstrap, args, edges, slow, work / f"{mode}-{r + 1}")
                q, qs = live["fast_deployments"]["delay_s"], live["slow_deployments"]["delay_s"]
                print(f"  {mode}: fast deployments' delay p50 {q.get('p50', float('nan')):.3f}s "
                      f"p90 {q.get('p90', float('nan')):.3f}s max {q.get('max', float('nan')):.3f}s "
                      f"({live['fast_deployments']['rollback_requests_at_webhook']}/"
                      f"{live['fast_deployments']['bad_versions']} at the webhook); "
                      f"slow deployments' p50 {qs.get('p50', float('nan')):.2f}s max {qs.get('max', float('nan')):.2f}s "
                      f"({live['slow_deployments']['rollback_requests_at_webhook']}/"
                      f"{live['slow_deployments']['bad_versions']} at the webhook)")
                runs[mode]["throughput"].append(tp)
                runs[mode]["live"].append(live)
        bench.delete_topic(cluster.bootstrap, topic)
    finally:
        edges.close()
        getattr(cluster, "close", cluster.stop)()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = {
        "benchmark": "effects",
        "settings": {"quick": args.quick, "modes": modes, "repeat": args.repeat, "deployments": args.deployments,
                     "slow_deployments": sorted(slow), "rounds": args.rounds, "rate": args.rate,
                     "throughput_rate": args.throughput_rate, "speed": args.speed, "window_s": args.window,
                     "lateness_s": args.lateness, "slow": args.slow, "scrape_every_s": args.scrape_every,
                     "webhook_timeout_s": WEBHOOK_TIMEOUT},
        "throughput_events": total,
        "summary": summarise(runs),
        "runs": runs,
        "code": bench.code_measured(None),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0]},
        "total_s": time.perf_counter() - started,
        "cpu_s": {"this_process": me.ru_utime + me.ru_stime, "children": children.ru_utime + children.ru_stime},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(f"\n=== {result['total_s']:.0f}s -> {out} and {out.with_suffix('.md')}\n")
    print(md)


if __name__ == "__main__":
    main()
