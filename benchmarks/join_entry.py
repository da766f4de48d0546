"""Memory of one buffered prediction in the label join (``daemon/join.py``), its id included:
what ``rollbackd validate`` multiplies by ``max_pending_labels`` to size the label buffer
(``rules/loading/summary.py``, ``JOIN_ENTRY_BYTES``).

    python benchmarks/join_entry.py        # writes benchmarks/results/join_entry.md

Each prediction is decoded from its JSON line into an event (``EventDecoder``, as a source
does), buffered, and the event dropped, as the pipeline does; tracemalloc counts what stays (the
entry, its dict slot, its id string, and whatever of the decoded event the entry keeps alive).
Two states of the buffer: filling (200,000 predictions into an empty one), and full and
churning (another 200,000 through it at the cap, each evicting the oldest), where the dict has
resized around its deleted slots. Allocation bytes, not time: the number does not depend on the
machine's load.
"""

from __future__ import annotations

import gc
import platform
import sys
import tracemalloc
from pathlib import Path

import msgspec

from rollbackd.daemon.join import OutcomeJoiner
from rollbackd.events import EventDecoder, Prediction

RESULTS = Path(__file__).parent / "results" / "join_entry.md"
N = 200_000
NOTES = """\
`rollbackd validate` sizes the label buffer with 260 B per entry (`JOIN_ENTRY_BYTES`: a UUID id,
full and churning, rounded up).

Before (5917d66, a `Pending` struct per entry), measured the same way: 345 / 384 B with a
16-character id, 365 / 404 B with a UUID. The entry is now one msgpack `bytes` object (~76 B)
instead of a struct (64 B) pointing at its own ts and score floats (48 B) and at the decoded
event's prediction float, variant and version strings (~130 B). The earlier version of this
benchmark built its events in Python with shared literal strings and prediction, so it reported
215 / 235 B and missed those ~130 B.

What is left is the dict: the id string (49 B + its length: 65 B, a UUID 85 B) and its slot
(24 B of entry plus indices, over a table CPython keeps 1/3 to 2/3 full: 30-60 B filling, more
once deletions have made it resize at three times the live count). Those two alone are 117-137 B
at this size, so the issue's target of 120 B per entry is out of reach for any layout that keeps
a dict keyed by the id string; it needs an open-addressing table over a 64-bit hash of the id in
numpy columns (about 50 B per entry), with the checkpoint change log and the hot loop's inlined
insert and match rewritten for it."""


def _lines(start: int, n: int, id_length: int) -> list[bytes]:
    return [msgspec.json.encode({
        "type": "prediction", "id": f"{i:0{id_length}d}", "ts": 1.7e9 + i * 0.01, "deployment": "d",
        "variant": "primary", "model_version": "3", "features": {"x": 1.0},
        "prediction": 0.5 + i * 1e-9, "score": 0.73 + i * 1e-9,
    }) for i in range(start, start + n)]


def _buffer(joiner: OutcomeJoiner, decoder: EventDecoder, lines: list[bytes]) -> None:
    for line in lines:
        ev = decoder.decode(line)
        assert type(ev) is Prediction
        joiner.add(ev)


def bytes_per_entry(id_length: int, churn: bool) -> float:
    decoder = EventDecoder()
    first = _lines(0, N, id_length)
    more = _lines(N, N, id_length) if churn else []
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    joiner = OutcomeJoiner(horizon=86400.0, max_pending=N)
    joiner.track("d")
    _buffer(joiner, decoder, first)
    _buffer(joiner, decoder, more)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(joiner) == N
    return (after - before) / N


def main() -> None:
    rows = [(length, bytes_per_entry(length, False), bytes_per_entry(length, True)) for length in (16, 36)]
    text = ["# Label join: bytes per buffered prediction", "",
            f"`python benchmarks/join_entry.py` on Python {platform.python_version()} ({sys.platform}); "
            f"{N:,} predictions decoded from JSON and buffered, tracemalloc; churning: {N:,} more "
            "through the full buffer (max_pending_labels = 200,000), each evicting the oldest.", "",
            "| id length (characters) | filling | full, churning |", "| --- | --- | --- |"]
    text += [f"| {length} (e.g. {'a UUID' if length == 36 else 'req-000000000042'}) | {a:.0f} | {b:.0f} |"
             for length, a, b in rows]
    text += ["", NOTES]
    RESULTS.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
