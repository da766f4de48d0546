"""What a checkpoint costs the processing thread, at fleet size.

    python benchmarks/checkpoint.py [--deployments 2000] [--labels 1000000] [--checkpoints 8]

Builds one pipeline as the live daemon holds it: ``--deployments`` deployments, each with a
complete drift reference (8 features x 5,000 float64, from a reference file, so every detector
has its summary from the start) and a label rule, and ``--labels`` predictions waiting for
their outcome in the join buffer (spread over an hour, so the 5-minute windows hold the last
few minutes of them). Then, for each way of checkpointing, ``--checkpoints`` rounds of: 5,000
new events (ingested and advanced, as a batch is), then one checkpoint into a temporary folder.

Ways:

- ``whole``: ``Pipeline.snapshot()`` with every reference inline, written and fsynced by
  ``Checkpoint.save`` on the processing thread (schema 3's first form: what main did, minus
  pickle).
- ``incremental``: ``snapshot(external=True)``: references written once, as blobs named by
  digest; the main file and the new blobs written and fsynced on a writer thread
  (``daemon/checkpoints.py``). The processing thread pays for the encoding.
- ``frozen``: ``Pipeline.freeze()`` on the processing thread, which takes only what changed
  (detectors' plain state kept until they next change, the join buffer's changes since the last
  freeze, shallow copies of the immutable parts); the encoding, the frame, the write and the
  fsync on the writer thread. New references are written inline by the writer the first time
  (never hashed on the processing thread) and as blobs, by digest, from the next checkpoint on.

Per way: the stall of the processing thread per checkpoint (wall, p50/p99/max, and its CPU
time), the writer thread's wall time, bytes written per checkpoint (the first and the later
ones), and the restore time (read + decode + rebuild the detectors) of the last checkpoint.
Writes ``benchmarks/results/checkpoint.json`` and ``checkpoint.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rollbackd.actions.base import NullNotifier  # noqa: E402
from rollbackd.daemon.checkpoints import CheckpointWriter  # noqa: E402
from rollbackd.daemon.pipeline import Edges, Pipeline  # noqa: E402
from rollbackd.daemon.run import Checkpoint  # noqa: E402
from rollbackd.daemon.snapshot import Blobs  # noqa: E402
from rollbackd.detectors.base import Reference  # noqa: E402
from rollbackd.events import Prediction  # noqa: E402
from rollbackd.rules.loader import load_config_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FEATURES = [f"f{i}" for i in range(8)]
REF_SIZE = 5000
T0 = 1_790_000_000.0
RULES = """
version: 1
settings: {lateness: 10s, join_horizon: 2h, notifier: {type: none}}
grouping: {group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}
deployments: {}
rules:
  - {name: drift, detector: drift, threshold: 0.9, window: {size: 5m},
     min_samples: 10, severity: warning, actions: [notify]}
  - {name: model-error, detector: model_error, threshold: 0.99, window: {size: 5m},
     min_samples: 10, severity: warning, actions: [notify]}
"""


# What the numbers mean, written with them (measured at commit time; see the commit message).
FINDINGS = [
    "## Where it lands", "",
    "- `frozen` is how the daemon checkpoints to its file (`daemon/checkpoints.py`; with a state topic each task record is still encoded on the processing thread). Its stall is what "
    "`Pipeline.freeze()` takes on the processing thread, each part at the cost of what changed: a "
    "detector's plain state is kept until it next changes (at its window's close; one changed since "
    "the last checkpoint is converted by the writer thread, or by the processing thread just before "
    "it changes it again if the writer has not yet: copy on write); the join buffer is not copied, its "
    "changes since the last freeze (noted by the hot loop, an append each) are applied by the writer "
    "to its own copy; alerts (immutable), counters and names are shallow copies, converted by the "
    "writer; event time and version histories have their fields copied; references are never "
    "encoded or hashed on the processing thread: a new one is written inline by the writer, which "
    "keeps its digest, and named by digest (its blob written once) from the next checkpoint on. "
    "After a restore the references read are named from the start.",
    "- Bytes: the first `frozen` checkpoint holds the references inline, the second writes them once "
    "as blobs beside the file (so each is written twice in all), the later ones hold neither; the "
    "1M pending labels are most of a later checkpoint.",
    "- Costs moved, not removed: the writer thread encodes the whole buffer and panes each checkpoint "
    "(its wall time in the table); the join copy doubles the buffer's dict memory (entries are "
    "shared); a window boundary reached while the writer still owes detectors converts those on the "
    "processing thread (not in this benchmark: each checkpoint is written before the next events).",
    "- `whole` is single-threaded and includes the write and fsync of ~0.7 GB; `incremental` encodes "
    "and hashes on the processing thread (references once).",
    "",
]


def _reference(seed: int) -> Reference:
    rng = np.random.default_rng(seed)
    return Reference("bench", {f: rng.normal(size=REF_SIZE) for f in FEATURES})


def build(deployments: int, labels: int) -> tuple[Pipeline, float]:
    config = load_config_text(RULES)
    refs = {f"dep-{d:05d}": _reference(d) for d in range(deployments)}
    edges = Edges(notifier=NullNotifier(), backend_for=lambda d: None, references=refs.get)
    p = Pipeline(config, edges)
    p.joiner.note_changes()  # as the live daemon does when it starts a task
    rng = np.random.default_rng(7)
    per = max(1, labels // deployments)
    span = 3600.0
    names = list(refs)
    batch: list[Prediction] = []
    n = 0
    for i in range(per):
        ts = T0 + span * i / per
        for name in names:
            batch.append(Prediction(id=f"{name}-{i}", ts=ts, deployment=name, model_version="1",
                                    features=dict(zip(FEATURES, rng.normal(size=8).tolist())),
                                    prediction=1.0, score=0.5))
            n += 1
        if len(batch) >= 50_000:
            p.ingest(batch)
            p.advance(p.watermark)
            batch = []
    p.ingest(batch)
    p.finish()
    p.advance(p.watermark)
    return p, T0 + span


def more_events(p: Pipeline, at: float, k: int, count: int = 5000) -> float:
    deps = sorted(p.event_time.deployments)
    rng = np.random.default_rng(k)
    events = []
    for j in range(count):
        ts = at + j * 0.002
        events.append(Prediction(id=f"more-{k}-{j}", ts=ts, deployment=deps[(j * 7919 + k) % len(deps)],
                                 model_version="1", features=dict(zip(FEATURES, rng.normal(size=8).tolist())),
                                 prediction=1.0, score=0.5))
    p.ingest(events)
    p.advance(p.watermark)
    return at + count * 0.002


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_way(way: str, p: Pipeline, at: float, rounds: int, folder: Path) -> tuple[dict, float]:
    path = str(folder / f"{way}.ckpt")
    files = CheckpointWriter(path) if way != "whole" else None
    stalls, cpus, writer, sizes = [], [], [], []
    p.checkpointing.blobs = Blobs()  # each way starts as a new process would: no reference written yet
    for k in range(rounds):
        at = more_events(p, at, k + 100 * len(way))
        gc.collect()
        t0, c0 = time.perf_counter(), time.thread_time()
        if way == "whole":
            Checkpoint({0: p.snapshot()}, {"in:0": k}, 0, {}).save(path)
            stall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            writer.append(0.0)
            sizes.append(os.path.getsize(path))
        else:
            snap = p.snapshot(external=True) if way == "incremental" else p.freeze()
            blobs: dict[str, bytes | None] = {d: None for d in p.blob_digests()}
            blobs.update(p.new_blobs())
            files.submit(Checkpoint({0: snap}, {"in:0": k}, 0, {}, blobs=blobs))
            stall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            done = files.wait()
            writer.append(done.seconds)
            sizes.append(done.bytes_written)
        stalls.append(stall)
        cpus.append(cpu)
    # restore: a new pipeline on the same config and references, from the files alone
    t0, c0 = time.perf_counter(), time.process_time()
    if way == "whole":
        cp = Checkpoint.load(path)
        q = Pipeline(p.config, p.edges)
        q.restore(cp.pipelines[0])
    else:
        cp = Checkpoint.load(path)
        q = Pipeline(p.config, p.edges)
        q.restore(cp.pipelines[0], cp.blobs)
    restore, restore_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(q.joiner) == len(p.joiner) and len(q.detectors) == len(p.detectors)
    if files is not None:
        files.close()
    return {
        "stall_p50_s": pct(stalls, 0.5), "stall_p99_s": pct(stalls, 0.99), "stall_max_s": max(stalls),
        "stall_cpu_mean_s": statistics.mean(cpus), "writer_mean_s": statistics.mean(writer),
        "bytes_first": sizes[0], "bytes_second": sizes[1] if len(sizes) > 1 else None,
        "bytes_later_mean": int(statistics.mean(sizes[2:])) if len(sizes) > 2 else None,
        "restore_s": restore, "restore_cpu_s": restore_cpu, "stalls_s": stalls,
    }, at


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deployments", type=int, default=2000)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--ways", nargs="+", default=["whole", "incremental", "frozen"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    p, at = build(args.deployments, args.labels)
    built = time.perf_counter() - t0
    panes = sum(len(pn.predictions) for by in p.assembler.panes.values() for pn in by.values())
    print(f"built in {built:.1f} s: {len(p.detectors)} detectors, {len(p.joiner)} pending labels, "
          f"{panes} predictions in panes", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for way in args.ways:
            results[way], at = run_way(way, p, at, args.checkpoints, Path(tmp))
            r = results[way]
            print(f"{way}: stall p50 {r['stall_p50_s'] * 1e3:.0f} ms p99 {r['stall_p99_s'] * 1e3:.0f} ms "
                  f"(cpu {r['stall_cpu_mean_s'] * 1e3:.0f} ms), writer {r['writer_mean_s'] * 1e3:.0f} ms, "
                  f"bytes first {r['bytes_first'] / 1e6:.1f} MB second {(r['bytes_second'] or 0) / 1e6:.1f} MB later {(r['bytes_later_mean'] or 0) / 1e6:.1f} MB, "
                  f"restore {r['restore_s']:.2f} s", flush=True)
    out = {
        "command": "python benchmarks/checkpoint.py " + " ".join(sys.argv[1:]),
        "deployments": args.deployments, "pending_labels": len(p.joiner), "predictions_in_panes": panes,
        "detectors": len(p.detectors), "checkpoints": args.checkpoints, "build_s": built,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "ways": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint.json").write_text(json.dumps(out, indent=1) + "\n")
    rows = [
        "| way | stall p50 | stall p99 | stall max | stall CPU (mean) | writer thread (mean) | "
        "bytes, first | bytes, second | bytes, later (mean) | restore (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for way, r in results.items():
        rows.append(
            f"| {way} | {r['stall_p50_s'] * 1e3:.0f} ms | {r['stall_p99_s'] * 1e3:.0f} ms | "
            f"{r['stall_max_s'] * 1e3:.0f} ms | {r['stall_cpu_mean_s'] * 1e3:.0f} ms | "
            f"{r['writer_mean_s'] * 1e3:.0f} ms | {r['bytes_first'] / 1e6:.1f} MB | {(r['bytes_second'] or 0) / 1e6:.1f} MB | "
            f"{(r['bytes_later_mean'] or 0) / 1e6:.1f} MB | {r['restore_s']:.2f} s / {r['restore_cpu_s']:.2f} s |")
    md = [
        "# Checkpoint cost at fleet size", "",
        f"`{out['command']}` — {args.deployments} deployments, each with a complete drift reference "
        f"(8 features x {REF_SIZE} float64) and a label rule: {len(p.detectors)} detectors, "
        f"{len(p.joiner):,} pending labels, {panes:,} predictions in open panes; {args.checkpoints} "
        "checkpoints per way, 5,000 new events before each. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs (shared with other work while measured).", "",
        *rows, "",
        "Stall: wall time the processing thread spends in the checkpoint (no event is processed "
        "meanwhile); its CPU time beside it. Writer thread: encoding (frozen), write and fsync off the "
        "processing thread, which the offset commit waits for. p99 over this few checkpoints is the "
        "largest but one or the largest. Bytes, later: the mean from the third checkpoint on.", "",
        *FINDINGS,
    ]
    (RESULTS / "checkpoint.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
