"""One bad event changes no decision of `rollbackd run` either: the hostile stamps and shapes of
tests/test_event_time.py and tests/test_events_hostile.py, each inserted at the start, middle and
end of `sustained_errors`, published to a real broker and consumed by the real daemon. Its
decision log equals the clean recording's replay byte for byte, and every bad line is
dead-lettered with its reason.

Live, the daemon judges time against the stream itself (the recording's times are months in the
wall clock's past) and against the wall clock.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from loopback import LoopbackServer
from test_daemon_kafka import Daemon, reference_decisions, rules_with_webhook, wait_committed, write_lines

from rollbackd.daemon.kafka import publish
from rollbackd.scenarios import BUILTIN, generate

pytestmark = pytest.mark.kafka

DAY = 86400.0


def bad_lines(lines: list[bytes]) -> dict[str, bytes]:
    first = next(json.loads(x) for x in lines if b'"prediction"' in x)
    t0 = json.loads(lines[0])["ts"]

    def stamped(ts: object) -> bytes:
        return json.dumps({**first, "id": "bogus-clock", "ts": ts}).encode()

    deep = b'{"type":"prediction","x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    return {
        "a day ahead": stamped(t0 + DAY),
        "30 days ahead": stamped(t0 + 30 * DAY),
        "10 years ahead": stamped(t0 + 3652 * DAY),
        "1970": stamped(86400.0),
        "1e300": stamped(1e300),
        "-1e300": stamped(-1e300),
        "leap second in 9999": stamped("9999-12-31T23:59:60Z"),
        "1000-deep nesting": deep,
    }


def test_bad_events_at_the_start_middle_and_end_change_no_decision_of_the_daemon(kafka_bootstrap, topic, tmp_path):
    clean = list(generate(BUILTIN["sustained_errors"]))
    bad = bad_lines(clean)
    hostile = list(clean)
    # from the end backwards, so the earlier positions stay where they were
    for where in (1.0, 0.6, 0.0):  # 0.6: while the incident is open
        at = int(len(clean) * where)
        hostile[at:at] = list(bad.values())
    name = topic(partitions=1)
    with LoopbackServer() as hook:
        rules = rules_with_webhook(tmp_path, hook.url + "/rollback")
        expected = reference_decisions(write_lines(tmp_path / "clean.jsonl", clean), rules, tmp_path, webhook=True)
        assert b'"action":"rollback"' in expected
        publish(kafka_bootstrap, name, str(write_lines(tmp_path / "hostile.jsonl", hostile)))
        daemon = Daemon(tmp_path, rules, kafka_bootstrap, name, f"g-{name}")
        proc = daemon.start()
        wait_committed(kafka_bootstrap, f"g-{name}", name, len(hostile), proc, timeout=120)
        daemon.signal(signal.SIGTERM)
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        keys = {r.header("Idempotency-Key") for r in hook.requests}
    assert (tmp_path / "rollbackd.decisions.jsonl").read_bytes() == expected
    assert len(keys) == 1
    dead = [json.loads(x) for x in Path(tmp_path / "rollbackd.rejected.jsonl").read_text().splitlines()]
    assert len(dead) == 3 * len(bad)
    reasons = sorted({d["reason"] for d in dead})
    assert set(reasons) <= {"future_timestamp", "too_old", "ts_out_of_range", "non_finite", "too_deep"}, reasons
    assert {"future_timestamp", "too_old", "too_deep"} <= set(reasons)
