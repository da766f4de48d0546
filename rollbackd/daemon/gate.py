"""The promotion gate: rollbackd's verdict on one arm, in the shapes Argo Rollouts and Flagger read.

``GET /v1/gate/DEPLOYMENT/VARIANT`` is for Argo Rollouts' ``web`` metric provider. Argo treats
any non-2xx answer as a measurement *error* and never reads its body
(``metricproviders/webmetric/webmetric.go``), so the gate answers 200 with a JSON verdict that
the ``successCondition`` / ``failureCondition`` of ``deploy/argo/analysis-template.yaml`` read:
``fail`` is a Failed measurement (the rollout aborts at the first), ``inconclusive`` matches
neither condition (Argo's Inconclusive), ``pass`` is Successful. ``?codes=1`` answers the verdict
as a status code instead (200 / 412 / 503), for ``curl --fail`` gates; a ``POST`` answers that way
unless ``?codes=0``, as it did when Flagger's webhooks were pointed here.

``POST /v1/flagger/HOOK`` answers Flagger's webhooks (``pkg/controller/webhook.go``: a JSON
``{name, namespace, phase, checksum, metadata}``; an answer above 202 is "no"):
``confirm-promotion`` says 200 only on ``pass``, ``rollback`` says 200 only on ``fail``.

The body is strict JSON (non-finite numbers become null): Argo v1.9 counts a body it cannot
parse as a *successful* measurement, so a stray ``NaN`` would have passed a failing canary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from rollbackd.actions.posting import finite

__all__ = [
    "FLAGGER_HOOKS",
    "GATE_STATUS",
    "FlaggerHook",
    "Gate",
    "encode",
    "gate_verdict",
]

# The verdict as a status code, for ``?codes=1`` (and a POST to /v1/gate): what /v1/gate always
# answered before Argo's web metric was supported.
GATE_STATUS = {"pass": 200, "fail": 412, "inconclusive": 503}
# Flagger's "no": any status above 202 is; 403 is what Flagger's own load tester's gates answer
# (pkg/loadtester/server.go, /gate/check and /rollback/check).
FLAGGER_NO = 403
# Flagger's hook type -> the verdict that makes the answer 200.
FLAGGER_HOOKS = {"confirm-promotion": "pass", "rollback": "fail"}

Measurements = Mapping[tuple[str, str, str], tuple[float, Mapping[str, Any]]]


def gate_verdict(pipeline: Any, measurements: Measurements, deployment: str, variant: str) -> dict[str, Any]:
    """The promotion gate for one arm: every rule that applies to it is judged on its alert
    state and latest measurement. ``fail``: some alert fires. ``inconclusive``: some alert is
    pending (breaching, not yet for long enough), or some rule has no measurement yet or too few
    samples. ``pass``: every rule measured enough and none breaches. No rule: inconclusive."""
    from rollbackd.rules.alerts import AlertState

    rules = [r for r in pipeline.config.rules if r.applies_to(deployment, variant)]
    alerts = dict(pipeline.alerts)
    checks = []
    for rule in rules:
        alert = alerts.get((rule.name, (deployment, variant)))
        state = alert.state if alert is not None else AlertState.INACTIVE
        ts, m = measurements.get((rule.name, deployment, variant), (None, {}))
        if state == AlertState.FIRING:
            verdict, why = "fail", "alert firing"
        elif state == AlertState.PENDING:
            verdict, why = "inconclusive", "breaching, not yet for the rule's `for`"
        elif ts is None:
            verdict, why = "inconclusive", "not measured yet"
        elif m.get("insufficient") or (m.get("sample_size") or 0) < rule.min_samples:
            verdict, why = "inconclusive", f"{m.get('sample_size') or 0} samples, needs {rule.min_samples}"
        else:
            verdict, why = "pass", "within threshold"
        checks.append({
            "rule": rule.name, "detector": rule.detector, "severity": rule.severity,
            "state": state.value, "verdict": verdict,
            "reason": why, "ts": ts, "measurement": dict(m),
        })
    verdicts = {c["verdict"] for c in checks}
    overall = ("fail" if "fail" in verdicts else "inconclusive" if ("inconclusive" in verdicts or not checks)
               else "pass")
    hist = pipeline.versions.get((deployment, variant))
    return {
        "deployment": deployment, "variant": variant, "verdict": overall,
        "reason": _reason(overall, checks, deployment, variant),
        "pass": overall == "pass", "fail": overall == "fail",
        "version": hist.current.version if hist is not None and hist.current is not None else None,
        "event_time": pipeline.max_event_time if math.isfinite(pipeline.max_event_time) else None,
        "rollback": variant != "shadow",
        "incidents": _open_incidents(pipeline, deployment, variant),
        "checks": checks,
    }


def _reason(verdict: str, checks: list[dict[str, Any]], deployment: str, variant: str) -> str:
    """One line for a person reading Argo's or Flagger's events: the checks behind the verdict."""
    if not checks:
        return f"no rule applies to {deployment}/{variant}"
    if verdict == "pass":
        return f"{len(checks)} rule(s) within threshold"
    return "; ".join(f"{c['rule']}: {c['reason']}" for c in checks if c["verdict"] == verdict)


def _open_incidents(pipeline: Any, deployment: str, variant: str) -> list[dict[str, Any]]:
    """The open incidents with an alert on this arm, briefly (``/incidents`` has them whole)."""
    for attempt in range(5):
        try:  # read from the HTTP thread while the loop may change the book
            return [{
                "id": i.id, "severity": i.severity, "opened_at": i.opened_at,
                "rules": sorted({a.rule for a in i.alerts.values() if a.variant == variant}),
                "actions_done": list(i.actions_done), "verification": i.verification,
            } for i in pipeline.incidents()
                if i.is_open and i.deployment == deployment
                and any(a.variant == variant for a in i.alerts.values())]
        except RuntimeError:  # a dict changed size during iteration: the loop moved; again
            if attempt == 4:
                raise
    return []


@dataclass(frozen=True, slots=True)
class FlaggerHook:
    """A Flagger webhook call (``CanaryWebhookPayload``), and the arm it asks about.

    The arm is the webhook's ``metadata.deployment`` (default: the Canary's ``name``) and
    ``metadata.variant`` (default ``canary``)."""

    name: str
    namespace: str
    phase: str
    deployment: str
    variant: str

    @classmethod
    def parse(cls, body: bytes) -> "FlaggerHook":
        """The call in ``body``, or ``ValueError`` saying what is wrong with it."""
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("the body is not JSON: expected Flagger's webhook payload "
                             '{"name", "namespace", "phase", "checksum", "metadata"}') from None
        if not isinstance(payload, dict):
            raise ValueError("the body must be a JSON object (Flagger's webhook payload)")
        fields = {}
        for key in ("name", "namespace"):
            value = payload.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key!r} must be a non-empty string (the Canary's {key})")
            fields[key] = value
        phase = payload.get("phase", "")
        if not isinstance(phase, str):
            raise ValueError("'phase' must be a string")
        metadata = payload.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("'metadata' must be an object of strings (the webhook's metadata)")
        deployment = metadata.get("deployment") or fields["name"]
        variant = metadata.get("variant") or "canary"
        return cls(name=fields["name"], namespace=fields["namespace"], phase=phase,
                   deployment=deployment, variant=variant)


class Gate:
    """Answers the gate's HTTP routes from the daemon's state; each returns (status, JSON body)."""

    def __init__(self, pipeline: Any, measurements: Callable[[], Measurements]) -> None:
        self.pipeline = pipeline
        self.measurements = measurements

    def verdict(self, deployment: str, variant: str) -> dict[str, Any]:
        return gate_verdict(self.pipeline, self.measurements(), deployment, variant)

    def argo(self, path: str, query: Mapping[str, list[str]], *, post: bool) -> tuple[int, dict[str, Any]]:
        """``/v1/gate/DEPLOYMENT/VARIANT``: 200 and the verdict; with ``codes``, the verdict's
        status code."""
        parts = path.split("/")
        if len(parts) != 2 or not all(parts):
            return 404, {"error": "use /v1/gate/DEPLOYMENT/VARIANT"}
        try:
            codes = _flag(query, "codes", default=post)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        result = self.verdict(*parts)
        return (GATE_STATUS[result["verdict"]] if codes else 200), result

    def flagger(self, hook: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """``POST /v1/flagger/HOOK`` with Flagger's payload: 200 when the hook's answer is yes."""
        wanted = FLAGGER_HOOKS.get(hook)
        if wanted is None:
            return 404, {"error": f"no Flagger hook {hook!r}; use one of "
                                  + ", ".join(f"/v1/flagger/{h}" for h in FLAGGER_HOOKS)}
        try:
            call = FlaggerHook.parse(body)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        result = self.verdict(call.deployment, call.variant)
        result["hook"] = hook
        result["canary"] = f"{call.namespace}/{call.name}"
        return (200 if result["verdict"] == wanted else FLAGGER_NO), result


def _flag(query: Mapping[str, list[str]], name: str, *, default: bool) -> bool:
    values = query.get(name)
    if not values:
        return default
    value = values[-1].strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"?{name}= takes 1 or 0, got {values[-1]!r}")


def encode(answer: Mapping[str, Any]) -> bytes:
    """Strict JSON: a non-finite float (a p-value of inf, a NaN effect size) becomes null, since
    an unparseable body is a *successful* measurement to Argo v1.9."""
    return json.dumps(finite(answer), sort_keys=True, default=str, allow_nan=False).encode() + b"\n"
