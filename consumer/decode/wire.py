"""The decode stage's fast way from JSON bytes to a ContentEvent: msgspec reads the bytes into
Structs shaped like `consumer.events.ContentEvent`, and the event is assembled from them without
a second validation.

The pydantic model stays the contract: the schema in `schemas/`, the rules, the dead letters'
messages. This way accepts a subset of what the model accepts, with equal values, and answers
None for the rest, which the caller then hands to the model: the outcome (event or dead letter)
is the model's for every record, only its cost differs. msgspec is stricter than pydantic's lax
mode in a few places (numbers as text, floats with no fraction as integers, NaN and 1e400,
datetimes without seconds or as unix time, integers past 64 bits, nesting deeper than pydantic's
JSON parser allows): those records take the model's way.
`tests/unit/decode/test_wire.py` fuzzes both ways with the same records and asserts they agree.
Figures (typical chat events, µs per record): `python -m bench.codec_bench`. A field mapping
(`consumer.decode.fields`) reads a parsed document, where msgspec's conversion from Python objects
measured no faster than the model's: mapped records keep the model's way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from consumer.decode import InputRecord, coordinates
from consumer.events import SCHEMA_VERSION, ContentEvent, ContextMessage

# An id as it arrives: text, or an integer (a Discord snowflake) read as its decimal text, as
# `consumer.events.Id` does. msgspec refuses bools and floats here, as the model does.
_Id = str | int


class _Context(msgspec.Struct):
    content: str
    author_id: _Id | None = None
    event_id: _Id | None = None
    created_at: str | None = None


class _Event(msgspec.Struct):
    content: Annotated[str, msgspec.Meta(min_length=1)]
    # Missing, null or empty: the record's coordinates, as the model's way does.
    event_id: Annotated[str, msgspec.Meta(max_length=512)] | int | None = None
    schema_version: int = SCHEMA_VERSION
    content_type: str | None = None
    author_id: _Id | None = None
    context_id: _Id | None = None
    community_id: _Id | None = None
    created_at: str | None = None
    context: list[_Context] = []
    metadata: dict[str, Any] = {}


_JSON = msgspec.json.Decoder(_Event)
# pydantic's JSON parser refuses nesting deeper than this; msgspec has no such limit. A document's
# depth is at most its count of opening brackets, and each needs a closing one: a value shorter
# than twice this cannot be too deep, and one with fewer openings neither (those are counted only
# in longer values, where counting costs least next to the rest).
_PARSER_DEPTH = 201
# Every field counts as set (nothing reads `model_fields_set` of an input event), in one set shared
# by all events: pydantic only ever adds a field's name to it (on assignment), a no-op here, and
# copies it for `model_copy`.
_EVENT_FIELDS = set(ContentEvent.model_fields)
_CONTEXT_FIELDS = set(ContextMessage.model_fields)
# The event is built the way pydantic's own `model_construct` builds one (its __dict__ and the
# three slots below), without its per-field loop, which costs more than msgspec's whole read.
# That is sound only for models with no post-init hook, no private attributes and no extra
# fields kept; refuse to load rather than build wrong events if the contract ever grows one.
for _model in (ContentEvent, ContextMessage):
    if _model.__pydantic_post_init__ or _model.__private_attributes__ or _model.model_config.get("extra") == "allow":
        raise TypeError(f"{_model.__name__} can no longer be assembled without validation: update {__name__}")
_new = object.__new__
_set = object.__setattr__


def read_json(value: bytes, record: InputRecord) -> ContentEvent | None:
    """The event in a JSON record value, or None when the model must decide (it may still accept)."""
    if len(value) > 2 * _PARSER_DEPTH and value.count(b"{") + value.count(b"[") > _PARSER_DEPTH:
        return None
    try:
        wire = _JSON.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):  # the model tells which
        return None
    return _assemble(wire, record)


def _assemble(wire: _Event, record: InputRecord) -> ContentEvent | None:
    event_id = wire.event_id
    if event_id is None or event_id == "":
        event_id = coordinates(record)
    elif type(event_id) is int:
        event_id = str(event_id)
    created_at = wire.created_at
    if created_at is not None:
        created_at = _moment(created_at)
        if created_at is None:
            return None
    context = []
    for message in wire.context:  # a loop: one context message's datetime may send the record to the model
        moment = message.created_at
        if moment is not None:
            moment = _moment(moment)
            if moment is None:
                return None
        author_id, message_id = message.author_id, message.event_id
        context.append(_built(ContextMessage, {
            "content": message.content,
            "author_id": str(author_id) if type(author_id) is int else author_id,
            "event_id": str(message_id) if type(message_id) is int else message_id,
            "created_at": moment,
        }, _CONTEXT_FIELDS))  # fmt: skip
    author_id, context_id, community_id = wire.author_id, wire.context_id, wire.community_id
    return _built(ContentEvent, {
        "schema_version": wire.schema_version,
        "event_id": event_id,
        "content": wire.content,
        "content_type": wire.content_type,
        "author_id": str(author_id) if type(author_id) is int else author_id,
        "context_id": str(context_id) if type(context_id) is int else context_id,
        "community_id": str(community_id) if type(community_id) is int else community_id,
        "created_at": created_at,
        "context": context,
        "metadata": wire.metadata,
    }, _EVENT_FIELDS)  # fmt: skip


def _moment(text: str) -> datetime | None:
    # msgspec rounds a seventh fractional digit and beyond, pydantic truncates: cut them first
    # (Go's RFC3339Nano and Java's Instant write nine). In an RFC 3339 text msgspec accepts, the
    # fraction's dot is at index 19.
    if len(text) > 26 and text[19] == "." and text[26].isdigit():
        end = 27
        while end < len(text) and text[end].isdigit():
            end += 1
        text = text[:26] + text[end:]
    try:
        return msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        return None


def _built(model: Any, values: dict[str, Any], fields: set[str]) -> Any:
    instance = _new(model)
    _set(instance, "__dict__", values)
    _set(instance, "__pydantic_fields_set__", fields)
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance
