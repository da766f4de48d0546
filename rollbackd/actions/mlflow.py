"""Rollback in the MLflow Model Registry: move an alias (``champion``) back to a known-good version.

Talks to the registry's REST API (``/api/2.0/mlflow/...``) with the standard library, so
nothing from MLflow is imported at run time. The versions are tagged before the alias moves,
so an alias already at the target means the whole plan already ran: that is the ``skipped``
case. Tags: ``rollbackd.incident`` on both versions, ``rollbackd.rolled_back_from`` (the
alias) on the version rolled away from.

Every answer is checked, not just its status: a 2xx whose body is not the registry's (not JSON,
no ``model_version`` naming the model and version asked for) is :class:`UnexpectedAnswer`, a
failure; and the alias is read back after it is set, so "succeeded" means the registry says so.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

import structlog

from rollbackd.actions.base import ActionResult, RollbackPlan
from rollbackd.actions.retry import Attempt, CountsAttempts, RetryPolicy, RetryResult, retrying

__all__ = ["MlflowRegistryBackend", "INCIDENT_TAG", "ROLLED_BACK_FROM_TAG", "MlflowError", "UnexpectedAnswer"]

INCIDENT_TAG = "rollbackd.incident"
ROLLED_BACK_FROM_TAG = "rollbackd.rolled_back_from"
_MAX_RESPONSE_BYTES = 1024 * 1024

log = structlog.get_logger("rollbackd.actions.mlflow")


def _absent(body: Any) -> bool:
    # A missing model or version is 404 RESOURCE_DOES_NOT_EXIST; a missing alias is
    # 400 INVALID_PARAMETER_VALUE "Registered model alias X not found." (MLflow 2.x and 3.x).
    if not isinstance(body, dict):
        return False
    code = body.get("error_code")
    message = str(body.get("message", "")).lower()
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message
    )


class MlflowError(Exception):
    """A registry call that did not succeed after its retries; carries the last attempt."""

    def __init__(self, what: str, result: RetryResult) -> None:
        self.result = result
        why = "gave up" if result.outcome == "give_up" else f"gave up after {result.attempts} attempts"
        super().__init__(f"{what}: {why}: {result.last.describe()}")


class UnexpectedAnswer(MlflowError):
    """A 2xx answer that is not what the registry's API returns (a proxy's page, another
    service on the port, a stub): never taken for success. Not retried."""

    def __init__(self, what: str, why: str) -> None:
        Exception.__init__(self, f"{what}: unexpected answer: {why}")


def _shape(body: Any) -> str:
    """A short, payload-free description of an answer, for an error message."""
    if isinstance(body, dict):
        keys = sorted(map(str, body))
        return "JSON object with keys " + (", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "") if keys else "none")
    return f"JSON {type(body).__name__}"


def _model_version(what: str, body: Any, model: str, version: str | None = None) -> dict[str, Any]:
    """``body["model_version"]`` of a registry answer, checked: it names ``model`` (and
    ``version``, if given). MLflow 2.x and 3.x answer GET alias and GET model-versions so."""
    mv = body.get("model_version") if isinstance(body, dict) else None
    if not isinstance(mv, dict) or mv.get("version") is None:
        raise UnexpectedAnswer(what, f"no model_version with a version in it ({_shape(body)})")
    if mv.get("name") != model:
        raise UnexpectedAnswer(what, f"model_version names model {mv.get('name')!r}, not {model!r}")
    if version is not None and str(mv["version"]) != version:
        raise UnexpectedAnswer(what, f"model_version is version {mv['version']!r}, not {version!r}")
    return mv


class MlflowRegistryBackend(CountsAttempts):
    """Sets alias ``alias`` of registered model ``model`` (default: the deployment) to ``to_version``."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        alias: str = "champion",
        model: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        parts = urlsplit(tracking_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"tracking_uri must be an absolute http:// or https:// URL, got {tracking_uri!r}")
        if not alias:
            raise ValueError("alias must be a non-empty string")
        if not timeout > 0:
            raise ValueError(f"timeout must be in (0, inf) seconds, got {timeout}")
        self.tracking_uri = tracking_uri.rstrip("/")
        self.alias = alias
        self.model = model
        self.token = token
        self.timeout = float(timeout)
        self.policy = policy
        self.sleep = sleep

    # -- REST ------------------------------------------------------------------------------

    def _call(self, method: str, endpoint: str, payload: dict[str, Any], bound: Any) -> tuple[int, Any]:
        """One registry call under the retry policy; returns (status, JSON) or raises MlflowError.

        "No such alias/model/version" is returned as status 404, not raised: it is an answer.
        """
        url = f"{self.tracking_uri}/api/2.0/mlflow/{endpoint}"
        data = None
        if method == "GET":
            url += "?" + urlencode(payload)
        else:
            data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        box: dict[str, Any] = {}

        def send() -> Attempt:
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    box["body"] = resp.read(_MAX_RESPONSE_BYTES)
                    return Attempt(status=resp.status, reason=resp.reason or "")
            except urllib.error.HTTPError as err:
                with err:
                    body = err.read(_MAX_RESPONSE_BYTES)
                    box["body"] = body
                    reason = err.reason or ""
                    try:
                        reason = json.loads(body).get("message", reason)[:300]
                    except (ValueError, AttributeError):
                        pass
                    return Attempt(status=err.code, retry_after=err.headers.get("Retry-After"), reason=reason)

        def on_retry(n: int, attempt: Attempt, pause: float) -> None:
            bound.warning("rollback.mlflow.retry", endpoint=endpoint, attempt=n, error=attempt.describe(), delay=pause)

        result = retrying(send, self.policy, sleep=self.sleep, on_retry=on_retry)
        self.attempts += result.attempts
        raw = box.get("body") or b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        status = result.last.status
        if status in (400, 404) and _absent(body):
            return 404, body
        if not result.ok:
            raise MlflowError(f"{method} {endpoint}", result)
        # Every registry answer is a JSON object ({} for a tag or an alias set): anything else
        # is not the registry, whatever its status says.
        if not isinstance(body, dict):
            why = "a body that is not JSON" if body is None else _shape(body)
            raise UnexpectedAnswer(f"{method} {endpoint}", f"HTTP {status} with {why}")
        return status or 200, body

    def _alias_version(self, model: str, bound: Any) -> str | None:
        status, body = self._call("GET", "registered-models/alias", {"name": model, "alias": self.alias}, bound)
        if status == 404:
            return None
        mv = _model_version("GET registered-models/alias", body, model)
        aliases = mv.get("aliases")
        if isinstance(aliases, list) and self.alias not in aliases:
            raise UnexpectedAnswer("GET registered-models/alias",
                                   f"version {mv['version']} does not carry alias {self.alias!r}")
        return str(mv["version"])

    def _set_tag(self, model: str, version: str, key: str, value: str, bound: Any) -> None:
        self._call("POST", "model-versions/set-tag",
                   {"name": model, "version": version, "key": key, "value": value}, bound)

    # -- protocol --------------------------------------------------------------------------

    def apply(self, plan: RollbackPlan) -> ActionResult:
        model = self.model or plan.deployment
        bound = log.bind(deployment=plan.deployment, variant=plan.variant, incident=plan.incident_id,
                         to_version=plan.to_version, model=model, alias=self.alias)
        self.attempts = 0
        data: dict[str, Any] = {"model": model, "alias": self.alias, "to_version": plan.to_version}
        try:
            before = self._alias_version(model, bound)
            data["before"] = before
            if before == plan.to_version:
                bound.info("rollback.mlflow", outcome="skipped", attempts=self.attempts)
                return ActionResult("skipped", f"alias {self.alias!r} of {model!r} already at version {before}",
                                    attempts=self.attempts, data=data)
            status, body = self._call("GET", "model-versions/get", {"name": model, "version": plan.to_version}, bound)
            if status == 404:
                detail = f"model {model!r} has no version {plan.to_version!r}"
                bound.error("rollback.mlflow", outcome="failed", detail=detail)
                return ActionResult("failed", detail, attempts=self.attempts, data=data)
            _model_version("GET model-versions/get", body, model, plan.to_version)
            bad = plan.from_version or before
            self._set_tag(model, plan.to_version, INCIDENT_TAG, plan.incident_id, bound)
            if bad is not None and bad != plan.to_version:
                self._set_tag(model, bad, INCIDENT_TAG, plan.incident_id, bound)
                self._set_tag(model, bad, ROLLED_BACK_FROM_TAG, self.alias, bound)
            self._call("POST", "registered-models/alias",
                       {"name": model, "alias": self.alias, "version": plan.to_version}, bound)
            # The set answers {} whatever happened: only reading the alias back shows it moved.
            after = self._alias_version(model, bound)
            data["after"] = after
            if after != plan.to_version:
                detail = (f"alias {self.alias!r} of {model!r} reads back version {after!r} after it was set "
                          f"to {plan.to_version!r}")
                bound.error("rollback.mlflow", outcome="failed", attempts=self.attempts, detail=detail)
                return ActionResult("failed", detail, attempts=self.attempts, data=data)
        except MlflowError as exc:
            bound.error("rollback.mlflow", outcome="failed", attempts=self.attempts, detail=str(exc))
            return ActionResult("failed", str(exc), attempts=self.attempts, data=data)
        bound.info("rollback.mlflow", outcome="succeeded", attempts=self.attempts, before=before)
        return ActionResult("succeeded", f"alias {self.alias!r} of {model!r}: {before} -> {plan.to_version}",
                            attempts=self.attempts, data=data)

    def current(self, deployment: str, variant: str) -> str | None:
        model = self.model or deployment
        try:
            return self._alias_version(model, log.bind(deployment=deployment, model=model))
        except MlflowError:
            return None

    def verify(self, plan: RollbackPlan) -> ActionResult:
        model = self.model or plan.deployment
        try:
            now = self._alias_version(model, log.bind(deployment=plan.deployment, model=model))
        except MlflowError as exc:
            return ActionResult("failed", str(exc), data={"pending": False})
        if now == plan.to_version:
            return ActionResult("succeeded", f"alias {self.alias!r} at version {now}", data={"current": now})
        return ActionResult("failed", f"alias {self.alias!r} at version {now!r}, expected {plan.to_version!r}",
                            data={"current": now, "pending": False})
