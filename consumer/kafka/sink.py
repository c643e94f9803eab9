"""The sink: owns "every output is delivered, or the consumer stops".

Two sinks play the `OutputSink` role (`consumer.kafka.roles`): `Sink` for at-least-once,
`TransactionalSink` for exactly-once (below).
Outputs arrive as JSON-ready documents (`consumer.pipeline.outputs` builds them) and are sent at
once, from the event loop, without awaiting anything: the pipeline decides most records
synchronously.

Verdicts and dead letters go through one idempotent producer (`acks=all`), keyed like the
input record so they land in the matching partition order downstream. Delivery reports are
served by `serve`, which the pipeline calls on its event loop after each batch of records
and every few milliseconds: reports served on a thread of their own would take the GIL from
the loop once per record. The tickets of the delivered records go to `on_delivered` a batch
at a time (the offset tracker then lets their offsets be committed). A retriable delivery
error sends the record again (through the backlog) up to `delivery_retries` times; anything
else is fatal: `on_fatal` is called and the record is never marked delivered, so its offset
is never committed.

When librdkafka's local queue is full (the broker is slower than we are), outputs wait in
order in a backlog that `serve` produces from as room frees up; nothing is dropped, and the
source's intake limit bounds how many can wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from consumer.events import Document, Headers
from consumer.kafka.offsets import OffsetTracker, Ticket, TopicPartitionKey
from consumer.kafka.roles import SinkOptions, SinkWiring

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
}

_Output = tuple[str, bytes, bytes | None, Headers]


class Sink:
    def __init__(
        self,
        producer_config: dict[str, Any],
        verdict_topic: str,
        dead_letter_topic: str,
        on_delivered: Callable[[list[Ticket]], None],
        on_fatal: Callable[[str], None],
        delivery_retries: int = 3,
    ):
        self._producer = _producer(producer_config, error_cb=self._on_client_error)
        self.verdict_topic = verdict_topic
        self.dead_letter_topic = dead_letter_topic
        self._on_delivered = on_delivered
        self._on_fatal = on_fatal
        self._delivery_retries = delivery_retries
        self._delivered: deque[Ticket] = deque()  # filled by delivery reports, emptied by `serve`
        self._backlog: deque[tuple[_Output, Ticket, int]] = deque()  # (output, ticket, attempt)
        self._backlog_lock = threading.Lock()
        self.held_back = 0  # outputs that met a full local queue and waited in the backlog
        self.failed: str | None = None

    @classmethod
    def open(cls, options: SinkOptions, wiring: SinkWiring) -> Sink:
        """A `SinkFactory`: the at-least-once sink the pipeline uses unless it is given another."""
        return cls(options.producer_config, options.verdict_topic, options.dead_letter_topic,
                   wiring.on_delivered, wiring.on_fatal, options.delivery_retries)  # fmt: skip

    def start(self) -> None:
        return None

    def awaiting_reports(self) -> bool:
        """True while outputs wait to be produced or for their delivery reports to be served."""
        return len(self) > 0

    def serve(self) -> None:
        """Serve delivery reports, hand on the delivered tickets and produce from the backlog."""
        self._producer.poll(0)
        self._hand_on_delivered()
        if self._backlog:
            self._produce_backlog()

    def send_verdict(self, verdict: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._send((self.verdict_topic, orjson.dumps(verdict), key, headers), ticket)

    def send_dead_letter(self, letter: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._send((self.dead_letter_topic, orjson.dumps(letter), key, headers), ticket)

    def send(self, topic: str, document: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        """Another output of the record to another topic (a review item): the same guarantee."""
        self._send((topic, orjson.dumps(document), key, headers), ticket)

    def _send(self, output: _Output, ticket: Ticket) -> None:
        if not self._backlog:
            try:
                return self._produce(output, ticket, 0)
            except BufferError:
                pass
        with self._backlog_lock:
            self._backlog.append((output, ticket, 0))
        self.held_back += 1

    def _produce(self, output: _Output, ticket: Ticket, attempt: int) -> None:
        topic, value, key, headers = output

        def report(err: KafkaError | None, _msg: Any) -> None:  # one per output: it carries the ticket
            if err is None:
                self._delivered.append(ticket)  # a deque: safe whichever thread serves reports
            elif err.retriable() and attempt < self._delivery_retries:
                log.warning("retrying delivery to %s after %s (attempt %d)", topic, err.str(), attempt + 1)
                with self._backlog_lock:  # sent again by the next `serve`
                    self._backlog.append((output, ticket, attempt + 1))
            else:
                self._fail(f"delivery to topic {topic!r} failed: {err.str()}")

        self._producer.produce(topic, value=value, key=key, headers=headers or None, on_delivery=report)

    def _produce_backlog(self) -> None:
        with self._backlog_lock:
            while self._backlog:
                output, ticket, attempt = self._backlog[0]
                try:
                    self._produce(output, ticket, attempt)
                except BufferError:
                    return
                self._backlog.popleft()

    def _hand_on_delivered(self) -> None:
        delivered = self._delivered
        if delivered:
            self._on_delivered([delivered.popleft() for _ in range(len(delivered))])

    def _on_client_error(self, err: KafkaError) -> None:
        if err.fatal() or err.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            self._fail(f"fatal producer error: {err.str()}")
        else:
            log.info("producer: %s", err.str())

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.error("%s", reason)
            self._on_fatal(reason)

    def flush(self, timeout: float) -> int:
        """Wait for outstanding deliveries (retries included); returns how many are still undelivered."""
        deadline = time.monotonic() + timeout
        try:
            while len(self) and time.monotonic() < deadline:
                self._produce_backlog()
                self._producer.flush(min(0.1, max(0.0, deadline - time.monotonic())))
                self._hand_on_delivered()
        except KafkaException as exc:
            self._fail(f"flush failed: {exc}")
        self._hand_on_delivered()
        return len(self)

    def close(self) -> None:
        """Release the producer's connections; call after `flush`."""
        self._producer.close()

    def __len__(self) -> int:
        return len(self._producer) + len(self._backlog)


def _producer(options: dict[str, Any], **extra: Any) -> Producer:
    # Idempotence and acks=all are what "delivered" means here: user options cannot turn them off.
    return Producer({**PRODUCER_DEFAULTS, **options, **extra, "enable.idempotence": True, "acks": "all"})


class TransactionalSink:
    """Exactly-once: the outputs of exactly the committed offsets, in one Kafka transaction.

    Outputs are held in memory, and the record is marked done at once. A commit (the source
    calls `commit` on its poll thread, every `commit_interval_s`, when `max_records` outputs
    wait, on revoke and on close) takes the tracker's contiguous positions, produces the held
    outputs of the records below them in offset order, adds the offsets with
    `send_offsets_to_transaction` and commits: outputs and offsets become visible to
    `read_committed` readers together or not at all. Outputs of records above a gap wait for
    the next commit, so a crash never exposes an output whose offset is not committed.

    An abortable error aborts the transaction and retries it with the same outputs; a fenced
    (zombie) instance or any other fatal error stops the consumer without committing.
    """

    def __init__(
        self,
        producer_config: dict[str, Any],
        verdict_topic: str,
        dead_letter_topic: str,
        tracker: OffsetTracker,
        transactional_id: str,
        on_fatal: Callable[[str], None],
        max_records: int = 1000,
        commit_attempts: int = 3,
    ):
        self._producer = _producer(producer_config, **{"transactional.id": transactional_id})
        self.verdict_topic = verdict_topic
        self.dead_letter_topic = dead_letter_topic
        self._tracker = tracker
        self._on_fatal = on_fatal
        self._max_records = max_records
        self._commit_attempts = commit_attempts
        self._held: dict[Ticket, _Output] = {}
        self._lock = threading.Lock()
        self.failed: str | None = None
        self.transactions = 0
        self.held_back = 0  # outputs are held for the transaction, never for want of room

    def start(self, timeout: float = 60.0) -> None:
        # Fences any earlier instance with the same transactional.id and aborts its open transaction.
        self._producer.init_transactions(timeout)
        self._producer.begin_transaction()

    def send_verdict(self, verdict: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._hold(ticket, (self.verdict_topic, orjson.dumps(verdict), key, headers))

    def send_dead_letter(self, letter: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._hold(ticket, (self.dead_letter_topic, orjson.dumps(letter), key, headers))

    def _hold(self, ticket: Ticket, output: _Output) -> None:
        with self._lock:
            if not self._tracker.is_current(ticket):
                return  # revoked meanwhile: the new owner produces this output
            self._held[ticket] = output
        self._tracker.done(ticket)

    def awaiting_reports(self) -> bool:
        return False

    def serve(self) -> None:
        return None  # outputs are produced by `commit`, on the poll thread

    def committed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        return None  # offsets go through the transaction, never through a consumer commit

    def due(self) -> bool:
        return len(self._held) >= self._max_records

    def pending(self) -> int:
        return len(self._held)

    def forget(self, partitions: list[TopicPartitionKey]) -> None:
        with self._lock:
            revoked = set(partitions)
            for ticket in [t for t in self._held if (t.topic, t.partition) in revoked]:
                del self._held[ticket]
            self._tracker.forget(partitions)

    def commit(self, consumer: Any, partitions: list[TopicPartitionKey] | None, wait: bool = True) -> None:
        """Always completes before returning: a transaction has no asynchronous commit."""
        with self._lock:
            if self.failed:
                return
            positions = self._tracker.commit_positions(partitions)
            if not positions:
                return
            batch = sorted(
                (t for t in self._held if (t.topic, t.partition) in positions and t.offset < positions[(t.topic, t.partition)]),
                key=lambda t: (t.topic, t.partition, t.offset),
            )
            offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()]
            for attempt in range(1, self._commit_attempts + 1):
                try:
                    self._commit_transaction(consumer, batch, offsets)
                    break
                except KafkaException as exc:
                    error: KafkaError = exc.args[0]
                    if error.txn_requires_abort() and attempt < self._commit_attempts:
                        log.warning("transaction aborted (%s); retrying it with the same outputs", error.str())
                        self._producer.abort_transaction()
                        self._producer.begin_transaction()
                        continue
                    self.failed = f"exactly-once commit failed: {error.str()}"
                    log.error("%s", self.failed)
                    self._on_fatal(self.failed)
                    return
            for ticket in batch:
                del self._held[ticket]
            self._tracker.mark_committed(positions)
            self.transactions += 1

    def _commit_transaction(self, consumer: Any, batch: list[Ticket], offsets: list[TopicPartition]) -> None:
        for ticket in batch:
            topic, value, key, headers = self._held[ticket]
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, headers=headers or None)
                    break
                except BufferError:
                    self._producer.poll(0.05)
        self._producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata())
        for attempt in range(self._commit_attempts):
            try:
                self._producer.commit_transaction()
                break
            except KafkaException as exc:
                # A retriable error leaves the transaction as it was: commit it again, do not re-produce.
                if not exc.args[0].retriable() or attempt == self._commit_attempts - 1:
                    raise
        self._producer.begin_transaction()

    def flush(self, timeout: float) -> int:
        """Outputs still held (they are produced by the final commit, on close)."""
        return 0

    def close(self) -> None:
        # An open transaction without outputs is simply dropped; one that failed is aborted
        # by the broker (or by the next instance's init_transactions).
        self._producer.close()
