"""Registered outputs (`sinks.registered_outputs`): owns "any registry-aware consumer reads them back".

The outputs named there (verdicts, dead letters) go to Kafka in Confluent's wire
format: confluent-kafka's `JSONSerializer` writes the magic byte and the schema id, then the same
JSON a plain output carries. The schema is the JSON Schema generated from our pydantic models
(`consumer.schemas`, the files under schemas/), under the topic name strategy's subject
(`<topic>-value`), so a consumer with the library's `JSONDeserializer` reads and validates them.

- **Registered ahead, looked up once.** `topics create` registers the schemas
  (`register_output_schemas`), testing compatibility with what the subject holds first. A running
  consumer only looks its schema ids up, when it reads its topics' budgets at start (off the loop),
  and never asks the registry again: an output never waits on it.
- **Budgets stay exact.** A registered topic's budget is its plain budget less the 5 bytes of
  framing, so the fitting (a verdict trimmed, a dead letter abbreviated) works on the JSON as for
  plain outputs, and the framed record still fits its topic.
- **Nothing changes when off.** The pipeline uses this budget only when some output is registered;
  otherwise the plain `OutputBudget` and the sinks' hot path are untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from consumer.config import Settings
from consumer.config.sinks import RegisteredOutput
from consumer.decode.registry import REGISTRY, registry_client, retried
from consumer.errors import Fatal, Unavailable
from consumer.events import Document, Headers
from consumer.kafka.budget import Output, OutputBudget
from consumer.kafka.client import Message
from consumer.schemas import render_schemas

FRAME_BYTES = 5  # the magic byte and the 4-byte schema id the serializer puts before the JSON
_SCHEMA_FILES: dict[RegisteredOutput, str] = {"verdict": "verdict.schema.json",
                                               "dead_letter": "dead-letter.schema.json"}  # fmt: skip


def registered_topics(settings: Settings) -> dict[str, RegisteredOutput]:
    """Each topic whose records carry a registered schema, with the kind of output it takes."""
    topic_of: dict[RegisteredOutput, str] = {"verdict": settings.kafka.verdict_topic,
                                             "dead_letter": settings.kafka.dead_letter_topic}  # fmt: skip
    return {topic_of[kind]: kind for kind in settings.sinks.registered_outputs if topic_of[kind]}


def output_schema(kind: RegisteredOutput) -> Schema:
    """The JSON Schema of one kind of output, as `schemas export` writes it."""
    return Schema(render_schemas()[_SCHEMA_FILES[kind]], "JSON")


def register_output_schemas(settings: Settings, client: SchemaRegistryClient | None = None) -> list[tuple[str, str]]:
    """Register each registered output's schema under its topic's subject; returns (subject,
    outcome) per topic, an outcome starting with "failed" or "incompatible" when it was not."""
    client = client or registry_client(settings.schema_registry)
    retry_s = settings.schema_registry.retry_s
    outcomes = []
    for topic, kind in registered_topics(settings).items():
        subject, schema = f"{topic}-value", output_schema(kind)
        # A registry slow to answer is asked again for retry_s, as a run's start does; registering
        # a schema the subject holds already gives its id again, so a retried registration is safe.
        register = functools.partial(client.register_schema_full_response, subject, schema)
        try:
            if subject not in retried(client.get_subjects, retry_s):
                registered = retried(register, retry_s)
                outcomes.append((subject, f"{kind} schema registered, id {registered.schema_id}"))
                continue
            try:
                found = retried(functools.partial(client.lookup_schema, subject, schema), retry_s)
                outcomes.append((subject, f"{kind} schema already registered, id {found.schema_id}"))
                continue
            except SchemaRegistryError as exc:
                if exc.http_status_code != 404:
                    raise
            note = ""
            try:
                compatible = client.test_compatibility(subject, schema)
            except SchemaRegistryError as exc:
                if exc.http_status_code < 500:
                    raise
                # Apicurio 3.3 cannot test a draft 2020-12 schema (500); say so rather than refuse.
                compatible, note = True, f" (the registry could not test compatibility: {exc})"
            if not compatible:
                outcomes.append((subject, f"incompatible with its latest version: the {kind} schema was not "
                                          "registered; set the subject's compatibility, or a new topic"))  # fmt: skip
                continue
            registered = retried(register, retry_s)
            outcomes.append((subject, f"{kind} schema registered as a new version, id {registered.schema_id}{note}"))
        except Exception as exc:  # noqa: BLE001 - the registry's refusal or its HTTP client's error: said per subject
            outcomes.append((subject, f"failed: {type(exc).__name__}: {exc}"))
    return outcomes


class RegisteredBudget(OutputBudget):
    """The output budgets, whose registered topics' outputs leave framed by the library's serializer."""

    def __init__(self, producer_config: dict[str, Any], settings: Settings,
                 describe: Callable[[list[str]], dict[str, int | None]] | None = None):  # fmt: skip
        super().__init__(producer_config, settings.kafka.verdict_topic, settings.kafka.dead_letter_topic, describe)
        self._registry_url = settings.schema_registry.url
        self._retry_s = settings.schema_registry.retry_s
        client = registry_client(settings.schema_registry)
        # Registration is `topics create`'s; the serializers only look their ids up (in `load`).
        conf = {"auto.register.schemas": False, "validate": False}  # the documents come from the schemas' models
        self._serializers = {
            topic: (JSONSerializer(output_schema(kind), client, conf=conf, json_encode=orjson.dumps),
                    SerializationContext(topic, MessageField.VALUE))
            for topic, kind in registered_topics(settings).items()
        }  # fmt: skip
        self._looked_up: set[str] = set()

    def load(self, topics: list[str] | None = None) -> None:
        super().load(topics)
        for topic, (serialize, ctx) in self._serializers.items():
            if topic in self._looked_up:
                continue
            try:
                # The serializer's first call looks the schema's id up and keeps it; later calls
                # make no request. This one, off the loop, is that first call; a registry slow to
                # answer (a timeout, a 503) is asked again for retry_s, as the decoder does.
                retried(lambda: serialize({}, ctx), self._retry_s)
            except SchemaRegistryError as exc:
                raise Fatal(f"{REGISTRY} {self._registry_url}: subject {topic}-value does not hold this "
                            f"version's schema ({exc}); register it with `safeguard-consumer topics create`") from None
            except Unavailable as exc:
                raise Fatal(f"{REGISTRY} {self._registry_url}: {exc.reason} (asked for {self._retry_s:g}s, "
                            "schema_registry.retry_s)") from None
            except Exception as exc:  # noqa: BLE001 - whatever else the serializer meets: said, not swallowed
                raise Fatal(f"{REGISTRY} {self._registry_url}: {type(exc).__name__}: {exc}") from None
            self._looked_up.add(topic)

    def budget(self, topic: str) -> int:
        budget = super().budget(topic)
        return budget - FRAME_BYTES if topic in self._serializers else budget

    def verdict(self, document: Document, record: Message, headers: Headers) -> Output:
        return self._framed(super().verdict(document, record, headers))

    def dead_letter(self, document: Document, record: Message, headers: Headers) -> Output:
        return self._framed(super().dead_letter(document, record, headers))

    def smaller(self, refused: Output, reason: str, size: bool) -> Output:
        return self._framed(super().smaller(refused, reason, size))

    def _framed(self, output: Output) -> Output:
        found = self._serializers.get(output.topic)
        # A plain output's value is a JSON object ("{"); a framed one starts with the magic byte,
        # as the fitted output of a rejected verdict (a dead letter, framed already) does.
        if found is None or output.value[:1] != b"{":
            return output
        serialize, ctx = found
        # The fitted value, not `output.document`: it is what fits, trimmed or abbreviated. A verdict
        # sent whole carries no document (its plain value was it): framed, it keeps the one read here.
        fitted = orjson.loads(output.value)
        document = fitted if output.document is None else output.document
        return output._replace(value=serialize(fitted, ctx), document=document)
