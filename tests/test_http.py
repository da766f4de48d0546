"""The daemon's HTTP endpoints on a real loopback port, read the way Prometheus and a
supervisor read them; and the operations files (dashboard, alert rules, compose) parse and
name only metrics that /metrics serves."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rollbackd.actions.base import NullNotifier
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.http import (
    DecisionMeter,
    MetricsCollector,
    OpsServer,
    parse_listen,
    serve_daemon,
)
from rollbackd.daemon.replay import build_pipeline, open_recording, replay
from rollbackd.daemon.run import Checkpoint, Daemon, RunSettings
from rollbackd.daemon.sources import Batch
from rollbackd.events import Rejected
from rollbackd.report import MeasurementTap
from rollbackd.rules.loader import load_config
from rollbackd.scenarios import BUILTIN, write_recording

ROOT = Path(__file__).parent.parent
RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(series: dict, name: str, **labels: str) -> float:
    return series[(name, tuple(sorted(labels.items())))]


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory):
    """sustained_errors replayed through a pipeline whose decision sink is metered."""
    rec = tmp_path_factory.mktemp("http") / "sustained_errors.jsonl.gz"
    write_recording(BUILTIN["sustained_errors"], rec)
    config = load_config(RULES)
    meter = DecisionMeter(MemoryDecisions(), notifier="none")
    pipeline = build_pipeline(config, decisions=meter, notifier=NullNotifier())
    replay(open_recording(str(rec), config), pipeline)
    pipeline.reject([Rejected("invalid_json", "bad", b"{"), Rejected("invalid_json", "bad", b"["),
                     Rejected("missing_field", "no id", b"{}")])
    return config, pipeline, meter


def test_metrics_parse_and_carry_the_listed_series(replayed):
    config, pipeline, meter = replayed
    tap = MeasurementTap(config, profiles=False)
    tap.measure(pipeline.max_event_time, "p99-latency", "demo-scorer", "primary",
                {"value": 42.0, "threshold": 500.0, "sample_size": 1100})
    registry = CollectorRegistry(auto_describe=False)
    clock = FakeClock(pipeline.max_event_time + 95.0)
    registry.register(MetricsCollector(pipeline, meter=meter, tap=tap, clock=clock))
    with OpsServer(registry, pipeline, port=0) as server:
        status, ctype, text = get(server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    s = samples(text)

    summary = pipeline.summary()
    assert value(s, "rollbackd_events_consumed_total", type="prediction") == summary["events"]["predictions"] > 30_000
    assert value(s, "rollbackd_events_consumed_total", type="outcome") == summary["events"]["outcomes"]
    assert value(s, "rollbackd_events_rejected_total", reason="invalid_json") == 2
    assert value(s, "rollbackd_events_rejected_total", reason="missing_field") == 1
    assert value(s, "rollbackd_events_rejected_total", reason="oversize") == 0
    assert value(s, "rollbackd_events_late_total") == summary["events"].get("late", 0)
    # End of a recording: the lateness fell to zero, so the watermark is the last event.
    assert value(s, "rollbackd_watermark_delay_seconds") == pytest.approx(95.0 + pipeline.lateness)
    assert value(s, "rollbackd_label_join_total", result="joined") == summary["join"]["joined"]
    assert 0.0 <= value(s, "rollbackd_label_join_coverage_ratio") <= 1.0
    assert value(s, "rollbackd_labels_pending") == summary["pending_labels"]
    # Alert states: the error alert fires, the others are inactive.
    labels = {"rule": "serving-error-rate", "deployment": "demo-scorer", "variant": "primary"}
    assert value(s, "rollbackd_alert_state", **labels, state="firing") == 1
    assert value(s, "rollbackd_alert_state", **labels, state="pending") == 0
    assert value(s, "rollbackd_alert_state", rule="p99-latency", deployment="demo-scorer",
                 variant="primary", state="inactive") == 1
    assert value(s, "rollbackd_alert_transitions_total", state="firing") == 1
    # Measurements: the tap's evaluations, and the transition's for the rest.
    assert value(s, "rollbackd_measurement_value", **labels) == pytest.approx(0.20862068965517241)
    assert value(s, "rollbackd_measurement_threshold", **labels) == 0.05
    assert value(s, "rollbackd_measurement_value", rule="p99-latency", deployment="demo-scorer", variant="primary") == 42.0
    assert value(s, "rollbackd_measurement_source", source="evaluations") == 1
    # Incidents and actions.
    assert value(s, "rollbackd_incidents_open", deployment="demo-scorer", severity="critical") == 1
    assert value(s, "rollbackd_actions_total", action="rollback", backend="log", status="succeeded") == 1
    # opened, rollback started, rollback succeeded
    assert value(s, "rollbackd_actions_total", action="notify", backend="none", status="skipped") == 3
    assert value(s, "rollbackd_build_info", version=__import__("rollbackd").__version__) == 1


def test_incidents_endpoint_and_unknown_paths(replayed):
    _, pipeline, _ = replayed
    with OpsServer(CollectorRegistry(), pipeline, port=0) as server:
        status, ctype, body = get(server.url + "/incidents")
        assert status == 200 and ctype == "application/json"
        (inc,) = json.loads(body)["incidents"]
        assert inc["id"] == "inc-2cc2bbac8759" and inc["resolved_at"] is None
        assert inc["alerts"][0]["rule"] == "serving-error-rate"
        assert json.loads(get(server.url + "/incidents?open=1")[2])["incidents"][0]["id"] == inc["id"]
        assert get(server.url + "/nope")[0] == 404


class GatedSource:
    """A live-like source: empty batches until stopped; ``seek`` (restore) waits for ``gate``."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.position = None

    def seek(self, position: Any) -> None:
        self.gate.wait(10)
        self.position = position

    def read(self, max_events: int) -> Batch:
        threading.Event().wait(0.01)
        return Batch([], [], self.position)

    def commit(self, position: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def lag(self, timeout: float = 5.0) -> int:
        return 7


def test_readyz_is_not_ready_until_the_state_is_restored(tmp_path):
    config = load_config(RULES)
    pipeline = build_pipeline(config, notifier=NullNotifier())
    checkpoint = tmp_path / "state.ckpt"
    Checkpoint({0: pipeline.snapshot()}, {"p:0": 5}, 0, {}).save(str(checkpoint))
    source = GatedSource()
    daemon = Daemon(pipeline, source, settings=RunSettings(checkpoint_path=str(checkpoint), checkpoint_every=60))
    loop = threading.Thread(target=daemon.run, name="loop", daemon=True)
    server = serve_daemon(daemon, "127.0.0.1", 0, loop_thread=loop, notifier="none")
    try:
        assert get(server.url + "/healthz")[0] == 503  # the loop has not started
        status, _, body = get(server.url + "/readyz")
        assert status == 503 and "restoring" in body
        loop.start()
        # The loop runs, restoring the checkpoint (held at the seek): alive, not ready.
        assert get(server.url + "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        assert get(server.url + "/readyz")[0] == 503
        s = samples(get(server.url + "/metrics")[2])
        assert value(s, "rollbackd_ready") == 0
        source.gate.set()
        assert daemon.ready.wait(10)
        assert get(server.url + "/readyz") == (200, "text/plain; charset=utf-8", "ready\n")
        s = samples(get(server.url + "/metrics")[2])
        assert value(s, "rollbackd_ready") == 1 and value(s, "rollbackd_blind") == 0
        assert value(s, "rollbackd_consumer_lag") == 7
        # Batches are timed: the histogram has counted some.
        deadline = threading.Event()
        while value(s, "rollbackd_batch_processing_seconds_count") == 0 and not deadline.wait(0.05):
            s = samples(get(server.url + "/metrics")[2])
        assert value(s, "rollbackd_batch_processing_seconds_count") > 0
        daemon.stop()
        loop.join(10)
        assert get(server.url + "/healthz")[0] == 503 and get(server.url + "/readyz")[0] == 503
    finally:
        daemon.stop()
        server.stop()
    assert server.errors == []


def test_parse_listen():
    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("x", "host:", "1:99999"):
        with pytest.raises(ValueError):
            parse_listen(bad)


# The operations files ---------------------------------------------------------------------------


def _exported_names(replayed) -> set[str]:
    config, pipeline, meter = replayed
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(pipeline, meter=meter, clock=FakeClock(0.0)))
    from rollbackd.daemon.http import _batch_histogram

    _batch_histogram(registry)
    from prometheus_client import generate_latest

    names = {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    # Only present with a daemon (readiness, blindness, lag, checkpoints):
    return names | {"rollbackd_ready", "rollbackd_blind", "rollbackd_consumer_lag", "rollbackd_checkpoint_age_seconds",
                    "rollbackd_source_failing_seconds", "rollbackd_daemon_events_total", "up"}


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(rollbackd_[a-z_]+|up)\b(?=\s*[{\[)\s]|$)", expr))


def test_the_alert_rules_parse_and_use_served_metrics(replayed):
    doc = yaml.safe_load((ROOT / "ops" / "prometheus-alerts.yaml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"RollbackdDown", "RollbackdBlind", "RollbackdConsumerLag"} <= names
    served = _exported_names(replayed)
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r
        used = _metric_names(r["expr"])
        assert used and used <= served, (r["alert"], used - served)
        assert r["labels"]["severity"] in ("warning", "critical")


def test_the_dashboard_parses_and_queries_served_metrics(replayed):
    dash = json.loads((ROOT / "ops" / "grafana-dashboard.json").read_text())
    assert dash["uid"] == "rollbackd"
    served = _exported_names(replayed)
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    used: set[str] = set()
    for p in panels:
        for t in p["targets"]:
            names = _metric_names(t["expr"])
            assert names, (p["title"], t["expr"])
            used |= names
    assert used <= served, used - served
    for needed in ("rollbackd_events_consumed_total", "rollbackd_events_rejected_total", "rollbackd_consumer_lag",
                   "rollbackd_watermark_delay_seconds", "rollbackd_label_join_coverage_ratio",
                   "rollbackd_measurement_value", "rollbackd_alert_state", "rollbackd_actions_total",
                   "rollbackd_batch_processing_seconds_bucket"):
        assert needed in used, needed


def test_compose_and_dockerfile(replayed):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"] == "apache/kafka:4.1.0"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert {"rollbackd", "mlflow", "prometheus", "grafana", "demo-publisher"} <= set(services)
    assert "run" in services["rollbackd"]["command"] and "--http=0.0.0.0:9464" in services["rollbackd"]["command"]
    publisher = " ".join(services["demo-publisher"]["command"])
    assert "simulate demo" in publisher and "publish" in publisher
    for service in services.values():  # every file a service mounts is in the repository
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (ROOT / volume.split(":")[0]).exists(), volume
    prom = yaml.safe_load(compose["configs"]["prometheus-config"]["content"])
    assert prom["scrape_configs"][0]["job_name"] == "rollbackd"
    for key in ("grafana-datasource", "grafana-dashboards"):
        assert yaml.safe_load(compose["configs"][key]["content"])["apiVersion"] == 1
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", docker, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", docker, re.M), "runs as a non-root user"
    assert re.search(r"^RUN pip install \.", docker, re.M)
    assert re.search(r'^ENTRYPOINT \["rollbackd"\]', docker, re.M)
