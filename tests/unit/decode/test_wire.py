"""The compiled way (msgspec) and the model (pydantic `ContentEvent`) agree on every record: the
compiled way accepts only what the model accepts, with equal values, and the decoder's outcome
(event, or dead letter with its type and message) is the same as reading by the model alone."""

import json
from datetime import timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import from_json

from bench.workload import chat_events
from consumer.decode import DecodeError, RawRecord, coordinates, wire
from consumer.decode.fields import describe
from consumer.decode.plain_json import JsonDecoder
from consumer.events import ContentEvent, ErrorType

RECORD = RawRecord(None, "chat", 3, 41)
OFFSETS = [timezone.utc, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5, minutes=30))]
MAX_PAYLOAD = 1_000_000

# -- the records: valid and malformed, every field in every shape it may arrive in --------------

big_ints = st.integers(-(2**70), 2**70)
texts = (
    st.text() | st.text(alphabet="0123456789 -_:", max_size=12) | st.sampled_from(["", " ", "é", "🎉" * 3, "\x00"])
)
ids = big_ints | texts | st.floats(allow_nan=False) | st.booleans() | st.none() | st.text(min_size=500, max_size=520)
moments = (
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
    | st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{0,9})?)?)?"
                    r"([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?\Z")  # fmt: skip
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["1700000000", "2026-11-28", "2026-11-28T12:00Z", "2026-11-28T12:00:00,5Z", "soon"])
)
json_values = st.recursive(
    st.none() | st.booleans() | big_ints | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
context_messages = st.fixed_dictionaries(
    {},
    optional={"content": texts | ids, "author_id": ids, "event_id": ids, "created_at": moments, "extra": json_values},
)
events = st.fixed_dictionaries(
    {},
    optional={
        "event_id": ids,
        "content": texts | ids | st.text(min_size=3000, max_size=5000) | json_values,
        "content_type": texts | ids,
        "author_id": ids,
        "context_id": ids,
        "community_id": ids,
        "created_at": moments,
        "schema_version": st.integers(-5, 5) | big_ints | st.floats(allow_nan=False) | st.text(max_size=3),
        "context": st.lists(context_messages | json_values, max_size=3) | json_values,
        "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
        "unknown": json_values,
    },
)
# Events with every field well formed: the compiled way should take nearly all of them.
good_events = st.fixed_dictionaries(
    {"content": st.text(min_size=1)},
    optional={
        "event_id": big_ints.filter(lambda i: 0 <= i < 2**63) | st.text(min_size=1, max_size=40),
        "author_id": st.integers(0, 2**63 - 1) | st.text(max_size=20),
        "community_id": st.integers(0, 2**63 - 1),
        # RFC 3339 offsets (whole minutes); zoneinfo's historical ones have seconds, which msgspec leaves to the model
        "created_at": st.datetimes(timezones=st.sampled_from(OFFSETS)).map(lambda d: d.isoformat()),
        "context": st.lists(st.fixed_dictionaries({"content": st.text()}, optional={"author_id": st.integers(0, 9)}),
                            max_size=3),  # fmt: skip
        "metadata": st.dictionaries(st.text(max_size=8), st.text() | st.integers(0, 9), max_size=3),
    },
)
# Bytes orjson would never write: what msgspec and pydantic's parser might read differently.
odd_values = [
    b'{"content": "a", "content": "b"}',
    b'{"content": "a", "event_id": 1, "event_id": "x"}',
    b'{"content": "a", "metadata": {"n": NaN}}',
    b'{"content": "a", "metadata": {"n": 1e400}}',
    b'{"content": "a", "metadata": {"n": 123456789012345678901234567890}}',
    b'{"content": "a", "schema_version": 1.0}',
    b'{"content": "a", "schema_version": "1"}',
    b'{"content": "a", "event_id": 1.0}',
    b'{"content": "\\ud800"}',
    b'{"content": "a\\u0000b"}',
    b'\xef\xbb\xbf{"content": "a"}',
    b'{"content": "a"} ',
    b'{"content": "a"} x',
    b'{"content": "\xff"}',
    b'{"content": "a", "created_at": "2026-11-28T12:00:00.9999999Z"}',
    b'{"content": "a", "created_at": "2026-11-28T12:00:00.123456789+01:00"}',
    b'{"content": "a", "created_at": "2026-11-28T12:00:00.1234567891234"}',
    b'{"content": "a", "created_at": "2026-11-28T12:00:00.1234567x"}',
    b'{"content": "a", "context": [{"content": "b", "created_at": "2026-11-28T12:00:00.9999995Z"}]}',
    b'{"content": "a", "metadata": {"k": ' + b"[" * 150 + b"]" * 150 + b"}}",
    # pydantic's parser takes 201 levels and refuses 202, wherever they are
    b'{"content": "a", "metadata": {"k": ' + b"[" * 199 + b"]" * 199 + b"}}",
    b'{"content": "a", "metadata": {"k": ' + b"[" * 200 + b"]" * 200 + b"}}",
    b'{"content": "a", "ignored": ' + b"[" * 200 + b"]" * 200 + b"}",
    b'{"content": "a", "ignored": ' + b"[" * 201 + b"]" * 201 + b"}",
    b'{"content": "a", "context": [{"content": "b", "x": ' + b"{}" * 300 + b"[" * 199 + b"]" * 199 + b"}]}",
    b"[" * 5000 + b"]" * 5000,
]


def by_model(value: bytes) -> ContentEvent | DecodeError:
    """The JSON decoder as it was before the compiled way: pydantic alone."""
    try:
        return ContentEvent.model_validate_json(value)
    except ValidationError:
        pass
    try:
        doc = from_json(value)
    except ValueError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return DecodeError(ErrorType.INVALID_ENCODING, "")
        return DecodeError(ErrorType.INVALID_JSON, f"value is not JSON: {exc}")
    if not isinstance(doc, dict):
        return DecodeError(ErrorType.SCHEMA_VIOLATION, f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("event_id") in (None, ""):
        doc["event_id"] = coordinates(RECORD)
    try:
        return ContentEvent.model_validate(doc)
    except ValidationError as exc:
        return DecodeError(ErrorType.SCHEMA_VIOLATION, describe(exc))


def by_decoder(value: bytes) -> ContentEvent | DecodeError:
    try:
        return JsonDecoder(MAX_PAYLOAD).decode(RawRecord(value, "chat", 3, 41))
    except DecodeError as exc:
        return exc


def assert_same_event(fast: ContentEvent, model: ContentEvent) -> None:
    assert fast == model or "nan" in repr(model.metadata)
    assert fast.model_fields_set >= model.model_fields_set  # NaN is not equal to itself; the dumps below compare it
    assert fast.model_dump(mode="json") == model.model_dump(mode="json")
    assert fast.model_dump_json() == model.model_dump_json()
    if model.created_at is not None:
        assert fast.created_at.utcoffset() == model.created_at.utcoffset()
    for mine, theirs in zip(fast.context, model.context, strict=True):
        assert mine == theirs and type(mine) is type(theirs)
    # What the pipeline does with an event works on the assembled one as on a validated one.
    copy = fast.model_copy(update={"author_id": "user-1"})
    assert copy.author_id == "user-1" and copy.content == model.content


def assert_agree(value: bytes) -> None:
    reference = by_model(value)
    fast = wire.read_json(value, RECORD)
    if fast is not None:
        assert isinstance(reference, ContentEvent), f"compiled way accepted what the model rejects: {reference}"
        assert_same_event(fast, reference)
    outcome = by_decoder(value)
    if isinstance(reference, ContentEvent):
        assert isinstance(outcome, ContentEvent), f"decoder rejected what the model accepts: {outcome}"
        assert_same_event(outcome, reference)
    else:
        assert isinstance(outcome, DecodeError), "decoder accepted what the model rejects"
        assert outcome.error_type is reference.error_type
        if reference.error_type is not ErrorType.INVALID_ENCODING:
            assert str(outcome) == str(reference)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events | json_values, st.booleans())
def test_fuzzed_records_get_the_same_outcome_both_ways(doc, ascii_only):
    # The standard library's encoder: integers past 64 bits, NaN, and (not ASCII-escaped) lone
    # surrogates written as the invalid UTF-8 they are.
    assert_agree(json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(good_events)
def test_well_formed_events_take_the_compiled_way(doc):
    value = json.dumps(doc, ensure_ascii=False).encode()
    assert_agree(value)
    assert wire.read_json(value, RECORD) is not None


@pytest.mark.parametrize("value", odd_values, ids=range(len(odd_values)))
def test_bytes_the_two_parsers_might_read_apart_get_the_same_outcome(value):
    assert_agree(value)


def test_every_bench_chat_event_takes_the_compiled_way():
    values = [value for _, value in chat_events(2000)]
    for value in values:
        event = wire.read_json(value, RECORD)
        assert event is not None
        assert_same_event(event, by_model(value))
    assert sum(1 for v in values if wire.read_json(v, RECORD).context) > 400  # context messages covered


def test_an_integer_id_is_its_decimal_text_and_a_missing_one_the_coordinates():
    event = wire.read_json(b'{"content": "hi", "author_id": 1300000000000000001, "context": [{"content": "a", '
                           b'"author_id": 7}]}', RECORD)  # fmt: skip
    assert (event.event_id, event.author_id, event.context[0].author_id) == ("chat-3-41", "1300000000000000001", "7")


def test_a_datetime_past_microseconds_is_truncated_as_the_model_does_and_read_the_compiled_way():
    value = b'{"content": "a", "created_at": "2026-11-28T12:00:00.999999999Z"}'
    event = wire.read_json(value, RECORD)
    assert event is not None and event == by_model(value)
    assert event.created_at.second == 0 and event.created_at.microsecond == 999_999
