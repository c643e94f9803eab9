"""The JSON decoder sorts every bad input into its dead-letter error type, and the configuration
chooses a decoder per topic."""

import orjson
import pytest

from consumer.config import Settings
from consumer.decode import DecodeError, RawRecord
from consumer.decode.factory import DecoderByTopic, build_decoder
from consumer.decode.plain_json import JsonDecoder
from consumer.errors import RecordFault
from consumer.events import ErrorType


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
        JsonDecoder(max_payload_bytes=100).decode(RawRecord(value, "t", 0, 1))
    assert caught.value.error_type is error_type
    assert isinstance(caught.value, RecordFault)  # the family's "this record is bad"


def test_schema_errors_name_the_field_but_not_the_content():
    with pytest.raises(DecodeError) as caught:
        JsonDecoder(1000).decode(RawRecord(b'{"content": "fine", "created_at": "secret-not-a-date"}'))
    assert "created_at" in str(caught.value)
    assert "secret-not-a-date" not in str(caught.value)


def test_missing_event_id_falls_back_to_the_record_coordinates():
    event = JsonDecoder(1000).decode(RawRecord(b'{"content": "hello"}', "chat", 2, 17))
    assert event.event_id == "chat-2-17"


def test_field_mapping_reads_an_osprey_style_envelope():
    envelope = {
        "send_time": "2026-11-28T10:00:00Z",
        # An integer id (a snowflake) is read as its decimal text.
        "data": {"action_id": 991, "action_name": "message_create",
                 "data": {"text": "hello there", "user": {"id": "u7"}, "channel/id": "c1"}},
    }  # fmt: skip
    decoder = JsonDecoder(
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
    event = decoder.decode(RawRecord(orjson.dumps(envelope)))
    assert (event.event_id, event.content, event.content_type) == ("991", "hello there", "message_create")
    assert (event.author_id, event.context_id, event.created_at.year) == ("u7", "c1", 2026)


def test_the_default_configuration_builds_the_json_decoder_alone():
    assert isinstance(build_decoder(Settings()), JsonDecoder)


def test_a_topic_named_in_decode_topics_gets_its_own_mapping():
    settings = Settings.model_validate({"decode": {
        "field_mapping": {"content": "text"},
        "topics": {"osprey": {"field_mapping": {"content": "data.text"}}, "^shop-.*": {}},
    }})  # fmt: skip
    decoder = build_decoder(settings)
    assert isinstance(decoder, DecoderByTopic)
    assert decoder.decode(RawRecord(b'{"data": {"text": "a"}}', "osprey")).content == "a"
    assert decoder.decode(RawRecord(b'{"content": "b"}', "shop-reviews")).content == "b"  # no mapping there
    assert decoder.decode(RawRecord(b'{"text": "c"}', "chat")).content == "c"  # decode's own
    with pytest.raises(DecodeError) as caught:
        decoder.decode(RawRecord(b'{"text": "d"}', "osprey"))
    assert caught.value.error_type is ErrorType.SCHEMA_VIOLATION
