"""The Helm chart (deploy/helm/rollbackd) under Helm itself: `helm lint --strict` and
`helm template` with the value combinations that change its shape, each rendered object checked
against what rollbackd needs (its CLI options, state paths, probes, RBAC for the calls
rollbackd/actions/kubernetes.py makes, the alert rules of ops/).

Helm is built from the Go module proxy by deploy/helm/build-helm.sh (cached under
~/.cache/rollbackd-tools; .ci/run builds it). Outside CI a machine without it skips these tests
with the reason; under CI=true they fail.

The schema check (the rendered objects accepted by a real kube-apiserver, prometheus-operator
CRDs installed) is `test_rendered_chart_applies_to_the_real_api_server`, on the `k8s` fixture of
tests/k8s_cluster.py.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ci import unavailable

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "rollbackd"
OPS_RULES = ROOT / "ops" / "prometheus-alerts.yaml"
HELM_VERSION = "v3.21.4"
CACHED_HELM = Path(os.environ.get("ROLLBACKD_TOOLS", Path.home() / ".cache" / "rollbackd-tools")) / f"helm-{HELM_VERSION}" / "helm"
STATE = "/var/lib/rollbackd"
SECRETS = "/var/run/secrets/rollbackd"
KAFKA = {"kafka": {"bootstrapServers": "kafka-0.kafka:9092"}}


@pytest.fixture(scope="module")
def helm() -> str:
    path = str(CACHED_HELM) if CACHED_HELM.exists() else shutil.which("helm")
    if path is None:
        why = f"helm is not installed (deploy/helm/build-helm.sh builds {HELM_VERSION} into {CACHED_HELM.parent})"
        unavailable(why)
    return path


def _values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def helm_template(helm: str, tmp_path: Path, values: dict[str, Any], namespace: str = "ml") -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", "rb", str(CHART), "--namespace", namespace,
                           "-f", str(_values_file(tmp_path, values))],
                          capture_output=True, text=True, timeout=60)


def render(helm: str, tmp_path: Path, values: dict[str, Any], namespace: str = "ml") -> list[dict[str, Any]]:
    done = helm_template(helm, tmp_path, values, namespace)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects: {[d['metadata']['name'] for d in found]}"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert len(found) == 1, [d["kind"] for d in found]
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = workload(docs)["spec"]["template"]["spec"]["containers"]
    return c


def run_options(args: list[str]) -> dict[str, list[str]]:
    """`--opt=value` arguments after `run`, as {opt: [values]}; flags map to [""]."""
    out: dict[str, list[str]] = {}
    for a in args[args.index("run") + 1:]:
        name, _, value = a.partition("=")
        out.setdefault(name, []).append(value)
    return out


COMBINATIONS: dict[str, dict[str, Any]] = {
    "default": KAFKA,
    "scale-out": {**KAFKA, "stateTopic": "rollbackd.state", "replicas": 3},
    "secrets-all-kinds-monitoring": {
        **KAFKA,
        "kafka": {"bootstrapServers": "k:9092", "deadLetterTopic": "rollbackd.rejected",
                  "config": {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}},
        "secrets": {"existingSecret": "rollbackd-secrets", "ledgerKey": "ledger-key",
                    "env": {"ROLLBACKD_SLACK_SIGNING_SECRET": "slack-signing-secret"}},
        "rbac": {"kinds": ["deployment", "argo-rollout", "kserve"], "namespaces": ["ml", "serving"]},
        "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
    },
    "rbac-off-no-persistence": {**KAFKA, "rbac": {"create": False}, "persistence": {"enabled": False},
                                "secrets": {"create": {"slack-token": "xoxb-test"}}},
    "cluster-wide": {**KAFKA, "rbac": {"clusterWide": True, "kinds": ["kserve"]}},
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_helm_lint_strict_passes(helm, tmp_path, name):
    done = subprocess.run([helm, "lint", "--strict", str(CHART), "--namespace", "ml",
                           "-f", str(_values_file(tmp_path, COMBINATIONS[name]))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_every_rendered_object_is_labelled_and_in_the_release_namespace(helm, tmp_path, name):
    for doc in render(helm, tmp_path, COMBINATIONS[name]):
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == "rb", doc["kind"]
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            assert meta["namespace"] == "ml", doc["kind"]


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_the_container_args_are_options_rollbackd_run_accepts(helm, tmp_path, name):
    """Parsed by rollbackd's own click commands: a renamed or removed option fails here."""
    import click

    from rollbackd.cli import main

    args = container(render(helm, tmp_path, COMBINATIONS[name]))["args"]
    # The pod's state directory is here: run checks that the files' directories exist.
    args = [a.replace(STATE, str(tmp_path)) for a in args]
    at = args.index("run")
    ctx = main.make_context("rollbackd", [*args[:at], "run"])
    run = main.get_command(ctx, "run")
    assert isinstance(run, click.Command)
    sub = run.make_context("run", args[at + 1:], parent=ctx)
    assert sub.params["rules"] == "/etc/rollbackd/rules.yaml"
    assert sub.params["http_listen"] == "0.0.0.0:9464"
    assert ctx.params["log_json"] is True


def test_default_is_one_statefulset_with_ledger_and_checkpoint_on_its_claim(helm, tmp_path):
    docs = render(helm, tmp_path, KAFKA)
    sts = workload(docs)
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert not any(v["name"] == "state" for v in sts["spec"]["template"]["spec"]["volumes"]), "claim, not a volume"
    c = container(docs)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["state"]["mountPath"] == STATE and not mounts["state"].get("readOnly")
    opts = run_options(c["args"])
    assert opts["--checkpoint"] == [f"{STATE}/state.ckpt"]
    assert "--state-topic" not in opts
    # Every file rollbackd writes is on the claim (the root file system is read-only).
    for opt in ("--db", "--checkpoint", "--decisions-out", "--dead-letter"):
        assert opts[opt][0].startswith(STATE + "/"), (opt, opts[opt])
    assert opts["--topic"] == ["predictions", "outcomes"] and opts["--group-id"] == ["rollbackd"]
    env = {e["name"]: e for e in c["env"]}
    assert env["ROLLBACKD_BOOTSTRAP_SERVERS"]["value"] == "kafka-0.kafka:9092"
    assert env["ROLLBACKD_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert not [d for d in docs if d["kind"] in ("Secret", "ServiceMonitor", "PrometheusRule")]


def test_state_topic_renders_a_deployment_with_replicas_and_no_claim(helm, tmp_path):
    docs = render(helm, tmp_path, COMBINATIONS["scale-out"])
    dep = workload(docs)
    assert dep["kind"] == "Deployment" and dep["spec"]["replicas"] == 3
    assert "volumeClaimTemplates" not in dep["spec"]
    assert not [d for d in docs if d["kind"] in ("StatefulSet", "PersistentVolumeClaim")]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["state"]
    opts = run_options(container(docs)["args"])
    assert opts["--state-topic"] == ["rollbackd.state"]
    assert "--checkpoint" not in opts
    # Random pod names make no static membership: a fresh transactional.id per start instead.
    assert "ROLLBACKD_INSTANCE_ID" not in {e["name"] for e in container(docs)["env"]}


def test_probes_hit_healthz_and_readyz_on_the_port_rollbackd_serves(helm, tmp_path):
    docs = render(helm, tmp_path, {**KAFKA, "http": {"port": 9555}})
    c = container(docs)
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": 9555, "protocol": "TCP"}
    assert run_options(c["args"])["--http"] == ["0.0.0.0:9555"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    svc = only(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"].items() <= workload(docs)["spec"]["template"]["metadata"]["labels"].items()


def test_the_pod_runs_unprivileged_on_a_read_only_root(helm, tmp_path):
    docs = render(helm, tmp_path, KAFKA)
    pod = workload(docs)["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The Dockerfile's user: the pod runs as it, and the claim is group-writable for it.
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile sets USER uid:gid"
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    assert pod["securityContext"]["fsGroup"] == int(user.group(2))
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts, "a writable /tmp on a read-only root"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] > 25, "rollbackd's --stop-timeout (25 s) must fit"


# What rollbackd/actions/kubernetes.py calls, as (API group, resource, verb): each kubernetes
# client method it uses, mapped to the request the API server authorizes.
CLIENT_CALLS = {
    "read_namespaced_deployment": ("deployment", "apps", "deployments", "get"),
    "patch_namespaced_deployment": ("deployment", "apps", "deployments", "patch"),
    "get_namespaced_custom_object": (None, None, None, "get"),
    "patch_namespaced_custom_object": (None, None, None, "patch"),
    "patch_namespaced_custom_object_status": (None, None, "status", "patch"),
}


def needed_permissions() -> dict[str, set[tuple[str, str, str]]]:
    """Per backend kind, the (group, resource, verb) the backend's code can ask for: read from
    kubernetes.py's source, so a new client call there fails this test until RBAC grants it."""
    from rollbackd.actions import kubernetes as k8s

    source = Path(k8s.__file__).read_text()
    used = {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)
            and re.match(r"(read|get|patch|list|watch|create|replace|delete)_(namespaced|cluster)_", n.attr)}
    unknown = used - set(CLIENT_CALLS)
    assert not unknown, f"kubernetes.py calls {unknown}: map them in CLIENT_CALLS and grant them in the chart's RBAC"
    custom = {"argo-rollout": k8s.ARGO, "kserve": k8s.KSERVE}
    out: dict[str, set[tuple[str, str, str]]] = {kind: set() for kind in k8s.KINDS}
    for method in used:
        kind, group, resource, verb = CLIENT_CALLS[method]
        if kind == "deployment":
            out["deployment"].add((group, resource, verb))
            continue
        for kind_name, (g, _version, plural) in custom.items():
            if resource == "status":
                if kind_name == "argo-rollout":  # only the Argo abort writes a status (kubernetes.py's _patch)
                    out[kind_name].add((g, f"{plural}/status", verb))
            else:
                out[kind_name].add((g, plural, verb))
    return out


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("kinds", [["deployment"], ["argo-rollout"], ["kserve"], ["deployment", "argo-rollout", "kserve"]])
def test_rbac_grants_exactly_what_the_kubernetes_backend_calls(helm, tmp_path, kinds):
    need = needed_permissions()
    docs = render(helm, tmp_path, {**KAFKA, "rbac": {"kinds": kinds}})
    role = only(docs, "Role")
    assert role["metadata"]["namespace"] == "ml"
    assert granted(role["rules"]) == set().union(*(need[k] for k in kinds))
    assert all("*" not in str(rule) for rule in role["rules"])
    binding = only(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    sa = only(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ml"}]
    assert workload(docs)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert workload(docs)["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert not [d for d in docs if d["kind"].startswith("Cluster")]


def test_rbac_per_target_namespace_cluster_wide_names_and_off(helm, tmp_path):
    docs = render(helm, tmp_path, COMBINATIONS["secrets-all-kinds-monitoring"])
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "serving"]
    for b in (d for d in docs if d["kind"] == "RoleBinding"):
        assert b["subjects"][0]["namespace"] == "ml", "the ServiceAccount lives in the release namespace"

    docs = render(helm, tmp_path, COMBINATIONS["cluster-wide"])
    assert granted(only(docs, "ClusterRole")["rules"]) == needed_permissions()["kserve"]
    assert only(docs, "ClusterRoleBinding")["subjects"][0] == {"kind": "ServiceAccount", "name": "rb-rollbackd", "namespace": "ml"}
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]

    docs = render(helm, tmp_path, {**KAFKA, "rbac": {"resourceNames": ["fraud-scorer"]}})
    assert all(rule["resourceNames"] == ["fraud-scorer"] for rule in only(docs, "Role")["rules"])

    docs = render(helm, tmp_path, COMBINATIONS["rbac-off-no-persistence"])
    assert not [d for d in docs if "Role" in d["kind"]]
    assert workload(docs)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert only(docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_secrets_are_read_only_files_and_named_keys_only(helm, tmp_path):
    docs = render(helm, tmp_path, COMBINATIONS["secrets-all-kinds-monitoring"])
    assert not [d for d in docs if d["kind"] == "Secret"], "an existing Secret is used, not made"
    pod = workload(docs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"] == {"secretName": "rollbackd-secrets", "defaultMode": 0o440}
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert mounts["secrets"] == {"name": "secrets", "mountPath": SECRETS, "readOnly": True}
    c = container(docs)
    opts = run_options(c["args"])
    assert opts["--ledger-key-file"] == [f"{SECRETS}/ledger-key"]
    assert opts["--kafka-config"] == ["sasl.mechanism=SCRAM-SHA-512", "security.protocol=SASL_SSL"]
    assert opts["--dead-letter-topic"] == ["rollbackd.rejected"] and "--dead-letter" not in opts
    env = {e["name"]: e for e in c["env"]}
    assert env["ROLLBACKD_SLACK_SIGNING_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "rollbackd-secrets", "key": "slack-signing-secret"}

    docs = render(helm, tmp_path, COMBINATIONS["rbac-off-no-persistence"])
    secret = only(docs, "Secret")
    assert secret["stringData"] == {"slack-token": "xoxb-test"}
    volumes = {v["name"]: v for v in workload(docs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    rendered = yaml.safe_dump(workload(docs))
    assert "xoxb-test" not in rendered, "a secret's value never reaches the pod spec"

    done = helm_template(helm, tmp_path, {**KAFKA, "secrets": {"ledgerKey": "ledger-key"}})
    assert done.returncode != 0 and "secrets.ledgerKey names a key of the Secret" in done.stderr


def test_the_default_rules_validate_and_are_mounted_where_run_reads_them(helm, tmp_path):
    docs = render(helm, tmp_path, KAFKA)
    cm = only(docs, "ConfigMap")
    rules = tmp_path / "rules.yaml"
    rules.write_text(cm["data"]["rules.yaml"])
    from click.testing import CliRunner

    from rollbackd.cli import main

    result = CliRunner().invoke(main, ["validate", str(rules)])
    assert result.exit_code == 0, result.output
    assert "dry run on" in result.output
    pod = workload(docs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["rules"]["configMap"]["name"] == cm["metadata"]["name"]
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert mounts["rules"]["mountPath"] == "/etc/rollbackd" and "subPath" not in mounts["rules"]
    annotations = workload(docs)["spec"]["template"]["metadata"]["annotations"]
    changed = render(helm, tmp_path, {**KAFKA, "rules": {"content": cm["data"]["rules.yaml"] + "# edited\n"}})
    assert workload(changed)["spec"]["template"]["metadata"]["annotations"]["checksum/rules"] != annotations["checksum/rules"]

    docs = render(helm, tmp_path, {**KAFKA, "rules": {"existingConfigMap": "my-rules"}})
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    volumes = {v["name"]: v for v in workload(docs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["rules"]["configMap"]["name"] == "my-rules"


@pytest.mark.parametrize("values, message", [
    ({"rbac": {"kinds": ["statefulset"]}}, "at '/rbac/kinds/0': value must be one of 'deployment', 'argo-rollout', 'kserve'"),
    ({"statetopic": "typo"}, "additional properties 'statetopic' not allowed"),
    ({"replicas": 0}, "at '/replicas'"),
    ({"probes": {"liveness": {"periodSeconds": "10s"}}}, "at '/probes/liveness/periodSeconds'"),
    ({"secrets": {"mountPath": "relative/dir"}}, "at '/secrets/mountPath'"),
])
def test_values_schema_refuses_mistakes_with_their_place(helm, tmp_path, values, message):
    done = helm_template(helm, tmp_path, {**KAFKA, **values})
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_bootstrap_servers_are_required(helm, tmp_path):
    done = helm_template(helm, tmp_path, {})
    assert done.returncode != 0 and "kafka.bootstrapServers" in done.stderr


def test_the_prometheus_rule_is_ops_alert_rules_file_itself(helm, tmp_path):
    link = CHART / "files" / "prometheus-alerts.yaml"
    assert link.is_symlink() and link.resolve() == OPS_RULES.resolve(), "a link to ops/, never a copy"
    docs = render(helm, tmp_path, COMBINATIONS["secrets-all-kinds-monitoring"])
    rule = only(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(OPS_RULES.read_text())
    assert "{{ $labels.instance }}" in yaml.safe_dump(rule["spec"], width=10_000), "Prometheus' templates left alone"


def test_the_packaged_chart_carries_the_alert_rules_not_the_link(helm, tmp_path):
    done = subprocess.run([helm, "package", str(CHART), "--destination", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import tarfile

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    with tarfile.open(tmp_path / f"rollbackd-{chart['version']}.tgz") as tar:
        member = tar.getmember("rollbackd/files/prometheus-alerts.yaml")
        assert member.isfile()
        assert tar.extractfile(member).read() == OPS_RULES.read_bytes()


def test_the_service_monitor_scrapes_as_the_job_the_alert_rules_match(helm, tmp_path):
    docs = render(helm, tmp_path, COMBINATIONS["secrets-all-kinds-monitoring"])
    monitor = only(docs, "ServiceMonitor")
    svc = only(docs, "Service")
    jobs = set(re.findall(r'job="([^"]+)"', OPS_RULES.read_text()))
    assert jobs == {"rollbackd"}
    assert svc["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "rollbackd"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"


def test_every_value_is_documented():
    """values.yaml explains each top-level key: a comment on its line, in its block, or in the
    comment block of the paragraph it belongs to (keys without a blank line between them)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Za-z]\w*):", line)
        if not m:
            continue
        paragraph = []
        for above in reversed(lines[:i]):
            if not above.strip():
                break
            paragraph.append(above)
        block = []
        for below in lines[i + 1:]:
            if below and not below.startswith((" ", "#")):
                break
            block.append(below)
        assert any("#" in x for x in (line, *paragraph, *block)), f"values.yaml: {m.group(1)} has no comment"


# -- the schema check: the rendered chart on a real kube-apiserver -----------------------------

def test_rendered_chart_applies_to_the_real_api_server(helm, tmp_path, k8s):
    """Every object of every combination above is created by a real kube-apiserver (its
    OpenAPI schema and admission: what kubeconform would check, and more), with the
    prometheus-operator CRDs installed (tests/k8s_crds.py); then the chart's Role is checked
    on the server: its ServiceAccount's token can get and patch a Deployment, as the
    kubernetes backend does, and nothing more. And `helm install` of the chart succeeds."""
    cluster = k8s

    for name, values in COMBINATIONS.items():
        ns = cluster.namespace(f"chart-{name}")
        values = dict(values)
        if "rbac" in values and values["rbac"].get("namespaces"):
            other = cluster.namespace("targets")
            values["rbac"] = {**values["rbac"], "namespaces": [ns, other]}
        if name == "cluster-wide":  # cluster-scoped names are shared: one per namespace
            values = {**values, "fullnameOverride": f"rb-{ns}"}
        docs = render(helm, tmp_path, values, namespace=ns)
        stored = cluster.apply_all(docs)
        assert [(d["kind"], d["metadata"]["name"]) for d in stored] == [(d["kind"], d["metadata"]["name"]) for d in docs]
        rule = next((d for d in stored if d["kind"] == "PrometheusRule"), None)
        if rule is not None:
            assert rule["spec"]["groups"] == yaml.safe_load(OPS_RULES.read_text())["groups"]

    # `helm install` itself (Helm's client against the server, the release stored there), and
    # the NOTES it prints.
    ns = cluster.namespace("chart-install")
    done = subprocess.run([helm, "install", "rb", str(CHART), "--namespace", ns, "--kubeconfig", cluster.kubeconfig(),
                           "--set", "kafka.bootstrapServers=kafka:9092", "--set", "stateTopic=rollbackd.state"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "STATUS: deployed" in done.stdout
    assert f"kubectl -n {ns} rollout status deployment/rb-rollbackd" in done.stdout
    assert cluster.get("apps/v1", "Deployment", "rb-rollbackd", ns)["spec"]["replicas"] == 2

    # The default RBAC, on the server: a real ServiceAccount token, a real Deployment.
    ns = cluster.namespace("chart-rbac")
    docs = render(helm, tmp_path, KAFKA, namespace=ns)
    cluster.apply_all(docs)
    sa = only(docs, "ServiceAccount")["metadata"]["name"]
    token = cluster.service_account_token(ns, sa)
    cluster.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "scorer", "namespace": ns},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "scorer"}},
                            "template": {"metadata": {"labels": {"app": "scorer", "model-version": "2"}},
                                         "spec": {"containers": [{"name": "model", "image": "scorer:2"}]}}}})
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from rollbackd.actions.base import RollbackPlan
    from rollbackd.actions.kubernetes import KubernetesBackend

    # As in a pod: the ServiceAccount's token and the cluster's CA (a kubeconfig carries both).
    backend = KubernetesBackend("deployment", namespace=ns, label="model-version",
                                kubeconfig=cluster.kubeconfig(token))
    plan = RollbackPlan(deployment="scorer", variant="primary", from_version="2", to_version="1",
                        incident_id="inc-chart", reason="chart RBAC")
    result = backend.apply(plan)
    assert result.status == "succeeded", result.detail
    apps = client.AppsV1Api(cluster.api_client(token))
    with pytest.raises(ApiException) as denied:
        apps.list_namespaced_deployment(ns)
    assert denied.value.status == 403
    with pytest.raises(ApiException) as denied:
        apps.delete_namespaced_deployment("scorer", ns)
    assert denied.value.status == 403
