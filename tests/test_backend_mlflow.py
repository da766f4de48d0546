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


# Confirmation against the registry, and answers that are not the registry's ----------------
class Clock:
    """Injected time for the confirmer: ``sleep`` advances ``monotonic`` and lets ``between``
    (another writer) act."""

    def __init__(self, between=None) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []
        self.between = between

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s
        if self.between is not None:
            self.between()

    def monotonic(self) -> float:
        return self.t


def confirmer(clock: Clock):
    from rollbackd.actions.verification import Confirmer

    return Confirmer(sleep=clock.sleep, monotonic=clock.monotonic)


def test_a_rollback_is_confirmed_by_reading_the_alias_back(mlflow_url):
    register(mlflow_url, "confirm-scorer")
    backend = MlflowRegistryBackend(mlflow_url)
    result = backend.apply(plan("confirm-scorer"))
    assert result.status == "succeeded" and result.data["after"] == "1"
    clock = Clock()
    v = confirmer(clock).confirm(backend, plan("confirm-scorer"), 900.0, "mlflow")
    assert (v.verdict, v.observed, v.polls, clock.sleeps) == ("confirmed", "1", 1, [])
    assert v.detail == "alias 'champion' at version 1"


def test_an_alias_another_writer_moves_back_is_unconfirmed_and_names_what_it_saw(mlflow_url):
    """A CI job that keeps promoting version 2: the registry itself reports the alias at 2 at every
    look, until the bound."""
    register(mlflow_url, "contested-scorer")
    backend = MlflowRegistryBackend(mlflow_url)
    assert backend.apply(plan("contested-scorer")).status == "succeeded"

    def promote_again() -> None:
        rest(mlflow_url, "POST", "registered-models/alias",
             {"name": "contested-scorer", "alias": "champion", "version": "2"})

    promote_again()
    clock = Clock(between=promote_again)
    v = confirmer(clock).confirm(backend, plan("contested-scorer"), 60.0, "mlflow")
    # looks at 0, 1, 3, 7, 15, 31 and at the bound: 60 s
    assert (v.verdict, v.observed, v.expected, v.polls) == ("unconfirmed", "2", "1", 7)
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 29.0] and v.elapsed == 60.0
    assert v.detail == "alias 'champion' at version '2', expected '1'"


NONSENSE = {"status": "ok", "items": [], "service": "inventory"}


def test_a_200_with_unrelated_json_is_a_failure_never_success():
    """Another service on the port answers 200 with its own JSON to everything (the finding:
    this used to read as "None -> 1", succeeded)."""
    from loopback import LoopbackServer, Reply

    with LoopbackServer(lambda req: Reply(200, body=NONSENSE)) as server:
        backend = MlflowRegistryBackend(server.url, policy=RetryPolicy(max_attempts=1))
        result = backend.apply(plan("demo-scorer"))
        assert result.status == "failed"
        assert result.detail == ("GET registered-models/alias: unexpected answer: no model_version with a version "
                                 "in it (JSON object with keys items, service, status)")
        assert [r.method for r in server.requests] == ["GET"]  # nothing was written after it
        assert backend.verify(plan("demo-scorer")).status == "failed"
        assert backend.current("demo-scorer", "canary") is None
        v = confirmer(Clock()).confirm(backend, plan("demo-scorer"), 10.0, "mlflow")
        assert v.verdict == "unconfirmed" and "unexpected answer" in v.detail


def test_a_200_that_is_not_json_is_a_failure():
    """A proxy's sign-in page, answered with 200."""
    from loopback import LoopbackServer, Reply

    with LoopbackServer(lambda req: Reply(200, body="<html>Sign in</html>")) as server:
        result = MlflowRegistryBackend(server.url).apply(plan("demo-scorer"))
    assert result.status == "failed"
    assert result.detail == "GET registered-models/alias: unexpected answer: HTTP 200 with a body that is not JSON"


def registry_like(alias_version: str, model: str = "demo-scorer"):
    """Answers GETs as the registry would, with the alias stuck at ``alias_version``; every POST
    answers ``{}`` (as MLflow's set-tag and set-alias do) and changes nothing."""
    from loopback import Reply

    def answer(req):
        if req.method == "POST":
            return Reply(200, body={})
        if "registered-models/alias" in req.path:
            return Reply(200, body={"model_version": {"name": model, "version": alias_version,
                                                      "aliases": ["champion"]}})
        version = req.path.rsplit("version=", 1)[-1]
        return Reply(200, body={"model_version": {"name": model, "version": version}})

    return answer


def test_an_alias_set_that_does_not_take_is_a_failure():
    from loopback import LoopbackServer

    with LoopbackServer(registry_like("2")) as server:
        result = MlflowRegistryBackend(server.url).apply(plan("demo-scorer"))
        assert result.status == "failed"
        assert result.detail == "alias 'champion' of 'demo-scorer' reads back version '2' after it was set to '1'"
        assert result.data["after"] == "2"
        assert [r.path.split("?")[0].rsplit("/", 2)[-2:] for r in server.requests][-2:] == [
            ["registered-models", "alias"], ["registered-models", "alias"]]  # set, then read back


def test_answers_about_another_model_or_version_are_refused():
    from loopback import LoopbackServer

    with LoopbackServer(registry_like("2", model="other-model")) as server:
        result = MlflowRegistryBackend(server.url).apply(plan("demo-scorer"))
    assert result.status == "failed"
    assert result.detail.endswith("model_version names model 'other-model', not 'demo-scorer'")

    from loopback import Reply

    def wrong_version(req):
        if "model-versions/get" in req.path:
            return Reply(200, body={"model_version": {"name": "demo-scorer", "version": "7"}})
        return registry_like("2")(req)

    with LoopbackServer(wrong_version) as server:
        result = MlflowRegistryBackend(server.url).apply(plan("demo-scorer"))
    assert result.status == "failed"
    assert result.detail == "GET model-versions/get: unexpected answer: model_version is version '7', not '1'"
    assert not [r for r in server.requests if r.method == "POST"]  # no tag, no alias: refused before writing
