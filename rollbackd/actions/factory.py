"""Backends and notifiers chosen by name from the config, with their options checked here.

Secrets never need to sit in the rules file: ``secret_env`` / ``token_env`` name environment
variables, ``secret_file`` / ``token_file`` files (a mounted Kubernetes Secret), read at
construction, that is at start (``env`` is injected for tests); the Slack token defaults to
``SLACK_BOT_TOKEN``, the MLflow token to ``MLFLOW_TRACKING_TOKEN``, the PagerDuty routing key
(``routing_key_env``) to ``PAGERDUTY_ROUTING_KEY``, the Opsgenie key (``api_key_env``) to
``OPSGENIE_API_KEY``. A webhook header's or a command's environment value is a string or
``{file: PATH}`` / ``{env: NAME}``. Backends with heavy or optional dependencies (kubernetes) are
imported only when configured.
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
from rollbackd.rules.model import BACKEND_TYPES, NOTIFIER_TYPES, BackendSpec, NotifierSpec, Settings

__all__ = ["BACKEND_TYPES", "NOTIFIER_TYPES", "make_backend", "make_notifier", "make_notifiers", "notifier_name",
           "read_secret_file", "secret_option", "slack_spec"]


_RETRY_OPTIONS = ("max_attempts", "base_delay", "max_delay", "multiplier")
_OPTIONS = {
    ("backend", "log"): (),
    ("backend", "webhook"): ("url", "secret_env", "timeout", "headers", "retry"),
    ("backend", "mlflow"): ("tracking_uri", "alias", "model", "token_env", "timeout", "retry"),
    ("backend", "kubernetes"): (
        "kind", "name", "namespace", "container", "image_template", "label", "env_var",
        "storage_uri_template", "api_url", "token_env", "kubeconfig", "context", "in_cluster",
        "verify_tls", "ca_file", "timeout", "retry",
    ),
    ("backend", "command"): ("argv", "timeout", "env", "env_from", "cwd", "current_argv", "max_output"),
    ("backend", "traffic-file"): ("path", "route", "format", "total"),
    ("notifier", "console"): ("color",),
    ("notifier", "none"): (),
    ("notifier", "slack"): ("channel", "token_env", "base_url", "max_rate_limit_retries", "timeout"),
    ("notifier", "alertmanager"): (
        "url", "resend_interval", "labels", "generator_url", "token_env", "timeout", "retry",
    ),
    ("notifier", "pagerduty"): ("routing_key_env", "url", "source", "client_url", "timeout", "retry"),
    ("notifier", "opsgenie"): ("api_key_env", "url", "responders", "tags", "timeout", "retry"),
    ("notifier", "webhook"): ("url", "secret_env", "headers", "timeout", "retry"),
}


def _check_options(kind: str, name: str, options: Mapping[str, Any]) -> None:
    # Each secret's variable (X_env) has its file (X_file) beside it: see _secret.
    known = tuple(k for option in _OPTIONS[(kind, name)]
                  for k in ((option, option[:-4] + "_file") if option.endswith("_env") else (option,)))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{name} {kind}: unknown option(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(known) or 'none'})"
        )


def secret_option(kind: str, options: Mapping[str, Any], key: str, env: Mapping[str, str], default_env: str | None) -> str | None:
    """The secret ``key`` of a backend or notifier: read from the file ``{key}_file`` names,
    else from the environment variable ``{key}_env`` names (else ``default_env``); None when
    none is configured. A file or variable named but unusable is a ``ValueError`` naming the
    option and the path or variable, never the value."""
    path = options.get(f"{key}_file")
    if path is not None:
        if f"{key}_env" in options:
            raise ValueError(f"{kind}: set {key}_file or {key}_env, not both")
        return read_secret_file(kind, f"{key}_file", str(path))
    var = options.get(f"{key}_env", default_env)
    if var is None:
        return None
    value = env.get(str(var))
    if not value and f"{key}_env" in options:
        raise ValueError(f"{kind}: environment variable {var!r} ({key}_env) is not set")
    return value or None


def read_secret_file(kind: str, option: str, path: str) -> str:
    """A secret file's content, its trailing newline(s) stripped (``echo tok > f``, a Secret
    created from a file)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{kind}: {option} {path!r} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{kind}: {option} {path!r} cannot be read ({exc.strerror or exc})") from None
    if not value.strip():
        raise ValueError(f"{kind}: {option} {path!r} is empty")
    return value


def _secret_value(kind: str, where: str, value: Any, env: Mapping[str, str]) -> str:
    """A header's or an environment entry's value: a string as written, or the secret behind
    ``{file: PATH}`` / ``{env: NAME}``."""
    if not isinstance(value, Mapping):
        return str(value)
    if set(value) == {"file"}:
        return read_secret_file(kind, f"{where} file", str(value["file"]))
    if set(value) == {"env"}:
        found = env.get(str(value["env"]))
        if not found:
            raise ValueError(f"{kind}: environment variable {value['env']!r} ({where}) is not set")
        return found
    raise ValueError(f"{kind}: {where} must be a string, {{file: PATH}} or {{env: NAME}}")


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
    if spec.type == "mlflow":
        return _mlflow(options, sleep, env)
    if spec.type == "kubernetes":
        return _kubernetes(options, sleep, env)
    if spec.type == "command":
        return _command(options, env)
    if spec.type == "traffic-file":
        return _traffic_file(options)

    url = options.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError("webhook backend: option 'url' is required")
    secret = secret_option("webhook backend", options, "secret", env, None)
    retry = _retry("webhook backend", options)
    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ValueError("webhook backend: option 'headers' must be a mapping")
    return WebhookBackend(
        url,
        secret.encode("utf-8") if secret is not None else None,
        timeout=float(options.get("timeout", 5.0)),
        policy=retry,
        headers={str(k): _secret_value("webhook backend", f"headers.{k}", v, env) for k, v in headers.items()},
        sleep=sleep,
    )


def _retry(kind: str, options: Mapping[str, Any]) -> RetryPolicy:
    retry = options.get("retry") or {}
    if not isinstance(retry, Mapping):
        raise ValueError(f"{kind}: option 'retry' must be a mapping")
    unknown = sorted(set(retry) - set(_RETRY_OPTIONS))
    if unknown:
        raise ValueError(
            f"{kind}: unknown retry option(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(_RETRY_OPTIONS)})"
        )
    return RetryPolicy(**dict(retry))


def _required_str(kind: str, options: Mapping[str, Any], key: str) -> str:
    value = options.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind}: option {key!r} is required (a non-empty string)")
    return value


def _str_list(kind: str, options: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
        isinstance(v, str) and v for v in value
    ):
        raise ValueError(f"{kind}: option {key!r} must be a list of non-empty strings")
    return tuple(value)


def _mlflow(options: Mapping[str, Any], sleep: Callable[[float], object], env: Mapping[str, str]) -> RollbackBackend:
    from rollbackd.actions.mlflow import MlflowRegistryBackend

    kind = "mlflow backend"
    return MlflowRegistryBackend(
        _required_str(kind, options, "tracking_uri"),
        alias=str(options.get("alias", "champion")),
        model=options.get("model"),
        token=secret_option(kind, options, "token", env, "MLFLOW_TRACKING_TOKEN"),
        timeout=float(options.get("timeout", 10.0)),
        policy=_retry(kind, options),
        sleep=sleep,
    )


def _kubernetes(options: Mapping[str, Any], sleep: Callable[[float], object], env: Mapping[str, str]) -> RollbackBackend:
    from rollbackd.actions.kubernetes import KubernetesBackend

    kind = "kubernetes backend"
    return KubernetesBackend(
        _required_str(kind, options, "kind"),
        name=options.get("name"),
        namespace=str(options.get("namespace", "default")),
        container=options.get("container"),
        image_template=options.get("image_template"),
        label=options.get("label"),
        env_var=options.get("env_var"),
        storage_uri_template=options.get("storage_uri_template"),
        api_url=options.get("api_url"),
        token=secret_option(kind, options, "token", env, None),
        kubeconfig=options.get("kubeconfig"),
        context=options.get("context"),
        in_cluster=bool(options.get("in_cluster", False)),
        verify_tls=bool(options.get("verify_tls", True)),
        ca_file=options.get("ca_file"),
        timeout=float(options.get("timeout", 10.0)),
        policy=_retry(kind, options),
        sleep=sleep,
    )


def _command(options: Mapping[str, Any], env: Mapping[str, str]) -> RollbackBackend:
    from rollbackd.actions.command import DEFAULT_MAX_OUTPUT, CommandBackend

    kind = "command backend"
    argv = _str_list(kind, options, "argv")
    if argv is None:
        raise ValueError(f"{kind}: option 'argv' is required (a list of strings)")
    child_env = options.get("env") or {}
    if not isinstance(child_env, Mapping):
        raise ValueError(f"{kind}: option 'env' must be a mapping of name to value")
    return CommandBackend(
        argv,
        timeout=float(options.get("timeout", 60.0)),
        env={str(k): _secret_value(kind, f"env.{k}", v, env) for k, v in child_env.items()},
        env_from=_str_list(kind, options, "env_from") or (),
        cwd=options.get("cwd"),
        current_argv=_str_list(kind, options, "current_argv"),
        max_output=int(options.get("max_output", DEFAULT_MAX_OUTPUT)),
        parent_env=env,
    )


def _traffic_file(options: Mapping[str, Any]) -> RollbackBackend:
    from rollbackd.actions.trafficfile import TrafficFileBackend

    return TrafficFileBackend(
        _required_str("traffic-file backend", options, "path"),
        route=options.get("route"),
        fmt=options.get("format"),
        total=int(options.get("total", 100)),
    )


def make_notifiers(
    settings: Settings,
    *,
    override: NotifierSpec | None = None,
    stream: TextIO | None = None,
    env: Mapping[str, str] = os.environ,
    sleep: Callable[[float], object] = time.sleep,
    now: Callable[[], float] | None = None,
) -> Notifier:
    """Where ``settings`` sends notices: its ``notifiers`` routes (a :class:`NoticeRouter`), or
    its one ``notifier``; ``override`` (the command line's ``--notifier``) replaces both."""
    if override is not None or not settings.notifiers:
        return make_notifier(override or settings.notifier, stream=stream, env=env, sleep=sleep, now=now)
    from rollbackd.actions.routing import NoticeRouter, Route

    routes = []
    for i, route in enumerate(settings.notifiers):
        try:
            notifier = make_notifier(route.notifier, stream=stream, env=env, sleep=sleep, now=now)
        except ValueError as exc:
            raise ValueError(f"settings.notifiers[{i}]: {exc}") from None
        routes.append(Route(_route_name(settings, i), notifier, route.match))
    return NoticeRouter(routes)


def _route_name(settings: Settings, i: int) -> str:
    kind = settings.notifiers[i].notifier.type
    same = [j for j, r in enumerate(settings.notifiers) if r.notifier.type == kind]
    return kind if len(same) == 1 else f"{kind}#{same.index(i) + 1}"


def notifier_name(settings: Settings) -> str:
    """How metrics name the notifier: its type, or the routes' types joined by ``+``."""
    if not settings.notifiers:
        return settings.notifier.type
    return "+".join(dict.fromkeys(r.notifier.type for r in settings.notifiers))


def slack_spec(settings: Settings) -> NotifierSpec | None:
    """The Slack notifier of ``settings`` (the single notifier or the first Slack route), whose
    token and API address the Slack buttons' endpoint also uses; None without one."""
    specs = [r.notifier for r in settings.notifiers] if settings.notifiers else [settings.notifier]
    return next((s for s in specs if s.type == "slack"), None)


def make_notifier(
    spec: NotifierSpec,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] = os.environ,
    sleep: Callable[[float], object] = time.sleep,
    now: Callable[[], float] | None = None,
) -> Notifier:
    """The notifier ``spec.type`` names; ``ValueError`` lists the known names. ``now`` is the
    wall clock for the notifiers that stamp processing time (Alertmanager's ``endsAt``, the
    webhook's signature)."""
    if spec.type not in NOTIFIER_TYPES:
        raise ValueError(f"unknown notifier type {spec.type!r} (known: {', '.join(NOTIFIER_TYPES)})")
    options = spec.options
    _check_options("notifier", spec.type, options)
    if spec.type == "none":
        return NullNotifier()
    if spec.type == "console":
        return ConsoleNotifier(stream=stream, color=bool(options.get("color", False)))
    if spec.type in ("alertmanager", "pagerduty", "opsgenie", "webhook"):
        if now is None:
            from rollbackd.daemon.clock import WallClock

            now = WallClock().now
        return _pager(spec.type, options, env, sleep, now)

    channel = options.get("channel")
    if not isinstance(channel, str) or not channel:
        raise ValueError("slack notifier: option 'channel' is required")
    token = secret_option("slack notifier", options, "token", env, "SLACK_BOT_TOKEN")
    if token is None:
        raise ValueError("slack notifier: no token (set SLACK_BOT_TOKEN or the variable named by token_env)")
    return SlackNotifier(
        token,
        channel,
        base_url=str(options.get("base_url", "https://slack.com/api/")),
        max_rate_limit_retries=int(options.get("max_rate_limit_retries", 3)),
        timeout=int(options.get("timeout", 10)),
    )


def _headers(kind: str, options: Mapping[str, Any], key: str = "headers") -> dict[str, str]:
    headers = options.get(key) or {}
    if not isinstance(headers, Mapping):
        raise ValueError(f"{kind}: option {key!r} must be a mapping")
    return {str(k): str(v) for k, v in headers.items()}


def _pager(
    name: str, options: Mapping[str, Any], env: Mapping[str, str], sleep: Callable[[float], object],
    now: Callable[[], float],
) -> Notifier:
    kind = f"{name} notifier"
    timeout = float(options.get("timeout", 10.0))
    policy = _retry(kind, options)
    if name == "alertmanager":
        from rollbackd.actions.alertmanager import AlertmanagerNotifier

        token = secret_option(kind, options, "token", env, None)
        return AlertmanagerNotifier(
            _required_str(kind, options, "url"),
            now=now,
            resend_interval=float(options.get("resend_interval", 60.0)),
            labels=_headers(kind, options, "labels"),
            generator_url=options.get("generator_url"),
            headers={"Authorization": f"Bearer {token}"} if token else None,
            timeout=timeout, policy=policy, sleep=sleep,
        )
    if name == "pagerduty":
        from rollbackd.actions.pagerduty import DEFAULT_EVENTS_URL, PagerDutyNotifier

        key = secret_option(kind, options, "routing_key", env, "PAGERDUTY_ROUTING_KEY")
        if key is None:
            raise ValueError(f"{kind}: no routing key (set PAGERDUTY_ROUTING_KEY or the variable named by routing_key_env)")
        return PagerDutyNotifier(
            key, url=str(options.get("url", DEFAULT_EVENTS_URL)), source=str(options.get("source", "rollbackd")),
            client_url=options.get("client_url"), timeout=timeout, policy=policy, sleep=sleep,
        )
    if name == "opsgenie":
        from rollbackd.actions.opsgenie import DEFAULT_API_URL, OpsgenieNotifier

        key = secret_option(kind, options, "api_key", env, "OPSGENIE_API_KEY")
        if key is None:
            raise ValueError(f"{kind}: no API key (set OPSGENIE_API_KEY or the variable named by api_key_env)")
        responders = options.get("responders") or ()
        if not isinstance(responders, (list, tuple)) or not all(isinstance(r, Mapping) for r in responders):
            raise ValueError(f"{kind}: option 'responders' must be a list of mappings ({{type: team, name: ...}})")
        return OpsgenieNotifier(
            key, url=str(options.get("url", DEFAULT_API_URL)),
            responders=tuple({str(k): str(v) for k, v in r.items()} for r in responders),
            tags=_str_list(kind, options, "tags") or (), timeout=timeout, policy=policy, sleep=sleep,
        )
    from rollbackd.actions.noticehook import WebhookNotifier

    secret = secret_option(kind, options, "secret", env, None)
    return WebhookNotifier(
        _required_str(kind, options, "url"), secret.encode("utf-8") if secret is not None else None,
        now=now, headers=_headers(kind, options), timeout=timeout, policy=policy, sleep=sleep,
    )
