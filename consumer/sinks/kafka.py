"""The Kafka sinks: own "every output is delivered to its topic, or the consumer stops".

Two sinks play the `OutputSink` role (`consumer.sinks.roles`): `KafkaSink` for at-least-once,
`TransactionalSink` for exactly-once (below). Both can ask the brokers whether they answer
(`AsksBrokers`) and carry review items (`CarriesReviewItems`). The Kafka client
plumbing they use stays in `consumer.kafka` (the size budgets, the offset tracker, the
producers' defaults).
Outputs arrive as JSON-ready documents (`consumer.pipeline.outputs` builds them) and are sent at
once, from the event loop, without awaiting anything: the pipeline decides most records
synchronously.

Verdicts and dead letters go through one idempotent producer (`acks=all`), keyed like the
input record so they land in the matching partition order downstream. Every output is
fitted to its topic's size budget before it is sent (`consumer.kafka.budget`). Delivery reports are
served by `serve`, which the pipeline calls on its event loop after each batch of records
and every few milliseconds: reports served on a thread of their own would take the GIL from
the loop once per record. The client calls back failed deliveries only; a delivered output is
told by the client releasing its report (`_Report`). The tickets of the delivered records go to
`on_delivered` a batch at a time (the offset tracker then lets their offsets be committed). A
delivery error that concerns one record only (its size, an invalid record) sends that record a
smaller output (`OutputBudget.smaller`: a verdict trimmed again, then a dead letter, then a
minimal one). A retriable delivery error sends the record again (through the backlog) up to
`delivery_retries` times; anything else concerns the topic and is fatal: `on_fatal` is
called with a message naming the topic, the record and what to do, and the record is never
marked delivered, so its offset is never committed. Only acknowledged outputs are counted
(`verdicts_delivered`, `dead_letters_delivered`).

When librdkafka's local queue is full (the broker is slower than we are), outputs wait in
order in a backlog that `serve` produces from as room frees up; nothing is dropped, and the
source's intake limit bounds how many can wait.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from consumer.events import Document, Headers
from consumer.kafka.budget import Output, OutputBudget, OutputRefused
from consumer.kafka.client import PARTITION_UA, KafkaError, KafkaException, Message, Producer, TopicPartition
from consumer.kafka.offsets import OffsetTracker, Ticket, TopicPartitionKey
from consumer.kafka.options import PRODUCER_DEFAULTS
from consumer.sinks.roles import SinkOptions, SinkWiring

log = logging.getLogger(__name__)

# Delivery errors that concern one record only: it gets a smaller output instead.
SIZE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})
RECORD_ERRORS = SIZE_ERRORS | {KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG}
_CREATE = "create the topic (or correct kafka.verdict_topic/dead_letter_topic)"
_OWN_ID = "give each instance its own pipeline.transactional_id"
_WHAT_TO_DO = {
    KafkaError.UNKNOWN_TOPIC_OR_PART: _CREATE,
    KafkaError._UNKNOWN_TOPIC: _CREATE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "grant this client's principal WRITE on the topic",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "grant this client's principal the cluster permissions producing needs",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "grant WRITE on the transactional id",
    KafkaError._FENCED: _OWN_ID,
    KafkaError.PRODUCER_FENCED: _OWN_ID,
    KafkaError.INVALID_PRODUCER_EPOCH: _OWN_ID,
}


def refusal(output: Output, error: KafkaError | str) -> str:
    """The one message a fatal delivery error stops the consumer with: topic, record, what to do."""
    record = output.record
    if isinstance(error, KafkaError):
        what, reason = _WHAT_TO_DO.get(error.code(), "fix what the broker names"), error.str()
    else:
        what, reason = "raise the topic's max.message.bytes", error
    return (
        f"topic {output.topic!r} refused the {output.kind.replace('_', ' ')} of "
        f"{record.topic()}[{record.partition()}]@{record.offset()}: {reason}. To go on: {what}, then restart; "
        f"nothing past the last delivered record was committed, so it is read again."
    )


class KafkaSink:
    def __init__(
        self,
        producer_config: dict[str, Any],
        verdict_topic: str,
        dead_letter_topic: str,
        on_delivered: Callable[[list[Ticket]], None],
        on_fatal: Callable[[str], None],
        delivery_retries: int = 3,
        budget: OutputBudget | None = None,
    ):
        """`budget`: the output topics' size budgets, loaded; by default read here."""
        self.budget = budget or _loaded_budget(producer_config, verdict_topic, dead_letter_topic)
        # A delivered output is told by its report's release, not a call (`_Report`): reports of
        # failures only, so the client builds no `Message` copy of each delivered output.
        self._producer = _producer(producer_config, self.budget, error_cb=self._on_client_error,
                                   **{"delivery.report.only.error": True})  # fmt: skip
        self.verdict_topic = verdict_topic
        self.dead_letter_topic = dead_letter_topic
        self._on_delivered = on_delivered
        self._on_fatal = on_fatal
        self._delivery_retries = delivery_retries
        self._delivered: deque[Ticket] = deque()  # filled by delivery reports, emptied by `serve`
        self._backlog: deque[tuple[Output, Ticket, int]] = deque()  # (output, ticket, attempt)
        self._backlog_lock = threading.Lock()
        self._refused: deque[tuple[Output, Ticket, KafkaError]] = deque()  # per-record refusals, for `serve`
        self.held_back = 0  # outputs that met a full local queue and waited in the backlog
        self.verdicts_delivered = 0
        self.dead_letters_delivered = 0
        self.failed: str | None = None

    @classmethod
    def open(cls, options: SinkOptions, wiring: SinkWiring) -> KafkaSink:
        """A `SinkFactory`: the at-least-once sink the pipeline uses unless it is given another."""
        return cls(options.producer_config, options.verdict_topic, options.dead_letter_topic,
                   wiring.on_delivered, wiring.on_fatal, options.delivery_retries, wiring.budget)  # fmt: skip

    def start(self) -> None:
        return None

    def awaiting_reports(self) -> bool:
        """True while outputs wait to be produced or for their delivery reports to be served."""
        return len(self) > 0

    def serve(self) -> None:
        """Serve delivery reports, hand on the delivered tickets and produce from the backlog."""
        self._producer.poll(0)
        if self._refused:
            self._send_smaller()
        self._hand_on_delivered()
        if self._backlog:
            self._produce_backlog()

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        """`record`: the input record; the output is keyed like it."""
        self._send(self.budget.verdict(verdict, record, headers), ticket)

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        output = fit_dead_letter(self.budget, letter, record, headers, self._fail)
        if output is not None:
            self._send(output, ticket)

    def send_review_item(self, topic: str, item: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        """Another output of `record` (a review item) under the same ticket and the same guarantee:
        fitted to `topic`'s budget, or an `output_rejected` dead letter when it cannot fit."""
        self._send(self.budget.review_item(topic, item, record, headers), ticket)

    def _send(self, output: Output, ticket: Ticket) -> None:
        if not self._backlog:
            try:
                return self._produce(output, ticket, 0)
            except BufferError:
                pass
        with self._backlog_lock:
            self._backlog.append((output, ticket, 0))
        self.held_back += 1

    def _produce(self, output: Output, ticket: Ticket, attempt: int) -> None:
        try:
            # Positional: parsing keywords costs the C call a third of its time (docs/benchmark.md,
            # issue 31, eighth round). confluent-kafka's order (pinned): topic, value, key,
            # partition, callback, on_delivery (an alias), timestamp, headers; should it move, the
            # integration tests fail (test_delivery reads the keys, test_telemetry the traceparent).
            report = _Report(self, output, ticket, attempt)
            self._producer.produce(output.topic, output.value, output.key, PARTITION_UA, report, None, 0,
                                   output.headers or None)  # fmt: skip
        except KafkaException as exc:  # librdkafka's own checks (its message.max.bytes), before sending
            if exc.args[0].code() not in RECORD_ERRORS:
                raise
            self._refused.append((output, ticket, exc.args[0]))
            return
        report.sent = True  # queued: the client holds it until the delivery (else it was released unsent)

    def _report(self, err: KafkaError, output: Output, ticket: Ticket, attempt: int) -> None:
        """A failed delivery (`_Report` handles the delivered ones)."""
        if err.code() in RECORD_ERRORS:
            self._refused.append((output, ticket, err))  # a smaller output, sent by the next `serve`
        elif err.retriable() and attempt < self._delivery_retries:
            log.warning("retrying delivery to %s after %s (attempt %d)", output.topic, err.str(), attempt + 1)
            with self._backlog_lock:  # sent again by the next `serve`
                self._backlog.append((output, ticket, attempt + 1))
        else:
            self._fail(refusal(output, err))

    def _send_smaller(self) -> None:
        """Send each refused record its next, smaller output; stop when nothing smaller is left."""
        while self._refused:
            output, ticket, err = self._refused.popleft()
            try:
                smaller = self.budget.smaller(output, err.str(), size=err.code() in SIZE_ERRORS)
            except OutputRefused:
                self._fail(refusal(output, err))
                return
            log.warning("topic %r refused the %s of %s[%d]@%d (%s); sending a %d-byte %s instead",
                        output.topic, output.kind, output.record.topic(), output.record.partition(),
                        output.record.offset(), err.str(), len(smaller.value), smaller.kind)  # fmt: skip
            self._send(smaller, ticket)

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
            while len(self) and time.monotonic() < deadline and not self.failed:
                self._send_smaller()
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

    def brokers_answer(self, timeout: float) -> bool:
        return brokers_answer(self._producer, timeout)

    def __len__(self) -> int:
        return len(self._producer) + len(self._backlog) + len(self._refused)


class _Report:
    """One output's delivery report: it carries the ticket. The producer runs with
    `delivery.report.only.error`, so confluent-kafka calls it for a failed delivery only, and
    releases it (the last reference, held since `produce`) when a delivery succeeds: `__del__` of
    a report that was sent (`sent`) and never called is a delivered output. That spares each
    delivered output the `Message` the client builds for a call (its value, key and headers
    copied) and the call itself (docs/benchmark.md, issue 31, ninth round). A report released
    without being sent (`produce` refused it) or after its failure was handled counts nothing.

    One slotted object per output rather than a closure (a function, its cells and their tuple):
    every object a record makes is also freed while `Producer.poll` serves its report (fifth round)."""

    __slots__ = ("sink", "output", "ticket", "attempt", "sent")

    def __init__(self, sink: KafkaSink, output: Output, ticket: Ticket, attempt: int):
        self.sink = sink
        self.output = output
        self.ticket = ticket
        self.attempt = attempt
        self.sent = False

    def __call__(self, err: KafkaError | None, _msg: Any) -> None:
        self.sent = False  # reported: its release says nothing more
        if err is None:  # a client that reports deliveries too
            self._delivered()
        else:
            self.sink._report(err, self.output, self.ticket, self.attempt)

    def __del__(self) -> None:
        if self.sent:
            self._delivered()

    def _delivered(self) -> None:
        sink = self.sink
        sink._delivered.append(self.ticket)  # a deque: safe whichever thread serves reports
        kind = self.output.kind
        if kind == "verdict":
            sink.verdicts_delivered += 1
        elif kind != "review_item":
            sink.dead_letters_delivered += 1


def brokers_answer(producer: Producer, timeout: float) -> bool:
    """A metadata round trip on the producer's own connections (no new client, no new log
    lines): True when a broker answered within `timeout`. Blocking: call it off the loop."""
    try:
        producer.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def fit_dead_letter(
    budget: OutputBudget, letter: Document, record: Message, headers: Headers, fail: Callable[[str], None]
) -> Output | None:
    """The dead letter fitted to its topic; None, after `fail`, when no dead letter can fit it at all."""
    try:
        return budget.dead_letter(letter, record, headers)
    except OutputRefused as exc:
        fail(refusal(Output(budget.dead_letter_topic, b"", None, [], letter, record, "dead_letter"), str(exc)))
        return None


def _loaded_budget(producer_config: dict[str, Any], verdict_topic: str, dead_letter_topic: str) -> OutputBudget:
    budget = OutputBudget(producer_config, verdict_topic, dead_letter_topic)
    budget.load()
    return budget


def _producer(options: dict[str, Any], budget: OutputBudget, **extra: Any) -> Producer:
    # Idempotence and acks=all are what "delivered" means here: user options cannot turn them off.
    # A batch of several outputs must fit the smaller output topic's limit, or the broker refuses all of it.
    batch = min(int(options.get("batch.size", budget.batch_size())), budget.batch_size())
    return Producer({**PRODUCER_DEFAULTS, **options, **extra, "batch.size": batch, "enable.idempotence": True,
                     "acks": "all"})  # fmt: skip


def transactional_id(configured: str | None, group_id: str) -> str:
    """The data path's transactional id: `pipeline.transactional_id`, by default one per group and
    host (unique per running instance, stable across its restarts, so a restart fences its predecessor)."""
    return configured or f"{group_id}-{socket.gethostname()}"


class TransactionalSink:
    """Exactly-once: the outputs of exactly the committed offsets, in one Kafka transaction.

    Outputs are held in memory (a record's verdict or dead letter, and its review items), and
    each is reported to `on_done` as it is held: the record counts as done once all of its
    outputs are held (the pipeline's `OutputJoin` waits for the last one). A commit (the source
    calls `commit` on its poll thread, every `commit_interval_s`, when `max_records` records
    wait, on revoke and on close) takes the tracker's contiguous positions, produces the held
    outputs of the records below them in offset order, adds the offsets with
    `send_offsets_to_transaction` and commits: a record's verdict, its review items and its
    offset become visible to `read_committed` readers together or not at all. Outputs of records
    above a gap wait for the next commit, so a crash never exposes an output whose offset is not
    committed.

    An abortable error aborts the transaction and retries it with the same outputs. An output
    the broker refused for a reason of its own record (size, an invalid record) aborts it too,
    and the transaction is retried with that record's smaller output in its place. A fenced
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
        budget: OutputBudget | None = None,
        on_done: Callable[[list[Ticket]], None] | None = None,
    ):
        """`on_done`: told of each output held, by its record's ticket (by default the tracker, for
        records with one output each)."""
        self.budget = budget or _loaded_budget(producer_config, verdict_topic, dead_letter_topic)
        self._producer = _producer(producer_config, self.budget, **{"transactional.id": transactional_id})
        self.verdict_topic = verdict_topic
        self.dead_letter_topic = dead_letter_topic
        self._tracker = tracker
        self._on_fatal = on_fatal
        self._max_records = max_records
        self._commit_attempts = commit_attempts
        self._on_done = on_done or tracker.done_many
        self._held: dict[Ticket, list[Output]] = {}  # a record's outputs, in the order they were sent
        self._lock = threading.Lock()
        self.failed: str | None = None
        self.held_back = 0  # outputs are held for the transaction, never for want of room
        self.verdicts_delivered = 0  # of committed transactions
        self.dead_letters_delivered = 0

    def start(self, timeout: float = 60.0) -> None:
        # Fences any earlier instance with the same transactional.id and aborts its open transaction.
        self._producer.init_transactions(timeout)
        self._producer.begin_transaction()

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._hold(ticket, self.budget.verdict(verdict, record, headers))

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        output = fit_dead_letter(self.budget, letter, record, headers, self._fail)
        if output is not None:
            self._hold(ticket, output)

    def send_review_item(self, topic: str, item: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        """Held with the record's verdict and committed in the same transaction: a `read_committed`
        reader never sees a review item without its verdict, nor a verdict without its review items."""
        self._hold(ticket, self.budget.review_item(topic, item, record, headers))

    def _hold(self, ticket: Ticket, output: Output) -> None:
        with self._lock:
            if not self._tracker.is_current(ticket):
                return  # revoked meanwhile: the new owner produces this output
            held = self._held.get(ticket)
            if held is None:
                self._held[ticket] = [output]
            else:
                held.append(output)
        self._on_done([ticket])

    def awaiting_reports(self) -> bool:
        return False

    def serve(self) -> None:
        return None  # outputs are produced by `commit`, on the poll thread

    def committed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        return None  # offsets go through the transaction, never through a consumer commit

    def due(self) -> bool:
        return len(self._held) >= self._max_records

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
            attempt = 0
            while True:
                try:
                    refused = self._commit_transaction(consumer, batch, offsets)
                except KafkaException as exc:
                    error: KafkaError = exc.args[0]
                    attempt += 1
                    if error.txn_requires_abort() and attempt < self._commit_attempts:
                        log.warning("transaction aborted (%s); retrying it with the same outputs", error.str())
                        self._restart_transaction()
                        continue
                    self._fail(f"exactly-once commit failed: {error.str()}")
                    return
                if not refused:
                    break
                # Each smaller output is one step down (verdict, dead letter, minimal), so this ends.
                self._restart_transaction()
                if not self._replace_refused(refused):
                    return
            for ticket in batch:
                for output in self._held.pop(ticket):
                    if output.kind == "verdict":
                        self.verdicts_delivered += 1
                    elif output.kind != "review_item":
                        self.dead_letters_delivered += 1
            self._tracker.mark_committed(positions)

    def _restart_transaction(self) -> None:
        self._producer.abort_transaction()
        self._producer.begin_transaction()

    def _replace_refused(self, refused: dict[tuple[Ticket, int], KafkaError]) -> bool:
        """Put each refused output's smaller one in its place; False (and stop) when an error
        concerns the topic or nothing smaller is left."""
        for (ticket, i), err in refused.items():
            outputs = self._held[ticket]
            output = outputs[i]
            try:
                if err.code() not in RECORD_ERRORS:
                    raise OutputRefused(err.str())
                outputs[i] = self.budget.smaller(output, err.str(), size=err.code() in SIZE_ERRORS)
            except OutputRefused:
                self._fail(refusal(output, err))
                return False
            log.warning("topic %r refused the %s of %s[%d]@%d (%s); the transaction is retried with a %s",
                        output.topic, output.kind, ticket.topic, ticket.partition, ticket.offset, err.str(),
                        outputs[i].kind)  # fmt: skip
        return True

    def _fail(self, reason: str) -> None:
        self.failed = reason
        log.error("%s", reason)
        self._on_fatal(reason)

    def _commit_transaction(
        self, consumer: Any, batch: list[Ticket], offsets: list[TopicPartition]
    ) -> dict[tuple[Ticket, int], KafkaError]:
        """Produce the batch's outputs and commit them with the offsets; or, when the broker
        refused some outputs, commit nothing and return them, as (ticket, index), with their errors."""
        refused: dict[tuple[Ticket, int], KafkaError] = {}
        for ticket in batch:
            for i, output in enumerate(self._held[ticket]):

                def report(err: KafkaError | None, _msg: Any, at: tuple[Ticket, int] = (ticket, i)) -> None:
                    if err is not None:
                        refused[at] = err

                while True:
                    try:
                        self._producer.produce(output.topic, value=output.value, key=output.key,
                                               headers=output.headers or None, on_delivery=report)  # fmt: skip
                        break
                    except BufferError:
                        self._producer.poll(0.05)
                    except KafkaException as exc:  # librdkafka's own checks, before sending
                        refused[(ticket, i)] = exc.args[0]
                        break
        # Delivery reports first: a refused output must not be committed, even as part of a batch.
        self._producer.flush()
        if refused:
            return refused
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
        return refused

    def flush(self, timeout: float) -> int:
        """Nothing waits here: the held outputs are committed, or aborted, with the transaction
        that the source's final commit ends (on close), so none counts as undelivered."""
        return 0

    def brokers_answer(self, timeout: float) -> bool:
        return brokers_answer(self._producer, timeout)

    def close(self) -> None:
        # An open transaction without outputs is simply dropped; one that failed is aborted
        # by the broker (or by the next instance's init_transactions).
        self._producer.close()
