"""The alibi-detect wrappers (optional, BSL-licensed extra): against alibi-detect used directly.

Without alibi-detect installed (the default install, and CI) the wrappers must fail with the
install hint, and the rules loader must reject rules that name them; those tests always run.
The rest run where ``alibi_detect`` imports (``pip install 'rollbackd[alibi]'``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rollbackd.detectors import REGISTRY, Reference, Window, make_detector
from rollbackd.detectors.alibi import INSTALL_HINT, LICENSE_NOTE
from rollbackd.events import Prediction
from rollbackd.rules.loader import ConfigError, check_text, load_config_text

ALIBI_DETECTORS = ("alibi_mmd", "alibi_lsdd", "alibi_cvm_online")

try:
    import alibi_detect  # noqa: F401

    HAVE_ALIBI = True
except ImportError:
    HAVE_ALIBI = False

needs_alibi = pytest.mark.skipif(
    not HAVE_ALIBI,
    reason="alibi-detect is not installed (optional BSL-1.1 extra: pip install 'rollbackd[alibi]')",
)

# Small online-CVM settings: threshold configuration simulates n_bootstraps streams of
# (reference + 2 * max window)^2 comparisons each.
ONLINE = {"ert": 400, "window_sizes": [20, 40], "max_reference": 200}


@pytest.fixture
def without_alibi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import alibi_detect`` fail, whether or not it is installed."""
    for name in [m for m in sys.modules if m == "alibi_detect" or m.startswith("alibi_detect.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "alibi_detect", None)


@pytest.fixture
def stand_in_alibi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``from alibi_detect import cd`` give an empty module, whether or not alibi-detect
    is installed: enough for the loader, which builds a rule's detector to check its parameters
    but never feeds it, so a rules file with alibi rules loads without the extra."""
    for name in [m for m in sys.modules if m == "alibi_detect" or m.startswith("alibi_detect.")]:
        monkeypatch.delitem(sys.modules, name)
    stand_in = types.ModuleType("alibi_detect")
    stand_in.cd = types.ModuleType("alibi_detect.cd")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "alibi_detect", stand_in)


# -- without alibi-detect (always run) ----------------------------------------------------------


def test_the_alibi_detectors_are_registered_by_name() -> None:
    assert set(ALIBI_DETECTORS) <= set(REGISTRY)
    assert all(getattr(REGISTRY[n], "needs_reference", False) for n in ALIBI_DETECTORS)


@pytest.mark.parametrize("name", ALIBI_DETECTORS)
def test_without_alibi_the_error_says_how_to_install_the_extra(name: str, without_alibi: None) -> None:
    params = ONLINE if name == "alibi_cvm_online" else {}
    threshold = 0.5 if name == "alibi_cvm_online" else 0.0
    with pytest.raises(ValueError) as info:
        make_detector(name, threshold=threshold, min_samples=1, params=params)
    message = str(info.value)
    assert message.startswith(f"{name} needs the optional alibi-detect package")
    assert INSTALL_HINT in message and "pip install 'rollbackd[alibi]'" in message
    assert LICENSE_NOTE in message and "Business Source License 1.1" in message


def test_importing_rollbackd_does_not_import_alibi_detect() -> None:
    code = textwrap.dedent(
        """
        import sys
        import rollbackd.detectors, rollbackd.rules.loader
        assert "alibi_detect" not in sys.modules, "alibi_detect imported"
        assert "tensorflow" not in sys.modules, "tensorflow imported"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("alibi_mmd", {"n_permutations": 5}, "n_permutations must be an integer in [10, 100000]"),
        ("alibi_mmd", {"backend": "jax"}, "backend must be one of tensorflow, pytorch, keops"),
        ("alibi_lsdd", {"backend": "keops"}, "backend must be one of tensorflow, pytorch"),
        ("alibi_lsdd", {"max_reference": 1}, "max_reference must be an integer >= 2"),
        ("alibi_mmd", {"baseline": "yesterday"}, "baseline must be one of file, first_n"),
        ("alibi_cvm_online", {"ert": 1000, "n_bootstraps": 1000}, "n_bootstraps must be an integer >= 1466 for ert=1000 and window sizes up to 100, got 1000"),
        ("alibi_cvm_online", {"window_sizes": []}, "window_sizes must be a non-empty list"),
        ("alibi_cvm_online", {"baseline": "rolling"}, "baseline must be one of file, first_n;"),
    ],
)
def test_bad_parameters_are_rejected_before_alibi_is_needed(
    name: str, params: dict[str, Any], message: str, without_alibi: None
) -> None:
    threshold = 0.5 if name == "alibi_cvm_online" else 0.0
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_detector(name, threshold=threshold, min_samples=1, params=params)


RULES = """
deployments:
  fraud-scorer: {}
rules:
  - name: joint-drift
    detector: alibi_mmd
    params: {n_permutations: 200, max_reference: 1000}
    threshold: 0.0
    alpha: 0.01
  - name: online-cvm
    detector: alibi_cvm_online
    params: {ert: 1000, window_sizes: [50, 100], max_reference: 300}
    threshold: 0.5
"""


def test_without_alibi_the_loader_rejects_the_rules_with_the_hint(without_alibi: None) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(RULES.lstrip("\n"), "rules.yaml")
    errors = info.value.errors
    # the fix is to install the extra or pick another detector, not to change a parameter:
    # the loader points at the rule's `detector` value, not at its `params`
    assert [e.path for e in errors] == ["rules[0].detector", "rules[1].detector"]
    lines = RULES.lstrip("\n").splitlines()
    for err, name in zip(errors, ("alibi_mmd", "alibi_cvm_online")):
        assert lines[err.line - 1][err.column - 1 :] == name
        assert err.message.startswith(f"{name} needs the optional alibi-detect package")
        assert INSTALL_HINT in err.message and LICENSE_NOTE in err.message


def test_the_loader_checks_alibi_parameters_by_name(without_alibi: None) -> None:
    bad = RULES.replace("n_permutations: 200", "n_permutation: 200").lstrip("\n")
    with pytest.raises(ConfigError) as info:
        load_config_text(bad, "rules.yaml")
    by_path = {e.path: e.message for e in info.value.errors}
    assert "did you mean 'n_permutations'?" in by_path["rules[0].params.n_permutation"]
    # and, in the same go, the missing extra (the known parameters are still checked)
    assert "alibi" in by_path["rules[0].detector"]


OUT_OF_REACH = """
rules:
  - name: joint-drift
    detector: alibi_mmd
    params: {n_permutations: 100}
    threshold: 0.0
    alpha: 0.005
"""
OUT_OF_REACH_WARNING = (
    "rules[0].alpha: warning: its smallest possible p-value (0.0099) is not below alpha 0.005: "
    "with n_permutations 100 it is 1/(100 + 1), so the rule can never breach; "
    "raise params.n_permutations to at least 200"
)


def test_without_alibi_validate_still_warns_about_an_alpha_out_of_the_permutations_reach(
    without_alibi: None,
) -> None:
    _, issues = check_text(OUT_OF_REACH.lstrip("\n"), "rules.yaml")
    assert [i.format("rules.yaml") for i in issues] == [
        "rules.yaml:3:15: rules[0].detector: " + issues[0].message,
        "rules.yaml:6:12: " + OUT_OF_REACH_WARNING,
    ]
    assert issues[0].message.startswith("alibi_mmd needs the optional alibi-detect package")


def test_rollbackd_validate_warns_about_an_alpha_out_of_the_permutations_reach(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(OUT_OF_REACH.lstrip("\n"))
    exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "rollbackd.cli"]
    out = subprocess.run([*cmd, "validate", str(rules)], capture_output=True, text=True, timeout=120)
    assert f"{rules}:6:12: {OUT_OF_REACH_WARNING}\n" in out.stderr
    # without alibi-detect the rule is also an error (at its detector); with it, only warned about
    assert out.returncode == (0 if HAVE_ALIBI else 2), out.stderr
    assert (f"{rules}:3:15: rules[0].detector: alibi_mmd needs" in out.stderr) is not HAVE_ALIBI


BUDGETED = """
deployments:
  fraud-scorer:
    false_alarm_budget: {rollbacks: 1, per: 30d}
rules:
  - name: joint-drift
    detector: alibi_mmd
    params: {n_permutations: 100}
    threshold: 0.0
    window: {size: 10m}
    actions: [notify, rollback]
  - name: online-cvm
    detector: alibi_cvm_online
    params: {ert: 1000, window_sizes: [50, 100], max_reference: 300}
    threshold: 0.5
    actions: [notify, rollback]
"""


def test_the_budget_sets_an_alibi_rules_alpha_and_warns_when_its_permutations_cannot_reach_it(
    stand_in_alibi: None,
) -> None:
    text = BUDGETED.lstrip("\n")
    cfg, issues = check_text(text, "rules.yaml")
    assert cfg is not None, [i.format("rules.yaml") for i in issues]
    mmd, cvm = cfg.rules
    # the whole budget goes to the one rule with a p-value: 1 per 4320 ten-minute windows
    assert (mmd.alpha, mmd.alpha_source) == (pytest.approx(1 / 4320, rel=1e-12), "budget")
    assert (cvm.alpha, cvm.alpha_source) == (None, None)
    assert [i.format("rules.yaml") for i in issues] == [
        "rules.yaml:5:5: rules[0]: warning: its smallest possible p-value (0.0099) is not below "
        "alpha 0.000231481 (from the false-alarm budget): with n_permutations 100 it is "
        "1/(100 + 1), so the rule can never breach; raise params.n_permutations to at least 4320",
        "rules.yaml:11:5: rules[1]: warning: detector alibi_cvm_online reports no p-value: its "
        "false alarms are set by params.ert, about one per ert events on a stream like the "
        "reference, and a budget per period cannot be turned into ert without knowing the "
        "event rate; so the rollbacks budget of fraud-scorer cannot bound its false alerts "
        "(they are not counted)",
    ]
    # with enough permutations the same budget is reachable, and nothing is said about it
    enough = text.replace("n_permutations: 100", "n_permutations: 4320")
    _, issues = check_text(enough, "rules.yaml")
    assert [i.path for i in issues] == ["rules[1]"]


@needs_alibi
def test_with_alibi_the_loader_accepts_the_rules() -> None:
    config = load_config_text(RULES.lstrip("\n"), "rules.yaml")
    assert [r.detector for r in config.rules] == ["alibi_mmd", "alibi_cvm_online"]


# -- with alibi-detect: the wrappers give alibi's own answers -----------------------------------


def reference(seed: int = 1, n: int = 600) -> Reference:
    rng = np.random.default_rng(seed)
    return Reference(
        "test",
        {
            "a": rng.normal(size=n).tolist(),
            "b": rng.normal(2.0, 3.0, size=n).tolist(),
            "kind": ["x"] * n,  # categorical: not one of the default features
        },
    )


def window(i: int, shift: float, n: int = 200, seed: int = 7, gaps: bool = False) -> Window:
    rng = np.random.default_rng(seed + i)
    a = rng.normal(shift, 1.0, n)
    b = rng.normal(2.0, 3.0, n)
    preds = []
    for j in range(n):
        feats: dict[str, Any] = {"a": float(a[j]), "b": float(b[j]), "kind": "x"}
        if gaps and j % 10 == 0:
            feats["b"] = None if j % 20 == 0 else "n/a"
        preds.append(
            Prediction(id=f"{i}-{j}", ts=60.0 * i + 60.0 * j / n, deployment="d",
                       model_version="v1", features=feats)
        )
    return Window("d", "primary", 60.0 * i, 60.0 * (i + 1), preds)


def matrix(w: Window, names: tuple[str, ...] = ("a", "b")) -> np.ndarray:
    rows = [[p.features.get(k) for k in names] for p in w.predictions]
    ok = [r for r in rows if all(type(v) is float for v in r)]
    return np.array(ok, dtype=float)


def standardised(ref: Reference, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.column_stack([np.array(ref.columns["a"]), np.array(ref.columns["b"])])
    mu, sd = r.mean(axis=0), r.std(axis=0)
    return ((r - mu) / sd).astype(np.float32), ((x - mu) / sd).astype(np.float32)


@needs_alibi
@pytest.mark.parametrize("name, cls", [("alibi_mmd", "MMDDrift"), ("alibi_lsdd", "LSDDDrift")])
def test_windowed_detectors_give_alibis_distance_and_p_value(name: str, cls: str) -> None:
    import tensorflow as tf
    from alibi_detect import cd

    ref = reference()
    det = make_detector(name, threshold=0.0, min_samples=10, params={"seed": 3}, reference=ref)
    w = window(0, 0.5, gaps=True)
    det.update(w)
    m = det.evaluate(w.end)

    x_ref, x = standardised(ref, matrix(w))
    np.random.seed(3)
    tf.random.set_seed(3)
    direct = getattr(cd, cls)(x_ref, backend="tensorflow", n_permutations=100)
    np.random.seed(3)
    tf.random.set_seed(3)
    p_direct, dist_direct, _ = direct.score(x)

    assert m.value == pytest.approx(float(dist_direct), rel=1e-6)
    assert m.evidence["alibi_p_value"] == pytest.approx(float(p_direct))
    assert m.p_value == (round(float(p_direct) * 100) + 1) / 101  # never 0: (1 + #>=) / (B + 1)
    assert m.evidence["features"] == ["a", "b"]
    assert m.sample_size == 180 and m.evidence["incomplete"] == 20
    assert m.evidence["license"] == LICENSE_NOTE


@needs_alibi
@pytest.mark.parametrize("name", ["alibi_mmd", "alibi_lsdd"])
def test_windowed_detectors_flag_a_shift_and_are_deterministic(name: str) -> None:
    ref = reference()
    dets = [
        make_detector(name, threshold=0.0, min_samples=10, params={"seed": 5}, reference=ref)
        for _ in range(2)
    ]
    results = []
    for det in dets:
        out = []
        for i, shift in enumerate([0.0, 0.0, 1.0]):
            w = window(i, shift)
            det.update(w)
            out.append(det.evaluate(w.end))
        results.append(out)
    assert [m.to_record() for m in results[0]] == [m.to_record() for m in results[1]]
    quiet, quiet2, shifted = results[0]
    assert quiet.p_value > 0.05 and quiet2.p_value > 0.05
    assert shifted.p_value == 1 / 101 and shifted.value > max(quiet.value, quiet2.value)


@needs_alibi
def test_windowed_detector_builds_its_reference_from_the_first_windows() -> None:
    det = make_detector(
        "alibi_lsdd", threshold=0.0, min_samples=10,
        params={"baseline": "first_n", "reference_size": 400},
    )
    first = [window(i, 0.0) for i in range(2)]
    for w in first:
        det.update(w)
        assert det.evaluate(w.end).insufficient == "building reference"
    w = window(2, 1.5)
    det.update(w)
    m = det.evaluate(w.end)
    assert m.insufficient is None and m.evidence["reference_n"] == 400 and m.p_value == 1 / 101


def cvm_stream(n_quiet: int, n_shifted: int, seed: int = 11) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0, 1, n_quiet), rng.normal(1.0, 1, n_shifted)])


def stream_windows(xs: np.ndarray, per_window: int) -> list[Window]:
    out = []
    for i, start in enumerate(range(0, xs.shape[0], per_window)):
        chunk = xs[start : start + per_window]
        # events out of ts order within a window: the wrapper feeds them sorted
        preds = [
            Prediction(id=str(start + j), ts=float(start + j), deployment="d",
                       model_version="v1", features={"a": float(v)})
            for j, v in enumerate(chunk)
        ][::-1]
        out.append(Window("d", "primary", float(start), float(start + per_window), preds))
    return out


@needs_alibi
def test_online_cvm_detections_are_alibis_own() -> None:
    from alibi_detect import cd

    rng = np.random.default_rng(2)
    ref_values = rng.normal(size=1000)
    ref = Reference("test", {"a": ref_values.tolist()})
    xs = cvm_stream(600, 400)
    det = make_detector("alibi_cvm_online", threshold=0.5, min_samples=1, params=ONLINE, reference=ref)
    found = []
    for w in stream_windows(xs, 100):
        det.update(w)
        m = det.evaluate(w.end)
        assert m.value == (1.0 if m.evidence["detections"] else 0.0)
        if m.value:
            found.append(m.evidence["first"]["event"])

    # alibi directly: the same reference subsample, thresholds configured under the same seed
    pick = np.sort(np.random.default_rng(0).choice(1000, 200, replace=False))
    state = np.random.get_state()
    np.random.seed(0)
    direct = cd.CVMDriftOnline(
        ref_values[pick][:, None], ert=400, window_sizes=[20, 40], n_bootstraps=4000, verbose=False
    )
    np.random.set_state(state)
    firsts, window_of_last = [], -1
    for t, x in enumerate(xs):
        if direct.predict(np.array([x]))["data"]["is_drift"]:
            if t // 100 != window_of_last:  # the wrapper reports the first one per window
                firsts.append(t)
                window_of_last = t // 100
            direct.reset_state()
    assert found == firsts
    assert found and found[-1] >= 600 and min(t for t in found if t >= 600) < 650


@needs_alibi
def test_online_cvm_keeps_bounded_history_and_skips_incomplete_events() -> None:
    rng = np.random.default_rng(4)
    ref = Reference("test", {"a": rng.normal(size=500).tolist()})
    det: Any = make_detector("alibi_cvm_online", threshold=0.5, min_samples=1, params=ONLINE, reference=ref)
    xs = rng.normal(size=900)
    for w in stream_windows(xs, 300):
        det.update(w)
    alibi_det = det._active.detector
    assert alibi_det.xs.shape[0] <= 40 and alibi_det.test_stats.shape[0] <= 40

    preds = [
        Prediction(id=str(j), ts=1000.0 + j, deployment="d", model_version="v1",
                   features={"a": None if j % 4 == 0 else float(rng.normal())})
        for j in range(100)
    ]
    det.update(Window("d", "primary", 1000.0, 1100.0, preds))
    m = det.evaluate(1100.0)
    assert m.evidence["events"] == 75 and m.evidence["skipped"] == 25
    assert m.evidence["events_seen"] == 900 + 75
