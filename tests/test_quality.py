"""The data_quality detector: each check on hand-made windows, with exact scores."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import pytest

from rollbackd.daemon.references import load_reference
from rollbackd.detectors import REGISTRY, Reference, Window, make_detector
from rollbackd.detectors.quality import QUALITY_CHECKS, DataQuality
from rollbackd.events import Prediction

_ids = iter(range(10**9))


def pred(features: dict[str, Any], version: str = "v1") -> Prediction:
    i = next(_ids)
    return Prediction(id=str(i), ts=float(i), deployment="d", model_version=version, features=features)


def window(rows: Sequence[dict[str, Any]], version: str = "v1") -> Window:
    return Window("d", "primary", 0.0, 60.0, [pred(r, version) for r in rows])


def reference() -> Reference:
    """100 rows: x numeric 0..89 with 10 missing; c categorical over five values; n numeric."""
    x: list[Any] = [float(i) for i in range(90)] + [None] * 10
    c = ["a", "b", "c", "d", "e"] * 20
    n = [float(i % 7) for i in range(100)]
    return Reference("r", {"x": x, "c": c, "n": n})


def clean_rows(k: int = 100) -> list[dict[str, Any]]:
    return [{"x": float(i % 90), "c": "abcde"[i % 5], "n": float(i % 7)} for i in range(k)]


def check(det: DataQuality, rows: Sequence[dict[str, Any]]) -> Any:
    det.update(window(rows))
    return det.evaluate(60.0)


def scores(m: Any) -> dict[tuple[str, str], float]:
    return {(f["check"], f["feature"]): f["score"] for f in m.evidence["failing"]}


def test_registered_and_built_by_name() -> None:
    assert "data_quality" in REGISTRY
    det = make_detector("data_quality", threshold=0.1, min_samples=5, params={}, reference=reference())
    assert isinstance(det, DataQuality) and det.min_samples == 5 and det.reference is not None
    assert det.checks == list(QUALITY_CHECKS)


def test_clean_window_scores_zero() -> None:
    m = check(DataQuality(threshold=0.01, reference=reference()), clean_rows())
    assert m.value == 0.0 and m.evidence["failing"] == [] and m.p_value is None
    assert m.sample_size == 100 and m.evidence["features"] == 3
    json.dumps(m.to_record())


def test_missing_feature() -> None:
    rows = [{"c": r["c"], "n": r["n"]} for r in clean_rows()]
    m = check(DataQuality(threshold=0.1, reference=reference()), rows)
    # 10 % of the reference's x were missing anyway: 90 % of the values are gone
    assert m.evidence["failing"] == [
        {"check": "missing_feature", "feature": "x", "score": 0.9, "window": 1.0, "reference": 0.1}
    ]
    assert m.value == 0.9 and m.effect_size == 0.9
    assert m.evidence["worst"] == {"check": "missing_feature", "feature": "x"}


def test_unexpected_feature() -> None:
    rows = clean_rows()
    for i in range(30):
        rows[i] = {**rows[i], "debug_id": f"q{i}"}
    rows[30] = {**rows[30], "debug_id": None}  # present but null: not counted
    m = check(DataQuality(threshold=0.1, reference=reference()), rows)
    assert scores(m) == {("unexpected_feature", "debug_id"): 0.3}


def test_null_rate_counts_none_and_nan() -> None:
    rows = clean_rows()
    for i in range(20):
        rows[i]["x"] = None
    for i in range(20, 30):
        rows[i]["x"] = float("nan")
    m = check(DataQuality(threshold=0.1, reference=reference()), rows)
    # window 30 % null against the reference's 10 %
    (entry,) = m.evidence["failing"]
    assert entry["check"] == "null_rate" and entry["feature"] == "x"
    assert entry["score"] == pytest.approx(0.2) and entry["window"] == 0.3 and entry["reference"] == 0.1


def test_type_change_both_ways() -> None:
    rows = clean_rows()
    for i in range(25):
        rows[i]["n"] = "seven"  # strings in a numeric feature
    for i in range(40, 50):
        rows[i]["c"] = 3.0  # numbers in a categorical one
    m = check(DataQuality(threshold=0.05, reference=reference()), rows)
    assert scores(m) == {("type_change", "n"): 0.25, ("type_change", "c"): 0.1}
    assert [f["feature"] for f in m.evidence["failing"]] == ["n", "c"]  # worst first


def test_type_change_is_relative_to_the_reference() -> None:
    ref = Reference("r", {"n": [1.0, 2.0, 3.0, "missing"] * 25})  # 25 % sentinels already
    rows = [{"n": v} for v in [1.0, 2.0, "missing", "missing"] * 25]
    m = check(DataQuality(threshold=0.1, reference=ref), rows)
    assert scores(m) == {("type_change", "n"): 0.25}


def test_out_of_range_min_max_and_quantiles() -> None:
    rows = clean_rows()
    for i in range(10):
        rows[i]["x"] = 1000.0 + i
    rows[10]["x"] = -1.0
    rows[11]["x"] = float("inf")
    m = check(DataQuality(threshold=0.05, reference=reference()), rows)
    assert scores(m) == {("out_of_range", "x"): 0.12}
    # with [5 %, 95 %] of the reference (89 values) its own share outside is the baseline
    det = DataQuality(
        threshold=0.0, checks=["out_of_range"], range_quantiles=[0.05, 0.95], reference=reference()
    )
    vals = np.arange(90.0)
    lo, hi = np.quantile(vals, [0.05, 0.95])
    ref_out = float(np.count_nonzero((vals < lo) | (vals > hi))) / 90
    m = check(det, rows)
    win = np.array([r["x"] for r in rows])
    win_out = float(np.count_nonzero((win < lo) | (win > hi))) / 100
    assert m.value == pytest.approx(win_out - ref_out, rel=1e-12)


def test_cardinality_explosion() -> None:
    rows = clean_rows()
    for i in range(50):
        rows[i]["c"] = f"user-{i}"
    m = check(DataQuality(threshold=0.3, checks=["cardinality"], reference=reference()), rows)
    # 55 distinct; a sample of 100 from five equally likely categories shows all five
    expected = 5 * (1 - (1 - 0.2) ** 100)
    (entry,) = m.evidence["failing"]
    assert entry["check"] == "cardinality" and entry["window"] == 55.0
    assert entry["reference"] == pytest.approx(expected, rel=1e-12)
    assert entry["score"] == math.floor(55 - expected) / 55 == 50 / 55


def test_cardinality_allows_for_the_reference_long_tail() -> None:
    # 50 singletons in 100 reference values: Good–Turing says half the mass is unseen
    ref = Reference("r", {"c": [f"u{i}" for i in range(50)] + ["a"] * 50})
    rows = [{"c": f"w{i}"} for i in range(50)] + [{"c": "a"}] * 50
    det = DataQuality(threshold=0.0, checks=["cardinality"], reference=ref)
    m = check(det, rows)
    expected = float(sum(1 - (1 - p) ** 100 for p in [0.01] * 50 + [0.5])) + 100 * 0.5
    assert expected > 51 and m.value == 0.0


def test_value_is_the_worst_score_and_threshold_selects_failing() -> None:
    rows = clean_rows()
    for i in range(40):
        rows[i]["x"] = None  # null 40 % vs 10 %: 0.3
    for i in range(5):
        rows[50 + i]["n"] = "bad"  # type change 0.05
    m = check(DataQuality(threshold=0.1, reference=reference()), rows)
    assert m.value == pytest.approx(0.3)
    assert list(scores(m)) == [("null_rate", "x")] and m.evidence["n_failing"] == 1
    m = check(DataQuality(threshold=0.01, reference=reference()), rows)
    assert list(scores(m)) == [("null_rate", "x"), ("type_change", "n")]
    m = check(DataQuality(threshold=0.01, checks=["type_change"], reference=reference()), rows)
    assert list(scores(m)) == [("type_change", "n")] and m.value == pytest.approx(0.05)
    m = check(DataQuality(threshold=0.01, max_evidence=1, reference=reference()), rows)
    assert len(m.evidence["failing"]) == 1 and m.evidence["n_failing"] == 2


def test_features_restrict_the_checks() -> None:
    rows = [{"c": r["c"], "surprise": 1.0} for r in clean_rows()]
    m = check(DataQuality(threshold=0.1, features=["c"], reference=reference()), rows)
    assert m.value == 0.0 and m.evidence["features"] == 1


def test_insufficient_and_first_n_baseline() -> None:
    det = DataQuality(threshold=0.1, min_samples=50, reference=reference())
    assert det.evaluate(0.0).insufficient == "no window yet"
    assert check(det, []).insufficient == "no predictions in window"
    m = check(det, clean_rows(49))
    assert m.value is None and "min_samples" in (m.insufficient or "")
    # without a reference file: the running version's first 150 predictions, then checks
    det = DataQuality(threshold=0.1, reference_size=150)
    assert check(det, clean_rows()).insufficient == "building reference"
    m = check(det, clean_rows())
    assert m.insufficient == "building reference" and m.evidence["reference_n"] == 150
    rows = [{"x": r["x"], "c": r["c"]} for r in clean_rows()]
    m = check(det, rows)
    assert scores(m) == {("missing_feature", "n"): 1.0}


def test_previous_version_baseline() -> None:
    det = DataQuality(threshold=0.1, baseline="previous_version", reference_size=100)
    det.update(window(clean_rows(), "v1"))
    assert det.evaluate(0.0).insufficient == "no previous version"
    rows = [{**r, "x": None} for r in clean_rows()]  # v2 stops sending x
    det.update(window(rows, "v2"))
    m = det.evaluate(0.0)
    assert scores(m) == {("null_rate", "x"): 1.0} and m.evidence["reference_version"] == "v1"


def test_csv_reference_nulls(tmp_path) -> None:
    path = tmp_path / "ref.csv"
    path.write_text("x,c\n" + "".join(f"{'' if i % 10 == 0 else i},{'ab'[i % 2]}\n" for i in range(100)))
    det = make_detector("data_quality", threshold=0.05, min_samples=1, params={},
                        reference=load_reference(path))
    rows = [{"x": None if i % 2 else float(i), "c": "ab"[i % 2]} for i in range(100)]
    m = check(det, rows)
    assert scores(m) == {("null_rate", "x"): pytest.approx(0.4)}
    assert math.isclose(m.evidence["failing"][0]["reference"], 0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.5}, r"\[0, 1\]"),
        ({"threshold": 0.1, "min_samples": -1}, ">= 0"),
        ({"threshold": 0.1, "checks": ["nulls"]}, "missing_feature, unexpected_feature"),
        ({"threshold": 0.1, "checks": []}, "non-empty"),
        ({"threshold": 0.1, "range_quantiles": [0.9, 0.1]}, "0 <= low < high <= 1"),
        ({"threshold": 0.1, "range_quantiles": [0.1]}, "0 <= low < high <= 1"),
        ({"threshold": 0.1, "baseline": "yesterday"}, "file, first_n"),
        ({"threshold": 0.1, "features": "x"}, "list of feature names"),
        ({"threshold": 0.1, "max_evidence": -1}, ">= 0"),
    ],
)
def test_invalid_params(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataQuality(**kwargs)
