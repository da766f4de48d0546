"""The ``rollbackd`` command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import click
import structlog

from rollbackd import __version__

EXIT_CONFIG = 2


class Refused(click.ClickException):
    """A path or file given on the command line cannot be used: one line ``Error: ...`` on
    stderr and exit 2, like a usage error, instead of a traceback."""

    exit_code = EXIT_CONFIG


_SECONDS = click.FloatRange(min=0.0, min_open=True)  # a positive number of seconds
ENV_PREFIX = "ROLLBACKD_"


class _StrictBool(click.types.BoolParamType):
    """A switch from the environment: true/false, 1/0, yes/no (any case) and nothing else.
    click's own reading also takes t, y, on, off...: a typo there (``ROLLBACKD_DRY_RUN=ture``)
    must stop the start, not be read as some value."""

    name = "boolean"
    _WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool):  # the flag given on the command line
            return value
        word = self._WORDS.get(str(value).strip().lower())
        if word is None:
            self.fail(f"{value!r} is not a boolean: use true/false, 1/0 or yes/no", param, ctx)
        return word


def _from_environment(*, skip: tuple[str, ...] = ()) -> Any:
    """Every option of the command also read from ``ROLLBACKD_<OPTION>`` (``--db`` from
    ``ROLLBACKD_DB``, ``--log-json`` from ``ROLLBACKD_LOG_JSON``) unless it names its own
    variable, shown in ``--help``; the command line beats the environment, an empty variable
    counts as unset. ``skip``: options whose environment form is another mechanism
    (``--kafka-config``: ``ROLLBACKD_KAFKA_<KEY>``). Applied last (outermost decorator), so it
    sees every option."""
    def apply(command: click.Command) -> click.Command:
        for param in command.params:
            if not isinstance(param, click.Option) or not param.expose_value or param.name in skip:
                continue  # --version, --help: not settings
            if param.envvar is None:
                long = next(o for o in param.opts if o.startswith("--"))
                param.envvar = ENV_PREFIX + long[2:].upper().replace("-", "_")
            param.show_envvar = True
            if isinstance(param.type, click.types.BoolParamType):
                param.type = _StrictBool()
        return command

    return apply


def _parent_exists(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Option callback for a file the command will write: its directory must exist (checked
    before the command writes anything, e.g. a ledger's ``runs`` row)."""
    if value is None or value == "-":
        return value
    path = Path(value)
    if path.is_dir():
        raise click.BadParameter(f"{value} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise click.BadParameter(f"directory {str(parent)!r} does not exist")
    return value


def _existing_ledger(db: str) -> None:
    """A command that only reads (or answers into) a ledger: refuse a missing file rather
    than create an empty one, and a file that is not a rollbackd ledger."""
    import sqlite3

    path = Path(db)
    if not path.is_file():
        raise Refused(f"{db}: no such ledger")
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise Refused(f"{db}: not a rollbackd ledger ({exc})") from None
    if "runs" not in tables:
        raise Refused(f"{db}: not a rollbackd ledger (no runs table)")


def _open_ledger(db: str, run_id: str = "run", key_file: str | None = None, write: bool = True) -> Any:
    """The ledger at ``db``, created when missing, under the ledger key of ``key_file`` or the
    environment; a file that is not SQLite (or cannot be opened) is a one-line error, and so
    is a key that does not fit a ledger the command writes to."""
    import sqlite3

    from rollbackd.daemon.ledger import Ledger, LedgerKeyError

    if Path(db).is_dir():
        raise Refused(f"{db}: is a directory, not a ledger")
    key = _ledger_key(key_file)
    try:
        ledger = Ledger(db, run_id=run_id, key=key)
    except (sqlite3.Error, OSError) as exc:
        raise Refused(f"{db}: cannot open the ledger ({exc})") from None
    except LedgerKeyError as exc:
        raise Refused(str(exc)) from None
    if write and ledger.key_problem is not None:
        ledger.close()
        raise Refused(f"{db}: {ledger.key_problem}")
    return ledger


def _ledger_key(key_file: str | None) -> bytes | None:
    """The ledger key: ``--ledger-key-file``, else ``ROLLBACKD_LEDGER_KEY_FILE``, else
    ``ROLLBACKD_LEDGER_KEY``; None when none is set."""
    from rollbackd.daemon.audit import ledger_key

    try:
        return ledger_key(key_file or os.environ.get("ROLLBACKD_LEDGER_KEY_FILE") or None,
                          os.environ.get("ROLLBACKD_LEDGER_KEY") or None)
    except ValueError as exc:
        raise Refused(str(exc)) from None


def _key_file_option(fn: Any) -> Any:
    return click.option(
        "--ledger-key-file", type=click.Path(dir_okay=False), default=None,
        help="File holding the ledger key (default: env ROLLBACKD_LEDGER_KEY_FILE, or the key itself in "
             "ROLLBACKD_LEDGER_KEY): rows are chained with HMAC-SHA256 under it. A ledger takes a key "
             "(or none) when it is made.")(fn)


def _anchors_option(fn: Any) -> Any:
    return click.option(
        "--anchors", type=click.Path(dir_okay=False), default=None, callback=_parent_exists,
        help="Append the ledger's signed chain heads (anchors) to this file (default: the ledger's "
             "path + .anchors); keep a copy out of reach of the ledger's writers.")(fn)


def _anchoring(ledger: Any, db: str, anchors: str | None, rewound: bool = False) -> Any:
    from rollbackd.daemon.audit import AnchorFile, Anchoring

    return Anchoring(ledger, [AnchorFile(anchors or f"{db}.anchors")], rewound=rewound)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on ``sys.stderr`` as it is when a record comes (click's test runner swaps it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(level: str, json_logs: bool) -> None:
    """structlog to stderr, and stdlib logging (librdkafka's lines through the Kafka clients'
    ``logger``, APScheduler, warnings) bridged into the same processors and renderer, so that
    with ``json_logs`` every line on stderr is one JSON object with ``logged_at``, ``level``
    and ``event``."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="logged_at"),
    ]
    rendering: list[Any] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(sort_keys=True)]
        if json_logs
        else [structlog.dev.ConsoleRenderer(colors=False)]
    )
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = _Stderr()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:  # configured again (tests)
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.captureWarnings(True)
    if json_logs:  # an uncaught exception is a JSON line too, not a bare traceback
        crash = structlog.get_logger("rollbackd")

        def on_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
            crash.critical("uncaught_exception", exc_info=(kind, exc, tb))

        def on_thread(args: Any) -> None:
            if args.exc_type is not SystemExit:
                crash.critical("thread.uncaught_exception", thread=getattr(args.thread, "name", None),
                               exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

        sys.excepthook = on_uncaught
        threading.excepthook = on_thread


def _say(event: str, text: str, *, error: bool = False, **fields: Any) -> None:
    """A line ``run`` always writes on stderr, whatever ``--log-level`` (where it listens, what
    it consumes, why it stopped): ``text`` as is, or with ``--log-json`` a JSON log line
    ``event`` with ``fields``."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not ctx.find_root().params.get("log_json"):
        click.echo(text, err=True)
        return
    line = structlog.wrap_logger(structlog.PrintLogger(sys.stderr), wrapper_class=structlog.BoundLogger,
                                 processors=structlog.get_config()["processors"])
    (line.error if error else line.info)(event, **fields)


_GLOBAL_OPTIONS = ("--log-level", "--log-json", "--no-log-json")


class _Main(click.Group):
    """Says where a global option goes when it is given after the subcommand."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as exc:
            if exc.option_name in _GLOBAL_OPTIONS:
                exc.message = (f"{exc.option_name} is an option of rollbackd itself: put it before the "
                               f"subcommand, e.g. rollbackd {exc.option_name}"
                               f"{' LEVEL' if exc.option_name == '--log-level' else ''} "
                               f"{ctx.invoked_subcommand} ...")
            raise


@_from_environment()
@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rollbackd")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Least severe log events written to stderr (goes before the subcommand).")
@click.option("--log-json/--no-log-json", default=False,
              help="Structured JSON logs on stderr (goes before the subcommand).")
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
@click.option("--label-rate", type=click.FloatRange(min=0, min_open=True), default=None, metavar="PER_SECOND",
              help="Unlabelled predictions per second per deployment with a label rule: warn when "
                   "settings.max_pending_labels would bind at that rate (the summary says where it binds).")
def validate(rules: str, label_rate: float | None) -> None:
    """Check a rules file; print every error and warning with its line, exit non-zero on any error."""
    from rollbackd.rules.loader import check_file, summarize
    from rollbackd.rules.loading.summary import label_buffer

    try:
        config, issues = check_file(rules)
    except Exception as exc:  # noqa: BLE001 - a bug in the checker; still no traceback for the user
        click.echo(f"{rules}: internal error while checking the file ({type(exc).__name__}: "
                   f"{' '.join(str(exc).split())[:300]}); please report it", err=True)
        sys.exit(EXIT_CONFIG)
    for issue in issues:
        click.echo(issue.format(rules), err=True)
    if config is None:
        errors = sum(1 for i in issues if i.severity == "error")
        click.echo(f"{rules}: {errors} error(s)", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(summarize(config))
    if label_rate is not None:
        buffer = label_buffer(config)
        if buffer is None:
            click.echo(f"{rules}: --label-rate: no rule needs labels, nothing is buffered", err=True)
        else:
            held, warning = buffer.at(label_rate)
            if warning is not None:
                click.echo(f"{rules}: warning: settings.max_pending_labels: {warning}", err=True)
            else:
                click.echo(f"label buffer at {label_rate:g}/s per deployment: {held:,.0f} of {buffer.cap:,} entries")
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


def _prepare(config: Any, notifier_spec: Any, dry_run: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Everything a run needs that can fail on configuration, checked before any event is read
    or any ledger row is written: a missing token, secret or reference file is a clear
    start-up error, not a failure at the first incident. Returns the config (with a forced
    dry-run applied), the notifier and the configured deployments' backends."""
    from rollbackd.actions.factory import make_backend, make_notifiers

    if dry_run:
        config = _forced_dry_run(config)
    for dep in config.deployments.values():
        if dep.reference and not Path(dep.reference).is_file():
            click.echo(f"deployment {dep.name}: reference file {dep.reference} not found", err=True)
            sys.exit(EXIT_CONFIG)
    try:
        notifier = make_notifiers(config.settings, override=notifier_spec)
        backends = {name: make_backend(dep.backend) for name, dep in config.deployments.items()}
    except ValueError as exc:
        click.echo(f"{config.source}: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return config, notifier, backends


def _forced_dry_run(config: Any) -> Any:
    """``--dry-run``: an operator's override; no rule's or deployment's dry_run: false beats it."""
    return dataclasses.replace(config, settings=dataclasses.replace(config.settings, dry_run=True, force_dry_run=True))


def _measurements(path: str | None, config: Any, *, append: bool = False, flush_every: float | None = None) -> Any:
    """The ``--measurements-out`` writer, or None; a one-line error (exit 2) for a file that
    cannot be opened or a Parquet file without pyarrow, before any event is read."""
    if path is None:
        return None
    from rollbackd.measurements import ParquetUnavailable, open_measurements

    try:
        return open_measurements(path, config, append=append, flush_every=flush_every)
    except ParquetUnavailable as exc:
        raise Refused(str(exc)) from None
    except ValueError as exc:
        raise Refused(f"--measurements-out {exc}") from None
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror or exc}") from None


def _measurements_option(fn: Any) -> Any:
    return click.option(
        "--measurements-out", type=click.Path(dir_okay=False), default=None, callback=_parent_exists,
        help="Write every evaluation (rule, deployment, variant, version, slice, window, value, p-value, "
             "threshold, sample size, verdict) as JSON Lines; FILE.parquet writes Parquet (needs the "
             "parquet extra). `rollbackd report --measurements FILE` plots it.")(fn)


def _print_measurements(writer: Any) -> None:
    if writer is None:
        return
    if writer.errors:
        click.echo(f"measurements: writing {writer.path} failed after {writer.written:,} records (see the log); "
                   f"{writer.evaluations:,} evaluations made")
    else:
        click.echo(f"measurements: {writer.written:,} records ({writer.evaluations:,} evaluations) in {writer.path}")


def _print_not_evaluated(summary: dict[str, Any], limit: int = 12) -> None:
    """Each rule's window the recording ended inside (``replay.trailing_windows``)."""
    trailing = summary.get("not_evaluated") or []
    if not trailing:
        return
    click.echo(f"not evaluated: {len(trailing)} window(s) the recording ended inside (never closed)")
    for w in trailing[:limit]:
        click.echo(f"  {w['rule']:<24} {w['deployment']}/{w['variant']}  window {_ts(w['window_start_epoch'])} "
                   f"to {_ts(w['window_end_epoch'])}: {w['predictions']:,} predictions, {w['labels']:,} labels "
                   f"from {_ts(w['data_from'])} to {_ts(w['data_until'])}")
    if len(trailing) > limit:
        click.echo(f"  ... and {len(trailing) - limit} more (--summary-json lists them all)")


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
    key_file: str | None = None,
    anchors: str | None = None,
    measurements_out: str | None = None,
) -> Any:
    from rollbackd.actions.console import ConsoleNotifier
    from rollbackd.daemon.clock import WallClock
    from rollbackd.daemon.decisions import DecisionLog, NullDecisions
    from rollbackd.daemon.ledger import Ledger
    from rollbackd.daemon.replay import build_pipeline, open_recording, replay
    from rollbackd.rules.model import NotifierSpec

    config, notifier, backends = _prepare(
        config, NotifierSpec(type=notifier_name) if notifier_name else None, dry_run
    )
    if isinstance(notifier, ConsoleNotifier):
        # Repeat notices come as often as event time says; printed, they are summarised.
        notifier = ConsoleNotifier(notifier.stream, notifier.color, summarize_repeats=True)
    run_id = f"{mode}-{uuid.uuid4().hex[:12]}"
    # Everything that can fail on a path is opened before the run's first ledger row.
    writer = _measurements(measurements_out, config)
    try:
        source = open_recording(recording, config)
        decisions: Any = DecisionLog(decisions_out) if decisions_out else NullDecisions()
    except OSError as exc:
        if writer is not None:
            writer.close()
        raise Refused(f"{exc.filename or recording}: {exc.strerror or exc}") from None
    ledger: Ledger = _open_ledger(db, run_id, key_file)
    ledger.start_run(mode, recording, config.source, datetime.now(timezone.utc).isoformat())
    pipeline = build_pipeline(  # the ledger's silences and approvals are pushed in from it
        config,
        decisions=decisions,
        recorder=ledger,
        dead_letter_path=dead_letter,
        notifier=notifier,
        drill=drill,
        backend_overrides=backends,
        tap=writer,
    )
    bar = _Progress(progress)
    try:
        result = replay(source, pipeline, batch_size=batch_size, progress=bar)
        if writer is not None:
            writer.not_evaluated(result.not_evaluated)
    finally:
        bar.done()
        if writer is not None:
            writer.close()
    if writer is not None:
        result.extra["measurements"] = writer
    if isinstance(notifier, ConsoleNotifier):
        notifier.end()
    ledger.counters(
        [(f"events.{k}", v) for k, v in result.summary["events"].items()]
        + [(f"rejected.{k}", v) for k, v in result.summary["rejected"].items()]
        + [(f"join.{k}", v) for k, v in result.summary["join"].items()]
    )
    ledger.finish_run(result.summary, datetime.now(timezone.utc).isoformat())
    _anchoring(ledger, db, anchors).publish(WallClock().now())
    ledger.close()
    result.extra["run_id"] = run_id
    return result


@main.command()
@click.argument("recording", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--config", "-c", "rules", required=True, type=click.Path(dir_okay=False), help="Rules file.")
@click.option("--decisions-out", type=click.Path(dir_okay=False), callback=_parent_exists,
              help="Write the decision log (JSON Lines).")
@click.option("--db", default="rollbackd.db", show_default=True, callback=_parent_exists,
              help="SQLite ledger file (created if missing; the run is appended).")
@click.option("--dead-letter", type=click.Path(dir_okay=False), callback=_parent_exists,
              help="Where rejected lines go (default: RECORDING's name + .rejected.jsonl).")
@click.option("--notifier", type=click.Choice(["console", "slack", "none"]), default=None,
              help="Override the rules file's notifier.")
@click.option("--batch-size", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Events read and processed per step.")
@click.option("--dry-run", is_flag=True,
              help="Every rollback is a dry run, whatever the rules file says (even dry_run: false): "
                   "record what would be done, call no backend.")
@click.option("--summary-json", is_flag=True, help="Print the run summary as JSON on stdout.")
@_measurements_option
@_key_file_option
@_anchors_option
def replay(recording: str, rules: str, decisions_out: str | None, db: str, dead_letter: str | None,
           notifier: str | None, batch_size: int, dry_run: bool, summary_json: bool,
           measurements_out: str | None, ledger_key_file: str | None, anchors: str | None) -> None:
    """Replay a recorded stream (JSONL, .jsonl.gz or - for stdin) through the rules."""
    config = _load_config(rules)
    if dead_letter is None:
        base = "stdin" if recording == "-" else Path(recording).name
        dead_letter = f"{base}.rejected.jsonl"
    result = _run_replay(recording, config, decisions_out=decisions_out, db=db,
                         dead_letter=dead_letter, notifier_name=notifier, drill=False,
                         mode="replay", batch_size=batch_size, dry_run=dry_run,
                         key_file=ledger_key_file, anchors=anchors, measurements_out=measurements_out)
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
    _print_muted(s)
    _print_not_evaluated(s)
    _print_measurements(result.extra.get("measurements"))


def _print_muted(summary: dict[str, Any]) -> None:
    muted = summary.get("alerts_muted") or {}
    if muted:
        by = ", ".join(f"{n} by {what}" for what, n in muted.items())
        click.echo(f"alerts muted (recorded, not notified, no action): {by}")


def _ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _print_incident(inc: Any, pipeline: Any) -> None:
    status = "open" if inc.is_open else f"resolved {_ts(inc.resolved_at)}"
    click.echo(f"  {inc.id}  {inc.deployment}  opened {_ts(inc.opened_at)}  {status}  severity {inc.severity}")
    for a in inc.alerts.values():
        m = a.measurement
        click.echo(
            f"    {_ts(a.fired_at)}  {a.rule:<24} {a.variant:<8} value {_num(m.get('value')):<10} "
            f"threshold {_num(m.get('threshold'))}  n={m.get('sample_size')}  "
            + (f"resolved {_ts(a.resolved_at)}" if a.resolved_at else "firing")
        )


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the generated recording, decision log and ledger here.")
@click.option("--db", default="rollbackd.db", show_default=True, callback=_parent_exists,
              help="SQLite ledger file (created if missing; the run is appended).")
@_key_file_option
@_anchors_option
def demo(out_dir: str | None, db: str, ledger_key_file: str | None, anchors: str | None) -> None:
    """Generate a built-in scenario (healthy traffic, then a bad version) and replay it:
    console notices, a rollback to the last known-good version, and the incident timeline."""
    from rollbackd.rules.loader import load_config
    from rollbackd.scenarios import BUILTIN, write_recording

    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="rollbackd-demo-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Refused(f"--out-dir {out_dir}: {exc.strerror or exc}") from None
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
                         drill=False, mode="demo", batch_size=8192, key_file=ledger_key_file, anchors=anchors)
    click.echo("\n=== incident timeline ===")
    for text in _folded_timeline(json.loads(line) for line in decisions.read_text().splitlines()):
        click.echo("  " + text)
    click.echo("")
    _print_summary(result, None)
    click.echo(f"\ndecision log: {decisions}\nledger: {db} (run {result.extra['run_id']})")


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _folded_timeline(records: Any) -> Any:
    """Timeline lines of a replay's decisions, an incident's repeat notices folded as the
    console notifier folds them: the first of a run printed, the rest said in one line."""
    from rollbackd.actions.console import RepeatFolding

    folding = RepeatFolding()
    for rec in records:
        incident = rec.get("incident_id")
        if rec.get("kind") == "action" and rec.get("action") == "notify" and rec.get("notice") == "repeat" and incident:
            if folding.repeat(incident, rec["ts"]):
                yield _timeline_line(rec)
            continue
        if incident and rec.get("kind") in ("incident", "action"):
            summary = folding.other(incident)
            if summary:
                yield summary.rstrip("\n")
        yield _timeline_line(rec)
    yield from (line for line in folding.end().splitlines())


def _timeline_line(rec: dict[str, Any]) -> str:
    from rollbackd.daemon.splits import where as found_in

    when = _ts(rec["ts"])
    where = f"{rec['deployment']}/{rec.get('variant')}"
    if rec["kind"] == "alert":
        m = rec.get("measurement", {})
        found = found_in(m)  # a version's share of the window, or a slice
        return (f"{when}  alert     {rec['rule']:<22} {rec['state']:<12} {where}  value={_num(m.get('value'))}"
                + (f" {found}" if found else "") + f" threshold={_num(m.get('threshold'))} n={m.get('sample_size')}")
    if rec["kind"] == "incident":
        return f"{when}  incident  {rec['incident_id']:<22} {rec['state']:<12} {where}"
    if rec["action"] == "rollback":
        return (f"{when}  rollback  {rec.get('from_version')} -> {rec.get('to_version')}  "
                f"{rec['status']}  {where}  ({rec.get('detail', '')})")
    if rec["action"] == "pause":
        return f"{when}  pause     {rec['status']:<12} {where}  ({rec.get('detail', '')})"
    if rec["action"] == "confirm":  # the check of a rollback against its target
        return f"{when}  confirm   {rec.get('to_version')}  {rec['status']}  {where}"
    return f"{when}  notify    {rec.get('notice', ''):<22} {rec['status']:<12} {where}"


# One line per built-in scenario (rollbackd.scenarios.BUILTIN) for `simulate --help`;
# tests/test_cli.py checks that every built-in is listed.
_SCENARIOS = {
    "stationary": "healthy traffic, nothing to find",
    "error_blip": "one minute of 30 % errors: a pending alert that cancels, no incident",
    "sustained_errors": "version 2 at 15 min with 20 % errors from then on: incident, rollback 2 -> 1",
    "feature_shift": "feature num_0 shifts at 15 min: drift",
    "malformed": "healthy traffic with 2 % malformed lines (dead letters)",
    "calibration_decay": "scores shift away from the labels at 15 min (80 % labelled): calibration",
    "bad_canary": "a canary (20 %) of version 2 at 10 min with 15 % errors; stable stays healthy",
    "label_delay": "model errors from 15 min, labels arriving 10-30 min late (60 min long)",
    "traffic_stop": "no traffic from 15 to 22 min",
    "demo": "35 min at 10/s, version 2 at 20 min with errors and latency: what `rollbackd demo` shows",
    "recall_collapse": "60 min of fraud-scorer (4 % fraud), version 4 at 20 min catches a fifth of the fraud "
                       "(recall 58 % -> 21 %) with calibrated scores",
    "bad_rolling_update": "60 min, a rolling update 7 -> 8 from 20 to 30 min (8's share 0 -> 100 %); 8 has 8 % errors",
    "healthy_rolling_update": "the same rolling update, 8 healthy: nothing to find",
    "daily_cycle": "3 days from midnight UTC at 1/s, 8x day/night traffic, num_0 swinging +-0.3 sd: nothing to find",
    "daily_cycle_shift": "the same 3 days, num_0 shifted 0.6 sd from day 3 06:00 UTC, 5 % errors from 12:00",
    "one_region_fault": "attrs.region on each prediction (4 regions); eu-west (25 %) at 9 % errors from 15 min, "
                        "the others at 0.4 %",
}


@main.command(epilog="\b\nScenarios (30 minutes of deployment demo-scorer unless said):\n" + "\n".join(
    f"  {name:<22} {text}" for name, text in _SCENARIOS.items()))
@click.argument("scenario")
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_parent_exists,
              help="Recording to write (.jsonl or .jsonl.gz).")
@click.option("--truth", type=click.Path(dir_okay=False), default=None, callback=_parent_exists,
              help="Also write the scenario's fault intervals, for backtest --truth.")
def simulate(scenario: str, out: str, truth: str | None) -> None:
    """Write the built-in synthetic SCENARIO (listed below) as a recording in the event contract."""
    from rollbackd.scenarios import BUILTIN, write_recording

    if scenario not in BUILTIN:
        raise click.BadParameter(f"unknown scenario {scenario!r}; known: {', '.join(sorted(BUILTIN))}")
    stats = write_recording(BUILTIN[scenario], out)
    click.echo(f"{out}: {stats.lines:,} lines")
    if truth:
        from rollbackd.drills import write_truth

        entries = write_truth(BUILTIN[scenario], truth)
        click.echo(f"{truth}: {len(entries)} fault interval(s)")


@main.command()
@click.argument("recording", type=click.Path(dir_okay=False, exists=True, allow_dash=True))
@click.option("--config", "-c", "rules", required=True, type=click.Path(dir_okay=False), help="Rules file.")
@click.option("--speed", default="max", show_default=True,
              help="1x keeps the recording's timing, 10x plays ten times faster, max as fast as possible.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Report, decision log, dead letters and drill ledger (default: a new ./drill-* folder).")
@click.option("--notifier", type=click.Choice(["console", "none", "rules"]), default="console", show_default=True,
              help="Where the [DRILL] notices go; rules: the rules file's notifier(s), to rehearse paging "
                   "(pages carry drill labels and keys of their own).")
@_measurements_option
def drill(recording: str, rules: str, speed: str, out_dir: str | None, notifier: str,
          measurements_out: str | None) -> None:
    """Rehearse an incident from a recording: rollbacks are dry runs, notices are marked [DRILL],
    no backend or Slack is called; ends with an HTML incident report."""
    from rollbackd.actions.base import NullNotifier
    from rollbackd.actions.console import ConsoleNotifier
    from rollbackd.drills import ProgressPrinter, parse_speed
    from rollbackd.drills import drill as run_drill

    config = _load_config(rules)
    try:
        factor = parse_speed(speed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--speed") from None
    try:
        out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="drill-", dir="."))
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Refused(f"--out-dir {out_dir or '.'}: {exc.strerror or exc}") from None
    posts: Any
    if notifier == "rules":
        from rollbackd.actions.factory import make_notifiers

        try:
            posts = make_notifiers(config.settings)
        except ValueError as exc:
            raise Refused(f"{config.source}: {exc}") from None
    else:
        posts = ConsoleNotifier(summarize_repeats=True) if notifier == "console" else NullNotifier()
    writer = _measurements(measurements_out, config)  # its tee (the report's tap) is set by the drill
    result = run_drill(recording, config, speed=factor, out_dir=out, notifier=posts,
                       progress=ProgressPrinter(sys.stderr), measurements=writer)
    click.echo(f"incidents: {len(result.incidents)}")
    for inc in result.incidents:
        status = "open" if inc["resolved_at"] is None else f"resolved {_ts(inc['resolved_at'])}"
        rules_hit = ", ".join(a["rule"] for a in inc["alerts"])
        click.echo(f"  {inc['id']}  {inc['deployment']}  opened {_ts(inc['opened_at'])}  {status}  "
                   f"severity {inc['severity']}  ({rules_hit})")
    _print_muted(result.summary)
    _print_not_evaluated(result.summary)
    _print_measurements(writer)
    click.echo(f"report: {result.report_path}" + "".join(f"\n  {p}" for p in result.report.pngs))
    click.echo(f"decision log: {result.decisions_path}\nledger: {result.ledger_path} (run {result.run_id})")


@main.command()
@click.argument("recording", type=click.Path(dir_okay=False, exists=True))
@click.option("--config", "-c", "rules", required=True, type=click.Path(dir_okay=False), help="Rules file (A).")
@click.option("--against", type=click.Path(dir_okay=False), default=None,
              help="Another version of the rules (B): print the decisions that differ.")
@click.option("--truth", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Labelled fault intervals (YAML; `simulate --truth` writes one): detection delay, "
                   "missed faults and false alerts per rule.")
@click.option("--grace", default="5m", show_default=True,
              help="A firing this long after a fault ended is not a false alert.")
@click.option("--json", "as_json", is_flag=True, help="Print every decision and score as JSON.")
def backtest(recording: str, rules: str, against: str | None, truth: str | None, grace: str, as_json: bool) -> None:
    """Run rules over history: when each alert would have fired and each rollback run; with
    --against, the difference between two rule versions; with --truth, how well each rule did.
    Nothing is called: rollbacks go to a simulated backend, notices nowhere."""
    import yaml

    from rollbackd.drills import backtest as run_backtest
    from rollbackd.rules.durations import parse_duration

    config_a = _load_config(rules)
    config_b = _load_config(against) if against else None
    try:
        result = run_backtest(recording, config_a, config_b, truth, grace=parse_duration(grace))
    except (ValueError, yaml.YAMLError) as exc:  # the truth file or --grace
        click.echo(f"{truth}: {exc}" if isinstance(exc, yaml.YAMLError) else str(exc), err=True)
        sys.exit(EXIT_CONFIG)
    if as_json:
        click.echo(json.dumps(result.to_record(), sort_keys=True))
    else:
        click.echo(result.format_text(), nl=False)


@main.command("test-rules")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def test_rules(files: tuple[str, ...]) -> None:
    """Run rule unit tests (like promtool test rules): inputs and the alerts expected.
    Exit code 1 when a test fails, 2 when a file is invalid."""
    from rollbackd.ruletests import RuleTestError, exit_code, format_results, run_rule_tests

    worst = 0
    for path in files:
        try:
            results = run_rule_tests(path)
        except RuleTestError as exc:
            for error in exc.errors:
                click.echo(error, err=True)
            worst = EXIT_CONFIG
            continue
        click.echo(format_results(results, path), nl=False)
        worst = max(worst, exit_code(results))
    sys.exit(worst)


@main.command()
@click.argument("incident", required=False)
@click.option("--db", default="rollbackd.db", show_default=True,
              help="Ledger to read the incident from (must exist; not read with --decisions).")
@click.option("--run", "run_id", default=None, help="Run id (default: the latest run that holds the incident).")
@click.option("--decisions", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read a decision log instead of the ledger.")
@click.option("--config", "-c", "rules", type=click.Path(dir_okay=False), default=None,
              help="The rules file: adds clear thresholds and directions to the plots.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, callback=_parent_exists,
              help="HTML file (default: INCIDENT.html).")
@click.option("--measurements", "measurements_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A measurements file (--measurements-out of replay, drill or run; JSON Lines or Parquet): "
                   "plot every rule's series. Without --decisions the ledger is read only when it exists.")
@click.pass_context
def report(ctx: click.Context, incident: str | None, db: str, run_id: str | None, decisions: str | None,
           rules: str | None, out: str | None, measurements_file: str | None) -> None:
    """Write an incident report: one self-contained HTML file with the timeline and plots of the
    breached measurements (PNGs beside it when matplotlib is installed). Without INCIDENT: the
    whole run. With --measurements: every rule's series too."""
    from rollbackd.report import decisions_from_ledger, load_decisions, select_incident, write_report

    config = _load_config(rules) if rules else None
    measured = _load_measurements(measurements_file)
    db_given = ctx.get_parameter_source("db") is not click.core.ParameterSource.DEFAULT
    try:
        if measured is not None and not decisions and not db_given and not Path(db).exists():
            records, source = [], measurements_file  # the series alone
        elif decisions:
            records = load_decisions(decisions)
            if incident:
                records = select_incident(records, incident)
            source = decisions
        else:
            _existing_ledger(db)
            run, records = decisions_from_ledger(db, incident_id=incident, run_id=run_id)
            source = f"{db}, run {run}"
    except LookupError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    path = Path(out or f"{incident or 'report'}.html")
    title = f"Incident {incident}" if incident else f"Decisions of {source}"
    result = write_report(records, path, title=title, config=config,
                          measurements=measured.records if measured is not None else None)
    click.echo(f"{result.html}: {result.plots} plot(s) from {len(records)} decisions ({source})"
               + (f" and {len(measured.records):,} measurements" if measured is not None else ""))
    if measured is not None and measured.skipped:
        click.echo(f"{measurements_file}: {measured.skipped:,} line(s) that are not measurement records skipped",
                   err=True)
    for png in result.pngs:
        click.echo(f"  {png}")


def _load_measurements(path: str | None) -> Any:
    if path is None:
        return None
    from rollbackd.measurements import ParquetUnavailable, load_measurements

    try:
        return load_measurements(path)
    except ParquetUnavailable as exc:
        raise Refused(str(exc)) from None
    except ValueError as exc:
        raise Refused(f"{path}: not a measurements file ({exc})") from None
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror or exc}") from None


def _kafka_env(env: dict[str, str]) -> dict[str, str]:
    """``ROLLBACKD_KAFKA_SASL_MECHANISM=PLAIN`` → ``{"sasl.mechanism": "PLAIN"}``: any librdkafka
    setting can come from the environment without touching a file. A secret can come from a file
    (a mounted Kubernetes Secret): ``ROLLBACKD_KAFKA_SASL_PASSWORD_FILE=/path`` sets
    ``sasl.password`` to the file's content (no librdkafka setting ends in ``.file``)."""
    from rollbackd.actions.factory import read_secret_file

    prefix = "ROLLBACKD_KAFKA_"
    out: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if rest.endswith("_FILE"):
            key = rest[: -len("_FILE")].lower().replace("_", ".")
            if prefix + rest[: -len("_FILE")] in env:
                raise click.UsageError(f"set {prefix}{rest[: -len('_FILE')]} or {name}, not both")
            try:
                out[key] = read_secret_file("kafka", name, value)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        else:
            out[rest.lower().replace("_", ".")] = value
    return out


def _kafka_options(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--kafka-config")
        out[key.strip()] = value
    return out


def _group_state(servers: str, group_id: str, state_topic: str, decisions_topic: str,
                 inputs: list[str], kconf: dict[str, str], instance_id: str | None = None,
                 checkpoint_every: float = 5.0) -> Any:
    """The scale-out store, its topics created when missing (decisions: one partition per
    input partition, so each task writes its own). Its producer is transactional: with
    ``--instance-id`` its ``transactional.id`` is ``rollbackd-<group>-<instance>`` (a restart
    aborts what its predecessor left open at once), else a new one per start."""
    from confluent_kafka.admin import AdminClient

    from rollbackd.daemon.kafka import CLIENT_DEFAULTS
    from rollbackd.daemon.scaleout import GroupState, ensure_topics, record_cap
    from rollbackd.errors import Recoverable

    admin_conf = {k: v for k, v in kconf.items() if not k.startswith(("group.", "partition.assignment"))}
    refs_topic = f"{state_topic}.refs"  # complete drift references, each written once
    topics = (state_topic, decisions_topic, refs_topic)
    try:
        admin = AdminClient({**CLIENT_DEFAULTS, **admin_conf, "bootstrap.servers": servers})
        meta = admin.list_topics(timeout=10).topics
        partitions = max((len(meta[t].partitions) for t in inputs if t in meta), default=1)
        ensure_topics(admin, state_topic, decisions_topic, partitions, refs_topic)
        deadline = time.monotonic() + 15
        while True:  # a topic just created takes a moment to show in the metadata
            have = admin.list_topics(timeout=10).topics
            if all(t in have for t in topics) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = [t for t in topics if t not in have]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not in the cluster's metadata 15 s after creation")
        cap = record_cap(admin, (state_topic, refs_topic))
    except (Recoverable, Exception) as exc:  # noqa: BLE001 - a start-up error, said clearly
        _say("state_topics.unavailable", f"rollbackd: cannot prepare {state_topic} / {decisions_topic}: {exc}",
             error=True, state_topic=state_topic, decisions_topic=decisions_topic, detail=str(exc))
        sys.exit(EXIT_CONFIG)
    for name in topics:
        if len(have[name].partitions) < partitions:
            _say("state_topics.too_few_partitions",
                 f"rollbackd: {name} has {len(have[name].partitions)} partition(s); the inputs have "
                 f"{partitions}: give it at least as many (one per task)",
                 error=True, topic=name, partitions=len(have[name].partitions), needed=partitions)
            sys.exit(EXIT_CONFIG)
    # A transaction spans one checkpoint interval; past its timeout the coordinator aborts it
    # (and a successor waits at most that long for a dead instance's open transaction).
    try:
        return GroupState(servers, group_id, state_topic, decisions_topic, config=admin_conf,
                          transactional_id=f"rollbackd-{group_id}-{instance_id}" if instance_id else None,
                          transaction_timeout=max(10.0, 3 * checkpoint_every), refs_topic=refs_topic,
                          max_record_bytes=cap)
    except ValueError as exc:  # a topic whose max.message.bytes is too small for a record's parts
        _say("state_topics.unusable", f"rollbackd: {state_topic} / {refs_topic}: {exc} (raise the "
             "topics' max.message.bytes)", error=True, state_topic=state_topic, detail=str(exc))
        sys.exit(EXIT_CONFIG)


def _start_digest(config: Any, notifier: Any, db: str, run_id: str, deliver: Any = None) -> Any:
    """The digest of incidents (``settings.notifier.digest``) on a background scheduler, or None."""
    spec = config.settings.notifier.digest
    if spec is None:
        return None
    from rollbackd.actions.digest import DigestScheduler
    from rollbackd.daemon.clock import WallClock
    from rollbackd.daemon.ledger import digest_rows

    digest = DigestScheduler(spec, notifier, lambda start, end: digest_rows(db, run_id, start, end),
                             WallClock().now, deliver=deliver)
    digest.start()
    _say("digest.scheduled", f"rollbackd: incident digest at '{spec.cron}' ({spec.timezone})",
         cron=spec.cron, timezone=spec.timezone)
    return digest


def _environment_secret(name: str) -> str | None:
    """A secret the daemon reads from its environment: from the file ``<name>_FILE`` names (a
    mounted Kubernetes Secret), else from ``<name>``; a file named but unusable stops the start."""
    from rollbackd.actions.factory import read_secret_file

    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return read_secret_file("rollbackd", f"{name}_FILE", path)
        except ValueError as exc:
            raise Refused(str(exc)) from None
    return os.environ.get(name) or None


def _reload_config(path: str, dry_run: bool) -> Any:
    """The rules file read again for a reload, checked as at start (``ConfigError`` lists every
    error), ``--dry-run`` applied as at start; the reference files its deployments name must
    still exist (``ValueError``)."""
    from rollbackd.rules.loader import load_config

    config = load_config(path)
    if dry_run:
        config = _forced_dry_run(config)
    missing = [f"deployment {d.name}: reference file {d.reference} not found"
               for d in config.deployments.values() if d.reference and not Path(d.reference).is_file()]
    if missing:
        raise ValueError("\n".join(missing))
    return config


def _bootstrap(value: str | None) -> str:
    value = value or os.environ.get("ROLLBACKD_BOOTSTRAP_SERVERS") or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not value:
        raise click.UsageError("no Kafka cluster: pass --bootstrap-servers or set ROLLBACKD_BOOTSTRAP_SERVERS")
    return value


@_from_environment(skip=("kafka_config",))
@main.command()
@click.option("--config", "-c", "rules", required=True, type=click.Path(dir_okay=False), help="Rules file.")
@click.option("--bootstrap-servers", envvar="ROLLBACKD_BOOTSTRAP_SERVERS", default=None,
              help="Kafka bootstrap servers (or env KAFKA_BOOTSTRAP_SERVERS).")
@click.option("--group-id", default="rollbackd", show_default=True,
              help="Kafka consumer group; also names the run in the ledger "
                   "(live-GROUP), so a restart continues the same run.")
@click.option("--instance-id", default=None,
              help="Static group membership (group.instance.id): a restarted instance gets its "
                   "partitions back at once instead of after the session timeout. With "
                   "--state-topic it also names the instance's transactional.id, so a restart "
                   "aborts what its predecessor left open at once.")
@click.option("--topic", "topics", multiple=True, envvar="ROLLBACKD_TOPICS",
              help="Topic to consume (repeatable; in the environment, space-separated). "
                   "Default: predictions and outcomes.")
@click.option("--kafka-config", "kafka_config", multiple=True,
              help="librdkafka setting KEY=VALUE (repeatable), e.g. security.protocol=SASL_SSL. "
                   "Also from env ROLLBACKD_KAFKA_<KEY> (dots as underscores).")
@click.option("--dead-letter-topic", default=None, help="Send rejected messages here (default: a JSONL file).")
@click.option("--dead-letter", default="rollbackd.rejected.jsonl", show_default=True, callback=_parent_exists,
              help="File that rejected messages are appended to (without --dead-letter-topic).")
@click.option("--db", default="rollbackd.db", show_default=True, callback=_parent_exists,
              help="SQLite ledger file (created if missing).")
@click.option("--decisions-out", default="rollbackd.decisions.jsonl", show_default=True, callback=_parent_exists,
              help="Decision log (JSON Lines), appended to.")
@click.option("--checkpoint", default="rollbackd.checkpoint", show_default=True, callback=_parent_exists,
              help="State snapshot file: a restart resumes from it (not used with --state-topic).")
@click.option("--checkpoint-every", default=5.0, show_default=True, type=_SECONDS,
              help="Seconds between checkpoints.")
@click.option("--idle-after", default=30.0, show_default=True, type=_SECONDS,
              help="Seconds without events before event time follows the wall clock.")
@click.option("--lag-limit", default=None, type=click.IntRange(min=1),
              help="Consumer lag (messages) that counts as blind, as failing reads do.")
@click.option("--blind-after", default=30.0, show_default=True, type=_SECONDS,
              help="Seconds blind (reads failing, brokers silent, or lag over --lag-limit) before "
                   "the 'monitoring blind' notice.")
@click.option("--stop-timeout", default=25.0, show_default=True, type=_SECONDS,
              help="Seconds from SIGTERM to exit, even with the brokers gone (the checkpoint is "
                   "written; a commit or group leave that cannot finish in time is given up).")
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(min=1),
              help="Most messages consumed and processed per step.")
@click.option("--dry-run", is_flag=True,
              help="Every rollback is a dry run, whatever the rules file says (even dry_run: false).")
@click.option("--http", "http_listen", default=None, metavar="[HOST:]PORT",
              help="Serve /metrics, /healthz, /readyz, /incidents (a bare port means 127.0.0.1; "
                   "0.0.0.0:9464 in a container).")
@click.option("--state-topic", default=None,
              help="Scale out: keep task state in this compacted topic (instead of --checkpoint), so "
                   "partitions can move between the instances of the group. State, decisions and "
                   "offsets are committed in Kafka transactions (exactly-once; brokers >= 2.5).")
@click.option("--decisions-topic", default=None,
              help="With --state-topic: publish every decision here (default: <state topic>.decisions).")
@click.option("--measurements-out", type=click.Path(dir_okay=False), default=None, callback=_parent_exists,
              help="Append every evaluation to this file (JSON Lines, flushed every minute of event time); "
                   "see `rollbackd replay --help`. Evaluations after the last checkpoint may appear twice "
                   "after a restart.")
@click.option("--watch-rules", default=None, type=_SECONDS, metavar="SECONDS",
              help="Also reload the rules when the file's content changes, looked at every SECONDS "
                   "(default: only on SIGHUP). A reload applies a file that validates; else the "
                   "running rules are kept and a notice says why.")
@_key_file_option
@_anchors_option
def run(rules: str, bootstrap_servers: str | None, group_id: str, instance_id: str | None, topics: tuple[str, ...],
        kafka_config: tuple[str, ...], dead_letter_topic: str | None, dead_letter: str, db: str,
        decisions_out: str, checkpoint: str, checkpoint_every: float, idle_after: float,
        lag_limit: int | None, blind_after: float, stop_timeout: float, batch_size: int, dry_run: bool,
        http_listen: str | None, state_topic: str | None, decisions_topic: str | None,
        measurements_out: str | None, watch_rules: float | None, ledger_key_file: str | None,
        anchors: str | None) -> None:
    """Run the daemon on Kafka: consume, decide, act; checkpoint and survive restarts.
    SIGHUP reloads the rules file (see --watch-rules)."""
    import signal

    from rollbackd.daemon.clock import WallClock
    from rollbackd.daemon.decisions import DecisionLog
    from rollbackd.daemon.kafka import KafkaDeadLetter, KafkaSource
    from rollbackd.daemon.ledger import Ledger
    from rollbackd.daemon.reload import RulesReload
    from rollbackd.daemon.replay import build_pipeline
    from rollbackd.daemon.run import Daemon, RunSettings
    from rollbackd.daemon.scaleout import DecisionsTopicAnchors, GroupDecisions, GroupRecorder
    from rollbackd.errors import Fatal
    from rollbackd.events import EventDecoder

    config, notifier, backends = _prepare(_load_config(rules), None, dry_run)
    servers = _bootstrap(bootstrap_servers)
    if measurements_out is not None:
        from rollbackd.measurements import is_parquet

        if is_parquet(measurements_out):  # its footer is written at close: a crash would lose it all
            raise Refused(f"--measurements-out {measurements_out}: run writes JSON Lines (a Parquet file is "
                          "readable only once closed); give a .jsonl file")
    # Opened before the run's first ledger row; its tee (/metrics' tap) is set once that exists.
    # Written on the processing thread, through the file's bounded buffer, flushed each minute
    # of event time; a failed write is logged and the writer stops, the daemon goes on.
    writer = _measurements(measurements_out, config, append=True, flush_every=60.0)
    topic_list = [t for item in topics for t in item.split()] or ["predictions", "outcomes"]
    kconf = {**_kafka_env(dict(os.environ)), **_kafka_options(kafka_config)}
    if instance_id:
        kconf["group.instance.id"] = instance_id
    # One stable run id per consumer group: a restart continues the same run in the ledger,
    # which is how the outbox recognises actions that were already done.
    try:
        decisions = DecisionLog(decisions_out, append=True)
    except OSError as exc:
        raise Refused(f"{decisions_out}: {exc.strerror or exc}") from None
    ledger: Ledger = _open_ledger(db, run_id=f"live-{group_id}", key_file=ledger_key_file)
    ledger.start_run("live", ",".join(topic_list), config.source, datetime.now(timezone.utc).isoformat())
    # A restart (and, with a state topic, a transaction that did not commit) rewinds the ledger
    # to the last checkpoint's marks: anchors cover no row beyond them.
    anchoring = _anchoring(ledger, db, anchors, rewound=True)
    dead = KafkaDeadLetter(servers, dead_letter_topic, config=kconf) if dead_letter_topic else None
    group = None
    sink: Any = decisions
    recorder: Any = ledger
    if state_topic:
        group = _group_state(servers, group_id, state_topic, decisions_topic or f"{state_topic}.decisions",
                             topic_list, kconf, instance_id, checkpoint_every)
        sink, recorder = GroupDecisions(decisions, group), GroupRecorder(ledger, group)
        anchoring.sinks.append(DecisionsTopicAnchors(group))  # and to the decisions topic
        if len(topic_list) > 1:
            # A task is one partition number of every input topic: co-partitioned assignment.
            kconf.setdefault("partition.assignment.strategy", "range")
    pipeline = build_pipeline(
        config, decisions=sink, recorder=recorder,  # silences and approvals: pushed in from the ledger
        dead_letter_path=None if dead else dead_letter, notifier=notifier, backend_overrides=backends,
    )
    if dead is not None:
        pipeline.edges.dead_letters = dead
    # A commit waiting for an absent coordinator must leave room for the rest of a bounded stop.
    source = KafkaSource(servers, group_id, topic_list, EventDecoder(config.settings.max_event_bytes), config=kconf,
                         commit_timeout=min(10.0, stop_timeout / 2))
    daemon = Daemon(
        pipeline, source, ledger=ledger, decisions=decisions, notifier=notifier, name=f"rollbackd/{group_id}",
        settings=RunSettings(checkpoint_path=checkpoint, checkpoint_every=checkpoint_every,
                             batch_size=batch_size, idle_after=idle_after, lag_limit=lag_limit,
                             blind_after=blind_after, stop_timeout=stop_timeout),
        state=group, anchoring=anchoring,
        reloads=RulesReload(rules, lambda path: _reload_config(path, dry_run), WallClock(), watch_every=watch_rules),
    )

    def on_signal(signum: int, frame: Any) -> None:
        daemon.stop()  # finish the batch, checkpoint, commit, close

    ops = None
    if http_listen:
        from rollbackd.actions.factory import notifier_name
        from rollbackd.daemon.http import parse_listen, serve_daemon

        try:
            host, port = parse_listen(http_listen)
            slack = None
            secret = _environment_secret("ROLLBACKD_SLACK_SIGNING_SECRET")
            if secret:
                from rollbackd.daemon.slack_actions import slack_interactions

                slack = slack_interactions(config, daemon.pipeline, secret, db, ledger_key=ledger.key,
                                           clock=daemon.clock)
            ops = serve_daemon(daemon, host, port, notifier=notifier_name(config.settings), slack=slack)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--http") from None
        except OSError as exc:
            _say("http.cannot_listen", f"--http {http_listen}: {exc.strerror or exc}", error=True,
                 listen=http_listen, detail=str(exc.strerror or exc))
            sys.exit(EXIT_CONFIG)
        _say("http.serving", f"rollbackd: /metrics /healthz /readyz /incidents on {ops.url}", url=ops.url)
    if writer is not None:  # after serve_daemon: /metrics keeps its tap, the writer passes each call on
        writer.tee = pipeline.edges.tap
        pipeline.edges.tap = writer
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.reloads.install()  # SIGHUP: the loop reloads the rules between batches
    # The digest's notice goes through the daemon's executor like every other notice.
    digest = _start_digest(config, notifier, db, ledger.run_id, deliver=daemon.post_from_thread)
    _say("daemon.consuming", f"rollbackd: consuming {', '.join(topic_list)} from {servers} as group {group_id}",
         topics=topic_list, bootstrap_servers=servers, group=group_id)
    failure = None
    try:
        daemon.run()
    except Fatal as exc:  # retrying cannot help: say why and exit non-zero (the supervisor restarts)
        failure = str(exc)
    finally:
        if digest is not None:
            digest.stop()
        if ops is not None:
            ops.stop()
        from rollbackd.actions.base import ClosableNotifier

        if isinstance(notifier, ClosableNotifier):
            notifier.close()  # Alertmanager's re-sending: its alerts end at their endsAt
        if writer is not None:
            writer.close()
            _say("measurements.closed", f"rollbackd: {writer.written:,} measurement records in {writer.path}"
                 + (f" (writing stopped after an error: {writer.errors})" if writer.errors else ""),
                 path=writer.path, written=writer.written, errors=writer.errors)
        decisions.close()
        if dead is not None:
            dead.close()
        if group is not None:
            group.close()
        summary = daemon.pipeline.summary()
        ledger.finish_run({**summary, "failure": failure} if failure else summary,
                          datetime.now(timezone.utc).isoformat())
        anchoring.publish(WallClock().now())
        ledger.close()
    if failure is not None:
        _say("daemon.failed", f"rollbackd: stopped: {failure}", error=True, detail=failure)
        sys.exit(1)


@main.command()
@click.option("--bootstrap-servers", default=None, help="Kafka bootstrap servers (or env).")
@click.option("--topic", "topics", multiple=True, required=True, help="Topic to capture (repeatable).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_parent_exists,
              help="Recording (.jsonl or .jsonl.gz).")
@click.option("--duration", default=None, help="Stop after this long (e.g. 10m); default: at the end of the topics.")
@click.option("--max-events", default=None, type=click.IntRange(min=1),
              help="Stop after this many events (default: no limit).")
def record(bootstrap_servers: str | None, topics: tuple[str, ...], out: str, duration: str | None,
           max_events: int | None) -> None:
    """Capture live events from Kafka into a recording, for drills and backtests."""
    from rollbackd.daemon.kafka import record as do_record
    from rollbackd.rules.durations import parse_duration

    try:
        seconds = parse_duration(duration) if duration else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    n = do_record(_bootstrap(bootstrap_servers), list(topics), out, duration=seconds, max_events=max_events)
    click.echo(f"{out}: {n:,} events")


@main.command()
@click.argument("recording", type=click.Path(dir_okay=False, exists=True))
@click.option("--bootstrap-servers", default=None, help="Kafka bootstrap servers (or env).")
@click.option("--topic", required=True, help="Topic to write the events to.")
@click.option("--speed", default="max", show_default=True,
              help="1x keeps the recording's timing, 10x plays ten times faster, max as fast as possible.")
def publish(recording: str, bootstrap_servers: str | None, topic: str, speed: str) -> None:
    """Write a recording into Kafka, keyed by deployment, preserving relative timing."""
    from rollbackd.daemon.kafka import publish as do_publish

    if speed == "max":
        factor = None
    else:
        try:
            factor = float(speed.rstrip("x"))
        except ValueError:
            raise click.BadParameter(f"{speed!r}: use 1x, 10x, ... or max", param_hint="--speed") from None
    n = do_publish(_bootstrap(bootstrap_servers), topic, recording, speed=factor)
    click.echo(f"{topic}: {n:,} events published")


def _check_names(config: Any, rules: str, deployment: str, rule: str | None) -> None:
    """A silence's deployment and rule must be named in the rules file (a typo would mute
    nothing): a usage error with the closest name, as validate suggests one."""
    import difflib

    def unknown(kind: str, name: str, known: set[str]) -> None:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known)) or 'none'}"
        raise click.BadParameter(f"{rules} has no {kind} {name!r}{hint}", param_hint=f"--{kind}")

    # A deployment a rule's glob takes in is known too, though it is not declared.
    deployments = set(config.deployments)
    if deployment not in deployments and not any(
        r.deployments is not None and r.covers(deployment) for r in config.rules
    ):
        unknown("deployment", deployment, deployments)
    if rule is not None:
        names = {r.name for r in config.rules}
        if rule not in names:
            unknown("rule", rule, names)


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
@click.option("--deployment", required=True, help="The deployment to mute.")
@click.option("--rule", default=None, help="Only this rule (default: every rule).")
@click.option("--variant", default=None, help="Only this variant (default: every variant).")
@click.option("--for", "duration", required=True, help="How long, e.g. 2h, 30m.")
@click.option("--starts-at", default=None,
              help="Start (ISO 8601 with offset, or Unix seconds); default now. Event time: a "
                   "silence for a drill or a replay is set in the recording's time.")
@click.option("--reason", required=True, help="Why (shown in silence list and kept in the ledger).")
@click.option("--by", "by", required=True, help="Who sets it.")
@click.option("--config", "-c", "rules", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Rules file: refuse a deployment or rule name it does not know.")
@click.option("--db", default="rollbackd.db", show_default=True, callback=_parent_exists,
              help="SQLite ledger file; created if missing, so a silence can precede the daemon's first run.")
def silence_add(deployment: str, rule: str | None, variant: str | None, duration: str,
                starts_at: str | None, reason: str, by: str, rules: str | None, db: str) -> None:
    """Add a silence of DEPLOYMENT (or one rule or variant of it) for a while."""
    from rollbackd.daemon.clock import WallClock
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
    if rules:
        _check_names(_load_config(rules), rules, deployment, rule)
    created = not Path(db).exists()
    ledger = _open_ledger(db)
    ledger.add_silence(s, datetime.now(timezone.utc).isoformat())
    ledger.close()
    if created:
        click.echo(f"rollbackd: created a new ledger {Path(db).resolve()}", err=True)
    click.echo(f"{s.id}: {deployment}{'/' + variant if variant else ''} rule {rule or '*'} "
               f"silenced {_ts(s.starts_at)} to {_ts(s.ends_at)} UTC by {by}: {reason}")


@silence.command("list")
@click.option("--db", default="rollbackd.db", show_default=True, help="SQLite ledger file (must exist).")
@click.option("--all", "show_all", is_flag=True, help="Include silences that have ended.")
def silence_list(db: str, show_all: bool) -> None:
    """List the silences in force or upcoming (with --all, ended ones too)."""
    from rollbackd.daemon.clock import WallClock

    now = WallClock().now()
    _existing_ledger(db)
    ledger = _open_ledger(db, write=False)  # reading needs no key
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
@click.option("--by", "by", default="cli", show_default=True, help="Who ends it.")
@click.option("--at", "at", default=None, help="When it ends (default now; ISO 8601 or Unix seconds).")
@click.option("--db", default="rollbackd.db", show_default=True, help="SQLite ledger file (must exist).")
def silence_expire(silence_id: str, by: str, at: str | None, db: str) -> None:
    """End silence SILENCE_ID (now, or --at); exit 1 when the ledger has no such silence."""
    from rollbackd.daemon.clock import WallClock

    _existing_ledger(db)
    ledger = _open_ledger(db)
    ok = ledger.expire_silence(silence_id, _parse_when(at, WallClock().now()), by,
                               datetime.now(timezone.utc).isoformat())
    ledger.close()
    if not ok:
        click.echo(f"no silence {silence_id}", err=True)
        sys.exit(1)
    click.echo(f"{silence_id}: expired")


@main.command()
@click.argument("incident")
@click.option("--reject", is_flag=True, help="Reject the rollback instead of approving it.")
@click.option("--by", "by", required=True, help="Who answers: must be one of the deployment's approvers.")
@click.option("--at", "at", default=None,
              help="When the answer takes effect (ISO 8601 with offset, or Unix seconds); default "
                   "now. Event time: for a drill or a replay, set it in the recording's time.")
@click.option("--reason", default="", help="Why (kept in the ledger).")
@click.option("--db", default="rollbackd.db", show_default=True,
              help="The SQLite ledger the daemon (or replay) writes; must exist and hold the waiting rollback.")
def approve(incident: str, reject: bool, by: str, at: str | None, reason: str, db: str) -> None:
    """Approve (or --reject) a rollback of INCIDENT that waits for approval. The daemon reads
    the answer from the ledger at its next window boundary; an answer from someone who is not
    among the deployment's `approval.approvers` is recorded but does not count. Refused (exit 2)
    when the ledger does not exist or no rollback of INCIDENT waits in it."""
    from rollbackd.daemon.clock import WallClock

    when = _parse_when(at, WallClock().now())
    _existing_ledger(db)
    _check_waiting(db, incident)
    ledger = _open_ledger(db)
    decision = "reject" if reject else "approve"
    ledger.add_approval(incident, decision, by, when, datetime.now(timezone.utc).isoformat(),
                        reason=reason, source="cli")
    ledger.close()
    click.echo(f"{incident}: {decision.rstrip('e')}ed by {by} at {_ts(when)} UTC")


def _check_waiting(db: str, incident: str) -> None:
    """Refuse an answer nothing ever waited for: INCIDENT must have had a rollback that waited
    for approval (``pending_approval``) in the ledger. When every such wait is settled already
    (answered, or its timeout applied) the answer is still recorded, with a warning: a replay
    of the same events reads it at its ``at``, which is how a drill is answered."""
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "select run_id, variant, status from actions where incident_id = ? and action = 'rollback'"
            " and phase = 'finished' order by seq", [incident],
        ).fetchall()
        known = rows or conn.execute("select 1 from incidents where incident_id = ? limit 1", [incident]).fetchone()
    finally:
        conn.close()
    if not known:
        raise Refused(f"{db}: no incident {incident}")
    if not any(status == "pending_approval" for _, _, status in rows):
        last = f"its last rollback is {rows[-1][2]}" if rows else "it has no rollback"
        raise Refused(f"{incident}: no rollback of it waited for approval in {db} ({last})")
    latest = {(run, variant): (run, status) for run, variant, status in rows}
    if not any(status == "pending_approval" for _, status in latest.values()):
        run, status = rows[-1][0], rows[-1][2]
        click.echo(f"warning: {incident}: its wait is settled already (run {run}: {status}); this answer "
                   "counts only for a later replay of the same events", err=True)


@main.group()
def audit() -> None:
    """Check the ledger's integrity."""


@audit.command("verify")
@click.option("--db", default="rollbackd.db", show_default=True, help="SQLite ledger file (must exist).")
@click.option("--anchors", type=click.Path(dir_okay=False), default=None,
              help="Anchor file (JSON lines) to check the ledger against (default: the ledger's path + "
                   ".anchors when it exists). Anchors from the decisions topic, one per line, work too.")
@_key_file_option
def audit_verify(db: str, anchors: str | None, ledger_key_file: str | None) -> None:
    """Check the ledger's chains link by link, and its rows against every anchor; exit 1 naming
    each break (the first of each chain), 2 when it cannot be checked (a keyed ledger without
    its key). Without anchors a cut-off tail cannot show; without a key, neither can a chain
    rewritten and re-linked by someone who can write the file."""
    from rollbackd.daemon.audit import AuditRefused, read_anchors, verify_ledger

    _existing_ledger(db)
    key = _ledger_key(ledger_key_file)
    path = anchors or f"{db}.anchors"
    if anchors is not None and not Path(anchors).is_file():
        raise Refused(f"{anchors}: no such anchor file")
    try:
        lines = read_anchors(path) if Path(path).is_file() else []
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror or exc}") from None
    try:
        report = verify_ledger(db, key, lines)
    except AuditRefused as exc:
        raise Refused(f"{db}: {exc}") from None
    _print_audit(report, path if lines else None)
    if report.breaks:
        for b in report.breaks:
            click.echo(f"BROKEN {b}", err=True)
        sys.exit(1)
    click.echo(f"ok: {report.rows} rows, {len(report.heads)} chains intact"
               + (f", {report.anchors} anchor(s) hold" if report.anchors else ""))


def _print_audit(report: Any, anchors: str | None) -> None:
    if report.ledger_id is None:
        click.echo("ledger from before keys and chain_seq (format 1): chained with plain SHA-256")
    elif report.key_id:
        click.echo(f"ledger {report.ledger_id}: keyed (HMAC-SHA256, key id {report.key_id})")
    else:
        click.echo(f"ledger {report.ledger_id}: not keyed (plain SHA-256)")
    for chain, (seq, head) in report.heads.items():
        click.echo(f"head {chain} {seq} {head}")
    if report.unchained:
        click.echo(f"{report.unchained} row(s) predate the hash chain and are not verifiable")
    if report.legacy:
        click.echo(f"{report.legacy} row(s) from an older rollbackd are checked by its unkeyed chain only")
    for run_id, start, wall in report.unfinished:
        click.echo(f"run {run_id} start {start} (started {wall}) has no end: it was killed or crashed, "
                   "or is still running")
    if anchors:
        click.echo(f"anchors: {report.anchors} checked from {anchors} (newest {report.last_anchor})")
    else:
        click.echo("no anchors: rows cut off the end of a chain, a whole chain deleted or a table emptied "
                   "cannot be detected (give --anchors)")
    if report.ledger_id is None or not report.key_id:
        click.echo("not keyed: anyone who can write the ledger can rewrite a chain and recompute every later "
                   "hash; only anchors kept out of their reach show it (set ROLLBACKD_LEDGER_KEY for new ledgers)")


@main.group()
def incidents() -> None:
    """Incidents recorded in the ledger."""


@incidents.command("list")
@click.option("--db", default="rollbackd.db", show_default=True, help="SQLite ledger file (must exist).")
@click.option("--run", "run_id", default=None, help="Only this run (default: every run).")
def incidents_list(db: str, run_id: str | None) -> None:
    """One line per incident: id, run, deployment, opened, last state, severity, rollbacks."""
    import sqlite3

    _existing_ledger(db)
    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    where, args = ("where run_id = ?", [run_id]) if run_id else ("", [])
    rows = conn.execute(
        "select run_id, incident_id, deployment, min(ts) as opened, max(severity) as severity,"
        " (select i2.change from incidents i2 where i2.run_id = i.run_id and"
        "  i2.incident_id = i.incident_id order by i2.seq desc limit 1) as state,"
        " (select count(*) from actions a where a.run_id = i.run_id and a.incident_id = i.incident_id"
        "  and a.action = 'rollback' and a.phase = 'finished') as rollbacks"
        f" from incidents i {where} group by run_id, incident_id order by opened, incident_id", args,
    ).fetchall()
    conn.close()
    if not rows:
        click.echo("no incidents")
    for r in rows:
        click.echo(f"{r['incident_id']}  {r['run_id']}  {r['deployment']}  opened {_ts(r['opened'])}  "
                   f"{r['state']:<9} severity {r['severity']}  rollbacks {r['rollbacks']}")


@incidents.command("show")
@click.argument("incident")
@click.option("--db", default="rollbackd.db", show_default=True, help="SQLite ledger file (must exist).")
@click.option("--run", "run_id", default=None, help="Run id (default: the latest run that holds it).")
def incidents_show(incident: str, db: str, run_id: str | None) -> None:
    """The incident's timeline (alerts, incident changes, actions) with the evidence of each
    alert (measured value, threshold, p-value, sample size, window) and what each backend call
    returned."""
    from rollbackd.report import decisions_from_ledger

    _existing_ledger(db)
    try:
        run, records = decisions_from_ledger(db, incident_id=incident, run_id=run_id)
    except LookupError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    if not records:
        click.echo(f"{db}: no incident {incident} in run {run}", err=True)
        sys.exit(1)
    click.echo(f"incident {incident} (run {run})")
    for rec in records:
        click.echo("  " + _timeline_line(rec))
        if rec["kind"] == "alert" and rec.get("measurement"):
            m = rec["measurement"]
            w = rec.get("window") or [None, None]
            evidence = {k: m[k] for k in ("p_value", "effect_size", "evidence") if m.get(k) is not None}
            window = f"window {_ts(w[0])} – {_ts(w[1])}" if w[0] is not None else ""
            click.echo(f"      {window}  " + json.dumps(evidence, sort_keys=True, default=str))
        elif rec["kind"] == "action":
            if rec.get("result"):
                # What the backend changed or printed (a patch, a registry alias, a command's output).
                click.echo("      result " + json.dumps(rec["result"], sort_keys=True, default=str))
            if isinstance(rec.get("verification"), dict):
                click.echo("      " + _checked_line(rec["verification"]))


def _checked_line(rec: dict[str, Any]) -> str:
    """What the target system reported back after a rollback (a ledger ``verification``)."""
    from rollbackd.actions.base import Verification

    v = Verification.from_record(rec)
    if v.verdict == "cannot_observe":
        return f"target not checked: {v.describe()}"
    return f"target {'confirmed' if v.verdict == 'confirmed' else 'NOT confirmed'} by {v.backend}: {v.describe()}"


if __name__ == "__main__":  # pragma: no cover
    main()
