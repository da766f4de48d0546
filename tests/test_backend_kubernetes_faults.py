"""Kubernetes backend faults a real API server will not produce on demand: 5xx answers, a server
that does not answer in time, nothing listening.

Everything a real server can show - patches, RBAC, conflicts, verification - is tested against
kube-apiserver in ``tests/test_backend_kubernetes.py``. :class:`FakeAPIServer` here is a loopback
stand-in kept **only for fault injection**: it answers GET and JSON-merge PATCH for a Rollout and
an InferenceService, and scripted failures come before its answers.
"""

from __future__ import annotations

import copy
import socket

import pytest
from loopback import LoopbackServer, Recorded, Reply

pytest.importorskip("kubernetes")

from rollbackd.actions import RollbackPlan  # noqa: E402
from rollbackd.actions.kubernetes import KubernetesBackend  # noqa: E402
from rollbackd.actions.retry import RetryPolicy  # noqa: E402

TOKEN = "k8s-test-token"
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


class FakeAPIServer:
    """Serves objects by path; PATCH (JSON merge patch only) changes them."""

    def __init__(self, objects):
        self.objects = {path: copy.deepcopy(obj) for path, obj in objects.items()}

    def __call__(self, req: Recorded) -> Reply:
        path = req.path.split("?")[0]
        key = path[: -len("/status")] if path.endswith("/status") else path
        if key not in self.objects:
            return Reply(404, body={"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})
        if req.method == "PATCH" and (req.header("Content-Type") or "").startswith("application/merge-patch+json"):
            self.objects[key] = merge_patch(self.objects[key], req.json())
        elif req.method != "GET":
            return Reply(405, body={"kind": "Status", "code": 405})
        return Reply(200, body=self.objects[key])


ROLLOUT_OBJ = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
               "metadata": {"name": "demo-scorer", "namespace": "ml"},
               "spec": {"strategy": {"canary": {"steps": [{"setWeight": 20}]}}}, "status": {"phase": "Paused"}}


@pytest.fixture
def server():
    with LoopbackServer(FakeAPIServer({ROLLOUT: ROLLOUT_OBJ})) as s:
        yield s


def plan() -> RollbackPlan:
    return RollbackPlan("demo-scorer", "canary", "2", "1", "inc-k8s-1", "latency firing")


def test_server_errors_are_retried(server):
    server.reply(Reply(503, body={"kind": "Status", "code": 503}), Reply(500, body={"kind": "Status", "code": 500}))
    sleeps = []
    b = KubernetesBackend("argo-rollout", namespace="ml", api_url=server.url, token=TOKEN,
                          policy=RetryPolicy(max_attempts=4, base_delay=0.1), sleep=sleeps.append)
    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    assert result.attempts == 5  # 3 reads (2 failed) + the abort + the annotation
    assert sleeps == [0.1, 0.2]
    assert [r.path for r in server.requests if r.method == "PATCH"] == [ROLLOUT + "/status", ROLLOUT]


def test_a_server_that_does_not_answer_in_time_is_retried(server):
    server.reply(Reply(200, body={}, delay=2.0))  # the first read hangs past the client's timeout
    sleeps = []
    b = KubernetesBackend("argo-rollout", namespace="ml", api_url=server.url, token=TOKEN, timeout=0.3,
                          policy=RetryPolicy(max_attempts=3, base_delay=0.1), sleep=sleeps.append)
    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    assert sleeps == [0.1]


def test_persistent_server_errors_fail_with_the_count(server):
    server.reply(*[Reply(503, body={"kind": "Status", "code": 503, "message": "etcdserver: leader changed"})] * 3)
    b = KubernetesBackend("argo-rollout", namespace="ml", api_url=server.url, token=TOKEN,
                          policy=RetryPolicy(max_attempts=3, base_delay=0.0))
    result = b.apply(plan())
    assert (result.status, result.attempts) == ("failed", 3)
    assert result.detail == ("read rollouts ml/demo-scorer: gave up after 3 attempts: "
                             "HTTP 503 Service Unavailable: etcdserver: leader changed")


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
