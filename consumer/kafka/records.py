"""Kafka records as contract documents: a record's coordinates, and the dead letter that
carries a record no verdict could be made for (`SourceRecord`, `DeadLetter` in consumer.events)."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

from confluent_kafka import Message

import consumer
from consumer.events import SCHEMA_VERSION, Document, ErrorType


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
    """A record that gets no verdict (`DeadLetter`), with its original bytes. Built as the model's
    JSON directly, as verdicts are (consumer.pipeline.outputs): through the model it cost about twice
    as much, which a flood of bad records pays per record (bench/codec_bench.py);
    tests/unit/pipeline/test_outputs.py checks that it is exactly the model's JSON."""
    headers = message.headers()
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "dead_letter",
        "error": {"type": error_type.value, "message": reason, "raw_output": raw_output},
        "source": source_of(message),
        "original": {
            "key_b64": _b64(message.key()),
            "value_b64": _b64(message.value()),
            "headers": [[name, _b64(value)] for name, value in headers] if headers else [],
            "truncated": False,
            "value_cut": None,
            "key_cut": None,
            "headers_cut": None,
        },
        "event_id": event_id,
        "attempts": attempts,
        # pydantic writes a UTC datetime with Z, the rest as isoformat does
        "failed_at": datetime.now(timezone.utc).isoformat()[:-6] + "Z",
        "consumer_version": consumer.__version__,
        "replay": None,
    }


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")
