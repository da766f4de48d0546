"""Tests of the synthetic traffic generator (rollbackd.scenarios)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import random
from collections import Counter, defaultdict

import msgspec
import numpy as np
import pytest

from rollbackd.events import Deploy, EventDecoder, Outcome, Prediction, Rejected
from rollbackd.scenarios import (
    BUILTIN,
    Fault,
    RecordingStats,
    Scenario,
    benchmark_scenario,
    generate,
    iter_chunks,
    scenario_truth,
    write_recording,
)

SMALL = Scenario(name="small", duration=600.0, rate=20.0, seed=11)

CANARY = Scenario(
    name="canary",
    duration=900.0,
    rate=15.0,
    deployments=("fraud", "churn"),
    variants=(("stable", 0.7), ("canary", 0.3)),
    versions=((0.0, "1"), (200.0, "2", "canary")),
    faults=(Fault("error_rate", start=300.0, end=600.0, magnitude=0.3, version="2"),),
    seed=5,
)


def decode_all(lines: list[bytes]) -> list:
    dec = EventDecoder()
    return [dec.decode(line) for line in lines]


@functools.lru_cache(maxsize=32)
def events_of(s: Scenario, jitter: float = 0.0) -> tuple:
    """The decoded events of a scenario without malformed lines (cached: do not mutate)."""
    evs = tuple(decode_all(list(generate(s, jitter=jitter))))
    assert not any(isinstance(e, Rejected) for e in evs)
    return evs


# --- determinism -------------------------------------------------------------------------------


def test_same_scenario_gives_identical_bytes():
    a = list(generate(CANARY, jitter=1.0))
    b = list(generate(CANARY, jitter=1.0))
    assert a == b
    assert len(a) > 10_000


def test_different_seed_differs():
    a = list(generate(SMALL))
    b = list(generate(dataclasses.replace(SMALL, seed=12)))
    assert a != b
    # and the difference is not a detail: most prediction lines differ
    assert len(set(a) & set(b)) < len(a) // 10


def test_global_random_state_is_not_used():
    np.random.seed(1)
    random.seed(1)
    a = list(generate(SMALL))
    np.random.seed(2)
    random.seed(2)
    np.random.random(10)
    b = list(generate(SMALL))
    assert a == b


def test_lines_are_compact_json_without_newline():
    for line in list(generate(SMALL))[:200]:
        assert isinstance(line, bytes)
        assert b"\n" not in line
        assert line.startswith(b'{"type":"')


def test_faults_change_only_their_effects():
    """Same seed with and without a fault: identical outside the fault's interval."""
    base = Scenario(name="b", duration=600.0, rate=20.0, seed=3)
    faulty = dataclasses.replace(
        base, faults=(Fault("latency", start=200.0, end=300.0, magnitude=4.0),)
    )
    a, b = events_of(base), events_of(faulty)
    assert len(a) == len(b)
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    assert changed
    for x, y in changed:
        assert isinstance(x, Prediction)
        assert 200.0 <= x.ts - base.start < 300.0 + 1e-3
        assert y.latency_ms == pytest.approx(x.latency_ms * 4.0, abs=0.03)
        assert msgspec.structs.replace(y, latency_ms=x.latency_ms) == x


# --- contract ----------------------------------------------------------------------------------


def test_every_line_decodes_and_follows_the_types():
    evs = events_of(CANARY, jitter=1.5)
    kinds = Counter(type(e) for e in evs)
    assert kinds[Prediction] > 20_000 and kinds[Outcome] > 8_000
    assert kinds[Deploy] == 2 * 2 + 2  # v1 on both variants + v2 on canary, per deployment
    for e in evs:
        if isinstance(e, Prediction):
            assert e.ts == round(e.ts, 3)
            assert e.variant in ("stable", "canary")
            assert set(e.features) == {"num_0", "num_1", "num_2", "cat_0"}
            assert isinstance(e.features["cat_0"], str)
            assert e.latency_ms >= 0
            if e.error is None:
                assert 0.0 <= e.score <= 1.0
                assert e.prediction == float(e.score >= 0.5)
            else:
                assert e.error in ("TIMEOUT", "UPSTREAM_5XX", "INTERNAL")
                assert e.prediction is None and e.score is None
        elif isinstance(e, Outcome):
            assert e.label in (0.0, 1.0)


def test_ids_unique_per_deployment():
    seen = defaultdict(set)
    for e in events_of(CANARY):
        if isinstance(e, Prediction):
            assert e.id not in seen[e.deployment]
            assert e.id.startswith(e.deployment + "-")
            seen[e.deployment].add(e.id)
    assert set(seen) == {"fraud", "churn"}


# --- malformed lines ---------------------------------------------------------------------------


def test_malformed_lines_are_added_and_all_rejected():
    clean = list(generate(CANARY, jitter=1.0))
    s = dataclasses.replace(CANARY, malformed_fraction=0.03)
    dirty = list(generate(s, jitter=1.0))
    # The valid lines are exactly the clean output; the rest are insertions.
    valid, bad = [], []
    i = 0
    for line in dirty:
        if i < len(clean) and line == clean[i]:
            valid.append(line)
            i += 1
        else:
            bad.append(line)
    assert valid == clean
    assert not any(isinstance(e, Rejected) for e in decode_all(valid))
    rejected = decode_all(bad)
    assert all(isinstance(r, Rejected) for r in rejected)
    reasons = Counter(r.reason for r in rejected)
    assert {"invalid_json", "missing_field", "wrong_type", "unknown_type", "out_of_range"} <= set(
        reasons
    )
    # naive timestamps are among the wrong_type rejections
    assert any(r.reason == "wrong_type" and "timezone" in r.detail for r in rejected)
    # roughly the asked share of all lines
    assert len(bad) / len(dirty) == pytest.approx(0.03, abs=0.004)


def test_malformed_fraction_exact_count_for_seed(tmp_path):
    s = dataclasses.replace(SMALL, malformed_fraction=0.02)
    stats = write_recording(s, tmp_path / "m.jsonl")
    assert stats.malformed == sum(isinstance(r, Rejected) for r in decode_all(list(generate(s))))
    assert stats.lines == stats.predictions + stats.outcomes + stats.deploys + stats.malformed
    assert stats.malformed / stats.lines == pytest.approx(0.02, abs=0.005)
    # pinned: the generator is deterministic, this is the count for this seed
    assert stats == write_recording(s, tmp_path / "m2.jsonl")
    assert stats.malformed == 313


def test_builtin_malformed_is_stationary_plus_bad_lines():
    s = BUILTIN["malformed"]
    assert s.malformed_fraction == 0.02
    clean = dataclasses.replace(s, malformed_fraction=0.0, name="stationary")
    assert clean == BUILTIN["stationary"]


# --- ordering, outcomes, labels ----------------------------------------------------------------


def test_event_time_order_without_jitter():
    ts = [e.ts for e in events_of(CANARY)]
    assert all(a <= b for a, b in zip(ts, ts[1:]))


def test_event_time_order_within_jitter():
    jitter = 2.0
    evs = events_of(CANARY, jitter=jitter)
    hi = -np.inf
    disordered = 0
    for e in evs:
        assert e.ts > hi - jitter
        disordered += e.ts < hi
        hi = max(hi, e.ts)
    assert disordered > 100  # jitter does reorder
    # jitter reorders but never changes an event
    assert sorted(msgspec.json.encode(e) for e in evs) == sorted(
        msgspec.json.encode(e) for e in events_of(CANARY)
    )


@pytest.mark.parametrize("jitter", [0.0, 2.0])
def test_outcomes_follow_their_predictions(jitter):
    s = CANARY
    preds: dict[tuple[str, str], Prediction] = {}
    delays, pred_ts = [], []
    n_out = 0
    for e in events_of(s, jitter=jitter):
        if isinstance(e, Prediction):
            preds[(e.deployment, e.id)] = e
        elif isinstance(e, Outcome):
            p = preds.get((e.deployment, e.id))
            assert p is not None, "outcome before (or without) its prediction"
            assert p.error is None
            delays.append(e.ts - p.ts)
            pred_ts.append(p.ts)
            assert e.ts < s.end
            n_out += 1
    lo, hi = s.label_delay
    assert min(delays) >= lo - 1e-3 and max(delays) <= hi + 1e-3
    assert min(delays) < lo + 5 and max(delays) > hi - 5
    # the window cuts long delays of late predictions: look at early ones for the mean
    early = [d for d, t in zip(delays, pred_ts) if t < s.end - hi]
    assert np.mean(early) == pytest.approx((lo + hi) / 2, abs=5.0)
    assert n_out > 8_000


def test_label_fraction():
    s = dataclasses.replace(SMALL, duration=1200.0, label_fraction=0.3)
    evs = events_of(s)
    labelled = {e.id for e in evs if isinstance(e, Outcome)}
    # predictions early enough that every delay fits in the window
    early = [
        e
        for e in evs
        if isinstance(e, Prediction) and e.error is None and e.ts < s.end - s.label_delay[1]
    ]
    frac = sum(e.id in labelled for e in early) / len(early)
    assert frac == pytest.approx(0.3, abs=0.02)
    # late predictions lose outcomes to the end of the window, errored ones never have any
    errored = [e for e in evs if isinstance(e, Prediction) and e.error is not None]
    assert errored and not any(e.id in labelled for e in errored)


def test_labels_are_calibrated_and_model_error_flips_them():
    s = dataclasses.replace(SMALL, duration=900.0, label_fraction=1.0, label_delay=(1.0, 2.0))

    def stats(scn):
        evs = events_of(scn)
        score = {e.id: e.score for e in evs if isinstance(e, Prediction) and e.error is None}
        pairs = [(score[e.id], e.label) for e in evs if isinstance(e, Outcome)]
        sc, y = np.array(pairs).T
        return sc.mean(), y.mean(), ((sc >= 0.5) == y).mean()

    ms, my, acc = stats(s)
    assert my == pytest.approx(ms, abs=0.02)  # calibrated
    ms2, my2, acc2 = stats(
        dataclasses.replace(s, faults=(Fault("model_error", start=0.0, magnitude=0.3),))
    )
    assert ms2 == ms
    assert acc2 == pytest.approx(acc * 0.7 + (1 - acc) * 0.3, abs=0.02)
    ms3, my3, _ = stats(
        dataclasses.replace(s, faults=(Fault("score_shift", start=0.0, magnitude=1.5),))
    )
    assert my3 == my and ms3 > ms + 0.08  # scores inflated, labels unchanged: miscalibrated


# --- faults ------------------------------------------------------------------------------------


def test_error_fault_only_in_its_interval_and_version():
    s = CANARY
    counts = defaultdict(lambda: [0, 0])
    for e in events_of(s):
        if not isinstance(e, Prediction):
            continue
        t = e.ts - s.start
        phase = "before" if t < 300 else ("during" if t < 600 else "after")
        c = counts[(e.model_version, e.variant, phase)]
        c[0] += e.error is not None
        c[1] += 1
    rate = {k: err / n for k, (err, n) in counts.items()}
    # version 2 only serves the canary, from 200 s on; the canary had no traffic before
    assert {k[:2] for k in counts} == {("1", "stable"), ("1", "canary"), ("2", "canary")}
    assert counts[("1", "canary", "during")][1] == 0  # replaced by version 2 at 200 s
    assert rate[("2", "canary", "during")] == pytest.approx(0.3, abs=0.03)
    for k in [("2", "canary", "before"), ("2", "canary", "after"), ("1", "stable", "during"),
              ("1", "canary", "before")]:
        assert rate[k] < 0.02, k


def test_error_blip_builtin():
    s = BUILTIN["error_blip"]
    assert len(s.versions) == 1 and s.faults[0].magnitude == 0.3
    f = s.faults[0]
    assert f.end - f.start == 60.0
    n = Counter()
    for e in events_of(dataclasses.replace(s, duration=1100.0)):
        if isinstance(e, Prediction):
            inside = f.start <= e.ts - s.start < f.end
            n[(inside, e.error is not None)] += 1
    assert n[(True, True)] / (n[(True, True)] + n[(True, False)]) == pytest.approx(0.3, abs=0.05)
    assert n[(False, True)] / (n[(False, True)] + n[(False, False)]) < 0.01


def test_sustained_errors_and_demo_builtins():
    for name, after, magnitude in (("sustained_errors", 900.0, 0.2), ("demo", 1200.0, 0.15)):
        s = BUILTIN[name]
        evs = events_of(s)
        deploys = [e for e in evs if isinstance(e, Deploy)]
        assert [(d.model_version, d.ts - s.start) for d in deploys] == [("1", 0.0), ("2", after)]
        by_version = defaultdict(list)
        for e in evs:
            if isinstance(e, Prediction):
                assert e.model_version == ("1" if e.ts - s.start < after else "2")
                by_version[e.model_version].append(e)
        err = {v: np.mean([e.error is not None for e in ps]) for v, ps in by_version.items()}
        assert err["1"] < 0.012
        assert err["2"] == pytest.approx(magnitude, abs=0.03)
    demo = BUILTIN["demo"]
    assert demo.rate == 10.0 and 30 * 60 <= demo.duration <= 40 * 60
    lat = defaultdict(list)
    for e in events_of(demo):
        if isinstance(e, Prediction):
            lat[e.model_version].append(e.latency_ms)
    assert np.median(lat["2"]) > 2 * np.median(lat["1"])


def test_feature_shift_moves_the_mean_by_magnitude_sd():
    s = dataclasses.replace(
        SMALL,
        duration=1200.0,
        faults=(Fault("feature_shift", start=600.0, magnitude=1.5, feature="num_0"),),
    )
    before, after = defaultdict(list), defaultdict(list)
    for e in events_of(s):
        if isinstance(e, Prediction):
            into = before if e.ts - s.start < 600 else after
            for k, v in e.features.items():
                into[k].append(v)
    m0, sd0 = np.mean(before["num_0"]), np.std(before["num_0"])
    assert (np.mean(after["num_0"]) - m0) / sd0 == pytest.approx(1.5, abs=0.1)
    assert np.std(after["num_0"]) == pytest.approx(sd0, rel=0.1)
    for k in ("num_1", "num_2"):
        assert abs(np.mean(after[k]) - np.mean(before[k])) / np.std(before[k]) < 0.1
    assert Counter(before["cat_0"])["US"] / len(before["cat_0"]) == pytest.approx(0.4, abs=0.03)


def test_categorical_feature_shift():
    s = dataclasses.replace(
        SMALL, faults=(Fault("feature_shift", start=300.0, magnitude=1.0, feature="cat_0"),)
    )
    shares = {True: Counter(), False: Counter()}
    for e in events_of(s):
        if isinstance(e, Prediction):
            shares[e.ts - s.start >= 300][e.features["cat_0"]] += 1
    us_before = shares[False]["US"] / sum(shares[False].values())
    us_after = shares[True]["US"] / sum(shares[True].values())
    assert us_before == pytest.approx(0.40, abs=0.03)
    assert us_after == pytest.approx(0.10, abs=0.03)  # the reversed distribution


def test_builtin_feature_shift():
    s = BUILTIN["feature_shift"]
    f = s.faults[0]
    got = (f.kind, f.feature, f.magnitude, f.start, f.end)
    assert got == ("feature_shift", "num_0", 1.5, 900.0, None)
    assert len(s.versions) == 1


# --- deploys, truth, recordings ----------------------------------------------------------------


def test_deploy_events_at_version_offsets():
    evs = events_of(CANARY)
    deploys = [e for e in evs if isinstance(e, Deploy)]
    got = sorted(
        (d.deployment, d.variant, d.model_version, d.ts - CANARY.start, d.traffic) for d in deploys
    )
    want = sorted(
        [(dep, "stable", "1", 0.0, 0.7) for dep in CANARY.deployments]
        + [(dep, "canary", "1", 0.0, 0.3) for dep in CANARY.deployments]
        + [(dep, "canary", "2", 200.0, 0.3) for dep in CANARY.deployments]
    )
    assert got == want
    assert all(len(d.attrs["git_sha"]) == 7 for d in deploys)
    assert isinstance(evs[0], Deploy)
    # a deploy event precedes all traffic of its version, even with jitter
    seen = set()
    for e in events_of(CANARY, jitter=2.0):
        if isinstance(e, Deploy):
            seen.add((e.deployment, e.variant, e.model_version))
        elif isinstance(e, Prediction):
            assert (e.deployment, e.variant, e.model_version) in seen


def test_scenario_truth():
    truth = scenario_truth(CANARY)
    assert len(truth) == 1
    t = truth[0]
    assert t["kind"] == "error_rate" and t["version"] == "2"
    assert t["start"] == CANARY.start + 300.0 and t["end"] == CANARY.start + 600.0
    # a fault declared before its version serves is effective from the deploy on
    s = dataclasses.replace(
        CANARY,
        faults=(
            Fault("latency", start=100.0, version="2"),
            Fault("latency", start=100.0, version="1"),
        ),
    )
    t2, t1 = scenario_truth(s)
    assert t2["declared_start"] == s.start + 100.0 and t2["start"] == s.start + 200.0
    assert t2["end"] == s.end and t1["start"] == s.start + 100.0
    assert scenario_truth(BUILTIN["stationary"]) == []
    msgspec.json.encode(scenario_truth(BUILTIN["demo"]))  # JSON-serialisable


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_write_recording(tmp_path, suffix):
    s = dataclasses.replace(SMALL, malformed_fraction=0.01)
    path = tmp_path / f"rec{suffix}"
    stats = write_recording(s, path)
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    assert lines == list(generate(s))
    assert isinstance(stats, RecordingStats)
    evs = decode_all(lines)
    assert stats.predictions == sum(isinstance(e, Prediction) for e in evs)
    assert stats.outcomes == sum(isinstance(e, Outcome) for e in evs)
    assert stats.deploys == sum(isinstance(e, Deploy) for e in evs) == 1
    assert stats.malformed == sum(isinstance(e, Rejected) for e in evs) > 0
    assert stats.lines == len(lines)
    if suffix.endswith(".gz"):
        # byte-identical file (no name or mtime in the gzip header)
        path2 = tmp_path / "again.jsonl.gz"
        write_recording(s, path2)
        assert path.read_bytes() == path2.read_bytes()


def test_iter_chunks_counts():
    total = RecordingStats()
    lines = []
    for chunk, st in iter_chunks(CANARY):
        lines.extend(chunk)
        pairs = zip(dataclasses.astuple(total), dataclasses.astuple(st))
        total = RecordingStats(*(a + b for a, b in pairs))
    assert lines == list(generate(CANARY))
    assert total.lines == len(lines)


# --- builtins, benchmark, validation -----------------------------------------------------------


def test_builtin_scenarios():
    assert set(BUILTIN) == {
        "stationary", "error_blip", "sustained_errors", "feature_shift", "malformed", "demo",
        "calibration_decay", "bad_canary", "label_delay", "traffic_stop",
        # issue 14 (tests/test_scenarios_issue14.py)
        "recall_collapse", "bad_rolling_update", "healthy_rolling_update", "daily_cycle",
        "daily_cycle_shift", "one_region_fault",
    }
    for name, s in BUILTIN.items():
        assert s.name == name
    assert len(BUILTIN["stationary"].faults) == 0


def test_benchmark_scenario_size():
    n = 50_000
    s = benchmark_scenario(n)
    assert len(s.deployments) == 2 and s.n_numeric == 8 and s.n_categorical == 2
    assert s.label_fraction == 0.6 and s.faults == ()
    count = Counter()
    for chunk, st in iter_chunks(s):
        count["events"] += st.predictions + st.outcomes
    assert count["events"] == pytest.approx(n, rel=0.02)
    first = next(iter(generate(s)))
    assert first.startswith(b'{"type":"deploy"')
    head = decode_all(list(generate(dataclasses.replace(s, duration=5.0))))
    pred = next(e for e in head if isinstance(e, Prediction))
    assert len(pred.features) == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rate=0.0),
        dict(duration=-1.0),
        dict(variants=()),
        dict(variants=(("a", 1.0), ("a", 1.0))),
        dict(versions=((10.0, "1"), (0.0, "2"))),
        dict(versions=((0.0, "1", "nope"),)),
        dict(label_fraction=1.5),
        dict(label_delay=(10.0, 5.0)),
        dict(malformed_fraction=0.6),
        dict(faults=(Fault("feature_shift", start=0.0, feature="num_9"),)),
        dict(faults=(Fault("error_rate", start=0.0, version="7"),)),
        dict(faults=(Fault("error_rate", start=0.0, deployment="other"),)),
    ],
)
def test_invalid_scenarios(kwargs):
    with pytest.raises(ValueError):
        Scenario(name="bad", **kwargs)


def test_invalid_faults_and_jitter():
    with pytest.raises(ValueError):
        Fault("error_rate", start=0.0, magnitude=1.5)
    with pytest.raises(ValueError):
        Fault("boom", start=0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Fault("latency", start=10.0, end=5.0)
    with pytest.raises(ValueError):
        Fault("latency", start=0.0, feature="num_0")
    assert Fault("latency", start=0.0).magnitude == 3.0
    with pytest.raises(ValueError):
        list(generate(SMALL, jitter=3.0))


def test_variant_without_version_has_no_traffic_and_deployment_filter():
    s = Scenario(
        name="late-canary",
        duration=600.0,
        rate=20.0,
        deployments=("a", "b"),
        variants=(("stable", 0.5), ("canary", 0.5)),
        versions=((0.0, "1", "stable"), (300.0, "2", "canary")),
        faults=(Fault("error_rate", start=0.0, magnitude=0.5, deployment="b"),),
        seed=9,
    )
    evs = events_of(s)
    deploys = sorted(
        (e.deployment, e.variant, e.model_version, e.ts - s.start)
        for e in evs
        if isinstance(e, Deploy)
    )
    assert deploys == [
        ("a", "canary", "2", 300.0),
        ("a", "stable", "1", 0.0),
        ("b", "canary", "2", 300.0),
        ("b", "stable", "1", 0.0),
    ]
    preds = [e for e in evs if isinstance(e, Prediction)]
    assert all(e.ts - s.start >= 300.0 for e in preds if e.variant == "canary")
    assert all(e.model_version == ("1" if e.variant == "stable" else "2") for e in preds)
    err = {d: np.mean([e.error is not None for e in preds if e.deployment == d]) for d in "ab"}
    assert err["a"] < 0.015 and err["b"] == pytest.approx(0.5, abs=0.03)


def test_traffic_stop_removes_requests_only_inside_the_stop():
    from rollbackd.events import EventDecoder, Prediction

    s = BUILTIN["traffic_stop"]
    base = dataclasses.replace(s, faults=())
    dec = EventDecoder()

    def preds(sc):
        return [e for e in map(dec.decode, generate(sc)) if type(e) is Prediction]

    stopped, full = preds(s), preds(base)
    start, end = s.start + 900, s.start + 1320
    assert not [p for p in stopped if start <= p.ts < end]
    outside = [p for p in full if not start <= p.ts < end]
    assert [(p.id, p.ts, p.score) for p in stopped] == [(p.id, p.ts, p.score) for p in outside]


@pytest.mark.parametrize("name", ["calibration_decay", "bad_canary", "label_delay", "traffic_stop"])
def test_the_drill_scenarios_decode_cleanly(name):
    from rollbackd.events import EventDecoder, Rejected

    dec = EventDecoder()
    lines = list(generate(BUILTIN[name]))
    assert lines and not any(isinstance(dec.decode(x), Rejected) for x in lines)
    assert scenario_truth(BUILTIN[name])
