"""Replay: drive the pipeline from a finite source with the event-time clock.

This is the same core the live daemon runs; only the clock and the source differ. The
watermark advances with the stream (the pipeline's own, per deployment: see
``daemon/admission.py``), so timers (window closes, ``for`` durations, group_wait) fire
exactly where they would have live.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from rollbackd.actions.base import Notifier, RollbackBackend
from rollbackd.actions.factory import make_backend, make_notifiers
from rollbackd.daemon.deadletter import JsonlDeadLetter
from rollbackd.daemon.decisions import DecisionSink, NullDecisions
from rollbackd.daemon.pipeline import Edges, Pipeline
from rollbackd.daemon.sources import EventSource, RecordingSource
from rollbackd.daemon.references import load_reference
from rollbackd.detectors.base import Reference
from rollbackd.events import EventDecoder
from rollbackd.measurements import TrailingWindow
from rollbackd.rules.model import Config
from rollbackd.rules.silences import Silence

__all__ = ["ReplayResult", "replay", "build_pipeline", "push_human_input", "trailing_windows", "GC_THRESHOLDS"]

# The pipeline allocates millions of small objects (events, their feature dicts); CPython's
# default gen-0 threshold of 700 makes the cycle collector rescan the tracked ones constantly.
# Replay and the live daemon collect far less often (measured: 15 % of replay time when the join
# still buffered tuples; the buffered predictions are untracked structs now, so it matters less).
GC_THRESHOLDS = (200_000, 50, 100)

Progress = Callable[[int, float | None], None]  # (events done, watermark)


@dataclass
class ReplayResult:
    summary: dict[str, Any]
    pipeline: Pipeline
    events: int = 0
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Each rule's window that the recording ended inside: never closed, never evaluated.
    not_evaluated: list[TrailingWindow] = field(default_factory=list)


@runtime_checkable
class HumanInput(Protocol):
    """What people said, as a ledger keeps it: silences, approvers' answers, acknowledgements."""

    def silences(self) -> list[Silence]: ...
    def answers(self) -> dict[str, list[dict[str, Any]]]: ...
    def acknowledgements(self) -> dict[str, list[dict[str, Any]]]: ...


def push_human_input(*pipelines: Pipeline) -> None:
    """Hand each pipeline the silences and approvals recorded in its ledger, read once for the
    pipelines that share one (a daemon's tasks). The engine reads no ledger while deciding;
    event time decides which of them apply, so a replay over the same ledger decides the same."""
    read: dict[int, tuple[list[Silence], dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]] = {}
    for pipeline in pipelines:
        recorder = pipeline.edges.recorder
        if not isinstance(recorder, HumanInput):
            continue
        if id(recorder) not in read:
            read[id(recorder)] = (recorder.silences(), recorder.answers(), recorder.acknowledgements())
        silences, answers, acks = read[id(recorder)]
        pipeline.set_silences(silences)
        pipeline.set_answers(answers)
        pipeline.set_acknowledgements(acks)


def build_pipeline(
    config: Config,
    *,
    decisions: DecisionSink | None = None,
    recorder: Any = None,
    dead_letter_path: str | Path | None = None,
    notifier: Notifier | None = None,
    drill: bool = False,
    backend_overrides: dict[str, RollbackBackend] | None = None,
    env: dict[str, str] | None = None,
    silences: Sequence[Silence] = (),
    tap: Any = None,
) -> Pipeline:
    env = dict(os.environ if env is None else env)
    backends: dict[str, RollbackBackend] = dict(backend_overrides or {})

    def backend_for(deployment: str) -> RollbackBackend:
        if deployment not in backends:
            backends[deployment] = make_backend(config.deployment(deployment).backend, env=env)
        return backends[deployment]

    read: dict[str, Reference] = {}  # by path: deployments that name one file share it

    def references(deployment: str) -> Reference | None:
        path = config.deployment(deployment).reference
        if not path:
            return None
        if path not in read:
            read[path] = load_reference(path)
        return read[path]

    if notifier is None:
        notifier = make_notifiers(config.settings, env=env)
    edges = Edges(
        notifier=notifier,
        backend_for=backend_for,
        decisions=decisions or NullDecisions(),
        dead_letters=JsonlDeadLetter(dead_letter_path) if dead_letter_path else None,
        references=references,
        drill=drill,
        tap=tap,
    )
    if recorder is not None:
        edges.recorder = recorder
    pipeline = Pipeline(config, edges, silences=silences)
    push_human_input(pipeline)
    return pipeline


def replay(
    source: EventSource,
    pipeline: Pipeline,
    *,
    batch_size: int = 8192,
    progress: Progress | None = None,
) -> ReplayResult:
    events = batches = 0
    gc_thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        while (batch := source.read(batch_size)) is not None:
            batches += 1
            events += len(batch.events) + len(batch.rejects)
            if batch.rejects:
                pipeline.reject(batch.rejects)
            push_human_input(pipeline)
            pipeline.ingest(batch.events)
            # The pipeline's watermark: per deployment, so one fast producer moves no one else.
            pipeline.advance(pipeline.watermark)
            flush = getattr(pipeline.edges.dead_letters, "flush", None)
            if flush is not None:
                flush()  # dead letters are durable before their position is committed
            source.commit(batch.position)
            if progress is not None:
                progress(events, pipeline.watermark)
        # End of a finite stream: a short one is still held for the warm-up; then every
        # window that ended by the last event is complete.
        pipeline.finish()
        pipeline.advance(pipeline.max_event_time)
    finally:
        gc.set_threshold(*gc_thresholds)
        source.close()
        dl = pipeline.edges.dead_letters
        if hasattr(dl, "close"):
            dl.close()
        pipeline.edges.decisions.close()
    # The windows the recording ended inside are reported, not evaluated: evaluating a
    # partial window would judge it on less data than the rule asks for, and change decisions
    # a longer recording of the same events reaches.
    trailing = trailing_windows(pipeline)
    summary = pipeline.summary()
    summary["not_evaluated"] = [w.to_record() for w in trailing]
    return ReplayResult(summary, pipeline, events=events, batches=batches, not_evaluated=trailing)


def trailing_windows(pipeline: Pipeline) -> list[TrailingWindow]:
    """Per rule and deployment × variant, the window a finite stream ended inside, when data
    arrived after the rule's last evaluated boundary (after ``replay``'s final ``advance`` to
    the newest event: every boundary up to it is processed, the panes after it are kept).

    Boundaries of a window spec are the multiples of its step since the epoch; the data no
    window of the rule evaluated is in the panes from its last boundary on.
    """
    until = pipeline.max_event_time
    if not math.isfinite(until):
        return []
    assembler = pipeline.assembler
    g = assembler.granularity
    last_pane = math.floor(until / g)  # the boundary at its start is the last processed one
    out: list[TrailingWindow] = []
    for rule in pipeline.config.rules:
        step = max(1, round(rule.window.step / g))
        size = max(1, round(rule.window.size / g))
        first = (last_pane // step) * step  # the rule's last boundary, as a pane index
        end = first + step
        for key in assembler.keys():
            if not rule.applies_to(*key):
                continue
            panes = [p for i, p in sorted(assembler.panes[key].items()) if i >= first]
            predictions = sum(len(p.predictions) for p in panes)
            labels = sum(len(p.outcomes) for p in panes)
            if not predictions and not labels:
                continue
            out.append(TrailingWindow(
                rule.name, rule.detector, key[0], key[1], (end - size) * g, end * g, first * g, until,
                predictions, labels,
            ))
    return out


def open_recording(path: str, config: Config) -> RecordingSource:
    return RecordingSource(path, EventDecoder(config.settings.max_event_bytes))
