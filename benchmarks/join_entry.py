"""Memory of one buffered prediction in the label join (``daemon/join.py``), its id included:
what ``rollbackd validate`` multiplies by ``max_pending_labels`` to size the label buffer
(``rules/loading/summary.py``, ``JOIN_ENTRY_BYTES``).

    python benchmarks/join_entry.py        # writes benchmarks/results/join_entry.md

Each prediction is decoded into an event, buffered, and the event dropped, as the pipeline does;
tracemalloc counts what stays (the entry, its dict slot and its id string). Allocation bytes, not
time: the number does not depend on the machine's load.
"""

from __future__ import annotations

import gc
import platform
import sys
import tracemalloc
from pathlib import Path

from rollbackd.daemon.join import OutcomeJoiner
from rollbackd.events import Prediction

RESULTS = Path(__file__).parent / "results" / "join_entry.md"


def bytes_per_entry(n: int, id_length: int) -> float:
    joiner = OutcomeJoiner(horizon=86400.0, max_pending=10 * n)
    joiner.track("d")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        joiner.add(Prediction(ts=1.7e9 + i * 0.01, deployment="d", variant="primary", model_version="3",
                              id=f"{i:0{id_length}d}", features={"x": 1.0}, prediction=1.0,
                              score=0.73 + i * 1e-9))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(joiner) == n
    return (after - before) / n


def main() -> None:
    rows = [(length, bytes_per_entry(200_000, length)) for length in (16, 36)]
    text = ["# Label join: bytes per buffered prediction", "",
            f"`python benchmarks/join_entry.py` on Python {platform.python_version()} ({sys.platform}); "
            "200,000 predictions per row, tracemalloc.", "",
            "| id length (characters) | bytes per buffered prediction |", "| --- | --- |"]
    text += [f"| {length} (e.g. {'a UUID' if length == 36 else 'req-000000000042'}) | {b:.0f} |" for length, b in rows]
    text += ["", "The issue 16 target is at most 120 B per entry. `rollbackd validate` sizes the "
             "label buffer with 240 B per entry (`JOIN_ENTRY_BYTES`: a UUID id, rounded up)."]
    RESULTS.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
