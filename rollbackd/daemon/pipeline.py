"""The processing loop's core: events in, decisions and actions out.

source → decode → **join → windows → detectors → rules → incidents → actions**

``ingest`` is the hot path (per event: admission and lateness against its own deployment's
event time, pane append, join bookkeeping; see ``daemon/admission.py``).
``advance(now)`` does everything time-driven, in event-time order: at each window boundary it
closes windows, runs the detectors and steps the alert state machines, whose transitions
``daemon/alerting.py`` mutes or files with their incident; between boundaries it fires
incident deadlines (group_wait, repeat_interval). What to record, post, roll back or
pause is decided by the responder (``daemon/response.py``) and handed as intents to
``self.executor`` (``daemon/executor.py``), which reports each call's result back through
``apply_result``: nothing here calls a backend, a notifier or the ledger. No method reads a
clock; whoever drives the pipeline (replay, the live daemon, a test) passes ``now``. Given the same events
and the same ``now`` sequence up to batch boundaries, the decisions are identical: admission
and lateness are judged per event against the events before it, never against batch
boundaries. ``snapshot``/``freeze``/``restore`` write and read this state through
``daemon/checkpointing.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import structlog

from rollbackd.actions.base import ActionResult, Notifier, RollbackBackend
from rollbackd.actions.delivery import Delivery, Recorder
from rollbackd.actions.intents import Call, Intent
from rollbackd.actions.policy import SafetyState
from rollbackd.daemon.admission import MAX_EVENT_TIME, Admission, EventTime
from rollbackd.daemon.alerting import AlertRouter
from rollbackd.daemon.checkpointing import FrozenSnapshot, PipelineState
from rollbackd.daemon.clock import iso
from rollbackd.daemon.decisions import DecisionSink, NullDecisions
from rollbackd.daemon.evaluation import RuleEvaluator
from rollbackd.daemon.executor import Executor, SyncExecutor
from rollbackd.daemon.join import ENTRY_DECODE, ENTRY_ENCODE, OutcomeJoiner, Pending, unpack
from rollbackd.daemon.response import Responder
from rollbackd.daemon.splits import slice_of
from rollbackd.daemon.versions import VersionHistory
from rollbackd.daemon.windows import WindowAssembler
from rollbackd.detectors.base import Detector, Labeled, Reference, Window
from rollbackd.events import Deploy, Event, Outcome, Prediction, Rejected
from rollbackd.rules.alerts import Alert, AlertState
from rollbackd.rules.incidents import Incident, IncidentBook
from rollbackd.rules.model import Config, RuleSpec, WindowSpec
from rollbackd.rules.silences import Silence

if TYPE_CHECKING:
    from rollbackd.daemon.rules_swap import RulesChange

__all__ = ["Pipeline", "Edges"]

log = structlog.get_logger("rollbackd")

Key = tuple[str, str]
_model_version = attrgetter("model_version")


def _count_versions(predictions: list[Prediction]) -> dict[str, int]:
    """Predictions per model version, in order of first appearance (as ``Window.versions``)."""
    distinct = set(map(_model_version, predictions))
    if len(distinct) == 1:  # the usual case, at a fraction of Counter's cost
        return {distinct.pop(): len(predictions)}
    return dict(Counter(map(_model_version, predictions)))


class _NullRecorder:
    """No ledger: nothing is recorded, nothing was done before."""

    def alert(self, rec: dict[str, Any]) -> None:
        pass

    def incident(self, rec: dict[str, Any]) -> None:
        pass

    def action(self, rec: dict[str, Any], phase: str) -> None:
        pass

    def finished_action(self, key: str) -> dict[str, Any] | None:
        return None


class _NullDeadLetters:
    count = 0

    def put(self, rejected: Rejected) -> None:
        self.count += 1


@dataclass
class Edges:
    """Everything with I/O that the pipeline talks to, injected."""

    notifier: Notifier
    backend_for: Callable[[str], RollbackBackend]  # deployment name -> backend
    decisions: DecisionSink = NullDecisions()
    recorder: Recorder = _NullRecorder()
    dead_letters: Any = None  # DeadLetterSink: put(rejected)
    references: Callable[[str], Reference | None] = lambda deployment: None
    drill: bool = False
    tap: Any = None  # report.MeasurementTap: sees every evaluation (reports, /metrics)


class Pipeline:
    def __init__(self, config: Config, edges: Edges, silences: Sequence[Silence] = ()) -> None:
        self.config = config
        self.silences = tuple(silences)
        self._muted: set[tuple[str, Key]] = set()  # alerts whose firing episode is muted
        self.edges = edges
        if edges.dead_letters is None:
            edges.dead_letters = _NullDeadLetters()
        s = config.settings
        self.lateness = s.lateness
        self._use_rules(config, WindowAssembler([r.window for r in config.rules]))
        self.joiner = OutcomeJoiner(horizon=s.join_horizon, max_pending=s.max_pending_labels)
        self.book = IncidentBook(config.grouping)
        # (rule, (deployment, variant)) or, for a sliced rule, (rule, (deployment, variant, slice))
        self.detectors: dict[tuple[str, Key], Detector] = {}
        self.alerts: dict[tuple[str, Key], Alert] = {}
        self.versions: dict[Key, VersionHistory] = {}
        self.safety = SafetyState()
        # Rollbacks waiting for a human, by "<incident>:<variant>": rule, variant, deadline.
        self.awaiting: dict[str, dict[str, Any]] = {}
        # Rollbacks skipped for want of a target, by "<incident>:<variant>": decided again when
        # the arm's versions change (Responder.retry_stalled).
        self.stalled: dict[str, dict[str, Any]] = {}
        # What gets in, and event time per deployment (see daemon/admission.py).
        self.admission = Admission(s, s.join_horizon, config.deployments)
        self.event_time = EventTime(s.lateness, s.max_future_skew)
        # The last window boundary processed (or skipped as quiet): nothing may be filed before
        # it. In a replay it never passes the watermark; live, the idle tick may move it on.
        self._closed = -math.inf
        # The last boundary at which any data was buffered, and how long after it every alert
        # has settled (see _settle_span): past that, empty boundaries are skipped.
        self._data_until = -math.inf
        self.counters: Counter[str] = Counter()
        self.muted_episodes: Counter[str] = Counter()  # firing episodes muted, by what muted them
        self.rejects: Counter[str] = Counter()
        self._known_keys: set[Key] = set()
        self._slots: dict[Key, tuple[int, list[Prediction], list[Labeled]]] = {}
        self._next_boundary: float | None = None
        self.evaluator = RuleEvaluator(self)  # windows measured, alerts stepped
        self.checkpointing = PipelineState(self)  # snapshots, and what keeps the next one cheap
        self.router = AlertRouter(self)  # alert transitions: muted, or to their incident
        self._init_effects()

    def _use_rules(self, config: Config, assembler: WindowAssembler) -> None:
        """What is derived from the rules: at start, and when a reload replaces them."""
        self.config = config
        self.assembler = assembler
        self.rules_by_window: dict[WindowSpec, list[RuleSpec]] = {}
        for rule in config.rules:
            self.rules_by_window.setdefault(rule.window, []).append(rule)
        self._rule_index = {r.name: r for r in config.rules}
        # How long after the last buffered data every alert has stopped changing (_settle_span).
        self._settle = _settle_span(config.rules, assembler)
        # A traffic (no-data) rule must see the empty windows of a gap: no skipping then.
        self._watches_silence = any(r.detector == "traffic" for r in config.rules)

    # Hot path -------------------------------------------------------------------------
    @property
    def max_event_time(self) -> float:
        """The stream's newest event time (the lead): the newest ``ts`` within admission's limits."""
        return self.event_time.lead

    @property
    def watermark(self) -> float:
        """Event time up to which every window may close: the slowest active deployment's
        newest event minus the lateness (``admission.EventTime``). Drivers advance to it."""
        return self.event_time.watermark

    def ingest(self, events: list[Event], wall_now: float | None = None) -> None:
        """Admit, judge lateness and file ``events``.

        The reference for future timestamps is the stream's own: the first
        ``admission.WARM_UP`` events are held until it is anchored (see :meth:`finish`).
        ``wall_now``, the wall clock of a live run, bounds it too.
        """
        adm = self.admission
        if adm.warming:
            events = adm.hold(events)
        if events:
            self._ingest(events, wall_now)
        self._cap_notices()

    def _cap_notices(self) -> None:
        """The notices of the caps that began to bind while events went in."""
        if self.admission.alarms:
            self._cardinality_notices()
        if self.joiner.alarms:
            self._label_buffer_notices()

    def _cardinality_notices(self) -> None:
        """One notice per deployment and kind whose cap first bound: names beyond it are
        dead-lettered, so on-call must know some of that deployment's traffic is not watched."""
        adm = self.admission
        for deployment, kind in adm.alarms:
            if kind == "deployments":  # one notice for all the names: no deployment to name
                title, detail = "[CARDINALITY] too many distinct deployments", adm.cap_text(kind)
            else:
                title = f"[CARDINALITY] {deployment}: too many distinct {kind}"
                detail = f"deployment {deployment!r}: {adm.cap_text(kind)}"
            self.responder.system_notice(
                f"cardinality-{deployment}-{kind}", self.max_event_time, title,
                f"{detail}; the excess is dead-lettered (reason cardinality) and not watched")
        adm.alarms.clear()

    def _label_buffer_notices(self) -> None:
        """One notice per episode of the label buffer's cap binding (join.CapBinding): labels
        are being lost, and these deployments fill the buffer."""
        for binding in self.joiner.alarms:
            self.responder.system_notice(
                f"label-buffer-{binding.since:.3f}", binding.since,
                "[LABEL BUFFER] max_pending_labels binds: labels are lost", binding.text())
        self.joiner.alarms.clear()

    def finish(self, wall_now: float | None = None) -> None:
        """The events still held for the warm-up go in: at the end of a finite stream, or live
        once everything there is to read has been read."""
        if self.admission.warming:
            held = self.admission.release()
            if held:
                self._ingest(held, wall_now)
            self._cap_notices()

    def _ingest(self, events: list[Event], wall_now: float | None) -> None:
        g = self.assembler.granularity
        lateness = self.lateness
        adm = self.admission
        et = self.event_time
        deployments_get = et.deployments.get
        # The stream's newest time, whatever became of its event: the lead of event time.
        newest = adm.newest
        fut = adm.future_limit(wall_now)
        old = adm.old_limit()
        skew = adm.skew
        # The future limit follows the stream's time, live bounded by the wall clock's.
        cap = MAX_EVENT_TIME if wall_now is None else min(MAX_EVENT_TIME, wall_now + skew)
        # Nothing may go before the watermark nor a boundary already processed.
        wm = et.watermark
        floor = max(wm, self._closed)
        top, runner, refresh_at, drop_at = et.top, et.runner, et.refresh_at, et.drop_at
        slots = self._slots
        known_keys = self._known_keys
        joiner = self.joiner
        pending_get = joiner.pending_books().get
        noted = joiner.changes_log()  # the books' changes, for the checkpoint's copy of them
        pack_entry, unpack_entry = ENTRY_ENCODE, ENTRY_DECODE
        horizon = joiner.horizon
        rejected: list[Rejected] = []
        n_pred = n_out = n_late = n_pending = n_dep = 0
        # OutcomeJoiner.match's outcomes, counted here and added to its stats at the end.
        n_popped = n_joined = n_unmatched = n_expired = n_not_needed = 0
        room = max(1, joiner.max_pending - len(joiner))  # inserts before the cap is reached
        slices_labels = self.evaluator.slices_labels
        label_paths = self.evaluator.label_paths
        seen_before = adm.seen
        for ev in events:
            ts = ev.ts
            if ts > fut or ts < old:
                position = seen_before + n_pred + n_out + n_late + n_dep + len(rejected)
                adm.newest = newest
                refused = adm.judge(ev, position, wall_now)
                if refused is not None:
                    rejected.append(refused)
                    continue
                fut = adm.future_limit(wall_now)  # the stream jumped: followed
            if ts > newest:
                # The stream's time moves on with every event within the limits, also one that
                # is refused below (a name beyond a cap): its clock is not in doubt.
                newest = ts
                if ts - horizon > old:
                    old = ts - horizon
                if ts + skew > fut:
                    fut = ts + skew
                    if fut > cap:
                        fut = cap
                if top is None and ts - skew - lateness > wm:
                    # Every deployment is silent (or none admitted yet): time still passes.
                    wm = ts - skew - lateness
                    if wm > floor:
                        floor = wm
            dep = ev.deployment
            seen = deployments_get(dep)
            if seen is None:
                if not adm.admit_deployment(dep):
                    rejected.append(adm.cardinality_rejected(ev, "deployments", dep))
                    continue
                seen = et.add(dep)
            latest = seen.max_ts
            if ts < floor or ts < latest - lateness:
                n_late += 1
                continue
            cls = type(ev)
            if cls is Prediction:
                key = (dep, ev.variant)  # type: ignore[union-attr]
                idx = int(ts // g)
                slot = slots.get(key)
                if slot is None or slot[0] != idx:
                    if key not in known_keys and not adm.room_for_variant(seen):
                        rejected.append(adm.cardinality_rejected(ev, "variants", dep))
                        continue
                    slot = None
                feats = ev.features  # type: ignore[union-attr]
                if feats and not seen.features.issuperset(feats) and not adm.admit_features(seen, ev):  # type: ignore[arg-type]
                    rejected.append(adm.cardinality_rejected(ev, "features", dep))
                    continue
            elif cls is not Outcome:  # a deploy: it makes its variant known
                key = (dep, ev.variant)  # type: ignore[union-attr]
                if key not in known_keys and not adm.room_for_variant(seen):
                    rejected.append(adm.cardinality_rejected(ev, "variants", dep))
                    continue
            # Admitted: the event moves its deployment's time (and perhaps the watermark).
            if ts > latest:
                seen.max_ts = ts
                if seen is top and ts < refresh_at and newest <= drop_at:
                    # The slowest deployment moved on: the watermark follows it up to the
                    # next one's (EventTime's fast path, inlined).
                    mark = (ts if ts < runner else runner) - lateness
                    if mark > wm:
                        wm = mark
                        if mark > floor:
                            floor = mark
                elif seen is top or not seen.queued or newest > drop_at:
                    et.lead, et.watermark = newest, wm
                    et.moved(seen)
                    wm = et.watermark
                    top, runner, refresh_at, drop_at = et.top, et.runner, et.refresh_at, et.drop_at
                    if wm > floor:
                        floor = wm
            if cls is Prediction:
                n_pred += 1
                if slot is None:
                    slot = self._slot(key, idx)
                slot[1].append(ev)
                book = pending_get(dep)
                if book is not None:
                    # OutcomeJoiner.add, inlined: this line runs for every prediction.
                    if ev.id in book:  # type: ignore[union-attr]
                        joiner.stats.duplicate_predictions += 1
                    else:
                        segs = None
                        if slices_labels:  # a rule slices this deployment's labels
                            paths = label_paths.get(dep)
                            if paths is None:
                                paths = self.evaluator.label_slice_paths(dep)
                            segs = tuple([slice_of(ev, p) for p in paths]) or None  # type: ignore[arg-type]
                        # join.pack, inlined: one bytes object per buffered prediction.
                        try:
                            entry = pack_entry((ts, ev.variant, ev.model_version, ev.prediction, ev.score, segs))  # type: ignore[union-attr]
                        except (OverflowError, TypeError):  # a value msgpack cannot hold
                            entry = Pending(ts, ev.variant, ev.model_version, ev.prediction, ev.score, segs)  # type: ignore[union-attr]
                        book[ev.id] = entry  # type: ignore[union-attr]
                        if noted is not None:
                            noted.append((dep, ev.id, entry))  # type: ignore[union-attr]
                        n_pending += 1
                        if n_pending >= room:  # the cap binds: evict now, event by event
                            joiner.added(n_pending, n_popped, wm, ts)
                            n_pending = n_popped = 0
                            room = max(1, joiner.max_pending - len(joiner))
            elif cls is Outcome:
                n_out += 1
                # OutcomeJoiner.match, inlined: this runs for every outcome.
                book = pending_get(dep)
                if book is None:
                    n_not_needed += 1
                    continue
                entry = book.pop(ev.id, None)  # type: ignore[union-attr]
                if entry is None:
                    n_unmatched += 1
                    continue
                if noted is not None:
                    noted.append((dep, ev.id, None))  # type: ignore[union-attr]
                n_popped += 1
                entry = unpack_entry(entry) if type(entry) is bytes else unpack(entry)
                if ts - entry.ts > horizon:
                    n_expired += 1
                    continue
                n_joined += 1
                # The label goes into the pane of its own ts, under its prediction's variant.
                key = (dep, entry.variant)
                idx = int(ts // g)
                slot = slots.get(key)
                if slot is None or slot[0] != idx:
                    slot = self._outcome_slot(key, idx)
                slot[2].append(Labeled(
                    entry.ts, ts, entry.variant, entry.model_version, entry.prediction, entry.score,
                    ev.label, entry.segments,  # type: ignore[union-attr]
                ))
            else:
                n_dep += 1
                self._deploy(ev, ts)  # type: ignore[arg-type]
        et.lead, et.watermark = newest, wm
        adm.newest = newest
        adm.seen = seen_before + n_pred + n_out + n_late + n_dep + len(rejected)
        joiner.added(n_pending, n_popped, wm, newest)
        stats = joiner.stats
        stats.joined += n_joined
        stats.unmatched_outcomes += n_unmatched
        stats.expired_outcomes += n_expired
        stats.not_needed += n_not_needed
        self.counters["predictions"] += n_pred
        self.counters["outcomes"] += n_out
        self.counters["late"] += n_late
        if n_dep:
            self.counters["deploys"] += n_dep
        if rejected:
            self.reject(rejected)

    def _slot(self, key: Key, idx: int) -> tuple[int, list[Prediction], list[Labeled]]:
        """The prediction and label lists of pane ``idx`` of ``key``, cached for the hot loop."""
        if key not in self._known_keys:
            self._new_key(key)
        pane = self.assembler.pane(key, idx)
        slot = self._slots[key] = (idx, pane.predictions, pane.outcomes)
        return slot

    def _outcome_slot(self, key: Key, idx: int) -> tuple[int, list[Prediction], list[Labeled]]:
        """Like ``_slot`` for a label, which does not make its key known: cached only when the
        key is known already (its predictions were seen)."""
        pane = self.assembler.pane(key, idx)
        slot = (idx, pane.predictions, pane.outcomes)
        if key in self._known_keys:
            self._slots[key] = slot
        return slot

    def reject(self, rejects: Iterable[Rejected]) -> None:
        for r in rejects:
            self.rejects[r.reason] += 1
            self.edges.dead_letters.put(r)

    def _new_key(self, key: Key) -> None:
        self._known_keys.add(key)
        seen = self.event_time.deployments.get(key[0])
        if seen is not None:  # None: a key of a checkpoint older than admission
            seen.variants += 1
        if any(r.needs_labels and r.applies_to(*key) for r in self.config.rules):
            self.joiner.track(key[0])
        self.versions.setdefault(key, VersionHistory())

    def _deploy(self, ev: Deploy, ts: float) -> None:
        # Applied when the watermark passes it (in _boundary), in event-time order with the
        # predictions around it: not now, while older panes may still be open.
        key = (ev.deployment, ev.variant)
        if key not in self._known_keys:
            self._new_key(key)
        self.assembler.pane(key, int(ts // self.assembler.granularity)).deploys.append(ev)

    # Time-driven ------------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Process every window boundary and incident deadline up to event time ``now``.

        Crossing a long gap costs O(rules x deployments), not O(gap / step): once every alert
        has settled after the last data (``_settle_span``), empty boundaries are skipped up to
        the next one with data, an incident deadline or ``now``, whichever comes first.
        """
        if not now > -math.inf:  # no event yet (or NaN)
            return
        now = min(now, MAX_EVENT_TIME)
        g = self.assembler.granularity
        if self._next_boundary is None:
            first = self.assembler.earliest_pane_end()
            if first is None:
                return
            self._next_boundary = first
        while True:
            nb = self._next_boundary
            first = self.assembler.earliest_pane_end()
            if first is not None and first <= nb:
                self._data_until = nb
            if first is None or first > nb:
                quiet = nb >= self._data_until + self._settle
                if quiet or (first is not None and not self.book.open and not self._watches_silence):
                    # Nothing buffered before `first`: skip the empty boundaries, never past
                    # `now` (an event may still come for the ones after it).
                    after_now = (math.floor(now / g) + 1) * g
                    target = after_now if first is None else min(first, after_now)
                    if target > nb:
                        nb = self._next_boundary = target
                        self._closed = max(self._closed, target - g)
            deadline = self.book.next_deadline()
            if self.awaiting:
                first_wait = min(w["deadline"] for w in self.awaiting.values())
                deadline = first_wait if deadline is None else min(deadline, first_wait)
            if deadline is not None and deadline < nb:
                if deadline > now:
                    return
                self._acknowledgements(deadline)
                self._effects(self.book.tick(deadline))
                self._approvals(deadline)
                continue
            if nb > now:
                return
            self._boundary(nb)
            self._acknowledgements(nb)
            self._effects(self.book.tick(nb))
            self._approvals(nb)
            self.responder.retry_stalled(nb)
            self._closed = nb
            following = nb + g
            if not following > nb:  # cannot happen within admission's bounds; never spin on it
                raise ValueError(f"event time {nb} is beyond what a window step can advance")
            self._next_boundary = following

    def _boundary(self, t: float) -> None:
        g = self.assembler.granularity
        last_idx = int(round(t / g)) - 1
        # The windows closing here, cut first: one that is exactly the pane that just closed
        # has its versions counted already (on the way to its columns), so the pane is not read
        # twice.
        due = self.assembler.windows_at(t)
        same_list: dict[int, Window] = {id(w.predictions): w for _, w in due}
        for key, by_idx in sorted(self.assembler.panes.items()):
            pane = by_idx.get(last_idx)
            if pane is None:
                continue
            history = self.versions.get(key)
            if history is None:
                history = self.versions[key] = VersionHistory()
            window = same_list.get(id(pane.predictions))
            versions = window.versions if window is not None else _count_versions(pane.predictions)
            if pane.deploys:
                # A deploy event says exactly when a version started, and where it came from.
                for ev in sorted(pane.deploys, key=lambda d: d.ts):
                    if history.observe(ev.model_version, ev.ts, dict(ev.attrs)):
                        log.info("version.deployed", deployment=key[0], variant=key[1],
                                 version=ev.model_version, ts=iso(ev.ts))
            elif versions:
                # Without one, the version serving most of a pane is the running version.
                version = next(iter(versions)) if len(versions) == 1 else \
                    max(versions, key=lambda v: (versions[v], v))
                history.observe(version, last_idx * g)
            history.served(versions)  # known-good needs traffic, not only time
        if self.evaluator.wants_known_good:
            for _, window in due:
                window.known_good = self.evaluator.known_good((window.deployment, window.variant), t)
        fired = self.evaluator.close(due, t)
        for _, window in due:
            # Windows point at each other through `siblings`: break the cycle so their
            # columns are freed now by reference counting, not at the next GC pass.
            window.siblings = {}
        # Transitions of one boundary are handled after every alert has been stepped, and
        # alerts that an inhibit rule could mute go last: a source firing in the same window
        # as its target mutes it whatever the order of the rules in the file.
        fired.sort(key=lambda f: self.router.is_inhibit_target(f[0], f[1]))
        for rule, alert, transition, m, window in fired:
            self.router.route(rule, alert, transition, m, window, t)
        self.joiner.expire(t)
        self.assembler.drop_before(t)
        self._slots.clear()

    def _current_version(self, key: Key) -> str | None:
        hist = self.versions.get(key)
        return hist.current.version if hist is not None and hist.current is not None else None

    # Effects: decided by the responder, carried out by the executor ------------------------
    def _init_effects(self) -> None:
        self.recorded_silences: tuple[Silence, ...] = ()
        self.acknowledgements: dict[str, list[dict[str, Any]]] = {}
        self.responder = Responder(self)
        # Synchronous until a driver installs another (the live daemon's LaneExecutor).
        self.executor: Executor = SyncExecutor(Delivery(self.edges), self)
        self.restored_effects: list[Intent] = []  # in flight at the checkpoint restored

    def _effects(self, effects: Iterable[Any]) -> None:
        self.responder.effects(effects)

    def _approvals(self, now: float) -> None:
        self.responder.approvals(now)

    def _acknowledgements(self, now: float) -> None:
        """Apply each open incident's latest acknowledgement that event time ``now`` has
        reached (the book ignores one it has seen, or one older than an escalation)."""
        if not self.acknowledgements:
            return
        for inc in sorted(self.book.open.values(), key=lambda i: (i.opened_at, i.id)):
            reached = [r for r in self.acknowledgements.get(inc.id, ()) if r["at"] <= now]
            if reached:
                self._effects(self.book.acknowledged(inc, reached[-1]["by"], reached[-1]["at"], now))

    def apply_result(self, call: Call, result: ActionResult) -> None:
        """A call's outcome, reported by the executor: what follows from it is decided now."""
        self.responder.apply_result(call, result)

    def set_silences(self, recorded: Iterable[Silence]) -> None:
        """The silences recorded in the ledger (``rollbackd silence add``, Slack's button),
        pushed in by the driver; event time decides whether one applies."""
        self.recorded_silences = tuple(recorded)

    def set_answers(self, answers: dict[str, list[dict[str, Any]]]) -> None:
        """Approvers' answers by incident (ordered by their time), pushed in by the driver."""
        self.responder.answers = answers

    def set_acknowledgements(self, acks: dict[str, list[dict[str, Any]]]) -> None:
        """Acknowledgements by incident (ordered by their time, Slack's Acknowledge button),
        pushed in by the driver; event time decides when one applies."""
        self.acknowledgements = acks

    # Checkpoints: taken and restored by daemon/checkpointing.py -------------------------
    def snapshot(self, external: bool = False) -> bytes:
        """Everything a restart needs to continue exactly where this pipeline is: windows,
        the join buffer, detector and alert states, incidents, versions, safety state, the calls
        in flight. A frame of daemon/snapshot.py's schema: no pickle, nothing in it is code.

        ``external``: complete references (a detector's baseline summary, immutable once made)
        are not in it but named by digest, and encoded once: :meth:`new_blobs` are the ones
        this snapshot names that no earlier one of this pipeline did, :meth:`blob_digests` all
        it names. Whoever stores the snapshot stores those blobs beside it (written once per
        reference) and hands them to :meth:`restore`. Without, the snapshot holds everything.
        """
        return self.checkpointing.snapshot(external)

    def freeze(self) -> FrozenSnapshot:
        """:meth:`snapshot` (``external``) in two halves: what must be taken now, on the
        processing thread, and the encoding that may run on a writer thread later, while this
        pipeline goes on. :meth:`FrozenSnapshot.encode` (once, and in the order frozen) writes
        exactly the state at the freeze. :meth:`new_blobs` and :meth:`blob_digests` are this
        snapshot's from the moment ``freeze`` returns."""
        return self.checkpointing.freeze()

    def new_blobs(self) -> dict[str, bytes]:
        """The blobs (by digest) the last :meth:`snapshot` named that no earlier one did."""
        return self.checkpointing.new_blobs()

    def blob_digests(self) -> set[str]:
        """Every blob the last :meth:`snapshot` named (to keep; the others may be dropped)."""
        return self.checkpointing.blob_digests()

    def restore(self, blob: bytes, blobs: Mapping[str, bytes] | None = None) -> list[str]:
        """Load a snapshot (and the blobs it names, by digest); returns warnings (rules whose
        definition changed start afresh). Raises :class:`~rollbackd.daemon.snapshot.StateError`
        for a snapshot this rollbackd does not read (corrupt, forged, another schema, a blob
        missing): then nothing of it was used, and this pipeline is as it was built."""
        return self.checkpointing.restore(blob, blobs)

    # Rules replaced in a running pipeline (a reload): daemon/rules_swap.py ----------------
    def replace_rules(self, config: Config, now: float) -> RulesChange:
        """Go on under ``config``'s rules from event time ``now``: see ``rules_swap.replace_rules``."""
        from rollbackd.daemon.rules_swap import replace_rules

        return replace_rules(self, config, now)

    # Summary ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {
            "events": dict(sorted(self.counters.items())),
            # firing episodes a silence or an inhibit rule muted, by what muted them
            "alerts_muted": dict(sorted(self.muted_episodes.items())),
            "rejected": dict(sorted(self.rejects.items())),
            "join": self.joiner.stats.to_record(),
            "pending_labels": len(self.joiner),
            "incidents_open": sorted(i.id for i in self.book.open.values()),
            "incidents_closed": sorted(i.id for i in self.book.closed),
            "alerts_firing": sorted(
                f"{rule}:{key[0]}/{key[1]}"
                for (rule, key), a in self.alerts.items()
                if a.state == AlertState.FIRING
            ),
        }

    def incidents(self) -> list[Incident]:
        return sorted([*self.book.closed, *self.book.open.values()], key=lambda i: (i.opened_at, i.id))


def _settle_span(rules: Sequence[RuleSpec], assembler: WindowAssembler) -> float:
    """How long after the last buffered data every alert has stopped changing, if no data comes.

    After it, each rule sees only empty windows, whose measurement no longer changes: the
    longest reach of a window (count-based windows reach further back), plus what a detector
    remembers beyond its window (burn_rate: its longest lookback), plus ``for``,
    ``keep_firing_for`` and a k-of-n history, plus two steps. A no-data (``traffic``) rule
    has fired by then. Boundaries past it are skipped when nothing is buffered.
    """
    if not rules:
        return 0.0
    reach = assembler.retain_panes * assembler.granularity
    memory = max(_lookback(r) for r in rules)
    timing = max(r.for_ for r in rules) + max(r.keep_firing_for for r in rules)
    history = max(r.n * r.window.step for r in rules)
    step = max(r.window.step for r in rules)
    return reach + memory + timing + history + 2 * step


def _lookback(rule: RuleSpec) -> float:
    """Event time a rule's detector remembers beyond the window it is fed (0 for most)."""
    if rule.detector != "burn_rate":
        return 0.0
    from rollbackd.detectors.burn_rate import DEFAULT_WINDOWS
    from rollbackd.rules.durations import parse_duration

    pairs = rule.params.get("windows", DEFAULT_WINDOWS)
    try:
        return max(parse_duration(p) for pair in pairs for p in pair[:2])
    except (TypeError, ValueError, IndexError):  # validated at load; a day if it were not
        return 86400.0
