"""`rollbackd validate` on hostile files: a located one-line error and exit 2, never a traceback,
in bounded time and memory. The real CLI runs in a subprocess, as a user would run it.

Issue 12: YAML nested 500 deep and a 5,000-digit integer gave tracebacks.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from rollbackd.rules.loader import check_text
from rollbackd.rules.parse import MAX_INT_CHARS, MAX_RULES_FILE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES

ROOT = Path(__file__).resolve().parents[1]
EXIT_CONFIG = 2
SECONDS = 30  # each run; the slowest case takes about 5 s on a loaded CI machine
MAX_RSS_MB = 400


def _laughs(levels: int, top: str) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + top.replace("LAST", f"*l{levels - 1}") + "\n"


# (name, file content, what the error says, line it points at)
CASES: list[tuple[str, bytes, str, int]] = [
    ("deep_flow_500", ("rules:\n  - " + "[" * 500 + "]" * 500 + "\n").encode(), "nested deeper than 64", 2),
    ("deep_mapping_500", ("settings: " + "{a: " * 500 + "1" + "}" * 500 + "\n").encode(), "nested deeper than 64", 1),
    ("deep_block_500", ("".join("  " * i + "a:\n" for i in range(500)) + "  " * 500 + "1\n").encode(), "nested deeper than 64", 64),
    ("int_5000_digits", ("version: " + "1" * 5000 + "\n").encode(), "integer of 5,000 characters", 1),
    ("int_5000_digits_setting", ("settings:\n  max_event_bytes: " + "9" * 5000 + "\n").encode(), "integer of 5,000 characters", 2),
    ("sexagesimal_5000_digits", ("version: " + "1" * 5000 + ":00\n").encode(), "integer of 5,003 characters", 1),
    ("billion_laughs", _laughs(10, "rules: LAST").encode(), "aliases expand to more than", 0),
    ("laughs_in_params", _laughs(9, "rules:\n  - name: r\n    detector: error_rate\n    threshold: 0.1\n    params: {x: LAST}").encode(), "aliases expand to more than", 0),
    ("merge_bomb", ("deployments:\n  a0: &a0 {x: 1}\n" + "".join(
        f"  a{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * 9) + "]}\n" for i in range(1, 9))).encode(), "aliases expand to more than", 0),
    ("recursive_alias", b"rules: &a [*a]\n", "inside the value it names", 1),
    ("ten_megabytes", b"rules: []\n" + (b"#" + b"y" * 99 + b"\n") * 100_000, "larger than 1024 KiB", 0),
    ("many_values", ("rules: [" + "1," * 150_000 + "1]\n").encode(), "more than 100,000 values", 1),
    ("binary_garbage", bytes(random.Random(12).randrange(256) for _ in range(100_000)), "not UTF-8 text", 1),
    ("nul_byte", b"rules:\n  - \x00\n", "unacceptable character #x0000", 2),
    ("impossible_date", b"version: 2026-13-45\nrules: []\n", "month must be in 1..12", 1),
    ("tab_indent", b"rules:\n\t- name: r\n", "YAML syntax error", 2),
]


# `rollbackd validate` as `python -m rollbackd.cli` does it, writing its own peak RSS (KiB) to
# RSS_OUT as it exits. VmHWM is the high-water mark of this program's own memory map; neither
# RUSAGE_CHILDREN (the session's largest child: a Kafka broker, an MLflow server) nor the
# child's ru_maxrss (which starts at the forking pytest process's size) would be.
_MEASURED = (
    "import atexit, os, runpy, sys\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return line.split()[1]\n"
    "atexit.register(lambda: open(os.environ['RSS_OUT'], 'w').write(_hwm()))\n"
    "sys.argv = ['rollbackd', *sys.argv[1:]]\n"
    "runpy.run_module('rollbackd.cli', run_name='__main__')\n"
)


def _run(path: Path) -> tuple[int, str, str, float, int]:
    rss_out = path.with_suffix(".rss")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RSS_OUT": str(rss_out)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, "validate", str(path)],
        capture_output=True, text=True, timeout=SECONDS, env=env, cwd=ROOT,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start, int(rss_out.read_text())


def test_hostile_files_give_located_errors(tmp_path: Path) -> None:
    paths = []
    for name, content, _, _ in CASES:
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content)
        paths.append(path)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, paths))
    for (name, _, says, line), path, (rc, out, err, seconds, rss) in zip(CASES, paths, results):
        assert rss < MAX_RSS_MB * 1024, (name, rss)
        assert "Traceback" not in out + err, (name, err)
        assert rc == EXIT_CONFIG, (name, rc, err)
        lines = err.splitlines()
        assert lines[-1] == f"{path}: 1 error(s)", (name, err)
        errors = [e for e in lines[:-1] if ": warning: " not in e]
        assert len(errors) == 1, (name, err)  # exactly one located, one-line error
        first = errors[0]
        assert says in first, (name, first)
        where = re.match(re.escape(str(path)) + r"(?::(\d+):(\d+))?: ", first)
        assert where, (name, first)
        if line:
            assert where.group(1) == str(line), (name, first)
        assert seconds < SECONDS, (name, seconds)


def test_bounds_are_exact() -> None:
    """Just inside each bound is valid YAML to the parser; just past it is refused."""
    inside = "rules: []\nx: " + "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1) + "\n"
    past = "rules: []\nx: " + "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH + "\n"
    assert not any("nested deeper" in i.message for i in check_text(inside)[1])
    assert any("nested deeper" in i.message for i in check_text(past)[1])
    assert not any("integer of" in i.message for i in check_text("version: " + "1" * MAX_INT_CHARS)[1])
    assert any("integer of" in i.message for i in check_text("version: " + "1" * (MAX_INT_CHARS + 1))[1])
    # The mapping, its key and the list count as 3 values; the rest are the list's items.
    items = MAX_YAML_NODES - 3
    assert not any("more than" in i.message for i in check_text("x: [" + "1," * (items - 1) + "1]")[1])
    assert any("more than" in i.message for i in check_text("x: [" + "1," * items + "1]")[1])
    assert any("longer than" in i.message for i in check_text("#" * (MAX_RULES_FILE_BYTES + 1))[1])


def test_aliases_within_the_bound_still_work() -> None:
    text = "deployments:\n  a: &d {backend: {type: log}}\n  b: *d\n  c: {<<: *d}\nrules: []\n"
    config, issues = check_text(text)
    assert config is not None, issues
    assert set(config.deployments) == {"a", "b", "c"}


def test_an_internal_error_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The last resort: a bug in the checker is reported in one line, exit 2, no traceback."""
    import rollbackd.rules.loader as loader
    from rollbackd.cli import main

    def boom(path: object) -> None:
        raise RecursionError("maximum recursion depth exceeded\nwhile checking")

    monkeypatch.setattr(loader, "check_file", boom)
    path = tmp_path / "r.yaml"
    path.write_text("rules: []\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == EXIT_CONFIG
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "internal error while checking the file (RecursionError: maximum recursion depth exceeded while checking)" in result.output
    assert "Traceback" not in result.output
