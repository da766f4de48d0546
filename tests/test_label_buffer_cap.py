"""When ``max_pending_labels`` binds: predictions go out oldest first at the insert that went over
the cap (so what is labelled does not depend on the batch size), those that could still have been
labelled are counted per deployment, and each binding episode raises one notice naming the
deployments that fill the buffer."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.http import MetricsCollector, OpsServer
from rollbackd.daemon.join import CapBinding, OutcomeJoiner
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.events import Prediction
from rollbackd.rules.loader import load_config_text
from rollbackd.scenarios import BUILTIN, write_recording
from test_http import get, samples, value

T0 = 1_790_000_000.0
H = 3600.0


def pred(i: str, t: float, dep: str) -> Prediction:
    return Prediction(id=i, ts=T0 + t, deployment=dep, model_version="v1", prediction=1, score=0.5)


def test_a_binding_episode_is_one_alarm_naming_the_fullest_books_and_counts_per_deployment():
    j = OutcomeJoiner(horizon=H, max_pending=4)
    for dep in ("churn", "fraud", "search"):
        j.track(dep)
    for k, (dep, t) in enumerate([("fraud", 0), ("fraud", 1), ("churn", 2), ("fraud", 3)]):
        j.add(pred(f"p{k}", t, dep))
    assert j.alarms == [] and j.stats.evicted_capacity == 0  # full, not over
    j.add(pred("s0", 10, "search"), watermark=T0 + 10)  # over: p0 (fraud, t=0) goes
    j.add(pred("s1", 11, "search"), watermark=T0 + 11)  # p1 (fraud, t=1)
    j.add(pred("s2", 12, "search"), watermark=T0 + 12)  # p2 (churn, t=2)
    assert j.stats.evictions() == {"fraud": 2, "churn": 1}
    assert (j.stats.evicted_capacity, j.stats.never_labeled) == (3, 0)
    # One alarm for the episode, at the insert that first went over, with the books as that
    # eviction left them (fraud 2, churn 1, search 1: ties by name), not one per eviction.
    assert j.alarms == [CapBinding(T0 + 10, 4, H, (("fraud", 2), ("churn", 1), ("search", 1)))]
    assert "fraud (2), churn (1), search (1)" in j.alarms[0].text()
    j.alarms.clear()
    # Evictions less than a horizon apart are the same episode...
    j.add(pred("s3", H + 11, "search"), watermark=T0 + 12)
    assert j.alarms == [] and j.stats.capped_at == T0 + H + 11
    # ...and one more than a horizon after the last opens a new one.
    j.add(pred("s4", 2 * H + 12, "search"), watermark=T0 + 12)
    assert [a.since for a in j.alarms] == [T0 + 2 * H + 12]
    assert j.stats.evictions() == {"fraud": 3, "churn": 1, "search": 1}


def test_a_prediction_past_the_horizon_evicted_for_room_counts_as_expired_not_as_the_cap():
    """No outcome older than the watermark gets in any more, so a prediction older than
    watermark - horizon was never going to be labelled: its eviction is the horizon's (as the
    next sweep would have counted it), and no notice says the cap binds."""
    j = OutcomeJoiner(horizon=H, max_pending=2)
    j.track("fraud")
    j.add(pred("old", 0, "fraud"))
    j.add(pred("a", H, "fraud"))
    j.add(pred("b", H + 5, "fraud"), watermark=T0 + H + 1)  # cutoff T0 + 1: "old" is past it
    assert (j.stats.never_labeled, j.stats.evicted_capacity, j.alarms) == (1, 0, [])
    j.add(pred("c", H + 6, "fraud"), watermark=T0 + H + 1)  # "a" could still be labelled
    assert (j.stats.never_labeled, j.stats.evicted_capacity, len(j.alarms)) == (1, 1, 1)


def _capped_rules(cap: int) -> str:
    path = resources.files("rollbackd") / "examples" / "recall-collapse.yaml"
    rules = yaml.safe_load(path.read_text())
    rules["settings"].update(max_pending_labels=cap, join_horizon="5m")
    return yaml.safe_dump(rules)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 20 predictions/s, half of them labelled 30-300 s later: with a 5-minute horizon about
    # 4,700 predictions can still be labelled at any time.
    rec = tmp_path_factory.mktemp("cap") / "recall_collapse.jsonl.gz"
    write_recording(BUILTIN["recall_collapse"], rec)
    return rec


def _replay(recording: Path, cap: int, batch_size: int, work: Path) -> tuple[bytes, dict, dict, str]:
    config = load_config_text(_capped_rules(cap))
    out, posted = work / f"decisions-{cap}-{batch_size}.jsonl", io.StringIO()
    pipeline = build_pipeline(config, decisions=DecisionLog(out), notifier=ConsoleNotifier(stream=posted))
    replay(open_recording(str(recording), config), pipeline, batch_size=batch_size)
    stats = pipeline.joiner.stats
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(pipeline))
    with OpsServer(registry, pipeline, port=0) as server:  # /metrics says the same
        scraped = samples(get(server.url + "/metrics")[2])
    for dep, n in stats.evictions().items():
        assert value(scraped, "rollbackd_label_buffer_evicted_total", deployment=dep) == n
    assert not any(name == "rollbackd_label_buffer_evicted_total" for name, _ in scraped) or stats.evictions()
    return out.read_bytes(), stats.to_record(), stats.evictions(), posted.getvalue()


@pytest.fixture(scope="module")
def uncapped(recording: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict, dict, str]:
    return _replay(recording, 2_000_000, 4096, tmp_path_factory.mktemp("uncapped"))


def test_a_cap_that_loses_labels_loses_the_same_ones_whatever_the_batch_size(recording, uncapped, tmp_path):
    """4,800 entries: some labels come after their prediction was evicted. The same ones,
    counted the same way, with the same decisions and one notice, whether the recording is
    read 7 events at a time or 4096."""
    small = _replay(recording, 4800, 7, tmp_path)
    large = _replay(recording, 4800, 4096, tmp_path)
    assert small[0] == large[0]  # the decision log, byte for byte
    assert small[1:3] == large[1:3]  # every join counter, and the evictions per deployment
    lost = uncapped[1]["joined"] - small[1]["joined"]
    assert lost > 0 and small[1]["unmatched_outcomes"] == lost  # not vacuous: labels were lost
    assert small[2] == {"fraud-scorer": small[1]["evicted_capacity"]} and small[1]["evicted_capacity"] >= lost
    for _, _, _, posted in (small, large):
        assert posted.count("[LABEL BUFFER]") == 1, posted
        assert "Most buffered: fraud-scorer (4,800)" in posted
    assert "[LABEL BUFFER]" not in uncapped[3]


def test_a_cap_that_only_evicts_expired_predictions_is_not_binding_whatever_the_batch_size(recording, uncapped, tmp_path):
    """5,500 entries hold every prediction that can still be labelled, but not those past the
    horizon that the sweep at the next boundary removes. Evicting those for room costs no
    label: counted as expired (as the sweep would), no notice. (Counted as the cap's before,
    4,255 of them read 7 events at a time and 27,218 read 4096 at a time.)"""
    small = _replay(recording, 5500, 7, tmp_path)
    large = _replay(recording, 5500, 4096, tmp_path)
    assert small[0] == large[0] == uncapped[0]
    # Every counter as without a cap: as many joined, the same expired, none lost to the cap.
    assert small[1] == large[1] == uncapped[1]
    assert (small[1]["evicted_capacity"], small[2], large[2]) == (0, {}, {})
    assert "[LABEL BUFFER]" not in small[3] + large[3]


def test_a_reload_that_slices_labels_repacks_the_buffered_predictions():
    """A buffered prediction keeps one slice per label-sliced slice_by of its deployment: a
    reload that adds one unpacks each entry, gives it (unknown) for the new slice, packs it
    again; the outcome's label carries both."""
    from rollbackd.daemon.join import unpack
    from rollbackd.daemon.rules_swap import replace_rules
    from rollbackd.events import Outcome

    rules = """
version: 1
settings: {notifier: {type: none}}
rules:
  - {name: errs, detector: model_error, threshold: 0.2, actions: [notify], slice_by: [attrs.region]}
"""
    tiered = rules + "  - {name: tiers, detector: model_error, threshold: 0.3, actions: [notify], slice_by: [attrs.tier]}\n"
    p = build_pipeline(load_config_text(rules))
    p.ingest([Prediction(id=f"p{i}", ts=T0 + i, deployment="fraud", model_version="v1", prediction=1,
                         score=0.5, attrs={"region": "eu"}) for i in range(40)])
    p.finish()
    book = p.joiner.pending_books()["fraud"]
    assert len(book) == 40 and unpack(book["p3"]).segments == ("region=eu",)
    replace_rules(p, load_config_text(tiered), T0 + 40)
    assert type(book["p3"]) is bytes and sorted(unpack(book["p3"]).segments) == ["(unknown)", "region=eu"]
    labeled = p.joiner.match(Outcome(id="p3", ts=T0 + 50, deployment="fraud", label=1))
    assert labeled is not None and sorted(labeled.segments) == ["(unknown)", "region=eu"] and labeled.pred_ts == T0 + 3
