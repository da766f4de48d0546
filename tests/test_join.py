"""OutcomeJoiner: outcomes joined to predictions within a horizon, memory bounded two ways."""

from __future__ import annotations

import time

import pytest

from rollbackd.daemon.join import OutcomeJoiner, unpack
from rollbackd.detectors.base import Labeled
from rollbackd.events import Outcome, Prediction

T0 = 1_790_000_000.0
H = 3600.0


def pred(i: str, t: float, dep: str = "fraud", variant: str = "primary", version: str = "v1") -> Prediction:
    return Prediction(
        id=i, ts=T0 + t, deployment=dep, model_version=version, variant=variant,
        prediction=1, score=0.75,
    )


def out(i: str, t: float, dep: str = "fraud", label: object = 0) -> Outcome:
    return Outcome(id=i, ts=T0 + t, deployment=dep, label=label)  # type: ignore[arg-type]


def joiner(**kw) -> OutcomeJoiner:
    j = OutcomeJoiner(**{"horizon": H, **kw})
    j.track("fraud")
    return j


def stats(j: OutcomeJoiner) -> dict[str, int]:
    return {k: v for k, v in j.stats.to_record().items() if v}


@pytest.mark.parametrize("kw, msg", [({"horizon": 0}, "horizon"), ({"max_pending": 0}, "max_pending")])
def test_bad_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        OutcomeJoiner(**kw)


def test_an_outcome_joins_its_prediction_once():
    j = joiner()
    j.add(pred("a", 0, variant="canary", version="v2"))
    assert len(j) == 1
    lab = j.match(out("a", 120, label=1))
    assert lab == Labeled(T0, T0 + 120, "canary", "v2", 1, 0.75, 1)
    assert len(j) == 0
    assert j.match(out("a", 130)) is None  # the second label for the same id finds nothing
    assert stats(j) == {"joined": 1, "unmatched_outcomes": 1}


def test_only_tracked_deployments_are_buffered():
    j = joiner()
    assert j.wants("fraud") and not j.wants("churn")
    j.add(pred("a", 0, dep="churn"))
    assert len(j) == 0
    assert j.match(out("a", 1, dep="churn")) is None
    # Counted apart from unmatched: no rule needs these labels, so none are missing.
    assert stats(j) == {"not_needed": 1}


def test_ids_are_scoped_per_deployment():
    j = joiner()
    j.track("churn")
    j.add(pred("a", 0, dep="fraud", version="f1"))
    j.add(pred("a", 1, dep="churn", version="c1"))
    assert j.match(out("a", 5, dep="churn")).model_version == "c1"
    assert j.match(out("a", 6, dep="fraud")).model_version == "f1"


def test_the_horizon_is_inclusive_for_a_late_label():
    j = joiner()
    j.add(pred("on-time", 0))
    j.add(pred("late", 0))
    assert j.match(out("on-time", H)) is not None
    assert j.match(out("late", H + 0.5)) is None  # found, but beyond the horizon
    assert len(j) == 0  # the expired prediction is gone too
    assert stats(j) == {"joined": 1, "expired_outcomes": 1}


def test_expire_evicts_exactly_the_predictions_older_than_the_horizon():
    j = joiner()
    for i, t in enumerate([0, 10, 20, 30]):
        j.add(pred(f"p{i}", t))
    j.expire(T0 + H + 10)  # cutoff T0 + 10: p0 goes, p1 (exactly at the cutoff) stays
    assert (len(j), stats(j)) == (3, {"never_labeled": 1})
    assert j.match(out("p0", H + 11)) is None
    assert j.match(out("p1", H + 10)).pred_ts == T0 + 10
    j.expire(T0 + H + 1000)
    assert len(j) == 0
    assert stats(j) == {"never_labeled": 3, "unmatched_outcomes": 1, "joined": 1}


def test_a_prediction_that_arrived_out_of_order_still_cannot_join_past_the_horizon():
    j = joiner()
    j.add(pred("newer", 100))
    j.add(pred("older", 0))  # arrived late: behind a newer one in the buffer
    j.expire(T0 + H + 50)  # cutoff T0 + 50: "newer" blocks the front, "older" survives the sweep
    assert len(j) == 2
    assert j.match(out("older", H + 60)) is None
    assert stats(j) == {"expired_outcomes": 1}


def test_capacity_evicts_the_oldest_prediction_across_deployments():
    j = joiner(max_pending=3)
    j.track("churn")
    j.add(pred("f0", 10, dep="fraud"))
    j.add(pred("c0", 5, dep="churn"))
    j.add(pred("f1", 20, dep="fraud"))
    j.add(pred("c1", 30, dep="churn"))  # over capacity: c0 (t=5) is the oldest
    assert (len(j), stats(j)) == (3, {"evicted_capacity": 1})
    assert j.match(out("c0", 40, dep="churn")) is None
    j.add(pred("f2", 40, dep="fraud"))  # f0 (t=10) next
    assert j.match(out("f0", 41)) is None
    for i, d in [("f1", "fraud"), ("c1", "churn"), ("f2", "fraud")]:
        assert j.match(out(i, 50, dep=d)) is not None, i
    assert stats(j) == {"evicted_capacity": 2, "unmatched_outcomes": 2, "joined": 3}


def test_predictions_put_in_bulk_are_evicted_oldest_first_down_to_capacity():
    """The pipeline's hot loop writes into pending_books() and reports the count with added()."""
    j = joiner(max_pending=4)
    j.track("churn")
    books = j.pending_books()
    for t in [0, 2, 4, 6]:
        books["fraud"][f"f{t}"] = (T0 + t, "primary", "v1", None, None)
    for t in [1, 3, 5]:
        books["churn"][f"c{t}"] = (T0 + t, "primary", "v1", None, None)
    j.added(7)
    assert len(j) == 4
    assert (sorted(books["fraud"]), sorted(books["churn"])) == (["f4", "f6"], ["c3", "c5"])
    assert stats(j) == {"evicted_capacity": 3}


def test_capacity_ties_go_to_the_deployment_tracked_first():
    j = joiner(max_pending=2)
    j.track("churn")
    j.add(pred("c", 0, dep="churn"))
    j.add(pred("f", 0, dep="fraud"))
    j.add(pred("g", 1, dep="fraud"))
    assert sorted(j.pending_books()["fraud"]) == ["g"]
    assert sorted(j.pending_books()["churn"]) == ["c"]


def test_a_duplicate_prediction_keeps_the_first():
    j = joiner()
    j.add(pred("a", 0, version="v1"))
    j.add(pred("a", 5, version="v2"))
    assert len(j) == 1
    assert j.match(out("a", 10)).model_version == "v1"
    assert stats(j) == {"duplicate_predictions": 1, "joined": 1}


def test_stats_record_names_every_counter():
    assert list(OutcomeJoiner().stats.to_record()) == [
        "joined", "unmatched_outcomes", "not_needed", "expired_outcomes", "never_labeled",
        "evicted_capacity", "duplicate_predictions",
    ]


def _churn(j: OutcomeJoiner, n: int, batch: int) -> None:
    """n predictions into the buffer the way the pipeline's hot loop does it."""
    book = j.pending_books()["fraud"]
    for start in range(0, n, batch):
        for i in range(start, start + batch):
            book[str(i)] = (T0 + i, "primary", "v1", None, None)
        j.added(batch)


@pytest.mark.parametrize("batch", [1000, 1])
def test_a_full_buffer_evicts_in_constant_time_per_prediction(batch):
    """Evicting from the front of a plain dict skips every slot already deleted there, so a
    full buffer slowed down as it churned: at the default 2M capacity, to a few thousand
    evictions a second. Here 300k predictions go through a 100k buffer (in batches, and one
    at a time as the pipeline does once the cap binds), then a sweep halves it: ~0.4 s now,
    4-10 s with the rescans. CPU time, not wall time: a busy machine delays the test without
    making it do more work."""
    j = joiner(max_pending=100_000)
    started = time.process_time()
    _churn(j, 300_000, batch)
    j.expire(T0 + H + 250_000)  # cutoff T0 + 250 000: half of the 100k still held
    cpu = time.process_time() - started
    assert (len(j), j.stats.evicted_capacity, j.stats.never_labeled) == (50_000, 200_000, 50_000)
    assert next(iter(j.pending_books()["fraud"])) == "250000"  # the oldest left: first after the cutoff
    assert cpu < 2.5, f"{cpu:.2f} CPU-s"  # ~0.4-0.6 s without rescans, >= 4 s with them


def test_a_snapshot_of_the_books_restores_every_entry_in_order():
    j = joiner()
    j.track("churn")
    values = [0.25, 7, "spam", [1, 2.5], {"class": "a", "p": [0.1, 0.9]}, None, True]
    for k, v in enumerate(values):
        p = pred(f"p{k}", float(k), dep="fraud" if k % 2 else "churn")
        j.add(Prediction(id=p.id, ts=p.ts, deployment=p.deployment, model_version="v1", prediction=v,
                         score=None if k == 3 else 0.5))
    # an entry in the tuple form of books written before Pending (old checkpoints)
    j.pending_books()["fraud"]["old"] = (T0 + 10.0, "canary", "v0", 1, 0.9)
    j.added(1)
    blob = j.books_snapshot()
    assert isinstance(blob, bytes)
    k = OutcomeJoiner(horizon=H)
    k.restore_books(blob)
    assert {d: list(b) for d, b in k.pending_books().items()} == {d: list(b) for d, b in j.pending_books().items()}
    assert unpack(k.pending_books()["fraud"]["p3"]).prediction == [1, 2.5]
    assert unpack(k.pending_books()["churn"]["p4"]).prediction == {"class": "a", "p": [0.1, 0.9]}
    k._size = len(j)
    labeled = k.match(out("old", 20.0))
    assert labeled is not None and (labeled.variant, labeled.model_version, labeled.score) == ("canary", "v0", 0.9)
    got = k.match(out("p5", 30.0))
    assert got is not None and got.prediction is None and got.pred_ts == T0 + 5.0
    # eviction after a restore still goes oldest first, across deployments
    k.max_pending = 2
    k.added(0)
    assert sorted(i for b in k.pending_books().values() for i in b) == ["p4", "p6"]


def _labelled_pipeline():
    """A pipeline whose one rule needs labels, so the deployment's predictions are buffered."""
    from rollbackd.daemon.replay import build_pipeline
    from rollbackd.rules.loader import load_config_text

    cfg = load_config_text("""
version: 1
settings: {notifier: {type: none}}
rules:
  - {name: model-errors, detector: model_error, threshold: 0.2, severity: warning, actions: [notify]}
""")
    return build_pipeline(cfg)


def test_books_msgpack_cannot_hold_stay_as_they_are_and_round_trip_through_the_snapshot():
    a = _labelled_pipeline()
    big = Prediction(id="big", ts=T0, deployment="demo", model_version="v1", prediction=2**70, score=0.5)
    a.ingest([big, pred("small", 1.0, dep="demo")])
    a.finish()  # fewer events than the warm-up holds: the end of the stream lets them in
    assert len(a.joiner) == 2
    assert isinstance(a.joiner.books_snapshot(), dict)  # 2**70 does not fit msgpack
    b = _labelled_pipeline()
    b.restore(a.snapshot())
    assert list(b.joiner.pending_books()["demo"]) == ["big", "small"]
    assert unpack(b.joiner.pending_books()["demo"]["big"]).prediction == 2**70
