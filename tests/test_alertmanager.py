"""The alertmanager notifier against a real Alertmanager (Debian's ``prometheus-alertmanager``,
0.25), started once for this module on loopback with clustering off; its webhook receiver is a
loopback server, so what Alertmanager itself routes and notifies is checked too.

A drill's alerts arrive (read back through ``GET /api/v2/alerts``) with their labels and
annotations, the escalation adds its own alert, and the incident's resolution resolves them:
they leave the active alerts and Alertmanager notifies the receiver ``resolved``.

``.ci/run`` installs the package. Outside CI a machine without it skips these tests with the
reason; under CI=true they fail.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
from ci import unavailable
from loopback import LoopbackServer

from rollbackd.actions.alertmanager import ESCALATION_ALERT, AlertmanagerNotifier
from rollbackd.actions.base import ActionResult, AlertSummary, Notice
from rollbackd.actions.retry import RetryPolicy
from rollbackd.daemon.clock import WallClock
from rollbackd.drills import drill
from rollbackd.rules.loader import load_config_text
from rollbackd.scenarios import BUILTIN, write_recording

RULES = """
version: 1
settings: {lateness: 30s, join_horizon: 1h}
grouping: {group_by: [deployment, variant], group_wait: 30s, repeat_interval: 4h}
deployments:
  demo-scorer:
    backend: {type: log}
    runbook: https://runbooks.example/demo-scorer
    policy: freeze
rules:
  - name: serving-error-rate
    detector: error_rate
    threshold: 0.05
    clear_threshold: 0.03
    window: {size: 1m}
    for: 0s
    min_samples: 100
    severity: critical
    summary: error rate above 5%
    actions: [notify, rollback]
"""


def _binary() -> str:
    path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if path is None:
        why = "Alertmanager is not installed (apt-get install prometheus-alertmanager)"
        unavailable(why)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Alertmanager:
    def __init__(self, url: str, hook: LoopbackServer) -> None:
        self.url = url
        self.hook = hook

    def alerts(self, **labels: str) -> list[dict[str, Any]]:
        """The active alerts whose labels include ``labels``."""
        query = "&".join(f"filter={k}%3D%22{v}%22" for k, v in labels.items())
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as resp:
            return json.loads(resp.read())

    def notified(self, incident: str, status: str, since: int = 0, timeout: float = 15.0,
                 labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The webhook notifications Alertmanager sent about ``incident`` with ``status`` (from
        the ``since``-th request on; with ``labels``, only of alerts carrying them), waited for
        (its group_interval is 1s)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [body for body in (r.json() for r in list(self.hook.requests)[since:])
                     if body.get("status") == status and body.get("groupLabels", {}).get("incident") == incident
                     and all(a["labels"].get(k) == v for a in body["alerts"] for k, v in (labels or {}).items())]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    binary = _binary()
    work = tmp_path_factory.mktemp("alertmanager")
    with LoopbackServer() as hook:
        (work / "alertmanager.yml").write_text(f"""
route:
  receiver: hook
  group_by: ['...']  # every alert a group of its own: tests sharing this server never share one
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {hook.url}/hook
        send_resolved: true
""")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = (work / "alertmanager.log").open("w")
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Alertmanager did not start:\n{(work / 'alertmanager.log').read_text()[-2000:]}")
                time.sleep(0.1)
            yield Alertmanager(url, hook)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("am-blip") / "error_blip.jsonl.gz"
    write_recording(BUILTIN["error_blip"], path)
    return path


class Watching:
    """The notifier, and after each notice what Alertmanager holds for its incident."""

    def __init__(self, inner: AlertmanagerNotifier, am: Alertmanager) -> None:
        self.inner = inner
        self.am = am
        self.seen: list[tuple[Notice, ActionResult, list[dict[str, Any]]]] = []

    def post(self, notice: Notice) -> ActionResult:
        result = self.inner.post(notice)
        self.seen.append((notice, result, self.am.alerts(incident=notice.incident_id)))
        return result


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_drills_alerts_reach_alertmanager_and_are_resolved(alertmanager, blip, tmp_path):
    wall = WallClock().now()
    notifier = AlertmanagerNotifier(alertmanager.url, now=lambda: wall, resend_interval=60.0,
                                    labels={"team": "ml"})
    watching = Watching(notifier, alertmanager)
    try:
        drill(blip, load_config_text(RULES), out_dir=tmp_path, notifier=watching, ledger=False)
    finally:
        notifier.close()
    # The freeze refused the rollback before the incident's first notice went out (group_wait):
    # every notice of it is an escalation, the first included.
    kinds = [(n.kind, n.escalation, r.status) for n, r, _ in watching.seen]
    assert kinds == [("opened", True, "succeeded"), ("updated", True, "succeeded"), ("resolved", True, "succeeded")]
    opened, incident = watching.seen[0][0], watching.seen[0][0].incident_id

    first = {a["labels"]["alertname"]: a for a in watching.seen[0][2]}
    assert set(first) == {"serving-error-rate", ESCALATION_ALERT}
    alert = first["serving-error-rate"]
    assert alert["labels"] == {
        "alertname": "serving-error-rate", "rule": "serving-error-rate", "severity": "critical",
        "deployment": "demo-scorer", "variant": "primary", "incident": incident, "source": "rollbackd",
        "drill": "true", "team": "ml",
    }
    assert alert["annotations"]["summary"] == "error rate above 5%"
    assert alert["annotations"]["runbook_url"] == "https://runbooks.example/demo-scorer"
    assert "serving-error-rate (critical, firing): value 0.1973" in alert["annotations"]["description"]
    assert alert["status"]["state"] == "active"
    assert _ts(alert["startsAt"]) == opened.ts, "startsAt is the incident's event time"
    assert _ts(alert["endsAt"]) == pytest.approx(wall + 240, abs=0.01), "endsAt: four resend intervals ahead"

    escalated = {a["labels"]["alertname"]: a for a in watching.seen[1][2]}
    assert set(escalated) == {"serving-error-rate", ESCALATION_ALERT}
    assert escalated[ESCALATION_ALERT]["labels"]["severity"] == "critical"
    assert "escalated: rollback freeze" in escalated[ESCALATION_ALERT]["annotations"]["description"]
    assert escalated["serving-error-rate"]["fingerprint"] == alert["fingerprint"], "the same alert, updated"

    assert watching.seen[2][2] == [], "resolved: no longer among the active alerts"
    assert alertmanager.alerts(incident=incident) == []
    resolved = alertmanager.notified(incident, "resolved")
    assert {n["groupLabels"]["alertname"] for n in resolved} == {"serving-error-rate", ESCALATION_ALERT}, \
        "Alertmanager itself notified the resolution of both"
    assert all(a["status"] == "resolved" for n in resolved for a in n["alerts"])


def test_firing_alerts_are_resent_with_a_fresh_ends_at(alertmanager):
    clock = [WallClock().now()]
    notifier = AlertmanagerNotifier(alertmanager.url, now=lambda: clock[0], resend_interval=30.0)
    notice = Notice("inc-resend000001", "opened", clock[0] - 600, "demo-scorer", "canary", "2",
                    "[WARNING] demo-scorer/canary: p99", "[WARNING] demo-scorer/canary: p99 — incident opened",
                    severity="warning")
    assert notifier.post(notice).status == "skipped", "a notice without alerts sends nothing"
    notice = replace(notice, alerts=(AlertSummary("p99", "warning", "firing", 900.0, 500.0, 300, 0.0, 60.0),))
    assert notifier.post(notice).status == "succeeded"
    (before,) = alertmanager.alerts(incident="inc-resend000001")
    clock[0] += 25
    assert notifier.resend() == 1
    (after,) = alertmanager.alerts(incident="inc-resend000001")
    assert _ts(after["endsAt"]) - _ts(before["endsAt"]) == pytest.approx(25, abs=0.01)
    assert after["startsAt"] == before["startsAt"]
    clock[0] = WallClock().now()  # resolved now, though the last endsAt said later
    resolved = replace(notice, kind="resolved")
    assert notifier.post(resolved).status == "succeeded"
    assert notifier.resend() == 0 and alertmanager.alerts(incident="inc-resend000001") == []
    notifier.close()


def test_an_unreachable_alertmanager_is_retried_then_failed():
    port = _free_port()  # nothing listens there
    slept: list[float] = []
    notifier = AlertmanagerNotifier(f"http://127.0.0.1:{port}", now=WallClock().now, sleep=slept.append,
                                    policy=RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0))
    notice = Notice("inc-unreachable1", "opened", 0.0, "d", "v", None, "t", "t",
                    (AlertSummary("r", "critical", "firing", 1.0, 0.5, 10, 0.0, 60.0),), severity="critical")
    result = notifier.post(notice)
    assert result.status == "failed" and result.attempts == 3 and slept == [0.1, 0.2]
    assert "ConnectionRefusedError" in result.detail


def test_rollbackd_drill_with_the_rules_notifier_pages_alertmanager(alertmanager, blip, tmp_path):
    """``rollbackd drill --notifier rules``: the rules file's alertmanager notifier gets the
    drill's alerts (labelled drill="true") and their resolution."""
    from click.testing import CliRunner

    from rollbackd.cli import main

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace(
        "settings: {lateness: 30s, join_horizon: 1h}",
        f"settings: {{lateness: 30s, join_horizon: 1h, notifier: {{type: alertmanager, url: '{alertmanager.url}', "
        "labels: {test: cli}}}"))
    before = len(alertmanager.hook.requests)
    done = CliRunner().invoke(main, ["drill", str(blip), "-c", str(rules), "--notifier", "rules",
                                     "--out-dir", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    incident = done.output.split("incidents: 1\n  ")[1].split()[0]
    assert alertmanager.alerts(incident=incident) == []
    # An earlier test drilled the same recording (the same incident id): its late notifications
    # are told apart by their labels.
    for status in ("firing", "resolved"):
        said = alertmanager.notified(incident, status, since=before, labels={"test": "cli"})
        assert said and all(a["labels"]["drill"] == "true" for n in said for a in n["alerts"]), status


def test_a_restarted_rollbackd_keeps_an_open_incidents_alerts_alive(alertmanager, blip, tmp_path):
    """rollbackd stops while an incident is open: its alerts would expire at their endsAt and
    Alertmanager would tell the on-call they resolved. Restored from a snapshot, the daemon
    hands each open incident to the new notifier (``resume_open``), which re-sends the same
    alerts at once and every interval, so they stay active and nothing is resolved."""
    import gzip

    from rollbackd.daemon.notices import resume_open
    from rollbackd.daemon.pipeline import Pipeline
    from rollbackd.daemon.replay import build_pipeline, open_recording, replay

    config = load_config_text(RULES)
    lines = gzip.open(blip, "rt").read().splitlines(keepends=True)
    full = drill(blip, config, out_dir=tmp_path / "full", ledger=False)
    (opened,) = [d for d in full.decisions if d.get("kind") == "incident" and d.get("state") == "opened"]
    (resolved,) = [d for d in full.decisions if d.get("kind") == "incident" and d.get("state") == "resolved"]
    middle = (opened["ts"] + resolved["ts"]) / 2
    cut = tmp_path / "until-the-middle.jsonl"
    cut.write_text("".join(line for line in lines if json.loads(line).get("ts", 0) < middle))

    interval = 0.5
    first = AlertmanagerNotifier(alertmanager.url, now=lambda: WallClock().now(), resend_interval=interval)
    pipeline = build_pipeline(config, notifier=first, drill=True)
    replay(open_recording(str(cut), config), pipeline)
    (incident,) = pipeline.book.open.values()
    before = alertmanager.alerts(incident=incident.id)
    assert {a["labels"]["alertname"] for a in before} == {"serving-error-rate", ESCALATION_ALERT}
    first.close()  # the process stops: nothing re-sends its alerts any more
    stopped_at = time.time()
    hook_mark = len(alertmanager.hook.requests)

    restored = Pipeline(config, pipeline.edges)
    assert restored.restore(pipeline.snapshot()) == []
    second = AlertmanagerNotifier(alertmanager.url, now=lambda: WallClock().now(), resend_interval=interval)
    try:
        assert resume_open(second, restored) == 1
        time.sleep(max(0.0, stopped_at + 6 * interval - time.time()))  # past the endsAt the first one set
        after = alertmanager.alerts(incident=incident.id)
        assert {a["labels"]["alertname"] for a in after} == {"serving-error-rate", ESCALATION_ALERT}
        assert {a["fingerprint"] for a in after} == {a["fingerprint"] for a in before}, "the same alerts"
        assert all(_ts(a["endsAt"]) > stopped_at + 4 * interval for a in after), "kept alive by the second"
        assert alertmanager.notified(incident.id, "resolved", since=hook_mark, timeout=0.5) == []
    finally:
        second.close()
