"""Decisions onto the decisions topic, acknowledged before the reviewer sees the next item; the
same for overturns, escalations and comments, which share the topic."""

from __future__ import annotations

import threading
from typing import Any

import orjson

from consumer.events import ReviewDecision, ReviewNote
from consumer.kafka.client import KafkaError, Message, Producer
from consumer.kafka.options import PRODUCER_DEFAULTS
from consumer.review.state import Coordinates

DELIVERY_TIMEOUT_S = 15.0


class DecisionNotRecorded(Exception):
    """The broker did not acknowledge a decision: the reviewer must try again."""


class DecisionWriter:
    """Owns "a decision is on the topic before the next item shows": `write` returns only once the
    broker acknowledged the record (idempotent producer, acks=all), keyed by review id as the
    review loop expects, and says where it landed."""

    def __init__(self, producer_config: dict[str, Any], topic: str):
        self.topic = topic
        self._producer = Producer({**PRODUCER_DEFAULTS, **producer_config})
        self._lock = threading.Lock()

    def write(self, decision: ReviewDecision | ReviewNote) -> Coordinates:
        landed: list[Coordinates] = []
        errors: list[str] = []

        def report(err: KafkaError | None, message: Message) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                landed.append((message.topic(), message.partition(), message.offset()))

        with self._lock:  # one decision in flight at a time: its report is the one awaited
            self._producer.produce(self.topic, key=decision.review_id.encode(),
                                   value=orjson.dumps(decision.model_dump(mode="json")), on_delivery=report)  # fmt: skip
            left = self._producer.flush(DELIVERY_TIMEOUT_S)
        if left or errors or not landed:
            raise DecisionNotRecorded(errors[0] if errors else "the broker did not acknowledge it in time")
        return landed[0]

    def close(self) -> None:
        self._producer.flush(5)
