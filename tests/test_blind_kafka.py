"""Blindness against a real Kafka broker: stalled (SIGSTOP) and stopped, across a daemon restart,
with the notice's timing, its texts, /metrics during the outage and a bounded SIGTERM.

Times are short (blind_after of a few seconds) so that each test stays under a minute; the
bounds asserted are the ones the daemon promises: the notice within a few seconds of
``--blind-after`` (a stall is recognised ``stall_after`` = 5 s after the brokers' last answer),
an exit within ``--stop-timeout`` of SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from kafka_broker import free_port

from rollbackd.daemon.kafka import KafkaSource, publish
from rollbackd.scenarios import BUILTIN, generate

pytestmark = pytest.mark.kafka

RULES = (Path(__file__).parent / "data" / "e2e-rules.yaml").read_text()
SINCE = re.compile(r"since (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
LAG = re.compile(r"consumer lag (\d+)")


@pytest.fixture(scope="module")
def lines() -> list[bytes]:
    return list(generate(BUILTIN["sustained_errors"]))[:3000]


class Run:
    """``rollbackd run`` as a subprocess, its output lines stamped (monotonic) as they come."""

    def __init__(self, cwd: Path, bootstrap: str, topic: str, group: str, *extra: str) -> None:
        (cwd / "rules.yaml").write_text(RULES)
        exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent)) or "rollbackd"
        self.port = free_port()
        self.cmd = [exe, "--log-level", "info", "run", "--config", "rules.yaml", "--bootstrap-servers", bootstrap, "--group-id", group,
                    "--topic", topic, "--checkpoint-every", "0.5", "--idle-after", "3600",
                    "--http", f"127.0.0.1:{self.port}",
                    # A member stopped while the broker was down never left the group: its
                    # successor gets the partition once the session times out.
                    "--kafka-config", "session.timeout.ms=6000", "--kafka-config", "heartbeat.interval.ms=1000",
                    *extra]
        self.cwd = cwd
        self.out: list[tuple[float, str]] = []
        self.err: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> "Run":
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for stream, keep in ((self.proc.stdout, lambda s: self.out.append((time.monotonic(), s))),
                             (self.proc.stderr, self.err.append)):
            threading.Thread(target=lambda st=stream, k=keep: [k(line) for line in st], daemon=True).start()
        return self

    def line(self, mark: str, timeout: float) -> tuple[float, str]:
        """The first output line with ``mark``, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, text in list(self.out):
                if mark in text:
                    return at, text
            assert self.proc is not None and self.proc.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"no {mark!r} line in {timeout} s\n{self.log()}")

    def count(self, mark: str) -> int:
        return sum(mark in text for _, text in self.out)

    def metrics(self) -> tuple[float, dict[str, float]]:
        """(seconds the scrape took, {series: value})."""
        t = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            body = r.read().decode()
        took = time.monotonic() - t
        series = {}
        for row in body.splitlines():
            if row and not row.startswith("#"):
                name, _, value = row.rpartition(" ")
                series[name] = float(value)
        return took, series

    def ready(self, timeout: float = 30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, s = self.metrics()
                if s.get("rollbackd_ready") == 1:
                    return s
            except OSError:
                pass
            assert self.proc is not None and self.proc.poll() is None, self.log()
            time.sleep(0.1)
        raise AssertionError(f"not ready in {timeout} s\n{self.log()}")

    def sigterm(self, timeout: float = 60) -> float:
        """Seconds from SIGTERM to exit."""
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - t

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return "stdout:\n" + "".join(t for _, t in self.out)[-3000:] + "\nstderr:\n" + "".join(self.err)[-3000:]


def wait_lag(run: Run, value: float, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.metrics()[1].get("rollbackd_consumer_lag") == value:
            return
        time.sleep(0.2)
    raise AssertionError(f"consumer lag never {value}: {run.metrics()[1].get('rollbackd_consumer_lag')}\n{run.log()}")


def test_a_stalled_broker_raises_the_notice_at_the_bound(kafka_broker, kafka_bootstrap, topic, tmp_path, lines):
    """SIGSTOP: connections stay open, reads return empty, no error comes for 60 s. The notice
    comes at --blind-after, /metrics answers at once with the lag kept, the resolution says the
    lag, and SIGTERM in a second stall exits within --stop-timeout."""
    name = topic(partitions=1)
    publish(kafka_bootstrap, name, str(_write(tmp_path / "a.jsonl", lines)))
    run = Run(tmp_path, kafka_bootstrap, name, f"g-{name}", "--blind-after", "6", "--stop-timeout", "8").start()
    try:
        run.ready()
        wait_lag(run, 0)  # everything read
        t0 = time.monotonic()
        kafka_broker.pause()
        try:
            took, s = run.metrics()
            assert took < 0.5 and s["rollbackd_consumer_lag"] == 0
            opened_at, opened = run.line("[BLIND]", timeout=15)
            # The spell starts at the brokers' last answer (up to a fetch wait before the stall).
            assert 5.0 <= opened_at - t0 <= 9.0, (opened_at - t0, opened)
            assert "not watching since" in opened and "silent" in opened
            for _ in range(5):  # while stalled, a scrape still answers at once, lag kept
                took, s = run.metrics()
                assert took < 0.5, took
                assert s["rollbackd_blind"] == 1 and s["rollbackd_consumer_lag"] == 0
        finally:
            kafka_broker.resume()
        _, resolved = run.line("[RESOLVED]", timeout=20)
        assert SINCE.search(resolved).group(1) == SINCE.search(opened).group(1)
        assert LAG.search(resolved).group(1) == "0", resolved
        assert run.count("[BLIND]") == 1

        kafka_broker.pause()  # SIGTERM in the middle of a stall
        try:
            took = run.sigterm()
        finally:
            kafka_broker.resume()
        assert run.proc.returncode == 0, run.log()
        assert took < 8 + 3, f"exit took {took:.1f} s\n{run.log()}"
    finally:
        kafka_broker.resume()
        run.kill()


def test_an_outage_across_a_restart_keeps_the_notice_and_resolves_it(kafka_broker, kafka_bootstrap, topic,
                                                                    tmp_path, lines):
    """The broker stops: the notice at --blind-after; SIGTERM exits within --stop-timeout; the
    restarted daemon knows the notice is out (no second one, blind from the start) and resolves
    it, with the spell's start and the lag, once the broker is back."""
    name = topic(partitions=1)
    publish(kafka_bootstrap, name, str(_write(tmp_path / "a.jsonl", lines)))
    group = f"g-{name}"
    first = Run(tmp_path, kafka_bootstrap, name, group, "--blind-after", "3", "--stop-timeout", "8").start()
    second = None
    try:
        first.ready()
        wait_lag(first, 0)
        t0 = time.monotonic()
        kafka_broker.stop()
        opened_at, opened = first.line("[BLIND]", timeout=15)
        assert opened_at - t0 <= 3 + 3, (opened_at - t0, opened)
        took, s = first.metrics()
        assert took < 0.5 and s["rollbackd_blind"] == 1
        assert s["rollbackd_consumer_lag"] == 0, "the last known lag is kept through the outage"
        took = first.sigterm()
        assert first.proc.returncode == 0, first.log()
        assert took < 8 + 3, f"exit took {took:.1f} s\n{first.log()}"

        second = Run(tmp_path, kafka_bootstrap, name, group, "--blind-after", "3", "--stop-timeout", "8").start()
        s = second.ready()
        assert s["rollbackd_blind"] == 1, "restored from the checkpoint"
        time.sleep(3 * 2)
        assert second.count("[BLIND]") == 0, "the notice is still out: not raised twice"
        kafka_broker.start()
        _, resolved = second.line("[RESOLVED]", timeout=30)
        assert SINCE.search(resolved).group(1) == SINCE.search(opened).group(1)
        assert LAG.search(resolved).group(1) == "0", resolved
        assert second.metrics()[1]["rollbackd_blind"] == 0
        assert second.sigterm() < 8 + 3 and second.proc.returncode == 0
    finally:
        if not kafka_broker.running:
            kafka_broker.start()
        first.kill()
        if second is not None:
            second.kill()


def test_health_says_the_lag_and_a_stall_without_asking_the_broker(kafka_broker, kafka_bootstrap, topic):
    """The lag from librdkafka's statistics equals the one counted from watermarks; a stall is
    recognised stall_after seconds after the leaders' last answer; the lag is kept meanwhile."""
    name = topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(100):
        producer.produce(name, b"{}")
    producer.flush(10)
    with KafkaSource(kafka_bootstrap, f"g-{uuid.uuid4().hex[:8]}", name, poll_timeout=0.05) as src:
        read = 0
        deadline = time.monotonic() + 20
        health: Any = src.health()
        while not (health.lag is not None and health.lag_age < 1.5 and 10 < read < 90):
            assert time.monotonic() < deadline, (read, health)
            batch = src.read(1)
            read += len(batch.rejects) + len(batch.events)  # "{}" is rejected: read all the same
            time.sleep(0.05)
            health = src.health()
        assert health.reachable and health.lag == src.lag() == 100 - read
        for _ in range(200):  # read the rest
            src.read(100)
            if src.lag() == 0:
                break
        kafka_broker.pause()
        t0 = time.monotonic()
        try:
            while src.health().reachable:
                assert time.monotonic() - t0 < 10
                src.read(100)
            took = time.monotonic() - t0
            health = src.health()
        finally:
            kafka_broker.resume()
        assert src.stall_after - 1 <= took <= src.stall_after + 2.5, took
        assert "silent" in health.detail and health.silent_for >= src.stall_after
        assert health.lag == 0 and health.lag_age >= src.stall_after - 1  # kept, and getting old
        deadline = time.monotonic() + 15
        while not src.health().reachable:
            assert time.monotonic() < deadline
            src.read(100)


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path
