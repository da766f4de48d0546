"""The test Kubernetes API server itself (tests/k8s_cluster.py): what other tests rely on."""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes")

STREAM = """
apiVersion: v1
kind: ConfigMap
metadata: {name: rules}
data: {rules.yaml: "deployments: []"}
---
# an empty document, as helm template leaves between files
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: rollbackd}
rules:
- {apiGroups: [apps], resources: [deployments], verbs: [get, patch]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: rollbackd}
spec:
  serviceName: rollbackd
  selector: {matchLabels: {app: rollbackd}}
  template:
    metadata: {labels: {app: rollbackd}}
    spec: {containers: [{name: rollbackd, image: "rollbackd:dev"}]}
  volumeClaimTemplates:
  - metadata: {name: state}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
"""


def test_tls_auth_and_rbac_are_real(k8s):
    assert k8s.request("GET", "/readyz", token=None) == (200, "ok")
    assert k8s.request("GET", "/api/v1/namespaces", token="not-a-token")[0] == 401
    status, reply = k8s.request("GET", "/api/v1/namespaces", token=k8s.nobody_token)
    assert status == 403 and 'User "nobody" cannot list resource "namespaces"' in reply["message"]
    assert k8s.request("GET", "/api/v1/namespaces")[0] == 200
    assert {c["metadata"]["name"] for c in k8s.request(
        "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")[1]["items"]} >= {
        "rollouts.argoproj.io", "inferenceservices.serving.kserve.io"}


def test_apply_all_a_rendered_stream_twice(k8s):
    ns = k8s.namespace("apply-all")
    first = k8s.apply_all(STREAM, ns)
    assert [o["kind"] for o in first] == ["ConfigMap", "Role", "StatefulSet"]
    assert all(o["metadata"]["namespace"] == ns for o in first)
    again = k8s.apply_all(STREAM, ns)  # server-side apply: unchanged objects keep their version
    assert [o["metadata"]["resourceVersion"] for o in again] == [o["metadata"]["resourceVersion"] for o in first]
    assert k8s.get("apps/v1", "StatefulSet", "rollbackd", ns)["spec"]["serviceName"] == "rollbackd"


def test_a_crd_applied_as_a_manifest_is_served_at_once(k8s):
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.test"},
        "spec": {"group": "example.test", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object", "properties": {
                         "size": {"type": "integer"}}}}}}}]},
    }
    k8s.apply(crd)
    ns = k8s.namespace("crd")
    widget = {"apiVersion": "example.test/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}}
    assert k8s.apply(widget, ns)["spec"] == {"size": 3}
    # Server-side apply checks fields against the schema: a typo in a manifest is an error.
    with pytest.raises(Exception, match=r"\.spec\.sise: field not declared in schema"):
        k8s.apply({**widget, "spec": {"sise": 3}}, ns)


def test_a_service_account_has_the_rights_granted_and_no_more(k8s):
    ns = k8s.namespace("grant")
    k8s.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}, ns)
    token = k8s.grant(ns, "reader", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])
    assert k8s.request("GET", f"/api/v1/namespaces/{ns}/configmaps/c", token=token)[0] == 200
    status, reply = k8s.request("DELETE", f"/api/v1/namespaces/{ns}/configmaps/c", token=token)
    assert status == 403
    assert f'User "system:serviceaccount:{ns}:reader" cannot delete resource "configmaps"' in reply["message"]
