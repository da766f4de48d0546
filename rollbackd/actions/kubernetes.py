"""Rollback on Kubernetes through the official ``kubernetes`` client (the optional extra).

Three kinds of target, each set declaratively to the plan's version:

* ``deployment`` - a strategic merge patch of the pod template: the container image
  (``image_template``), a model-version label (``label``) and/or env var (``env_var``);
* ``argo-rollout`` - abort the rollout (merge patch ``{"status": {"abort": true}}`` on the
  ``status`` subresource, as ``kubectl argo rollouts abort`` does), so traffic returns to stable,
  then annotate the Rollout itself (the status subresource drops metadata changes);
* ``kserve`` - an InferenceService: ``spec.predictor.canaryTrafficPercent: 0`` (traffic back to
  the last rolled-out revision) or, with ``storage_uri_template``, the predictor's ``storageUri``
  set back to the target version's, canary percentage removed.

Every change is preceded by a read, so a target already in the wanted state is ``skipped``.
A spec change carries the read's ``resourceVersion``: if the object changed in between, the API
server answers 409 Conflict and the plan is decided again on a fresh read (at most
``MAX_CONFLICTS`` times), so rollbackd never writes over a change it has not seen.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from rollbackd.actions.base import ActionResult, RollbackPlan
from rollbackd.actions.retry import Attempt, CountsAttempts, RetryPolicy, retrying

__all__ = ["KubernetesBackend", "KINDS", "version_from", "INCIDENT_ANNOTATION", "MAX_CONFLICTS"]

KINDS = ("deployment", "argo-rollout", "kserve")
INCIDENT_ANNOTATION = "rollbackd.io/incident"
FROM_ANNOTATION = "rollbackd.io/rolled-back-from"
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
ARGO = ("argoproj.io", "v1alpha1", "rollouts")
KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
ABORT = {"status": {"abort": True}}
MAX_CONFLICTS = 3  # fresh reads after a 409 before giving up: more means something keeps writing

log = structlog.get_logger("rollbackd.actions.kubernetes")


def _check_template(name: str, template: str | None) -> None:
    if template is not None and template.count("{version}") != 1:
        raise ValueError(f"{name} must contain '{{version}}' exactly once, got {template!r}")


def version_from(template: str, value: str | None) -> str | None:
    """The ``{version}`` part of ``value`` under ``template``, or ``None`` if it does not fit."""
    if value is None:
        return None
    head, tail = template.split("{version}")
    m = re.fullmatch(re.escape(head) + r"(?P<v>.+?)" + re.escape(tail), value)
    return m.group("v") if m else None


class _Failed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)


class _Conflict(_Failed):
    """HTTP 409 on a write: the object changed since it was read."""


def _status_message(exc: Any) -> str:
    """The API server's own words from a failed call's ``Status`` body (for a 403: who may not do
    what to which resource), cut to a line; ``""`` if the body is not a Status."""
    try:
        message = json.loads(exc.body or "").get("message", "")
    except (ValueError, AttributeError, TypeError):
        return ""
    message = " ".join(str(message).split())
    return message if len(message) <= 300 else message[:297] + "..."


@dataclass(frozen=True)
class VersionShape:
    """Where a kind's object carries the version, and the patch that moves it: read and written
    here, with no API call (``KubernetesBackend`` talks to the server)."""

    kind: str
    container: str | None = None
    image_template: str | None = None
    label: str | None = None
    env_var: str | None = None
    storage_uri_template: str | None = None

    @staticmethod
    def _labels(obj: dict[str, Any]) -> dict[str, Any]:
        return ((obj.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}

    def _container(self, obj: dict[str, Any]) -> dict[str, Any]:
        containers = ((obj.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
        for c in containers:
            if self.container is None or c.get("name") == self.container:
                return c
        raise _Failed(f"no container {self.container!r} in the pod template")

    def deployment_version(self, obj: dict[str, Any]) -> str | None:
        c = self._container(obj)
        if self.image_template:
            return version_from(self.image_template, c.get("image"))
        if self.label:
            return self._labels(obj).get(self.label)
        for e in c.get("env") or []:
            if e.get("name") == self.env_var:
                return e.get("value")
        return None

    def _deployment_wanted(self, obj: dict[str, Any], version: str) -> bool:
        c = self._container(obj)
        if self.image_template and c.get("image") != self.image_template.replace("{version}", version):
            return False
        if self.label and self._labels(obj).get(self.label) != version:
            return False
        if self.env_var and not any(
            e.get("name") == self.env_var and e.get("value") == version for e in c.get("env") or []
        ):
            return False
        return True

    def _storage_key(self, obj: dict[str, Any]) -> str:
        predictor = obj.get("spec", {}).get("predictor", {})
        if isinstance(predictor.get("model"), dict):
            return "model"
        for key, value in predictor.items():  # the older per-framework form: predictor.sklearn.storageUri
            if isinstance(value, dict) and "storageUri" in value:
                return key
        raise _Failed("the InferenceService predictor has no storageUri")

    def kserve_version(self, obj: dict[str, Any]) -> str | None:
        if not self.storage_uri_template:
            return None
        predictor = obj.get("spec", {}).get("predictor", {})
        return version_from(self.storage_uri_template, predictor.get(self._storage_key(obj), {}).get("storageUri"))

    def already(self, obj: dict[str, Any], plan: RollbackPlan) -> bool:
        if self.kind == "deployment":
            return self._deployment_wanted(obj, plan.to_version)
        if self.kind == "argo-rollout":
            return (obj.get("status") or {}).get("abort") is True
        predictor = obj.get("spec", {}).get("predictor", {})
        if self.storage_uri_template:
            uri = self.storage_uri_template.replace("{version}", plan.to_version)
            return predictor.get(self._storage_key(obj), {}).get("storageUri") == uri and not predictor.get(
                "canaryTrafficPercent"
            )
        return predictor.get("canaryTrafficPercent") == 0

    def body(self, obj: dict[str, Any], plan: RollbackPlan) -> dict[str, Any]:
        annotations = {INCIDENT_ANNOTATION: plan.incident_id}
        if plan.from_version:
            annotations[FROM_ANNOTATION] = plan.from_version
        if self.kind == "argo-rollout":  # sent after the abort, to the Rollout itself
            return {"metadata": {"annotations": annotations}}
        if self.kind == "kserve":
            predictor: dict[str, Any]
            if self.storage_uri_template:
                uri = self.storage_uri_template.replace("{version}", plan.to_version)
                # null removes the canary split: all traffic to the revision serving ``uri``.
                predictor = {self._storage_key(obj): {"storageUri": uri}, "canaryTrafficPercent": None}
            else:
                predictor = {"canaryTrafficPercent": 0}
            return {"metadata": {"annotations": annotations}, "spec": {"predictor": predictor}}
        container: dict[str, Any] = {"name": self._container(obj)["name"]}
        if self.image_template:
            container["image"] = self.image_template.replace("{version}", plan.to_version)
        if self.env_var:
            container["env"] = [{"name": self.env_var, "value": plan.to_version}]
        template: dict[str, Any] = {"spec": {"containers": [container]}}
        if self.label:
            template["metadata"] = {"labels": {self.label: plan.to_version}}
        return {"metadata": {"annotations": annotations}, "spec": {"template": template}}


class KubernetesBackend(CountsAttempts):
    """Sets a Deployment / Argo Rollout / KServe InferenceService named ``name`` (default: the deployment)."""

    def __init__(
        self,
        kind: str,
        *,
        name: str | None = None,
        namespace: str = "default",
        container: str | None = None,
        image_template: str | None = None,
        label: str | None = None,
        env_var: str | None = None,
        storage_uri_template: str | None = None,
        api_url: str | None = None,
        token: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        in_cluster: bool = False,
        verify_tls: bool = True,
        ca_file: str | None = None,
        timeout: float = 10.0,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        _check_template("image_template", image_template)
        _check_template("storage_uri_template", storage_uri_template)
        if kind == "deployment" and not (image_template or label or env_var):
            raise ValueError("kind deployment needs at least one of image_template, label, env_var")
        if kind != "deployment" and (image_template or label or env_var or container):
            raise ValueError(f"kind {kind}: image_template, label, env_var and container apply to deployment only")
        if kind != "kserve" and storage_uri_template:
            raise ValueError("storage_uri_template applies to kind kserve only")
        if not timeout > 0:
            raise ValueError(f"timeout must be in (0, inf) seconds, got {timeout}")
        self.kind = kind
        self.name = name
        self.namespace = namespace
        self.shape = VersionShape(kind, container, image_template, label, env_var, storage_uri_template)
        self.timeout = float(timeout)
        self.policy = policy
        self.sleep = sleep
        self._client = _api_client(api_url, token, kubeconfig, context, in_cluster, verify_tls, ca_file)

    # -- transport -------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        box: dict[str, Any] = {}

        def send() -> Attempt:
            try:
                box["value"] = fn(*args, _request_timeout=self.timeout, **kw)
                return Attempt(status=200)
            except ApiException as exc:
                if not exc.status:
                    return Attempt(error=ConnectionError(str(exc.reason)))
                headers = exc.headers or {}
                reason, message = exc.reason or "", _status_message(exc)
                reason = f"{reason}: {message}" if message and message != reason else reason or message
                return Attempt(status=exc.status, retry_after=headers.get("Retry-After"), reason=reason)
            except Urllib3Error as exc:  # refused, reset, timed out: retried like any network error
                return Attempt(error=ConnectionError(f"{type(exc).__name__}: {exc}"))

        result = retrying(send, self.policy, sleep=self.sleep)
        self.attempts += result.attempts
        if not result.ok:
            why = "gave up" if result.outcome == "give_up" else f"gave up after {result.attempts} attempts"
            error = _Conflict if result.last.status == 409 else _Failed
            raise error(f"{what}: {why}: {result.last.describe()}")
        value = box["value"]
        return value if isinstance(value, dict) else self._client.sanitize_for_serialization(value)

    def _get(self, target: str) -> dict[str, Any]:
        from kubernetes import client

        if self.kind == "deployment":
            api = client.AppsV1Api(self._client)
            return self._call(f"read deployment {self.namespace}/{target}",
                              api.read_namespaced_deployment, target, self.namespace)
        group, version, plural = ARGO if self.kind == "argo-rollout" else KSERVE
        api = client.CustomObjectsApi(self._client)
        return self._call(f"read {plural} {self.namespace}/{target}", api.get_namespaced_custom_object,
                          group, version, self.namespace, plural, target)

    def _patch(self, target: str, body: dict[str, Any], resource_version: str | None = None) -> None:
        """Patches the object; with ``resource_version``, only if it is still the one read."""
        from kubernetes import client

        if resource_version:
            body = {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": resource_version}}
        if self.kind == "deployment":
            api = client.AppsV1Api(self._client)
            self._call(f"patch deployment {self.namespace}/{target}", api.patch_namespaced_deployment,
                       target, self.namespace, body, _content_type=STRATEGIC)
            return
        api = client.CustomObjectsApi(self._client)
        if self.kind == "argo-rollout":
            group, version, plural = ARGO
            self._call(f"annotate rollout {self.namespace}/{target}", api.patch_namespaced_custom_object,
                       group, version, self.namespace, plural, target, body, _content_type=MERGE)
            return
        group, version, plural = KSERVE
        self._call(f"patch inferenceservice {self.namespace}/{target}", api.patch_namespaced_custom_object,
                   group, version, self.namespace, plural, target, body, _content_type=MERGE)

    def _abort(self, target: str) -> None:
        from kubernetes import client

        group, version, plural = ARGO
        api = client.CustomObjectsApi(self._client)
        self._call(f"abort rollout {self.namespace}/{target}", api.patch_namespaced_custom_object_status,
                   group, version, self.namespace, plural, target, ABORT, _content_type=MERGE)

    # -- protocol --------------------------------------------------------------------------

    def apply(self, plan: RollbackPlan) -> ActionResult:
        target = self.name or plan.deployment
        bound = log.bind(deployment=plan.deployment, variant=plan.variant, incident=plan.incident_id,
                         to_version=plan.to_version, kind=self.kind, namespace=self.namespace, name=target)
        self.attempts = 0
        data: dict[str, Any] = {"kind": self.kind, "namespace": self.namespace, "name": target}
        if self.kind == "argo-rollout":
            return self._apply_abort(plan, target, data, bound)
        conflicts = 0
        try:
            while True:
                obj = self._get(target)
                if self.shape.already(obj, plan):
                    bound.info("rollback.kubernetes", outcome="skipped", attempts=self.attempts,
                               conflicts=conflicts)
                    return ActionResult("skipped", f"{self.kind} {self.namespace}/{target} already rolled back",
                                        attempts=self.attempts, data={**data, "conflicts": conflicts})
                body = self.shape.body(obj, plan)
                data["patch"] = body
                try:
                    self._patch(target, body, (obj.get("metadata") or {}).get("resourceVersion"))
                    break
                except _Conflict as exc:
                    conflicts += 1
                    bound.warning("rollback.kubernetes.conflict", attempts=self.attempts, detail=str(exc))
                    if conflicts > MAX_CONFLICTS:
                        raise _Failed(
                            f"{self.kind} {self.namespace}/{target} changed under every write "
                            f"({conflicts} resourceVersion conflicts in a row; something else keeps "
                            f"writing to it): {exc}"
                        ) from None
        except _Failed as exc:
            bound.error("rollback.kubernetes", outcome="failed", attempts=self.attempts, detail=str(exc))
            return ActionResult("failed", str(exc), attempts=self.attempts,
                                data={**data, "conflicts": conflicts})
        bound.info("rollback.kubernetes", outcome="succeeded", attempts=self.attempts, conflicts=conflicts)
        return ActionResult("succeeded", f"{self.kind} {self.namespace}/{target} set to {plan.to_version}",
                            attempts=self.attempts, data={**data, "conflicts": conflicts})

    def _apply_abort(self, plan: RollbackPlan, target: str, data: dict[str, Any], bound: Any) -> ActionResult:
        """Abort first (what stops the harm), then the annotations on the Rollout. A failed
        annotation does not undo nor fail the abort: the result says what is missing."""
        try:
            if self.shape.already(self._get(target), plan):
                bound.info("rollback.kubernetes", outcome="skipped", attempts=self.attempts)
                return ActionResult("skipped", f"rollout {self.namespace}/{target} already aborted",
                                    attempts=self.attempts, data=data)
            data["patch"] = ABORT
            self._abort(target)
        except _Failed as exc:
            bound.error("rollback.kubernetes", outcome="failed", attempts=self.attempts, detail=str(exc))
            return ActionResult("failed", str(exc), attempts=self.attempts, data=data)
        body = self.shape.body({}, plan)
        data["annotate"] = body
        try:
            self._patch(target, body)
        except _Failed as exc:
            bound.warning("rollback.kubernetes", outcome="succeeded", attempts=self.attempts, annotated=False,
                          detail=str(exc))
            return ActionResult("succeeded", f"rollout {self.namespace}/{target} aborted; not annotated: {exc}",
                                attempts=self.attempts, data={**data, "annotated": False})
        bound.info("rollback.kubernetes", outcome="succeeded", attempts=self.attempts, annotated=True)
        return ActionResult("succeeded", f"rollout {self.namespace}/{target} aborted",
                            attempts=self.attempts, data={**data, "annotated": True})

    def pause(self, deployment: str, variant: str, incident_id: str) -> ActionResult:
        """Argo Rollouts: merge-patch ``spec.paused: true`` (what ``kubectl argo rollouts pause``
        sends), so the rollout stops where it stands. Deployments and KServe are not paused."""
        target = self.name or deployment
        data: dict[str, Any] = {"kind": self.kind, "namespace": self.namespace, "name": target, "paused": False}
        if self.kind != "argo-rollout":
            return ActionResult("skipped", f"kind {self.kind}: no pause", attempts=0, data=data)
        from kubernetes import client

        bound = log.bind(deployment=deployment, variant=variant, incident=incident_id, kind=self.kind,
                         namespace=self.namespace, name=target)
        self.attempts = 0
        try:
            if ((self._get(target).get("spec") or {}).get("paused")) is True:
                bound.info("pause.kubernetes", outcome="skipped", attempts=self.attempts)
                return ActionResult("skipped", f"rollout {self.namespace}/{target} already paused",
                                    attempts=self.attempts, data={**data, "paused": True})
            body = {"metadata": {"annotations": {INCIDENT_ANNOTATION: incident_id}}, "spec": {"paused": True}}
            data["patch"] = body
            group, version, plural = ARGO
            self._call(f"pause rollout {self.namespace}/{target}", client.CustomObjectsApi(self._client)
                       .patch_namespaced_custom_object, group, version, self.namespace, plural, target, body,
                       _content_type=MERGE)
        except _Failed as exc:
            bound.error("pause.kubernetes", outcome="failed", attempts=self.attempts, detail=str(exc))
            return ActionResult("failed", str(exc), attempts=self.attempts, data=data)
        bound.info("pause.kubernetes", outcome="succeeded", attempts=self.attempts)
        return ActionResult("succeeded", f"rollout {self.namespace}/{target} paused", attempts=self.attempts,
                            data={**data, "paused": True})

    def current(self, deployment: str, variant: str) -> str | None:
        if self.kind == "argo-rollout":
            return None  # the stable version lives in a ReplicaSet, not in the Rollout's spec
        try:
            obj = self._get(self.name or deployment)
            return self.shape.deployment_version(obj) if self.kind == "deployment" else self.shape.kserve_version(obj)
        except _Failed:
            return None

    def verify(self, plan: RollbackPlan) -> ActionResult:
        target = self.name or plan.deployment
        try:
            obj = self._get(target)
            wanted = self.shape.already(obj, plan)
        except _Failed as exc:
            return ActionResult("failed", str(exc), data={"pending": False})
        if not wanted:
            return ActionResult("failed", f"{self.kind} {self.namespace}/{target} is not in the rolled-back state",
                                data={"pending": False})
        status = obj.get("status") or {}
        if self.kind == "deployment":
            want = (obj.get("spec") or {}).get("replicas", 1)
            generation = (obj.get("metadata") or {}).get("generation", 0)
            done = (
                status.get("observedGeneration", 0) >= generation
                and status.get("updatedReplicas", 0) == want
                and status.get("availableReplicas", 0) == want
            )
            counts = {k: status.get(k, 0) for k in ("updatedReplicas", "availableReplicas")}
            if not done:
                return ActionResult("failed", f"rollout in progress: {counts}, want {want}",
                                    data={"pending": True, **counts})
            return ActionResult("succeeded", f"rolled out: {want} replicas at {plan.to_version}", data=counts)
        if self.kind == "argo-rollout":
            return self._verify_abort(target, status)
        if self.kind == "kserve":
            ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
            if ready and ready[0].get("status") != "True":
                return ActionResult("failed", "InferenceService not Ready yet", data={"pending": True})
            # KServe reports the split it routes: the latest revision is the canary's.
            traffic = ((status.get("components") or {}).get("predictor") or {}).get("traffic") or []
            latest = [t.get("percent") or 0 for t in traffic if t.get("latestRevision")]
            if not self.shape.storage_uri_template and latest and latest[0] > 0:
                return ActionResult("failed", f"InferenceService canary still gets {latest[0]}% of traffic",
                                    data={"pending": True, "canary_percent": latest[0]})
        return ActionResult("succeeded", f"{self.kind} {self.namespace}/{target} rolled back",
                            data={"phase": status.get("phase")})

    def _verify_abort(self, target: str, status: dict[str, Any]) -> ActionResult:
        # status.abort is ours; abortedAt is the controller's ("reconciled an aborted rollout").
        if not status.get("abortedAt"):
            return ActionResult("failed", f"rollout {self.namespace}/{target}: abort requested, not yet "
                                "reconciled by the Argo Rollouts controller (no status.abortedAt)",
                                data={"pending": True, "phase": status.get("phase")})
        weight = ((((status.get("canary") or {}).get("weights") or {}).get("canary")) or {}).get("weight")
        if weight:
            return ActionResult("failed", f"rollout {self.namespace}/{target} aborted; the canary still "
                                f"gets {weight}% of traffic", data={"pending": True, "canary_weight": weight})
        return ActionResult("succeeded", f"rollout {self.namespace}/{target} aborted at {status['abortedAt']}",
                            data={"phase": status.get("phase")})


def _api_client(api_url: str | None, token: str | None, kubeconfig: str | None, context: str | None,
                in_cluster: bool, verify_tls: bool, ca_file: str | None = None) -> Any:
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise ValueError(
            "kubernetes backend: the 'kubernetes' package is not installed (pip install 'rollbackd[kubernetes]')"
        ) from exc
    cfg = client.Configuration()
    if api_url:
        cfg.host = api_url.rstrip("/")
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
    elif in_cluster:
        config.load_incluster_config(client_configuration=cfg)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    if ca_file:  # a private CA (api_url + token); a kubeconfig and in_cluster bring their own
        if not os.path.isfile(ca_file):
            raise ValueError(f"kubernetes backend: ca_file {ca_file!r} is not a readable file")
        cfg.ssl_ca_cert = ca_file
    cfg.verify_ssl = verify_tls
    cfg.retries = False  # one place retries: rollbackd's policy, not urllib3's hidden one
    return client.ApiClient(cfg)
