"""The daemon's operations endpoints: ``/metrics``, ``/healthz``, ``/readyz``, ``/incidents``.

A stdlib ``ThreadingHTTPServer`` on its own thread (default ``127.0.0.1:9464``). Nothing here
touches the hot path: :class:`MetricsCollector` reads the pipeline and the daemon when
Prometheus scrapes, so a scrape costs the loop nothing and the loop never waits for a scrape.
The few things the pipeline does not keep are gathered at the edges, outside the per-event
loop: :class:`DecisionMeter` wraps the decision sink to count actions by backend and
outcome; :func:`instrument` times each batch; a ``report.MeasurementTap`` (when the
pipeline calls it) gives every measurement, else the measurements of alert transitions are
shown.

Clients are bounded (a socket timeout, a deadline per connection, a cap on connections at once,
request bodies checked before they are read) and never see an exception: a handler error is a
fixed 500 and a log line. ``/healthz`` follows the loop's heartbeat, so a hung loop is not alive.

Reads from the HTTP thread take copies in single C-level calls (``dict(d)``, ``list(d)``), which
the GIL makes atomic; the one Python-level walk (incident records) retries if the loop
changed it meanwhile.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, get_args
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from rollbackd import __version__
from rollbackd.actions.base import Status
from rollbackd.daemon.clock import Clock, WallClock
from rollbackd.daemon.gate import Gate, encode as encode_answer, gate_verdict
from rollbackd.daemon.slack_actions import SlackInteractions  # served at /v1/slack/interactions

if TYPE_CHECKING:
    from rollbackd.daemon.reload import RulesReload

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DecisionMeter",
    "INTERNAL_ERROR",
    "SlackInteractions",
    "expected_actions",
    "gate_verdict",
    "MetricsCollector",
    "OpsServer",
    "instrument",
    "parse_listen",
    "serve_daemon",
]

log = structlog.get_logger("rollbackd.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
ALERT_STATES = ("inactive", "pending", "firing")
MAX_BODY = 1 << 20  # the largest request body read (Slack's interaction payloads are a few KiB)


def parse_listen(value: str) -> tuple[str, int]:
    """``"9464"``, ``":9464"``, ``"0.0.0.0:9464"``, ``"[::1]:9464"`` → (host, port)."""
    text = value.strip()
    host, port = DEFAULT_HOST, text
    if text.startswith("["):
        end = text.find("]")
        host, port = text[1:end], text[end + 2:]
    elif ":" in text:
        host, port = text.rsplit(":", 1)
        host = host or DEFAULT_HOST
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{value!r}: expected [HOST:]PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{value!r}: port must be in [0, 65535]")
    return host, number


class DecisionMeter:
    """A decision sink that counts what passes through and hands it on unchanged.

    Counts finished actions by (action, backend, status) (a notice's backend is the
    notifier's name) and alert transitions by state, and keeps each alert's measurement at
    its latest transition (the fallback for measurement gauges without a tap).
    """

    def __init__(self, inner: Any, *, notifier: str = "notifier") -> None:
        self.inner = inner
        self.notifier = notifier
        self.actions: dict[tuple[str, str, str], int] = {}
        self.transitions: dict[str, int] = {}
        self.measurements: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    def write(self, rec: dict[str, Any]) -> None:
        self.inner.write(rec)
        kind = rec.get("kind")
        if kind == "action":
            action = str(rec.get("action"))
            backend = str(rec.get("backend") or (self.notifier if action == "notify" else "unknown"))
            key = (action, backend, str(rec.get("status")))
            self.actions[key] = self.actions.get(key, 0) + 1
        elif kind == "alert":
            state = str(rec.get("state"))
            self.transitions[state] = self.transitions.get(state, 0) + 1
            m = rec.get("measurement")
            if isinstance(m, Mapping):
                self.measurements[(rec["rule"], rec["deployment"], rec["variant"])] = (rec["ts"], dict(m))

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # offset(), truncate(), ... of the wrapped sink
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def expected_actions(config: Any, notifier: str) -> list[tuple[str, str, str]]:
    """The (action, backend, status) series of ``rollbackd_actions_total`` that exist from the
    start, at 0: an alert on ``increase()`` of a failure needs the series before the failure.
    Rollbacks and pauses go through the configured deployments' backends (and ``log``, the
    backend of a deployment seen only in the stream); notices through ``notifier``."""
    backends = sorted({"log"} | {d.backend.type for d in config.deployments.values()})
    statuses = get_args(Status)
    return ([(action, backend, status) for action in ("rollback", "pause") for backend in backends
             for status in statuses]
            + [("notify", notifier, status) for status in statuses])


def _batch_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "rollbackd_batch_processing_seconds",
        "Wall time to process one batch: ingest, windows, detectors, rules, actions.",
        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        registry=registry,
    )


def instrument(daemon: Any, histogram: Histogram) -> None:
    """Time each ``daemon.step(batch)`` into ``histogram`` (wraps the bound method once)."""
    if getattr(daemon.step, "_rollbackd_timed", False):
        return
    step = daemon.step

    def timed(batch: Any) -> None:
        began = time.perf_counter()  # a duration, not a time of day: never decides anything
        try:
            step(batch)
        finally:
            histogram.observe(time.perf_counter() - began)

    timed._rollbackd_timed = True  # type: ignore[attr-defined]
    daemon.step = timed


class EffectsView(Protocol):
    """The live daemon's effect lanes, as /metrics reads them."""

    dropped: int

    def waiting(self) -> int: ...


class LiveDaemon(Protocol):
    """What /metrics reads of the live daemon (daemon/run.py's ``Daemon``), on the HTTP thread:
    plain values the loop writes, never a call that waits on the loop or a broker."""

    clock: Clock
    ready: threading.Event
    events: int
    last_beat: float
    checkpoint_seconds: float | None
    checkpoint_bytes: int | None
    reloads: RulesReload | None
    effects: EffectsView

    @property
    def blind_notified(self) -> bool: ...

    @property
    def blind_since(self) -> float | None: ...

    @property
    def lag(self) -> int | None: ...

    @property
    def last_checkpoint(self) -> float: ...


class MetricsCollector:
    """A Prometheus collector that reads a pipeline (and its daemon, when live) on scrape."""

    def __init__(
        self,
        pipeline: Any,
        *,
        daemon: LiveDaemon | None = None,
        tap: Any = None,
        meter: DecisionMeter | None = None,
        clock: Clock | None = None,
        lag_every: float = 15.0,
    ) -> None:
        self.pipeline = pipeline
        self.daemon = daemon
        self.tap = tap
        self.meter = meter
        self.clock = clock or (daemon.clock if daemon is not None else None) or WallClock()
        self.lag_every = lag_every
        self._lag: tuple[float, float | None] | None = None  # (asked at, value)
        self.scrape_errors = 0

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: the pipeline may not be ready yet

    def collect(self) -> Iterator[Metric]:
        yield from self._info()
        yield from self._events()
        yield from self._time()
        yield from self._join()
        yield from self._alerts()
        yield from self._measurements()
        yield from self._incidents()
        yield from self._actions()
        yield from self._daemon()
        yield from self._heartbeat()
        errors = CounterMetricFamily("rollbackd_scrape_errors", "Scrapes that could not read part of the state.")
        errors.add_metric([], self.scrape_errors)
        yield errors

    # ---------------------------------------------------------------------------------------
    def _info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("rollbackd_build_info", "rollbackd version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _events(self) -> Iterator[Metric]:
        counters = dict(self.pipeline.counters)
        consumed = CounterMetricFamily(
            "rollbackd_events_consumed", "Events read and decoded, by type.", labels=["type"]
        )
        for name in ("predictions", "outcomes", "deploys"):
            consumed.add_metric([name.rstrip("s")], counters.get(name, 0))
        yield consumed
        late = CounterMetricFamily(
            "rollbackd_events_late", "Events older than the watermark when they arrived: counted, dropped."
        )
        late.add_metric([], counters.get("late", 0))
        yield late
        rejected = CounterMetricFamily(
            "rollbackd_events_rejected", "Inputs that broke the event contract, by reason (dead-lettered).",
            labels=["reason"],
        )
        from rollbackd.daemon.admission import ADMISSION_REASONS
        from rollbackd.events import REJECT_REASONS

        rejects = dict(self.pipeline.rejects)
        for reason in sorted(set(REJECT_REASONS) | set(ADMISSION_REASONS) | set(rejects)):
            rejected.add_metric([reason], rejects.get(reason, 0))
        yield rejected

    def _time(self) -> Iterator[Metric]:
        max_ts = self.pipeline.max_event_time
        if not math.isfinite(max_ts):
            return
        watermark = self.pipeline.watermark  # per deployment: the slowest active one's
        g = GaugeMetricFamily("rollbackd_event_time_seconds", "Newest event time seen (Unix seconds).")
        g.add_metric([], max_ts)
        yield g
        w = GaugeMetricFamily("rollbackd_watermark_seconds", "The watermark: newest event time minus lateness.")
        w.add_metric([], watermark)
        yield w
        d = GaugeMetricFamily(
            "rollbackd_watermark_delay_seconds",
            "Wall clock minus the watermark: how far behind real time decisions are.",
        )
        d.add_metric([], self.clock.now() - watermark)
        yield d

    def _join(self) -> Iterator[Metric]:
        stats = self.pipeline.joiner.stats.to_record()
        c = CounterMetricFamily(
            "rollbackd_label_join", "Outcome/prediction join results, by result.", labels=["result"]
        )
        for name, value in sorted(stats.items()):
            c.add_metric([name], value)
        yield c
        matched = stats.get("joined", 0)
        seen = matched + stats.get("unmatched_outcomes", 0) + stats.get("expired_outcomes", 0)
        cov = GaugeMetricFamily(
            "rollbackd_label_join_coverage_ratio",
            "Share of outcomes (of label-watched deployments) joined to their prediction.",
        )
        cov.add_metric([], matched / seen if seen else math.nan)
        yield cov
        pending = GaugeMetricFamily("rollbackd_labels_pending", "Predictions buffered, awaiting their outcome.")
        pending.add_metric([], len(self.pipeline.joiner))
        yield pending
        evicted = CounterMetricFamily(
            "rollbackd_label_buffer_evicted", "Predictions evicted from the full label buffer "
            "(settings.max_pending_labels) while their outcome could still come, by deployment.",
            labels=["deployment"])
        for deployment, n in sorted(self.pipeline.joiner.stats.evictions().items()):
            evicted.add_metric([deployment], n)
        yield evicted

    def _alerts(self) -> Iterator[Metric]:
        alerts = dict(self.pipeline.alerts)
        g = GaugeMetricFamily(
            "rollbackd_alert_state", "1 for the state each alert is in (inactive, pending, firing).",
            labels=["rule", "deployment", "variant", "state"],
        )
        for (rule, (dep, var)), a in sorted(alerts.items()):
            state = str(a.state)
            for s in ALERT_STATES:
                g.add_metric([rule, dep, var, s], 1.0 if s == state else 0.0)
        yield g
        if self.meter is not None:
            t = CounterMetricFamily("rollbackd_alert_transitions", "Alert transitions, by new state.", labels=["state"])
            transitions = {**dict.fromkeys(ALERT_STATES, 0), **dict(self.meter.transitions)}
            for state, n in sorted(transitions.items()):
                t.add_metric([state], n)
            yield t

    def _measurements(self) -> Iterator[Metric]:
        latest: dict[tuple[str, str, str], tuple[float, Mapping[str, Any]]] = {}
        source = "none"
        if self.meter is not None:
            latest.update(dict(self.meter.measurements))
            source = "transitions"
        if self.tap is not None and getattr(self.tap, "evaluations", 0):
            latest.update(self.tap.latest())
            source = "evaluations"
        labels = ["rule", "deployment", "variant"]
        families = {
            "value": GaugeMetricFamily("rollbackd_measurement_value", "Latest measurement of each rule, by deployment and variant.", labels=labels),
            "threshold": GaugeMetricFamily("rollbackd_measurement_threshold", "The rule's threshold.", labels=labels),
            "sample_size": GaugeMetricFamily("rollbackd_measurement_sample_size", "Samples behind the latest measurement.", labels=labels),
            "p_value": GaugeMetricFamily("rollbackd_measurement_p_value", "p-value of the latest measurement, if the detector gives one.", labels=labels),
            "ts": GaugeMetricFamily("rollbackd_measurement_timestamp_seconds", "Event time of the latest measurement.", labels=labels),
        }
        for key, (ts, m) in sorted(latest.items()):
            lv = list(key)
            value = m.get("value")
            families["value"].add_metric(lv, math.nan if value is None else float(value))
            if m.get("threshold") is not None:
                families["threshold"].add_metric(lv, float(m["threshold"]))
            families["sample_size"].add_metric(lv, float(m.get("sample_size") or 0))
            if m.get("p_value") is not None:
                families["p_value"].add_metric(lv, float(m["p_value"]))
            families["ts"].add_metric(lv, float(ts))
        yield from families.values()
        src = GaugeMetricFamily(
            "rollbackd_measurement_source",
            "1 for where measurement gauges come from: every evaluation (tap) or alert transitions only.",
            labels=["source"],
        )
        src.add_metric([source], 1)
        yield src

    def _incidents(self) -> Iterator[Metric]:
        book = self.pipeline.book
        open_ = list(dict(book.open).values())
        g = GaugeMetricFamily("rollbackd_incidents_open", "Open incidents, by deployment and severity.",
                              labels=["deployment", "severity"])
        counts: dict[tuple[str, str], int] = {}
        for inc in open_:
            try:
                sev = inc.severity
            except (RuntimeError, ValueError):  # changed under us: counted next scrape
                continue
            counts[(inc.deployment, sev)] = counts.get((inc.deployment, sev), 0) + 1
        for (dep, sev), n in sorted(counts.items()):
            g.add_metric([dep, sev], n)
        yield g
        total = CounterMetricFamily("rollbackd_incidents_opened", "Incidents opened since the state began.")
        total.add_metric([], len(open_) + len(list(book.closed)))
        yield total

    def _actions(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "rollbackd_actions", "Finished actions, by action (rollback, notify), backend and outcome.",
            labels=["action", "backend", "status"],
        )
        if self.meter is not None:
            counts = dict.fromkeys(expected_actions(self.pipeline.config, self.meter.notifier), 0)
            counts.update(dict(self.meter.actions))
            for (action, backend, status), n in sorted(counts.items()):
                c.add_metric([action, backend, status], n)
        yield c

    def _heartbeat(self) -> Iterator[Metric]:
        if self.daemon is None:
            return
        beat = self.daemon.last_beat
        g = GaugeMetricFamily("rollbackd_heartbeat_age_seconds",
                              "Wall seconds since the processing loop last went round (/healthz fails past a limit).")
        g.add_metric([], max(0.0, self.clock.now() - beat))
        yield g

    def _daemon(self) -> Iterator[Metric]:
        d = self.daemon
        if d is None:
            return
        now = self.clock.now()
        ready = GaugeMetricFamily("rollbackd_ready", "1 once the checkpoint is restored and the loop runs.")
        ready.add_metric([], 1.0 if d.ready.is_set() else 0.0)
        yield ready
        blind = GaugeMetricFamily(
            "rollbackd_blind", "1 while rollbackd cannot read its events (the [BLIND] notice is out)."
        )
        blind.add_metric([], 1.0 if d.blind_notified else 0.0)
        yield blind
        failing = GaugeMetricFamily("rollbackd_source_failing_seconds", "How long reads have been failing (0: they work).")
        failing.add_metric([], now - d.blind_since if d.blind_since is not None else 0.0)
        yield failing
        processed = CounterMetricFamily("rollbackd_daemon_events", "Events handed to the pipeline by this process.")
        processed.add_metric([], d.events)
        yield processed
        effects = d.effects  # the lanes exist from the start
        waiting = GaugeMetricFamily(
            "rollbackd_effects_waiting",
            "Calls (rollbacks, pauses, notices) queued or running off the processing loop.")
        waiting.add_metric([], effects.waiting())
        yield waiting
        dropped = CounterMetricFamily(
            "rollbackd_effects_dropped",
            "Notices dropped (recorded as failed) because their deployment's lane was full.")
        dropped.add_metric([], effects.dropped)
        yield dropped
        last_cp = d.last_checkpoint  # the start counts as the first checkpoint
        age = GaugeMetricFamily("rollbackd_checkpoint_age_seconds", "Wall seconds since the last checkpoint.")
        age.add_metric([], now - last_cp)
        yield age
        if d.checkpoint_seconds is not None:
            took = GaugeMetricFamily(
                "rollbackd_checkpoint_duration_seconds",
                "How long the last checkpoint held up processing (freezing the state; with a state "
                "store, encoding it and the transaction).")
            took.add_metric([], d.checkpoint_seconds)
            yield took
        if d.checkpoint_bytes is not None:
            size = GaugeMetricFamily("rollbackd_checkpoint_bytes",
                                     "Bytes the last durable checkpoint wrote (the file and new references; "
                                     "with a state store, the task snapshots).")
            size.add_metric([], d.checkpoint_bytes)
            yield size
        yield from _reload_metrics(d.reloads)
        lag = self._consumer_lag(now)
        if lag is not None:
            g = GaugeMetricFamily("rollbackd_consumer_lag", "Messages in the assigned partitions not yet read.")
            g.add_metric([], lag)
            yield g

    def _consumer_lag(self, now: float) -> float | None:
        """The lag the daemon's loop last measured, kept while the brokers are away: a scrape never
        waits on a broker (nor uses the consumer the loop reads from)."""
        lag = self.daemon.lag if self.daemon is not None else None
        return float(lag) if lag is not None else None


def _reload_metrics(reloads: RulesReload | None) -> Iterator[Metric]:
    """Rules reloads (daemon/reload.py): by result, and when the last of each happened."""
    if reloads is None:
        return
    total = CounterMetricFamily("rollbackd_rules_reloads", "Reloads of the rules file (SIGHUP, the file changed), "
                                "by result: ok (applied) or failed (the running rules kept).", labels=["result"])
    for result in ("ok", "failed"):
        total.add_metric([result], reloads.counts[result])
    yield total
    for name, at, what in (("success", reloads.last_success, "applied"), ("failure", reloads.last_failure, "refused")):
        if at is not None:
            g = GaugeMetricFamily(f"rollbackd_rules_last_reload_{name}_timestamp_seconds",
                                  f"When the last reload of the rules was {what} (Unix seconds).")
            g.add_metric([], at)
            yield g


def _incident_records(pipeline: Any, only_open: bool) -> list[dict[str, Any]]:
    for attempt in range(5):
        try:
            incidents = pipeline.incidents()
            return [i.to_record() for i in incidents if not only_open or i.is_open]
        except RuntimeError:  # a dict changed size during iteration: the loop moved; again
            if attempt == 4:
                raise
    return []


_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")  # digits only: no sign, no exponent, no spaces
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
# What a client sees when a handler fails: never the exception (it may carry paths, secrets or
# payload pieces); the log line has it.
INTERNAL_ERROR = b'{"error": "internal error"}\n'
_BUSY = b'{"error": "too many connections"}\n'
_BUSY_RESPONSE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                  + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection (a scrape never waits behind another client), within bounds.

    At most ``max_connections`` connections are served at once: one more is answered 503 from
    the accept loop and closed, so a flood of idle sockets costs no threads. The handler's
    socket timeout bounds each read and write; ``deadline`` bounds a connection's whole life,
    so a client that trickles a byte per timeout cannot keep its thread either: the accept
    loop shuts down connections past it.
    """

    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYN of a scrape arriving behind a burst of
    # connections, and the client only retries a second later.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 max_connections: int, deadline: float) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline}")
        self.deadline = deadline
        self.refused = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: dict[socket.socket, float] = {}  # connection -> when it must be gone (monotonic)
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:  # a fresh socket's send buffer takes these few bytes without blocking
                request.setblocking(False)
                request.send(_BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._open_lock:
            # A duration, not a time of day: monotonic, and it never decides anything.
            self._open[request] = time.monotonic() + self.deadline
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        self._slots.release()

    def service_actions(self) -> None:  # on the accept loop, every poll interval
        now = time.monotonic()
        with self._open_lock:
            late = [s for s, until in self._open.items() if until <= now]
        for s in late:
            try:  # the handler's blocked read or write returns; its thread ends and releases the slot
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback on stderr (plain text among JSON logs)
        log.error("http.connection_failed", exc_info=True)


class OpsServer:
    """``/metrics``, ``/healthz``, ``/readyz``, ``/incidents`` on a thread of its own.

    ``alive()`` says whether the processing loop runs (``/healthz``); ``ready()`` whether the
    daemon has restored its state and may be trusted (``/readyz``). Clients are bounded:
    ``timeout`` seconds per socket read or write, ``deadline`` seconds per connection, and
    ``max_connections`` at once (see :class:`_BoundedServer`).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        pipeline: Any,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        alive: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
        ready: Callable[[], tuple[bool, str]] = lambda: (True, "ready"),
        slack: SlackInteractions | None = None,
        measurements: Callable[[], Mapping[tuple[str, str, str], tuple[float, Mapping[str, Any]]]] = dict,
        timeout: float = 10.0,
        deadline: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.slack = slack
        if slack is not None:  # rollbackd_slack_interactions_total
            registry.register(slack)
        self.measurements = measurements
        self.gate = Gate(pipeline, measurements)
        self.registry = registry
        self.pipeline = pipeline
        self.alive = alive
        self.ready = ready
        self.timeout = timeout
        self.errors: list[BaseException] = []  # the first few handler errors, for tests to see
        self._server = _BoundedServer((host, port), self._handler(), max_connections=max_connections,
                                      deadline=deadline)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    @property
    def refused(self) -> int:
        """Connections answered 503 because ``max_connections`` were open."""
        return self._server.refused

    def start(self) -> "OpsServer":
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="rollbackd-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "OpsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _failed(self, exc: BaseException) -> None:
        if len(self.errors) < 100:
            self.errors.append(exc)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = f"rollbackd/{__version__}"
            timeout = owner.timeout  # StreamRequestHandler sets it on the connection's socket

            def version_string(self) -> str:
                return self.server_version  # not the Python version too

            def handle(self) -> None:
                try:
                    super().handle()
                except ConnectionError:  # the client went away: nobody to answer
                    self.close_connection = True

            def do_GET(self) -> None:
                self._safely(self._get)

            def do_POST(self) -> None:
                self._safely(self._post)

            def _safely(self, route: Callable[[], None]) -> None:
                try:
                    route()
                except (TimeoutError, ConnectionError):  # slow or gone: drop the connection
                    self.close_connection = True
                except Exception as exc:  # a request must never take the daemon down, nor see its insides
                    owner._failed(exc)
                    log.error("http.request_failed", method=self.command, path=urlsplit(self.path).path,
                              error=type(exc).__name__, exc_info=True)
                    self.close_connection = True
                    self._send(500, INTERNAL_ERROR, _JSON)

            def _get(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/metrics":
                    self._send(200, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
                elif url.path == "/healthz":
                    ok, why = owner.alive()
                    self._send(200 if ok else 503, (why + "\n").encode(), _TEXT)
                elif url.path == "/readyz":
                    ok, why = owner.ready()
                    self._send(200 if ok else 503, (why + "\n").encode(), _TEXT)
                elif url.path == "/incidents":
                    only_open = parse_qs(url.query).get("open", ["0"])[-1] in ("1", "true", "yes")
                    records = _incident_records(owner.pipeline, only_open)
                    body = json.dumps({"incidents": records}, sort_keys=True, default=str).encode()
                    self._send(200, body, _JSON)
                elif url.path.startswith("/v1/gate/"):
                    self._answer(*owner.gate.argo(url.path[len("/v1/gate/"):], parse_qs(url.query), post=False))
                elif url.path.startswith("/v1/flagger/"):
                    self._answer(405, {"error": "Flagger's webhooks POST their payload"})
                elif url.path == "/":
                    self._send(200, b"rollbackd: /metrics /healthz /readyz /incidents\n", _TEXT)
                else:
                    self._send(404, b"not found\n", _TEXT)

            def _answer(self, status: int, answer: Mapping[str, Any]) -> None:
                self._send(status, encode_answer(answer), _JSON)

            def _post(self) -> None:
                url = urlsplit(self.path)
                gate = url.path.startswith("/v1/gate/")
                flagger = url.path.startswith("/v1/flagger/")
                slack = url.path == "/v1/slack/interactions" and owner.slack is not None
                if not gate and not flagger and not slack:
                    self._send(404, b"not found\n", _TEXT)
                    return
                length = self._content_length(required=not gate)
                if length is None:
                    return
                body = self.rfile.read(length)  # read even when unused: not left for the next request
                if len(body) < length:  # the client closed before sending what it announced
                    self.close_connection = True
                    return
                if gate:  # the body is not needed
                    self._answer(*owner.gate.argo(url.path[len("/v1/gate/"):], parse_qs(url.query), post=True))
                    return
                if flagger:
                    self._answer(*owner.gate.flagger(url.path[len("/v1/flagger/"):], body))
                    return
                assert owner.slack is not None
                status, answer = owner.slack.handle(body, self.headers)
                self._send(status, json.dumps(answer, sort_keys=True).encode(), _JSON)

            def _content_length(self, *, required: bool) -> int | None:
                """The body's announced length, or None once a refusal (400, 411, 413) is sent:
                checked before a byte of the body is read."""
                values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
                if self.headers.get("Transfer-Encoding") is not None:  # no chunked bodies here
                    self._refuse(411 if not values else 400, "Transfer-Encoding is not supported; "
                                 "send a Content-Length")
                    return None
                if not values:
                    if required:
                        self._refuse(411, "Content-Length required")
                        return None
                    return 0
                if len(set(values)) != 1 or not _CONTENT_LENGTH.fullmatch(values[0]):
                    self._refuse(400, "bad Content-Length")
                    return None
                length = int(values[0])
                if length > MAX_BODY:
                    self._refuse(413, f"body larger than {MAX_BODY} bytes")
                    return None
                return length

            def _refuse(self, status: int, why: str) -> None:
                self.close_connection = True  # the unread body must not be taken for a request
                self._send(status, json.dumps({"error": why}).encode() + b"\n", _JSON)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the decision logs

        return Handler


def serve_daemon(
    daemon: Any,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    loop_thread: threading.Thread | None = None,
    notifier: str = "notifier",
    tap: Any = None,
    slack: SlackInteractions | None = None,
    heartbeat_timeout: float = 30.0,
) -> OpsServer:
    """Start the endpoints for a live ``Daemon``: wraps its pipeline's decision sink in a
    :class:`DecisionMeter`, times its batches, attaches ``tap`` (a ``MeasurementTap``, or a
    values-only one when None), and serves on ``host:port``. ``loop_thread`` is the thread
    that runs ``daemon.run()`` (default: the thread calling this).

    ``/healthz`` fails when the loop thread is gone, and once the state is restored, when the
    loop's heartbeat (``daemon.last_beat``, on ``daemon.clock``) is older than
    ``heartbeat_timeout`` seconds: a hung loop is not alive. The loop's own waits (a poll, a
    backoff of at most ``RunSettings.backoff_max``) are shorter, so a waiting loop still beats."""
    if not heartbeat_timeout > 0:
        raise ValueError(f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}")
    from rollbackd.report import MeasurementTap

    pipeline = daemon.pipeline
    edges = pipeline.edges
    meter = edges.decisions if isinstance(edges.decisions, DecisionMeter) else DecisionMeter(edges.decisions, notifier=notifier)
    edges.decisions = meter
    if tap is None:
        tap = getattr(edges, "tap", None) or MeasurementTap(pipeline.config, profiles=False, max_points=1)
    edges.tap = tap
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(pipeline, daemon=daemon, tap=tap, meter=meter))
    # process_* (CPU, memory, file descriptors), python_info and python_gc_*, read from /proc
    # and the interpreter at scrape time: nothing on the loop.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    instrument(daemon, _batch_histogram(registry))
    loop = loop_thread or threading.current_thread()

    def alive() -> tuple[bool, str]:
        if daemon.stopping:
            return False, "stopping"
        if not loop.is_alive():
            return False, "processing loop is not running"
        if daemon.ready.is_set():  # restoring a large state may take long; /readyz says so
            silent = daemon.clock.now() - daemon.last_beat
            if silent > heartbeat_timeout:
                return False, f"processing loop stalled: no heartbeat for {silent:.0f}s (limit {heartbeat_timeout:g}s)"
        return True, "ok"

    def ready() -> tuple[bool, str]:
        if daemon.stopping:
            return False, "stopping"
        if not daemon.ready.is_set():
            return False, "not ready: restoring state from the checkpoint"
        return True, "ready"

    def measurements() -> dict[tuple[str, str, str], tuple[float, Mapping[str, Any]]]:
        latest = dict(meter.measurements)
        if getattr(tap, "evaluations", 0):
            latest.update(tap.latest())
        return latest

    return OpsServer(registry, pipeline, host=host, port=port, alive=alive, ready=ready, slack=slack,
                     measurements=measurements).start()
