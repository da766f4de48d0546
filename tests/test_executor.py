"""The executors: a lane per deployment, order kept inside a lane, a slow edge holding up only its
own lane, bounded lanes, and in-flight calls that run once by key after a restart.

The edges are real: a webhook backend and the Slack notifier against HTTP servers on loopback.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from loopback import LoopbackServer, Reply, SlackAPI

from rollbackd.actions.base import ActionResult, Notice, RollbackPlan
from rollbackd.actions.delivery import Delivery
from rollbackd.actions.intents import Call, Confirm, Fill, FollowUps, Notify, Record, Rollback, confirm_key
from rollbackd.actions.slack import SlackNotifier
from rollbackd.actions.webhook import WebhookBackend
from rollbackd.actions.retry import RetryPolicy
from rollbackd.actions.verification import Confirmer, PollPolicy
from rollbackd.daemon.decisions import MemoryDecisions
from rollbackd.daemon.executor import LaneExecutor, SyncExecutor
from rollbackd.daemon.ledger import Ledger
from rollbackd.daemon.pipeline import Edges


class Engine:
    """Records what comes back; optionally decides follow-ups like the responder does."""

    def __init__(self) -> None:
        self.results: list[tuple[str, str, float]] = []
        self.executor: Any = None
        self.follow: dict[str, tuple[Notify, ...]] = {}

    def apply_result(self, call: Call, result: ActionResult) -> None:
        self.results.append((call.key, result.status, time.monotonic()))
        if call.key in self.follow:
            self.executor.submit(Fill(call.key, call.rec["deployment"], self.follow.pop(call.key)))


def notice(deployment: str, n: int, incident: str = "inc-1") -> Notify:
    note = Notice(incident_id=incident, kind="updated", ts=1.0e9 + n, deployment=deployment,
                  variant="primary", version="2", title=f"t{n}", text=f"notice {n}")
    rec = {"ts": note.ts, "kind": "action", "action": "notify", "incident_id": incident,
           "deployment": deployment, "variant": "primary", "status": "started",
           "idempotency_key": f"{incident}:notice:{n}"}
    return Notify(f"{incident}:notice:{n}", note, rec, f"reason {n}")


def rollback(deployment: str, incident: str = "inc-1") -> Rollback:
    plan = RollbackPlan(deployment, "primary", "2", "1", incident, "rule r")
    rec = {"ts": 1.0e9, "kind": "action", "action": "rollback", "incident_id": incident,
           "deployment": deployment, "variant": "primary", "idempotency_key": plan.idempotency_key}
    return Rollback(plan.idempotency_key, plan, rec)


def wait_for(predicate, timeout: float = 10.0, pool: LaneExecutor | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pool is not None:
            pool.drain()
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def servers():
    slack = LoopbackServer(SlackAPI("xoxb-t"))
    hooks = LoopbackServer()
    with slack, hooks:
        yield slack, hooks


def make_edges(slack: LoopbackServer, hooks: LoopbackServer, ledger: Any = None, **backend: Any) -> Edges:
    backends = {
        name: WebhookBackend(f"{hooks.url}/{name}", timeout=backend.get("timeout", 5.0),
                             policy=RetryPolicy(max_attempts=1))
        for name in ("slow", "fast")
    }
    edges = Edges(notifier=SlackNotifier("xoxb-t", "#oncall", base_url=slack.url + "/api/"),
                  backend_for=backends.__getitem__, decisions=MemoryDecisions())
    if ledger is not None:
        edges.recorder = ledger
    return edges


def test_a_slow_lane_holds_up_only_its_own_deployment(servers):
    """The slow deployment's webhook holds its request until released: the fast deployment's
    rollback is answered and reported meanwhile."""
    slack, hooks = servers
    release = threading.Event()
    hooks.responder = lambda req: (release.wait(20) if req.path == "/slow" else None, Reply(200))[1]  # type: ignore[attr-defined]
    engine = Engine()
    pool = LaneExecutor(Delivery(make_edges(slack, hooks, timeout=30.0)), workers=4)
    engine.executor = pool.bind(engine)
    try:
        engine.executor.submit(rollback("slow", "inc-s"))
        engine.executor.submit(rollback("fast", "inc-f"))
        wait_for(lambda: any(k.startswith("inc-f") for k, _, _ in engine.results), pool=pool)
        assert [k.split(":")[0] for k, _, _ in engine.results] == ["inc-f"]
        assert [type(i).__name__ for i in pool.in_flight()] == ["Rollback"]  # the slow one, running
        release.set()
        wait_for(lambda: len(engine.results) == 2, pool=pool)
        assert [s for _, s, _ in engine.results] == ["succeeded", "succeeded"]
    finally:
        release.set()
        assert pool.close(5.0)


def test_a_rollback_never_waits_for_a_notice(servers):
    """A slow Slack holds the notice being posted and leaves an earlier incident's notices queued;
    the next incidents' rollbacks reach their webhook meanwhile, in order, and a notice decided
    after a rollback is posted only once that rollback has started."""
    slack, hooks = servers
    gate = threading.Event()
    order: list[str] = []
    api = SlackAPI("xoxb-t")

    def slow_slack(req):  # type: ignore[no-untyped-def]
        if req.path.endswith("/chat.postMessage"):  # not the parent's edits (chat.update)
            order.append(fields(req)["text"])
        gate.wait(10)
        return api(req)

    slack.responder = slow_slack  # type: ignore[attr-defined]
    hooks.responder = lambda req: (order.append(req.header("Idempotency-Key").split(":")[0]), Reply(200))[1]  # type: ignore[attr-defined]
    engine = Engine()
    pool = LaneExecutor(Delivery(make_edges(slack, hooks)))
    engine.executor = pool.bind(engine)
    try:
        for n in (1, 2, 3):
            engine.executor.submit(notice("fast", n, "inc-1"))
        wait_for(lambda: order == ["notice 1"])  # posting; 2 and 3 wait
        engine.executor.submit(rollback("fast", "inc-2"))
        engine.executor.submit(notice("fast", 4, "inc-2"))
        engine.executor.submit(rollback("fast", "inc-3"))
        # both rollbacks answered while Slack still holds notice 1...
        wait_for(lambda: order == ["notice 1", "inc-2", "inc-3"], pool=pool)
        # ...and are reported in the order decided, after notice 1, as a replay records them
        assert engine.results == [] and pool.waiting() == 6
        gate.set()
        wait_for(lambda: len(engine.results) == 6, pool=pool)
        assert [k.split(":")[0] for k, _, _ in engine.results] == ["inc-1", "inc-1", "inc-1", "inc-2", "inc-2", "inc-3"]
    finally:
        gate.set()
        pool.close(5.0)
    assert order == ["notice 1", "inc-2", "inc-3", "notice 2", "notice 3", "notice 4"]


def test_a_notice_decided_after_a_rollback_waits_for_it_to_start(servers):
    """The act lane is busy with a held rollback; the notice decided after the second rollback
    waits until that rollback has started, not for it to finish."""
    slack, hooks = servers
    release = threading.Event()
    hooks.responder = lambda req: (release.wait(10) if req.path == "/fast" else None, Reply(200))[1]  # type: ignore[attr-defined]
    engine = Engine()
    pool = LaneExecutor(Delivery(make_edges(slack, hooks, timeout=30.0)))
    engine.executor = pool.bind(engine)
    try:
        engine.executor.submit(rollback("fast", "inc-1"))
        engine.executor.submit(rollback("fast", "inc-2"))
        engine.executor.submit(notice("fast", 1, "inc-2"))
        wait_for(lambda: len(hooks.requests) == 1)
        time.sleep(0.3)  # room for a wrong post to show
        assert slack.requests == []  # rollback inc-2 has not started: the notice waits
        release.set()
        wait_for(lambda: len(engine.results) == 3, pool=pool)
    finally:
        release.set()
        pool.close(5.0)
    assert [k for k, _, _ in engine.results][0] == "inc-1:rollback:primary:1"
    assert len(slack.requests) == 1


def test_a_lane_keeps_its_order_and_follow_ups_take_their_place(servers):
    """Rollback, then the incident's notice, then the rollback's own notices, whatever the
    timing: the engine fills the place after the result comes back on the processing thread."""
    slack, hooks = servers
    hooks.responder = lambda req: Reply(200, delay=0.3)  # type: ignore[attr-defined]
    engine = Engine()
    pool = LaneExecutor(Delivery(make_edges(slack, hooks)))
    engine.executor = pool.bind(engine)
    rb = rollback("fast")
    engine.follow[rb.key] = (notice("fast", 2), notice("fast", 3))
    try:
        engine.executor.submit(rb)
        engine.executor.submit(notice("fast", 1))
        engine.executor.submit(FollowUps(rb.key, "fast"))
        engine.executor.submit(notice("fast", 4))
        wait_for(lambda: len(engine.results) == 5, pool=pool)
    finally:
        pool.close(5.0)
    posts = [fields(r) for r in slack.requests if r.path.endswith("/chat.postMessage")]
    assert [p["text"] for p in posts] == ["notice 1", "notice 2", "notice 3", "notice 4"]
    results = [k for k, _, _ in engine.results]
    # notice 1 runs beside the rollback (once it has started); the rollback's own notices and
    # the one after them only once its result has come back
    assert results[2:] == [f"inc-1:notice:{n}" for n in (2, 3, 4)]
    assert sorted(results[:2]) == sorted([rb.key, "inc-1:notice:1"])
    # the first notice opens the thread, the others reply in it
    assert "thread_ts" not in posts[0] and {p.get("thread_ts") for p in posts[1:]} == {"1700000000.000001"}
    assert hooks.requests[0].path == "/fast"


def fields(request: Any) -> dict[str, Any]:
    try:
        return dict(request.json())
    except ValueError:
        return request.form()


def test_a_full_lane_drops_notices_with_a_record_and_says_so_once(servers, tmp_path):
    slack, hooks = servers
    gate = threading.Event()
    slack.responder = lambda req: (gate.wait(10), SlackAPI("xoxb-t")(req))[1]  # type: ignore[attr-defined]
    full: list[tuple[str, int]] = []
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    edges = make_edges(slack, hooks, ledger)
    engine = Engine()
    pool = LaneExecutor(Delivery(edges), lane_limit=3, on_full=lambda lane, n: full.append((lane, n)))
    engine.executor = pool.bind(engine)
    try:
        for n in range(8):
            engine.executor.submit(notice("fast", n))
        assert full == [("fast", 3)]
        dropped = [k for k, s, _ in engine.results if s == "failed"]
        assert len(dropped) == 5 and pool.dropped == 5
        rollback_call = rollback("fast")
        engine.executor.submit(rollback_call)  # never dropped, even on a full lane
        gate.set()
        wait_for(lambda: len(engine.results) == 9, pool=pool)
    finally:
        pool.close(5.0)
        ledger.close()
    finished = [r for r in edges.decisions.records if r["status"] == "failed"]
    assert len(finished) == 5 and all("effect queue full" in r["detail"] for r in finished)
    assert (rollback_call.key, "succeeded") in [(k, s) for k, s, _ in engine.results]


def test_in_flight_calls_run_once_by_key_after_a_restart(servers, tmp_path):
    """A checkpoint carries what was in flight; a resubmitted call that the outbox knows as
    finished does not run again, one that never finished runs once."""
    slack, hooks = servers
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    engine = Engine()
    pool = LaneExecutor(Delivery(make_edges(slack, hooks, ledger)))
    engine.executor = pool.bind(engine)
    done, waiting = rollback("fast", "inc-a"), rollback("slow", "inc-b")
    engine.executor.submit(done)
    wait_for(lambda: len(engine.results) == 1, pool=pool)
    pool.close(5.0)
    assert len(hooks.requests) == 1
    # after a crash: both were in the checkpoint's in-flight list
    engine2 = Engine()
    pool2 = LaneExecutor(Delivery(make_edges(slack, hooks, ledger)))
    pool2.resubmit([done, waiting], engine2)
    wait_for(lambda: len(engine2.results) == 2, pool=pool2)
    pool2.close(5.0)
    ledger.close()
    assert sorted(r.path for r in hooks.requests) == ["/fast", "/slow"]  # each once
    assert sorted(s for _, s, _ in engine2.results) == ["succeeded", "succeeded"]


def test_a_checkpoint_lists_each_lane_in_order_so_a_restart_keeps_it(servers, tmp_path):
    """The call running at the checkpoint comes before the calls waiting behind it in its lane:
    resubmitted after a crash, the incident's first notice (the thread's parent) still goes out
    first, and the replies in its thread."""
    slack, hooks = servers
    gate = threading.Event()
    api = SlackAPI("xoxb-t")
    slack.responder = lambda req: (gate.wait(10), api(req))[1]  # type: ignore[attr-defined]
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    engine = Engine()
    pool = LaneExecutor(Delivery(make_edges(slack, hooks, ledger)))
    engine.executor = pool.bind(engine)
    try:
        for n in (1, 2, 3):
            engine.executor.submit(notice("fast", n))
        wait_for(lambda: len(slack.requests) == 1)  # notice 1 is being posted
        carried = pool.in_flight()
        assert [i.key for i in carried] == ["inc-1:notice:1", "inc-1:notice:2", "inc-1:notice:3"]
    finally:
        gate.set()
        pool.close(0.0)  # the crash: what was out is in the checkpoint
    slack.requests.clear()
    engine2 = Engine()
    pool2 = LaneExecutor(Delivery(make_edges(slack, hooks, ledger)))
    pool2.resubmit(carried, engine2)
    wait_for(lambda: len(engine2.results) == 3, pool=pool2)
    pool2.close(5.0)
    ledger.close()
    posts = [fields(r) for r in slack.requests if r.path.endswith("/chat.postMessage")]
    assert [p["text"] for p in posts] == ["notice 1", "notice 2", "notice 3"]
    assert "thread_ts" not in posts[0] and posts[1].get("thread_ts") and posts[2].get("thread_ts")


def test_the_sync_executor_reports_before_it_returns_and_queues_follow_ups_behind(servers):
    slack, hooks = servers
    edges = make_edges(slack, hooks)
    order: list[str] = []

    class Follower(Engine):
        def apply_result(self, call: Call, result: ActionResult) -> None:
            order.append(call.key)
            if call.key == "inc-1:notice:1":
                self.executor.submit(notice("fast", 3))  # decided on the result: goes behind 2

    engine = Follower()
    engine.executor = SyncExecutor(Delivery(edges), engine)
    engine.executor.submit(Record({"ts": 1.0, "kind": "alert", "deployment": "fast"}, "alert"))
    engine.executor.submit(notice("fast", 1))
    assert order == ["inc-1:notice:1", "inc-1:notice:3"]
    assert [r["kind"] for r in edges.decisions.records] == ["alert", "action", "action"]


# A rollback's check against its target is a call of its own, in the act lane -------------
class Gated:
    """The confirmer's time: each pause waits for ``release`` (a slow convergence) and then
    advances the fake clock by the pause."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.t = 0.0
        self.slept = threading.Event()

    def sleep(self, s: float) -> None:
        self.slept.set()
        assert self.release.wait(20)
        self.t += s

    def monotonic(self) -> float:
        return self.t


def check_of(call: Rollback, within: float = 60.0) -> Confirm:
    """The check the responder decides once ``call`` was applied (``Responder._confirm``)."""
    key = confirm_key(call.key)
    rec = {**call.rec, "action": "confirm", "idempotency_key": key}
    return Confirm(key, call.plan, rec, {"verify_within": within, "backend": "traffic-file"})


class Checking(Engine):
    """Follows each applied rollback with its check, as the responder does."""

    def apply_result(self, call: Call, result: ActionResult) -> None:
        super().apply_result(call, result)
        if isinstance(call, Rollback) and result.status in ("succeeded", "skipped"):
            self.executor.submit(check_of(call))


class Counted:
    """A traffic-file backend that counts its applies (the witness that nothing is re-applied)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.applied = 0

    def apply(self, plan: RollbackPlan) -> ActionResult:
        self.applied += 1
        return self.inner.apply(plan)

    def current(self, deployment: str, variant: str) -> str | None:
        return self.inner.current(deployment, variant)

    def verify(self, plan: RollbackPlan) -> ActionResult:
        return self.inner.verify(plan)


OLD_ROUTES = '{"routes": {"%s": {"1": 0, "2": 100}}}'


def traffic_edges(tmp_path, slack: LoopbackServer, stuck: str, ledger: Any = None) -> tuple[Edges, dict[str, Counted]]:
    """A traffic file per deployment; ``stuck``'s is put back to version 2 right after each
    rollback writes it (another writer), so it never reports the target."""
    from rollbackd.actions.trafficfile import TrafficFileBackend

    class Undone(TrafficFileBackend):
        def apply(self, plan: RollbackPlan) -> ActionResult:
            result = super().apply(plan)
            self.path.write_text(OLD_ROUTES % plan.deployment)
            return result

    backends = {}
    for name in ("slow", "fast"):
        path = tmp_path / f"{name}.json"
        path.write_text(OLD_ROUTES % name)
        backends[name] = Counted((Undone if name == stuck else TrafficFileBackend)(path))
    edges = Edges(notifier=SlackNotifier("xoxb-t", "#oncall", base_url=slack.url + "/api/"),
                  backend_for=backends.__getitem__, decisions=MemoryDecisions())
    if ledger is not None:
        edges.recorder = ledger
    return edges, backends


def test_a_check_against_the_target_holds_up_only_its_own_lane(servers, tmp_path):
    """The slow deployment's target never reports back. Its rollback is reported as soon as the
    backend answered; its check then polls in the act lane, while the processing thread drains
    and the fast deployment's rollback and check are reported; released, the slow check ends
    unconfirmed at the bound."""
    slack, _ = servers
    clock = Gated()
    edges, _ = traffic_edges(tmp_path, slack, stuck="slow")
    engine = Checking()
    pool = LaneExecutor(Delivery(edges, Confirmer(sleep=clock.sleep, monotonic=clock.monotonic)), workers=4)
    engine.executor = pool.bind(engine)
    try:
        engine.executor.submit(rollback("slow", "inc-s"))
        wait_for(lambda: len(engine.results) == 1, pool=pool)  # the rollback, not waiting for its check
        assert clock.slept.wait(10)  # the slow check is between looks
        engine.executor.submit(rollback("fast", "inc-f"))
        started = time.monotonic()
        wait_for(lambda: len(engine.results) == 3, pool=pool)
        assert time.monotonic() - started < 5
        assert [k for k, _, _ in engine.results] == [
            "inc-s:rollback:primary:1", "inc-f:rollback:primary:1", "inc-f:rollback:primary:1/confirm"]
        assert [(type(i).__name__, i.key) for i in pool.in_flight()] == [
            ("Confirm", "inc-s:rollback:primary:1/confirm")]
        clock.release.set()
        wait_for(lambda: len(engine.results) == 4, pool=pool)
    finally:
        clock.release.set()
        assert pool.close(5.0)
    records = edges.decisions.records
    assert [(r["incident_id"], r["action"], r["status"]) for r in records] == [
        ("inc-s", "rollback", "succeeded"), ("inc-f", "rollback", "succeeded"),
        ("inc-f", "confirm", "succeeded"), ("inc-s", "confirm", "failed")]
    assert all("verification" not in r for r in records if r["action"] == "rollback")
    checked = {r["incident_id"]: r["verification"] for r in records if r["action"] == "confirm"}
    assert (checked["inc-f"]["verdict"], checked["inc-f"]["polls"]) == ("confirmed", 1)
    assert (checked["inc-s"]["verdict"], checked["inc-s"]["observed"], checked["inc-s"]["elapsed"]) == (
        "unconfirmed", "2", 60.0)


def test_a_restart_finds_the_check_in_the_outbox_and_looks_no_more(servers, tmp_path):
    """The check finished (unconfirmed) before the crash: resubmitted from the checkpoint, its
    result, verification included, comes from the ledger; nothing is applied or polled again."""
    slack, _ = servers
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    clock = Gated()
    clock.release.set()
    seen: list[ActionResult] = []

    class Keeps(Engine):
        def apply_result(self, call: Call, result: ActionResult) -> None:
            seen.append(result)
            super().apply_result(call, result)

    engine = Keeps()
    confirmer = Confirmer(sleep=clock.sleep, monotonic=clock.monotonic)
    edges, _ = traffic_edges(tmp_path, slack, "slow", ledger)
    pool = LaneExecutor(Delivery(edges, confirmer))
    engine.executor = pool.bind(engine)
    call = check_of(rollback("slow", "inc-s"))
    engine.executor.submit(call)
    wait_for(lambda: len(seen) == 1, pool=pool)
    pool.close(5.0)

    def no_backend(deployment: str) -> Any:
        raise AssertionError(f"backend of {deployment} asked again")

    engine2 = Keeps()
    edges2 = Edges(notifier=SlackNotifier("xoxb-t", "#oncall", base_url=slack.url + "/api/"),
                   backend_for=no_backend, decisions=MemoryDecisions(), recorder=ledger)
    pool2 = LaneExecutor(Delivery(edges2, confirmer))
    pool2.resubmit([call], engine2)
    wait_for(lambda: len(seen) == 2, pool=pool2)
    pool2.close(5.0)
    ledger.close()
    assert seen[1].status == "failed"  # from the outbox: asking the backend would have failed
    assert seen[1].verification == seen[0].verification
    assert seen[1].verification is not None and seen[1].verification.verdict == "unconfirmed"


def test_close_ends_a_check_between_looks_and_keeps_it_in_flight(servers, tmp_path):
    """Stopping mid-check does not wait for the bound: the pause between looks (a real wait on
    the confirmer's stop event) ends at once, the check gives no verdict and stays in flight;
    resubmitted after the restart, it looks again and the rollback is not applied again."""
    slack, _ = servers
    ledger = Ledger(tmp_path / "l.db", run_id="r")
    edges, backends = traffic_edges(tmp_path, slack, "slow", ledger)
    engine = Checking()
    pool = LaneExecutor(Delivery(edges, Confirmer(PollPolicy(first=30.0, max_interval=30.0))))
    engine.executor = pool.bind(engine)
    engine.executor.submit(rollback("slow", "inc-s"))
    wait_for(lambda: len(engine.results) == 1 and pool.in_flight(), pool=pool)
    time.sleep(0.2)  # the first look is taken; the check waits 30 s for the next
    engine.executor.submit(rollback("slow", "inc-t"))  # queued behind the check in the act lane
    started = time.monotonic()
    assert not pool.close(10.0)  # something is left: the check, and the rollback behind it
    assert time.monotonic() - started < 2  # neither the pause nor the queue behind it waited out
    left, behind = pool.in_flight()
    assert isinstance(left, Confirm) and left.key == "inc-s:rollback:primary:1/confirm"
    assert isinstance(behind, Rollback) and behind.key == "inc-t:rollback:primary:1"
    assert [r["phase"] for r in ledger.rows("actions", action="confirm")] == ["started"]
    assert [r["status"] for r in edges.decisions.records] == ["succeeded"]  # the rollback only
    # After the restart the other writer has given up: the file keeps the rollback.
    backends["slow"].inner.path.write_text('{"routes": {"slow": {"1": 100, "2": 0}}}')
    engine2 = Checking()
    pool2 = LaneExecutor(Delivery(edges, Confirmer(PollPolicy(first=30.0, max_interval=30.0))))
    engine2.executor = pool2.bind(engine2)
    pool2.resubmit([left], engine2)
    wait_for(lambda: len(engine2.results) == 1, pool=pool2)
    assert pool2.close(5.0)
    ledger.close()
    assert engine2.results[0][:2] == ("inc-s:rollback:primary:1/confirm", "succeeded")
    assert backends["slow"].applied == 1
