"""The ``rollbackd`` command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import click
import structlog

from rollbackd import __version__

EXIT_CONFIG = 2


def _configure_logging(level: str, json_logs: bool) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="logged_at"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rollbackd")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-json/--no-log-json", default=False, help="Structured JSON logs on stderr.")
def main(log_level: str, log_json: bool) -> None:
    """rollbackd watches model-serving events, detects when a deployment goes bad, and rolls it
    back to its last known-good version, with every decision in an audit ledger."""
    _configure_logging(log_level, log_json)


def _load_config(path: str) -> Any:
    from rollbackd.rules.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as exc:
        click.echo(f"{path}: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_CONFIG)


@main.command()
@click.argument("rules", type=click.Path(dir_okay=False))
def validate(rules: str) -> None:
    """Check a rules file; print every error and warning with its line, exit non-zero on any error."""
    from rollbackd.rules.loader import check_file, summarize

    config, issues = check_file(rules)
    for issue in issues:
        click.echo(issue.format(rules), err=True)
    if config is None:
        errors = sum(1 for i in issues if i.severity == "error")
        click.echo(f"{rules}: {errors} error(s)", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(summarize(config))
    click.echo(f"{rules}: OK")


class _Progress:
    """Events done and events/s on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        from rollbackd.daemon.clock import WallClock

        self.enabled = enabled and sys.stderr.isatty()
        self.clock = WallClock()
        self.start = self.clock.now()
        self.last = 0.0

    def __call__(self, done: int, watermark: float | None) -> None:
        if not self.enabled:
            return
        now = self.clock.now()
        if now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        wm = ""
        if watermark is not None and watermark > 0:
            wm = " event time " + datetime.fromtimestamp(watermark, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        sys.stderr.write(f"\r{done:,} events  {rate:,.0f} events/s{wm}   ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _run_replay(
    recording: str,
    config: Any,
    *,
    decisions_out: str | None,
    db: str,
    dead_letter: str | None,
    notifier_name: str | None,
    drill: bool,
    mode: str,
    batch_size: int,
    progress: bool = True,
    dry_run: bool = False,
) -> Any:
    from rollbackd.actions.factory import make_backend, make_notifier
    from rollbackd.daemon.decisions import DecisionLog, NullDecisions
    from rollbackd.daemon.ledger import Ledger
    from rollbackd.daemon.replay import build_pipeline, open_recording, replay
    from rollbackd.rules.model import NotifierSpec

    if dry_run:
        config = dataclasses.replace(config, settings=dataclasses.replace(config.settings, dry_run=True))
    for dep in config.deployments.values():
        if dep.reference and not Path(dep.reference).is_file():
            click.echo(f"deployment {dep.name}: reference file {dep.reference} not found", err=True)
            sys.exit(EXIT_CONFIG)
    run_id = f"{mode}-{uuid.uuid4().hex[:12]}"
    ledger = Ledger(db, run_id=run_id)
    ledger.start_run(mode, recording, config.source, datetime.now(timezone.utc).isoformat())
    try:
        # Built here, before any event is read, so a missing token or secret is a clear
        # start-up error rather than a failure at the first incident.
        notifier = make_notifier(NotifierSpec(type=notifier_name) if notifier_name else config.settings.notifier)
        for dep in config.deployments.values():
            make_backend(dep.backend)
    except ValueError as exc:
        click.echo(f"{config.source}: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    pipeline = build_pipeline(
        config,
        silences=ledger.silences(),
        decisions=DecisionLog(decisions_out) if decisions_out else NullDecisions(),
        recorder=ledger,
        dead_letter_path=dead_letter,
        notifier=notifier,
        drill=drill,
    )
    bar = _Progress(progress)
    try:
        result = replay(open_recording(recording, config), pipeline, batch_size=batch_size, progress=bar)
    finally:
        bar.done()
    ledger.counters(
        [(f"events.{k}", v) for k, v in result.summary["events"].items()]
        + [(f"rejected.{k}", v) for k, v in result.summary["rejected"].items()]
        + [(f"join.{k}", v) for k, v in result.summary["join"].items()]
    )
    ledger.finish_run(result.summary)
    ledger.close()
    result.extra["run_id"] = run_id
    return result


@main.command()
@click.argument("recording")
@click.option("--config", "-c", "rules", required=True, type=click.Path(dir_okay=False), help="Rules file.")
@click.option("--decisions-out", type=click.Path(dir_okay=False), help="Write the decision log (JSON Lines).")
@click.option("--db", default="rollbackd.db", show_default=True, help="SQLite ledger file.")
@click.option("--dead-letter", type=click.Path(dir_okay=False),
              help="Where rejected lines go (default: RECORDING's name + .rejected.jsonl).")
@click.option("--notifier", type=click.Choice(["console", "slack", "none"]), default=None,
              help="Override the rules file's notifier.")
@click.option("--batch-size", default=8192, show_default=True)
@click.option("--dry-run", is_flag=True,
              help="Force dry-run for every rollback: record what would be done, call no backend.")
@click.option("--summary-json", is_flag=True, help="Print the run summary as JSON on stdout.")
def replay(recording: str, rules: str, decisions_out: str | None, db: str, dead_letter: str | None,
           notifier: str | None, batch_size: int, dry_run: bool, summary_json: bool) -> None:
    """Replay a recorded stream (JSONL, .jsonl.gz or - for stdin) through the rules."""
    config = _load_config(rules)
    if dead_letter is None:
        base = "stdin" if recording == "-" else Path(recording).name
        dead_letter = f"{base}.rejected.jsonl"
    result = _run_replay(recording, config, decisions_out=decisions_out, db=db,
                         dead_letter=dead_letter, notifier_name=notifier, drill=False,
                         mode="replay", batch_size=batch_size, dry_run=dry_run)
    if summary_json:
        click.echo(json.dumps(result.summary, sort_keys=True))
    else:
        _print_summary(result, dead_letter)


def _print_summary(result: Any, dead_letter: str | None) -> None:
    s = result.summary
    ev = s["events"]
    rejected = sum(s["rejected"].values())
    click.echo(
        f"events: {ev.get('predictions', 0):,} predictions, {ev.get('outcomes', 0):,} outcomes, "
        f"{ev.get('deploys', 0):,} deploys, {ev.get('late', 0):,} late, {rejected:,} rejected"
    )
    if rejected:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items()))
        click.echo(f"rejected by reason: {reasons} (kept in {dead_letter})")
    j = s["join"]
    click.echo(
        f"labels: {j['joined']:,} joined, {j['unmatched_outcomes']:,} unmatched outcomes, "
        f"{s['pending_labels']:,} predictions awaiting a label"
    )
    incidents = result.pipeline.incidents()
    click.echo(f"incidents: {len(incidents)}")
    for inc in incidents:
        _print_incident(inc, result.pipeline)


def _ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _print_incident(inc: Any, pipeline: Any) -> None:
    status = "open" if inc.is_open else f"resolved {_ts(inc.resolved_at)}"
    click.echo(f"  {inc.id}  {inc.deployment}  opened {_ts(inc.opened_at)}  {status}  severity {inc.severity}")
    for a in inc.alerts.values():
        m = a.measurement
        click.echo(
            f"    {_ts(a.fired_at)}  {a.rule:<24} {a.variant:<8} value {m.get('value')!s:<22} "
            f"threshold {m.get('threshold')}  n={m.get('sample_size')}  "
            + (f"resolved {_ts(a.resolved_at)}" if a.resolved_at else "firing")
        )


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the generated recording, decision log and ledger here.")
@click.option("--db", default="rollbackd.db", show_default=True, help="SQLite ledger file.")
def demo(out_dir: str | None, db: str) -> None:
    """Generate a built-in scenario (healthy traffic, then a bad version) and replay it:
    console notices, a rollback to the last known-good version, and the incident timeline."""
    from rollbackd.rules.loader import load_config
    from rollbackd.scenarios import BUILTIN, write_recording

    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="rollbackd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    recording = work / "demo.jsonl.gz"
    stats = write_recording(BUILTIN["demo"], recording)
    rules_path = resources.files("rollbackd") / "examples" / "demo.yaml"
    with resources.as_file(rules_path) as rp:
        config = load_config(rp)
    click.echo(f"rollbackd demo: {stats.lines:,} events of a deployment 'demo-scorer' written to {recording}")
    click.echo("version 1 serves healthy traffic, then version 2 is deployed and starts failing.\n")
    decisions = work / "decisions.jsonl"
    result = _run_replay(str(recording), config, decisions_out=str(decisions), db=db,
                         dead_letter=str(work / "rejected.jsonl"), notifier_name="console",
                         drill=False, mode="demo", batch_size=8192)
    click.echo("\n=== incident timeline ===")
    for line in decisions.read_text().splitlines():
        rec = json.loads(line)
        click.echo("  " + _timeline_line(rec))
    click.echo("")
    _print_summary(result, None)
    click.echo(f"\ndecision log: {decisions}\nledger: {db} (run {result.extra['run_id']})")


def _timeline_line(rec: dict[str, Any]) -> str:
    when = _ts(rec["ts"])
    where = f"{rec['deployment']}/{rec.get('variant')}"
    if rec["kind"] == "alert":
        m = rec.get("measurement", {})
        return f"{when}  alert     {rec['rule']:<22} {rec['state']:<9} {where}  value={m.get('value')} threshold={m.get('threshold')} n={m.get('sample_size')}"
    if rec["kind"] == "incident":
        return f"{when}  incident  {rec['incident_id']:<22} {rec['state']:<9} {where}"
    if rec["action"] == "rollback":
        return (f"{when}  rollback  {rec.get('from_version')} -> {rec.get('to_version')}  "
                f"{rec['status']}  {where}  ({rec.get('detail', '')})")
    return f"{when}  notify    {rec.get('notice', ''):<22} {rec['status']:<9} {where}"


@main.command()
@click.argument("scenario")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Recording to write (.jsonl or .jsonl.gz).")
def simulate(scenario: str, out: str) -> None:
    """Write a built-in synthetic scenario as a recording in the event contract."""
    from rollbackd.scenarios import BUILTIN, write_recording

    if scenario not in BUILTIN:
        raise click.BadParameter(f"unknown scenario {scenario!r}; known: {', '.join(sorted(BUILTIN))}")
    stats = write_recording(BUILTIN[scenario], out)
    click.echo(f"{out}: {stats.lines:,} lines")


def _parse_when(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use Unix seconds or an ISO 8601 time with offset") from None
    if dt.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no UTC offset (add Z or +hh:mm)")
    return dt.timestamp()


@main.group()
def silence() -> None:
    """Mute matching alerts for a while: still evaluated and recorded, never notified or acted on."""


@silence.command("add")
@click.option("--deployment", required=True)
@click.option("--rule", default=None, help="Only this rule (default: every rule).")
@click.option("--variant", default=None, help="Only this variant (default: every variant).")
@click.option("--for", "duration", required=True, help="How long, e.g. 2h, 30m.")
@click.option("--starts-at", default=None,
              help="Start (ISO 8601 with offset, or Unix seconds); default now. Event time: a "
                   "silence for a drill or a replay is set in the recording's time.")
@click.option("--reason", required=True)
@click.option("--by", "by", required=True, help="Who sets it.")
@click.option("--db", default="rollbackd.db", show_default=True)
def silence_add(deployment: str, rule: str | None, variant: str | None, duration: str,
                starts_at: str | None, reason: str, by: str, db: str) -> None:
    from rollbackd.daemon.clock import WallClock
    from rollbackd.daemon.ledger import Ledger
    from rollbackd.rules.durations import parse_duration
    from rollbackd.rules.silences import Silence

    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None
    start = _parse_when(starts_at, WallClock().now())
    try:
        s = Silence(id=f"sil-{uuid.uuid4().hex[:10]}", deployment=deployment, starts_at=start,
                    ends_at=start + seconds, reason=reason, created_by=by, rule=rule, variant=variant)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ledger = Ledger(db)
    ledger.add_silence(s, datetime.now(timezone.utc).isoformat())
    ledger.close()
    click.echo(f"{s.id}: {deployment}{'/' + variant if variant else ''} rule {rule or '*'} "
               f"silenced {_ts(s.starts_at)} to {_ts(s.ends_at)} UTC by {by}: {reason}")


@silence.command("list")
@click.option("--db", default="rollbackd.db", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="Include silences that have ended.")
def silence_list(db: str, show_all: bool) -> None:
    from rollbackd.daemon.clock import WallClock
    from rollbackd.daemon.ledger import Ledger

    now = WallClock().now()
    ledger = Ledger(db)
    rows = [s for s in ledger.silences() if show_all or s.ends_at > now]
    ledger.close()
    if not rows:
        click.echo("no silences" + ("" if show_all else " in force or upcoming (--all shows ended ones)"))
    for s in rows:
        state = "ended" if s.ends_at <= now else ("active" if s.starts_at <= now else "upcoming")
        click.echo(f"{s.id}  {state:<8} {s.deployment}{'/' + s.variant if s.variant else ''}  "
                   f"rule {s.rule or '*'}  {_ts(s.starts_at)} → {_ts(s.ends_at)}  by {s.created_by}: {s.reason}")


@silence.command("expire")
@click.argument("silence_id")
@click.option("--by", "by", default="cli", show_default=True)
@click.option("--at", "at", default=None, help="When it ends (default now; ISO 8601 or Unix seconds).")
@click.option("--db", default="rollbackd.db", show_default=True)
def silence_expire(silence_id: str, by: str, at: str | None, db: str) -> None:
    from rollbackd.daemon.clock import WallClock
    from rollbackd.daemon.ledger import Ledger

    ledger = Ledger(db)
    ok = ledger.expire_silence(silence_id, _parse_when(at, WallClock().now()), by,
                               datetime.now(timezone.utc).isoformat())
    ledger.close()
    if not ok:
        click.echo(f"no silence {silence_id}", err=True)
        sys.exit(1)
    click.echo(f"{silence_id}: expired")


if __name__ == "__main__":  # pragma: no cover
    main()
