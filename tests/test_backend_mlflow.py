"""MLflow Model Registry backend against a real ``mlflow server`` (SQLite store) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from rollbackd.actions import RollbackPlan, make_backend
from rollbackd.actions.base import current_version, verify_plan
from rollbackd.actions.mlflow import INCIDENT_TAG, ROLLED_BACK_FROM_TAG, MlflowRegistryBackend
from rollbackd.actions.retry import RetryPolicy
from rollbackd.rules.model import BackendSpec

MLFLOW = Path(sys.executable).with_name("mlflow")
pytestmark = pytest.mark.skipif(
    not MLFLOW.exists() and shutil.which("mlflow") is None,
    reason="the mlflow server is not installed (pip install -e '.[test]')",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    exe = str(MLFLOW) if MLFLOW.exists() else shutil.which("mlflow")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_TOKEN": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def rest(url: str, method: str, endpoint: str, payload: dict) -> dict:
    full = f"{url}/api/2.0/mlflow/{endpoint}"
    data = None
    if method == "GET":
        full += "?" + urlencode(payload)
    else:
        data = json.dumps(payload).encode()
    req = urllib.request.Request(full, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def register(url: str, name: str, versions: int = 2, alias_on: str = "2") -> None:
    rest(url, "POST", "registered-models/create", {"name": name})
    for v in range(1, versions + 1):
        rest(url, "POST", "model-versions/create", {"name": name, "source": f"s3://models/{name}/{v}"})
    rest(url, "POST", "registered-models/alias", {"name": name, "alias": "champion", "version": alias_on})


def tags(url: str, name: str, version: str) -> dict[str, str]:
    mv = rest(url, "GET", "model-versions/get", {"name": name, "version": version})["model_version"]
    return {t["key"]: t["value"] for t in mv.get("tags", [])}


def plan(deployment: str, to: str = "1", frm: str | None = "2", incident: str = "inc-ml-1") -> RollbackPlan:
    return RollbackPlan(deployment, "canary", frm, to, incident, "error rate firing")


class Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)


def test_rollback_moves_alias_and_tags_versions(mlflow_url):
    register(mlflow_url, "demo-scorer")
    backend = MlflowRegistryBackend(mlflow_url, alias="champion")
    assert backend.current("demo-scorer", "canary") == "2"

    result = backend.apply(plan("demo-scorer"))
    assert result.status == "succeeded", result.detail
    alias = rest(mlflow_url, "GET", "registered-models/alias", {"name": "demo-scorer", "alias": "champion"})
    assert alias["model_version"]["version"] == "1"
    assert tags(mlflow_url, "demo-scorer", "1") == {INCIDENT_TAG: "inc-ml-1"}
    assert tags(mlflow_url, "demo-scorer", "2") == {INCIDENT_TAG: "inc-ml-1", ROLLED_BACK_FROM_TAG: "champion"}
    assert result.data["before"] == "2"

    assert current_version(backend, "demo-scorer", "canary") == "1"
    assert verify_plan(backend, plan("demo-scorer")).status == "succeeded"


def test_repeat_is_skipped(mlflow_url):
    register(mlflow_url, "repeat-scorer")
    backend = MlflowRegistryBackend(mlflow_url)
    assert backend.apply(plan("repeat-scorer")).status == "succeeded"
    again = backend.apply(plan("repeat-scorer"))
    assert again.status == "skipped"
    assert "already at version 1" in again.detail
    # A fresh process (new backend object) reaches the same answer from the registry itself.
    assert MlflowRegistryBackend(mlflow_url).apply(plan("repeat-scorer")).status == "skipped"


def test_model_option_and_missing_alias(mlflow_url):
    rest(mlflow_url, "POST", "registered-models/create", {"name": "registry-name"})
    rest(mlflow_url, "POST", "model-versions/create", {"name": "registry-name", "source": "s3://m/1"})
    backend = MlflowRegistryBackend(mlflow_url, model="registry-name", alias="prod")
    assert backend.current("whatever", "canary") is None  # no alias yet: an answer, not an error
    result = backend.apply(plan("whatever", frm=None))
    assert result.status == "succeeded", result.detail
    assert backend.current("whatever", "canary") == "1"


def test_unknown_target_version_fails_without_retry(mlflow_url):
    register(mlflow_url, "short-scorer")
    sleeps = Sleeps()
    backend = MlflowRegistryBackend(mlflow_url, sleep=sleeps)
    result = backend.apply(plan("short-scorer", to="9"))
    assert result.status == "failed"
    assert "no version '9'" in result.detail
    assert sleeps == []
    assert backend.current("short-scorer", "canary") == "2"


def test_verify_reports_wrong_alias(mlflow_url):
    register(mlflow_url, "verify-scorer")
    result = MlflowRegistryBackend(mlflow_url).verify(plan("verify-scorer"))
    assert result.status == "failed"
    assert result.data["current"] == "2"


def test_server_down_retries_then_fails():
    sleeps = Sleeps()
    url = f"http://127.0.0.1:{_free_port()}"
    backend = MlflowRegistryBackend(url, policy=RetryPolicy(max_attempts=3, base_delay=0.25), sleep=sleeps)
    result = backend.apply(plan("demo-scorer"))
    assert result.status == "failed"
    assert result.attempts == 3
    assert sleeps == [0.25, 0.5]
    assert "ConnectionRefusedError" in result.detail
    assert backend.current("demo-scorer", "canary") is None


def test_token_sent_as_bearer():
    from loopback import LoopbackServer, Reply

    with LoopbackServer() as server:
        server.reply(Reply(200, body={"model_version": {"name": "demo-scorer", "version": "1"}}))
        backend = make_backend(
            BackendSpec(type="mlflow", options={"tracking_uri": server.url, "token_env": "ML_TOKEN"}),
            env={"ML_TOKEN": "t0k"},
        )
        assert backend.apply(plan("demo-scorer")).status == "skipped"
        assert server.requests[0].header("Authorization") == "Bearer t0k"
        assert server.requests[0].path.startswith("/api/2.0/mlflow/registered-models/alias?name=demo-scorer")


def test_factory_options():
    with pytest.raises(ValueError, match="known: tracking_uri"):
        make_backend(BackendSpec(type="mlflow", options={"tracking_uri": "http://x", "bogus": 1}), env={})
    with pytest.raises(ValueError, match="tracking_uri"):
        make_backend(BackendSpec(type="mlflow", options={}), env={})
    b = make_backend(BackendSpec(type="mlflow", options={"tracking_uri": "http://x:5000", "alias": "prod",
                                                         "model": "m", "retry": {"max_attempts": 2}}), env={})
    assert isinstance(b, MlflowRegistryBackend)
    assert (b.alias, b.model, b.policy.max_attempts, b.token) == ("prod", "m", 2, None)
    b = make_backend(BackendSpec(type="mlflow", options={"tracking_uri": "http://x"}),
                     env={"MLFLOW_TRACKING_TOKEN": "abc"})
    assert b.token == "abc"
