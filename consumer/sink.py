"""The sink: owns "every output is delivered, or the consumer stops".

Two sinks share one interface (`send_verdict`, `send_dead_letter`, `start`, `flush`, `close`):
`Sink` for at-least-once, `TransactionalSink` for exactly-once (below).

Verdicts and dead letters go through one idempotent producer (`acks=all`), keyed like the
input record so they land in the matching partition order downstream. A delivery report is
served on the sink's own thread; on success the record's ticket is handed to `on_delivered`
(the offset tracker then lets its offset be committed). A retriable delivery error re-sends
the record up to `delivery_retries` times; anything else is fatal: `on_fatal` is called and
the record is never marked delivered, so its offset is never committed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from consumer.offsets import OffsetTracker, Ticket, TopicPartitionKey

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes | None]]

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
}


class Sink:
    def __init__(
        self,
        producer_config: dict[str, Any],
        verdict_topic: str,
        dead_letter_topic: str,
        on_delivered: Callable[[Ticket], None],
        on_fatal: Callable[[str], None],
        delivery_retries: int = 3,
    ):
        self._producer = _producer(producer_config, error_cb=self._on_client_error)
        self.verdict_topic = verdict_topic
        self.dead_letter_topic = dead_letter_topic
        self._on_delivered = on_delivered
        self._on_fatal = on_fatal
        self._delivery_retries = delivery_retries
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="sink-delivery", daemon=True)
        self.failed: str | None = None

    def start(self) -> None:
        self._thread.start()

    async def send_verdict(self, verdict: BaseModel, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        await self._send(self.verdict_topic, _encode(verdict), key, ticket, headers)

    async def send_dead_letter(self, letter: BaseModel, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        await self._send(self.dead_letter_topic, _encode(letter), key, ticket, headers)

    async def _send(self, topic: str, value: bytes, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        try:
            return self._produce(topic, value, key, ticket, headers, attempt=0)
        except BufferError:
            pass  # the fast path above is the common case; the retry loop costs more than a send
        # A full local queue (BufferError) means the broker is slower than we are: wait, never drop.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(BufferError), wait=wait_exponential(multiplier=0.005, max=0.5)
        ):
            with attempt:
                self._produce(topic, value, key, ticket, headers, attempt=0)

    def _produce(self, topic: str, value: bytes, key: bytes | None, ticket: Ticket, headers: Headers, attempt: int) -> None:
        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                self._on_delivered(ticket)
            elif err.retriable() and attempt < self._delivery_retries:
                log.warning("retrying delivery to %s after %s (attempt %d)", topic, err.str(), attempt + 1)
                self._resend(topic, value, key, ticket, headers, attempt + 1)
            else:
                self._fail(f"delivery to topic {topic!r} failed: {err.str()}")

        self._producer.produce(topic, value=value, key=key, headers=headers or None, on_delivery=report)

    def _resend(self, topic: str, value: bytes, key: bytes | None, ticket: Ticket, headers: Headers, attempt: int) -> None:
        # Runs on the delivery thread, which may block: serve reports until the queue has room.
        while True:
            try:
                return self._produce(topic, value, key, ticket, headers, attempt)
            except BufferError:
                self._producer.poll(0.05)

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

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def flush(self, timeout: float) -> int:
        """Wait for outstanding deliveries; returns how many are still undelivered."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            return self._producer.flush(timeout)
        except KafkaException as exc:
            self._fail(f"flush failed: {exc}")
            return len(self._producer)

    def close(self) -> None:
        """Release the producer's connections; call after `flush`."""
        self._producer.close()

    def __len__(self) -> int:
        return len(self._producer)


def _producer(options: dict[str, Any], **extra: Any) -> Producer:
    # Idempotence and acks=all are what "delivered" means here: user options cannot turn them off.
    return Producer({**PRODUCER_DEFAULTS, **options, **extra, "enable.idempotence": True, "acks": "all"})


def _encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


_Output = tuple[str, bytes, bytes | None, Headers]


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

    def start(self, timeout: float = 60.0) -> None:
        # Fences any earlier instance with the same transactional.id and aborts its open transaction.
        self._producer.init_transactions(timeout)
        self._producer.begin_transaction()

    async def send_verdict(self, verdict: BaseModel, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._hold(ticket, (self.verdict_topic, _encode(verdict), key, headers))

    async def send_dead_letter(self, letter: BaseModel, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._hold(ticket, (self.dead_letter_topic, _encode(letter), key, headers))

    def _hold(self, ticket: Ticket, output: _Output) -> None:
        with self._lock:
            if not self._tracker.is_current(ticket):
                return  # revoked meanwhile: the new owner produces this output
            self._held[ticket] = output
        self._tracker.done(ticket)

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

    def commit(self, consumer: Any, partitions: list[TopicPartitionKey] | None) -> None:
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
