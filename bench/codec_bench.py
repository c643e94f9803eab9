"""Decode and encode cost per record: the ways considered for the hot path, side by side in one run.

    python -m bench.codec_bench                        # 20k records per set, best of 7 rounds
    python -m bench.codec_bench --records 2000 --repeats 2   # a smoke run

No Kafka: the same record values (bench.workload's chat, about 400 bytes, integer snowflake ids,
30% with earlier messages as context) are decoded into `ContentEvent`s by each way in turn,
round after round (the ways alternate, so a noisy neighbour hits them alike), and each way's
best round of CPU time is kept. Sets: the chat as produced; the same with ids as text; an
Osprey-style envelope read through `decode.field_mapping`. Ways:

- pydantic (before): the JSON decoder before issue 31, `ContentEvent.model_validate_json` (the
  mapping: pydantic's parser, the mapping, `model_validate`);
- pydantic, coerce_numbers_to_str: the same model with pydantic's own int-to-text coercion in
  place of the Python validators (it would also accept floats as ids: not the same contract);
- msgspec + model_construct: msgspec Structs, then pydantic's `model_construct`;
- msgspec, assembled (now): `consumer.decode.plain_json.JsonDecoder`, what the pipeline runs
  (`consumer.decode.wire`); with a mapping, msgspec's conversion of the mapped document into the
  same Structs, which measured no faster than `model_validate` and was not taken;
- floors, no ContentEvent: orjson.loads to a dict; msgspec into the Structs alone.

Encode: a verdict document with one policy result (what `consumer.pipeline.outputs` builds and
`consumer.kafka.budget` dumps), built and encoded by orjson (now), msgspec from the same dict,
msgspec from a Struct, and through the pydantic `Verdict` model; a dead letter through the
`DeadLetter` model (before) and as `consumer.kafka.records.dead_letter` builds it now, a dict.
One process, one core; docs/benchmark.md holds the last figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import msgspec
import orjson
from pydantic import ConfigDict, Field
from pydantic_core import from_json

import consumer
from bench.workload import POLICY_ID, chat_events
from consumer.decode import RawRecord, wire
from consumer.decode.fields import FieldMapping
from consumer.decode.plain_json import JsonDecoder
from consumer.events import (
    ContentEvent,
    ContextMessage,
    DeadLetter,
    DeadLetterError,
    ErrorType,
    OriginalRecord,
    SourceRecord,
    Verdict,
)
from consumer.kafka import records
from consumer.pipeline import outputs

MAX_PAYLOAD = 1_000_000
REASON = "content: Input should be a valid string"
ENVELOPE_MAPPING = {"event_id": "data.action_id", "content": "/data/data/text", "author_id": "data.data.user.id",
                    "community_id": "data.data.guild_id", "created_at": "send_time"}  # fmt: skip


class _CoercedContext(ContextMessage):
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)
    author_id: str | None = None
    event_id: str | None = None


class _CoercedEvent(ContentEvent):
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)
    event_id: str = Field(min_length=1, max_length=512)
    author_id: str | None = None
    context_id: str | None = None
    community_id: str | None = None
    context: list[_CoercedContext] = Field(default_factory=list)


def record_sets(count: int) -> dict[str, list[RawRecord]]:
    chat = [orjson.loads(value) for _, value in chat_events(count)]
    text_ids = []
    envelopes = []
    for event in chat:
        text_ids.append({k: str(v) if k.endswith("_id") else v for k, v in event.items()})
        envelopes.append({"send_time": event["created_at"], "data": {
            "action_id": event["event_id"], "action_name": "message_create",
            "data": {"text": event["content"], "user": {"id": event["author_id"]}, "guild_id": event["community_id"]},
        }})  # fmt: skip

    def as_records(docs: list[dict[str, Any]]) -> list[RawRecord]:
        return [RawRecord(orjson.dumps(d), "chat", 0, offset) for offset, d in enumerate(docs)]

    return {"chat (int ids)": as_records(chat), "chat (text ids)": as_records(text_ids),
            "envelope + mapping": as_records(envelopes)}  # fmt: skip


def decode_ways(mapped: bool) -> dict[str, Callable[[RawRecord], Any]]:
    """Each way from a record to its event (the floors stop short of a ContentEvent)."""
    if mapped:
        mapping = FieldMapping(ENVELOPE_MAPPING)

        def before_mapped(record: RawRecord) -> ContentEvent:
            doc = mapping._apply(from_json(record.value()))
            return ContentEvent.model_validate(doc)

        def converted(record: RawRecord) -> ContentEvent | None:
            doc = mapping._apply(from_json(record.value()))
            return wire._assemble(msgspec.convert(doc, wire._Event), record)

        return {
            "pydantic (before, now)": before_mapped,
            "msgspec.convert + assembled (not taken)": converted,
            "floor: pydantic's parser + mapping": lambda r: mapping._apply(from_json(r.value())),
        }
    structs = msgspec.json.Decoder(wire._Event)

    def constructed(record: RawRecord) -> ContentEvent:
        w = structs.decode(record.value())
        ids = {k: str(getattr(w, k)) for k in ("event_id", "author_id", "context_id", "community_id")}
        context = [ContextMessage.model_construct(content=m.content, author_id=str(m.author_id)) for m in w.context]
        return ContentEvent.model_construct(**ids, content=w.content, content_type=w.content_type,
                                            created_at=datetime.fromisoformat(w.created_at), context=context,
                                            metadata=w.metadata)  # fmt: skip

    def before(record: RawRecord) -> ContentEvent:
        value = record.value()
        if value is None or len(value) > MAX_PAYLOAD:
            raise ValueError("not in this bench")
        return ContentEvent.model_validate_json(value)

    return {
        "pydantic (before)": before,
        "pydantic, coerce_numbers_to_str": lambda r: _CoercedEvent.model_validate_json(r.value()),
        "msgspec + model_construct": constructed,
        "msgspec, assembled (now)": JsonDecoder(MAX_PAYLOAD).decode,
        "floor: orjson.loads": lambda r: orjson.loads(r.value()),
        "floor: msgspec Structs alone": lambda r: structs.decode(r.value()),
    }


class _Result(msgspec.Struct):
    policy_id: str
    policy_version: str
    violation: bool
    category: str | None
    rule_ids: list[str]
    confidence: str | None
    rationale: str | None
    action: str
    reasoning: str | None
    model: str
    stage: str | None
    latency_ms: float
    review: None = None


class _Source(msgspec.Struct):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


class _Verdict(msgspec.Struct):
    schema_version: int
    kind: str
    event_id: str
    source: _Source
    violation: bool
    action: str
    severity: str
    results: list[_Result]
    author_id: str | None
    community_id: str | None
    context_id: str | None
    offender_violations: int | None
    note: str | None
    latency_ms: float
    consumer_version: str
    replay: None = None
    truncated: None = None
    decided_by: str = "machine"
    supersedes: None = None


class _Message:
    """A consumed record as `consumer.kafka.records` reads it."""

    def __init__(self, record: RawRecord):
        self._record = record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._record, name)

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_764_331_200_000


def encode_ways() -> dict[str, Callable[[ContentEvent], Any]]:
    """Each way from a decided event to the verdict's bytes (the dead letter's for the last)."""
    result = {"policy_id": POLICY_ID, "policy_version": "3f2a9c", "violation": False, "category": None,
              "rule_ids": [], "confidence": "high", "rationale": None, "action": "allow", "reasoning": None,
              "model": "keyword", "stage": "keyword", "latency_ms": 0.4, "review": None}  # fmt: skip
    encoder = msgspec.json.Encoder()

    def document(event: ContentEvent) -> dict[str, Any]:
        source = {"topic": "chat", "partition": 0, "offset": 17, "timestamp_ms": 1_764_331_200_000}
        return outputs.verdict(event.event_id, source, False, "allow", [dict(result)], event.author_id,
                               event.community_id, event.context_id, None, None, 1.2)  # fmt: skip

    def struct(event: ContentEvent) -> bytes:
        source = _Source("chat", 0, 17, 1_764_331_200_000)
        return encoder.encode(_Verdict(1, "verdict", event.event_id, source, False, "allow", "none",
                                       [_Result(**result)], event.author_id, event.community_id, event.context_id,
                                       None, None, 1.2, "bench"))  # fmt: skip

    message = _Message(RawRecord(b'{"content": 1}', "chat", 0, 17, b"key", [("traceparent", b"00-ab-cd-01")]))
    return {
        "verdict: dict + orjson.dumps (now)": lambda e: orjson.dumps(document(e)),
        "verdict: dict + msgspec encode": lambda e: encoder.encode(document(e)),
        "verdict: msgspec Struct + encode": struct,
        "verdict: pydantic Verdict + model_dump_json": lambda e: Verdict.model_validate(document(e)).model_dump_json(),
        "dead letter: pydantic model + orjson (before)": lambda e: orjson.dumps(letter_by_model(message)),
        "dead letter: dict + orjson (now)": lambda e: orjson.dumps(
            records.dead_letter(message, ErrorType.SCHEMA_VIOLATION, REASON)),
    }  # fmt: skip


def letter_by_model(message: _Message) -> dict[str, Any]:
    """The dead letter as `consumer.kafka.records.dead_letter` built it before issue 31."""
    return DeadLetter(
        error=DeadLetterError(type=ErrorType.SCHEMA_VIOLATION, message=REASON),
        source=SourceRecord.model_validate(records.source_of(message)),
        original=OriginalRecord.capture(message.key(), message.value(), message.headers()),
        failed_at=datetime.now(timezone.utc),
        consumer_version=consumer.__version__,
    ).model_dump(mode="json")


def best_of(ways: dict[str, Callable[[Any], Any]], items: list[Any], repeats: int) -> dict[str, float]:
    """CPU µs per item, each way's best of `repeats` rounds, the ways alternating within each round.
    The thread's CPU time, not the wall clock: on a shared machine the process waits for a core
    as much as it runs, and only the running is the way's cost."""
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeats):
        for name, way in ways.items():
            started = time.thread_time()
            for item in items:
                way(item)
            best[name] = min(best[name], time.thread_time() - started)
    return {name: round(seconds / len(items) * 1e6, 3) for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000, help="records per set (default 20000)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds; each way's best is kept (default 7)")
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    sets = record_sets(args.records)
    for name, recs in sets.items():
        ways = decode_ways(mapped="mapping" in name)
        for way in ways.values():
            way(recs[0])  # every way reads these records: checked before the clock starts
        figures[f"decode {name}"] = best_of(ways, recs, args.repeats)
    events = [JsonDecoder(MAX_PAYLOAD).decode(r) for r in sets["chat (int ids)"]]
    figures["encode"] = best_of(encode_ways(), events, args.repeats)
    cpu = platform.processor() or platform.machine()
    print(f"CPU µs per record, {args.records} records per set, best of {args.repeats} alternating rounds, {cpu}")
    for group, ways in figures.items():
        reference = next(iter(ways.values()))
        print(f"\n{group:<48}{'µs':>8}{'vs first':>10}")
        for way, us in ways.items():
            print(f"  {way:<46}{us:>8.2f}{us / reference:>9.2f}x")
    print(json.dumps({"records": args.records, "repeats": args.repeats, "figures": figures}))


if __name__ == "__main__":
    main()
