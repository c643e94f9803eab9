"""The review loop: moderators' decisions and users' appeals back into the stream.

A second consumer inside the consumer process, on a thread of its own, next to the data
path and independent of it:

- the **follower** (an assigned consumer of every partition of the review topic and the
  decisions topic, in no group, committing nothing) keeps `ReviewState`: it reads both topics
  from their earliest retained offsets at start (a bounded read, up to the end offsets found
  at start) and follows them from then on. Every decision it reads for a known item teaches
  the classifier (`on_decided`): at start only the cache (the heads saved theirs), then
  also the heads. No external store: the topics are the state.
- the **applier** (a member of group `review.group_id`, subscribed to the decisions and
  appeals topics) turns each decision into a corrected verdict and each appeal into a review
  item, and commits a record's offset only after its output (or its dead letter) was
  delivered: a poll batch is produced, flushed, and then committed. A crash in between
  re-reads the batch: a corrected verdict may then be sent twice (at least once), never lost.
  With `pipeline.delivery: exactly_once` the batch's outputs and its offsets are committed in
  one transaction instead (transactional id: the data path's, plus `-review`): a
  `read_committed` reader sees one corrected verdict per decision, also across crashes.

Which decision counts: the first one read for a review id (decisions are keyed by review id,
so one review's decisions sit in one partition, in order). Before applying a decision the
applier lets the follower read its partition up to that decision, so both agree which was
first. Later decisions with the same answer change nothing; with another answer they become
`conflicting_decision` dead letters; a decision for a review id no item carries becomes an
`unknown_review` dead letter, a malformed one `invalid_json` or `schema_violation`, an appeal
whose verdict cannot be found `appeal_not_found`. None of them stops the loop.

A lead's overturn (a `ReviewDecision` of kind `overturn`) is the one allowed second answer: on
a decided review whose answer in force it changes, it yields a corrected verdict superseding the
one the answer it replaces produced, and teaches in place of that answer (the heads forget the
replaced label of the content); an overturn of an undecided
review is a `conflicting_decision` dead letter, one that changes nothing a duplicate. Escalations
and comments (`ReviewNote`) share the topic and are no decisions: the state keeps them, the
applier commits past them with no output.

Disagreement reviews (a shadow check disagreed after the verdict was sent) are handed in by
`submit` and produced by this loop's producer (exactly-once: in its next transaction): they
are not part of any input record's commit, so a crash before they are delivered loses them
(the shadow check is a sample).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from consumer.config import Settings
from consumer.events import Appeal, ContentEvent, Document, ErrorType, ReviewDecision, ReviewItem, ReviewNote
from consumer.kafka.client import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from consumer.kafka.client_logs import client_options
from consumer.kafka.ranges import assign_from_earliest
from consumer.kafka.options import PRODUCER_DEFAULTS
from consumer.policy import Policy
from consumer.policy.communities import CommunityIndex
from consumer.review.appeals import appeal_item
from consumer.review.decisions import RejectedInput, corrected_verdict, dead_letter, parse, parse_record
from consumer.review.state import Decided, ReviewState
from consumer.sinks.kafka import transactional_id

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.2
FLUSH_TIMEOUT_S = 30.0
TRANSACTION_ATTEMPTS = 3  # exactly-once: an abortable error retries the batch's transaction this often
_Output = tuple[str, bytes, bytes | None]  # topic, value, key


class ReviewLoop:
    """Owns "a decision or appeal is committed only after its output was delivered", and "one
    corrected verdict per review id"."""

    def __init__(
        self,
        settings: Settings,
        state: ReviewState,
        policies: Callable[[], Mapping[str, Policy]],
        decode: Callable[[Message], ContentEvent],
        on_decided: Callable[[Decided, bool], None],
        on_fatal: Callable[[str], None],
    ):
        """`on_decided(decided, live)`: a decision read by the follower, on its thread; `live`
        False while the state is rebuilt at start. `decode` reads an input record (appeals)."""
        self.settings = settings
        self.review = settings.review
        self.state = state
        self._policies = policies
        self._communities = CommunityIndex(policies)  # a community's baseline_actions, for corrected verdicts
        self._decode = decode
        self._on_decided = on_decided
        self._on_fatal = on_fatal
        kafka = settings.kafka
        self._client = kafka.consumer_options | {"bootstrap.servers": kafka.bootstrap_servers}
        self._producer_config = {**PRODUCER_DEFAULTS, **kafka.producer_options,
                                 "bootstrap.servers": kafka.bootstrap_servers}  # fmt: skip
        self._group_id = self.review.group_id or f"{kafka.group_id}.review"
        self._transactional_id = (transactional_id(settings.pipeline.transactional_id, kafka.group_id) + "-review"
                                  if settings.pipeline.delivery == "exactly_once" else None)  # fmt: skip
        self._submitted: deque[_Output] = deque()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._follower: Consumer | None = None
        self._applier: Consumer | None = None
        self._producer: Producer | None = None
        self.failed: str | None = None
        self.applied = 0  # corrected verdicts sent
        self.duplicates = 0
        self.appeals_opened = 0
        self.dead_letters = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Rebuild the state from the topics (blocking), then follow and apply on a thread."""
        # Its client's lines go through the JSON logger, not to the terminal (a restart's transactional
        # init logs the predecessor's transaction being aborted).
        config = {**self._producer_config, **client_options("review-producer")}
        if self._transactional_id is None:
            self._producer = Producer(config)
        else:
            self._producer = Producer({**config, "transactional.id": self._transactional_id})
            # Fences this instance's predecessor and aborts its open transaction first: a read_committed
            # follower would otherwise wait at that transaction until it timed out.
            self._producer.init_transactions(FLUSH_TIMEOUT_S)
        self._follower = Consumer({**self._client, "group.id": f"{self._group_id}.follower",
                                   "enable.auto.commit": False, "enable.partition.eof": False})  # fmt: skip
        ends = self._assign_follower()
        started = time.monotonic()
        self._follow_until(ends)
        log.info("review state rebuilt in %.1fs: %d open reviews, %d decided",
                 time.monotonic() - started, sum(self.state.open_reviews().values()), self.state.decisions)  # fmt: skip
        self._applier = Consumer({**self._client, "group.id": self._group_id, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest"})  # fmt: skip
        # Appeals are read only where they open reviews (review.when).
        topics = [self.review.decisions_topic] + ([self.review.appeals_topic] if self.review.opens("appeal") else [])
        self._applier.subscribe(topics)
        self._thread = threading.Thread(target=self._run, name="review-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for client in (self._applier, self._follower):
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing what may have failed already
                    log.debug("closing a review consumer failed", exc_info=True)
        if self._producer is not None:
            self._producer.flush(5)
            self._producer.close()

    def submit(self, item: ReviewItem, key: bytes | None) -> None:
        """A review item opened outside any input record's commit (a shadow disagreement); any thread."""
        self._submitted.append((self.review.topic, orjson.dumps(item.model_dump(mode="json")), key))

    # -- the follower --------------------------------------------------------------------------

    def _assign_follower(self) -> dict[tuple[str, int], int]:
        """Assign every partition of both topics from the earliest offset; returns the end offsets now."""
        assert self._follower is not None
        ends = assign_from_earliest(self._follower, (self.review.topic, self.review.decisions_topic))
        self._live = False
        return ends

    def _follow(self, timeout: float) -> None:
        assert self._follower is not None
        for message in self._follower.consume(500, timeout=timeout):
            if message.error() is not None:
                continue
            self._read_state(message)

    def _follow_until(self, targets: dict[tuple[str, int], int]) -> None:
        """Read until each (topic, partition) position reaches its target offset."""
        assert self._follower is not None
        left = dict(targets)
        while left and not self._stopping.is_set():
            # Positions first: a follower already past the target (the usual case, as it reads
            # between batches) must not wait a poll timeout per decision.
            for tp in self._follower.position([TopicPartition(t, p) for t, p in left]):
                if tp.offset >= left[(tp.topic, tp.partition)]:
                    del left[(tp.topic, tp.partition)]
            if left:
                self._follow(POLL_TIMEOUT_S)
        self._live = True

    def _read_state(self, message: Message) -> None:
        value = message.value()
        if message.topic() == self.review.topic:
            try:
                item = ReviewItem.model_validate_json(value or b"")
            except ValueError:
                log.warning("unreadable review item at %s[%d]@%d", message.topic(), message.partition(), message.offset())
                return
            decided = self.state.add_item(item, message.key())
        else:
            try:
                record = parse_record(value)
            except RejectedInput:
                return  # the applier dead-letters it
            one = self.state.add_record(record, (message.topic(), message.partition(), message.offset()))
            decided = [one] if one is not None else []
        for d in decided:
            try:
                self._on_decided(d, self._live)
            except Exception:  # noqa: BLE001 - teaching is an improvement, never a reason to stop
                log.exception("learning from review %s failed", d.item.review_id)

    # -- the applier ---------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._applier is not None
        try:
            while not self._stopping.is_set():
                self._follow(0)
                messages = [m for m in self._applier.consume(100, timeout=POLL_TIMEOUT_S) if self._readable(m)]
                outputs: list[_Output] = []
                while self._submitted:
                    outputs.append(self._submitted.popleft())
                for message in messages:
                    outputs.extend(self._handle(message))
                if self._transactional_id is not None:
                    if (outputs or messages) and not self._transact(outputs, messages):
                        return
                    continue
                if outputs and not self._deliver(outputs):
                    return
                if messages:
                    self._commit(messages)
        except Exception as exc:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("review loop failed")
            self._fail(f"review loop failed: {type(exc).__name__}: {exc}")

    def _readable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("review consumer: %s", error.str())
        return False

    def _handle(self, message: Message) -> list[_Output]:
        try:
            if message.topic() == self.review.decisions_topic:
                return self._decision(message)
            return self._appeal(message)
        except RejectedInput as exc:
            self.dead_letters += 1
            log.info("review input %s[%d]@%d rejected: %s", message.topic(), message.partition(), message.offset(),
                     exc.error_type.value)  # fmt: skip
            letter = dead_letter(message, exc.error_type, str(exc))
            return [(self.settings.kafka.dead_letter_topic, orjson.dumps(letter), message.key())]

    def _decision(self, message: Message) -> list[_Output]:
        decision = parse_record(message.value())
        if isinstance(decision, ReviewNote):
            return []  # an escalation or a comment: the follower keeps it for the console; nothing to send
        at = (message.topic(), message.partition(), message.offset())
        # The follower must have read this partition up to here: then both agree which decision was first.
        self._follow_until({(at[0], at[1]): at[2] + 1})
        if decision.kind == "overturn":
            return self._overturn(decision, at)
        applied = self.state.applied(decision.review_id)
        if applied is None and not self.state.known(decision.review_id):
            self._catch_up_items()
            applied = self.state.applied(decision.review_id)
        if applied is None:
            self.state.drop_orphan(decision.review_id, at)
            raise RejectedInput(ErrorType.UNKNOWN_REVIEW,
                                f"no review item {decision.review_id!r} on {self.review.topic}")  # fmt: skip
        if applied.at != at:
            first = applied.decision
            if (first.violation, first.category) == (decision.violation, decision.category):
                self.duplicates += 1
                return []
            raise RejectedInput(ErrorType.CONFLICTING_DECISION, f"review {decision.review_id!r} was decided already "
                                f"at {applied.at[0]}[{applied.at[1]}]@{applied.at[2]} with another answer")  # fmt: skip
        item = self.state.item(decision.review_id)
        if item is None:
            raise RejectedInput(ErrorType.UNKNOWN_REVIEW, f"review item {decision.review_id!r} is no longer held "
                                "(review.max_items)")  # fmt: skip
        verdict = corrected_verdict(item, decision, self._policies, communities=self._communities)
        self.applied += 1
        return [(self.settings.kafka.verdict_topic, orjson.dumps(verdict), self.state.key(decision.review_id))]

    def _overturn(self, overturn: ReviewDecision, at: tuple[str, int, int]) -> list[_Output]:
        """A lead's overturn: a corrected verdict superseding the one of the answer it replaced."""
        review_id = overturn.review_id
        if not self.state.known(review_id):
            self._catch_up_items()
        if not self.state.known(review_id):
            self.state.drop_orphan(review_id, at)
            raise RejectedInput(ErrorType.UNKNOWN_REVIEW, f"no review item {review_id!r} on {self.review.topic}")
        item = self.state.item(review_id)
        if item is None:
            raise RejectedInput(ErrorType.UNKNOWN_REVIEW, f"review item {review_id!r} is no longer held "
                                "(review.max_items)")  # fmt: skip
        replaced = self.state.replaced(review_id, at)
        if replaced is None:
            if self.state.applied(review_id) is None:
                raise RejectedInput(ErrorType.CONFLICTING_DECISION, f"review {review_id!r} has no decision to overturn")
            self.duplicates += 1
            return []  # it changes nothing: the answer it gives is in force already
        verdict = corrected_verdict(item, overturn, self._policies, replaces=replaced, communities=self._communities)
        self.applied += 1
        return [(self.settings.kafka.verdict_topic, orjson.dumps(verdict), self.state.key(review_id))]

    def _catch_up_items(self) -> None:
        """Read the review topic to its end now: a decision may follow its item closely."""
        assert self._follower is not None
        ends = {}
        for tp in self._follower.assignment():
            if tp.topic == self.review.topic:
                low, high = self._follower.get_watermark_offsets(tp, timeout=10)
                if high > low:
                    ends[(tp.topic, tp.partition)] = high
        self._follow_until(ends)

    def _appeal(self, message: Message) -> list[_Output]:
        appeal = parse(Appeal, message.value())
        kafka = self.settings.kafka
        item, key = appeal_item(self._client, kafka.verdict_topic, appeal, self.review.appeal_search_records,
                                self._decode)  # fmt: skip
        if self.state.known(item.review_id):
            self.duplicates += 1
            return []  # this event's appeal review is open or decided already
        self.appeals_opened += 1
        self.state.add_item(item, key)  # a second appeal in the same batch finds it open
        return [(self.review.topic, orjson.dumps(item.model_dump(mode="json")), key)]

    # -- delivery and commits ------------------------------------------------------------------

    def _deliver(self, outputs: list[_Output]) -> bool:
        """Produce and wait for every delivery report; False (and fatal) if any failed."""
        assert self._producer is not None
        errors: list[str] = []

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err.str())

        for topic, value, key in outputs:
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, on_delivery=report)
                    break
                except BufferError:
                    self._producer.poll(0.1)
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while len(self._producer) and time.monotonic() < deadline:
            self._producer.flush(0.5)
        if errors or len(self._producer):
            self._fail(f"review outputs not delivered: {errors[0] if errors else 'timed out'}")
            return False
        return True

    def _commit(self, messages: list[Message]) -> None:
        assert self._applier is not None
        self._applier.commit(offsets=_next_offsets(messages), asynchronous=False)

    def _transact(self, outputs: list[_Output], messages: list[Message]) -> bool:
        """Exactly-once: the outputs and the offsets after `messages` in one transaction, visible to
        read_committed readers together or not at all. An abortable error aborts it and tries the
        same outputs again; False (and fatal) when it cannot commit."""
        assert self._producer is not None and self._applier is not None
        offsets = _next_offsets(messages)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._producer.begin_transaction()
                if not self._deliver(outputs):
                    return False  # a refused output is fatal, as at least once; the broker aborts the rest
                if offsets:
                    self._producer.send_offsets_to_transaction(offsets, self._applier.consumer_group_metadata())
                self._commit_transaction()
                return True
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if not error.txn_requires_abort() or attempt == TRANSACTION_ATTEMPTS:
                    self._fail(f"review loop: exactly-once commit failed: {error.str()}")
                    return False
                log.warning("review loop: transaction aborted (%s); retrying it with the same outputs", error.str())
                self._producer.abort_transaction()

    def _commit_transaction(self) -> None:
        assert self._producer is not None
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            try:
                self._producer.commit_transaction()
                return
            except KafkaException as exc:
                # A retriable error leaves the transaction as it was: commit it again, do not re-produce.
                if not exc.args[0].retriable() or attempt == TRANSACTION_ATTEMPTS:
                    raise

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.error("%s", reason)
            self._on_fatal(reason)

    def counters(self) -> Document:
        return {"applied": self.applied, "duplicates": self.duplicates, "appeals_opened": self.appeals_opened,
                "dead_letters": self.dead_letters}  # fmt: skip


def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """The offsets to commit once `messages` are done: one past the last of each partition."""
    positions: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        positions[key] = max(positions.get(key, 0), m.offset() + 1)
    return [TopicPartition(t, p, o) for (t, p), o in positions.items()]
