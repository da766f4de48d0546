"""The shipped AnalysisTemplate and Canary against the published CRDs (tests/k8s/crds/), the
way ``kubectl apply --validate=strict`` checks them: the CRD's openAPIV3Schema with unknown
fields refused. An API server without strict validation silently prunes an unknown field, so a
misspelt ``consecutiveSuccessLimit`` would apply cleanly and change the gate's behaviour."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "tests" / "k8s" / "crds"
SHIPPED = [
    (ROOT / "deploy" / "argo" / "analysis-template.yaml", CRDS / "argo-rollouts-analysistemplate.yaml"),
    (ROOT / "deploy" / "flagger" / "canary.yaml", CRDS / "flagger-canary.yaml"),
]


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


def validator(crd_path: Path, kind: str, api_version: str) -> jsonschema.Validator:
    (crd,) = yaml.load_all(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("manifest, crd", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifest_fits_the_published_crd(manifest, crd):
    (doc,) = yaml.safe_load_all(manifest.read_text())
    errors = sorted(validator(crd, doc["kind"], doc["apiVersion"]).iter_errors(doc), key=str)
    assert errors == [], [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_a_misspelt_field_is_caught():
    manifest, crd = SHIPPED[0]
    (doc,) = yaml.safe_load_all(manifest.read_text())
    bad = copy.deepcopy(doc)
    metric = bad["spec"]["metrics"][0]
    metric["consecutiveSucessLimit"] = metric.pop("consecutiveSuccessLimit")
    bad["spec"]["metrics"][0]["provider"]["web"]["timeoutSeconds"] = "ten"
    errors = list(validator(crd, doc["kind"], doc["apiVersion"]).iter_errors(bad))
    assert len(errors) == 2
