"""The daemon's HTTP endpoints on a real loopback port, read the way Prometheus and a
supervisor read them; and the operations files (dashboard, alert rules, compose) parse and
name only metrics that /metrics serves."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
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
    # The reload families, as a daemon that has reloaded both ways serves them:
    from types import SimpleNamespace

    from rollbackd.daemon.http import _reload_metrics

    reloads = SimpleNamespace(counts={"ok": 1, "failed": 1}, last_success=1.0, last_failure=2.0)
    names |= {s.name for family in _reload_metrics(reloads) for s in family.samples}
    # Only present with a daemon (readiness, blindness, lag, checkpoints):
    return names | {"rollbackd_ready", "rollbackd_blind", "rollbackd_consumer_lag", "rollbackd_checkpoint_age_seconds",
                    "rollbackd_source_failing_seconds", "rollbackd_daemon_events_total",
                    "rollbackd_heartbeat_age_seconds", "up"}


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(rollbackd_[a-z_]+|up)\b(?=\s*[{\[)\s]|$)", expr))


def test_the_alert_rules_parse_and_use_served_metrics(replayed):
    doc = yaml.safe_load((ROOT / "ops" / "prometheus-alerts.yaml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"RollbackdDown", "RollbackdAbsent", "RollbackdBlind", "RollbackdConsumerLag"} <= names
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
    assert re.search(r"^RUN pip install --no-deps \.", docker, re.M)  # the pins: tests/test_image.py
    assert re.search(r'^ENTRYPOINT \["tini", "--", "rollbackd"\]', docker, re.M)


# Hardening: malformed requests, slow clients, handler errors -----------------------------------


def raw(server: OpsServer, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``request`` on a fresh socket, keep it open, and read the answer until the server
    closes: a server that waited for a body that never comes would time this out."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


@pytest.fixture
def slack_server(tmp_path):
    from rollbackd.daemon.http import SlackInteractions

    slack = SlackInteractions(b"s3cret", str(tmp_path / "ledger.db"), approvers=lambda d: ("U0ALICE",),
                              responders=lambda d: ("U0ALICE",), waiting=lambda incident: True)
    with OpsServer(CollectorRegistry(), None, port=0, slack=slack) as server:
        yield server
    assert server.errors == []


SLACK = b"POST /v1/slack/interactions HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("headers, status, error", [
    # -1 once made the server read until the client closed, past the 1 MiB cap
    (b"Content-Length: -1\r\n", 400, "bad Content-Length"),
    (b"Content-Length: abc\r\n", 400, "bad Content-Length"),
    (b"Content-Length: +5\r\n", 400, "bad Content-Length"),
    (b"Content-Length: 1e3\r\n", 400, "bad Content-Length"),
    (b"Content-Length: 5, 6\r\n", 400, "bad Content-Length"),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400, "bad Content-Length"),
    (b"Content-Length: 99999999999999999999999\r\n", 400, "bad Content-Length"),
    (b"", 411, "Content-Length required"),
    (b"Transfer-Encoding: chunked\r\n", 411, None),
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400, None),
    (b"Content-Length: 1048577\r\n", 413, "body larger than 1048576 bytes"),
])
def test_a_bad_content_length_is_refused_before_any_body_is_read(slack_server, headers, status, error):
    # The body that follows is never sent in full and the socket stays open: the answer must
    # come anyway, at once.
    answer = raw(slack_server, SLACK + headers + b"\r\npayload=", timeout=5.0)
    assert status_of(answer) == status, answer
    doc = json.loads(body_of(answer))
    assert set(doc) == {"error"} and (error is None or doc["error"] == error)
    assert b"Error" not in answer and b"Traceback" not in answer  # no Python exception names


def test_a_well_formed_request_still_reaches_the_slack_handler(slack_server):
    body = b"payload=%7B%7D"
    answer = raw(slack_server, SLACK + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    # Unsigned: the handler itself refused it, having read the whole body.
    assert status_of(answer) == 401 and json.loads(body_of(answer)) == {"error": "missing signature headers"}


def test_the_gate_post_refuses_a_bad_content_length_and_needs_none(replayed):
    _, pipeline, _ = replayed
    with OpsServer(CollectorRegistry(), pipeline, port=0) as server:
        gate = b"POST /v1/gate/demo-scorer/primary HTTP/1.1\r\nHost: x\r\n"
        assert status_of(raw(server, gate + b"Content-Length: -1\r\n\r\n{")) == 400
        # Flagger's webhook sends a body; a bare POST has none: both are answered.
        assert status_of(raw(server, gate + b"\r\n")) == 412
        assert status_of(raw(server, gate + b"Content-Length: 2\r\n\r\n{}")) == 412
    assert server.errors == []


def test_a_handler_error_is_a_fixed_500_and_a_log_line(replayed):
    import structlog

    from rollbackd.daemon.http import INTERNAL_ERROR

    def broken() -> tuple[bool, str]:
        raise RuntimeError("token xoxb-123 in /etc/rollbackd/secret")

    with structlog.testing.capture_logs() as logs:
        with OpsServer(CollectorRegistry(), None, port=0, alive=broken, ready=broken) as server:
            for path in ("/healthz", "/incidents"):  # /incidents: no pipeline, an AttributeError
                answer = raw(server, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                assert status_of(answer) == 500 and body_of(answer) == INTERNAL_ERROR
                assert b"xoxb" not in answer and b"Error" not in body_of(answer)
                assert b"Python" not in answer  # the Server header names rollbackd alone
    assert [type(e).__name__ for e in server.errors] == ["RuntimeError", "AttributeError"]
    failed = [r for r in logs if r["event"] == "http.request_failed"]
    assert [(r["path"], r["error"], r["log_level"]) for r in failed] == [
        ("/healthz", "RuntimeError", "error"), ("/incidents", "AttributeError", "error")]


def test_idle_connections_neither_block_metrics_nor_stay_open(replayed):
    _, pipeline, _ = replayed
    with OpsServer(CollectorRegistry(), pipeline, port=0, timeout=1.0) as server:
        idle = []
        try:
            for i in range(50):  # connected; half of them sent half a request line
                s = socket.create_connection(server.address, timeout=10)
                if i % 2:
                    s.sendall(b"GET /met")
                idle.append(s)
            began = time.monotonic()
            assert get(server.url + "/metrics")[0] == 200
            assert time.monotonic() - began < 1.0
            # Each is closed by the server after its read timed out (1 s), not held forever.
            for s in idle:
                assert s.recv(1024) == b""
            assert time.monotonic() - began < 5.0
        finally:
            for s in idle:
                s.close()
    assert server.refused == 0 and server.errors == []


def test_a_trickling_client_is_cut_off_at_the_connection_deadline(replayed):
    _, pipeline, _ = replayed
    with OpsServer(CollectorRegistry(), pipeline, port=0, timeout=1.0, deadline=1.5) as server:
        with socket.create_connection(server.address, timeout=10) as s:
            began = time.monotonic()
            closed = None
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:  # a byte every 0.2 s < timeout
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    closed = time.monotonic() - began
                    break
                s.settimeout(0.2)
                try:
                    if s.recv(1024) == b"":
                        closed = time.monotonic() - began
                        break
                except TimeoutError:
                    pass
            assert closed is not None and 1.5 <= closed < 3.0


def test_connections_past_the_bound_are_answered_503_at_once(replayed):
    _, pipeline, _ = replayed
    with OpsServer(CollectorRegistry(), pipeline, port=0, max_connections=5) as server:
        idle = [socket.create_connection(server.address, timeout=10) for _ in range(5)]
        try:
            answer = raw(server, b"")  # accepted after the five (the listen queue is in order)
            assert status_of(answer) == 503
            assert json.loads(body_of(answer)) == {"error": "too many connections"}
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 5  # the idle ones' threads end as their clients close
        while get(server.url + "/metrics")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(server.url + "/metrics")[0] == 200
    assert server.refused >= 1 and server.errors == []


# Liveness, process metrics, failure series at 0 -----------------------------------------------


class StepClock:
    """A clock that moves only when told to (shared by the daemon and /healthz)."""

    def __init__(self, t: float) -> None:
        self.t = t
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds


class HangingSource:
    """Empty batches until ``hang`` is set; then the next read blocks until ``release``."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.hung = threading.Event()
        self.release = threading.Event()
        self.reads = 0

    def read(self, max_events: int) -> Batch:
        if self.hang.is_set() and not self.release.is_set():
            self.hung.set()
            self.release.wait(10)
        self.reads += 1
        threading.Event().wait(0.005)
        return Batch([], [], None)

    def commit(self, position: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _wait_for(predicate: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _started(daemon: Daemon, **kw: Any) -> tuple[threading.Thread, OpsServer]:
    loop = threading.Thread(target=daemon.run, name="loop", daemon=True)
    server = serve_daemon(daemon, "127.0.0.1", 0, loop_thread=loop, notifier="none", **kw)
    loop.start()
    assert daemon.ready.wait(10)
    return loop, server


def test_healthz_fails_once_the_loop_stops_beating(tmp_path):
    clock = StepClock(1_000_000.0)
    source = HangingSource()
    pipeline = build_pipeline(load_config(RULES), notifier=NullNotifier())
    daemon = Daemon(pipeline, source, clock=clock,
                    settings=RunSettings(checkpoint_path=str(tmp_path / "ckpt"), checkpoint_every=3600))
    loop, server = _started(daemon, heartbeat_timeout=30.0)
    try:
        assert get(server.url + "/healthz")[0] == 200
        # A running loop beats at every read, however far the clock moves.
        clock.advance(300)
        reads = source.reads
        _wait_for(lambda: source.reads > reads + 1)
        assert get(server.url + "/healthz")[:3:2] == (200, "ok\n")
        # The loop hangs inside a read: alive until the heartbeat is 30 s old, then not.
        source.hang.set()
        assert source.hung.wait(10)
        clock.advance(30)
        assert get(server.url + "/healthz")[0] == 200
        assert value(samples(get(server.url + "/metrics")[2]), "rollbackd_heartbeat_age_seconds") == 30
        clock.advance(1)
        status, _, why = get(server.url + "/healthz")
        assert (status, why) == (503, "processing loop stalled: no heartbeat for 31s (limit 30s)\n")
        assert loop.is_alive() and get(server.url + "/readyz")[0] == 200  # ready, but not alive
        # Unstuck, it beats again.
        source.release.set()
        reads = source.reads
        _wait_for(lambda: source.reads > reads + 1)
        assert get(server.url + "/healthz")[0] == 200
    finally:
        source.release.set()
        daemon.stop()
        loop.join(10)
        server.stop()
    assert server.errors == []


class FailingSource(HangingSource):
    def read(self, max_events: int) -> Batch:
        from rollbackd.errors import Recoverable

        self.reads += 1
        raise Recoverable("broker down")


def test_a_loop_in_backoff_still_beats(tmp_path):
    """During an outage the loop waits between reads (backoff, at most backoff_max = 10 s):
    each wait is shorter than the heartbeat limit, so /healthz stays 200 for minutes of it."""
    clock = StepClock(1_000_000.0)
    waited: list[float] = []
    ages: list[float] = []
    daemon: Daemon

    def wait(seconds: float) -> bool:  # the backoff, in clock time; the loop's beat is checked at its end
        waited.append(seconds)
        clock.advance(seconds)
        ages.append(clock.now() - daemon.last_beat)
        threading.Event().wait(0.002)
        return daemon.stopping

    source = FailingSource()
    pipeline = build_pipeline(load_config(RULES), notifier=NullNotifier())
    daemon = Daemon(pipeline, source, clock=clock, wait=wait,
                    settings=RunSettings(checkpoint_path=str(tmp_path / "ckpt"), checkpoint_every=3600))
    loop, server = _started(daemon, heartbeat_timeout=30.0)
    try:
        _wait_for(lambda: clock.now() > 1_000_000.0 + 300)
        assert get(server.url + "/healthz")[0] == 200
        # the backoff is waited out a second at a time (the blind check runs between)
        assert max(waited) <= 10.0 and max(ages) <= 10.0 + 1e-9
        assert daemon.blind_notified  # blind, and rightly so: but alive
    finally:
        daemon.stop()
        loop.join(10)
        server.stop()


def test_process_metrics_and_failure_series_exist_from_the_start(tmp_path):
    text = RULES.read_text().replace(
        "deployments:\n",
        "deployments:\n  fraud:\n    backend: {type: webhook, url: 'http://127.0.0.1:1/rollback'}\n", 1)
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    pipeline = build_pipeline(load_config(rules), notifier=NullNotifier())
    daemon = Daemon(pipeline, HangingSource(), settings=RunSettings(checkpoint_path=str(tmp_path / "ckpt")))
    loop, server = _started(daemon)
    try:
        s = samples(get(server.url + "/metrics")[2])
    finally:
        daemon.stop()
        loop.join(10)
        server.stop()
    assert value(s, "process_cpu_seconds_total") > 0
    assert value(s, "process_resident_memory_bytes") > 10e6
    assert value(s, "process_open_fds") > 0
    # Nothing happened yet, and every series an alert takes increase() of is there, at 0.
    for backend in ("log", "webhook"):
        for action in ("rollback", "pause"):
            for status in ("failed", "succeeded", "skipped", "dry_run"):
                assert value(s, "rollbackd_actions_total", action=action, backend=backend, status=status) == 0
    for status in ("failed", "succeeded", "skipped", "dry_run"):
        assert value(s, "rollbackd_actions_total", action="notify", backend="none", status=status) == 0
    assert len([k for k in s if k[0] == "rollbackd_actions_total"]) == 2 * 2 * 4 + 4
    from rollbackd.events import REJECT_REASONS

    for reason in REJECT_REASONS:
        assert value(s, "rollbackd_events_rejected_total", reason=reason) == 0
    for state in ("inactive", "pending", "firing"):
        assert value(s, "rollbackd_alert_transitions_total", state=state) == 0
    for kind in ("prediction", "outcome", "deploy"):
        assert value(s, "rollbackd_events_consumed_total", type=kind) == 0
    assert value(s, "rollbackd_events_late_total") == 0
    assert value(s, "rollbackd_label_join_total", result="expired_outcomes") == 0
