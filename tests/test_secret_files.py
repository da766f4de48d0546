"""Secrets from files (a mounted Kubernetes Secret) beside environment variables: ``token_file``,
``secret_file``, and ``{file: PATH}`` / ``{env: NAME}`` for webhook headers and a command's
environment. Checked at the edge they reach: a real HTTP server on loopback sees the header."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from loopback import LoopbackServer, Reply

from rollbackd.actions import RollbackPlan, make_backend, verify_signature
from rollbackd.actions.factory import make_notifier
from rollbackd.rules.loader import check_text
from rollbackd.rules.model import BackendSpec, NotifierSpec

PLAN = RollbackPlan(deployment="fraud", variant="canary", from_version="v43", to_version="v42",
                    incident_id="inc-1", reason="test")
TOKEN = "tok-9f8e7d"  # never in an error message


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


def secret(tmp_path: Path, text: str = TOKEN + "\n", name: str = "token") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_webhook_secret_file_and_header_values_from_file_and_env(server, tmp_path):
    spec = BackendSpec("webhook", {
        "url": server.url + "/rb", "secret_file": secret(tmp_path, "hmac-key\r\n", "hmac"),
        "headers": {"Authorization": {"file": secret(tmp_path, f"Bearer {TOKEN}\n")},
                    "X-Team": {"env": "TEAM_NAME"}, "X-Plain": "literal"},
    })
    result = make_backend(spec, env={"TEAM_NAME": "ml"}).apply(PLAN)
    assert result.status == "succeeded"
    (req,) = server.requests
    assert req.header("Authorization") == f"Bearer {TOKEN}"  # trailing newline stripped
    assert (req.header("X-Team"), req.header("X-Plain")) == ("ml", "literal")
    assert verify_signature(b"hmac-key", req.body, req.header("X-Rollbackd-Signature"))


def test_mlflow_and_kubernetes_token_files_reach_the_server(server, tmp_path):
    server.reply(Reply(500), Reply(500))
    mlflow = make_backend(BackendSpec("mlflow", {"tracking_uri": server.url, "model": "m",
                                                 "token_file": secret(tmp_path), "retry": {"max_attempts": 1}}),
                          sleep=lambda s: None, env={})
    mlflow.apply(PLAN)
    assert server.requests[-1].header("Authorization") == f"Bearer {TOKEN}"
    pytest.importorskip("kubernetes")
    k8s = make_backend(BackendSpec("kubernetes", {"kind": "argo-rollout", "name": "r", "api_url": server.url,
                                                  "token_file": secret(tmp_path), "retry": {"max_attempts": 1}}),
                       sleep=lambda s: None, env={})
    k8s.apply(PLAN)
    assert server.requests[-1].header("Authorization") == f"Bearer {TOKEN}"


def test_slack_token_file(tmp_path):
    notifier = make_notifier(NotifierSpec("slack", {"channel": "#x", "token_file": secret(tmp_path)}), env={})
    assert notifier.client.token == TOKEN


def test_command_env_values_from_file_and_env(tmp_path):
    out = tmp_path / "out"
    spec = BackendSpec("command", {
        "argv": [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ['A'] + '|' + os.environ['B'])"],
        "env": {"A": {"file": secret(tmp_path)}, "B": {"env": "FROM_PARENT"}},
    })
    result = make_backend(spec, env={"FROM_PARENT": "p", "PATH": os.environ["PATH"]}).apply(PLAN)
    assert result.status == "succeeded", result.detail
    assert out.read_text() == f"{TOKEN}|p"


@pytest.mark.parametrize("content,problem", [(None, "cannot be read (No such file or directory)"),
                                             ("", "is empty"), ("\n\n", "is empty"),
                                             ("dir", "cannot be read (Is a directory)")])
def test_an_unusable_file_names_the_option_and_path_never_the_value(tmp_path, content, problem):
    path = tmp_path / "token"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        make_notifier(NotifierSpec("slack", {"channel": "#x", "token_file": str(path)}), env={"SLACK_BOT_TOKEN": TOKEN})
    assert str(err.value) == f"slack notifier: token_file {str(path)!r} {problem}"
    with pytest.raises(ValueError) as err:
        make_backend(BackendSpec("webhook", {"url": "http://127.0.0.1:1/", "headers": {"X-Key": {"file": str(path)}}}))
    assert str(err.value) == f"webhook backend: headers.X-Key file {str(path)!r} {problem}"


def test_both_sources_or_a_missing_variable_are_errors(tmp_path):
    with pytest.raises(ValueError, match="set token_file or token_env, not both"):
        make_notifier(NotifierSpec("slack", {"channel": "#x", "token_file": secret(tmp_path), "token_env": "T"}),
                      env={"T": TOKEN})
    with pytest.raises(ValueError, match=r"environment variable 'NOPE' \(headers.X-Key\) is not set") as err:
        make_backend(BackendSpec("webhook", {"url": "http://127.0.0.1:1/", "headers": {"X-Key": {"env": "NOPE"}}}),
                     env={})
    assert TOKEN not in str(err.value)


def _issues(text: str) -> list[str]:
    config, issues = check_text(text)
    return [f"{i.severity}: {i.line}: {i.message}" for i in issues]


def test_the_loader_takes_file_sources_and_rejects_two_at_once():
    ok = """
version: 1
settings:
  notifier: {type: slack, channel: "#x", token_file: /var/run/secrets/rollbackd/slack-token}
deployments:
  a:
    backend:
      type: webhook
      url: http://127.0.0.1:9/
      secret_file: /var/run/secrets/rollbackd/hmac
      headers: {Authorization: {file: /var/run/secrets/rollbackd/auth}, X-Team: {env: TEAM}}
  b:
    backend: {type: mlflow, tracking_uri: "http://127.0.0.1:9", token_file: /s/t}
  c:
    backend: {type: command, argv: [deploy], env: {API_TOKEN: {file: /s/t}, MODE: fast}}
rules:
  - {name: r, detector: error_rate, threshold: 0.1}
"""
    config, issues = check_text(ok)
    assert config is not None and [i for i in issues if i.severity == "error"] == []
    assert config.settings.notifier.options["token_file"] == "/var/run/secrets/rollbackd/slack-token"
    headers = config.deployments["a"].backend.options["headers"]
    assert dict(headers["Authorization"]) == {"file": "/var/run/secrets/rollbackd/auth"}
    assert dict(headers["X-Team"]) == {"env": "TEAM"}
    assert config.deployments["c"].backend.options["env"]["MODE"] == "fast"

    both = ok.replace("token_file: /s/t}", "token_file: /s/t, token_env: T}")
    assert any("error" in i and "set token_file or token_env, not both" in i for i in _issues(both))
    two = ok.replace("{file: /s/t}", "{file: /s/t, env: T}")
    assert any("exactly one" in i for i in _issues(two))
    unknown = ok.replace("{env: TEAM}", "{vault: TEAM}")
    assert any("unknown key 'vault'" in i for i in _issues(unknown))


def test_a_literal_secret_looking_value_is_a_warning():
    text = """
version: 1
deployments:
  a:
    backend:
      type: webhook
      url: http://127.0.0.1:9/
      headers: {Authorization: Bearer abc, X-Team: ml}
  c:
    backend: {type: command, argv: [deploy], env: {GITHUB_TOKEN: ghp_x, MODE: fast}}
rules:
  - {name: r, detector: error_rate, threshold: 0.1}
"""
    config, issues = check_text(text)
    assert config is not None
    warnings = [i.message for i in issues if i.severity == "warning"]
    assert len(warnings) == 2, warnings
    assert "'Authorization' looks like a secret" in warnings[0]
    assert "'GITHUB_TOKEN' looks like a secret" in warnings[1]
