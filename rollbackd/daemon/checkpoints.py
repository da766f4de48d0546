"""Checkpoints written off the processing thread.

The processing thread takes what must be taken at once (``Pipeline.freeze()``: small state as
plain values, shallow copies of the join buffer and the panes; the references it names by
digest) and hands a :class:`~rollbackd.daemon.run.Checkpoint` of those to a
:class:`CheckpointWriter`; the writer's thread encodes the large parts, writes the new
reference blobs and the file, fsyncs, and reports the position that is now durable. Offsets
may be committed up to that position only: the caller commits on :meth:`CheckpointWriter.done`,
never on ``submit``. At most one checkpoint is in flight: a ``submit`` while one is being
written waits for it (back-pressure, never a queue that grows).

Wiring it into the live loop (``Daemon.checkpoint``), for a single instance::

    snapshots = {k: t.pipeline.freeze() for k, t in tasks}
    blobs = {d: None for t in tasks for d in t.pipeline.blob_digests()}   # named, written before
    for t in tasks: blobs.update(t.pipeline.new_blobs())                 # named, new
    writer.submit(Checkpoint(snapshots, position, ..., blobs=blobs))
    ...
    if (written := writer.done()) is not None: source.commit(written.position)

On start, ``Checkpoint.load`` reads the blobs too and ``Pipeline.restore(blob, cp.blobs)``.
With a state topic, the same ``new_blobs()`` go to their own compacted topic keyed by digest
(written before the state record), and the restore reads the digests the record names.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from rollbackd.daemon.run import Checkpoint

__all__ = ["CheckpointWriter", "Written"]

log = structlog.get_logger("rollbackd.checkpoints")


@dataclass(frozen=True, slots=True)
class Written:
    """A checkpoint that is durable: the position it covers, what it cost the writer."""

    position: Any
    bytes_written: int
    seconds: float


class CheckpointWriter:
    """One thread writing ``Checkpoint``\\ s to ``path``, one at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._pending: Checkpoint | None = None
        self._busy = False
        self._done: Written | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, checkpoint: Checkpoint) -> None:
        """Hand over a checkpoint; waits while the previous one is still being written."""
        with self._cond:
            while (self._pending is not None or self._busy) and self._failure is None:
                self._cond.wait()
            self._raise()
            self._pending = checkpoint
            self._cond.notify_all()

    def done(self) -> Written | None:
        """The last checkpoint written since the previous call (None if none); raises the
        writer's error if the last write failed."""
        with self._cond:
            self._raise()
            written, self._done = self._done, None
            return written

    def wait(self, timeout: float | None = None) -> Written | None:
        """Wait until nothing is in flight; then :meth:`done`."""
        with self._cond:
            self._cond.wait_for(lambda: (self._pending is None and not self._busy) or self._failure is not None,
                                timeout)
        return self.done()

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _raise(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                checkpoint, self._pending, self._busy = self._pending, None, True
            started = time.perf_counter()
            try:
                n = checkpoint.save(self.path)
                written: Written | None = Written(checkpoint.position, n, time.perf_counter() - started)
                failure = None
            except BaseException as exc:  # reported to the processing thread, which decides
                written, failure = None, exc
                log.error("checkpoint.write_failed", path=self.path, error=str(exc))
            with self._cond:
                self._busy = False
                if written is not None:
                    self._done = written
                self._failure = failure
                self._cond.notify_all()
