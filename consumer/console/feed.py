"""The console's view of the review topics: a `ReviewState` kept current from Kafka.

`ReviewFeed` reads the review topic and the decisions topic (decisions, overturns, escalations, comments) the way the consumer's review loop
does (consumer.review.loop): an assigned consumer of every partition of both, in no group,
committing nothing, from the earliest retained offsets up to the end offsets found at start
(`start()` returns when that bounded read is done), then following both on a thread. So the
console shows what the topics hold: items opened by any consumer instance, decisions taken in
any console, by Coop, or posted by hand. Nothing is stored anywhere else.

Replicas: with `review.console.replicas: N`, replica `i` keeps only the review items of the
partitions p with p % N == i (every decision is still read), so N console processes never show
the same item: each item has one home, fixed by its partition, with no coordination between them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from consumer.events import ReviewItem
from consumer.kafka.client import Consumer, Message, TopicPartition
from consumer.kafka.ranges import assign_from_earliest
from consumer.review.decisions import RejectedInput, parse_record
from consumer.review.state import ReviewState

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.2


class ReviewFeed:
    """Owns "the state holds every item and the first decision of each that the topics hold,
    up to what was read"; `caught_up` is set once the read at start reached the end offsets."""

    def __init__(self, client: dict[str, Any], review_topic: str, decisions_topic: str, state: ReviewState,
                 replica: int = 0, replicas: int = 1):  # fmt: skip
        self._config = {**client, "group.id": "safeguard-review-console", "enable.auto.commit": False,
                        "enable.partition.eof": False}  # fmt: skip
        self.review_topic = review_topic
        self.decisions_topic = decisions_topic
        self.state = state
        self.replica, self.replicas = replica, replicas
        self.caught_up = threading.Event()
        self._stopping = threading.Event()
        self._consumer: Consumer | None = None
        self._thread: threading.Thread | None = None
        self.failed: str | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Assign, read up to the end offsets found now (blocking), then follow on a thread."""
        self._consumer = Consumer(self._config)
        left = self._assign()
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            self._read(POLL_TIMEOUT_S)
            for tp in self._consumer.position([TopicPartition(t, p) for t, p in left]):
                if tp.offset >= left[(tp.topic, tp.partition)]:
                    del left[(tp.topic, tp.partition)]
        if left:
            raise RuntimeError(f"the review topics were not read to their end within {timeout_s:.0f}s")
        self.caught_up.set()
        log.info("review console: %d open reviews, %d decided", len(self.state.pending()), self.state.decisions)
        self._thread = threading.Thread(target=self._follow, name="console-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._consumer is not None:
            self._consumer.close()

    def _assign(self) -> dict[tuple[str, int], int]:
        assert self._consumer is not None
        return assign_from_earliest(self._consumer, (self.review_topic, self.decisions_topic))

    def _follow(self) -> None:
        try:
            while not self._stopping.is_set():
                self._read(POLL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the page says the view is stale; the process stays up
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("review console: following the review topics failed")

    def _read(self, timeout: float) -> None:
        assert self._consumer is not None
        for message in self._consumer.consume(500, timeout=timeout):
            if message.error() is None:
                self._apply(message)

    def _apply(self, message: Message) -> None:
        if message.topic() == self.review_topic:
            if message.partition() % self.replicas != self.replica:
                return  # another replica's item
            try:
                item = ReviewItem.model_validate_json(message.value() or b"")
            except ValueError:
                log.warning("unreadable review item at %s[%d]@%d", message.topic(), message.partition(), message.offset())
                return
            self.state.add_item(item, message.key())
            return
        try:
            record = parse_record(message.value())
        except RejectedInput:
            return  # the consumer's review loop dead-letters it
        self.state.add_record(record, (message.topic(), message.partition(), message.offset()))
