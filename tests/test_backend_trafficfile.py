"""The traffic-file backend rewrites a real routing file atomically."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from rollbackd.actions import RollbackPlan, make_backend
from rollbackd.actions.base import current_version, verify_plan
from rollbackd.actions.trafficfile import TrafficFileBackend, leading_version
from rollbackd.rules.model import BackendSpec


def plan(to="1", deployment="demo-scorer") -> RollbackPlan:
    return RollbackPlan(deployment, "canary", "2", to, "inc-tf-1", "error rate firing")


@pytest.fixture
def routes(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"listener": 8080, "routes": {"demo-scorer": {"1": 80, "2": 20}, "other": {"7": 100}}}))
    path.chmod(0o640)
    return path


def test_rollback_routes_all_traffic_to_target(routes):
    b = TrafficFileBackend(routes)
    assert b.current("demo-scorer", "canary") == "1"
    assert verify_plan(b, plan()).status == "failed"
    inode = routes.stat().st_ino

    result = b.apply(plan())
    assert result.status == "succeeded", result.detail
    doc = json.loads(routes.read_text())
    assert doc == {"listener": 8080, "routes": {"demo-scorer": {"1": 100, "2": 0}, "other": {"7": 100}}}
    assert routes.stat().st_ino != inode  # replaced, not rewritten in place
    assert oct(routes.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in routes.parent.iterdir()] == ["routes.json"]  # no temp file left
    assert result.data == {"before": {"1": 80, "2": 20}, "after": {"1": 100, "2": 0}}
    assert verify_plan(b, plan()).status == "succeeded"

    again = b.apply(plan())
    assert again.status == "skipped"


def test_rollback_to_canary_version_and_current(routes):
    b = TrafficFileBackend(routes)
    assert b.apply(plan(to="2")).status == "succeeded"
    assert current_version(b, "demo-scorer", "canary") == "2"


def test_yaml_file_with_route_option(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  scorer-v:\n    1: 50\n    2: 50\n")
    b = TrafficFileBackend(path, route="scorer-v", total=1000)
    assert b.current("demo-scorer", "canary") is None  # a tie leads nowhere
    assert b.apply(plan()).status == "succeeded"
    assert yaml.safe_load(path.read_text()) == {"routes": {"scorer-v": {1: 1000, 2: 0}}}
    assert b.current("demo-scorer", "canary") == "1"
    assert b.apply(plan()).status == "skipped"


def test_unknown_route_or_version_fails_without_writing(routes):
    before = routes.read_text()
    b = TrafficFileBackend(routes)
    r = b.apply(plan(to="9"))
    assert r.status == "failed" and "version '9' has no entry" in r.detail
    r = b.apply(plan(deployment="nope"))
    assert r.status == "failed" and "route 'nope' not in" in r.detail
    assert routes.read_text() == before


def test_unreadable_file_fails(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text("{not json")
    r = TrafficFileBackend(path).apply(plan())
    assert r.status == "failed" and "cannot read" in r.detail
    r = TrafficFileBackend(tmp_path / "missing.json").apply(plan())
    assert r.status == "failed"
    assert TrafficFileBackend(tmp_path / "missing.json").current("demo-scorer", "canary") is None


def test_failed_write_leaves_old_file(routes, monkeypatch):
    before = routes.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    r = TrafficFileBackend(routes).apply(plan())
    assert r.status == "failed" and "disk full" in r.detail
    assert routes.read_text() == before
    assert [p.name for p in routes.parent.iterdir()] == ["routes.json"]


def test_leading_version():
    assert leading_version({"1": 10, "2": 90}) == "2"
    assert leading_version({"1": 50, "2": 50}) is None
    assert leading_version({}) is None


def test_factory(routes):
    b = make_backend(BackendSpec(type="traffic-file", options={"path": str(routes), "format": "json"}))
    assert isinstance(b, TrafficFileBackend)
    with pytest.raises(ValueError, match="known: path, route, format, total"):
        make_backend(BackendSpec(type="traffic-file", options={"path": str(routes), "weights": 1}))
    with pytest.raises(ValueError, match="format must be one of"):
        make_backend(BackendSpec(type="traffic-file", options={"path": str(routes), "format": "toml"}))
