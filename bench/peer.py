"""Case 3, the peer: our job written with Quix Streams, the way its documentation shows.

Runs in its own environment (requirements/bench.txt: Quix Streams pins an older
confluent-kafka and pydantic than the consumer does): `python -m bench.peer SPEC_JSON`.
Same job as the hand-written loop: decode, validate as a ContentEvent, an instant verdict,
produce keyed like the input; Quix Streams commits every `commit_interval` (at least once).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
from pydantic import ValidationError
from quixstreams import Application, MessageContext, message_context

from bench.workload import Meter, Spec, instant_verdict, report
from consumer.events import ContentEvent

# consumer.kafka.options.PRODUCER_DEFAULTS, repeated: importing it needs packages this environment lacks.
PRODUCER = {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}


def run(spec: Spec) -> dict[str, Any]:
    app = Application(
        broker_address=spec.bootstrap,
        consumer_group=spec.group,
        auto_offset_reset="earliest",
        commit_interval=1.0,
        producer_extra_config=PRODUCER,
        loglevel=logging.WARNING,
        auto_create_topics=False,
    )
    source = app.topic(spec.input_topic, value_deserializer="bytes", key_deserializer="bytes")
    verdicts = app.topic(spec.output_topic, value_serializer="bytes", key_serializer="bytes")
    meter = Meter()

    def decide(value: bytes) -> bytes:
        meter.first_record()
        ctx: MessageContext = message_context()
        try:
            event = ContentEvent.model_validate(orjson.loads(value))
        except (orjson.JSONDecodeError, ValidationError):
            return value  # the hand-written loop dead-letters these; the input holds none
        return instant_verdict(event.event_id, ctx.topic, ctx.partition, ctx.offset, None)

    app.dataframe(source).apply(decide).to_topic(verdicts)
    app.run(count=spec.events, collect=False)
    meter.done()
    return meter.result(spec.events)


if __name__ == "__main__":
    report(run(Spec.from_json(sys.argv[1])))
