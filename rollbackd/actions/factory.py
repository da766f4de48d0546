"""Backends and notifiers chosen by name from the config, with their options checked here.

Secrets never sit in the rules file: ``secret_env`` / ``token_env`` name environment variables
read at construction (``env`` is injected for tests); the Slack token defaults to
``SLACK_BOT_TOKEN``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, TextIO

from rollbackd.actions.base import Notifier, NullNotifier, RollbackBackend
from rollbackd.actions.console import ConsoleNotifier
from rollbackd.actions.logbackend import LogBackend
from rollbackd.actions.retry import RetryPolicy
from rollbackd.actions.slack import SlackNotifier
from rollbackd.actions.webhook import WebhookBackend
from rollbackd.rules.model import BackendSpec, NotifierSpec

__all__ = ["BACKEND_TYPES", "NOTIFIER_TYPES", "make_backend", "make_notifier"]

BACKEND_TYPES = ("log", "webhook")
NOTIFIER_TYPES = ("console", "none", "slack")

_RETRY_OPTIONS = ("max_attempts", "base_delay", "max_delay", "multiplier")
_OPTIONS = {
    ("backend", "log"): (),
    ("backend", "webhook"): ("url", "secret_env", "timeout", "headers", "retry"),
    ("notifier", "console"): ("color",),
    ("notifier", "none"): (),
    ("notifier", "slack"): ("channel", "token_env", "base_url", "max_rate_limit_retries", "timeout"),
}


def _check_options(kind: str, name: str, options: Mapping[str, Any]) -> None:
    known = _OPTIONS[(kind, name)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{name} {kind}: unknown option(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(known) or 'none'})"
        )


def _secret(kind: str, options: Mapping[str, Any], key: str, env: Mapping[str, str], default_env: str | None) -> str | None:
    var = options.get(f"{key}_env", default_env)
    if var is None:
        return None
    value = env.get(str(var))
    if not value and f"{key}_env" in options:
        raise ValueError(f"{kind}: environment variable {var!r} ({key}_env) is not set")
    return value or None


def make_backend(
    spec: BackendSpec,
    *,
    sleep: Callable[[float], object] = time.sleep,
    env: Mapping[str, str] = os.environ,
) -> RollbackBackend:
    """The rollback backend ``spec.type`` names; ``ValueError`` lists the known names."""
    if spec.type not in BACKEND_TYPES:
        raise ValueError(f"unknown backend type {spec.type!r} (known: {', '.join(BACKEND_TYPES)})")
    options = spec.options
    _check_options("backend", spec.type, options)
    if spec.type == "log":
        return LogBackend()

    url = options.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError("webhook backend: option 'url' is required")
    secret = _secret("webhook backend", options, "secret", env, None)
    retry = options.get("retry") or {}
    if not isinstance(retry, Mapping):
        raise ValueError("webhook backend: option 'retry' must be a mapping")
    unknown = sorted(set(retry) - set(_RETRY_OPTIONS))
    if unknown:
        raise ValueError(
            f"webhook backend: unknown retry option(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(_RETRY_OPTIONS)})"
        )
    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ValueError("webhook backend: option 'headers' must be a mapping")
    return WebhookBackend(
        url,
        secret.encode("utf-8") if secret is not None else None,
        timeout=float(options.get("timeout", 5.0)),
        policy=RetryPolicy(**dict(retry)),
        headers={str(k): str(v) for k, v in headers.items()},
        sleep=sleep,
    )


def make_notifier(
    spec: NotifierSpec,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] = os.environ,
) -> Notifier:
    """The notifier ``spec.type`` names; ``ValueError`` lists the known names."""
    if spec.type not in NOTIFIER_TYPES:
        raise ValueError(f"unknown notifier type {spec.type!r} (known: {', '.join(NOTIFIER_TYPES)})")
    options = spec.options
    _check_options("notifier", spec.type, options)
    if spec.type == "none":
        return NullNotifier()
    if spec.type == "console":
        return ConsoleNotifier(stream=stream, color=bool(options.get("color", False)))

    channel = options.get("channel")
    if not isinstance(channel, str) or not channel:
        raise ValueError("slack notifier: option 'channel' is required")
    token = _secret("slack notifier", options, "token", env, "SLACK_BOT_TOKEN")
    if token is None:
        raise ValueError("slack notifier: no token (set SLACK_BOT_TOKEN or the variable named by token_env)")
    return SlackNotifier(
        token,
        channel,
        base_url=str(options.get("base_url", "https://slack.com/api/")),
        max_rate_limit_retries=int(options.get("max_rate_limit_retries", 3)),
        timeout=int(options.get("timeout", 10)),
    )
