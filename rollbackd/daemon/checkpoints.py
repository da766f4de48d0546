"""The single instance's checkpoint file, and its writer off the processing thread.

The processing thread takes only what must be taken at once (``Pipeline.freeze()``: what
changed since the last freeze, as plain values or copy-on-write views; the join buffer's changes
since then; references named by digest) and hands a :class:`Checkpoint` of those to the
:class:`CheckpointWriter`. The writer's thread encodes them, writes the new reference blobs and
the file, fsyncs, and reports the position that is now durable. ``Daemon.checkpoint`` does the
first half; the loop commits the source's offsets (and publishes the ledger's anchor) only when
:meth:`CheckpointWriter.done` reports a checkpoint durable, never on ``submit``. At most one
checkpoint is in flight: a ``submit`` while one is being written waits for it (back-pressure,
never a queue that grows). A crash while one is being written leaves the previous file (the
replace is atomic) and the offsets it covers.

On start, ``Checkpoint.load`` reads the blobs too and ``Pipeline.restore(blob, cp.blobs)``.
With a state topic the daemon does not use this file: each task's state record is encoded on
the processing thread inside the checkpoint's transaction, its references named by digest and
written once to the refs topic (``daemon/scaleout.py``).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from rollbackd.daemon.snapshot import SCHEMA, StateError, frame, unframe

__all__ = ["Checkpoint", "CheckpointWriter", "Written"]

log = structlog.get_logger("rollbackd.checkpoints")


@dataclass(slots=True)
class Checkpoint:
    """The single instance's checkpoint file: a frame of ``daemon/snapshot.py``'s schema (no
    pickle: a file someone else wrote can hold wrong numbers at worst, never code).

    ``blobs``: the references the snapshots name by digest (``Pipeline.snapshot(external=True)``
    or ``freeze()``), kept beside the file in ``<path>.refs/<digest>``, each written once: bytes
    for one that may not be there yet, None for one written by an earlier checkpoint. After a
    save the folder holds exactly the ones this checkpoint names; :meth:`load` reads them all.
    A snapshot may also be a ``FrozenSnapshot``: :meth:`save` encodes it (on its own thread,
    when ``daemon/checkpoints.py``'s writer saves).
    """

    pipelines: dict[int, Any]  # task (partition number; 0 for an unpartitioned source) -> snapshot
    position: Any
    decisions_offset: int
    ledger_marks: dict[str, int]
    # The blind state (BlindState.to_dict(): plain values).
    blind: dict[str, Any] | None = None
    blobs: dict[str, bytes | None] = field(default_factory=dict)

    def save(self, path: str) -> int:
        """Writes the checkpoint (the new blobs first, then the file, atomically); returns the
        bytes written."""
        pipelines = {k: v if isinstance(v, bytes) else v.encode() for k, v in self.pipelines.items()}
        written = self._save_blobs(path)
        data = frame("checkpoint", {
            "pipelines": pipelines, "position": self.position,
            "decisions_offset": self.decisions_offset, "ledger_marks": self.ledger_marks,
            "blind": self.blind, "blobs": sorted(self.blobs),
        })
        _write_atomically(path, data)
        self._drop_unnamed_blobs(path)
        return written + len(data)

    def _save_blobs(self, path: str) -> int:
        if not self.blobs:
            return 0
        refs = Path(f"{path}.refs")
        refs.mkdir(exist_ok=True)
        written = 0
        for digest, data in sorted(self.blobs.items()):
            target = refs / digest
            if data is None or target.exists():
                continue
            _write_atomically(str(target), data)
            written += len(data)
        return written

    def _drop_unnamed_blobs(self, path: str) -> None:
        refs = Path(f"{path}.refs")
        if not refs.is_dir():
            return
        for entry in refs.iterdir():
            if entry.name not in self.blobs:
                entry.unlink(missing_ok=True)

    @staticmethod
    def load(path: str) -> "Checkpoint | None":
        """The checkpoint at ``path`` (with its blobs), None when there is none; ``StateError``
        (a ValueError) saying to move it away when it is not one this rollbackd reads."""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        try:
            saved = unframe("checkpoint", data, what=path)
            if type(saved) is not dict or type(saved.get("pipelines")) is not dict \
                    or not all(type(k) is int and type(v) is bytes for k, v in saved["pipelines"].items()):
                raise StateError(f"{path}: not a checkpoint of schema {SCHEMA} (no pipelines)")
            blobs: dict[str, bytes | None] = {}
            for digest in saved.get("blobs") or []:
                if type(digest) is not str or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                    raise StateError(f"{path}: names a blob that is not a digest: {digest!r}")
                try:
                    blobs[digest] = Path(f"{path}.refs", digest).read_bytes()
                except FileNotFoundError:
                    raise StateError(f"{path}: its blob {path}.refs/{digest[:16]}... is missing") from None
            return Checkpoint(saved["pipelines"], saved.get("position"), saved.get("decisions_offset") or 0,
                              saved.get("ledger_marks") or {}, saved.get("blind"), blobs)
        except StateError as exc:
            raise StateError(f"{exc}. Move the file (and {path}.refs) away to start afresh: the daemon "
                             "then re-reads the source from its committed offsets") from None


def _write_atomically(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
