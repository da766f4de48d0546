"""The command backend runs a real program (this Python) that writes a file."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from rollbackd.actions import RollbackPlan, make_backend
from rollbackd.actions.base import current_version, verify_plan
from rollbackd.actions.command import CommandBackend, substitute
from rollbackd.rules.model import BackendSpec

PY = sys.executable
WRITER = (
    "import json, os, sys; out = sys.argv[1]; "
    "json.dump({'argv': sys.argv[2:], 'token': os.environ.get('DEPLOY_TOKEN'), "
    "'region': os.environ.get('REGION'), 'home': os.environ.get('HOME')}, open(out, 'w')); "
    "print('rolled back'); print('warn', file=sys.stderr)"
)


def plan(to="v1", frm="v2", deployment="demo-scorer", incident="inc-cmd-1") -> RollbackPlan:
    return RollbackPlan(deployment, "canary", frm, to, incident, "error rate firing")


def test_runs_argv_with_substitution_env_and_output(tmp_path):
    out = tmp_path / "done.json"
    b = CommandBackend(
        [PY, "-c", WRITER, str(out), "rollback", "{deployment}", "--to={to_version}", "{from_version}",
         "{variant}", "{incident}", "{'json': 1}"],
        env={"REGION": "eu-1"},
        env_from=["DEPLOY_TOKEN"],
        parent_env={"PATH": os.environ["PATH"], "DEPLOY_TOKEN": "t0k", "HOME": "/root"},
    )
    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    written = json.loads(out.read_text())
    assert written["argv"] == ["rollback", "demo-scorer", "--to=v1", "v2", "canary", "inc-cmd-1", "{'json': 1}"]
    assert (written["token"], written["region"], written["home"]) == ("t0k", "eu-1", None)  # HOME not passed
    assert result.data["returncode"] == 0
    assert result.data["stdout"] == "rolled back\n"
    assert result.data["stderr"] == "warn\n"
    assert result.data["argv"][4:6] == ["rollback", "demo-scorer"]

    out.unlink()
    assert b.apply(plan()).status == "skipped"
    assert not out.exists()


def test_nonzero_exit_fails_and_may_be_retried(tmp_path):
    flag = tmp_path / "flag"
    b = CommandBackend([PY, "-c", "import sys, os; sys.exit(0 if os.path.exists(sys.argv[1]) else 3)", str(flag)])
    first = b.apply(plan())
    assert (first.status, first.detail, first.data["returncode"]) == ("failed", "exit status 3", 3)
    flag.touch()
    assert b.apply(plan()).status == "succeeded"  # a failed run is not remembered as applied


def test_timeout_kills_the_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pidfile)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)"
    )
    b = CommandBackend([PY, "-c", script], timeout=1.0)
    started = time.monotonic()
    result = b.apply(plan())
    assert time.monotonic() - started < 10
    assert result.status == "failed"
    assert result.data["timed_out"] is True
    assert "timed out after 1s" in result.detail
    assert result.data["stdout"] == "started\n"
    child = int(pidfile.read_text())
    for _ in range(50):  # the grandchild goes with its group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("grandchild survived the timeout")


@pytest.mark.parametrize("version", ["--force", "-rf", "v1; rm -rf /", "$(id)", "a b", "v1\n", "", "x`y`"])
def test_unsafe_values_are_refused(tmp_path, version):
    out = tmp_path / "never"
    b = CommandBackend([PY, "-c", "import sys; open(sys.argv[1], 'w')", str(out), "{to_version}"])
    result = b.apply(plan(to=version))
    assert result.status == "failed"
    assert "refusing {to_version}" in result.detail
    assert not out.exists()


def test_missing_from_version_fails_only_if_used():
    b = CommandBackend([PY, "-c", "pass", "{from_version}"])
    result = b.apply(plan(frm=None))
    assert (result.status, result.detail) == ("failed", "{from_version} has no value for this plan")
    assert CommandBackend([PY, "-c", "pass", "{to_version}"]).apply(plan(frm=None)).status == "succeeded"


def test_output_is_truncated():
    b = CommandBackend([PY, "-c", "print('x' * 5000)"], max_output=100)
    result = b.apply(plan())
    assert len(result.data["stdout"]) == 100
    assert result.data["stdout_truncated"] is True


def test_missing_program_fails_cleanly():
    result = CommandBackend(["/nonexistent/helm", "rollback"]).apply(plan())
    assert result.status == "failed"
    assert "cannot run '/nonexistent/helm'" in result.detail


def test_current_and_verify(tmp_path):
    state = tmp_path / "state"
    state.write_text("v2\n")
    b = CommandBackend(
        [PY, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(state), "{to_version}"],
        current_argv=[PY, "-c", "import sys; print(open(sys.argv[1]).read())", str(state), "{deployment}"],
    )
    assert current_version(b, "demo-scorer", "canary") == "v2"
    assert verify_plan(b, plan()).status == "failed"
    assert b.apply(plan()).status == "succeeded"
    assert b.current("demo-scorer", "canary") == "v1"
    assert b.verify(plan()).status == "succeeded"
    assert CommandBackend([PY]).verify(plan()).status == "skipped"


def test_bad_templates_rejected_at_construction():
    with pytest.raises(ValueError, match="not a placeholder"):
        CommandBackend(["helm", "rollback", "{release}"])
    with pytest.raises(ValueError, match="not a placeholder"):
        CommandBackend(["helm", "{deployment.__class__}"])
    with pytest.raises(ValueError, match="non-empty list"):
        CommandBackend("helm rollback {deployment}")  # type: ignore[arg-type]
    assert substitute('{"a": {"b": 1}}-{deployment}', {"deployment": "d"}) == '{"a": {"b": 1}}-d'


def test_factory():
    b = make_backend(
        BackendSpec(type="command", options={"argv": ["helm", "rollback", "{deployment}"], "timeout": 30,
                                             "env": {"A": "1"}, "env_from": ["KUBECONFIG"]}),
        env={"PATH": "/usr/bin", "KUBECONFIG": "/k"},
    )
    assert isinstance(b, CommandBackend)
    assert b._child_env() == {"PATH": "/usr/bin", "KUBECONFIG": "/k", "A": "1"}
    with pytest.raises(ValueError, match="known: argv"):
        make_backend(BackendSpec(type="command", options={"argv": ["x"], "shell": True}))
    with pytest.raises(ValueError, match="'argv' is required"):
        make_backend(BackendSpec(type="command", options={}))
    with pytest.raises(ValueError, match="list of non-empty strings"):
        make_backend(BackendSpec(type="command", options={"argv": "helm rollback x"}))


# --- the rules file's ``backend:`` section --------------------------------------------------


def _errors(yaml_text: str):
    import textwrap

    from rollbackd.rules.loader import ConfigError, load_config_text

    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(yaml_text).lstrip("\n"), "rules.yaml")
    return [(e.line, e.path, e.message) for e in info.value.errors]


def test_loader_round_trip_for_every_new_backend(tmp_path):
    import textwrap

    from rollbackd.rules.loader import load_config_text

    config = load_config_text(textwrap.dedent(f"""
        deployments:
          ml:
            backend: {{type: mlflow, tracking_uri: "http://127.0.0.1:5000", alias: champion, token_env: T,
                       timeout: 3s, retry: {{max_attempts: 2}}}}
          k8s:
            backend: {{type: kubernetes, kind: deployment, namespace: ml, container: model,
                       image_template: "registry/demo:{{version}}", api_url: "http://127.0.0.1:6443",
                       verify_tls: false, timeout: 2s}}
          cmd:
            backend:
              type: command
              argv: [helm, rollback, "{{deployment}}", --set, a=1, --set, "b={{to_version}}"]
              timeout: 2m
              env: {{HELM_NAMESPACE: ml}}
              env_from: [KUBECONFIG]
              max_output: 1024
          tf:
            backend: {{type: traffic-file, path: "{tmp_path / 'routes.json'}", format: json, total: 100}}
        rules: []
        """).lstrip("\\n"), "rules.yaml")
    cmd = config.deployments["cmd"].backend
    assert cmd.options["argv"] == ("helm", "rollback", "{deployment}", "--set", "a=1", "--set", "b={to_version}")
    assert cmd.options["timeout"] == 120.0
    assert config.deployments["k8s"].backend.options["verify_tls"] is False
    env = {"T": "tok", "PATH": "/usr/bin"}
    for dep in config.deployments.values():
        make_backend(dep.backend, env=env)


def test_loader_reports_backend_errors_with_places():
    errors = _errors("""
        deployments:
          a: {backend: {type: command, argv: "helm rollback x"}}
          b: {backend: {type: command, argv: [helm, "{release}"]}}
          c: {backend: {type: command}}
          d: {backend: {type: kubernetes, kind: statefulset}}
          e: {backend: {type: kubernetes, kind: deployment}}
          f: {backend: {type: kubernetes, kind: kserve, image_template: "r/m:{version}"}}
          g: {backend: {type: kubernetes, kind: deployment, image_template: "r/m:latest"}}
          h: {backend: {type: mlflow, tracking_uri: "http://x", secret: y}}
          i: {backend: {type: traffic-file, path: r.json, format: toml}}
        rules: []
        """)
    by_path = {path: (line, message) for line, path, message in errors}
    assert "no shell is used" in by_path["deployments.a.backend.argv"][1]
    assert "{release} is not a placeholder" in by_path["deployments.b.backend.argv[1]"][1]
    assert "type command requires `argv`" in by_path["deployments.c.backend"][1]
    assert "'statefulset' is not one of deployment, argo-rollout, kserve" in by_path["deployments.d.backend.kind"][1]
    assert "needs at least one of image_template" in by_path["deployments.e.backend"][1]
    assert "only for kind deployment" in by_path["deployments.f.backend"][1]
    assert "exactly once" in by_path["deployments.g.backend.image_template"][1]
    assert "unknown key 'secret'" in by_path["deployments.h.backend.secret"][1]
    assert "'toml' is not one of json, yaml" in by_path["deployments.i.backend.format"][1]
    assert by_path["deployments.a.backend.argv"][0] == 2
    assert by_path["deployments.i.backend.format"][0] == 10
