"""Decode cost per event: Avro and Protobuf through a Schema Registry beside plain JSON, in one run.

    python -m bench.decode_bench                   # 20k events per format, best of 5
    python -m bench.decode_bench --events 2000 --repeats 2   # a smoke run

It starts a real registry (Apicurio, tests/registry.py, as the integration tests do), produces
the same chat messages (bench.workload's texts; id, text, author, guild) with confluent-kafka's
own serializers, then times our decoders (`consumer.decode`) turning the records into
ContentEvents, the field mapping included, as the pipeline calls them: a registry format's
`ahead` on the poll batch, then `decode` per record; JSON's `decode` alone. Schemas are fetched
before the clock starts (the first record of each format), so the figures are the steady state,
cached client. Everything runs in this process, one core; docs/registry.md holds the last figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import orjson
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from bench.workload import chat_events
from consumer.config import SchemaRegistrySettings
from consumer.decode import Decoder, DecodesAhead, RawRecord
from consumer.decode.plain_json import JsonDecoder
from consumer.decode.registry import RegistryDecoder, registry_client
from tests.integration.registry_messages import ChatMessage
from tests.registry import SchemaRegistry

MAPPING = {"event_id": "id", "content": "text", "author_id": "author", "community_id": "guild"}
AVRO = {"type": "record", "name": "ChatMessage", "namespace": "chat",
        "fields": [{"name": name, "type": "string"} for name in ("id", "text", "author", "guild")]}  # fmt: skip
MAX_PAYLOAD = 1_000_000
BATCH = 500  # records per poll batch handed to `ahead`


def messages(count: int) -> list[dict[str, str]]:
    out = []
    for key, value in chat_events(count):
        event = orjson.loads(value)
        out.append({"id": str(event["event_id"]), "text": event["content"], "author": str(event["author_id"]),
                    "guild": str(event["community_id"])})  # fmt: skip
    return out


def encoded(client: SchemaRegistryClient, docs: list[dict[str, str]]) -> dict[str, list[bytes]]:
    """Each format's record values, produced with the library's serializers (registering the schemas)."""
    avro = AvroSerializer(client, orjson.dumps(AVRO).decode())
    proto = ProtobufSerializer(ChatMessage, client, {"use.deprecated.format": False})
    avro_ctx = SerializationContext("bench-avro", MessageField.VALUE)
    proto_ctx = SerializationContext("bench-proto", MessageField.VALUE)
    return {
        "json": [orjson.dumps(d) for d in docs],
        "avro": [avro(d, avro_ctx) for d in docs],
        "protobuf": [proto(ChatMessage(**d), proto_ctx) for d in docs],
    }


def time_decoder(decoder: Decoder, records: list[RawRecord], repeats: int) -> float:
    """Best seconds over `repeats` for decoding every record, poll batch by poll batch."""
    ahead = decoder.ahead if isinstance(decoder, DecodesAhead) else None
    decode = decoder.decode
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(records), BATCH):
            batch = records[i : i + BATCH]
            if ahead is not None:
                ahead(batch)
            for record in batch:
                decode(record)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    docs = messages(args.events)
    registry = SchemaRegistry(Path(tempfile.mkdtemp(prefix="decode-bench-")) / "registry.log")
    registry.start()
    try:
        client = registry.client()
        values = encoded(client, docs)
        settings = SchemaRegistrySettings(url=registry.url)
        ours = registry_client(settings)
        decoders: dict[str, Decoder] = {
            "json": JsonDecoder(MAX_PAYLOAD, MAPPING),
            "avro": RegistryDecoder("avro", ours, settings, MAX_PAYLOAD, MAPPING),
            "protobuf": RegistryDecoder("protobuf", ours, settings, MAX_PAYLOAD, MAPPING,
                                        "tests.integration.registry_messages:ChatMessage"),  # fmt: skip
        }
        figures = {}
        for fmt, decoder in decoders.items():
            topic = f"bench-{'proto' if fmt == 'protobuf' else fmt}"
            records = [RawRecord(v, topic, 0, offset) for offset, v in enumerate(values[fmt])]
            event = decoder.decode(records[0])  # the schema fetched and cached before timing
            assert event.content == docs[0]["text"] and event.community_id == docs[0]["guild"]
            seconds = time_decoder(decoder, records, args.repeats)
            figures[fmt] = {"us_per_event": round(seconds / len(records) * 1e6, 2),
                            "mean_value_bytes": round(sum(map(len, values[fmt])) / len(records), 1)}  # fmt: skip
    finally:
        registry.stop()
    cpu = platform.processor() or platform.machine()
    print(f"decode cost per event, {args.events} events, best of {args.repeats}, {cpu}")
    print(f"{'format':<10}{'µs/event':>10}{'vs json':>9}{'value bytes':>13}")
    for fmt, f in figures.items():
        ratio = f["us_per_event"] / figures["json"]["us_per_event"]
        print(f"{fmt:<10}{f['us_per_event']:>10.2f}{ratio:>8.1f}x{f['mean_value_bytes']:>13.1f}")
    print(json.dumps({"events": args.events, "repeats": args.repeats, "figures": figures}))


if __name__ == "__main__":
    main()
