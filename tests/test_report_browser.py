"""The incident report in a real browser: headless Chromium renders it and every plot is there.

Outside CI the test is skipped when ``/usr/bin/chromium`` is missing; under ``CI=true`` a missing
browser fails it (``.ci/run`` installs Debian's ``chromium`` package).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ci import unavailable


from rollbackd.report import MeasurementTap, write_report

CHROMIUM = "/usr/bin/chromium"
T0 = 1_790_000_000.0


def _chromium() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)")
    return path


def _render(chromium: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True, timeout=90,
    )


def _decisions() -> list[dict]:
    base = {"kind": "alert", "rule": "serving-error-rate", "deployment": "demo-scorer", "variant": "primary",
            "severity": "critical", "incident_id": None}
    m = {"threshold": 0.05, "sample_size": 1200}
    return [
        {**base, "ts": T0 + 940, "previous": "inactive", "state": "pending", "window": [T0 + 880, T0 + 940],
         "measurement": {**m, "value": 0.13}},
        {**base, "ts": T0 + 1060, "previous": "pending", "state": "firing", "window": [T0 + 1000, T0 + 1060],
         "measurement": {**m, "value": 0.21}, "incident_id": "inc-1"},
        {"kind": "incident", "ts": T0 + 1060, "state": "opened", "incident_id": "inc-1", "deployment": "demo-scorer",
         "variant": "primary", "rule": "serving-error-rate", "severity": "critical", "version": "2",
         "version_started": T0 + 900},
        {"kind": "action", "action": "rollback", "ts": T0 + 1090, "incident_id": "inc-1", "deployment": "demo-scorer",
         "variant": "primary", "rule": "serving-error-rate", "status": "succeeded", "from_version": "2",
         "to_version": "1", "backend": "log", "detail": "logged"},
        {**base, "ts": T0 + 1600, "previous": "firing", "state": "resolved", "window": [T0 + 1540, T0 + 1600],
         "measurement": {**m, "value": 0.01}, "incident_id": "inc-1"},
    ]


def test_the_report_renders_in_headless_chromium_with_all_its_plots(tmp_path):
    chromium = _chromium()
    tap = MeasurementTap()
    for i in range(30):
        tap.measure(T0 + 60 * (i + 1), "serving-error-rate", "demo-scorer", "primary",
                    {"value": 0.005 if i < 15 or i > 25 else 0.2, "threshold": 0.05, "sample_size": 1200})
    report = write_report(_decisions(), tmp_path / "report.html", title="browser check",
                          measurements_by_rule=tap.by_rule(), png=False)

    out = _render(chromium, report.html, tmp_path / "profile", "--dump-dom")
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    dom = out.stdout.decode()
    assert "<h1>browser check</h1>" in dom, "the page did not render"
    svgs = re.findall(r"<svg\b[^>]*>", dom)
    assert len(svgs) == report.plots == 1
    assert 'class="plot measurement"' in svgs[0]
    for part in ('<polyline class="value"', 'class="threshold"', 'class="mark firing"',
                 'class="mark resolved"', 'class="rollback"'):
        assert part in dom, part

    shot = tmp_path / "report.png"
    out = _render(chromium, report.html, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1000,900")
    assert out.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
