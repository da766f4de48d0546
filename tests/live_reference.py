"""What a replay of a recording decides up to the watermark a live run reaches.

The live daemon never flushes at the end of a stream (a live topic has no end), so the
reference its decision log is compared with is a replay without that last flush. Rollbacks go
to a webhook server of the reference's own, so their outcome reads as the live run's does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from loopback import LoopbackServer

from rollbackd.actions.webhook import WebhookBackend
from rollbackd.daemon.clock import EventTimeClock
from rollbackd.daemon.decisions import DecisionLog
from rollbackd.daemon.replay import build_pipeline, open_recording


def live_reference(recording: Path, config, out: Path, *, webhook_deployments: Iterable[str] = (),
                   secret: bytes | None = None, batch: int = 5000) -> bytes:
    """The decision log (bytes, also written to ``out``) of replaying ``recording`` with
    ``config`` without the end-of-stream flush; ``webhook_deployments`` roll back through a
    webhook (signed with ``secret``, if given) to a throwaway loopback server."""
    with LoopbackServer() as hook:
        extra = {} if secret is None else {"secret": secret}
        backends = {d: WebhookBackend(hook.url + "/rollback", **extra) for d in webhook_deployments}
        pipeline = build_pipeline(config, decisions=DecisionLog(out), backend_overrides=backends)
        src = open_recording(str(recording), config)
        clock = EventTimeClock(pipeline.lateness)
        while (b := src.read(batch)) is not None:
            pipeline.ingest(b.events)
            clock.observe(pipeline.max_event_time)
            pipeline.advance(clock.now())
        pipeline.edges.decisions.close()
    return out.read_bytes()
