"""`decode.format: json`: a record value of JSON text -> ContentEvent, or a DecodeError with its type.

Checks run cheapest first: size, then JSON and the schema in one pass in compiled code
(`consumer.decode.wire`, the common case). Only a record it does not take is looked at again
by the model, step by step, to tell why or to accept what msgspec is stricter about: JSON
(pydantic's parser), encoding (bad UTF-8 or bad JSON), a missing `event_id` (filled in from the
record's coordinates), the schema. A configured field mapping (`consumer.decode.fields`) always
takes the step-by-step way.
"""

from __future__ import annotations

from pydantic_core import from_json

from consumer.decode import DecodeError, InputRecord, wire
from consumer.decode.fields import FieldMapping
from consumer.events import ContentEvent, ErrorType


def check_size(value: bytes | None, max_payload_bytes: int) -> bytes:
    """The value, when there is one and it is not larger than `pipeline.max_payload_bytes`."""
    if value is None:
        raise DecodeError(ErrorType.SCHEMA_VIOLATION, "record has no value (tombstone)")
    if len(value) > max_payload_bytes:
        raise DecodeError(
            ErrorType.PAYLOAD_TOO_LARGE, f"value is {len(value)} bytes; pipeline.max_payload_bytes is {max_payload_bytes}"
        )
    return value


class JsonDecoder:
    """Reads a JSON record value; raises DecodeError, never anything else."""

    def __init__(self, max_payload_bytes: int, field_mapping: dict[str, str] | None = None):
        self.max_payload_bytes = max_payload_bytes
        self._mapping = FieldMapping(field_mapping)

    def decode(self, record: InputRecord) -> ContentEvent:
        value = record.value()
        if value is None or len(value) > self.max_payload_bytes:  # checked inline: this is the hot path
            value = check_size(value, self.max_payload_bytes)
        if not self._mapping:
            event = wire.read_json(value, record)
            if event is not None:
                return event
        try:
            doc = from_json(value)
        except ValueError as exc:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as uexc:
                raise DecodeError(
                    ErrorType.INVALID_ENCODING, f"value is not UTF-8: {uexc.reason} at byte {uexc.start}"
                ) from None
            raise DecodeError(ErrorType.INVALID_JSON, f"value is not JSON: {exc}") from None
        return self._mapping.to_event(doc, record)
