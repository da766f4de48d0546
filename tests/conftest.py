"""Kafka fixtures: one broker per test session, fresh topics per test (see tests/kafka_broker.py).
The Kubernetes API server fixture ``k8s`` lives in tests/k8s_cluster.py and is imported here.

``kafka_bootstrap`` starts the broker the first time a test asks for it. Outside CI a broker that
cannot start (no Java, no Maven) skips the Kafka tests with the reason; under ``CI=true`` they
fail with the broker's log tail, never skip.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable, Iterator

import pytest
from ci import unavailable

import k8s_cluster
from k8s_cluster import k8s  # noqa: F401  (the session's Kubernetes API server; see tests/k8s_cluster.py)
from kafka_broker import BrokerFailed, Cluster, KafkaBroker, resolve_cluster

_cluster: Cluster | None = None
_started: Any = None  # the session's cluster, kept for the summary line after it stopped
_failure: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs the test Kafka broker (started once per session)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    timings = getattr(_started, "timings", None)
    if timings:
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(timings.items()))
        terminalreporter.write_line(f"kafka: {_started.bootstrap} ({type(_started).__name__}): {parts}")
    cluster = k8s_cluster.started
    if cluster is not None:
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(cluster.timings.items()))
        terminalreporter.write_line(f"kubernetes: kube-apiserver {cluster.version} at {cluster.api_url}: {parts}")


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs the CLI in-process (click's CliRunner) configures structlog and the root
    logger for the whole process: a level filter then hides info events from the next test's
    ``structlog.testing.capture_logs``. Each test leaves logging as it found it."""
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[Cluster]:
    """The session's cluster: the harness broker, or the one ``KAFKA_BOOTSTRAP_SERVERS`` names."""
    global _cluster, _started, _failure
    if _failure is None and _cluster is None:
        cluster = None
        try:
            cluster = resolve_cluster()
            t0 = time.monotonic()
            cluster.start()
            cluster.timings["session_start"] = time.monotonic() - t0  # type: ignore[attr-defined]
            _cluster = _started = cluster
        except (BrokerFailed, ImportError, OSError) as exc:
            _failure = f"the test Kafka broker did not start: {exc}"
    if _failure is not None:
        unavailable(_failure)
    assert _cluster is not None
    try:
        yield _cluster
    finally:
        if isinstance(_cluster, KafkaBroker):
            _cluster.close()
        else:
            _cluster.stop()
        _cluster = None


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_cluster: Cluster) -> str:
    return kafka_cluster.bootstrap


@pytest.fixture
def kafka_broker(kafka_cluster: Cluster) -> KafkaBroker:
    """The harness broker itself, for tests that stop and start it (not with an external cluster)."""
    if not isinstance(kafka_cluster, KafkaBroker):
        pytest.skip("needs the harness broker (KAFKA_BOOTSTRAP_SERVERS names a cluster we must not stop)")
    return kafka_cluster


@pytest.fixture
def topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``topic(partitions=1, **config) -> name``: a new topic for this test, deleted afterwards."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []
    stem = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:120].strip("-.")

    def make(partitions: int = 1, **config: str) -> str:
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)],
            operation_timeout=30,
        )
        futures[name].result(30)
        created.append(name)
        deadline = time.monotonic() + 30
        while True:  # created is not yet led: wait until every partition has a leader
            meta = admin.list_topics(name, timeout=10).topics.get(name)
            if meta is not None and meta.error is None and len(meta.partitions) == partitions and all(
                p.leader >= 0 for p in meta.partitions.values()
            ):
                return name
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} has no leader after 30 s")
            time.sleep(0.05)

    yield make
    if created:
        try:
            for future in admin.delete_topics(created, operation_timeout=30).values():
                future.result(30)
        except Exception as exc:  # a broker stopped by the test: the topic goes with the session
            print(f"could not delete topics {created}: {exc}")
