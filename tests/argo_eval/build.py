"""Build (once) or find argo-eval, our small Go program that measures an AnalysisTemplate's web
metrics with Argo Rollouts' own packages (see main.go). Stdlib only: .ci/run calls it before the
venv exists.

The binary is cached under ``~/.cache/rollbackd-argo-eval/<hash of the sources>/argo-eval``, so a
changed main.go, go.mod or go.sum builds anew. Building needs ``go`` (1.26.1 or newer, as Argo
Rollouts v1.10.1 requires) and the Go module proxy: the first build downloads
github.com/argoproj/argo-rollouts and its Kubernetes dependencies (about 100 MB into the Go module
cache) and compiles some 400 packages, about 90 s of CPU (4 minutes on a busy 2-core machine);
later builds of a changed main.go reuse Go's build cache.

    python3 tests/argo_eval/build.py      # prints the binary's path, building it if needed
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent
FILES = ("main.go", "go.mod", "go.sum")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rollbackd-argo-eval"


def binary_path() -> Path:
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(name.encode() + b"\0" + (SOURCE / name).read_bytes() + b"\0")
    return CACHE / digest.hexdigest()[:16] / "argo-eval"


def build(timeout: float = 1200.0) -> Path:
    """The binary, built if it is not cached; ``RuntimeError`` saying why it could not be."""
    target = binary_path()
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("`go` is not on PATH: argo-eval cannot be built")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    proc = subprocess.run([go, "build", "-mod=readonly", "-trimpath", "-o", str(partial), "."],
                          cwd=SOURCE, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"go build of argo-eval failed: {proc.stderr.strip()[-2000:]}")
    partial.replace(target)  # atomic: a concurrent reader sees no half-written binary
    return target


if __name__ == "__main__":
    try:
        print(build())
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"argo-eval: {exc}", file=sys.stderr)
        sys.exit(1)
