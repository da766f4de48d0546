"""A real Apache Kafka broker for tests: KRaft, one node, from the official jars, on 127.0.0.1.

    broker = KafkaBroker()
    broker.start()            # jars fetched once into the cache, storage formatted, broker up
    ...                       # point clients at broker.bootstrap
    broker.restart(down=5.0)  # same ports, same data: an outage as clients see it
    broker.pause(); broker.resume()  # SIGSTOP / SIGCONT: a stall (connections open, no answers)
    broker.stop()

The jars come from Maven Central through ``tests/kafka/pom.xml`` (``kafka_2.13`` plus an SLF4J
binding), copied by ``mvn dependency:copy-dependencies`` into ``$ROLLBACKD_KAFKA_CACHE`` (default
``~/.cache/rollbackd-kafka/<version>``) unless already there. Ports are chosen free at the first
start and kept across restarts, as is the log directory. The broker's output goes to
``<workdir>/broker.log``; a start that fails raises :class:`BrokerFailed` with its tail.

``resolve_cluster()`` is what the test fixture uses: ``KAFKA_BOOTSTRAP_SERVERS`` names an existing
cluster (nothing is started); ``ROLLBACKD_KAFKA_BROKER=testcontainers`` starts a container where a
Docker engine answers; otherwise the jar broker above.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "KAFKA_VERSION",
    "BrokerFailed",
    "Cluster",
    "ExternalCluster",
    "KafkaBroker",
    "ContainerBroker",
    "resolve_cluster",
    "ensure_jars",
]

KAFKA_VERSION = os.environ.get("ROLLBACKD_KAFKA_VERSION", "4.1.0")
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
_READY_MARK = ".complete"


class BrokerFailed(RuntimeError):
    """The broker could not be fetched, formatted or started; the message ends with its log tail."""


class Cluster(Protocol):
    """What the fixtures need from a Kafka cluster, however it is run."""

    bootstrap: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    root = os.environ.get("ROLLBACKD_KAFKA_CACHE")
    if root:
        return Path(root).expanduser() / version
    return Path.home() / ".cache" / "rollbackd-kafka" / version


def ensure_jars(version: str = KAFKA_VERSION, cache: Path | None = None) -> Path:
    """The folder of the broker's jars, fetched with Maven the first time (under a file lock)."""
    cache = cache if cache is not None else cache_dir(version)
    libs = cache / "libs"
    if (libs / _READY_MARK).exists():
        return libs
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions at once fetch once
        if (libs / _READY_MARK).exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerFailed("Maven (mvn) is not on PATH: it fetches the Kafka jars")
        partial = cache / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-Dkafka.version={version}", f"-DoutputDirectory={partial}",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if run.returncode != 0 or not any(partial.glob(f"kafka_2.13-{version}.jar")):
            raise BrokerFailed(
                f"fetching Kafka {version} jars failed ({' '.join(cmd)}):\n{(run.stdout + run.stderr)[-4000:]}"
            )
        (partial / _READY_MARK).write_text(version + "\n")
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
    return libs


def _die_with_parent() -> None:
    """In the broker's process before exec: SIGTERM it when the test run dies (Linux), so a
    killed pytest leaves no broker behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (as Kafka's Uuid).
    Never one starting with '-': kafka-storage's argument parser would take it for an option
    (one start in 64 failed that way)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def wait_ready(bootstrap: str, timeout: float, alive: Any = None) -> None:
    """Until an AdminClient sees a broker and the controller answers, or ``timeout``."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    host, _, port = bootstrap.rpartition(":")
    while True:  # a plain connect first: librdkafka's own retries would only add backoff
        if alive is not None and not alive():
            raise BrokerFailed("the broker process exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.5):
            break
        if time.monotonic() > deadline:
            raise BrokerFailed(f"nothing listens on {bootstrap} after {timeout:.0f} s")
        time.sleep(0.05)
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    while True:
        if alive is not None and not alive():
            raise BrokerFailed("the broker process exited during start-up")
        try:
            meta = admin.list_topics(timeout=2.0)
            if meta.brokers and meta.controller_id >= 0:
                return
        except KafkaException:
            pass
        if time.monotonic() > deadline:
            raise BrokerFailed(f"the broker on {bootstrap} did not answer metadata requests in {timeout:.0f} s")
        time.sleep(0.1)


class KafkaBroker:
    """One KRaft node (broker and controller) run from the jars; see the module docstring."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        start_timeout: float = 120.0,
    ) -> None:
        self.version = version
        self.heap = heap
        self.start_timeout = start_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="rollbackd-kafka-"))
        self.port = 0
        self.controller_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._formatted = False
        self._log: Any = None
        self.timings: dict[str, float] = {}  # seconds: "jars", "format", "start"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"

    def start(self) -> None:
        if self.running:
            return
        t0 = time.monotonic()
        libs = ensure_jars(self.version)
        self.timings["jars"] = time.monotonic() - t0
        if not self.port:
            self.port, self.controller_port = free_port(), free_port()
        config = self.workdir / "server.properties"
        if not self._formatted:
            t1 = time.monotonic()
            self._write_config(config)
            self._format(libs, config)
            self.timings["format"] = time.monotonic() - t1
            self._formatted = True
        t2 = time.monotonic()
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*self._java(libs), "kafka.Kafka", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the test run is not the broker's
            preexec_fn=_die_with_parent,
        )
        try:
            wait_ready(self.bootstrap, self.start_timeout, alive=lambda: self.running)
        except BrokerFailed as exc:
            self.stop()
            raise BrokerFailed(f"{exc}\n--- {self.log_path} (tail) ---\n{self.log_tail()}") from None
        self.timings["start"] = time.monotonic() - t2

    def pause(self) -> None:
        """A stall (SIGSTOP): connections stay open and nothing is answered, as with a hung disk
        or a long GC pause. Clients see no error until their request timeouts."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """The end of a :meth:`pause` (SIGCONT)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 15.0) -> None:
        """Controlled shutdown (SIGTERM), then SIGKILL after ``timeout`` seconds."""
        self.resume()  # a paused broker would not act on SIGTERM
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """An abrupt failure (SIGKILL): no controlled shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self.stop()

    def restart(self, down: float = 0.0) -> None:
        """Stops the broker, waits ``down`` seconds, starts it again on the same ports and data."""
        self.stop()
        time.sleep(down)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _java(self, libs: Path) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerFailed("java is not on PATH: the test broker needs a JRE (17 or later)")
        return [
            java,
            f"-Xmx{self.heap}",
            "-Xms64m",
            # Start-up speed over peak throughput: a test broker lives for minutes.
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.log.kafka.request.logger=warn",
            "-Dlog4j2.level=warn",
            "-cp",
            str(libs / "*"),
        ]

    def _write_config(self, path: Path) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            # Internal topics: one replica, few partitions, so they are created in milliseconds.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "group.consumer.heartbeat.interval.ms": "500",
            "group.consumer.min.heartbeat.interval.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.segment.bytes": str(64 << 20),
            "log.cleaner.dedupe.buffer.size": str(8 << 20),
        }
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))

    def _format(self, libs: Path, config: Path) -> None:
        cmd = [
            *self._java(libs), "kafka.tools.StorageTool", "format",
            "--standalone", "-t", cluster_id(), "-c", str(config),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise BrokerFailed(f"formatting the broker's storage failed:\n{(run.stdout + run.stderr)[-4000:]}")


class ExternalCluster:
    """A cluster someone else runs (``KAFKA_BOOTSTRAP_SERVERS``): nothing to start or stop."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.timings: dict[str, float] = {}

    def start(self) -> None:
        t0 = time.monotonic()
        wait_ready(self.bootstrap, 30.0)
        self.timings["start"] = time.monotonic() - t0

    def stop(self) -> None:
        pass


class ContainerBroker:
    """Kafka in a container via testcontainers, for machines with a Docker engine (opt-in)."""

    def __init__(self, image: str = f"apache/kafka:{KAFKA_VERSION}") -> None:
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found]

        self._container = KafkaContainer(image).with_kraft()
        self.bootstrap = ""
        self.timings: dict[str, float] = {}

    def start(self) -> None:
        t0 = time.monotonic()
        self._container.start()
        self.bootstrap = self._container.get_bootstrap_server()
        self.timings["start"] = time.monotonic() - t0

    def stop(self) -> None:
        self._container.stop()


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resolve_cluster() -> Cluster:
    """The cluster the test session uses (not yet started); see the module docstring."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if bootstrap:
        return ExternalCluster(bootstrap)
    if os.environ.get("ROLLBACKD_KAFKA_BROKER", "").strip().lower() == "testcontainers":
        if not docker_available():
            raise BrokerFailed("ROLLBACKD_KAFKA_BROKER=testcontainers, but no Docker engine answers `docker info`")
        return ContainerBroker()
    return KafkaBroker()


if __name__ == "__main__":  # python tests/kafka_broker.py: start one, print timings, stop
    t = time.monotonic()
    with KafkaBroker() as b:
        print(f"bootstrap={b.bootstrap} total={time.monotonic() - t:.2f}s timings={b.timings}")
        t = time.monotonic()
        b.restart()
        print(f"restart={time.monotonic() - t:.2f}s")
        t = time.monotonic()
    print(f"stop={time.monotonic() - t:.2f}s")
