"""Slow and dead edges on a real Kafka broker: one deployment's stuck webhook and a slow Slack hold
up neither another deployment's rollback nor checkpoints, offsets or /metrics; after a SIGKILL
with effects queued, each runs once by its key.

The daemon is the real console script (``rollbackd run``) in a subprocess. Its edges are real HTTP
servers on loopback (``tests/loopback.py``): one webhook server per deployment and a Slack Web API
stand-in (``settings.notifier: {type: slack, base_url: ...}``, token from ``SLACK_BOT_TOKEN``).

The recording: two deployments (``dep-a``, ``dep-b``) at 15 predictions per event-second for
150 event-seconds, version 2 deployed at 30 s on both; it fails 30 % of the requests of
``dep-a`` from 40 s and of ``dep-b`` from 90 s. One rule, ``error_rate`` on 10-second windows for
2 windows, ``notify`` and ``rollback``, ``group_wait: 0s``, lateness 5 s: ``dep-a``'s incident
opens at event time +60 s, ``dep-b``'s at +110 s, each with a rollback to version 1 and three
notices (opened, rollback started, rollback succeeded or failed). About 4,500 events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from loopback import LoopbackServer, Recorded, Reply, SlackAPI
from test_daemon_kafka import committed, write_lines

from rollbackd.daemon.kafka import publish
from rollbackd.scenarios import Fault, Scenario, generate

pytestmark = pytest.mark.kafka

TOKEN = "xoxb-effects"
SLACK_DELAY = 10.0  # seconds the Slack stand-in takes to answer each call
WEBHOOK_TIMEOUT = 15.0  # the black-holed webhook's client timeout (rules: timeout, one attempt)
PROMPT = 5.0  # wall seconds: "promptly", far below SLACK_DELAY and WEBHOOK_TIMEOUT

SCENARIO = Scenario(
    name="effects", duration=150.0, rate=15.0, deployments=("dep-a", "dep-b"),
    versions=((0.0, "1"), (30.0, "2")), label_fraction=0.0, seed=12,
    faults=(Fault("error_rate", start=40.0, magnitude=0.3, version="2", deployment="dep-a"),
            Fault("error_rate", start=90.0, magnitude=0.3, version="2", deployment="dep-b")),
)


def mtime(path: Path) -> float:
    """When the file was last written; 0 while it does not exist yet (the first checkpoint is
    written by the checkpoint writer's thread a moment after the loop froze it)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def rules(hooks: dict[str, str], slack_url: str, webhook_timeout: float) -> str:
    deployments = "".join(
        f"""  {name}:
    backend: {{type: webhook, url: "{url}/rollback/{name}", timeout: {webhook_timeout}, retry: {{max_attempts: 1}}}}
    known_good_after: 20s
    known_good_min_predictions: 100
    cooldown: 0s
""" for name, url in sorted(hooks.items()))
    return f"""version: 1
settings:
  lateness: 5s
  join_horizon: 1m
  notifier: {{type: slack, channel: "#oncall", base_url: "{slack_url}/api/", timeout: 30}}
grouping: {{group_by: [deployment, variant], group_wait: 0s, repeat_interval: 4h}}
deployments:
{deployments}rules:
  - name: errors
    detector: error_rate
    threshold: 0.05
    clear_threshold: 0.03
    window: {{size: 10s}}
    for: 2 windows
    min_samples: 100
    severity: critical
    actions: [notify, rollback]
"""


class _TS(msgspec.Struct):
    ts: float


@pytest.fixture(scope="module")
def recording() -> list[tuple[float, bytes]]:
    """(event seconds after the start, line) in event-time order."""
    dec = msgspec.json.Decoder(_TS).decode
    return [(dec(line).ts - SCENARIO.start, line) for line in generate(SCENARIO)]


def lines_between(recording: list[tuple[float, bytes]], lo: float, hi: float) -> list[bytes]:
    return [line for t, line in recording if lo <= t < hi]


class Edge:
    """A loopback HTTP server that notes when each request came and when it was (or will be)
    answered: ``hold`` seconds after it came (``None``: never; the request is held until the
    server closes)."""

    def __init__(self, answer: Any = None, hold: float | None = 0.0) -> None:
        self.answer = answer or (lambda req: Reply(200, body={"ok": True}))
        self.hold = hold
        self.calls: list[tuple[float, float, Recorded]] = []  # (came, answered, request)
        self._lock = threading.Lock()
        self.server = LoopbackServer(self._respond)
        self.url = self.server.url

    def _respond(self, req: Recorded) -> Reply:
        hold = self.hold
        came = time.monotonic()
        with self._lock:
            self.calls.append((came, came + hold if hold is not None else float("inf"), req))
        reply = self.answer(req)
        return dataclasses.replace(reply, delay=hold if hold is not None else 3600.0)

    def posts(self, path: str = "") -> list[tuple[float, float, Recorded]]:
        with self._lock:
            return [c for c in self.calls if c[2].path.endswith(path)]

    def close(self) -> None:
        self.server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningDaemon:
    """``rollbackd run`` in ``workdir`` (checkpoint, ledger and decision log there), output to a file."""

    def __init__(self, workdir: Path, rules_path: Path, bootstrap: str, topic: str, group: str,
                 http: bool = False) -> None:
        exe = shutil.which("rollbackd", path=str(Path(sys.executable).parent))
        self.port = free_port() if http else None
        self.cmd = [exe or "rollbackd", "run", "--config", str(rules_path), "--bootstrap-servers", bootstrap,
                    "--group-id", group, "--topic", topic, "--checkpoint-every", "0.3",
                    "--idle-after", "3600", "--batch-size", "2000",
                    "--kafka-config", "session.timeout.ms=6000", "--kafka-config", "heartbeat.interval.ms=1000",
                    *(["--http", f"127.0.0.1:{self.port}"] if http else [])]
        self.workdir = workdir
        self.checkpoint = workdir / "rollbackd.checkpoint"
        self.ledger = workdir / "rollbackd.db"
        self.proc: subprocess.Popen | None = None
        self._out: Any = None

    def start(self) -> None:
        self._out = open(self.workdir / "daemon.out", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLACK_BOT_TOKEN": TOKEN}
        self.proc = subprocess.Popen(self.cmd, cwd=self.workdir, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def tail(self) -> str:
        return (self.workdir / "daemon.out").read_text("utf-8", "replace")[-3000:]

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Send ``sig``; seconds until the process exited."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return time.monotonic() - t0

    def close(self) -> None:
        """A failed test leaves no daemon behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._out is not None:
            self._out.close()

    def scrape(self, timeout: float = 5.0) -> tuple[float, str]:
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
        return time.monotonic() - t0, text

    def actions(self, action: str, phase: str) -> list[str]:
        """Idempotency keys of the ledger's ``action`` rows in ``phase`` (read beside the daemon)."""
        if not self.ledger.exists():
            return []
        try:
            with sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True, timeout=5) as db:
                return [k for (k,) in db.execute(
                    "select idempotency_key from actions where action = ? and phase = ? order by seq",
                    [action, phase])]
        except sqlite3.OperationalError:  # not created yet, or locked for a moment
            return []


def wait_until(predicate: Any, timeout: float, daemon: RunningDaemon, what: str, every: float = 0.05) -> float:
    """Polls ``predicate`` (checking the daemon lives); the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        daemon.alive()
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s\n{daemon.tail()}")


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_stuck_webhook_and_a_slow_slack_stop_neither_another_rollback_nor_checkpoints(
    kafka_bootstrap, topic, tmp_path, recording
):
    """dep-a's webhook accepts and never answers (its client gives up after WEBHOOK_TIMEOUT);
    Slack answers every call after SLACK_DELAY. Three parts are published one after another:
    up to dep-a's breach, up to dep-b's, the rest. dep-b's rollback reaches its webhook within
    PROMPT of the publication of its breach, while dep-a's call hangs; then, while Slack holds
    notices, the last part is read and committed within PROMPT, checkpoints are written every
    few tenths of a second and /metrics answers with the consumer lag."""
    name = topic(partitions=1)
    slack = Edge(SlackAPI(TOKEN), hold=SLACK_DELAY)
    hook_a = Edge(hold=None)  # accepts, reads the request, never answers
    hook_b = Edge()
    daemon = None
    try:
        rules_path = tmp_path / "rules.yaml"
        rules_path.write_text(rules({"dep-a": hook_a.url, "dep-b": hook_b.url}, slack.url, WEBHOOK_TIMEOUT))
        daemon = RunningDaemon(tmp_path, rules_path, kafka_bootstrap, name, f"g-{name}", http=True)
        parts = [lines_between(recording, lo, hi) for lo, hi in ((0, 80), (80, 125), (125, 1e9))]
        publish(kafka_bootstrap, name, str(write_lines(tmp_path / "p1.jsonl", parts[0])))
        daemon.start()
        # dep-a's breach is read and its rollback is out: the call hangs at its webhook
        came_a = wait_until(lambda: hook_a.posts("/rollback/dep-a"), 60, daemon, "dep-a's rollback call")
        # dep-a's incident notice may go out beside its hung rollback; the rollback's own
        # replies ("rollback started", its outcome) wait for its result
        assert not [r for _, _, r in slack.posts() if b"rollback started" in r.body]

        publish(kafka_bootstrap, name, str(write_lines(tmp_path / "p2.jsonl", parts[1])))
        published_b = time.monotonic()
        came_b = wait_until(lambda: hook_b.posts("/rollback/dep-b"), 30, daemon, "dep-b's rollback call")
        print(f"dep-b's rollback at its webhook {came_b - published_b:.2f}s after its breach was published")
        assert came_b - published_b < PROMPT, f"dep-b's rollback {came_b - published_b:.2f}s after its breach"
        assert came_b < came_a + WEBHOOK_TIMEOUT  # ...while dep-a's call still hung
        (_, _, req_b), = hook_b.posts()
        (_, _, req_a), = hook_a.posts()
        assert req_b.header("Idempotency-Key").endswith(":rollback:primary:1")
        assert json.loads(req_b.body)["deployment"] == "dep-b" and json.loads(req_a.body)["deployment"] == "dep-a"

        # dep-b's first notice is now held by Slack: the last part is read and committed meanwhile
        wait_until(lambda: [r for _, _, r in slack.posts("/chat.postMessage") if b"dep-b" in r.body],
                   PROMPT, daemon, "dep-b's first notice")
        publish(kafka_bootstrap, name, str(write_lines(tmp_path / "p3.jsonl", parts[2])))
        published_end = time.monotonic()
        total = sum(map(len, parts))
        mtimes: list[float] = []
        scrapes: list[tuple[float, str]] = []
        done = None
        while time.monotonic() < published_end + SLACK_DELAY:  # a whole Slack call long
            daemon.alive()
            mtimes.append(mtime(daemon.checkpoint))
            scrapes.append(daemon.scrape())
            if done is None and committed(kafka_bootstrap, f"g-{name}", name) >= total:
                done = time.monotonic()
            time.sleep(0.2)
        held = [c for c in slack.posts() if c[1] > published_end + SLACK_DELAY - 0.5]
        assert held, "Slack held no call during the measurement: it did not measure slow edges"
        assert done is not None and done - published_end < PROMPT, (
            f"offsets reached the end {None if done is None else round(done - published_end, 2)}s after publishing")
        changes = sorted(set(mtimes))
        assert len(changes) >= 10, f"checkpoint written {len(changes)} times in {SLACK_DELAY}s"
        gaps = [b - a for a, b in zip(changes, changes[1:])]
        assert max(gaps) < 2.0, f"checkpoint gap {max(gaps):.2f}s while effects were slow"
        took = sorted(s for s, _ in scrapes)
        print(f"offsets at the end {done - published_end:.2f}s after publishing; {len(changes)} checkpoints in "
              f"{SLACK_DELAY:g}s, largest gap {max(gaps):.2f}s; {len(took)} scrapes, slowest {took[-1] * 1000:.0f} ms")
        assert took[-1] < 2.0, f"slowest /metrics scrape {took[-1]:.2f}s"
        last = scrapes[-1][1]
        assert metric(last, "rollbackd_consumer_lag") == 0.0
        assert metric(last, "rollbackd_checkpoint_age_seconds") < 2.0
        assert metric(last, "rollbackd_daemon_events_total") == total

        # SIGTERM with calls still out: bounded by the effects' stop timeout (10 s), not by them
        assert daemon.stop(timeout=40) < 25 and daemon.proc.returncode == 0, daemon.tail()
    finally:
        if daemon is not None:
            daemon.close()
        for edge in (slack, hook_a, hook_b):
            edge.close()


def test_sigkill_with_notices_queued_runs_each_once_after_the_restart(kafka_bootstrap, topic, tmp_path, recording):
    """Both webhooks answer at once, Slack after SLACK_DELAY. The whole recording is published;
    both rollbacks finish (their finished rows are in the ledger), each deployment's first
    notice is held by Slack and its two others wait in its lane; a checkpoint is written; then
    SIGKILL. Slack answers at once from then on, and the daemon restarts from the checkpoint.

    What is asserted, counted at the servers:
    - each rollback key reaches its webhook exactly once: its outcome was recorded before the
      kill, so neither the restored in-flight list nor a re-decision calls it again;
    - each notice that Slack had received but not answered at the kill is posted exactly twice
      (the answer died with the process; Slack's chat.postMessage has no idempotency key, so
      at-least-once is the best any sender can do), every other notice exactly once; no notice
      is lost.
    """
    name = topic(partitions=1)
    slack = Edge(SlackAPI(TOKEN), hold=SLACK_DELAY)
    hooks = {d: Edge() for d in ("dep-a", "dep-b")}
    daemon = None
    try:
        rules_path = tmp_path / "rules.yaml"
        rules_path.write_text(rules({d: h.url for d, h in hooks.items()}, slack.url, 5.0))
        group = f"g-{name}"
        daemon = RunningDaemon(tmp_path, rules_path, kafka_bootstrap, name, group)
        lines = [line for _, line in recording]
        publish(kafka_bootstrap, name, str(write_lines(tmp_path / "all.jsonl", lines)))
        daemon.start()
        wait_until(lambda: len(daemon.actions("rollback", "finished")) == 2, 60, daemon, "both rollbacks finished")
        wait_until(lambda: len(slack.posts("/chat.postMessage")) == 2, 10, daemon, "both first notices at Slack")
        first_posts = time.monotonic()
        wait_until(lambda: len(daemon.actions("notify", "started")) == 6, 10, daemon, "six notices started")
        wait_until(lambda: mtime(daemon.checkpoint) > time.time() - 0.2  # a checkpoint after them
                   and time.monotonic() > first_posts + 1.0, 10, daemon, "a checkpoint with the notices queued")
        finished_at_kill = daemon.actions("notify", "finished")
        daemon.stop(signal.SIGKILL)
        killed = time.monotonic()
        assert killed < first_posts + SLACK_DELAY - 1.0, "a notice was answered before the kill"
        assert finished_at_kill == []
        in_flight = {text(r) for came, answered, r in slack.posts("/chat.postMessage") if answered > killed}
        assert len(in_flight) == 2  # each deployment's first notice

        slack.hold = 0.0
        restarted = time.monotonic()
        daemon.start()
        wait_until(lambda: len(daemon.actions("notify", "finished")) == 6, 60, daemon, "every notice finished")
        time.sleep(1.0)  # nothing more comes
        assert daemon.stop(timeout=40) < 25 and daemon.proc.returncode == 0, daemon.tail()

        for d, hook in hooks.items():
            keys = [r.header("Idempotency-Key") for _, _, r in hook.posts()]
            assert len(keys) == 1, f"{d}: rollback calls {keys}"
        started = daemon.actions("notify", "started")
        finished = daemon.actions("notify", "finished")
        assert sorted(finished) == sorted(set(started)) and len(set(started)) == 6  # none lost, none twice
        posts = [text(r) for _, _, r in slack.posts("/chat.postMessage")]
        after = [text(r) for came, _, r in slack.posts("/chat.postMessage") if came > restarted]
        counts = {t: posts.count(t) for t in posts}
        assert len(counts) == 6, counts
        assert counts == {t: 2 if t in in_flight else 1 for t in counts}, counts
        assert in_flight <= set(after)
        for d in ("dep-a", "dep-b"):  # each incident's thread as before the kill: its parent first
            mine = [r for came, _, r in slack.posts("/chat.postMessage") if came > restarted and d in text(r)]
            assert len(mine) == 3 and text(mine[0]) in in_flight, [text(r) for r in mine]
            assert "thread_ts" not in body(mine[0]) and all(body(r).get("thread_ts") for r in mine[1:])
    finally:
        if daemon is not None:
            daemon.close()
        for edge in (slack, *hooks.values()):
            edge.close()


def body(request: Recorded) -> dict[str, Any]:
    try:
        return dict(request.json())
    except ValueError:
        return request.form()


def text(request: Recorded) -> str:
    """A Slack post's text (each notice's text is distinct here: incident and step)."""
    return str(body(request)["text"])
