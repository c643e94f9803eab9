"""Decoding sorts every bad input into its dead-letter error type."""

import orjson
import pytest

from consumer.events import ErrorType
from consumer.pipeline.decode import DecodeError, Decoder


@pytest.mark.parametrize(
    ("value", "error_type"),
    [
        (b"{oops", ErrorType.INVALID_JSON),
        (b"", ErrorType.INVALID_JSON),
        (b'{"content": "\xff\xfe"}', ErrorType.INVALID_ENCODING),
        (b'{"content": 1}', ErrorType.SCHEMA_VIOLATION),
        (b'{"content": ""}', ErrorType.SCHEMA_VIOLATION),
        (b'{"event_id": "a"}', ErrorType.SCHEMA_VIOLATION),
        (b'"just a string"', ErrorType.SCHEMA_VIOLATION),
        (None, ErrorType.SCHEMA_VIOLATION),
        (b'{"content": "' + b"x" * 200 + b'"}', ErrorType.PAYLOAD_TOO_LARGE),
    ],
)
def test_bad_values_get_their_error_type(value, error_type):
    with pytest.raises(DecodeError) as caught:
        Decoder(max_payload_bytes=100).decode(value, fallback_event_id="t-0-1")
    assert caught.value.error_type is error_type


def test_schema_errors_name_the_field_but_not_the_content():
    with pytest.raises(DecodeError) as caught:
        Decoder(1000).decode(b'{"content": "fine", "created_at": "secret-not-a-date"}', "t-0-1")
    assert "created_at" in str(caught.value)
    assert "secret-not-a-date" not in str(caught.value)


def test_missing_event_id_falls_back_to_the_record_coordinates():
    event = Decoder(1000).decode(b'{"content": "hello"}', fallback_event_id="chat-2-17")
    assert event.event_id == "chat-2-17"


def test_field_mapping_reads_an_osprey_style_envelope():
    envelope = {
        "send_time": "2026-11-28T10:00:00Z",
        # An integer id (a snowflake) is read as its decimal text.
        "data": {"action_id": 991, "action_name": "message_create",
                 "data": {"text": "hello there", "user": {"id": "u7"}, "channel/id": "c1"}},
    }  # fmt: skip
    decoder = Decoder(
        10_000,
        {
            "event_id": "data.action_id",
            "content": "/data/data/text",
            "content_type": "data.action_name",
            "author_id": "data.data.user.id",
            "context_id": "/data/data/channel~1id",
            "created_at": "send_time",
        },
    )
    event = decoder.decode(orjson.dumps(envelope), "x")
    assert (event.event_id, event.content, event.content_type) == ("991", "hello there", "message_create")
    assert (event.author_id, event.context_id, event.created_at.year) == ("u7", "c1", 2026)
