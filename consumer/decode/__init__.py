"""The decode stage's contract: an input record in, a ContentEvent out, or an error saying whose fault.

A decoder receives the whole record (value, key, headers, topic, partition, offset), as
confluent-kafka's serdes receive a `SerializationContext`: a registry deserializer needs the
topic and the headers, a missing `event_id` is filled in from the coordinates. A confluent
`Message` is such a record as it is (no copy on the hot path); `RawRecord` is one built by hand.

A decoder raises only:
- `DecodeError` (a `RecordFault`): the record itself is bad; it becomes a dead letter of its
  error type;
- `consumer.errors.Unavailable`: something decoding depends on (a schema registry) does not
  answer; the record is not at fault and must be kept.

Which decoder reads which topic is configuration (`decode.format`, `decode.topics`), built by
`consumer.decode.factory.build_decoder`. This module holds only the contract, no implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from consumer.errors import RecordFault
from consumer.events import ContentEvent

Headers = list[tuple[str, bytes | None]]


class InputRecord(Protocol):
    """What a decoder may read of a record: the accessors of confluent-kafka's `Message`."""

    def value(self) -> bytes | None: ...
    def key(self) -> bytes | None: ...
    def headers(self) -> Headers | None: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class RawRecord:
    """An input record built by hand (a test, a record read from a file), shaped like a `Message`."""

    value_bytes: bytes | None
    topic_name: str = ""
    partition_id: int = 0
    offset_at: int = 0
    key_bytes: bytes | None = None
    header_list: Headers | None = None

    def value(self) -> bytes | None:
        return self.value_bytes

    def key(self) -> bytes | None:
        return self.key_bytes

    def headers(self) -> Headers | None:
        return self.header_list

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_id

    def offset(self) -> int:
        return self.offset_at


class DecodeError(RecordFault):
    """An input record that cannot become a ContentEvent: a dead letter of `error_type`."""


class Decoder(Protocol):
    """Turns one input record into a ContentEvent; raises `DecodeError` or `Unavailable`, nothing else."""

    def decode(self, record: InputRecord) -> ContentEvent: ...


@runtime_checkable
class DecodesAhead(Protocol):
    """A decoder whose work may block (a schema fetch): `ahead` decodes a poll batch off the event
    loop, on the thread that polled it, so that `decode` on the loop then only looks the outcome up."""

    def ahead(self, records: Sequence[InputRecord]) -> None: ...


def coordinates(record: InputRecord) -> str:
    """`topic-partition-offset`: the event id of a record that carries none."""
    return f"{record.topic()}-{record.partition()}-{record.offset()}"
