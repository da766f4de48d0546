"""A rule's ``detector`` and ``params``: the names known, and the parameters checked by building it."""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Mapping

from yaml.nodes import MappingNode, Node, ScalarNode

from rollbackd.rules.loading.reader import INVALID, STR_TAG, NodeReader, Pairs, kind, sub, suggest

# Used when ``rollbackd.detectors`` cannot be imported or registers nothing, so a broken
# detector module degrades the check to names instead of failing every config.
FALLBACK_DETECTORS = (
    "error_rate", "latency", "model_error", "drift", "traffic",
    "burn_rate", "calibration", "canary", "sequential", "data_quality",
)

# Set by the rule itself; a copy under ``params`` would silently disagree with it.
RULE_OWNED_PARAMS = ("threshold", "min_samples", "reference")

DetectorFactories = Mapping[str, Callable[..., Any] | None]


def known_detectors() -> DetectorFactories:
    """Detector names a rule may use, with their factories (``None`` in the fallback list)."""
    try:
        import rollbackd.detectors  # noqa: F401  (registers the built-in detectors)
        from rollbackd.detectors.base import REGISTRY
    except Exception:  # a half-written detector module must not make every config invalid
        return {name: None for name in FALLBACK_DETECTORS}
    if not REGISTRY:
        return {name: None for name in FALLBACK_DETECTORS}
    return dict(REGISTRY)


class DetectorCheck:
    def __init__(self, read: NodeReader) -> None:
        self.read = read

    def params(self, node: MappingNode, path: str, seen: dict[str, Node]) -> dict[str, Any] | None:
        """Detector parameters pass through as constructed YAML; ``seen`` gets their key nodes."""
        read = self.read
        out: dict[str, Any] = {}
        failed = False
        for key, value, merged in read.flatten(node, path):
            if not (isinstance(key, ScalarNode) and key.tag == STR_TAG):
                read.error(key, path, f"parameter names must be strings, got {kind(key)}")
                failed = True
                continue
            name = key.value
            if name in seen:
                if not merged:
                    first = seen[name].start_mark.line + 1
                    read.error(key, sub(path, name), f"duplicate key (first set on line {first})")
                    failed = True
                continue
            seen[name] = key
            if name in RULE_OWNED_PARAMS:
                read.error(
                    key, sub(path, name), f"{name!r} is set by the rule itself, not in params"
                )
                failed = True
                continue
            constructed = read.construct(value, sub(path, name))
            if constructed is INVALID:
                failed = True
            out[name] = constructed
        return None if failed else out

    def check(
        self,
        factory: Callable[..., Any] | None,
        name: str,
        params: Mapping[str, Any],
        param_keys: Mapping[str, Node],
        pairs: Pairs,
        kw: Mapping[str, Any],
        path: str,
        *,
        construct: bool,
    ) -> None:
        """Catch misspelt or out-of-range detector parameters now, not at the first window."""
        if factory is None:
            return
        params_path = sub(path, "params")
        fallback = pairs["params"] if "params" in pairs else pairs["detector"]
        unknown = self._unknown_params(factory, name, params, param_keys, params_path, fallback[1])
        if not construct:
            return
        # the known ones are still checked: every error in one go
        kwargs = {k: v for k, v in params.items() if k not in unknown}
        if getattr(factory, "needs_reference", False):
            kwargs["reference"] = None  # built later, from the deployment's reference file
        # A constructor stops at the first value it rejects. To report every one in one go,
        # build again without each parameter it named (its default then), until it accepts
        # the rest or names something that is not a parameter of the file's.
        while True:
            try:
                factory(threshold=kw["threshold"], min_samples=kw.get("min_samples", 1), **kwargs)
                return
            except (TypeError, ValueError) as exc:
                from rollbackd.detectors.base import MissingExtra  # importable: factory is not None

                if isinstance(exc, MissingExtra):
                    # No parameter can fix it: the extra must be installed or another detector
                    # chosen. The message already starts with the detector's name.
                    self.read.error(pairs["detector"][1], sub(path, "detector"), str(exc))
                    return
                # Detectors name the offending argument first ("quantile must be in (0, 1)"):
                # point at it when the file has it.
                first = re.match(r"[A-Za-z_]+", str(exc))
                word = first.group(0) if first else ""
                if word in param_keys:
                    where, where_path = param_keys[word], sub(params_path, word)
                elif word in ("threshold", "min_samples") and word in pairs:
                    where, where_path = pairs[word][1], sub(path, word)
                else:
                    where, where_path = fallback[1], sub(path, fallback[0].value)
                self.read.error(where, where_path, f"detector {name} rejects this: {exc}")
                if word not in param_keys or word not in kwargs:
                    return
                del kwargs[word]

    def _unknown_params(
        self,
        factory: Callable[..., Any],
        name: str,
        params: Mapping[str, Any],
        param_keys: Mapping[str, Node],
        params_path: str,
        fallback: Node,
    ) -> list[str]:
        """Report the parameters ``factory`` does not take; none when it takes ``**kwargs``."""
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):
            return []
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return []
        accepted = [
            p
            for p, v in sig.parameters.items()
            if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY) and p not in RULE_OWNED_PARAMS
        ]
        unknown = [p for p in params if p not in sig.parameters]
        for p in unknown:
            self.read.error(
                param_keys.get(p, fallback),
                sub(params_path, p),
                f"detector {name} has no parameter {p!r}{suggest(p, accepted)} "
                f"(it takes: {', '.join(accepted) or 'none'})",
            )
        return unknown
