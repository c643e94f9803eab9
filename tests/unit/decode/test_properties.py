"""Property-based: whatever bytes arrive, decoding ends in an event or a DecodeError, never a crash."""

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.events import ContentEvent
from consumer.decode import DecodeError, RawRecord
from consumer.decode.plain_json import JsonDecoder

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "event_id": json_values,
        "content": st.text() | json_values,
        "author_id": json_values,
        "created_at": st.text(max_size=30) | json_values,
        "context": json_values,
        "metadata": json_values,
    },
)


def decode(value):
    try:
        return JsonDecoder(max_payload_bytes=10_000).decode(RawRecord(value, "t"))
    except DecodeError as exc:
        assert exc.error_type and str(exc)
        return exc


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(value):
    assert isinstance(decode(value), (ContentEvent, DecodeError))


@settings(max_examples=300, deadline=None)
@given(json_values | event_like)
def test_arbitrary_json(value):
    result = decode(orjson.dumps(value))
    if isinstance(result, ContentEvent):
        assert result.content and isinstance(value, dict) and value["content"] == result.content


def test_deep_nesting_is_invalid_json_not_a_crash():
    assert decode(b"[" * 5000 + b"]" * 5000).error_type.value == "invalid_json"
