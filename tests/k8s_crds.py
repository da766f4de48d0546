"""The published CustomResourceDefinitions that rollbackd's tests need, read at test time from the
projects' Go modules (downloaded from the Go module proxy by ``go mod download`` into the Go module
cache, once per machine), never copied into this repository.

Use it from any test (``tests/`` is on pytest's path)::

    from k8s_crds import crd_documents, crd_schema

    crd_documents(["analysistemplates.argoproj.io", "canaries.flagger.app"])
        # -> [dict, dict]: the CRD documents as published, in the order asked, ready to apply to a
        #    kube-apiserver (POST /apis/apiextensions.k8s.io/v1/customresourcedefinitions)
    crd_documents()          # -> every CRD below (NAMES), in that order
    crd_schema("Canary")     # -> the served version's openAPIV3Schema of the CRD whose kind it is
    crd_schema("AnalysisTemplate", version="v1alpha1")

A CRD is named as Kubernetes names it, ``PLURAL.GROUP``; a kind names it in ``crd_schema``. The CRDs:

=====================================  ==============================================================
argoproj.io (Argo Rollouts v1.10.1)    rollouts, analysistemplates, clusteranalysistemplates,
                                       analysisruns, experiments
flagger.app (Flagger v1.36.1)          canaries, metrictemplates, alertproviders
monitoring.coreos.com (prometheus-     servicemonitors, prometheusrules
operator v0.85.0)
serving.kserve.io (ours)               inferenceservices: tests/k8s/crds/kserve-inferenceservice.yaml,
                                       written for these tests (KServe's module is not on the proxy)
=====================================  ==============================================================

Versions, and why these: Argo Rollouts v1.10.2 is the newest release, but it differs from v1.10.1
only in its go.mod's ``go 1.26.10`` line (same CRDs, same code), which the machine's Go 1.26.8
refuses to build or even unpack; tests/argo_eval uses v1.10.1 for the same reason. Flagger v1.36.1
is the newest Flagger on the Go module proxy (later releases, e.g. v1.44, are not published there
as this module); deploy/flagger/canary.yaml uses no field newer than it, which
tests/test_gate_crds.py checks. prometheus-operator v0.85.0 is the newest on the proxy.

Without ``go`` or the module proxy a call skips the calling test with the reason (pytest.skip);
under ``CI=true`` it fails it instead (pytest.fail), as for every tool .ci/run installs. Outside
pytest (``python3 tests/k8s_crds.py``, stdlib only) it downloads the modules and prints their
directories, which .ci/run uses to warm the module cache.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

OURS = Path(__file__).resolve().parent / "k8s" / "crds"


class Module(NamedTuple):
    path: str
    version: str


ARGO_ROLLOUTS = Module("github.com/argoproj/argo-rollouts", "v1.10.1")
FLAGGER = Module("github.com/fluxcd/flagger", "v1.36.1")
PROMETHEUS_OPERATOR = Module("github.com/prometheus-operator/prometheus-operator", "v0.85.0")
MODULES = (ARGO_ROLLOUTS, FLAGGER, PROMETHEUS_OPERATOR)

_PROM_CRDS = "example/prometheus-operator-crd/monitoring.coreos.com_"


class Source(NamedTuple):
    kind: str
    module: Module | None  # None: ours, in tests/k8s/crds/
    file: str  # in the module; it may hold several CRDs


SOURCES: dict[str, Source] = {
    "rollouts.argoproj.io": Source("Rollout", ARGO_ROLLOUTS, "manifests/crds/rollout-crd.yaml"),
    "analysistemplates.argoproj.io": Source("AnalysisTemplate", ARGO_ROLLOUTS,
                                            "manifests/crds/analysis-template-crd.yaml"),
    "clusteranalysistemplates.argoproj.io": Source("ClusterAnalysisTemplate", ARGO_ROLLOUTS,
                                                   "manifests/crds/cluster-analysis-template-crd.yaml"),
    "analysisruns.argoproj.io": Source("AnalysisRun", ARGO_ROLLOUTS, "manifests/crds/analysis-run-crd.yaml"),
    "experiments.argoproj.io": Source("Experiment", ARGO_ROLLOUTS, "manifests/crds/experiment-crd.yaml"),
    "canaries.flagger.app": Source("Canary", FLAGGER, "artifacts/flagger/crd.yaml"),
    "metrictemplates.flagger.app": Source("MetricTemplate", FLAGGER, "artifacts/flagger/crd.yaml"),
    "alertproviders.flagger.app": Source("AlertProvider", FLAGGER, "artifacts/flagger/crd.yaml"),
    "servicemonitors.monitoring.coreos.com": Source("ServiceMonitor", PROMETHEUS_OPERATOR,
                                                    _PROM_CRDS + "servicemonitors.yaml"),
    "prometheusrules.monitoring.coreos.com": Source("PrometheusRule", PROMETHEUS_OPERATOR,
                                                    _PROM_CRDS + "prometheusrules.yaml"),
    "inferenceservices.serving.kserve.io": Source("InferenceService", None, "kserve-inferenceservice.yaml"),
}
NAMES = tuple(SOURCES)


class CRDsUnavailable(RuntimeError):
    """A module could not be downloaded (no ``go``, no module proxy) or lacks the expected file."""


@functools.cache
def module_dir(module: Module) -> Path:
    """The module's directory in the Go module cache, downloading it on first use."""
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        raise CRDsUnavailable("`go` is not on PATH: the published CRDs cannot be downloaded")
    # Run outside any main module, so that no go.mod of this repository's tools is read or changed.
    with tempfile.TemporaryDirectory() as cwd:
        try:
            proc = subprocess.run([go, "mod", "download", "-json", f"{module.path}@{module.version}"],
                                  cwd=cwd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise CRDsUnavailable(f"go mod download {module.path}@{module.version} timed out") from exc
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if info.get("Error") or not info.get("Dir"):
        why = info.get("Error") or proc.stderr.strip()[-500:] or f"exit status {proc.returncode}"
        raise CRDsUnavailable(f"go mod download {module.path}@{module.version}: {why}")
    return Path(info["Dir"])


def _file(name: str) -> Path:
    try:
        source = SOURCES[name]
    except KeyError:
        raise KeyError(f"no CRD named {name!r}; known: {', '.join(NAMES)}") from None
    path = (OURS if source.module is None else module_dir(source.module)) / source.file
    if not path.is_file():
        raise CRDsUnavailable(f"{path}: not found (CRD {name})")
    return path


@functools.cache
def _documents_in(path: Path) -> tuple[dict[str, Any], ...]:
    import yaml  # not at import time: .ci/run runs this file before the venv exists

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=loader) if d)


def _unavailable(exc: CRDsUnavailable) -> None:
    from ci import unavailable  # pytest, not at import time: .ci/run runs this file on its own

    unavailable(f"published CRDs unavailable (the Go module proxy, via go): {exc}")


def _crd(name: str) -> dict[str, Any]:
    try:
        path = _file(name)
        found = [d for d in _documents_in(path)
                 if d.get("kind") == "CustomResourceDefinition" and d["metadata"]["name"] == name]
        if len(found) != 1:
            raise CRDsUnavailable(f"{path}: {len(found)} CRDs named {name}")
    except CRDsUnavailable as exc:
        _unavailable(exc)
        raise
    return found[0]


def crd_documents(names: list[str] | tuple[str, ...] = NAMES) -> list[dict[str, Any]]:
    """The CRD documents named (``PLURAL.GROUP``, see NAMES), as published, in the order asked.
    Each call returns fresh copies: a caller may change them."""
    return [copy.deepcopy(_crd(name)) for name in names]


def crd_schema(kind: str, version: str | None = None) -> dict[str, Any]:
    """The openAPIV3Schema of the CRD for ``kind`` (e.g. ``Canary``), at ``version`` or, without
    one, the single served version (an error if the CRD serves several)."""
    names = [n for n, source in SOURCES.items() if source.kind == kind]
    if not names:
        raise KeyError(f"no CRD of kind {kind!r}; known: {', '.join(s.kind for s in SOURCES.values())}")
    (crd,) = [_crd(n) for n in names]
    assert crd["spec"]["names"]["kind"] == kind, (names, crd["spec"]["names"])
    served = [v for v in crd["spec"]["versions"] if v.get("served") and version in (None, v["name"])]
    if len(served) != 1:
        have = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
        raise KeyError(f"{kind}: want one served version{f' {version}' if version else ''}, served: {have}")
    return copy.deepcopy(served[0]["schema"]["openAPIV3Schema"])


if __name__ == "__main__":
    try:
        for mod in MODULES:
            print(f"{mod.path}@{mod.version}: {module_dir(mod)}")
    except CRDsUnavailable as err:
        print(f"k8s_crds: {err}", file=sys.stderr)
        sys.exit(1)
