"""Every built-in scenario and drill reaches byte-identical decisions across engine changes.

The digests in tests/golden/decision-logs.json were recorded from the engine before the
executor split; a change that is meant to alter a decision rewrites them
(``python tests/golden_decisions.py --write``) and its commit says which and why.
"""

from __future__ import annotations

import json

import pytest

from golden_decisions import GOLDEN, digests


@pytest.fixture(scope="module")
def current(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return digests(tmp_path_factory.mktemp("golden"))


def test_the_golden_file_covers_every_builtin_scenario_and_rules_file(current):
    assert sorted(current) == sorted(json.loads(GOLDEN.read_text()))


def test_decision_logs_are_byte_identical_to_the_recorded_ones(current):
    golden = json.loads(GOLDEN.read_text())
    differ = sorted(k for k in golden if current.get(k) != golden[k])
    assert differ == [], f"decision logs changed: {differ}"
    # not vacuous: most cases decide something
    assert sum(v != "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" for v in golden.values()) >= 25
