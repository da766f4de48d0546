"""A deployment's ``backend:``: its ``type`` and the options that type takes."""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Callable, Mapping

from yaml.nodes import MappingNode, Node, SequenceNode

from rollbackd.rules.loading.extras import missing_extra
from rollbackd.rules.loading.reader import INVALID, Check, NodeReader, kind, sub
from rollbackd.rules.model import BackendSpec

KUBERNETES_KINDS = ("deployment", "argo-rollout", "kserve")
COMMAND_PLACEHOLDERS = ("deployment", "variant", "to_version", "from_version", "incident")

# Where a header's or a command's environment value may come from instead of the file itself.
SECRET_SOURCES = ("file", "env")
_SECRET_NAME = re.compile(r"auth|token|secret|passw|api.?key|private|cookie|credential", re.IGNORECASE)

_REQUIRED = {
    "webhook": ("url",),
    "mlflow": ("tracking_uri",),
    "kubernetes": ("kind",),
    "command": ("argv",),
    "traffic-file": ("path",),
}


class BackendReader:
    def __init__(self, read: NodeReader) -> None:
        self.read = read

    def schema(self) -> dict[str, dict[str, Check]]:
        """Each backend type's options and their checks, in ``rules.model.BACKEND_TYPES`` order.

        The option names are those ``actions.factory.make_backend`` reads.
        """
        read = self.read
        return {
            "log": {},
            "webhook": {
                "url": read.url,
                "secret_env": read.string,
                "timeout": read.positive_duration,
                "headers": self.headers,
                "retry": self.retry,
                "max_attempts": read.count,
            },
            "mlflow": {
                "tracking_uri": read.url,
                "alias": read.string,
                "model": read.string,
                "token_env": read.string,
                "timeout": read.positive_duration,
                "retry": self.retry,
            },
            "kubernetes": {
                "kind": lambda n, p: read.string(n, p, choices=KUBERNETES_KINDS),
                **{k: read.string for k in ("name", "namespace", "container", "label", "env_var")},
                "image_template": self.version_template,
                "storage_uri_template": self.version_template,
                "api_url": read.url,
                "token_env": read.string,
                "kubeconfig": read.string,
                "context": read.string,
                "in_cluster": read.boolean,
                "verify_tls": read.boolean,
                "ca_file": read.string,
                "timeout": read.positive_duration,
                "retry": self.retry,
            },
            "command": {
                "argv": self.argv,
                "current_argv": self.argv,
                "timeout": read.positive_duration,
                "env": self.string_mapping,
                "env_from": lambda n, p: read.strings(n, p, non_empty=False),
                "cwd": read.string,
                "max_output": read.count,
            },
            "traffic-file": {
                "path": read.string,
                "route": read.string,
                "format": lambda n, p: read.string(n, p, choices=("json", "yaml")),
                "total": read.count,
            },
        }

    def backend(self, node: Node, path: str) -> BackendSpec | None:
        typed = self.read.typed_options(node, path, self.schema(), "log", _REQUIRED)
        if typed is None:
            return None
        backend_type, options = typed
        if backend_type == "kubernetes" and not self.kubernetes_options(node, path, options):
            return None
        missing = missing_extra("backend", backend_type)
        if missing is not None:
            self.read.error(node, sub(path, "type"), missing)
            return None
        if "max_attempts" in options:
            # ``max_attempts: N`` is shorthand for ``retry: {max_attempts: N}``.
            retry = dict(options.get("retry", {}))
            if "max_attempts" in retry:
                self.read.error(
                    node,
                    sub(path, "max_attempts"),
                    "set max_attempts here or under retry, not both",
                )
                return None
            retry["max_attempts"] = options.pop("max_attempts")
            options["retry"] = MappingProxyType(retry)
        return BackendSpec(type=backend_type, options=MappingProxyType(options))

    def kubernetes_options(self, node: Node, path: str, options: Mapping[str, Any]) -> bool:
        # The same cross-option rules ``actions.kubernetes.KubernetesBackend`` enforces.
        k8s_kind = options.get("kind")
        per_deployment = [k for k in ("image_template", "label", "env_var", "container") if k in options]
        problems = []
        if k8s_kind == "deployment" and not set(per_deployment) - {"container"}:
            problems.append("kind deployment needs at least one of image_template, label, env_var")
        if k8s_kind != "deployment" and per_deployment:
            problems.append(f"{', '.join(per_deployment)}: only for kind deployment")
        if k8s_kind != "kserve" and "storage_uri_template" in options:
            problems.append("storage_uri_template: only for kind kserve")
        for problem in problems:
            self.read.error(node, path, problem)
        return not problems

    def version_template(self, node: Node, path: str) -> Any:
        value = self.read.string(node, path)
        if value is not INVALID and value.count("{version}") != 1:
            return self.read.error(node, path, f"must contain {{version}} exactly once, got {value!r}")
        return value

    def argv(self, node: Node, path: str) -> Any:
        # Not ``strings``: an argv may repeat an element (``--set a=1 --set b=2``).
        read = self.read
        if not isinstance(node, SequenceNode) or not node.value:
            return read.error(
                node, path, f"expected a non-empty list of strings (an argv; no shell is used), got {kind(node)}"
            )
        out = tuple(read.string(item, f"{path}[{i}]") for i, item in enumerate(node.value))
        if INVALID in out:
            return INVALID
        for i, element in enumerate(out):
            for name in re.findall(r"\{([A-Za-z_][A-Za-z0-9_.\[\]]*)\}", element):
                if name not in COMMAND_PLACEHOLDERS:
                    read.error(
                        node.value[i],
                        f"{path}[{i}]",
                        f"{{{name}}} is not a placeholder (known: "
                        f"{', '.join('{' + p + '}' for p in COMMAND_PLACEHOLDERS)})",
                    )
                    return INVALID
        return out

    def string_mapping(self, node: Node, path: str, what: str = "name to string",
                       fold: Callable[[str], str] = str) -> Any:
        """A mapping of names to values; a name given twice (after ``fold``) is an error, not
        a silent override: the second value of a secret header would otherwise win unseen.

        A value is a string, or where the secret is: ``{file: PATH}`` (read at start, e.g. a
        mounted Kubernetes Secret) or ``{env: NAME}``. A literal value under a name that looks
        secret is allowed, with a warning: it sits in the rules file in plain text."""
        read = self.read
        if not isinstance(node, MappingNode):
            return read.error(node, path, f"expected a mapping of {what}, got {kind(node)}")
        out: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key, value, merged in read.flatten(node, path):
            name = read.string(key, path)
            where = sub(path, name) if isinstance(name, str) else path
            text = self.secret_value(value, where)
            if name is INVALID or text is INVALID:
                return INVALID
            if isinstance(text, str) and _SECRET_NAME.search(name):
                read.warn(value, where, f"{name!r} looks like a secret written in the rules file: "
                          "give {file: PATH} or {env: NAME} instead")
            if fold(name) in lines:
                if merged:  # an explicit key overrides a merged one (YAML merge semantics)
                    continue
                return read.error(key, sub(path, name), f"duplicate key (first set on line {lines[fold(name)]})")
            lines[fold(name)] = key.start_mark.line + 1
            out[name] = text
        return MappingProxyType(out)

    def secret_value(self, node: Node, path: str) -> Any:
        """A string, or ``{file: PATH}`` / ``{env: NAME}`` (one of them)."""
        read = self.read
        if not isinstance(node, MappingNode):
            return read.string(node, path)
        pairs = read.mapping(node, path, SECRET_SOURCES)
        if pairs is None:
            return INVALID
        if len(pairs) != 1:
            return read.error(node, path, "expected a string, {file: PATH} or {env: NAME} (exactly one)")
        (source, (_, value_node)), = pairs.items()
        where = read.string(value_node, sub(path, source))
        return INVALID if where is INVALID else MappingProxyType({source: where})

    def headers(self, node: Node, path: str) -> Any:
        # HTTP header names are case-insensitive: X-Token and x-token are one header.
        return self.string_mapping(node, path, "header to value", fold=str.lower)

    def retry(self, node: Node, path: str) -> Any:
        read = self.read
        pairs = read.mapping(node, path, ("max_attempts", "base_delay", "max_delay", "multiplier"))
        if pairs is None:
            return INVALID
        kw: dict[str, Any] = {}
        checks = (
            read.optional(pairs, path, kw, "max_attempts", read.count),
            read.optional(pairs, path, kw, "base_delay", read.duration),
            read.optional(pairs, path, kw, "max_delay", read.duration),
            read.optional(pairs, path, kw, "multiplier", lambda n, p: read.number(n, p, ge=1)),
        )
        if INVALID in checks:
            return INVALID
        if "max_delay" in kw and kw["max_delay"] < kw.get("base_delay", 0.5):
            return read.error(
                pairs["max_delay"][1], sub(path, "max_delay"), "must be >= base_delay"
            )
        return MappingProxyType(kw)
