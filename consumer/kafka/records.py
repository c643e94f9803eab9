"""Kafka records as contract documents: a record's coordinates, and the dead letter that
carries a record no verdict could be made for (`SourceRecord`, `DeadLetter` in consumer.events)."""

from __future__ import annotations

from datetime import datetime, timezone

from confluent_kafka import Message

import consumer
from consumer.events import DeadLetter, DeadLetterError, Document, ErrorType, OriginalRecord, SourceRecord


def source_of(message: Message) -> Document:
    """The input record's coordinates (`SourceRecord`)."""
    ts_type, ts = message.timestamp()
    return {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp_ms": ts if ts_type else None,
    }


def dead_letter(
    message: Message,
    error_type: ErrorType,
    reason: str,
    event_id: str | None = None,
    raw_output: str | None = None,
    attempts: int = 1,
) -> Document:
    """A record that gets no verdict (`DeadLetter`), with its original bytes."""
    letter = DeadLetter(
        error=DeadLetterError(type=error_type, message=reason, raw_output=raw_output),
        source=SourceRecord.model_validate(source_of(message)),
        original=OriginalRecord.capture(message.key(), message.value(), message.headers()),
        event_id=event_id,
        attempts=attempts,
        failed_at=datetime.now(timezone.utc),
        consumer_version=consumer.__version__,
    )
    return letter.model_dump(mode="json")
