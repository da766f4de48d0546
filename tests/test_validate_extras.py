"""``validate`` fails when a backend's optional package is not installed, as ``run`` would: the
missing module is simulated in a subprocess (an import hook that refuses it: fault injection)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RULES = """\
version: 1
deployments:
  fraud:
    backend: {type: kubernetes, kind: argo-rollout, name: fraud, api_url: "https://127.0.0.1:6443"}
rules:
  - {name: errors, detector: error_rate, threshold: 0.1}
"""

# Run as `python -c`: refuses every import of `kubernetes` (as a machine without the extra),
# then runs the CLI with the arguments given.
BLOCKED = """
import sys
class NoKubernetes:
    def find_spec(self, name, path=None, target=None):
        if name == "kubernetes" or name.startswith("kubernetes."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoKubernetes())
sys.modules.pop("kubernetes", None)
from rollbackd.cli import main
main(sys.argv[1:], prog_name="rollbackd")
"""

MESSAGE = b"backend kubernetes needs the 'kubernetes' extra: pip install 'rollbackd[kubernetes]'"


def cli(*args: str, blocked: bool, cwd: Path) -> subprocess.CompletedProcess:
    code = BLOCKED if blocked else "import sys; from rollbackd.cli import main; main(sys.argv[1:], prog_name='rollbackd')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, timeout=60, env=env)


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def test_validate_fails_naming_the_extra(rules, tmp_path):
    out = cli("validate", str(rules), blocked=True, cwd=tmp_path)
    assert out.returncode == 2
    assert MESSAGE in out.stderr
    assert f"{rules}:4:".encode() in out.stderr  # the line of the backend
    assert b"Traceback" not in out.stderr and b"OK" not in out.stdout


def test_run_refuses_the_same_file_with_the_same_message(rules, tmp_path):
    out = cli("run", "-c", str(rules), "--bootstrap-servers", "127.0.0.1:1", blocked=True, cwd=tmp_path)
    assert out.returncode == 2
    assert MESSAGE in out.stderr and b"Traceback" not in out.stderr


def test_with_the_extra_installed_the_file_is_ok(rules, tmp_path):
    pytest.importorskip("kubernetes")
    out = cli("validate", str(rules), blocked=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(b": OK\n")
