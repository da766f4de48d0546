"""The live daemon's tasks: one pipeline per source partition, each with its own event time.

No broker here (tests/test_scaleout.py runs the real thing): a partitioned source stand-in
hands out batches split by partition and says which partitions are read to their end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rollbackd.daemon.replay import build_pipeline
from rollbackd.daemon.run import Daemon, RunSettings
from rollbackd.daemon.sources import Batch
from rollbackd.events import EventDecoder
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, generate

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"


# The wall clock of these runs: after the recording, as it would be live (the wall clock is
# the reference for future timestamps: an event ahead of it is dead-lettered).
WALL = 1_790_010_000.0


class Clock:
    t = WALL

    def now(self) -> float:
        return self.t


class Partitioned:
    def __init__(self) -> None:
        self.ends: set[int] = set()

    def at_end(self, partition: int) -> bool:
        return partition in self.ends

    def commit(self, position) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def events():
    dec = EventDecoder()
    out = [dec.decode(line) for line in generate(BUILTIN["sustained_errors"])]
    return [e for e in out if hasattr(e, "ts")]


def test_each_partition_keeps_its_own_event_time_and_a_silent_one_follows_the_lead(events, tmp_path):
    config = load_config(RULES)
    clock, source = Clock(), Partitioned()
    daemon = Daemon(build_pipeline(config), source, clock=clock,
                    settings=RunSettings(checkpoint_path=str(tmp_path / "c"), idle_after=3600))
    early, late = events[:2000], events[20000:22000]
    # Partition 1 is far behind partition 0: its events are not late for being behind.
    daemon.step(Batch(early + late, [], {"t:0": 2000, "t:1": 2000}, parts={0: late, 1: early}))
    t0, t1 = daemon.tasks[0], daemon.tasks[1]
    assert t1.pipeline.counters["late"] == 0 and t0.pipeline.counters["late"] == 0
    assert t0.watermark == max(e.ts for e in late) - 30
    assert t1.watermark == max(e.ts for e in early) - 30
    lead = t0.watermark
    # Not read to its end: partition 1 keeps its own time however long it waits.
    clock.t = WALL + 100.0
    assert daemon.event_now(clock.t, t1, lead) == t1.watermark
    # Read to its end, but its last events came less than partition_idle_after ago: its own.
    source.ends.add(1)
    clock.t = WALL + 0.5
    assert daemon.event_now(clock.t, t1, lead) == t1.watermark
    # Read to its end and quiet: it follows the most advanced task.
    clock.t = WALL + 2.5
    assert daemon.event_now(clock.t, t1, lead) == lead
    # The view adds the tasks up.
    view = daemon.pipeline
    assert view.counters["predictions"] == t0.pipeline.counters["predictions"] + t1.pipeline.counters["predictions"]
    assert view.max_event_time == t0.pipeline.max_event_time


def test_a_task_is_handed_over_only_when_all_its_partitions_leave(tmp_path):
    config = load_config(RULES)

    class Source(Partitioned):
        held = [("outcomes", 0), ("outcomes", 1), ("predictions", 0), ("predictions", 1)]

        def assignment(self):
            return list(self.held)

    daemon = Daemon(build_pipeline(config), Source(), settings=RunSettings(checkpoint_path=str(tmp_path / "c")))
    daemon.task(0), daemon.task(1)
    assert daemon._gone([("predictions", 1)]) == []  # outcomes:1 stays: task 1 stays
    assert daemon._gone([("predictions", 1), ("outcomes", 1)]) == [1]
    assert daemon._gone([("predictions", 0), ("outcomes", 0), ("predictions", 1), ("outcomes", 1)]) == [0, 1]


def test_a_partition_whose_state_cannot_be_read_stops_the_daemon_instead_of_starting_empty(tmp_path):
    from rollbackd.errors import Fatal, Recoverable

    class Store:
        calls = 0

        def load(self, key):
            Store.calls += 1
            raise Recoverable("state topic unreachable")

    waits: list[float] = []
    daemon = Daemon(build_pipeline(load_config(RULES)), Partitioned(), state=Store(), wait=waits.append,
                    settings=RunSettings(checkpoint_path=str(tmp_path / "c")))
    with pytest.raises(Fatal, match="partition 3"):
        daemon._assigned([("events", 3)])
    assert Store.calls == 5 and waits == [0.5, 1.0, 2.0, 4.0]
    assert daemon.tasks == {}, "no task starts without its state"
