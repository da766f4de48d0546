"""PagerDuty's Events API v2 and Opsgenie's Alert API v2 as loopback responders that check each
request against the documented contract and answer as the services do.

Every request that breaks the contract is answered as the service answers it (400/401/404/
405/415) *and* kept in ``violations``, so a test asserts ``violations == []`` rather than
trusting a status code it might have retried past. Each keeps the alerts it holds
(``state``: key → triggered / acknowledged / resolved, or open / acknowledged / closed), as
the service's dedup would.

Sources: PagerDuty Events API v2 "Send an Alert Event" (``POST /v2/enqueue``; routing_key,
event_action trigger|acknowledge|resolve, dedup_key ≤ 255 chars; a trigger's payload needs
summary ≤ 1024 chars, source, severity critical|error|warning|info; optional timestamp
(ISO 8601), component, group, class, custom_details; links [{href, text}]; 202
``{"status": "success", "message": "Event processed", "dedup_key": ...}``; 400
``{"status": "invalid event", "message": "Event object is invalid", "errors": [...]}``).
Opsgenie Alert API v2 (``Authorization: GenieKey <key>``; ``POST /v2/alerts`` message ≤ 130
chars required, alias ≤ 512, description ≤ 15000, tags, details (string map), entity, source
≤ 100, priority P1–P5, responders [{type, id|name|username}];
``POST /v2/alerts/<identifier>/close|acknowledge?identifierType=alias`` with optional user
≤ 100, source ≤ 100, note ≤ 25000; 202 ``{"result": "Request will be processed", "took": …,
"requestId": …}``).
"""

from __future__ import annotations

import itertools
import json
import threading
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from loopback import Recorded, Reply

PD_TOP = {"routing_key", "event_action", "dedup_key", "payload", "images", "links", "client", "client_url"}
PD_PAYLOAD = {"summary", "source", "severity", "timestamp", "component", "group", "class", "custom_details"}
PD_SEVERITIES = {"critical", "error", "warning", "info"}
OG_CREATE = {"message", "alias", "description", "responders", "visibleTo", "actions", "tags", "details",
             "entity", "source", "priority", "user", "note"}


class _Contract:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self.events: list[tuple[str, str]] = []  # (action, key) accepted, in order
        self.state: dict[str, str] = {}
        self._lock = threading.Lock()

    def _bad(self, why: str) -> str:
        with self._lock:
            self.violations.append(why)
        return why

    def _json(self, request: Recorded) -> Any:
        if (request.header("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self._bad(f"Content-Type {request.header('Content-Type')!r}, not application/json"), None
        try:
            return None, json.loads(request.body)
        except ValueError:
            return self._bad("body is not JSON"), None


class PagerDutyEvents(_Contract):
    """``POST /v2/enqueue`` of the Events API v2."""

    def __init__(self, routing_key: str) -> None:
        super().__init__()
        self.routing_key = routing_key

    def __call__(self, request: Recorded) -> Reply:
        if request.method != "POST" or urlsplit(request.path).path != "/v2/enqueue":
            self._bad(f"{request.method} {request.path}: not POST /v2/enqueue")
            return Reply(404, body={"status": "not found"})
        why, event = self._json(request)
        errors = [why] if why else self.check(event)
        if errors:
            for e in errors[1:]:
                self._bad(e)
            return Reply(400, body={"status": "invalid event", "message": "Event object is invalid", "errors": errors})
        key, action = event["dedup_key"], event["event_action"]
        with self._lock:
            self.events.append((action, key))
            current = self.state.get(key)
            if action == "trigger" and current in (None, "resolved"):
                self.state[key] = "triggered"
            elif action == "acknowledge" and current == "triggered":
                self.state[key] = "acknowledged"
            elif action == "resolve" and current is not None:
                self.state[key] = "resolved"
        return Reply(202, body={"status": "success", "message": "Event processed", "dedup_key": key})

    def check(self, event: Any) -> list[str]:
        if not isinstance(event, dict):
            return [self._bad("event is not a JSON object")]
        errors: list[str] = []
        extra = set(event) - PD_TOP
        if extra:
            errors.append(f"unknown fields {sorted(extra)}")
        if event.get("routing_key") != self.routing_key:
            errors.append(f"routing_key {event.get('routing_key')!r} is not the integration's")
        action = event.get("event_action")
        if action not in ("trigger", "acknowledge", "resolve"):
            errors.append(f"event_action {action!r}")
        key = event.get("dedup_key")
        if not isinstance(key, str) or not 0 < len(key) <= 255:
            errors.append(f"dedup_key {key!r}: a string of at most 255 characters")
        if action == "trigger":
            errors += self._payload(event.get("payload"))
            links = event.get("links", [])
            if not isinstance(links, list) or not all(
                isinstance(link, dict) and isinstance(link.get("href"), str) and isinstance(link.get("text", ""), str)
                for link in links
            ):
                errors.append(f"links {links!r}: a list of {{href, text}}")
        elif action in ("acknowledge", "resolve") and not key:
            errors.append(f"{action} needs the dedup_key of the alert")
        return [self._bad(e) for e in errors]

    @staticmethod
    def _payload(payload: Any) -> list[str]:
        if not isinstance(payload, dict):
            return [f"trigger without a payload object: {payload!r}"]
        errors = []
        extra = set(payload) - PD_PAYLOAD
        if extra:
            errors.append(f"unknown payload fields {sorted(extra)}")
        summary = payload.get("summary")
        if not isinstance(summary, str) or not 0 < len(summary) <= 1024:
            errors.append(f"payload.summary {summary!r}: 1 to 1024 characters")
        if not isinstance(payload.get("source"), str) or not payload["source"]:
            errors.append("payload.source is required")
        if payload.get("severity") not in PD_SEVERITIES:
            errors.append(f"payload.severity {payload.get('severity')!r} not in {sorted(PD_SEVERITIES)}")
        if "timestamp" in payload:
            try:
                datetime.fromisoformat(str(payload["timestamp"]).replace("Z", "+00:00"))
            except ValueError:
                errors.append(f"payload.timestamp {payload['timestamp']!r} is not ISO 8601")
        for name in ("component", "group", "class"):
            if name in payload and not isinstance(payload[name], str):
                errors.append(f"payload.{name} must be a string")
        if "custom_details" in payload and not isinstance(payload["custom_details"], dict):
            errors.append("payload.custom_details must be an object")
        return errors


class OpsgenieAlerts(_Contract):
    """``/v2/alerts`` of the Alert API: create, and close / acknowledge by alias."""

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key
        self._ids = itertools.count(1)

    def _accepted(self) -> Reply:
        return Reply(202, body={"result": "Request will be processed", "took": 0.01,
                                "requestId": f"00000000-0000-0000-0000-{next(self._ids):012d}"})

    def __call__(self, request: Recorded) -> Reply:
        if request.header("Authorization") != f"GenieKey {self.api_key}":
            self._bad(f"Authorization {request.header('Authorization')!r}")
            return Reply(401, body={"message": "Could not authenticate", "took": 0.0})
        parts = urlsplit(request.path)
        segments = parts.path.split("/")
        if request.method != "POST" or segments[:3] != ["", "v2", "alerts"]:
            self._bad(f"{request.method} {request.path}")
            return Reply(404, body={"message": "Not found", "took": 0.0})
        why, body = self._json(request)
        if why:
            return Reply(400, body={"message": why, "took": 0.0})
        if len(segments) == 3:
            errors = self._create(body)
            if errors:
                return Reply(422, body={"message": "; ".join(errors), "took": 0.0})
            alias = body.get("alias") or body["message"]
            with self._lock:
                self.events.append(("create", alias))
                if self.state.get(alias) != "open" and self.state.get(alias) != "acknowledged":
                    self.state[alias] = "open"
            return self._accepted()
        if len(segments) != 5 or segments[4] not in ("close", "acknowledge"):
            self._bad(f"POST {request.path}: not an alert action")
            return Reply(404, body={"message": "Not found", "took": 0.0})
        query = parse_qs(parts.query)
        if query.get("identifierType") != ["alias"]:
            self._bad(f"{request.path}: identifierType is not alias (the id would be looked up)")
        errors = self._action(body)
        if errors:
            return Reply(422, body={"message": "; ".join(errors), "took": 0.0})
        alias, verb = unquote(segments[3]), segments[4]
        with self._lock:
            self.events.append((verb, alias))
            if alias in self.state and self.state[alias] != "closed":
                self.state[alias] = "closed" if verb == "close" else "acknowledged"
        return self._accepted()

    def _create(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return [self._bad("create: body is not an object")]
        errors = []
        extra = set(body) - OG_CREATE
        if extra:
            errors.append(f"create: unknown fields {sorted(extra)}")
        message = body.get("message")
        if not isinstance(message, str) or not 0 < len(message) <= 130:
            errors.append(f"create: message {message!r}: required, at most 130 characters")
        for name, limit in (("alias", 512), ("description", 15000), ("entity", 512), ("source", 100)):
            if name in body and (not isinstance(body[name], str) or len(body[name]) > limit):
                errors.append(f"create: {name} must be a string of at most {limit} characters")
        if "priority" in body and body["priority"] not in ("P1", "P2", "P3", "P4", "P5"):
            errors.append(f"create: priority {body['priority']!r}")
        tags = body.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and len(t) <= 50 for t in tags) or len(tags) > 20:
            errors.append(f"create: tags {tags!r}: at most 20 strings of at most 50 characters")
        details = body.get("details", {})
        if not isinstance(details, dict) or not all(isinstance(v, str) for v in details.values()):
            errors.append(f"create: details {details!r}: a map of strings")
        for r in body.get("responders", []):
            if not isinstance(r, dict) or r.get("type") not in ("team", "user", "escalation", "schedule") \
                    or not ({"id", "name", "username"} & set(r)):
                errors.append(f"create: responder {r!r}")
        return [self._bad(e) for e in errors]

    def _action(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return [self._bad("action: body is not an object")]
        errors = [f"action: unknown fields {sorted(set(body) - {'user', 'source', 'note'})}"] \
            if set(body) - {"user", "source", "note"} else []
        for name, limit in (("user", 100), ("source", 100), ("note", 25000)):
            if name in body and (not isinstance(body[name], str) or len(body[name]) > limit):
                errors.append(f"action: {name} must be a string of at most {limit} characters")
        return [self._bad(e) for e in errors]
