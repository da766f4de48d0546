"""The transactional producer behind scale-out (``daemon/scaleout.py``): one ``transactional.id``
per instance, one Kafka transaction per checkpoint, and what becomes of one that does not commit.

- A transaction is begun by the first record written into it and ends with :meth:`Transaction.commit`
  (the checkpoint's records, then the input offsets for the consumer group, then the commit).
- A commit the coordinator does not answer is *in doubt*: it may still commit.
  :meth:`Transaction.settle` retries it, and says how it ended.
- Anything else that fails aborts the transaction; an abort the coordinator does not acknowledge
  is retried before anything else is written.
- A fatal error (fenced: the coordinator aborted our transaction after ``transaction.timeout.ms``,
  or another producer took our ``transactional.id``), or a call stuck inside librdkafka: the
  producer is done for, and a new one with the same id takes over (``init_transactions``, which
  also aborts what the old one left open).

What writes into the transaction and keeps track of what it wrote (the state records, the
decisions) is a :class:`Participant`: told when the transaction committed and when it is gone.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Callable, Mapping, Protocol

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from rollbackd.daemon.kafka import CLIENT_DEFAULTS, BrokerUnavailable, classify, parse_position

__all__ = ["Transaction", "TransactionFailed", "Participant", "TIMEOUT"]

# Logged with the rest of scale-out: these events are the group's transactions.
log = structlog.get_logger("rollbackd.scaleout")

TIMEOUT = 10.0  # how long one call to the brokers may take
_STUCK_GRACE = 5.0  # past a transactional call's own timeout, the producer is given up


class TransactionFailed(BrokerUnavailable):
    """A checkpoint's transaction did not commit. ``in_doubt``: its commit was sent but not
    answered, so it may still commit; :meth:`Transaction.settle` finds out. Otherwise it is
    aborted (or being aborted): nothing it held will ever be visible."""

    def __init__(self, message: str, in_doubt: bool = False, code: int | None = None, name: str = "") -> None:
        super().__init__(message, code, name)
        self.in_doubt = in_doubt


class Participant(Protocol):
    """Writes into the transaction and keeps what it wrote aside until the transaction ends."""

    def committed(self) -> None:
        """What was written since the last commit is committed: visible to readers."""

    def discarded(self) -> None:
        """What was written since the last commit is gone: aborted, or its producer replaced."""


class Transaction:
    """The instance's transactional producer and where its transaction stands: open (something
    was written since the last commit), pending (a commit in doubt, an abort not acknowledged),
    doomed (something that had to go into it could not, so it must not commit)."""

    def __init__(self, servers: str, config: Mapping[str, Any], transactional_id: str, timeout: float,
                 max_record_bytes: int, part_bytes: int) -> None:
        self.servers = servers
        self.config = dict(config)  # the user's producer settings
        self.transactional_id = transactional_id
        self.timeout = timeout  # transaction.timeout.ms, in seconds
        self.max_record_bytes = max_record_bytes
        self.part_bytes = part_bytes
        self.participants: list[Participant] = []
        self._producer = self._new_producer()
        self._abandoned: list[Producer] = []  # producers with a call stuck in them
        self._ready = False  # init_transactions done for this producer
        self._open = False  # a transaction is begun (something was produced in it)
        self._pending: str | None = None  # "commit" (in doubt) or "abort" (not acknowledged yet)
        self._outcome: str | None = None  # how a pending transaction ended, until settle() says it
        self._failure: str | None = None  # a record's delivery failed (reported by flush())
        self._doomed: str | None = None  # why the open transaction must not commit
        self.commits = 0
        self.aborts = 0

    @property
    def open(self) -> bool:
        """Something was written since the last commit (or a transaction is not settled)."""
        return self._open or self._pending is not None or self._doomed is not None

    @property
    def settled(self) -> bool:
        """No transaction of ours is waiting for the coordinator's answer."""
        return self._pending is None and self._ready

    def begin(self) -> None:
        """Begins a transaction unless one is open (settling a pending one first)."""
        if self._open:
            return
        if not self.settled and not self.drive(TIMEOUT):
            raise BrokerUnavailable("a transaction of ours is still waiting for the coordinator")
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            raise classify(exc, "begin transaction") from exc
        self._open = True

    def produce(self, topic: str, value: bytes | None, key: bytes, partition: int | None = None,
                headers: list[tuple[str, bytes]] | None = None,
                on_delivered: Callable[[Any], None] | None = None) -> None:
        """One record into the open transaction; ``on_delivered(msg)`` once the broker has it."""
        kwargs: dict[str, Any] = {"key": key, "on_delivery": self._delivered if on_delivered is None
                                  else partial(self._delivered, then=on_delivered)}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as exc:
                raise classify(exc, f"produce to {topic}") from exc

    def flush(self, what: str) -> None:
        """Until every record written is delivered (BrokerUnavailable if one was not)."""
        left = self._producer.flush(TIMEOUT)
        failure, self._failure = self._failure, None
        if left or failure:
            raise BrokerUnavailable(f"{what}: {failure or f'{left} message(s) not delivered in {TIMEOUT} s'}")

    def doom(self, why: str) -> None:
        """The open transaction lacks something it had to hold: its next commit aborts it."""
        self._doomed = self._doomed or why

    def commit(self, write: Callable[[], None], offsets: Mapping[str, int], group_metadata: Any) -> None:
        """Into the transaction (begun now unless open): the records ``write`` produces, then the
        input ``offsets`` (``{"topic:partition": next offset}``) for the consumer group
        ``group_metadata`` describes; then commit. Raises :class:`TransactionFailed` when it
        did not commit (aborted, or in doubt)."""
        stage = "begin"
        try:
            if self._doomed is not None:
                raise BrokerUnavailable(self._doomed)
            self.begin()
            stage = "produce"
            write()
            if offsets:
                stage = "offsets"
                tps = [TopicPartition(t, p, o) for (t, p), o in sorted(parse_position(offsets).items())]
                _call_within(self._producer, "send_offsets_to_transaction", tps, group_metadata, TIMEOUT)
            stage = "commit"
            _call_within(self._producer, "commit_transaction", TIMEOUT)
        except _Stuck as exc:
            self._replace_producer(stuck=True)
            raise TransactionFailed(f"transaction aborted ({stage}: {exc})") from exc
        except (KafkaException, BrokerUnavailable) as exc:
            raise self._failed(exc, stage) from exc
        self._committed()

    def abort(self, why: str) -> None:
        """Give up the open transaction: nothing in it becomes visible. An abort the coordinator
        does not acknowledge now is finished by :meth:`settle`."""
        if not self._open and self._pending is None:
            return
        log.warning("txn.aborting", transactional_id=self.transactional_id, reason=why)
        self._abort()

    def settle(self, timeout: float = 1.0) -> str | None:
        """Drives a transaction waiting for the coordinator (an unanswered commit or abort, a
        producer to initialise). Returns None while that cannot be done (brokers away); else how
        the last transaction that did not simply commit ended (``"committed"`` for a commit that
        was in doubt, ``"aborted"``), once, or ``""``."""
        if not self.drive(timeout):
            return None
        outcome, self._outcome = self._outcome, None
        return outcome or ""

    def drive(self, timeout: float) -> bool:
        """One attempt at what is pending; True once nothing is."""
        if self._pending == "commit":
            try:
                _call_within(self._producer, "commit_transaction", timeout)
            except _Stuck:
                self._replace_producer(stuck=True)
                return False
            except KafkaException as exc:
                err = _error(exc)
                if err.retriable() and not err.txn_requires_abort() and not err.fatal():
                    return False
                self._failed(exc, "commit")
            else:
                self._committed()
                self._outcome = "committed"
        if self._pending == "abort":
            self._finish_abort(timeout)
        if self._pending is not None:
            return False
        if not self._ready:
            try:
                _call_within(self._producer, "init_transactions", timeout)
            except _Stuck:
                self._replace_producer(stuck=True)
                return False
            except KafkaException as exc:
                if _error(exc).fatal():
                    self._replace_producer()
                log.info("txn.init_failed", detail=str(exc))
                return False
            self._ready = True
        return True

    def close(self) -> None:
        """Aborts a transaction left open (what it held is re-derived from the committed state
        by whoever owns the partitions next) and lets the producer go."""
        if self._open or self._pending == "abort":
            try:
                _call_within(self._producer, "abort_transaction", 5.0)
            except (KafkaException, _Stuck):
                pass
        try:
            self._producer.flush(1.0)
        except KafkaException:
            pass

    # -- internals

    def _new_producer(self) -> Producer:
        return Producer({
            **CLIENT_DEFAULTS,
            **self.config,
            "bootstrap.servers": self.servers,
            "transactional.id": self.transactional_id,
            "transaction.timeout.ms": int(self.timeout * 1000),
            "enable.idempotence": True,
            "compression.type": "lz4",
            "message.max.bytes": self.max_record_bytes,
            # A batch is one message to the broker's max.message.bytes: never more than a part.
            "batch.size": min(1_000_000, self.part_bytes),
            "linger.ms": 5,
        })

    def _replace_producer(self, stuck: bool = False) -> None:
        """A fatal producer error (fenced: the coordinator aborted our transaction after
        ``transaction.timeout.ms``, or another producer took our transactional id), or a call
        stuck in it: the producer is done for; a new one takes the id over
        (``init_transactions``, which also aborts what the old one left open)."""
        log.warning("txn.producer_replaced", transactional_id=self.transactional_id, stuck=stuck)
        if stuck:
            # A call still blocks inside it: destroying it would pull the client from under
            # that call. It is kept (and leaks) until the process ends.
            self._abandoned.append(self._producer)
        else:
            try:
                self._producer.purge()
            except (KafkaException, RuntimeError, TypeError):
                pass
        self._producer = self._new_producer()
        self._ready = False
        self._open = False
        self._pending = None
        self._doomed = None
        self._discarded()
        self._outcome = "aborted"
        self.aborts += 1

    def _committed(self) -> None:
        self._failure = None
        self._open = False
        self._pending = None
        for participant in self.participants:
            participant.committed()
        self.commits += 1

    def _discarded(self) -> None:
        for participant in self.participants:
            participant.discarded()

    def _abort(self) -> None:
        self._failure = None  # the purged records' reports are no news
        self._open = False
        self._doomed = None
        self._discarded()
        self.aborts += 1
        self._pending = "abort"
        self._finish_abort(TIMEOUT)
        if self._pending is not None:
            log.warning("txn.abort_pending", detail="the coordinator did not answer: retried before anything else")

    def _finish_abort(self, timeout: float) -> None:
        try:
            _call_within(self._producer, "abort_transaction", timeout)
        except _Stuck:
            self._replace_producer(stuck=True)
            return
        except KafkaException as exc:
            err = _error(exc)
            if err.fatal():
                self._replace_producer()
            elif err.code() == KafkaError._STATE:  # no transaction was begun: nothing to abort
                self._pending, self._outcome = None, "aborted"
                self._discarded()
            return
        self._pending, self._outcome = None, "aborted"
        self._discarded()

    def _failed(self, exc: Exception, stage: str) -> TransactionFailed:
        """What a failed transaction step leaves: in doubt (a commit not answered: retry it in
        settle()), or aborted (everything else)."""
        err = _error(exc) if isinstance(exc, KafkaException) else None
        detail = f"{stage}: {err.name()}: {err.str()}" if err is not None else f"{stage}: {exc}"
        if err is not None and err.fatal():
            self._replace_producer()
            log.warning("txn.fenced", transactional_id=self.transactional_id, detail=detail)
            return TransactionFailed(f"transaction fenced ({detail})", code=err.code(), name=err.name())
        if (stage == "commit" and err is not None and err.retriable() and not err.txn_requires_abort()):
            self._pending = "commit"
            log.warning("txn.in_doubt", detail=detail)
            return TransactionFailed(f"transaction commit not acknowledged ({detail})", in_doubt=True,
                                     code=err.code(), name=err.name())
        log.warning("txn.aborted", transactional_id=self.transactional_id, detail=detail)
        self._open = True  # whatever it holds: abort it
        self._abort()
        return TransactionFailed(f"transaction aborted ({detail})", code=err.code() if err else None,
                                 name=err.name() if err else "")

    def _delivered(self, err: KafkaError | None, msg: Any, then: Callable[[Any], None] | None = None) -> None:
        if err is not None:
            self._failure = f"{msg.topic()}: {err.name()}: {err.str()}"
        elif then is not None:
            then(msg)


def _call_within(producer: Producer, call: str, *args: Any) -> Any:
    """``producer.<call>(*args)`` within its timeout (the last argument) and a grace period, on
    a thread of its own. librdkafka does not always keep the timeout: a
    send_offsets_to_transaction whose group coordinator went away (a broker restarted) blocks
    until another broker changes state, which with one broker is never
    (confluentinc/librdkafka#5456, #5511). Raises :class:`_Stuck` past the deadline."""
    fn = getattr(producer, call)
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"rollbackd-txn-{call}", daemon=True).start()
    if not done.wait(float(args[-1]) + _STUCK_GRACE):
        log.error("txn.call_stuck", call=call, after_seconds=float(args[-1]) + _STUCK_GRACE)
        raise _Stuck(f"{call} did not return within {float(args[-1]) + _STUCK_GRACE:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


class _Stuck(Exception):
    """A transactional call that did not return in time (see _call_within)."""


def _error(exc: KafkaException) -> KafkaError:
    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, KafkaError) else KafkaError(KafkaError._FAIL, str(exc))
