"""Console notifier, log backend, null notifier and the factory's defaults."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import structlog

from rollbackd.actions import (
    AlertSummary,
    ConsoleNotifier,
    LogBackend,
    Notice,
    NullNotifier,
    RollbackPlan,
    format_notice,
    make_backend,
    make_notifier,
)
from rollbackd.rules.model import BackendSpec, NotifierSpec

T0 = 1704067200.0  # 2024-01-01T00:00:00Z

NOTICE = Notice(
    incident_id="inc-7f3a",
    kind="opened",
    ts=T0 + 300,
    deployment="fraud",
    variant="canary",
    version="v43",
    title="Drift on fraud/canary",
    text="psi_drift firing on fraud/canary (v43)\nrollback to v42 planned",
    alerts=(
        AlertSummary("psi_drift", "critical", "firing", 0.3141, 0.2, 5000, T0, T0 + 300, 0.0012, "Score shifted"),
        AlertSummary("error_rate", "warning", "pending", None, 0.05, 0, T0 + 60, T0 + 360),
    ),
    runbook="https://runbooks.example/fraud",
)

EXPECTED = """\
OPENED inc-7f3a at 2024-01-01T00:05:00Z: Drift on fraud/canary
  deployment fraud, variant canary, version v43
  psi_drift firing on fraud/canary (v43)
  rollback to v42 planned
  - psi_drift (critical, firing): value 0.3141 vs threshold 0.2, window 2024-01-01T00:00:00Z/2024-01-01T00:05:00Z, n=5000, p=0.0012
      Score shifted
  - error_rate (warning, pending): value n/a vs threshold 0.05, window 2024-01-01T00:01:00Z/2024-01-01T00:06:00Z, n=0
  runbook: https://runbooks.example/fraud
"""

PLAN = RollbackPlan("fraud", "canary", "v43", "v42", "inc-7f3a", "psi_drift firing")


def test_console_exact_output():
    out = io.StringIO()
    result = ConsoleNotifier(stream=out).post(NOTICE)
    assert out.getvalue() == EXPECTED
    assert result.status == "succeeded" and result.thread == "inc-7f3a"


def test_console_drill_minimal_and_threaded():
    notice = Notice(
        incident_id="inc-1",
        kind="resolved",
        ts=T0,
        deployment="d",
        variant="primary",
        version=None,
        title="Resolved",
        text="Resolved",
        thread="inc-1-parent",
        drill=True,
    )
    out = io.StringIO()
    result = ConsoleNotifier(stream=out).post(notice)
    assert out.getvalue() == (
        "[DRILL] RESOLVED inc-1 at 2024-01-01T00:00:00Z: Resolved\n"
        "  deployment d, variant primary, version unknown\n"
    )
    assert result.thread == "inc-1-parent"


def test_console_is_deterministic_and_colour_is_optional():
    assert format_notice(NOTICE) == format_notice(NOTICE) == EXPECTED
    colored = format_notice(NOTICE, color=True)
    assert "\x1b[31m" in colored and "\x1b[0m" in colored
    assert "\x1b" not in EXPECTED


def test_console_defaults_to_current_stdout(capsys):
    ConsoleNotifier().post(NOTICE)
    assert capsys.readouterr().out == EXPECTED


def test_console_broken_stream_fails_without_raising():
    out = io.StringIO()
    out.close()
    result = ConsoleNotifier(stream=out).post(NOTICE)
    assert result.status == "failed" and result.thread == "inc-7f3a"


def test_null_notifier():
    result = NullNotifier().post(replace(NOTICE, thread="t1"))
    assert result.status == "skipped" and result.thread == "t1"


def test_log_backend_logs_and_dedupes():
    backend = LogBackend()
    with structlog.testing.capture_logs() as logs:
        first = backend.apply(PLAN)
        again = backend.apply(PLAN)
        other = backend.apply(replace(PLAN, to_version="v41"))
    assert first.status == "succeeded" and first.detail == "logged: set fraud/canary to v42"
    assert again.status == "skipped" and again.detail == "already applied"
    assert other.status == "succeeded"
    assert backend.applied == [PLAN, replace(PLAN, to_version="v41")]
    assert [e["event"] for e in logs] == ["rollback.logged", "rollback.logged"]
    assert logs[0] == {
        "event": "rollback.logged",
        "log_level": "info",
        "deployment": "fraud",
        "variant": "canary",
        "incident": "inc-7f3a",
        "from_version": "v43",
        "to_version": "v42",
        "idempotency_key": "inc-7f3a:rollback:canary:v42",
    }


def test_factory_defaults():
    assert isinstance(make_backend(BackendSpec()), LogBackend)
    assert isinstance(make_notifier(NotifierSpec("none")), NullNotifier)
    out = io.StringIO()
    console = make_notifier(NotifierSpec(), stream=out)
    assert isinstance(console, ConsoleNotifier) and console.color is False
    console.post(NOTICE)
    assert out.getvalue() == EXPECTED
    assert make_notifier(NotifierSpec("console", {"color": True})).color is True


def test_factory_unknown_types_list_known_names():
    with pytest.raises(ValueError, match=r"unknown backend type 'argo' \(known: log, webhook, mlflow, kubernetes, command, traffic-file\)"):
        make_backend(BackendSpec("argo"))
    with pytest.raises(ValueError, match=r"unknown notifier type 'email' \(known: console, slack, none, alertmanager, pagerduty, opsgenie, webhook\)"):
        make_notifier(NotifierSpec("email"))


def test_factory_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"log backend: unknown option\(s\) 'url' \(known: none\)"):
        make_backend(BackendSpec("log", {"url": "http://x"}))
    with pytest.raises(ValueError, match=r"console notifier: unknown option\(s\) 'colour' \(known: color\)"):
        make_notifier(NotifierSpec("console", {"colour": True}))
