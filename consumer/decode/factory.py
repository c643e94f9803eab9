"""Builds the decoder the configuration names: one format for every input topic, or one per topic.

`decode.format` (with `decode.field_mapping`, `decode.message_type`) reads every topic not named
in `decode.topics`; an entry there (a topic name, or a regular expression starting with ^, tried
in order) gives its topics their own. The registry formats share one `SchemaRegistryClient`, so
one schema cache.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from consumer.config import REGISTRY_FORMATS, Settings, TopicDecode
from consumer.decode import Decoder, DecodesAhead, InputRecord
from consumer.decode.plain_json import JsonDecoder
from consumer.events import ContentEvent


def build_decoder(settings: Settings) -> Decoder:
    """The decoder for `decode`; ConfigError naming the key when it cannot be built."""
    decode = settings.decode
    specs = [decode, *decode.topics.values()]
    client = None
    if any(spec.format in REGISTRY_FORMATS for spec in specs):
        from consumer.decode.registry import registry_client  # only registry users need its libraries

        client = registry_client(settings.schema_registry)

    def decoder_for(spec: TopicDecode) -> Decoder:
        if spec.format == "json":
            return JsonDecoder(settings.pipeline.max_payload_bytes, spec.field_mapping)
        from consumer.decode.registry import RegistryDecoder

        assert client is not None
        return RegistryDecoder(spec.format, client, settings.schema_registry, settings.pipeline.max_payload_bytes,
                               spec.field_mapping, spec.message_type)  # fmt: skip

    default = decoder_for(decode)
    if not decode.topics:
        return default  # the common case: no per-record lookup on the hot path
    return DecoderByTopic({topic: decoder_for(spec) for topic, spec in decode.topics.items()}, default)


class DecoderByTopic:
    """Hands each record to its topic's decoder; a topic's choice is made once and remembered."""

    def __init__(self, by_topic: dict[str, Decoder], default: Decoder):
        self._exact = {topic: d for topic, d in by_topic.items() if not topic.startswith("^")}
        self._patterns = [(re.compile(topic), d) for topic, d in by_topic.items() if topic.startswith("^")]
        self._default = default
        self._chosen: dict[str | None, Decoder] = {}
        self._decodes_ahead = any(isinstance(d, DecodesAhead) for d in [*by_topic.values(), default])

    def for_topic(self, topic: str | None) -> Decoder:
        decoder = self._chosen.get(topic)
        if decoder is None:
            decoder = self._exact.get(topic or "") or next(
                (d for pattern, d in self._patterns if topic is not None and pattern.match(topic)), self._default
            )
            self._chosen[topic] = decoder
        return decoder

    def decode(self, record: InputRecord) -> ContentEvent:
        return self.for_topic(record.topic()).decode(record)

    def ahead(self, records: Sequence[InputRecord]) -> None:
        if not self._decodes_ahead:
            return
        for decoder in {id(d): d for d in map(self.for_topic, {r.topic() for r in records})}.values():
            if isinstance(decoder, DecodesAhead):
                decoder.ahead([r for r in records if self.for_topic(r.topic()) is decoder])
