"""Flagger's webhooks against the real HTTP server, with the webhooks of
deploy/flagger/canary.yaml as written: Flagger POSTs ``{name, namespace, phase, checksum,
metadata}`` as JSON (pkg/controller/webhook.go) and takes 200-202 as "yes". ``rollback`` says
yes only to a failing arm, ``confirm-promotion`` only to a passing one; a bad payload is a 4xx
with a JSON error, never a traceback."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate_arms import DEPLOYMENT, FAILING, PASSING, UNMEASURED, gate_server
from rollbackd.daemon.http import OpsServer

CANARY = Path(__file__).resolve().parent.parent / "deploy" / "flagger" / "canary.yaml"


@pytest.fixture(scope="module")
def server():
    with gate_server() as srv:  # and no request raised inside the server
        yield srv


@pytest.fixture(scope="module")
def canary() -> dict[str, Any]:
    (doc,) = yaml.safe_load_all(CANARY.read_text())
    assert doc["kind"] == "Canary"
    return doc


def hooks(canary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["type"]: h for h in canary["spec"]["analysis"]["webhooks"]}


def post(server: OpsServer, path: str, body: bytes | None, *, method: str = "POST",
         headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, Any]]:
    """One request as Flagger's client sends it (retryablehttp: a POST with Content-Type JSON)."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", json.loads(resp.read())
    finally:
        conn.close()


def flagger_call(canary: dict[str, Any], hook: dict[str, Any], *, phase: str = "Progressing",
                 metadata: dict[str, str] | None = None) -> tuple[str, bytes]:
    """The path and payload Flagger's CallWebhook sends for ``hook`` of ``canary``."""
    payload = {"name": canary["metadata"]["name"], "namespace": canary["metadata"]["namespace"],
               "phase": phase, "checksum": "6d5c8bf9b8"}
    meta = hook.get("metadata") if metadata is None else metadata
    if meta:
        payload["metadata"] = meta
    return urllib.parse.urlsplit(hook["url"]).path, json.dumps(payload).encode()


@pytest.mark.parametrize("variant, rollback, promote", [
    (FAILING, 200, 403), (PASSING, 403, 200), (UNMEASURED, 403, 403)])
def test_the_canarys_webhooks_answer_per_verdict(server, canary, variant, rollback, promote):
    for kind, expected in (("rollback", rollback), ("confirm-promotion", promote)):
        hook = hooks(canary)[kind]
        path, body = flagger_call(canary, hook, metadata={**hook["metadata"], "variant": variant})
        status, ctype, answer = post(server, path, body)
        assert (status, ctype) == (expected, "application/json"), (kind, variant, answer)
        assert answer["hook"] == kind and answer["canary"] == "ml/demo-scorer"
        assert (answer["deployment"], answer["variant"]) == (DEPLOYMENT, variant)


def test_the_canary_as_written_is_rolled_back(server, canary):
    """The shipped metadata names the failing canary arm: Flagger would roll it back and not
    promote it, on every phase it calls the rollback hook in."""
    for phase in ("Progressing", "Waiting", "WaitingPromotion"):
        status, _, answer = post(server, *flagger_call(canary, hooks(canary)["rollback"], phase=phase))
        assert status == 200 and answer["verdict"] == "fail" and answer["incidents"]
    status, _, answer = post(server, *flagger_call(canary, hooks(canary)["confirm-promotion"]))
    assert status == 403 and answer["reason"] == "serving-error-rate: alert firing"


def test_without_metadata_the_canarys_name_is_the_deployment(server, canary):
    path, body = flagger_call(canary, hooks(canary)["rollback"], metadata={})
    status, _, answer = post(server, path, body)
    assert status == 200 and (answer["deployment"], answer["variant"]) == ("demo-scorer", "canary")


@pytest.mark.parametrize("body, why", [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"namespace": "ml"}', "'name'"),
    (b'{"name": "demo-scorer", "namespace": ""}', "'namespace'"),
    (b'{"name": "demo-scorer", "namespace": "ml", "phase": 3}', "'phase'"),
    (b'{"name": "demo-scorer", "namespace": "ml", "metadata": {"variant": 1}}', "'metadata'"),
    (b'{"name": "demo-scorer", "namespace": "ml", "metadata": ["x"]}', "'metadata'"),
])
def test_a_bad_payload_is_a_clear_400(server, body, why):
    status, ctype, answer = post(server, "/v1/flagger/rollback", body)
    assert (status, ctype) == (400, "application/json") and why in answer["error"]


def test_wrong_routes_and_methods(server, canary):
    _, body = flagger_call(canary, hooks(canary)["rollback"])
    status, _, answer = post(server, "/v1/flagger/confirm-rollout", body)
    assert status == 404 and "/v1/flagger/confirm-promotion" in answer["error"]
    assert post(server, "/v1/flagger/rollback", None, method="GET")[0] == 405
    status, _, answer = post(server, "/v1/flagger/rollback", None)  # Content-Length: 0
    assert status == 400 and "not JSON" in answer["error"]
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:  # no Content-Length at all
        conn.putrequest("POST", "/v1/flagger/rollback")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_one_connection_carries_several_calls(server, canary):
    """Bodies are read whole, so a kept-alive connection's next request parses cleanly."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        for path, expected in (("/v1/gate/demo-scorer/canary", 412), ("/v1/flagger/rollback", 200),
                               ("/v1/flagger/confirm-promotion", 403)):
            body = flagger_call(canary, hooks(canary)["rollback"])[1]
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == expected and json.loads(resp.read())["verdict"] == "fail"
    finally:
        conn.close()
