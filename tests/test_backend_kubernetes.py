"""Kubernetes backend through the official client, against a loopback stand-in for the API server.

No API server runs here; :class:`FakeAPIServer` answers GET and PATCH like one would for the
three object kinds, and *checks* what the client sends: the method, the path, the patch's
content type (strategic merge for Deployments, JSON merge patch for custom objects) and body.
"""

from __future__ import annotations

import copy
import json
import socket

import pytest
from loopback import LoopbackServer, Recorded, Reply

pytest.importorskip("kubernetes")

from rollbackd.actions import RollbackPlan, make_backend  # noqa: E402
from rollbackd.actions.base import current_version, verify_plan  # noqa: E402
from rollbackd.actions.kubernetes import KubernetesBackend, version_from  # noqa: E402
from rollbackd.actions.retry import RetryPolicy  # noqa: E402
from rollbackd.rules.model import BackendSpec  # noqa: E402

TOKEN = "k8s-test-token"
DEPLOY = "/apis/apps/v1/namespaces/ml/deployments/demo-scorer"
ROLLOUT = "/apis/argoproj.io/v1alpha1/namespaces/ml/rollouts/demo-scorer"
ISVC = "/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/demo-scorer"


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_patch(target, patch):
    """Strategic merge for what the backend sends: lists of containers/env merge by ``name``."""
    if isinstance(patch, list) and isinstance(target, list) and all(isinstance(x, dict) and "name" in x for x in patch):
        out = [copy.deepcopy(x) for x in target]
        for item in patch:
            for i, old in enumerate(out):
                if old.get("name") == item["name"]:
                    out[i] = strategic_patch(old, item)
                    break
            else:
                out.append(item)
        return out
    if isinstance(patch, dict):
        out = dict(target) if isinstance(target, dict) else {}
        for k, v in patch.items():
            out[k] = strategic_patch(out.get(k), v)
        return out
    return patch


def deployment(image="registry/demo:2", label="2", env="2"):
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "demo-scorer", "namespace": "ml", "generation": 5},
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
        "status": {"observedGeneration": 5, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2},
    }


def rollout(abort=False):
    obj = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
           "metadata": {"name": "demo-scorer", "namespace": "ml"},
           "spec": {"strategy": {"canary": {"steps": [{"setWeight": 20}]}}},
           "status": {"phase": "Paused", "stableRS": "abc"}}
    if abort:
        obj["status"]["abort"] = True
    return obj


def isvc(canary=20, uri="s3://models/demo/2"):
    predictor = {"model": {"modelFormat": {"name": "sklearn"}, "storageUri": uri}}
    if canary is not None:
        predictor["canaryTrafficPercent"] = canary
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "demo-scorer", "namespace": "ml"}, "spec": {"predictor": predictor},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


class FakeAPIServer:
    """Serves objects by path; PATCH applies the patch type named by Content-Type, or answers 415."""

    def __init__(self, objects):
        self.objects = {path: copy.deepcopy(obj) for path, obj in objects.items()}
        self.problems: list[str] = []

    def __call__(self, req: Recorded) -> Reply:
        if req.header("Authorization") != f"Bearer {TOKEN}":
            return Reply(401, body={"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401})
        path = req.path.split("?")[0]
        subresource = path.endswith("/status") and path[: -len("/status")] in self.objects
        key = path[: -len("/status")] if subresource else path
        if key not in self.objects:
            return Reply(404, body={"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})
        if req.method == "GET":
            return Reply(200, body=self.objects[key])
        if req.method != "PATCH":
            self.problems.append(f"unexpected {req.method} {req.path}")
            return Reply(405, body={"kind": "Status", "code": 405})
        ctype = (req.header("Content-Type") or "").split(";")[0]
        body = req.json()
        if ctype == "application/merge-patch+json":
            self.objects[key] = merge_patch(self.objects[key], body)
        elif ctype == "application/strategic-merge-patch+json" and "/apis/apps/" in key:
            self.objects[key] = strategic_patch(self.objects[key], body)
        else:
            self.problems.append(f"content type {ctype} for {req.path}")
            return Reply(415, body={"kind": "Status", "code": 415, "reason": "UnsupportedMediaType"})
        return Reply(200, body=self.objects[key])


@pytest.fixture
def api():
    def make(objects):
        fake = FakeAPIServer(objects)
        server = LoopbackServer(fake)
        servers.append(server)
        return fake, server

    servers: list[LoopbackServer] = []
    yield make
    for s in servers:
        s.close()


def plan(to="1", frm="2") -> RollbackPlan:
    return RollbackPlan("demo-scorer", "canary", frm, to, "inc-k8s-1", "latency firing")


def backend(server, kind, **kw) -> KubernetesBackend:
    kw.setdefault("policy", RetryPolicy(max_attempts=3, base_delay=0.0))
    return KubernetesBackend(kind, namespace="ml", api_url=server.url, token=TOKEN, **kw)


def patches(server):
    return [r for r in server.requests if r.method == "PATCH"]


def test_version_from_template():
    assert version_from("registry/demo:{version}", "registry/demo:1.2") == "1.2"
    assert version_from("registry/demo:{version}", "other/demo:1.2") is None
    assert version_from("s3://m/{version}/model", "s3://m/7/model") == "7"


def test_deployment_image_label_env(api):
    fake, server = api({DEPLOY: deployment()})
    b = backend(server, "deployment", container="model", image_template="registry/demo:{version}",
                label="model-version", env_var="MODEL_VERSION")
    assert b.current("demo-scorer", "canary") == "2"

    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    (patch,) = patches(server)
    assert patch.path == DEPLOY
    assert patch.header("Content-Type") == "application/strategic-merge-patch+json"
    assert patch.json() == {
        "metadata": {"annotations": {"rollbackd.io/incident": "inc-k8s-1", "rollbackd.io/rolled-back-from": "2"}},
        "spec": {"template": {
            "metadata": {"labels": {"model-version": "1"}},
            "spec": {"containers": [{"name": "model", "image": "registry/demo:1",
                                     "env": [{"name": "MODEL_VERSION", "value": "1"}]}]},
        }},
    }
    obj = fake.objects[DEPLOY]
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert containers[0] == {"name": "sidecar", "image": "envoy:1"}  # untouched by the merge
    assert containers[1]["env"] == [{"name": "LOG_LEVEL", "value": "info"}, {"name": "MODEL_VERSION", "value": "1"}]
    assert b.current("demo-scorer", "canary") == "1"
    assert fake.problems == []

    again = b.apply(plan())
    assert again.status == "skipped"
    assert len(patches(server)) == 1


def test_deployment_verify_waits_for_rollout(api):
    fake, server = api({DEPLOY: deployment()})
    # Without ``container`` the first container is meant; the sidecar's image does not fit.
    assert backend(server, "deployment", image_template="registry/demo:{version}").current("demo-scorer", "x") is None
    b = backend(server, "deployment", container="model", image_template="registry/demo:{version}")
    assert b.verify(plan()).status == "failed"
    assert b.apply(plan()).status == "succeeded"
    fake.objects[DEPLOY]["metadata"]["generation"] = 6
    fake.objects[DEPLOY]["status"].update(updatedReplicas=1)
    pending = verify_plan(b, plan())
    assert (pending.status, pending.data["pending"]) == ("failed", True)
    fake.objects[DEPLOY]["status"].update(observedGeneration=6, updatedReplicas=2, availableReplicas=2)
    assert verify_plan(b, plan()).status == "succeeded"


def test_argo_rollout_abort(api):
    fake, server = api({ROLLOUT: rollout()})
    b = backend(server, "argo-rollout")
    assert b.verify(plan()).status == "failed"
    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    (patch,) = patches(server)
    assert patch.path == ROLLOUT + "/status"
    assert patch.header("Content-Type") == "application/merge-patch+json"
    assert patch.json() == {"status": {"abort": True}}
    assert fake.objects[ROLLOUT]["status"]["abort"] is True
    assert b.apply(plan()).status == "skipped"
    assert b.verify(plan()).status == "succeeded"
    assert current_version(b, "demo-scorer", "canary") is None
    assert fake.problems == []


def test_kserve_canary_to_zero(api):
    fake, server = api({ISVC: isvc()})
    b = backend(server, "kserve")
    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    (patch,) = patches(server)
    assert (patch.path, patch.header("Content-Type")) == (ISVC, "application/merge-patch+json")
    assert patch.json()["spec"] == {"predictor": {"canaryTrafficPercent": 0}}
    assert fake.objects[ISVC]["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert b.apply(plan()).status == "skipped"
    assert b.verify(plan()).status == "succeeded"


def test_kserve_storage_uri(api):
    fake, server = api({ISVC: isvc(canary=10)})
    b = backend(server, "kserve", storage_uri_template="s3://models/demo/{version}")
    assert b.current("demo-scorer", "canary") == "2"
    assert b.apply(plan()).status == "succeeded"
    (patch,) = patches(server)
    assert patch.json()["spec"] == {"predictor": {"model": {"storageUri": "s3://models/demo/1"},
                                                  "canaryTrafficPercent": None}}
    predictor = fake.objects[ISVC]["spec"]["predictor"]
    assert predictor == {"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/demo/1"}}
    assert b.current("demo-scorer", "canary") == "1"
    assert b.apply(plan()).status == "skipped"
    fake.objects[ISVC]["status"]["conditions"][0]["status"] = "False"
    assert b.verify(plan()).data["pending"] is True


def test_not_found_gives_up_at_once(api):
    _, server = api({})
    b = backend(server, "argo-rollout")
    result = b.apply(plan())
    assert result.status == "failed"
    assert result.attempts == 1
    assert "404" in result.detail


def test_unauthorized_gives_up(api):
    _, server = api({ROLLOUT: rollout()})
    b = KubernetesBackend("argo-rollout", namespace="ml", api_url=server.url, token="wrong")
    result = b.apply(plan())
    assert (result.status, result.attempts) == ("failed", 1)
    assert "401" in result.detail


def test_server_errors_are_retried(api):
    fake, server = api({ROLLOUT: rollout()})
    server.reply(Reply(503, body={"kind": "Status", "code": 503}), Reply(500, body={"kind": "Status", "code": 500}))
    sleeps = []
    b = backend(server, "argo-rollout", policy=RetryPolicy(max_attempts=4, base_delay=0.1), sleep=sleeps.append)
    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    assert result.attempts == 4  # 3 reads (2 failed) + 1 patch
    assert sleeps == [0.1, 0.2]


def test_api_down_retries_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    b = KubernetesBackend("kserve", api_url=f"http://127.0.0.1:{port}", token=TOKEN,
                          policy=RetryPolicy(max_attempts=3, base_delay=0.5), sleep=sleeps.append)
    result = b.apply(plan())
    assert (result.status, result.attempts) == ("failed", 3)
    assert sleeps == [0.5, 1.0]
    assert "ConnectionError" in result.detail


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


def test_factory_reads_token_from_env(api):
    fake, server = api({ISVC: isvc()})
    b = make_backend(BackendSpec(type="kubernetes", options={
        "kind": "kserve", "namespace": "ml", "api_url": server.url, "token_env": "K8S_TOKEN",
        "retry": {"max_attempts": 1}}), env={"K8S_TOKEN": TOKEN})
    assert b.apply(plan()).status == "succeeded"
    assert json.loads(patches(server)[0].body)["spec"]["predictor"]["canaryTrafficPercent"] == 0


def test_argo_rollout_pause_for_the_freeze_policy(api):
    from rollbackd.actions.base import pause_rollout

    fake, server = api({ROLLOUT: rollout()})
    b = backend(server, "argo-rollout")
    result = pause_rollout(b, "demo-scorer", "canary", "inc-k8s-1")
    assert result.status == "succeeded", result.detail
    assert result.data["paused"] is True
    (patch,) = patches(server)
    assert patch.path == ROLLOUT  # the main resource, not the status subresource
    assert patch.header("Content-Type") == "application/merge-patch+json"
    assert patch.json() == {"metadata": {"annotations": {"rollbackd.io/incident": "inc-k8s-1"}},
                            "spec": {"paused": True}}
    assert fake.objects[ROLLOUT]["spec"]["paused"] is True
    assert fake.objects[ROLLOUT]["spec"]["strategy"]  # merged, not replaced
    again = b.pause("demo-scorer", "canary", "inc-k8s-2")
    assert (again.status, again.data["paused"]) == ("skipped", True)
    assert len(patches(server)) == 1
    assert fake.problems == []


def test_only_argo_rollouts_are_paused(api):
    from rollbackd.actions.base import pause_rollout
    from rollbackd.actions.logbackend import LogBackend

    _, server = api({ISVC: isvc(), DEPLOY: deployment()})
    for b in (backend(server, "kserve"), backend(server, "deployment", image_template="registry/demo:{version}")):
        result = b.pause("demo-scorer", "canary", "inc-k8s-1")
        assert (result.status, result.data["paused"]) == ("skipped", False)
    assert server.requests == []
    assert pause_rollout(LogBackend(), "demo-scorer", "canary", "inc-k8s-1") is None


def test_a_failed_pause_is_reported(api):
    _, server = api({})
    result = backend(server, "argo-rollout").pause("demo-scorer", "canary", "inc-k8s-1")
    assert (result.status, result.data["paused"]) == ("failed", False)
    assert "404" in result.detail


def test_a_rollout_is_confirmed_once_it_converges_and_not_before(api):
    """The executor's confirmation polls verify(): the Deployment's rollout converges after the
    third look (the controller, played between looks); one that never does is unconfirmed."""
    from rollbackd.actions.verification import Confirmer

    fake, server = api({DEPLOY: deployment()})
    b = backend(server, "deployment", container="model", image_template="registry/demo:{version}")
    assert b.apply(plan()).status == "succeeded"
    fake.objects[DEPLOY]["metadata"]["generation"] = 6
    status = fake.objects[DEPLOY]["status"]
    steps = iter([{"updatedReplicas": 1}, {"observedGeneration": 6, "updatedReplicas": 2, "availableReplicas": 2}])
    t = [0.0]

    def controller(s: float) -> None:
        t[0] += s
        status.update(next(steps, {}))

    v = Confirmer(sleep=controller, monotonic=lambda: t[0]).confirm(b, plan(), 900.0, "kubernetes")
    assert (v.verdict, v.polls, t[0]) == ("confirmed", 3, 3.0)
    assert v.detail == "rolled out: 2 replicas at 1"

    status.update(availableReplicas=1)  # a pod that never becomes available
    t[0] = 0.0
    v = Confirmer(sleep=controller, monotonic=lambda: t[0]).confirm(b, plan(), 60.0, "kubernetes")
    assert (v.verdict, v.polls, t[0]) == ("unconfirmed", 7, 60.0)
    assert v.detail == "rollout in progress: {'updatedReplicas': 2, 'availableReplicas': 1}, want 2"
    assert fake.problems == []
