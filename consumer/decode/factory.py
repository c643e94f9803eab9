"""Builds the decoder the configuration names: one format for every input topic, or one per topic.

`decode.format` (and `decode.field_mapping`) read every topic not named in `decode.topics`;
an entry there (a topic name, or a regular expression starting with ^, tried in order) gives
its topics their own format and mapping.
"""

from __future__ import annotations

import re

from consumer.config import Settings, TopicDecode
from consumer.decode import Decoder, InputRecord
from consumer.decode.plain_json import JsonDecoder
from consumer.events import ContentEvent


def build_decoder(settings: Settings) -> Decoder:
    decode = settings.decode
    default = _decoder_for(decode, settings)
    if not decode.topics:
        return default  # the common case: no per-record lookup on the hot path
    by_topic = {topic: _decoder_for(spec, settings) for topic, spec in decode.topics.items()}
    return DecoderByTopic(by_topic, default)


def _decoder_for(spec: TopicDecode, settings: Settings) -> Decoder:
    return JsonDecoder(settings.pipeline.max_payload_bytes, spec.field_mapping)


class DecoderByTopic:
    """Hands each record to its topic's decoder; a topic's choice is made once and remembered."""

    def __init__(self, by_topic: dict[str, Decoder], default: Decoder):
        self._exact = {topic: d for topic, d in by_topic.items() if not topic.startswith("^")}
        self._patterns = [(re.compile(topic), d) for topic, d in by_topic.items() if topic.startswith("^")]
        self._default = default
        self._chosen: dict[str | None, Decoder] = {}

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
