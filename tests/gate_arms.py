"""One replayed deployment whose arms the gate judges differently, shared by tests/test_gate*.py
(built once per test session: the replay takes a few seconds).

``demo-scorer`` runs version 1 on ``stable`` and, from t=600s, version 2 on ``canary`` and
``shadow`` with a 30% error rate: ``canary`` and ``shadow`` fail (their alert fires), ``stable``
passes, and an arm with no events (``blue``) is inconclusive (the rule applies, nothing measured).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.report import MeasurementTap
from rollbackd.rules.loader import load_config_text
from rollbackd.scenarios import Fault, Scenario, write_recording

RULES = """
version: 1
settings: {lateness: 30s, notifier: {type: none}}
grouping: {group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}
deployments:
  demo-scorer: {backend: {type: log}, known_good_after: 5m, cooldown: 0s}
rules:
  - {name: serving-error-rate, detector: error_rate, threshold: 0.05, clear_threshold: 0.03,
     alpha: 0.01, for: 2m, min_samples: 50, severity: critical, actions: [notify, rollback]}
"""

DEPLOYMENT = "demo-scorer"
FAILING, PASSING, UNMEASURED = "canary", "stable", "blue"


class Arms(NamedTuple):
    pipeline: Any
    tap: MeasurementTap
    records: list[dict[str, Any]]


@functools.cache
def judged_arms() -> Arms:
    cfg = load_config_text(RULES)
    tap = MeasurementTap(cfg, profiles=False, max_points=1)
    decisions = MemoryDecisions()
    pipeline = build_pipeline(cfg, decisions=decisions, tap=tap)
    with tempfile.TemporaryDirectory(prefix="rollbackd-gate-") as tmp:
        path = Path(tmp) / "arms.jsonl.gz"
        write_recording(Scenario(
            name="arms", seed=3, duration=1500.0,
            variants=(("stable", 0.6), ("canary", 0.2), ("shadow", 0.2)),
            versions=((0.0, "1"), (600.0, "2", "canary"), (600.0, "2", "shadow")),
            faults=(Fault("error_rate", start=600.0, magnitude=0.3, version="2"),),
        ), path)
        replay(open_recording(str(path), cfg), pipeline, batch_size=4096)
    return Arms(pipeline, tap, decisions.records)


@contextlib.contextmanager
def gate_server() -> Iterator[Any]:
    """The daemon's HTTP server over the judged arms (its gate reads their measurements); it
    must have logged no error by the end."""
    from prometheus_client import CollectorRegistry

    from rollbackd.daemon.http import OpsServer

    arms = judged_arms()
    with OpsServer(CollectorRegistry(), arms.pipeline, port=0, measurements=arms.tap.latest) as srv:
        yield srv
    assert srv.errors == []
