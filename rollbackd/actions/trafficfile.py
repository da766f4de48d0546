"""Rollback by rewriting a routing file that an Envoy/NGINX-style router watches.

The file (JSON, or YAML when it ends in ``.yaml``/``.yml`` or ``format: yaml``) holds weights
per version under ``routes``::

    {"routes": {"demo-scorer": {"1": 100, "2": 0}}}

A rollback sends the whole ``total`` weight to the target version and 0 to every other version
of that route; other routes and other top-level keys are kept. The file is replaced
atomically (temp file in the same folder, fsync, ``os.replace``), so a router never reads half
a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

import structlog
import yaml

from rollbackd.actions.base import ActionResult, RollbackPlan

__all__ = ["TrafficFileBackend", "read_routes", "leading_version"]

log = structlog.get_logger("rollbackd.actions.trafficfile")


def leading_version(weights: Mapping[str, Any]) -> str | None:
    """The version with the largest weight, ``None`` if there is none or it is a tie."""
    if not weights:
        return None
    ranked = sorted(((float(w), str(v)) for v, w in weights.items()), reverse=True)
    if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
        return None
    return ranked[0][1]


def read_routes(text: str, fmt: str) -> dict[str, Any]:
    doc = yaml.safe_load(text) if fmt == "yaml" else json.loads(text)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ValueError("routing file must hold a mapping at the top level")
    routes = doc.setdefault("routes", {})
    if not isinstance(routes, dict):
        raise ValueError("`routes` must be a mapping of route name to {version: weight}")
    return doc


class TrafficFileBackend:
    """Points route ``route`` (default: the plan's deployment) of ``path`` at the target version."""

    def __init__(self, path: str | os.PathLike[str], *, route: str | None = None, fmt: str | None = None,
                 total: int = 100) -> None:
        self.path = Path(path)
        if fmt is None:
            fmt = "yaml" if self.path.suffix.lower() in (".yaml", ".yml") else "json"
        if fmt not in ("json", "yaml"):
            raise ValueError(f"format must be one of json, yaml, got {fmt!r}")
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be an integer >= 1, got {total!r}")
        self.route = route
        self.format = fmt
        self.total = total
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        return read_routes(self.path.read_text(encoding="utf-8"), self.format)

    def _dump(self, doc: Mapping[str, Any]) -> str:
        if self.format == "yaml":
            return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False)
        return json.dumps(doc, indent=2) + "\n"

    def _write(self, text: str) -> None:
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.chmod(tmp, self.path.stat().st_mode & 0o7777)
            except FileNotFoundError:
                os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def _weights(self, doc: Mapping[str, Any], deployment: str) -> dict[str, Any] | None:
        weights = doc["routes"].get(self.route or deployment)
        if weights is None:
            return None
        if not isinstance(weights, dict):
            raise ValueError(f"route {self.route or deployment!r} must map version to weight")
        return weights

    def apply(self, plan: RollbackPlan) -> ActionResult:
        route = self.route or plan.deployment
        bound = log.bind(deployment=plan.deployment, variant=plan.variant, incident=plan.incident_id,
                         to_version=plan.to_version, path=str(self.path), route=route)
        with self._lock:
            try:
                doc = self._load()
                weights = self._weights(doc, plan.deployment)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                detail = f"cannot read {self.path}: {exc}"
                bound.error("rollback.traffic_file", outcome="failed", detail=detail)
                return ActionResult("failed", detail)
            if weights is None:
                detail = f"route {route!r} not in {self.path}"
                bound.error("rollback.traffic_file", outcome="failed", detail=detail)
                return ActionResult("failed", detail)
            versions = {str(v): v for v in weights}
            if plan.to_version not in versions:
                # A version the file never routed to has no upstream the router knows of.
                detail = f"version {plan.to_version!r} has no entry in route {route!r} (has: {', '.join(versions)})"
                bound.error("rollback.traffic_file", outcome="failed", detail=detail)
                return ActionResult("failed", detail)
            target = {str(v): (self.total if str(v) == plan.to_version else 0) for v in weights}
            before = {str(v): w for v, w in weights.items()}
            if before == target:
                bound.info("rollback.traffic_file", outcome="skipped")
                return ActionResult("skipped", f"route {route!r} already sends all traffic to {plan.to_version}",
                                    attempts=0, data={"weights": before})
            doc["routes"][route] = {versions[v]: w for v, w in target.items()}
            try:
                self._write(self._dump(doc))
            except OSError as exc:
                detail = f"cannot write {self.path}: {exc}"
                bound.error("rollback.traffic_file", outcome="failed", detail=detail)
                return ActionResult("failed", detail)
        bound.info("rollback.traffic_file", outcome="succeeded")
        return ActionResult("succeeded", f"route {route!r}: all traffic to {plan.to_version}",
                            data={"before": before, "after": target})

    def current(self, deployment: str, variant: str) -> str | None:
        try:
            weights = self._weights(self._load(), deployment)
        except (OSError, ValueError, yaml.YAMLError):
            return None
        return leading_version(weights or {})

    def verify(self, plan: RollbackPlan) -> ActionResult:
        try:
            weights = self._weights(self._load(), plan.deployment) or {}
        except (OSError, ValueError, yaml.YAMLError) as exc:
            return ActionResult("failed", f"cannot read {self.path}: {exc}")
        got = {str(v): w for v, w in weights.items()}
        if got.get(plan.to_version) == self.total and all(w == 0 for v, w in got.items() if v != plan.to_version):
            return ActionResult("succeeded", f"all traffic to {plan.to_version}", data={"weights": got})
        return ActionResult("failed", f"weights are {got}", data={"weights": got})
