"""Memory per deployment once every drift reference is complete.

    python benchmarks/fleet_memory.py [--sizes 50 250] [--rate 5] [--duration 1200]
                                      [--root CHECKOUT] [--out FOLDER]

Per size N: N deployments, each sending ``--rate`` predictions per second for ``--duration``
seconds of event time (default 5/s for 20 minutes: about 6,000 predictions per deployment, so
the drift rule's first 5,000 complete its reference), 10 features (8 numeric, 2 categorical),
60 % labelled within 30-300 s, under benchmarks/fleet.py's four rules (error_rate, latency p99,
drift with a 5,000 reference, model_error). The traffic is generated and decoded in the child
process (``rollbackd.scenarios``, as a recording would be decoded) and fed to one pipeline in
batches of 8,192 as ``replay`` does; each size runs in a child process of its own.

Reported per size: peak RSS (``ru_maxrss``), the RSS at the end (after a full GC, from
/proc/self/statm: what the deployments' state keeps), CPU-seconds and wall seconds of the feed,
the drift references complete at the end, the snapshot's bytes (inline: ``Pipeline.snapshot()``;
external: the snapshot naming complete references by digest, and the blobs beside it), and
between the two sizes the RSS per deployment: (RSS(N2) - RSS(N1)) / (N2 - N1), for the peak and
for the end. The difference cancels the interpreter, the libraries and the generator.

``--root`` runs the children on another checkout's ``rollbackd`` (e.g. main's, for a
before/after); the results then go to ``--out`` only when given. Writes
``benchmarks/results/fleet_memory.json`` and ``fleet_memory.md`` (the numbers of the last run;
the before/after of issue 16 is in NOTES below, measured when committed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from fleet import RULES as FLEET_RULES  # noqa: E402

# benchmarks/fleet.py's four rules, with labels waiting 10 minutes at most.
RULES = FLEET_RULES.replace("settings: {notifier: {type: none}}", "settings: {notifier: {type: none}, join_horizon: 10m}")
assert RULES != FLEET_RULES

# What the numbers were when committed (see the commit messages for the commands).
NOTES: list[str] = [
    "## Before and after (issue 16)", "",
    "Same command, same machine, minutes apart; before = 5917d66 (`--root` on a copy of it).", "",
    "| code | peak RSS/deployment | end RSS/deployment | 50 → 250: peak RSS | pipeline CPU-s at 50 / 250 |",
    "|---|---|---|---|---|",
    "| 5917d66 | 3.125 MB | 3.045 MB | 282 → 907 MB | 4.1 / 23.4 |",
    "| memory branch | 1.170 MB | 1.137 MB | 185 → 418 MB | 4.1 / 21.3 |",
    "| memory branch, `--without drift` | 0.842 MB | 0.800 MB | 167 → 336 MB | 3.7 / 24.2 (busier machine) |", "",
    "The drift rule's share per deployment went from ~2.3 MB to ~0.33 MB: its complete reference "
    "(8 x 5,000 sorted float64 = 320 KB, and the two categorical features' counts) and nothing else. "
    "Before, the reference being built was kept as the windows' raw columns (~50,000 Python objects "
    "per deployment), which also pinned the memory of the events they came from after the reference "
    "was complete. The remaining ~0.8 MB per deployment is not drift's: it is there without the drift "
    "rule, mostly the join buffer (labels within 5 min; the 40 % never labelled wait out the 10-minute "
    "horizon: ~700 entries per deployment here) and the memory its long-lived entries pin between "
    "transient events. The snapshot is unchanged (320,680 B of reference blob per deployment, written "
    "once; ~52 KB of the rest).", "",
    "benchmarks/fleet.py at 2,000 deployments, 200k events (`--sizes 2000 --events 200000 --repeat 1`, "
    "A/B interleaved, 2 rounds): CPU 8.37, 8.43 s (5917d66) → 7.40, 8.29 s; peak RSS 294 → 213 MB; "
    "state 12,411 → 9,537 B/deployment. Earlier rounds with 64 staged predictions: 10.24, 10.04, 9.65 s "
    "→ 8.55, 8.28, 8.93 s. The drift detector's update went from ~19 % of the profile (issue 16) to "
    "~7.5 % (`--profile 2000 --events 200000`: `update` 3.2 s of 43 s profiled, of which "
    "`PartialReference.take` 1.7 s).", "",
]


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(deployments: int, rate: float, duration: float, rules_path: str) -> None:
    from rollbackd.daemon.replay import GC_THRESHOLDS, build_pipeline
    from rollbackd.events import EventDecoder, Rejected
    from rollbackd.rules.loader import load_config
    from rollbackd.scenarios import Scenario, iter_chunks

    config = load_config(rules_path)
    pipeline = build_pipeline(config)
    scenario = Scenario(
        name=f"fleet-memory-{deployments}", duration=duration, rate=rate,
        deployments=tuple(f"fleet-{d:05d}" for d in range(deployments)),
        n_numeric=8, n_categorical=2, label_fraction=0.6, seed=20_261_206,
    )
    decode = EventDecoder(config.settings.max_event_bytes).decode
    gc.set_threshold(*GC_THRESHOLDS)
    events = 0
    batch: list = []
    cpu_feed = 0.0
    t0, c0 = time.perf_counter(), time.process_time()

    def feed(batch: list) -> None:
        nonlocal cpu_feed
        c = time.process_time()
        pipeline.ingest(batch)
        pipeline.advance(pipeline.watermark)
        cpu_feed += time.process_time() - c

    for lines, _ in iter_chunks(scenario):
        for raw in lines:
            ev = decode(raw)
            if type(ev) is not Rejected:
                batch.append(ev)
            if len(batch) == 8192:
                events += len(batch)
                feed(batch)
                batch = []
    events += len(batch)
    feed(batch)
    c = time.process_time()
    pipeline.finish()
    pipeline.advance(pipeline.max_event_time)
    cpu_feed += time.process_time() - c
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    rss_end = _rss_now_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    complete = 0
    drift = 0
    for (rule, _key), det in pipeline.detectors.items():
        if rule == "drift":
            drift += 1
            complete += getattr(det, "_baseline").summary is not None
    c = time.process_time()
    inline = len(pipeline.snapshot())
    cpu_snapshot = time.process_time() - c
    external = len(pipeline.snapshot(external=True))
    blobs = pipeline.new_blobs()
    print(json.dumps({
        "deployments": deployments,
        "deployments_seen": len(pipeline.event_time.deployments),
        "events": events,
        "drift_detectors": drift,
        "references_complete": complete,
        "cpu_seconds": cpu,
        "cpu_seconds_pipeline": cpu_feed,
        "wall_seconds": elapsed,
        "peak_rss_mb": peak,
        "end_rss_mb": rss_end,
        "snapshot_bytes": inline,
        "snapshot_cpu_seconds": cpu_snapshot,
        "external_snapshot_bytes": external,
        "blob_bytes": sum(map(len, blobs.values())),
        "blobs": len(blobs),
    }))


def run_child(root: Path, deployments: int, rate: float, duration: float, rules: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(deployments), "--rate", str(rate),
           "--duration", str(duration), "--rules", str(rules)]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))
    return json.loads(out.stdout.strip().splitlines()[-1])


def without_rules(rules: str, names: list[str]) -> str:
    """RULES without the named rules (each is two lines: ``- {name: ...`` and its tail)."""
    lines = rules.split("\n")
    out: list[str] = []
    skip = False
    for line in lines:
        if skip:
            skip = False
            continue
        if any(f"name: {n}," in line for n in names):
            skip = True
            continue
        out.append(line)
    return "\n".join(out)


def per_deployment(runs: list[dict], field: str) -> float:
    a, b = runs[0], runs[-1]
    return (b[field] - a[field]) / (b["deployments"] - a["deployments"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[50, 250])
    ap.add_argument("--rate", type=float, default=2.0, help="predictions per second per deployment")
    ap.add_argument("--duration", type=float, default=2700.0, help="seconds of event time")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose rollbackd the children run")
    ap.add_argument("--out", default=None, help="folder for fleet_memory.json/.md (default: results/, "
                    "or nothing with --root)")
    ap.add_argument("--without", nargs="+", default=[], metavar="RULE",
                    help="leave these rules out (e.g. drift: what the rest costs per deployment)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rules", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.rate, args.duration, args.rules)
        return

    root = Path(args.root).resolve()
    cache = ROOT / ".cache" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    rules = cache / "fleet-memory-rules.yaml"
    rules.write_text(without_rules(RULES, args.without))
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    runs = []
    for n in args.sizes:
        run = run_child(root, n, args.rate, args.duration, rules)
        runs.append(run)
        print(f"{n} deployments: {run['events']:,} events, {run['references_complete']}/{run['drift_detectors']} "
              f"references complete, CPU {run['cpu_seconds']:.1f}s (pipeline {run['cpu_seconds_pipeline']:.1f}s, "
              f"wall {run['wall_seconds']:.1f}s), peak RSS {run['peak_rss_mb']:.0f} MB, end RSS "
              f"{run['end_rss_mb']:.0f} MB, snapshot {run['snapshot_bytes'] / n:,.0f} B/deployment "
              f"(external {run['external_snapshot_bytes'] / n:,.0f} + blobs {run['blob_bytes'] / n:,.0f})",
              flush=True)
    result = {
        "benchmark": "fleet_memory",
        "command": "python benchmarks/fleet_memory.py " + " ".join(sys.argv[1:]),
        "commit": commit + ("+dirty" if dirty else ""),
        "rate": args.rate,
        "duration": args.duration,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "target_rss_mb_per_deployment": 0.5,
        "runs": runs,
        "peak_rss_mb_per_deployment": per_deployment(runs, "peak_rss_mb"),
        "end_rss_mb_per_deployment": per_deployment(runs, "end_rss_mb"),
        "snapshot_bytes_per_deployment": per_deployment(runs, "snapshot_bytes"),
        "external_snapshot_bytes_per_deployment": per_deployment(runs, "external_snapshot_bytes"),
        "blob_bytes_per_deployment": per_deployment(runs, "blob_bytes"),
    }
    print(f"per deployment: peak RSS {result['peak_rss_mb_per_deployment']:.3f} MB, end RSS "
          f"{result['end_rss_mb_per_deployment']:.3f} MB, snapshot {result['snapshot_bytes_per_deployment']:,.0f} B "
          f"(external {result['external_snapshot_bytes_per_deployment']:,.0f} B + blobs "
          f"{result['blob_bytes_per_deployment']:,.0f} B)")
    out = args.out if args.out is not None else (None if args.root != str(ROOT) else str(RESULTS))
    if out is None:
        print(json.dumps(result))
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fleet_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = ["| deployments | events | references complete | CPU-s (pipeline) | wall-s | peak RSS | end RSS | "
            "snapshot B/deployment | external + blobs B/deployment |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        n = r["deployments"]
        rows.append(f"| {n:,} | {r['events']:,} | {r['references_complete']}/{r['drift_detectors']} | "
                    f"{r['cpu_seconds']:.1f} ({r['cpu_seconds_pipeline']:.1f}) | {r['wall_seconds']:.1f} | "
                    f"{r['peak_rss_mb']:.0f} MB | {r['end_rss_mb']:.0f} MB | {r['snapshot_bytes'] / n:,.0f} | "
                    f"{r['external_snapshot_bytes'] / n:,.0f} + {r['blob_bytes'] / n:,.0f} |")
    md = [
        "# Memory per deployment (complete drift references)", "",
        f"`{result['command']}` on {result['commit']} — each deployment {args.rate:g} predictions/s for "
        f"{args.duration:g} s of event time (about {args.rate * args.duration:,.0f} predictions: its drift "
        "reference of 5,000 completes), 10 features (8 numeric, 2 categorical), 60 % labelled; "
        "benchmarks/fleet.py's 4 rules; each size in its own child process. "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs (shared: CPU-s, not wall).", "",
        *rows, "",
        f"Per deployment (difference of the two sizes): **peak RSS {result['peak_rss_mb_per_deployment']:.3f} MB, "
        f"end RSS {result['end_rss_mb_per_deployment']:.3f} MB** (target <= 0.5 MB); snapshot "
        f"{result['snapshot_bytes_per_deployment']:,.0f} B inline, external "
        f"{result['external_snapshot_bytes_per_deployment']:,.0f} B + blobs {result['blob_bytes_per_deployment']:,.0f} B.",
        "", "CPU-s: the child's whole process time (generating and decoding the traffic too); in brackets the "
        "pipeline's own (`ingest` + `advance`).", "",
        *NOTES,
    ]
    (folder / "fleet_memory.md").write_text("\n".join(md) + "\n")
    print(f"-> {folder / 'fleet_memory.json'}, {folder / 'fleet_memory.md'}")


if __name__ == "__main__":
    main()
