"""The incident report: one self-contained HTML file per incident or drill.

Everything is inline (CSS, and SVG plots drawn here), there is no script, and a
Content-Security-Policy forbids any fetch, so the file opens the same on a laptop without a
network, attached to a ticket or in a browser's file:// view. What it shows:

- the incidents (the version serving when each opened, rollback outcome) and a timeline of every decision:
  alert transitions, incident changes, rollbacks, notices, approvals;
- per breached measurement (an alert that went pending or firing), its value over time with
  the threshold and clear threshold, the pending/fire/resolve points, the deploys and the
  rollback marked;
- drift incidents: each drifted feature's distribution before and after the breach;
- calibration incidents: the reliability diagram before and after.

The decision log holds only transitions. For the full series and the distributions, a
:class:`MeasurementTap` attached to the pipeline records every evaluation; without one the
report draws what the transitions carry and says so. A measurements file
(``--measurements-out``, ``rollbackd.measurements``) adds a section with every rule's series:
value and threshold over time per deployment, variant, version and slice, breaches marked, the
windows a recording ended inside shaded. PNG copies of the measurement plots (for
Slack) are written next to the HTML when matplotlib can be imported; otherwise nothing is.

Rendering reads no clock: the same decisions give the same bytes.
"""

from __future__ import annotations

import html
import json
import math
import re
import sqlite3
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rollbackd import __version__

__all__ = [
    "MeasurementTap",
    "WindowProfile",
    "Report",
    "write_report",
    "select_incident",
    "load_decisions",
    "decisions_from_ledger",
    "rule_signal",
]

Key = tuple[str, str, str]  # rule, deployment, variant

# Detectors whose incidents get before/after distributions.
_DRIFT_DETECTORS = frozenset({"drift"})
_CALIBRATION_DETECTORS = frozenset({"calibration"})


# ---------------------------------------------------------------------------------------------
# The measurement tap


@dataclass(frozen=True, slots=True)
class WindowProfile:
    """What a drift or calibration report needs of one evaluated window, kept small.

    ``numeric``: an evenly strided sample (at most ``sample_size`` values) per numeric feature;
    ``categorical``: category counts per categorical feature; ``reliability``: per equal-width
    score bin ``[count, sum of scores, sum of labels]`` of the labelled outcomes.
    """

    ts: float
    start: float
    end: float
    numeric: Mapping[str, np.ndarray] = field(default_factory=dict)
    categorical: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    reliability: np.ndarray | None = None


def _part_label(window: Any) -> str | None:
    """"version=8" or "region=eu-west" for a share of a window the pipeline split; else None."""
    if window is None:
        return None
    if window.segment is not None:
        return window.segment
    return None if window.version is None else f"version={window.version}"


class MeasurementTap:
    """Every evaluation of every rule, as the pipeline made it.

    The pipeline calls ``measure(now, rule, deployment, variant, measurement, window)`` after
    each detector evaluation (``measurement`` a ``Measurement`` or its record). The tap keeps
    the last ``max_points`` values per alert for the report's plots, the latest full record
    per alert for ``/metrics``, and, for drift and calibration rules, a small profile of the
    last ``max_profiles`` windows. Memory is bounded by those limits.

    ``config`` (the rules) tells which rules are drift or calibration rules; without it the
    evidence tells. ``profiles=False`` keeps values only (the live daemon's choice).
    """

    def __init__(
        self,
        config: Any = None,
        *,
        max_points: int = 20_000,
        profiles: bool = True,
        max_profiles: int = 240,
        sample_size: int = 400,
        reliability_bins: int = 10,
    ) -> None:
        if max_points < 1 or max_profiles < 1 or sample_size < 1 or reliability_bins < 1:
            raise ValueError("max_points, max_profiles, sample_size and reliability_bins must be >= 1")
        self.max_points = max_points
        self.profiles_enabled = profiles
        self.max_profiles = max_profiles
        self.sample_size = sample_size
        self.reliability_bins = reliability_bins
        self._detectors: dict[str, str] = {}
        if config is not None:
            self._detectors = {r.name: rule_signal(r) for r in config.rules}
        self._series: dict[Key, deque[tuple[float, float | None, float | None, int, float | None]]] = {}
        self._latest: dict[Key, tuple[float, dict[str, Any]]] = {}
        self._profiles: dict[Key, deque[WindowProfile]] = {}
        self.evaluations = 0

    def rules_changed(self, config: Any) -> None:
        """The rules were reloaded: a new rule's kind (drift, calibration) is known from now on."""
        self._detectors = {r.name: rule_signal(r) for r in config.rules}

    def measure(
        self, ts: float, rule: str, deployment: str, variant: str, measurement: Any, window: Any = None
    ) -> None:
        rec = measurement.to_record() if hasattr(measurement, "to_record") else dict(measurement)
        # One version's or one slice's share of a window has a series of its own, beside the
        # arm's; /metrics and the window profiles show whole windows (and a sliced rule's
        # verdict, which the pipeline does not pass here).
        part = _part_label(window)
        key = (rule, deployment, variant if part is None else f"{variant} {part}")
        self.evaluations += 1
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = deque(maxlen=self.max_points)
        series.append((ts, rec.get("value"), rec.get("threshold"), int(rec.get("sample_size") or 0), rec.get("p_value")))
        if part is not None:
            return
        self._latest[key] = (ts, rec)
        if not self.profiles_enabled or window is None:
            return
        kind = self._detectors.get(rule) or _kind_from_evidence(rec.get("evidence") or {})
        if kind in _DRIFT_DETECTORS:
            profile = self._feature_profile(ts, window)
        elif kind in _CALIBRATION_DETECTORS or kind == "canary:calibration":
            profile = self._reliability_profile(ts, window)
        else:
            return
        store = self._profiles.get(key)
        if store is None:
            store = self._profiles[key] = deque(maxlen=self.max_profiles)
        store.append(profile)

    def _feature_profile(self, ts: float, window: Any) -> WindowProfile:
        numeric: dict[str, np.ndarray] = {}
        categorical: dict[str, dict[str, int]] = {}
        for name in getattr(window, "feature_names", ()):
            values = window.feature(name)
            nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if nums and len(nums) >= len(values) // 2:
                arr = np.asarray(nums, dtype=float)
                arr = arr[np.isfinite(arr)]
                if arr.size > self.sample_size:  # evenly strided: deterministic and spread
                    arr = arr[np.linspace(0, arr.size - 1, self.sample_size).astype(int)]
                numeric[name] = arr.astype(np.float32)
            else:
                categorical[name] = dict(Counter(str(v) for v in values if v is not None))
        return WindowProfile(ts, window.start, window.end, numeric, categorical)

    def _reliability_profile(self, ts: float, window: Any) -> WindowProfile:
        bins = self.reliability_bins
        table = np.zeros((bins, 3))
        scores, labels = [], []
        for lab in getattr(window, "outcomes", ()):
            label = _binary(lab.label)
            if lab.score is None or label is None:
                continue
            scores.append(float(lab.score))
            labels.append(label)
        if scores:
            p = np.clip(np.asarray(scores), 0.0, 1.0)
            idx = np.minimum((p * bins).astype(int), bins - 1)
            table[:, 0] = np.bincount(idx, minlength=bins)
            table[:, 1] = np.bincount(idx, weights=p, minlength=bins)
            table[:, 2] = np.bincount(idx, weights=np.asarray(labels, dtype=float), minlength=bins)
        return WindowProfile(ts, window.start, window.end, reliability=table)

    # Readers (safe from another thread: each returns a copy made in one C-level call) ----
    def latest(self) -> dict[Key, tuple[float, dict[str, Any]]]:
        return dict(self._latest)

    def by_rule(self) -> dict[str, list[dict[str, Any]]]:
        """Every recorded evaluation, ``{rule: [{ts, deployment, variant, value, threshold,
        sample_size, p_value}, ...]}``: the ``measurements_by_rule`` of :func:`write_report`."""
        out: dict[str, list[dict[str, Any]]] = {}
        for (rule, dep, var), points in sorted(dict(self._series).items()):
            out.setdefault(rule, []).extend(
                {"ts": ts, "deployment": dep, "variant": var, "value": v, "threshold": th,
                 "sample_size": n, "p_value": p}
                for ts, v, th, n, p in list(points)
            )
        return out

    def profiles(self) -> dict[Key, list[WindowProfile]]:
        return {k: list(v) for k, v in dict(self._profiles).items()}


def rule_signal(rule: Any) -> str:
    """What a rule measures: its detector, and for ``canary`` and ``sequential`` the metric or
    signal they compare (``canary:latency``, ``sequential:model_error``)."""
    params = getattr(rule, "params", {}) or {}
    if rule.detector == "canary":
        return f"canary:{params.get('metric', 'error_rate')}"
    if rule.detector == "sequential":
        return f"sequential:{params.get('signal', 'serving_error')}"
    return str(rule.detector)


def _kind_from_evidence(evidence: Mapping[str, Any]) -> str | None:
    if "drifted" in evidence and "features" in evidence:
        return "drift"
    if "ece" in evidence and "brier" in evidence:
        return "calibration"
    return None


def _binary(label: Any) -> float | None:
    from rollbackd.detectors.model_error import binary_value

    v = binary_value(label)
    return None if v is None else float(v)


# ---------------------------------------------------------------------------------------------
# Reading decisions


def load_decisions(path: str | Path) -> list[dict[str, Any]]:
    """A decision log (JSON Lines) as a list of records."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
    return out


_KIND_ORDER = {"alert": 0, "incident": 1, "action": 2}


def decisions_from_ledger(
    db: str | Path, *, incident_id: str | None = None, run_id: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """``(run_id, decisions)`` rebuilt from a ledger, read-only.

    Without ``run_id``: the latest run that holds ``incident_id`` (or the latest run). Raises
    ``LookupError`` when there is no such run or incident.
    """
    path = Path(db)
    if not path.is_file():
        raise LookupError(f"{db}: no such ledger")
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        if run_id is None:
            if incident_id is not None:
                row = conn.execute(
                    "select run_id from incidents where incident_id = ? order by seq desc limit 1", [incident_id]
                ).fetchone()
                if row is None:
                    raise LookupError(f"{db}: no incident {incident_id}")
            else:
                row = conn.execute("select run_id from runs order by seq desc limit 1").fetchone()
                if row is None:
                    raise LookupError(f"{db}: no runs")
            run_id = row["run_id"]
        out: list[tuple[float, int, int, dict[str, Any]]] = []
        for r in conn.execute("select * from alert_transitions where run_id = ? order by seq", [run_id]):
            rec = {
                "ts": r["ts"], "kind": "alert", "alert_id": r["alert_id"], "rule": r["rule"],
                "deployment": r["deployment"], "variant": r["variant"], "previous": r["previous"],
                "state": r["state"], "severity": r["severity"], "incident_id": r["incident_id"],
                "measurement": json.loads(r["measurement"] or "{}"),
                "window": [r["window_start"], r["window_end"]],
            }
            out.append((r["ts"], 0, r["seq"], rec))
        for r in conn.execute("select * from incidents where run_id = ? order by seq", [run_id]):
            rec = {"ts": r["ts"], "kind": "incident", **json.loads(r["data"] or "{}")}
            out.append((r["ts"], 1, r["seq"], rec))
        for r in conn.execute(
            "select * from actions where run_id = ? and phase = 'finished' order by seq", [run_id]
        ):
            rec = {"ts": r["ts"], "kind": "action"}
            for col in ("action", "incident_id", "status", "rule", "deployment", "variant", "from_version",
                        "to_version", "idempotency_key", "attempts", "detail"):
                if r[col] is not None:
                    rec[col] = r[col]
            rec.update(json.loads(r["data"] or "{}"))
            out.append((r["ts"], 2, r["seq"], rec))
    except sqlite3.OperationalError as exc:
        raise LookupError(f"{db}: not a rollbackd ledger ({exc})") from None
    finally:
        conn.close()
    out.sort(key=lambda t: (t[0], t[1], t[2]))
    decisions = [t[3] for t in out]
    if incident_id is not None:
        decisions = select_incident(decisions, incident_id)
    return run_id, decisions


def select_incident(decisions: Sequence[Mapping[str, Any]], incident_id: str) -> list[dict[str, Any]]:
    """The decisions about one incident: its changes and actions, and every transition of its
    alerts from an hour before it opened (the pending that led to it) to its resolution.

    Raises ``LookupError`` when the incident is not there.
    """
    own = [d for d in decisions if d.get("incident_id") == incident_id and d.get("kind") in ("incident", "action")]
    opened = [d for d in own if d.get("kind") == "incident"]
    if not opened:
        raise LookupError(f"no incident {incident_id} in these decisions")
    start = min(d["ts"] for d in opened) - 3600.0
    resolved = [d["ts"] for d in opened if d.get("state") == "resolved"]
    end = max(resolved) if resolved else math.inf
    keys = {(d["rule"], d["deployment"], d.get("variant")) for d in decisions
            if d.get("kind") == "alert" and d.get("incident_id") == incident_id}
    keys |= {(d["rule"], d["deployment"], d.get("variant")) for d in opened if d.get("rule")}
    out = []
    for d in decisions:
        if d.get("kind") == "alert":
            if (d["rule"], d["deployment"], d.get("variant")) in keys and start <= d["ts"] <= end:
                out.append(dict(d))
        elif d.get("incident_id") == incident_id:
            out.append(dict(d))
        elif d.get("kind") not in ("alert", "incident", "action") and start <= d.get("ts", -math.inf) <= end:
            out.append(dict(d))  # approvals and other records of that time
    return out


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True, slots=True)
class Report:
    html: Path
    pngs: tuple[Path, ...] = ()
    plots: int = 0  # SVG figures in the HTML


@dataclass(slots=True)
class _Alert:
    key: Key
    transitions: list[dict[str, Any]]
    threshold: float | None = None
    clear: float | None = None
    direction: str = "above"
    detector: str | None = None
    window: float | None = None


def write_report(
    decisions: Sequence[Mapping[str, Any]],
    out_path: str | Path,
    *,
    title: str,
    measurements_by_rule: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    profiles: Mapping[Key, Sequence[WindowProfile]] | None = None,
    config: Any = None,
    png: bool = True,
    measurements: Sequence[Mapping[str, Any]] | None = None,
) -> Report:
    """Write the report of ``decisions`` (records of the decision log) to ``out_path``.

    ``measurements_by_rule`` (``MeasurementTap.by_rule()``) gives every evaluation; without it
    the plots show the transitions' measurements only. ``profiles``
    (``MeasurementTap.profiles()``) gives the before/after distributions. ``config`` (the
    rules) adds clear thresholds and directions. PNGs of the measurement plots are written
    beside the HTML when ``png`` and matplotlib is importable. ``measurements`` (the records of
    a measurements file, ``measurements.load_measurements``) adds every rule's series.
    """
    out = Path(out_path)
    decisions = [dict(d) for d in decisions]
    rules = {r.name: r for r in config.rules} if config is not None else {}
    alerts = _breached_alerts(decisions, rules)
    if measurements_by_rule is None and measurements:
        measurements_by_rule = _by_rule(measurements)
    series = _series(measurements_by_rule)
    profiles = profiles or {}
    deploys = _deploys(decisions)
    rollbacks = [d for d in decisions if d.get("kind") == "action" and d.get("action") == "rollback"]

    body: list[str] = [f"<h1>{_e(title)}</h1>", _summary(decisions)]
    figures: list[tuple[str, dict[str, Any]]] = []  # (slug, plot data) for PNGs
    n_plots = 0
    if alerts:
        body.append("<h2>Breached measurements</h2>")
        if series is None:
            body.append(
                '<p class="note">Only alert transitions were recorded (no measurement tap): each '
                "point is a measurement at which the alert changed state.</p>"
            )
    for alert in alerts:
        points = (series or {}).get(alert.key)
        from_tap = bool(points)
        if not points:
            points = [
                (d["ts"], (d.get("measurement") or {}).get("value")) for d in alert.transitions
            ]
        data = _plot_data(alert, points, deploys, rollbacks, from_tap)
        body.append(_figure(alert, data))
        figures.append((_slug("-".join(alert.key)), data))
        n_plots += 1
        extra, k = _distributions(alert, profiles.get(alert.key, ()))
        body.append(extra)
        n_plots += k
    if measurements:
        section, k = _evaluations_section(measurements, rules)
        body.append(section)
        n_plots += k
    body.append(_timeline(decisions))
    body.append(
        f'<footer>rollbackd {_e(__version__)} · {len(decisions)} decisions · times are event '
        "time, UTC</footer>"
    )
    doc = _page(title, "\n".join(body))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    pngs = tuple(_write_pngs(out, figures)) if png else ()
    return Report(out, pngs, n_plots)


def _series(by_rule: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> dict[Key, list[tuple[float, float | None]]] | None:
    if not by_rule:
        return None
    out: dict[Key, list[tuple[float, float | None]]] = {}
    for rule, points in by_rule.items():
        for p in points:
            out.setdefault((rule, p["deployment"], p["variant"]), []).append((float(p["ts"]), p.get("value")))
    for pts in out.values():
        pts.sort(key=lambda t: t[0])
    return out


def _breached_alerts(decisions: list[dict[str, Any]], rules: Mapping[str, Any]) -> list[_Alert]:
    by_key: dict[Key, list[dict[str, Any]]] = {}
    for d in decisions:
        if d.get("kind") == "alert":
            by_key.setdefault((d["rule"], d["deployment"], d["variant"]), []).append(d)
    out = []
    for key, trans in by_key.items():
        if not any(t.get("state") in ("pending", "firing") for t in trans):
            continue
        a = _Alert(key, trans)
        for t in trans:
            th = (t.get("measurement") or {}).get("threshold")
            if th is not None:
                a.threshold = float(th)
                break
        spec = rules.get(key[0])
        if spec is not None:
            a.threshold = spec.threshold
            a.clear = spec.clear
            a.direction = spec.direction
            a.detector = rule_signal(spec)
            a.window = spec.window.size
        else:
            ev = next(((t.get("measurement") or {}).get("evidence") for t in trans if (t.get("measurement") or {}).get("evidence")), None)
            a.detector = _kind_from_evidence(ev or {})
        w = trans[0].get("window")
        if a.window is None and w and w[0] is not None and w[1] is not None:
            a.window = float(w[1]) - float(w[0])
        out.append(a)
    return out


def _deploys(decisions: list[dict[str, Any]]) -> list[tuple[float, str, str, str]]:
    """(started, deployment, variant, version) of the versions incidents opened against."""
    seen = set()
    out = []
    for d in decisions:
        if d.get("kind") == "incident" and d.get("state") == "opened" and d.get("version_started") is not None:
            item = (float(d["version_started"]), d["deployment"], d.get("variant") or "", str(d.get("version")))
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


# ---------------------------------------------------------------------------------------------
# Page


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:24px auto;max-width:980px;padding:0 16px}
h1{font-size:22px;margin:0 0 12px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceff4;vertical-align:top}
th{background:#f4f6f9;font-weight:600}td.t{white-space:nowrap;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 6px;border-radius:3px;font-size:12px;font-weight:600;color:#fff;background:#6b7280}
.alert{background:#b45309}.incident{background:#7c3aed}.rollback{background:#b91c1c}.notify{background:#2563eb}.approval{background:#047857}
.firing{color:#b91c1c;font-weight:600}.resolved{color:#047857;font-weight:600}.pending{color:#b45309}
.note{color:#5b6475;font-size:13px}.card{border:1px solid #dde1e8;border-radius:6px;padding:8px 12px;margin:8px 0}
figure{margin:12px 0}figcaption{font-size:13px;color:#5b6475}
svg{background:#fff;max-width:100%;height:auto}svg text{font:11px system-ui,sans-serif;fill:#374151}
footer{margin-top:32px;color:#8a93a3;font-size:12px}
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _utc(ts: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if ts is None or not math.isfinite(ts):
        return "n/a"
    return datetime.fromtimestamp(ts, timezone.utc).strftime(fmt)


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (int, float)):
        return f"{x:.{digits}g}"
    return str(x)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "plot"


def _summary(decisions: list[dict[str, Any]]) -> str:
    incidents: dict[str, list[dict[str, Any]]] = {}
    for d in decisions:
        if d.get("incident_id") and d.get("kind") in ("incident", "action"):
            incidents.setdefault(d["incident_id"], []).append(d)
    fired = sum(1 for d in decisions if d.get("kind") == "alert" and d.get("state") == "firing")
    if not incidents:
        return f'<p class="card">No incident. {fired} alert(s) fired.</p>'
    parts = [f"<h2>Incidents ({len(incidents)})</h2>"]
    for inc_id, recs in incidents.items():
        opened = next((r for r in recs if r.get("kind") == "incident" and r.get("state") == "opened"), None)
        resolved = next((r for r in recs if r.get("kind") == "incident" and r.get("state") == "resolved"), None)
        rules = sorted({r["rule"] for r in recs if r.get("kind") == "incident" and r.get("rule")})
        rbs = [r for r in recs if r.get("kind") == "action" and r.get("action") == "rollback"]
        sev = (opened or recs[0]).get("severity", "")
        rows = [
            ("deployment", f"{recs[0].get('deployment')}/{(opened or recs[0]).get('variant')}"),
            ("severity", sev),
            ("opened", _utc(opened["ts"]) if opened else "before these decisions"),
            ("resolved", _utc(resolved["ts"]) if resolved else "still open"),
            ("alerts", ", ".join(rules) or "n/a"),
        ]
        if opened and opened.get("version") is not None:
            started = opened.get("version_started")
            prov = opened.get("provenance")
            v = f"{opened['version']} (serving since {_utc(started)})" if started is not None else str(opened["version"])
            if prov:
                v += " · " + ", ".join(f"{k}={val}" for k, val in sorted(prov.items()))
            rows.append(("version serving", v))
        for rb in rbs:
            rows.append((
                "rollback",
                f"{rb.get('from_version')} → {rb.get('to_version')}: {rb.get('status')} at {_utc(rb['ts'])}"
                + (f" ({rb.get('detail')})" if rb.get("detail") else ""),
            ))
        if not rbs:
            rows.append(("rollback", "none"))
        table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
        parts.append(f'<div class="card"><h3>{_e(inc_id)}</h3><table>{table}</table></div>')
    return "\n".join(parts)


def _timeline(decisions: list[dict[str, Any]]) -> str:
    rows = []
    for d in decisions:
        kind, what, detail = _describe(d)
        rows.append(
            f'<tr><td class="t">{_e(_utc(d.get("ts")))}</td><td><span class="badge {kind}">{_e(kind)}</span></td>'
            f"<td>{what}</td><td>{_e(detail)}</td></tr>"
        )
    if not rows:
        return "<h2>Timeline</h2><p class=\"note\">No decisions.</p>"
    return (
        "<h2>Timeline</h2><table class=\"timeline\"><thead><tr><th>time (UTC)</th><th></th><th>what</th>"
        f"<th>detail</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _describe(d: Mapping[str, Any]) -> tuple[str, str, str]:
    """(badge class, what as HTML, detail as text) of one decision."""
    kind = d.get("kind")
    where = f"{d.get('deployment')}/{d.get('variant')}"
    if kind == "alert":
        m = d.get("measurement") or {}
        state = str(d.get("state"))
        what = (f"{_e(d.get('rule'))} {_e(where)}: {_e(d.get('previous'))} → "
                f'<span class="{_e(state)}">{_e(state)}</span>')
        detail = f"value {_num(m.get('value'))} vs threshold {_num(m.get('threshold'))}, n={m.get('sample_size')}"
        if m.get("p_value") is not None:
            detail += f", p={_num(m.get('p_value'), 3)}"
        if d.get("suppressed"):
            s = d["suppressed"]
            detail += f"; muted by {s.get('by')}" + (f" ({s.get('reason')})" if s.get("reason") else "")
        return "alert", what, detail
    if kind == "incident":
        what = f"{_e(d.get('incident_id'))} {_e(d.get('state'))}"
        detail = f"{where}, severity {d.get('severity')}"
        if d.get("rule"):
            detail += f", rule {d['rule']}"
        if d.get("version") is not None:
            detail += f", version {d['version']} serving"
        return "incident", what, detail
    if kind == "action" and d.get("action") == "rollback":
        what = f"rollback {_e(where)} {_e(d.get('from_version'))} → {_e(d.get('to_version'))}: <b>{_e(d.get('status'))}</b>"
        return "rollback", what, str(d.get("detail") or "")
    if kind == "action" and d.get("action") == "notify":
        what = f"notice {_e(d.get('notice'))}: {_e(d.get('status'))}"
        return "notify", what, str(d.get("reason") or d.get("detail") or "")
    label = "approval" if (kind == "approval" or d.get("action") in ("approve", "approval")) else "other"
    what = _e(" ".join(str(d.get(k)) for k in ("kind", "action", "state", "status") if d.get(k)))
    rest = {k: v for k, v in d.items() if k not in ("ts", "kind")}
    return label, what, json.dumps(rest, sort_keys=True, default=str)[:400]


# ---------------------------------------------------------------------------------------------
# Plots


@dataclass(slots=True)
class _Axis:
    lo: float
    hi: float
    a: float  # pixel of lo
    b: float  # pixel of hi

    def __call__(self, v: float) -> float:
        if self.hi == self.lo:
            return (self.a + self.b) / 2
        return self.a + (v - self.lo) * (self.b - self.a) / (self.hi - self.lo)


_W, _H = 760, 280
_ML, _MR, _MT, _MB = 64, 16, 30, 40


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


_TIME_STEPS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _time_ticks(lo: float, hi: float, n: int = 8) -> list[float]:
    span = max(hi - lo, 1.0)
    step = next((s for s in _TIME_STEPS if span / s <= n), 86400 * math.ceil(span / (86400 * n)))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) // step) + 1)]


def _plot_data(
    alert: _Alert,
    points: list[tuple[float, float | None]],
    deploys: list[tuple[float, str, str, str]],
    rollbacks: list[dict[str, Any]],
    from_tap: bool,
) -> dict[str, Any]:
    rule, dep, var = alert.key
    marks = [(t["ts"], t.get("state"), (t.get("measurement") or {}).get("value")) for t in alert.transitions]
    rbs = [(r["ts"], f"rollback {r.get('from_version')}→{r.get('to_version')} {r.get('status')}")
           for r in rollbacks if r.get("deployment") == dep and r.get("variant") in (var, None)]
    deps = [(t, f"v{v} deployed") for t, d, vv, v in deploys if d == dep and vv in (var, "")]
    # A very long series (a live ledger over days) is cut to the alert's episodes ± 1 hour.
    lo = min([p[0] for p in points] + [m[0] for m in marks])
    hi = max([p[0] for p in points] + [m[0] for m in marks])
    if hi - lo > 6 * 3600:
        lo = max(lo, min(m[0] for m in marks) - 3600)
        hi = min(hi, max(m[0] for m in marks) + 3600)
        points = [p for p in points if lo <= p[0] <= hi]
    if alert.window:
        lo = min(lo, min(m[0] for m in marks) - alert.window)
    for t, _ in rbs + deps:
        if lo - 600 <= t <= hi + 600:
            lo, hi = min(lo, t), max(hi, t)
    return {
        "title": f"{rule} on {dep}/{var}",
        "rule": rule, "deployment": dep, "variant": var,
        "points": points, "marks": marks, "threshold": alert.threshold,
        "clear": alert.clear if alert.clear != alert.threshold else None,
        "direction": alert.direction, "rollbacks": [r for r in rbs if lo <= r[0] <= hi],
        "deploys": [d for d in deps if lo <= d[0] <= hi], "lo": lo, "hi": hi, "from_tap": from_tap,
    }


_MARK_STYLE = {
    "pending": ("#d97706", "pending"),
    "firing": ("#dc2626", "fired"),
    "resolved": ("#059669", "resolved"),
    "inactive": ("#6b7280", "cancelled"),
}


def _frame(kind: str, data: dict[str, Any], ys: list[float]) -> tuple[_Axis, _Axis, list[str]]:
    """A plot's axes (event time ``data["lo"]``..``data["hi"]``, the values ``ys`` with a
    margin) and its opening SVG: the frame (elements that go under the grid are inserted at
    index 3), the value grid, the time ticks and the time axis' label."""
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (y_hi - y_lo) * 0.1 or abs(y_hi) * 0.1 or 1.0
    y_lo = 0.0 if y_lo >= 0 and y_lo - pad < 0 else y_lo - pad
    y_hi += pad
    x = _Axis(data["lo"], data["hi"], _ML, _W - _MR)
    y = _Axis(y_lo, y_hi, _H - _MB, _MT)
    s: list[str] = [
        f'<svg class="plot {kind}" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(data["title"])}">',
        f'<title>{_e(data["title"])}</title>',
        f'<rect x="{_ML}" y="{_MT}" width="{_W - _ML - _MR}" height="{_H - _MT - _MB}" fill="#fbfcfd" stroke="#d5dae2"/>',
    ]
    for v in _nice_ticks(y_lo, y_hi):
        if y_lo <= v <= y_hi:
            s.append(f'<line x1="{_ML}" x2="{_W - _MR}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eceff4"/>'
                     f'<text x="{_ML - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_e(_num(v, 3))}</text>')
    for t in _time_ticks(data["lo"], data["hi"]):
        if data["lo"] <= t <= data["hi"]:
            s.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_H - _MB}" y2="{_H - _MB + 4}" stroke="#9aa3b2"/>'
                     f'<text x="{x(t):.1f}" y="{_H - _MB + 16}" text-anchor="middle">{_utc(t, "%H:%M")}</text>')
    s.append(f'<text x="{(_ML + _W - _MR) / 2}" y="{_H - 6}" text-anchor="middle">event time (UTC) · '
             f'{_utc(data["lo"], "%Y-%m-%d")}</text>')
    return x, y, s


def _value_line(points: list[tuple[float, float]], x: _Axis, y: _Axis, dash: str = "") -> list[str]:
    """The value through consecutive evaluations; a gap where there was no verdict."""
    return _svg_runs(
        points, x, y,
        lambda cx, cy: f'<circle class="value" cx="{cx:.1f}" cy="{cy:.1f}" r="2" fill="#1f2937"/>',
        lambda pts: f'<polyline class="value" points="{pts}" fill="none" stroke="#1f2937" stroke-width="1.5"{dash}/>')


def _svg_runs(points: list[tuple[float, float | None]], x: _Axis, y: _Axis,
              single: Callable[[float, float], str], line: Callable[[str], str]) -> list[str]:
    """A series drawn run by run (a gap where a value is missing): ``single(cx, cy)`` for a run
    of one point, ``line(points)`` (SVG ``points`` text) for a longer one."""
    out = []
    for run in _runs(points):
        if len(run) == 1:
            t, v = run[0]
            out.append(single(x(t), y(v)))
        else:
            out.append(line(" ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in run)))
    return out


def _figure(alert: _Alert, data: dict[str, Any]) -> str:
    values = [v for _, v in data["points"] if v is not None] + [v for _, _, v in data["marks"] if v is not None]
    lines = [x for x in (data["threshold"], data["clear"]) if x is not None]
    x, y, s = _frame("measurement", data, values + lines)
    # Episodes: pending → firing → resolved, shaded (under the grid).
    s[3:3] = [f'<rect class="episode" x="{x(a):.1f}" y="{_MT}" width="{max(x(b) - x(a), 1):.1f}" '
              f'height="{_H - _MT - _MB}" fill="{colour}" fill-opacity="0.08"/>'
              for a, b, colour in _episodes(data["marks"], data["hi"])]
    if data["threshold"] is not None:
        ty = y(data["threshold"])
        s.append(f'<line class="threshold" x1="{_ML}" x2="{_W - _MR}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#dc2626" stroke-dasharray="6 4"/>'
                 f'<text x="{_W - _MR - 4}" y="{ty - 4:.1f}" text-anchor="end" style="fill:#dc2626">threshold {_e(_num(data["threshold"]))}</text>')
    if data["clear"] is not None:
        cy = y(data["clear"])
        s.append(f'<line class="clear-threshold" x1="{_ML}" x2="{_W - _MR}" y1="{cy:.1f}" y2="{cy:.1f}" stroke="#d97706" stroke-dasharray="2 3"/>'
                 f'<text x="{_W - _MR - 4}" y="{cy + 12:.1f}" text-anchor="end" style="fill:#b45309">clears at {_e(_num(data["clear"]))}</text>')
    for t, label in data["deploys"]:
        s.append(f'<g class="deploy"><line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_MT}" y2="{_H - _MB}" stroke="#7c3aed" stroke-dasharray="3 3"/>'
                 f'{_label(x(t), _MT + 11, label, "#7c3aed")}</g>')
    # The value: a line through consecutive evaluations; a gap where there was no verdict.
    dash = "" if data["from_tap"] else ' stroke-dasharray="4 3"'
    s.extend(_value_line(data["points"], x, y, dash))
    for t, label in data["rollbacks"]:
        s.append(f'<g class="rollback"><line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_MT}" y2="{_H - _MB}" stroke="#b91c1c" stroke-width="2"/>'
                 f'{_label(x(t), _MT + 24, label, "#b91c1c")}'
                 f"<title>{_e(label)} at {_utc(t)}</title></g>")
    for t, state, v in data["marks"]:
        colour, label = _MARK_STYLE.get(str(state), ("#374151", str(state)))
        cy = y(v) if v is not None else _MT + 6
        shape = (f'<circle cx="{x(t):.1f}" cy="{cy:.1f}" r="5" fill="{colour}" stroke="#fff"/>'
                 if state in ("firing", "resolved") else
                 f'<rect x="{x(t) - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" fill="{colour}" stroke="#fff"/>')
        s.append(f'<g class="mark {_e(state)}">{shape}<title>{_e(label)} at {_utc(t)}: value {_e(_num(v))}</title></g>')
    s.append(_legend(data))
    s.append("</svg>")
    source = ("every evaluation" if data["from_tap"] else "alert transitions only")
    caption = (f"{_e(data['title'])}: value over time ({source}); threshold "
               f"{_e(_num(data['threshold']))} ({_e(data['direction'])})")
    if data["clear"] is not None:
        caption += f", clears at {_e(_num(data['clear']))}"
    return f'<figure>{"".join(s)}<figcaption>{caption}</figcaption></figure>'


def _label(px: float, py: float, text: str, colour: str) -> str:
    """A label beside a vertical marker: to its right, or to its left near the right edge;
    a white halo keeps it readable over the curve."""
    right = px + 7 * len(text) + 6 < _W - _MR
    anchor, dx = ("start", 3) if right else ("end", -3)
    return (f'<text x="{px + dx:.1f}" y="{py}" text-anchor="{anchor}" '
            f'style="fill:{colour};paint-order:stroke;stroke:#fff;stroke-width:3px">{_e(text)}</text>')


def _legend(data: dict[str, Any]) -> str:
    items = [("#1f2937", "value"), ("#dc2626", "threshold")]
    if data["clear"] is not None:
        items.append(("#d97706", "clear threshold"))
    items += [("#d97706", "■ pending"), ("#dc2626", "● fired"), ("#059669", "● resolved")]
    if data["rollbacks"]:
        items.append(("#b91c1c", "| rollback"))
    return _legend_row(items)


def _legend_row(items: list[tuple[str, str]]) -> str:
    """A plot's legend: each (colour, label) in a row above the frame."""
    out, xpos = ['<g class="legend">'], _ML
    for colour, label in items:
        out.append(f'<text x="{xpos}" y="{_MT - 10}" style="fill:{colour}">{_e(label)}</text>')
        xpos += 12 + 7 * len(label)
    out.append("</g>")
    return "".join(out)


def _runs(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    runs: list[list[tuple[float, float]]] = [[]]
    for t, v in points:
        if v is None or not math.isfinite(v):
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((t, float(v)))
    return [r for r in runs if r]


def _episodes(marks: list[tuple[float, Any, Any]], end: float) -> list[tuple[float, float, str]]:
    out = []
    start: float | None = None
    firing_at: float | None = None
    for t, state, _ in marks:
        if state == "pending":
            start = t if start is None else start
        elif state == "firing":
            start = t if start is None else start
            if start < t:
                out.append((start, t, "#d97706"))
            firing_at, start = t, None
        elif state == "inactive" and start is not None:
            out.append((start, t, "#d97706"))
            start = None
        elif state == "resolved" and firing_at is not None:
            out.append((firing_at, t, "#dc2626"))
            firing_at = None
    if firing_at is not None:
        out.append((firing_at, end, "#dc2626"))
    if start is not None:
        out.append((start, end, "#d97706"))
    return out


# Every evaluation (a measurements file) -----------------------------------------------------

# A figure per series, at most this many (the busiest first); a series longer than
# _MAX_POINTS is drawn from the lowest and highest value of each of _MAX_POINTS / 2 spans of
# time, so a spike survives. Breaches are always drawn.
_MAX_SERIES = 120
_MAX_POINTS = 2000

SeriesKey = tuple[str, str, str, str, str]  # rule, deployment, variant, version, slice


def _by_rule(records: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A measurements file's evaluations as :meth:`MeasurementTap.by_rule` gives them."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("verdict") != "not_evaluated":
            out.setdefault(str(r["rule"]), []).append(
                {"ts": r["ts"], "deployment": r["deployment"], "variant": r["variant"], "value": _finite(r.get("value"))})
    return out


def _evaluations_section(records: Sequence[Mapping[str, Any]], rules: Mapping[str, Any]) -> tuple[str, int]:
    series: dict[SeriesKey, list[Mapping[str, Any]]] = {}
    trailing: dict[Key, list[tuple[float, float]]] = {}
    for r in records:
        if r.get("verdict") == "not_evaluated":
            start, end = r.get("window_start_epoch"), r.get("window_end_epoch")
            if start is not None and end is not None:
                trailing.setdefault((r["rule"], r["deployment"], r["variant"]), []).append((float(start), float(end)))
            continue
        key = (str(r["rule"]), str(r["deployment"]), str(r["variant"]), str(r.get("version") or ""),
               str(r.get("slice") or ""))
        series.setdefault(key, []).append(r)
    parts = [f"<h2>Every evaluation ({len(records):,} records)</h2>",
             '<p class="note">Each rule\'s measured value and threshold at every window boundary, per '
             "deployment, variant, version and slice: red dots are breaching evaluations, gaps are windows "
             "without a verdict (insufficient data), grey spans windows the recording ended inside "
             "(not evaluated).</p>"]
    keys = sorted(series)
    if len(keys) > _MAX_SERIES:
        busiest = sorted(keys, key=lambda k: (-len(series[k]), k))[:_MAX_SERIES]
        parts.append(f'<p class="note">{len(keys)} series; the {_MAX_SERIES} with the most evaluations are '
                     "drawn.</p>")
        keys = sorted(busiest)
    # A trailing window is drawn with the series that was still being evaluated at the end.
    last: dict[Key, SeriesKey] = {}
    for key in sorted(series, key=lambda k: (max(float(r["ts"]) for r in series[k]), k)):
        last[key[:3]] = key
    for key in keys:
        spec = rules.get(key[0])
        spans = trailing.get(key[:3], []) if last.get(key[:3]) == key else []
        parts.append(_series_figure(_series_data(key, series[key], spans, spec)))
    untouched = sorted(set(trailing) - {k[:3] for k in series})
    for rule, dep, var in untouched:
        spans = ", ".join(f"{_utc(a)} to {_utc(b)}" for a, b in trailing[(rule, dep, var)])
        parts.append(f'<p class="note">{_e(rule)} on {_e(dep)}/{_e(var)}: never evaluated; not evaluated: {_e(spans)}</p>')
    return "\n".join(parts), len(keys)


def _series_data(key: SeriesKey, recs: list[Mapping[str, Any]], trailing: list[tuple[float, float]],
                 spec: Any) -> dict[str, Any]:
    recs = sorted(recs, key=lambda r: float(r["ts"]))
    points = [(float(r["ts"]), _finite(r.get("value"))) for r in recs]
    thresholds = [(float(r["ts"]), t) for r in recs if (t := _finite(r.get("threshold"))) is not None]
    breaches = [(float(r["ts"]), v) for r in recs if r.get("verdict") == "breach" and (v := _finite(r.get("value"))) is not None]
    counts = Counter(str(r.get("verdict")) for r in recs)
    drawn = _thin(points)
    lo = min([p[0] for p in points] + [a for a, _ in trailing])
    hi = max([p[0] for p in points] + [b for _, b in trailing])
    rule, dep, var, version, slice_ = key
    title = f"{rule} on {dep}/{var}" + (f" · version {version}" if version else "") + (f" · {slice_}" if slice_ else "")
    return {
        "title": title, "points": drawn, "thresholds": _thin(thresholds), "breaches": breaches,
        "trailing": trailing, "lo": lo, "hi": hi, "counts": counts, "n": len(recs), "thinned": len(drawn) < len(points),
        "direction": getattr(spec, "direction", None), "clear": getattr(spec, "clear", None),
    }


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _thin(points: list[tuple[float, float | None]]) -> list[tuple[float, float | None]]:
    """At most about ``_MAX_POINTS`` points: each span's lowest and highest value, in time order
    (a gap, a value of None, is kept where a span has one)."""
    if len(points) <= _MAX_POINTS:
        return points
    buckets = _MAX_POINTS // 2
    lo, hi = points[0][0], points[-1][0]
    width = (hi - lo) / buckets or 1.0
    spans: dict[int, list[tuple[float, float | None]]] = {}
    for p in points:
        spans.setdefault(min(int((p[0] - lo) / width), buckets - 1), []).append(p)
    out: list[tuple[float, float | None]] = []
    for i in sorted(spans):
        span = spans[i]
        values = [(p[1], p) for p in span if p[1] is not None]
        keep = {min(values)[1], max(values)[1]} if values else set()
        if len(values) < len(span):
            keep.add(next(p for p in span if p[1] is None))
        out.extend(sorted(keep, key=lambda p: p[0]))
    return out


def _series_figure(data: dict[str, Any]) -> str:
    values = [v for _, v in data["points"] if v is not None] + [v for _, v in data["breaches"]]
    ths = [v for _, v in data["thresholds"] if v is not None]
    clear = data["clear"] if data["clear"] is not None and ths and data["clear"] != ths[-1] else None
    x, y, s = _frame("series", data, values + ths + ([clear] if clear is not None else []))
    s[3:3] = [f'<rect class="not-evaluated" x="{x(a):.1f}" y="{_MT}" width="{max(x(b) - x(a), 1):.1f}" '
              f'height="{_H - _MT - _MB}" fill="#9ca3af" fill-opacity="0.25"><title>not evaluated: '
              f'{_utc(a)} to {_utc(b)} (the recording ended inside this window)</title></rect>'
              for a, b in data["trailing"]]
    # The threshold as each evaluation had it (a canary's or a relative rule's may move).
    s += _svg_runs(
        data["thresholds"], x, y,
        lambda cx, cy: f'<line class="threshold" x1="{cx - 3:.1f}" x2="{cx + 3:.1f}" y1="{cy:.1f}" y2="{cy:.1f}" stroke="#dc2626"/>',
        lambda pts: f'<polyline class="threshold" points="{pts}" fill="none" stroke="#dc2626" stroke-dasharray="6 4"/>')
    if clear is not None:
        cy = y(clear)
        s.append(f'<line class="clear-threshold" x1="{_ML}" x2="{_W - _MR}" y1="{cy:.1f}" y2="{cy:.1f}" stroke="#d97706" stroke-dasharray="2 3"/>')
    s.extend(_value_line(data["points"], x, y))
    for t, v in data["breaches"]:
        s.append(f'<circle class="breach" cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="#dc2626">'
                 f"<title>breach at {_utc(t)}: value {_e(_num(v))}</title></circle>")
    items = [("#1f2937", "value"), ("#dc2626", "threshold"), ("#dc2626", "● breach")]
    if clear is not None:
        items.append(("#d97706", "clear threshold"))
    if data["trailing"]:
        items.append(("#6b7280", "■ not evaluated"))
    s.append(_legend_row(items))
    s.append("</svg>")
    c = data["counts"]
    caption = (f"{_e(data['title'])}: {data['n']:,} evaluations, {c.get('breach', 0):,} breaching, "
               f"{c.get('ok', 0):,} not, {c.get('insufficient', 0):,} without a verdict")
    if data["direction"]:
        caption += f"; breaching {_e(data['direction'])} the threshold"
    if data["thinned"]:
        caption += f"; drawn from each span's lowest and highest value ({len(data['points']):,} points)"
    return f'<figure class="series">{"".join(s)}<figcaption>{caption}</figcaption></figure>'


# Distributions -------------------------------------------------------------------------------


def _before_after(alert: _Alert, profiles: Sequence[WindowProfile], n: int = 10) -> tuple[list[WindowProfile], list[WindowProfile]]:
    breach = next((t for t in alert.transitions if t.get("state") in ("pending", "firing")), None)
    if breach is None:
        return [], []
    w = breach.get("window") or [breach["ts"], breach["ts"]]
    start = float(w[0]) if w[0] is not None else breach["ts"]
    resolved = next((t["ts"] for t in alert.transitions if t["ts"] > breach["ts"] and t.get("state") in ("resolved", "inactive")), math.inf)
    # Sliding windows overlap: keep only windows that do not, so no event counts twice.
    before: list[WindowProfile] = []
    for p in reversed(profiles):
        if p.end <= start and (not before or p.end <= before[-1].start):
            before.append(p)
            if len(before) == n:
                break
    after: list[WindowProfile] = []
    for p in profiles:
        if breach["ts"] <= p.ts <= resolved and (not after or p.start >= after[-1].end):
            after.append(p)
            if len(after) == n:
                break
    return before[::-1], after


def _distributions(alert: _Alert, profiles: Sequence[WindowProfile]) -> tuple[str, int]:
    det = alert.detector or ""
    if det in _DRIFT_DETECTORS:
        return _drift_section(alert, profiles)
    if det in _CALIBRATION_DETECTORS or det == "canary:calibration":
        return _calibration_section(alert, profiles)
    return "", 0


def _drift_section(alert: _Alert, profiles: Sequence[WindowProfile]) -> tuple[str, int]:
    fired = next((t for t in alert.transitions if t.get("state") == "firing"), alert.transitions[0])
    ev = (fired.get("measurement") or {}).get("evidence") or {}
    drifted = list(ev.get("drifted") or [])
    parts = [f"<h3>Feature distributions: {_e(alert.key[0])} on {_e(alert.key[1])}/{_e(alert.key[2])}</h3>"]
    plots = 0
    before, after = _before_after(alert, profiles)
    if before and after:
        names = drifted or sorted({*before[-1].numeric, *before[-1].categorical})
        for name in names:
            b_num = [p.numeric[name] for p in before if name in p.numeric]
            a_num = [p.numeric[name] for p in after if name in p.numeric]
            if b_num and a_num:
                parts.append(_histogram(name, np.concatenate(b_num), np.concatenate(a_num), len(before), len(after)))
                plots += 1
                continue
            b_cat: Counter[str] = Counter()
            a_cat: Counter[str] = Counter()
            for p in before:
                b_cat.update(p.categorical.get(name, {}))
            for p in after:
                a_cat.update(p.categorical.get(name, {}))
            if b_cat and a_cat:
                parts.append(_bars(name, b_cat, a_cat, len(before), len(after)))
                plots += 1
    elif profiles:
        parts.append('<p class="note">Not enough windows before and after the breach for distributions.</p>')
    if ev.get("features"):
        parts.append(_effects(ev))
        plots += 1
    if plots == 0:
        return "", 0
    if not (before and after):
        parts.append('<p class="note">Distributions before and after need the measurement tap; shown: '
                     "each feature's test at the moment the alert fired.</p>")
    return "\n".join(parts), plots


def _hist_frame(title: str) -> list[str]:
    return [
        f'<svg class="plot histogram" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="220" viewBox="0 0 {_W} 220" role="img" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        f'<rect x="{_ML}" y="{_MT}" width="{_W - _ML - _MR}" height="{220 - _MT - _MB}" fill="#fbfcfd" stroke="#d5dae2"/>',
        f'<text x="{_ML}" y="{_MT - 10}" style="fill:#2563eb">■ before</text>'
        f'<text x="{_ML + 80}" y="{_MT - 10}" style="fill:#ea580c">■ after</text>'
        f'<text x="{_W - _MR}" y="{_MT - 10}" text-anchor="end">{_e(title)}</text>',
    ]


def _histogram(name: str, before: np.ndarray, after: np.ndarray, nb: int, na: int) -> str:
    both = np.concatenate([before, after]).astype(float)
    lo, hi = np.quantile(both, [0.005, 0.995])
    if not hi > lo:
        lo, hi = float(both.min()) - 0.5, float(both.max()) + 0.5
    edges = np.linspace(lo, hi, 31)
    hb = np.histogram(np.clip(before, lo, hi), edges)[0] / max(before.size, 1)
    ha = np.histogram(np.clip(after, lo, hi), edges)[0] / max(after.size, 1)
    h = 220
    x = _Axis(float(lo), float(hi), _ML, _W - _MR)
    y = _Axis(0.0, float(max(hb.max(), ha.max()) * 1.1 or 1.0), h - _MB, _MT)
    s = _hist_frame(f"{name}: share of values per bin, {nb} windows before vs {na} after")
    for hist, colour, cls in ((hb, "#2563eb", "before"), (ha, "#ea580c", "after")):
        for i, v in enumerate(hist):
            if v > 0:
                s.append(f'<rect class="bar {cls}" x="{x(edges[i]):.1f}" y="{y(v):.1f}" width="{max(x(edges[i + 1]) - x(edges[i]) - 1, 1):.1f}" '
                         f'height="{y(0) - y(v):.1f}" fill="{colour}" fill-opacity="0.45"/>')
    for t in _nice_ticks(float(lo), float(hi), 6):
        if lo <= t <= hi:
            s.append(f'<text x="{x(t):.1f}" y="{h - _MB + 16}" text-anchor="middle">{_e(_num(t, 3))}</text>')
    s.append(f'<text x="{(_ML + _W - _MR) / 2}" y="{h - 6}" text-anchor="middle">{_e(name)} · mean before {_num(float(before.mean()))}, after {_num(float(after.mean()))}</text>')
    s.append("</svg>")
    return f'<figure>{"".join(s)}</figure>'


def _bars(name: str, before: Counter[str], after: Counter[str], nb: int, na: int) -> str:
    cats = sorted(set(before) | set(after), key=lambda c: (-(before[c] + after[c]), c))[:20]
    tb, ta = sum(before.values()) or 1, sum(after.values()) or 1
    h = 220
    top = max(max(before[c] / tb, after[c] / ta) for c in cats) * 1.1 or 1.0
    y = _Axis(0.0, top, h - _MB, _MT)
    slot = (_W - _ML - _MR) / max(len(cats), 1)
    s = _hist_frame(f"{name}: share per category, {nb} windows before vs {na} after")
    for i, c in enumerate(cats):
        x0 = _ML + i * slot
        for j, (share, colour, cls) in enumerate(((before[c] / tb, "#2563eb", "before"), (after[c] / ta, "#ea580c", "after"))):
            s.append(f'<rect class="bar {cls}" x="{x0 + 4 + j * (slot - 8) / 2:.1f}" y="{y(share):.1f}" width="{max((slot - 8) / 2 - 1, 1):.1f}" '
                     f'height="{y(0) - y(share):.1f}" fill="{colour}" fill-opacity="0.7"/>')
        s.append(f'<text x="{x0 + slot / 2:.1f}" y="{h - _MB + 16}" text-anchor="middle">{_e(c[:12])}</text>')
    s.append("</svg>")
    return f'<figure>{"".join(s)}</figure>'


def _effects(evidence: Mapping[str, Any]) -> str:
    feats = list(evidence.get("features") or [])[:12]
    drifted = set(evidence.get("drifted") or [])
    h = _MT + 22 * len(feats) + 30
    top = max([float(f.get("effect") or 0.0) for f in feats] + [1e-9]) * 1.15
    x = _Axis(0.0, top, 160, _W - _MR - 120)
    s = [
        f'<svg class="plot effects" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{h}" viewBox="0 0 {_W} {h}" role="img" aria-label="drift effect per feature">',
        "<title>drift effect size per feature when the alert fired</title>",
        f'<text x="{_ML}" y="{_MT - 10}">effect size per feature when the alert fired (red: drifted after correction)</text>',
    ]
    for i, f in enumerate(feats):
        yy = _MT + i * 22
        eff = float(f.get("effect") or 0.0)
        colour = "#dc2626" if f.get("feature") in drifted else "#9ca3af"
        s.append(f'<text x="150" y="{yy + 14}" text-anchor="end">{_e(f.get("feature"))} ({_e(f.get("test"))})</text>'
                 f'<rect class="bar" x="160" y="{yy + 3}" width="{max(x(eff) - 160, 1):.1f}" height="15" fill="{colour}"/>'
                 f'<text x="{x(eff) + 4:.1f}" y="{yy + 14}">{_e(_num(eff, 3))}, p_adj={_e(_num(f.get("p_adjusted"), 2))}</text>')
    s.append("</svg>")
    return f'<figure>{"".join(s)}</figure>'


def _calibration_section(alert: _Alert, profiles: Sequence[WindowProfile]) -> tuple[str, int]:
    before, after = _before_after(alert, profiles)
    head = f"<h3>Calibration: {_e(alert.key[0])} on {_e(alert.key[1])}/{_e(alert.key[2])}</h3>"
    tb = [p.reliability for p in before if p.reliability is not None]
    ta = [p.reliability for p in after if p.reliability is not None]
    if tb and ta and np.sum(tb, axis=0)[:, 0].sum() and np.sum(ta, axis=0)[:, 0].sum():
        return head + _reliability(np.sum(tb, axis=0), np.sum(ta, axis=0), len(tb), len(ta)), 1
    rows = []
    for t in alert.transitions:
        ev = (t.get("measurement") or {}).get("evidence") or {}
        if "ece" in ev:
            rows.append(f"<tr><td class=\"t\">{_e(_utc(t['ts']))}</td><td>{_e(t.get('state'))}</td><td>{_e(_num(ev.get('ece')))}</td>"
                        f"<td>{_e(_num(ev.get('brier')))}</td><td>{_e(_num(ev.get('mean_score')))}</td><td>{_e(_num(ev.get('positive_rate')))}</td></tr>")
    if not rows:
        return "", 0
    return (head + '<p class="note">The reliability diagram needs the measurement tap; the calibration '
            "figures at each transition:</p><table><tr><th>time</th><th>state</th><th>ECE</th><th>Brier</th>"
            f"<th>mean score</th><th>positive rate</th></tr>{''.join(rows)}</table>"), 0


def _reliability(before: np.ndarray, after: np.ndarray, nb: int, na: int) -> str:
    size, m = 320, 48
    ax = _Axis(0.0, 1.0, m, size - 16)
    ay = _Axis(0.0, 1.0, size - m + 8, 16)
    s = [
        f'<svg class="plot reliability" xmlns="http://www.w3.org/2000/svg" width="{size + 300}" height="{size}" viewBox="0 0 {size + 300} {size}" role="img" aria-label="reliability diagram">',
        "<title>reliability diagram before and after</title>",
        f'<rect x="{m}" y="16" width="{size - 16 - m}" height="{size - m - 8}" fill="#fbfcfd" stroke="#d5dae2"/>',
        f'<line class="diagonal" x1="{ax(0):.1f}" y1="{ay(0):.1f}" x2="{ax(1):.1f}" y2="{ay(1):.1f}" stroke="#9ca3af" stroke-dasharray="4 3"/>',
    ]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        s.append(f'<text x="{ax(v):.1f}" y="{size - m + 24}" text-anchor="middle">{v:g}</text>'
                 f'<text x="{m - 6}" y="{ay(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    s.append(f'<text x="{(m + size) / 2:.1f}" y="{size - 6}" text-anchor="middle">mean predicted score</text>'
             f'<text transform="translate(12 {(size - m) / 2 + 8:.1f}) rotate(-90)" text-anchor="middle">observed positive rate</text>')
    for table, colour, cls, label, n in ((before, "#2563eb", "before", "before", nb), (after, "#ea580c", "after", "after", na)):
        counts = table[:, 0]
        ok = counts > 0
        px = table[ok, 1] / counts[ok]
        py = table[ok, 2] / counts[ok]
        pts = " ".join(f"{ax(a):.1f},{ay(b):.1f}" for a, b in zip(px, py))
        s.append(f'<polyline class="reliability {cls}" points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        total = counts.sum()
        for a, b, c in zip(px, py, counts[ok]):
            s.append(f'<circle cx="{ax(a):.1f}" cy="{ay(b):.1f}" r="{2 + 6 * math.sqrt(c / total):.1f}" fill="{colour}" fill-opacity="0.6"/>')
        gap = float(np.sum(np.abs(table[ok, 2] - table[ok, 1])) / max(total, 1))
        row = 40 if cls == "before" else 84
        s.append(f'<text x="{size + 4}" y="{row}" style="fill:{colour}">■ {label}: {n} windows</text>'
                 f'<text x="{size + 18}" y="{row + 16}" style="fill:{colour}">{int(total)} labels, ECE {gap:.3f}</text>')
    s.append("</svg>")
    return f'<figure>{"".join(s)}<figcaption>Observed positive rate per score bin: on the diagonal, the model is calibrated.</figcaption></figure>'


# PNGs ----------------------------------------------------------------------------------------


def _write_pngs(out: Path, figures: list[tuple[str, dict[str, Any]]]) -> Iterable[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # optional: no matplotlib, no PNGs
        return []
    paths = []
    for slug, data in figures:
        fig = _png_figure(plt, data)
        path = out.with_name(f"{out.stem}-{slug}.png")
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _png_figure(plt: Any, data: dict[str, Any]) -> Any:
    """One alert's figure, as the HTML's SVG draws it: value, thresholds, state marks, the
    deploys and the rollbacks."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    def when(t: float) -> datetime:
        return datetime.fromtimestamp(t, timezone.utc)

    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    for run in _runs(data["points"]):
        ax.plot([when(t) for t, _ in run], [v for _, v in run],
                color="#1f2937", lw=1.4, ls="-" if data["from_tap"] else "--")
    if data["threshold"] is not None:
        ax.axhline(data["threshold"], color="#dc2626", ls="--", lw=1, label="threshold")
    if data["clear"] is not None:
        ax.axhline(data["clear"], color="#d97706", ls=":", lw=1, label="clear threshold")
    for t, state, v in data["marks"]:
        if v is not None:
            colour = _MARK_STYLE.get(str(state), ("#374151", ""))[0]
            ax.plot([when(t)], [v], "o", color=colour)
    for t, label in data["deploys"]:
        ax.axvline(when(t), color="#7c3aed", ls="--", lw=1, label=label)
    for t, label in data["rollbacks"]:
        ax.axvline(when(t), color="#b91c1c", lw=2, label=label)
    ax.set_title(data["title"], fontsize=10)
    ax.set_xlabel(f"event time (UTC), {_utc(data['lo'], '%Y-%m-%d')}", fontsize=8)
    # Ticks where the span needs them (every 30 s on a few minutes), labelled to the second
    # when a minute has several: "%H:%M" on 30-second ticks printed each minute twice.
    locator = AutoDateLocator(tz=timezone.utc, minticks=3, maxticks=9)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=timezone.utc, show_offset=False))
    ax.legend(fontsize=7, loc="upper left")
    return fig
