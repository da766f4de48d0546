"""Replay throughput and peak memory on a generated 1-million-event recording.

    python benchmarks/replay.py [--events 1000000] [--repeat 3] [--out benchmarks/results/replay.json]

Two deployments, 10 features (8 numeric, 2 categorical), 60 % of predictions labelled, and
the four first detectors (serving error rate, p99 latency, model error, drift) on 1-minute
windows. The recording is generated once into a cache folder (generation is not timed).

Two things are measured, each in its own child process, interleaved ``--repeat`` times:

- the replay loop (``rollbackd.daemon.replay.replay``, no ledger, no decision log): CPU-seconds
  and events per CPU-second (wall time is reported too, but on a shared machine it includes
  waiting for a core), and the child's peak RSS (``ru_maxrss``);
- the command a user runs, ``rollbackd replay RECORDING -c RULES --db ... --decisions-out ...
  --notifier none``: its CPU-seconds and peak RSS, read with ``os.wait4`` for that child alone.

Targets (issue 16) on the 2-core reference machine: the loop >= 300,000 events per CPU-s; the
CLI's peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

RULES = """
version: 1
settings: {notifier: {type: none}}
deployments:
  bench-a: {backend: {type: log}}
  bench-b: {backend: {type: log}}
rules:
  - {name: serving-errors, detector: error_rate, threshold: 0.05, alpha: 0.01, for: 2m,
     min_samples: 100, severity: critical, actions: [notify, rollback]}
  - {name: latency-p99, detector: latency, params: {quantile: 0.99}, threshold: 500, for: 3m,
     min_samples: 100, severity: warning, actions: [notify]}
  - {name: model-error, detector: model_error, threshold: 0.4, alpha: 0.01, for: 5m,
     min_samples: 100, severity: warning, actions: [notify]}
  - {name: drift, detector: drift, params: {reference_size: 5000}, threshold: 0.1,
     alpha: 0.01, for: 5m, min_samples: 200, severity: warning, actions: [notify]}
"""


def child(recording: str, rules: str, batch_size: int) -> None:
    from rollbackd.daemon.replay import build_pipeline, open_recording, replay
    from rollbackd.rules.loader import load_config

    config = load_config(rules)
    pipeline = build_pipeline(config)
    t0, c0 = time.perf_counter(), time.process_time()
    result = replay(open_recording(recording, config), pipeline, batch_size=batch_size)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "events": result.events,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "events_per_s": result.events / elapsed,
        "events_per_cpu_s": result.events / cpu,
        "peak_rss_mb": peak_kb / 1024,
        "summary": result.summary,
    }))


def cached_recording(cache: Path, events: int, suffix: str) -> Path:
    """The benchmark scenario's recording of ``events`` events in ``cache`` (``suffix``
    ``.jsonl`` or ``.jsonl.gz``), generated the first time; the Kafka benchmarks use it too."""
    from rollbackd.scenarios import benchmark_scenario, write_recording

    cache.mkdir(parents=True, exist_ok=True)
    recording = cache / f"bench-{events}{suffix}"
    if not recording.exists():
        t0 = time.perf_counter()
        stats = write_recording(benchmark_scenario(events), recording)
        print(f"generated {stats.lines:,} lines in {time.perf_counter() - t0:.1f}s -> {recording}")
    return recording


def cli_child(recording: Path, rules: Path, batch_size: int) -> dict[str, float]:
    """``rollbackd replay`` on ``recording`` in a child process: its CPU-s, wall s and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="rollbackd-bench-") as tmp:
        cmd = [sys.executable, "-m", "rollbackd.cli", "replay", str(recording), "-c", str(rules),
               "--db", f"{tmp}/ledger.db", "--decisions-out", f"{tmp}/decisions.jsonl",
               "--dead-letter", f"{tmp}/rejected.jsonl", "--notifier", "none", "--summary-json",
               "--batch-size", str(batch_size)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with open(f"{tmp}/out", "wb") as out, open(f"{tmp}/err", "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=tmp, env=env)
            # wait4: this child's own resource usage (RUSAGE_CHILDREN would mix every child's).
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"rollbackd replay failed ({proc.returncode}): {Path(tmp, 'err').read_text()[-2000:]}")
        summary = json.loads(Path(tmp, "out").read_text().strip().splitlines()[-1])
    events = sum(summary["events"].values()) + sum(summary["rejected"].values())
    cpu = usage.ru_utime + usage.ru_stime
    return {"events": events, "seconds": elapsed, "cpu_seconds": cpu, "events_per_cpu_s": events / cpu,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-cli", action="store_true", help="Time the replay loop only.")
    ap.add_argument("--out", default=str(HERE / "results" / "replay.json"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--child", nargs=2, metavar=("RECORDING", "RULES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batch_size)
        return

    cache = Path(args.cache)
    recording = cached_recording(cache, args.events, ".jsonl")
    rules = cache / "bench-rules.yaml"
    rules.write_text(RULES)

    runs, cli_runs = [], []
    for i in range(args.repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(recording), str(rules), "--batch-size", str(args.batch_size)],
            check=True, capture_output=True, text=True,
        )
        run = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"loop {i + 1}: {run['events']:,} events, CPU {run['cpu_seconds']:.2f}s = "
              f"{run['events_per_cpu_s']:,.0f} events/CPU-s ({run['seconds']:.2f}s wall), "
              f"peak RSS {run['peak_rss_mb']:.0f} MB")
        if not args.no_cli:
            cli = cli_child(recording, rules, args.batch_size)
            cli_runs.append(cli)
            print(f"cli  {i + 1}: rollbackd replay CPU {cli['cpu_seconds']:.2f}s "
                  f"({cli['seconds']:.2f}s wall), peak RSS {cli['peak_rss_mb']:.0f} MB")
    best = max(runs, key=lambda r: r["events_per_cpu_s"])
    result = {
        "benchmark": "replay",
        "events": best["events"],
        "recording_bytes": recording.stat().st_size,
        # CPU time tells a slow run from a busy machine: wall time includes waiting for a core.
        "events_per_cpu_s": {"best": best["events_per_cpu_s"], "all": [r["events_per_cpu_s"] for r in runs]},
        "cpu_seconds": {"all": [r["cpu_seconds"] for r in runs]},
        "events_per_s": {"best": max(r["events_per_s"] for r in runs), "all": [r["events_per_s"] for r in runs]},
        "peak_rss_mb": {"max": max(r["peak_rss_mb"] for r in runs)},
        "targets": {"events_per_cpu_s": 300_000, "cli_peak_rss_mb": 300},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "summary": best["summary"],
    }
    if cli_runs:
        result["cli"] = {
            "command": "rollbackd replay RECORDING -c RULES --db LEDGER --decisions-out FILE "
                       "--dead-letter FILE --notifier none --summary-json",
            "cpu_seconds": {"all": [r["cpu_seconds"] for r in cli_runs]},
            "events_per_cpu_s": {"best": max(r["events_per_cpu_s"] for r in cli_runs)},
            "peak_rss_mb": {"max": max(r["peak_rss_mb"] for r in cli_runs),
                            "all": [r["peak_rss_mb"] for r in cli_runs]},
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    line = f"best {result['events_per_cpu_s']['best']:,.0f} events/CPU-s, loop peak RSS {result['peak_rss_mb']['max']:.0f} MB"
    if cli_runs:
        line += f", CLI peak RSS {result['cli']['peak_rss_mb']['max']:.0f} MB"
    print(f"{line} -> {args.out}")


if __name__ == "__main__":
    main()
