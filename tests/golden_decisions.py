"""Decision logs of every built-in scenario under the example and test rules files, as
SHA-256 digests: the reference that an engine change must keep byte-identical.

``python tests/golden_decisions.py --write`` records them (only when a change is *meant* to
alter a decision, and the commit says which and why); ``tests/test_golden_decisions.py``
compares.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from importlib import resources
from pathlib import Path

from rollbackd.actions.console import ConsoleNotifier
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.drills import drill
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

HERE = Path(__file__).parent
GOLDEN = HERE / "golden" / "decision-logs.json"
# Issue 14's scenarios are replayed under their own example rules file only (the three files
# above do not watch what they test, and daily_cycle's three days under each would double this
# test's time).
OWN_RULES = {
    "recall_collapse": "recall-collapse.yaml",
    "bad_rolling_update": "rolling-update.yaml",
    "healthy_rolling_update": "rolling-update.yaml",
    "daily_cycle": "daily-cycle.yaml",
    "daily_cycle_shift": "daily-cycle.yaml",
    "one_region_fault": "one-region-fault.yaml",
}


def rules_files() -> dict[str, Path]:
    examples = resources.files("rollbackd") / "examples"
    return {
        "e2e": HERE / "data" / "e2e-rules.yaml",
        "demo": Path(str(examples / "demo.yaml")),
        "drills": Path(str(examples / "drills.yaml")),
    }


def replay_digest(recording: Path, rules: Path, work: Path, batch_size: int = 4096) -> str:
    config = load_config(rules)
    out = work / "decisions.jsonl"
    ledger = Ledger(work / "ledger.db", run_id="golden")
    pipeline = build_pipeline(config, decisions=DecisionLog(out), recorder=ledger,
                              notifier=ConsoleNotifier(stream=io.StringIO()))
    replay(open_recording(str(recording), config), pipeline, batch_size=batch_size)
    ledger.close()
    return hashlib.sha256(out.read_bytes()).hexdigest()


def drill_digest(recording: Path, rules: Path, work: Path) -> str:
    config = load_config(rules)
    drill(recording, config, out_dir=work / "drill", notifier=ConsoleNotifier(stream=io.StringIO()),
          ledger=False)
    return hashlib.sha256((work / "drill" / "decisions.jsonl").read_bytes()).hexdigest()


def cases(scenario: str) -> dict[str, Path]:
    """The rules files a scenario is replayed under, by the name its digest is kept under."""
    if scenario in OWN_RULES:
        return {"own": Path(str(resources.files("rollbackd") / "examples" / OWN_RULES[scenario]))}
    return rules_files()


def digests(work: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in sorted(BUILTIN):
        rec = work / f"{name}.jsonl.gz"
        write_recording(BUILTIN[name], rec)
        for rname, rules in sorted(cases(name).items()):
            case = work / f"{name}-{rname}"
            case.mkdir()
            out[f"replay/{name}/{rname}"] = replay_digest(rec, rules, case)
        if name in OWN_RULES:
            continue
        case = work / f"{name}-drill"
        case.mkdir()
        out[f"drill/{name}/drills"] = drill_digest(rec, rules_files()["drills"], case)
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = digests(Path(tmp))
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
