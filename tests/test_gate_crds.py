"""The shipped AnalysisTemplate and Canary against the published CRDs (read from Argo Rollouts' and
Flagger's Go modules at test time by tests/k8s_crds.py), the way ``kubectl apply --validate=strict``
checks them: the CRD's openAPIV3Schema with unknown fields refused. An API server without strict
validation silently prunes an unknown field, so a misspelt ``consecutiveSuccessLimit`` would apply
cleanly and change the gate's behaviour. Also our own InferenceService CRD (KServe's is not
published as a Go module): typed where rollbackd's kserve backend reads and writes, open elsewhere."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from k8s_crds import SOURCES, crd_documents, crd_schema

ROOT = Path(__file__).resolve().parent.parent
# Flagger's CRD is v1.36.1's, the newest Flagger on the Go module proxy, while the Canary example
# was written against Flagger v1.44 (see tests/k8s_crds.py): passing here means it uses no field
# that v1.36.1 lacks, and so applies to either.
SHIPPED = [ROOT / "deploy" / "argo" / "analysis-template.yaml", ROOT / "deploy" / "flagger" / "canary.yaml"]


def strict(schema: Any) -> Any:
    """A CRD schema as JSON Schema: objects with listed properties take no others (unless the CRD
    keeps unknown fields), int-or-string takes either, ``metadata`` is left to the server."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("format") == "url":  # not a JSON Schema format; the server does not check it either
        out.pop("format")
    return out


@functools.cache
def validator(kind: str, api_version: str) -> jsonschema.Validator:
    version = api_version.split("/")[1]
    schema = strict(crd_schema(kind, version=version))
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def errors_of(doc: dict[str, Any]) -> list[str]:
    errors = sorted(validator(doc["kind"], doc["apiVersion"]).iter_errors(doc), key=str)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("manifest", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifest_fits_the_published_crd(manifest):
    (doc,) = yaml.safe_load_all(manifest.read_text())
    (name,) = [n for n, source in SOURCES.items() if source.kind == doc["kind"]]
    assert name.endswith("." + doc["apiVersion"].split("/")[0])
    assert errors_of(doc) == []


def test_a_misspelt_field_is_caught():
    (doc,) = yaml.safe_load_all(SHIPPED[0].read_text())
    bad = copy.deepcopy(doc)
    metric = bad["spec"]["metrics"][0]
    metric["consecutiveSucessLimit"] = metric.pop("consecutiveSuccessLimit")
    bad["spec"]["metrics"][0]["provider"]["web"]["timeoutSeconds"] = "ten"
    assert len(errors_of(bad)) == 2


def test_the_crds_are_the_published_ones():
    """Each module's CRD documents, by name, in the order asked (what the k8s harness applies)."""
    names = ["analysistemplates.argoproj.io", "canaries.flagger.app", "servicemonitors.monitoring.coreos.com",
             "prometheusrules.monitoring.coreos.com", "inferenceservices.serving.kserve.io"]
    crds = crd_documents(names)
    assert [c["metadata"]["name"] for c in crds] == names
    assert all(c["apiVersion"] == "apiextensions.k8s.io/v1" and c["kind"] == "CustomResourceDefinition" for c in crds)
    crds[0]["spec"] = None  # a copy: the next caller gets the document as published
    assert crd_documents(names[:1])[0]["spec"]["names"]["kind"] == "AnalysisTemplate"


# An InferenceService as rollbackd's kserve backend finds and leaves it (rollbackd/actions/kubernetes.py).
INFERENCE_SERVICE = {
    "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
    "metadata": {"name": "demo-scorer", "annotations": {"rollbackd.io/incident": "abc"}},
    "spec": {"predictor": {"canaryTrafficPercent": 0, "minReplicas": 1,
                           "model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/demo/v1"}}},
    "status": {"url": "http://demo-scorer.default.example.com",
               "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
}


def test_our_kserve_crd_types_what_rollbackd_touches_and_keeps_the_rest():
    assert errors_of(INFERENCE_SERVICE) == []  # minReplicas, modelFormat: unknown to our CRD, kept
    older = copy.deepcopy(INFERENCE_SERVICE)
    older["spec"]["predictor"] = {"sklearn": {"storageUri": "s3://models/demo/v1", "resources": {}}}
    assert errors_of(older) == []
    bad = copy.deepcopy(INFERENCE_SERVICE)
    bad["spec"]["predictor"]["canaryTrafficPercent"] = "0"
    bad["spec"]["predictor"]["model"]["storageUri"] = 1
    bad["status"]["conditions"][0]["status"] = "yes"
    assert len(errors_of(bad)) == 3, errors_of(bad)


def _subset(expected: Any, stored: Any, path: str = "") -> list[str]:
    """Where ``stored`` lacks or changed a field of ``expected`` (a pruned or defaulted-over field)."""
    if isinstance(expected, dict):
        if not isinstance(stored, dict):
            return [path or "/"]
        return [miss for key, value in expected.items()
                for miss in _subset(value, stored.get(key), f"{path}/{key}")]
    if isinstance(expected, list):
        if not isinstance(stored, list) or len(stored) != len(expected):
            return [path]
        return [miss for i, (e, s) in enumerate(zip(expected, stored)) for miss in _subset(e, s, f"{path}/{i}")]
    return [] if expected == stored else [path]


@pytest.mark.parametrize("path", [*SHIPPED, ROOT / "deploy" / "argo" / "rollout.yaml"], ids=lambda p: p.name)
def test_shipped_manifests_apply_to_the_real_api_server(k8s, path):
    """Each shipped example, applied to a real kube-apiserver with the CRDs installed (server-side
    apply, unknown fields refused), is stored with every field it sets: nothing pruned."""
    namespace = k8s.namespace("gate-examples")
    expected = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in expected:  # an example's own namespace (canary.yaml: ml) becomes the test's
        doc["metadata"].pop("namespace", None)
    stored = k8s.apply_all(copy.deepcopy(expected), namespace=namespace)
    assert [(o["kind"], o["metadata"]["name"]) for o in stored] == [
        (d["kind"], d["metadata"]["name"]) for d in expected]
    for want, got in zip(expected, stored):
        assert got["metadata"]["namespace"] == namespace
        assert _subset(want["spec"], got["spec"]) == []
