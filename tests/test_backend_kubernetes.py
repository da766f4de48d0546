"""The kubernetes backend (kinds deployment, argo-rollout, kserve) against a real kube-apiserver.

The session's API server (``k8s`` fixture, tests/k8s_cluster.py) runs with RBAC and the published
Argo Rollouts and KServe CRDs; each test works in a namespace of its own. No controller runs, so
the tests write ``status`` through the status subresource where a controller would (Deployment
rollout progress, Argo's ``abortedAt``, KServe's traffic split). Faults a real server does not
produce on demand (5xx, hangs) are in test_backend_kubernetes_faults.py.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("kubernetes")

from rollbackd.actions import RollbackPlan, make_backend  # noqa: E402
from rollbackd.actions.base import current_version, pause_rollout, verify_plan  # noqa: E402
from rollbackd.actions.kubernetes import MAX_CONFLICTS, KubernetesBackend, version_from  # noqa: E402
from rollbackd.actions.retry import RetryPolicy  # noqa: E402
from rollbackd.rules.model import BackendSpec  # noqa: E402

NAME = "demo-scorer"
DEPLOY = ("apps/v1", "Deployment")
ROLLOUT = ("argoproj.io/v1alpha1", "Rollout")
ISVC = ("serving.kserve.io/v1beta1", "InferenceService")


def deployment(image="registry/demo:2", label="2", env="2") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": NAME},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "demo"}},
            "template": {
                "metadata": {"labels": {"app": "demo", "model-version": label}},
                "spec": {"containers": [
                    {"name": "sidecar", "image": "envoy:1"},
                    {"name": "model", "image": image,
                     "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "MODEL_VERSION", "value": env}]},
                ]},
            },
        },
    }


def rollout() -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "metadata": {"name": NAME},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "demo"}},
            "template": {"metadata": {"labels": {"app": "demo"}},
                         "spec": {"containers": [{"name": "model", "image": "registry/demo:2"}]}},
            "strategy": {"canary": {"steps": [{"setWeight": 20}, {"pause": {}}]}},
        },
    }


def isvc(canary: int | None = 20, uri="s3://models/demo/2") -> dict[str, Any]:
    predictor: dict[str, Any] = {"model": {"modelFormat": {"name": "sklearn"}, "storageUri": uri}}
    if canary is not None:
        predictor["canaryTrafficPercent"] = canary
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": NAME},
            "spec": {"predictor": predictor}}


def plan(to="1", frm="2", incident="inc-k8s-1") -> RollbackPlan:
    return RollbackPlan(NAME, "canary", frm, to, incident, "latency firing")


@pytest.fixture
def ns(k8s, request) -> str:
    return k8s.namespace(request.node.name)


def backend(k8s, ns: str, kind: str, token: str | None = None, **kw: Any) -> KubernetesBackend:
    """Through a kubeconfig (server, CA, token), as an operator outside the cluster would."""
    kw.setdefault("policy", RetryPolicy(max_attempts=3, base_delay=0.0))
    return KubernetesBackend(kind, namespace=ns, kubeconfig=k8s.kubeconfig(token), **kw)


def annotations(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("annotations") or {}


# -- pure helpers (no server) ---------------------------------------------------------------

def test_version_from_template():
    assert version_from("registry/demo:{version}", "registry/demo:1.2") == "1.2"
    assert version_from("registry/demo:{version}", "other/demo:1.2") is None
    assert version_from("s3://m/{version}/model", "s3://m/7/model") == "7"


def test_options_are_checked():
    with pytest.raises(ValueError, match="at least one of image_template"):
        KubernetesBackend("deployment", api_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="exactly once"):
        KubernetesBackend("deployment", api_url="http://127.0.0.1:1", image_template="r/m:latest")
    with pytest.raises(ValueError, match="kind must be one of"):
        KubernetesBackend("statefulset", api_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="deployment only"):
        KubernetesBackend("kserve", api_url="http://127.0.0.1:1", label="v")
    with pytest.raises(ValueError, match="known: kind, name"):
        make_backend(BackendSpec(type="kubernetes", options={"kind": "kserve", "image": "x"}), env={})


# -- Deployment -----------------------------------------------------------------------------

def test_deployment_image_label_env(k8s, ns):
    k8s.apply(deployment(), ns)
    b = backend(k8s, ns, "deployment", container="model", image_template="registry/demo:{version}",
                label="model-version", env_var="MODEL_VERSION")
    assert b.current(NAME, "canary") == "2"

    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    assert result.data["conflicts"] == 0
    obj = k8s.get(*DEPLOY, NAME, ns)
    assert annotations(obj)["rollbackd.io/incident"] == "inc-k8s-1"
    assert annotations(obj)["rollbackd.io/rolled-back-from"] == "2"
    template = obj["spec"]["template"]
    assert template["metadata"]["labels"] == {"app": "demo", "model-version": "1"}
    sidecar, model = template["spec"]["containers"]
    assert (sidecar["name"], sidecar["image"]) == ("sidecar", "envoy:1")  # the server's strategic merge
    assert model["image"] == "registry/demo:1"
    assert model["env"] == [{"name": "LOG_LEVEL", "value": "info"}, {"name": "MODEL_VERSION", "value": "1"}]
    assert b.current(NAME, "canary") == "1"

    again = b.apply(plan())
    assert again.status == "skipped"
    assert k8s.get(*DEPLOY, NAME, ns)["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_deployment_verify_reads_the_rollout_status(k8s, ns):
    k8s.apply(deployment(), ns)
    # Without ``container`` the first container is meant; the sidecar's image does not fit.
    assert backend(k8s, ns, "deployment", image_template="registry/demo:{version}").current(NAME, "x") is None
    b = backend(k8s, ns, "deployment", container="model", image_template="registry/demo:{version}")
    assert b.verify(plan()).status == "failed"
    assert b.apply(plan()).status == "succeeded"
    generation = k8s.get(*DEPLOY, NAME, ns)["metadata"]["generation"]
    assert generation == 2  # the server counted the template change

    k8s.patch_status(*DEPLOY, NAME, ns, {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                                          "readyReplicas": 2, "availableReplicas": 2})  # the old rollout's numbers
    pending = verify_plan(b, plan())
    assert (pending.status, pending.data["pending"]) == ("failed", True)
    k8s.patch_status(*DEPLOY, NAME, ns, {"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 2, "availableReplicas": 2})
    assert verify_plan(b, plan()).data["pending"] is True
    k8s.patch_status(*DEPLOY, NAME, ns, {"observedGeneration": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2})
    done = verify_plan(b, plan())
    assert (done.status, done.detail) == ("succeeded", "rolled out: 2 replicas at 1")


def test_a_rollout_is_confirmed_once_it_converges_and_not_before(k8s, ns):
    """The executor's confirmation polls verify(): the controller (played between looks, through
    the status subresource) converges after the third look; one that never does is unconfirmed."""
    from rollbackd.actions.verification import Confirmer

    k8s.apply(deployment(), ns)
    b = backend(k8s, ns, "deployment", container="model", image_template="registry/demo:{version}")
    assert b.apply(plan()).status == "succeeded"
    steps = iter([{"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1},
                  {"observedGeneration": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}])
    t = [0.0]

    def controller(s: float) -> None:
        t[0] += s
        step = next(steps, None)
        if step is not None:
            k8s.patch_status(*DEPLOY, NAME, ns, step)

    v = Confirmer(sleep=controller, monotonic=lambda: t[0]).confirm(b, plan(), 900.0, "kubernetes")
    assert (v.verdict, v.polls, t[0]) == ("confirmed", 3, 3.0)
    assert v.detail == "rolled out: 2 replicas at 1"

    k8s.patch_status(*DEPLOY, NAME, ns, {"readyReplicas": 1, "availableReplicas": 1})  # a pod that never becomes available
    t[0] = 0.0
    v = Confirmer(sleep=controller, monotonic=lambda: t[0]).confirm(b, plan(), 60.0, "kubernetes")
    assert (v.verdict, v.polls, t[0]) == ("unconfirmed", 7, 60.0)
    assert v.detail == "rollout in progress: {'updatedReplicas': 2, 'availableReplicas': 1}, want 2"


# -- Argo Rollouts ----------------------------------------------------------------------------

def test_argo_rollout_abort_is_annotated_and_verified_through_status(k8s, ns):
    k8s.apply(rollout(), ns)
    k8s.patch_status(*ROLLOUT, NAME, ns, {"phase": "Paused", "stableRS": "5f7c8", "currentPodHash": "6d9b4"})
    b = backend(k8s, ns, "argo-rollout")
    assert b.verify(plan()).status == "failed"
    assert current_version(b, NAME, "canary") is None

    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    assert (result.detail, result.data["annotated"]) == (f"rollout {ns}/{NAME} aborted", True)
    obj = k8s.get(*ROLLOUT, NAME, ns)
    assert obj["status"]["abort"] is True
    assert obj["status"]["stableRS"] == "5f7c8"  # merged into the controller's status
    # The bug this guards: the abort went to the status subresource only, which drops metadata.
    assert annotations(obj)["rollbackd.io/incident"] == "inc-k8s-1"
    assert annotations(obj)["rollbackd.io/rolled-back-from"] == "2"
    assert obj["spec"] == k8s.apply(rollout(), ns)["spec"]  # the spec is not touched

    pending = b.verify(plan())
    assert (pending.status, pending.data["pending"]) == ("failed", True)
    assert "not yet reconciled" in pending.detail
    # The controller reconciles the abort; with traffic routing it reports the weights it set.
    k8s.patch_status(*ROLLOUT, NAME, ns, {"abortedAt": "2026-01-01T00:00:00Z", "phase": "Degraded",
                                           "canary": {"weights": {"canary": {"podTemplateHash": "6d9b4", "weight": 20},
                                                                  "stable": {"podTemplateHash": "5f7c8", "weight": 80}}}})
    still = b.verify(plan())
    assert (still.status, still.data) == ("failed", {"pending": True, "canary_weight": 20})
    k8s.patch_status(*ROLLOUT, NAME, ns, {"canary": {"weights": {"canary": {"podTemplateHash": "6d9b4", "weight": 0},
                                                                 "stable": {"podTemplateHash": "5f7c8", "weight": 100}}}})
    done = b.verify(plan())
    assert (done.status, done.data["phase"]) == ("succeeded", "Degraded")

    assert b.apply(plan(incident="inc-k8s-2")).status == "skipped"
    assert annotations(k8s.get(*ROLLOUT, NAME, ns))["rollbackd.io/incident"] == "inc-k8s-1"


def test_argo_rollout_pause_for_the_freeze_policy(k8s, ns):
    k8s.apply(rollout(), ns)
    b = backend(k8s, ns, "argo-rollout")
    result = pause_rollout(b, NAME, "canary", "inc-k8s-1")
    assert result is not None and result.status == "succeeded", result
    assert result.data["paused"] is True
    obj = k8s.get(*ROLLOUT, NAME, ns)
    assert obj["spec"]["paused"] is True
    assert obj["spec"]["strategy"]["canary"]["steps"] == [{"setWeight": 20}, {"pause": {}}]  # merged
    assert annotations(obj)["rollbackd.io/incident"] == "inc-k8s-1"
    again = b.pause(NAME, "canary", "inc-k8s-2")
    assert (again.status, again.data["paused"]) == ("skipped", True)
    assert k8s.get(*ROLLOUT, NAME, ns)["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_only_argo_rollouts_are_paused(k8s, ns):
    from rollbackd.actions.logbackend import LogBackend

    k8s.apply(isvc(), ns)
    k8s.apply(deployment(), ns)
    before = {kind: k8s.get(*kind, NAME, ns)["metadata"]["resourceVersion"] for kind in (ISVC, DEPLOY)}
    for b in (backend(k8s, ns, "kserve"), backend(k8s, ns, "deployment", image_template="registry/demo:{version}")):
        result = b.pause(NAME, "canary", "inc-k8s-1")
        assert (result.status, result.data["paused"]) == ("skipped", False)
    assert before == {kind: k8s.get(*kind, NAME, ns)["metadata"]["resourceVersion"] for kind in (ISVC, DEPLOY)}
    assert pause_rollout(LogBackend(), NAME, "canary", "inc-k8s-1") is None


def test_a_failed_pause_is_reported(k8s, ns):
    result = backend(k8s, ns, "argo-rollout").pause(NAME, "canary", "inc-k8s-1")
    assert (result.status, result.data["paused"]) == ("failed", False)
    assert result.detail == (f"read rollouts {ns}/{NAME}: gave up: HTTP 404 Not Found: "
                             f'rollouts.argoproj.io "{NAME}" not found')


# -- KServe -----------------------------------------------------------------------------------

def test_kserve_canary_to_zero_verified_by_the_traffic_split(k8s, ns):
    k8s.apply(isvc(), ns)
    b = backend(k8s, ns, "kserve")
    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    obj = k8s.get(*ISVC, NAME, ns)
    assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert obj["spec"]["predictor"]["model"]["storageUri"] == "s3://models/demo/2"
    assert annotations(obj)["rollbackd.io/incident"] == "inc-k8s-1"
    assert b.apply(plan()).status == "skipped"

    def traffic(latest: int) -> dict[str, Any]:
        return {"conditions": [{"type": "Ready", "status": "True"}],
                "components": {"predictor": {"traffic": [
                    {"revisionName": "demo-scorer-predictor-00002", "latestRevision": True, "percent": latest},
                    {"revisionName": "demo-scorer-predictor-00001", "latestRevision": False, "tag": "prev",
                     "percent": 100 - latest}]}}}

    k8s.patch_status(*ISVC, NAME, ns, traffic(20))  # KServe has not moved the traffic yet
    pending = b.verify(plan())
    assert (pending.status, pending.data) == ("failed", {"pending": True, "canary_percent": 20})
    k8s.patch_status(*ISVC, NAME, ns, traffic(0))
    assert b.verify(plan()).status == "succeeded"


def test_kserve_storage_uri(k8s, ns):
    k8s.apply(isvc(canary=10), ns)
    b = backend(k8s, ns, "kserve", storage_uri_template="s3://models/demo/{version}")
    assert b.current(NAME, "canary") == "2"
    assert b.apply(plan()).status == "succeeded"
    predictor = k8s.get(*ISVC, NAME, ns)["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor  # null in the merge patch removed it
    assert predictor["model"] == {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/demo/1"}
    assert b.current(NAME, "canary") == "1"
    assert b.apply(plan()).status == "skipped"
    k8s.patch_status(*ISVC, NAME, ns, {"conditions": [{"type": "Ready", "status": "False"}]})
    assert b.verify(plan()).data["pending"] is True
    k8s.patch_status(*ISVC, NAME, ns, {"conditions": [{"type": "Ready", "status": "True"}]})
    assert b.verify(plan()).status == "succeeded"


# -- errors a user must be able to act on -----------------------------------------------------

def test_not_found_gives_up_at_once(k8s, ns):
    result = backend(k8s, ns, "argo-rollout").apply(plan())
    assert (result.status, result.attempts) == ("failed", 1)
    assert result.detail == (f"read rollouts {ns}/{NAME}: gave up: HTTP 404 Not Found: "
                             f'rollouts.argoproj.io "{NAME}" not found')


def test_a_wrong_token_gives_up(k8s, ns):
    k8s.apply(rollout(), ns)
    b = KubernetesBackend("argo-rollout", namespace=ns, api_url=k8s.api_url, token="wrong", ca_file=k8s.ca_file)
    result = b.apply(plan())
    assert (result.status, result.attempts) == ("failed", 1)
    assert result.detail == f"read rollouts {ns}/{NAME}: gave up: HTTP 401 Unauthorized"


def test_api_url_and_token_verify_the_servers_certificate_with_ca_file(k8s, ns):
    """The options a pod outside the cluster uses: the API server's address, a token and its
    private CA. Without the CA the certificate is refused; with it the rollback goes through."""
    k8s.apply(rollout(), ns)
    untrusted = KubernetesBackend("argo-rollout", namespace=ns, api_url=k8s.api_url, token=k8s.token,
                                  policy=RetryPolicy(max_attempts=1))
    refused = untrusted.apply(plan())
    assert refused.status == "failed" and "CERTIFICATE_VERIFY_FAILED" in refused.detail
    trusted = KubernetesBackend("argo-rollout", namespace=ns, api_url=k8s.api_url, token=k8s.token,
                                ca_file=k8s.ca_file)
    assert trusted.apply(plan()).status == "succeeded"
    with pytest.raises(ValueError, match="ca_file '/nonexistent/ca.crt' is not a readable file"):
        KubernetesBackend("argo-rollout", namespace=ns, api_url=k8s.api_url, token=k8s.token,
                          ca_file="/nonexistent/ca.crt")


def test_rbac_denied_names_who_may_not_do_what(k8s, ns):
    k8s.apply(deployment(), ns)
    b = backend(k8s, ns, "deployment", token=k8s.nobody_token, image_template="registry/demo:{version}",
                container="model")
    result = b.apply(plan())
    assert (result.status, result.attempts) == ("failed", 1)
    assert result.detail == (
        f"read deployment {ns}/{NAME}: gave up: HTTP 403 Forbidden: deployments.apps \"{NAME}\" is forbidden: "
        f'User "nobody" cannot get resource "deployments" in API group "apps" in the namespace "{ns}"'
    )
    assert "\n" not in result.detail and "Traceback" not in result.detail

    reader = k8s.grant(ns, "reader", [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}])
    result = backend(k8s, ns, "deployment", token=reader, image_template="registry/demo:{version}",
                     container="model").apply(plan())
    assert result.status == "failed"
    assert result.detail.endswith(
        f'User "system:serviceaccount:{ns}:reader" cannot patch resource "deployments" in API group "apps" '
        f'in the namespace "{ns}"')
    assert k8s.get(*DEPLOY, NAME, ns)["metadata"]["generation"] == 1  # nothing changed


def test_argo_rbac_abort_without_annotate_and_the_reverse(k8s, ns):
    k8s.apply(rollout(), ns)
    get = {"apiGroups": ["argoproj.io"], "resources": ["rollouts"], "verbs": ["get"]}
    status_only = k8s.grant(ns, "aborter", [get, {"apiGroups": ["argoproj.io"], "resources": ["rollouts/status"],
                                                  "verbs": ["patch"]}])
    spec_only = k8s.grant(ns, "pauser", [{**get, "verbs": ["get", "patch"]}])

    denied = backend(k8s, ns, "argo-rollout", token=spec_only).apply(plan())
    assert denied.status == "failed"
    assert denied.detail.endswith(f'cannot patch resource "rollouts/status" in API group "argoproj.io" '
                                  f'in the namespace "{ns}"')
    assert "abort" not in (k8s.get(*ROLLOUT, NAME, ns).get("status") or {})

    # Aborting is what matters; a missing right to annotate does not fail nor undo it.
    half = backend(k8s, ns, "argo-rollout", token=status_only).apply(plan())
    assert (half.status, half.data["annotated"]) == ("succeeded", False)
    assert half.detail.startswith(f"rollout {ns}/{NAME} aborted; not annotated: annotate rollout")
    assert half.detail.endswith(f'cannot patch resource "rollouts" in API group "argoproj.io" in the namespace "{ns}"')
    obj = k8s.get(*ROLLOUT, NAME, ns)
    assert obj["status"]["abort"] is True and "rollbackd.io/incident" not in annotations(obj)


def test_least_privilege_rules_are_enough_for_every_kind(k8s, ns):
    """The rights docs/backends.md lists: get + patch on the object, patch on rollouts/status."""
    k8s.apply(deployment(), ns)
    k8s.apply(rollout(), ns)
    k8s.apply(isvc(), ns)
    token = k8s.grant(ns, "rollbackd", [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
        {"apiGroups": ["argoproj.io"], "resources": ["rollouts"], "verbs": ["get", "patch"]},
        {"apiGroups": ["argoproj.io"], "resources": ["rollouts/status"], "verbs": ["patch"]},
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["get", "patch"]},
    ])
    for kind, kw in (("deployment", {"image_template": "registry/demo:{version}", "container": "model"}),
                     ("argo-rollout", {}), ("kserve", {})):
        b = backend(k8s, ns, kind, token=token, **kw)
        result = b.apply(plan())
        assert result.status == "succeeded", (kind, result.detail)
        if kind == "argo-rollout":
            assert result.data["annotated"] is True
            assert b.pause(NAME, "canary", "inc-k8s-1").status == "succeeded"


def test_factory_with_a_kubeconfig_and_a_context(k8s, ns):
    k8s.apply(isvc(), ns)
    b = make_backend(BackendSpec(type="kubernetes", options={
        "kind": "kserve", "namespace": ns, "kubeconfig": k8s.kubeconfig(name="prod"), "context": "prod",
        "retry": {"max_attempts": 1}}), env={})
    assert b.apply(plan()).status == "succeeded"
    assert k8s.get(*ISVC, NAME, ns)["spec"]["predictor"]["canaryTrafficPercent"] == 0


# -- concurrent edits -------------------------------------------------------------------------

def edit_after_each_read(b: KubernetesBackend, edit, times: int = 1) -> list[int]:
    """Another writer changes the object right after the backend's read and before its patch
    (between the two requests: a real conflict, made deterministic). Returns a read counter."""
    reads = [0]
    read = b._get

    def racing_read(target: str) -> dict[str, Any]:
        obj = read(target)
        reads[0] += 1
        if reads[0] <= times:
            edit(reads[0])
        return obj

    b._get = racing_read  # type: ignore[method-assign]
    return reads


def test_a_concurrent_edit_is_read_again_and_kept(k8s, ns):
    k8s.apply(deployment(), ns)
    b = backend(k8s, ns, "deployment", container="model", image_template="registry/demo:{version}")
    reads = edit_after_each_read(b, lambda _: k8s.patch(*DEPLOY, NAME, ns, {"spec": {"replicas": 3}}))
    result = b.apply(plan())
    assert (result.status, result.data["conflicts"], reads[0]) == ("succeeded", 1, 2)
    obj = k8s.get(*DEPLOY, NAME, ns)
    assert obj["spec"]["replicas"] == 3  # theirs
    assert obj["spec"]["template"]["spec"]["containers"][1]["image"] == "registry/demo:1"  # ours


def test_a_concurrent_rollback_by_someone_else_is_not_redone(k8s, ns):
    k8s.apply(deployment(), ns)
    b = backend(k8s, ns, "deployment", container="model", image_template="registry/demo:{version}")
    human = {"metadata": {"annotations": {"kubernetes.io/change-cause": "kubectl set image by alice"}},
             "spec": {"template": {"spec": {"containers": [{"name": "model", "image": "registry/demo:1"}]}}}}
    edit_after_each_read(b, lambda _: k8s.dynamic().patch(k8s.resource(*DEPLOY), body=human, name=NAME,
                                                          namespace=ns))
    result = b.apply(plan())
    assert (result.status, result.data["conflicts"]) == ("skipped", 1)
    assert "rollbackd.io/incident" not in annotations(k8s.get(*DEPLOY, NAME, ns))  # alice's change, not ours


def test_an_object_that_keeps_changing_fails_clearly(k8s, ns):
    k8s.apply(isvc(), ns)
    b = backend(k8s, ns, "kserve")
    reads = edit_after_each_read(
        b, lambda n: k8s.patch(*ISVC, NAME, ns, {"metadata": {"labels": {"touched": str(n)}}}), times=99)
    result = b.apply(plan())
    assert result.status == "failed"
    assert (result.data["conflicts"], reads[0]) == (MAX_CONFLICTS + 1, MAX_CONFLICTS + 1)
    assert result.detail.startswith(
        f"kserve {ns}/{NAME} changed under every write ({MAX_CONFLICTS + 1} resourceVersion conflicts in a row; "
        f"something else keeps writing to it): patch inferenceservice {ns}/{NAME}: gave up: HTTP 409 Conflict: ")
    assert "the object has been modified" in result.detail
    assert k8s.get(*ISVC, NAME, ns)["spec"]["predictor"]["canaryTrafficPercent"] == 20  # never written
