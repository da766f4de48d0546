"""WindowAssembler: shared panes at the gcd granularity, epoch-aligned windows, count extension.

Times are offsets from ``B0``, an hour boundary of the Unix epoch just before the fixed epoch
``T0`` (windows align to the epoch, not to the first event).
"""

from __future__ import annotations

import pytest

from rollbackd.daemon.windows import MAX_COUNT_EXTENSION, WindowAssembler
from rollbackd.detectors.base import Labeled
from rollbackd.events import Prediction
from rollbackd.rules.model import WindowSpec

T0 = 1_790_000_000.0
B0 = T0 - T0 % 3600  # 1_789_999_200.0, a multiple of every window size used here
KEY = ("fraud-scorer", "canary")
TICK = 2.0**-20  # about a microsecond, and exact at this epoch (a float's step here is 2**-22)

TUMBLING = WindowSpec(size=60, step=60)
SLIDING = WindowSpec(size=300, step=60)
HALF = WindowSpec(size=90, step=30)


def pred(t: float, i: int | str, key: tuple[str, str] = KEY, version: str = "v1") -> Prediction:
    return Prediction(id=str(i), ts=B0 + t, deployment=key[0], model_version=version, variant=key[1])


def put(wa: WindowAssembler, *offsets: float, key: tuple[str, str] = KEY) -> list[Prediction]:
    """Adds one prediction per offset, as the pipeline does: into the pane its ts falls in."""
    out = []
    for n, t in enumerate(offsets):
        p = pred(t, f"{key[1]}-{t}-{n}", key)
        wa.pane(key, wa.pane_index(p.ts)).predictions.append(p)
        out.append(p)
    return out


def offsets(window) -> list[float]:
    return [p.ts - B0 for p in window.predictions]


@pytest.mark.parametrize(
    "specs, granularity, retain",
    [
        ([TUMBLING], 60.0, 1),
        ([SLIDING], 60.0, 5),
        ([TUMBLING, SLIDING, HALF], 30.0, 10),  # gcd(60, 300, 90, 30) = 30; longest 300 s
        ([WindowSpec(1.5, 0.5)], 0.5, 3),
        ([WindowSpec(60, 60, min_count=50)], 60.0, MAX_COUNT_EXTENSION),
        ([], 60.0, 1),  # no rules: the default one-minute tumbling window
    ],
)
def test_granularity_is_the_gcd_and_retention_the_longest_reach(specs, granularity, retain):
    wa = WindowAssembler(specs)
    assert (wa.granularity, wa.retain_panes) == (granularity, retain)


def test_identical_specs_are_kept_once():
    assert WindowAssembler([TUMBLING, SLIDING, WindowSpec(60, 60)]).specs == (TUMBLING, SLIDING)


@pytest.mark.parametrize("spec", [WindowSpec(0, 60), WindowSpec(60, 0), WindowSpec(-60, -60)])
def test_a_non_positive_size_or_step_is_refused(spec):
    with pytest.raises(ValueError, match="must be > 0"):
        WindowAssembler([spec])


def test_panes_are_aligned_to_the_epoch_not_to_the_first_event():
    wa = WindowAssembler([TUMBLING])
    assert wa.pane_index(B0) == B0 // 60
    assert wa.pane_index(B0 + 60 - TICK) == B0 // 60
    assert wa.pane_index(B0 + 60) == B0 // 60 + 1
    # T0 lies 20 s into a minute, so it is no boundary of a one-minute window.
    assert wa.due_specs(T0) == []
    assert wa.due_specs(T0 - 20) == [TUMBLING]


def test_due_specs_are_those_whose_step_divides_the_boundary():
    wa = WindowAssembler([TUMBLING, SLIDING, HALF])
    assert wa.due_specs(B0 + 30) == [HALF]
    assert wa.due_specs(B0 + 60) == [TUMBLING, SLIDING, HALF]
    assert wa.due_specs(B0 + 90) == [HALF]
    assert wa.due_specs(B0 + 15) == []


def test_a_tumbling_window_is_half_open_start_in_end_out():
    wa = WindowAssembler([TUMBLING])
    put(wa, -TICK, 0.0, 30.0, 60 - TICK, 60.0)
    w = wa.window(KEY, TUMBLING, B0 + 60)
    assert (w.deployment, w.variant, w.start, w.end) == (KEY[0], KEY[1], B0, B0 + 60)
    assert offsets(w) == [0.0, 30.0, 60 - TICK]


def test_sliding_windows_share_one_copy_of_each_event():
    wa = WindowAssembler([TUMBLING, SLIDING])
    (p,) = put(wa, 130.0)
    seen_in = []
    for end in range(60, 601, 60):
        w = wa.window(KEY, SLIDING, B0 + end)
        assert w.start == B0 + end - 300
        if w.predictions:
            assert w.predictions == [p] and w.predictions[0] is p
            seen_in.append(end)
    # A 5-minute window every minute sees an event at 2:10 in the five windows ending 3:00..7:00.
    assert seen_in == [180, 240, 300, 360, 420]
    assert offsets(wa.window(KEY, TUMBLING, B0 + 180)) == [130.0]
    assert offsets(wa.window(KEY, TUMBLING, B0 + 240)) == []


def test_a_window_not_a_multiple_of_its_step_uses_finer_panes():
    wa = WindowAssembler([WindowSpec(90, 60)])  # gcd 30: panes of 30 s
    put(wa, 0.0, 29.0, 31.0, 89.0, 91.0)
    w = wa.window(KEY, WindowSpec(90, 60), B0 + 120)
    assert (w.start, offsets(w)) == (B0 + 30, [31.0, 89.0, 91.0])


def test_outcomes_are_windowed_by_their_own_pane():
    wa = WindowAssembler([TUMBLING])
    lab = Labeled(B0 - 500.0, B0 + 10.0, KEY[1], "v1", 1, 0.9, 1)
    wa.pane(KEY, wa.pane_index(lab.label_ts)).outcomes.append(lab)
    assert list(wa.window(KEY, TUMBLING, B0 + 60).outcomes) == [lab]
    assert list(wa.window(KEY, TUMBLING, B0 + 120).outcomes) == []


def test_windows_at_yields_every_due_spec_for_every_key_in_sorted_order():
    wa = WindowAssembler([TUMBLING, HALF])
    other = ("fraud-scorer", "primary")
    first = ("churn", "primary")
    put(wa, 10.0, key=other)
    put(wa, 20.0, key=KEY)
    put(wa, 40.0, key=first)
    got = [(s, w.deployment, w.variant, offsets(w)) for s, w in wa.windows_at(B0 + 60)]
    assert got == [
        (TUMBLING, "churn", "primary", [40.0]),
        (TUMBLING, "fraud-scorer", "canary", [20.0]),
        (TUMBLING, "fraud-scorer", "primary", [10.0]),
        (HALF, "churn", "primary", [40.0]),
        (HALF, "fraud-scorer", "canary", [20.0]),
        (HALF, "fraud-scorer", "primary", [10.0]),
    ]
    # churn's first event is at +40 s: it has no window ending before it existed.
    assert [(s, w.deployment, w.variant) for s, w in wa.windows_at(B0 + 30)] == [
        (HALF, "fraud-scorer", "canary"),
        (HALF, "fraud-scorer", "primary"),
    ]


COUNTED = WindowSpec(60, 60, min_count=5)


def test_a_count_window_with_enough_events_does_not_extend():
    wa = WindowAssembler([COUNTED])
    put(wa, -30.0, 1, 2, 3, 4, 5)
    w = wa.window(KEY, COUNTED, B0 + 60)
    assert (w.start, offsets(w)) == (B0, [1, 2, 3, 4, 5])


def test_a_count_window_reaches_back_pane_by_pane_until_it_has_min_count():
    wa = WindowAssembler([COUNTED])
    put(wa, -600.0)  # beyond the first pane that completes the count: not taken
    put(wa, -540.0, -539.0)  # 9 windows back
    put(wa, -200.0)  # 4 windows back
    put(wa, 10.0, 20.0)  # in the window itself
    w = wa.window(KEY, COUNTED, B0 + 60)
    assert offsets(w) == [-540.0, -539.0, -200.0, 10.0, 20.0]
    assert (w.start, w.end) == (B0 - 540, B0 + 60)  # start: the earliest pane taken


def test_a_count_window_stops_at_ten_window_sizes_even_if_short():
    wa = WindowAssembler([COUNTED])
    put(wa, -600.0)  # 10 sizes back from the end: [end - 11 min, end - 10 min): out of reach
    put(wa, -540.0)  # the oldest reachable pane: [end - 10 min, end - 9 min)
    put(wa, 10.0)
    w = wa.window(KEY, COUNTED, B0 + 60)
    assert offsets(w) == [-540.0, 10.0]
    assert w.start == B0 - 540


def test_a_count_window_with_no_events_anywhere_is_the_plain_window():
    wa = WindowAssembler([COUNTED])
    w = wa.window(KEY, COUNTED, B0 + 60)
    assert (w.start, w.end, w.n) == (B0, B0 + 60, 0)


@pytest.mark.parametrize(
    "specs",
    [[TUMBLING], [TUMBLING, SLIDING, HALF], [COUNTED, WindowSpec(120, 60)], [WindowSpec(90, 60)]],
)
def test_drop_before_forgets_nothing_a_later_window_needs(specs):
    """Two assemblers fed the same events; one drops panes after every boundary as the
    pipeline does. Every window cut from both must be identical, and the dropping one must
    hold no pane older than its retention."""
    keep, drop = WindowAssembler(specs), WindowAssembler(specs)
    g = keep.granularity
    # Sparse, uneven traffic so the count window has to reach back.
    ts = [t * 7.0 for t in range(0, 400) if t % 11 in (0, 3, 4)] + [2400.0 + t for t in range(0, 30)]
    step = 0
    for boundary in [g * k for k in range(1, int(3000 / g) + 1)]:
        while step < len(ts) and ts[step] < boundary:
            put(keep, ts[step])
            put(drop, ts[step])
            step += 1
        for spec in drop.due_specs(B0 + boundary):
            a = keep.window(KEY, spec, B0 + boundary)
            b = drop.window(KEY, spec, B0 + boundary)
            assert (a.start, offsets(a)) == (b.start, offsets(b)), (spec, boundary)
        drop.drop_before(B0 + boundary)
        held = drop.panes.get(KEY, {})
        end_idx = round((B0 + boundary) / g)
        assert all(i > end_idx - drop.retain_panes for i in held), boundary
    assert step == len(ts)
    assert len(drop.panes[KEY]) <= drop.retain_panes < len(keep.panes[KEY])


def test_earliest_pane_end_skips_emptied_keys():
    wa = WindowAssembler([TUMBLING])
    assert wa.earliest_pane_end() is None
    put(wa, 130.0, key=KEY)
    put(wa, 250.0, key=("churn", "primary"))
    assert wa.earliest_pane_end() == B0 + 180
    wa.drop_before(B0 + 180)
    assert wa.earliest_pane_end() == B0 + 300
    wa.drop_before(B0 + 300)
    assert wa.earliest_pane_end() is None
    assert wa.keys() == [("churn", "primary"), KEY]  # keys stay known (their windows go empty)


def _through_a_snapshot(value):
    import msgspec

    from rollbackd.daemon.snapshot import from_plain, to_plain

    return from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(to_plain(value))))


def test_a_pane_is_written_as_columns_and_comes_back_exactly_as_it_was():
    from rollbackd.daemon.windows import Pane, pane_columns, pane_from_columns
    from rollbackd.events import Deploy

    preds = [
        Prediction(id="a", ts=T0, deployment="d", model_version="v1", features={"x": 1.5, "c": "red", "n": None},
                   prediction=1.0, score=0.25, latency_ms=12.0, attrs={"region": "eu"}),
        Prediction(id="b", ts=T0 + 1, deployment="d", model_version="v1", variant="canary", error="timeout"),
        # made in code, not decoded: need not meet the contract (score > 1), comes back as it was
        Prediction(id="c", ts=T0 + 2, deployment="d", model_version="v1", prediction=7, score=1.5),
    ]
    pane = Pane(preds, [Labeled(T0, T0 + 5, "primary", "v1", 1.0, 0.25, 1.0)],
                [Deploy(ts=T0, deployment="d", model_version="v2", traffic=0.1)])
    blob = pane_columns(pane)
    assert isinstance(blob, bytes) and pane_from_columns(blob) == pane
    back = _through_a_snapshot(pane)
    assert back == pane
    assert type(back.predictions[2].prediction) is int and back.predictions[2].score == 1.5
    assert _through_a_snapshot(Pane()) == Pane()


def test_a_pane_msgpack_cannot_hold_is_written_field_by_field():
    from rollbackd.daemon.windows import Pane, pane_columns

    big = Prediction(id="big", ts=T0, deployment="d", model_version="v1", prediction=2**70)
    pane = Pane([big])
    assert pane_columns(pane) is None
    assert _through_a_snapshot(pane) == pane
