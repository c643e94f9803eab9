"""`decode.format: avro | protobuf | json_schema`: records in Confluent's wire format, read through a Schema Registry.

The bytes are confluent-kafka's business, not ours: its deserializers (AvroDeserializer,
ProtobufDeserializer, JSONDeserializer) find the schema id (the payload's prefix, or a header),
fetch the writer's schema from the registry through one shared `SchemaRegistryClient` (which
caches schemas by id), and decode with it, so a new writer schema version mid-stream is just
another id. The decoded document (a dict; a Protobuf message turned into one) goes through the
same field mapping as JSON (`consumer.decode.fields`).

Whose fault a failure is decides where it goes:
- the record's: a schema id the registry does not know, bytes that do not match their schema,
  a payload without the wire format's framing: `DecodeError(deserialization_failed)`, a dead
  letter naming the schema id and subject, with the original bytes kept;
- the registry's: unreachable, slow, failing (5xx, 429) or refusing our credentials: retried
  with back-off for `schema_registry.retry_s`, then `Unavailable("schema registry", reason)`:
  the record is kept, never dead-lettered.

A schema fetch must never block the event loop, so these decoders decode ahead (`DecodesAhead`):
the pipeline hands each poll batch to `ahead` on the poll thread, which decodes every record there
(fetching what the cache lacks) and keeps the outcome; `decode` on the loop then only looks it
up. A record that was not decoded ahead (the chat rebuild and appeals, which run on threads of
their own) is decoded where it is asked for.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient, dual_schema_id_deserializer
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.common._httpx_compat import httpx  # the HTTP library the client itself uses
from confluent_kafka.schema_registry.common.serde import SchemaId
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import json_format
from google.protobuf.message import Message as ProtobufMessage
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from consumer.config import ConfigError, SchemaRegistrySettings
from consumer.decode import DecodeError, InputRecord
from consumer.decode.fields import FieldMapping
from consumer.decode.plain_json import check_size
from consumer.errors import Unavailable
from consumer.events import ContentEvent, ErrorType

REGISTRY = "schema registry"
_SCHEMA_TYPES = {"avro": "AVRO", "protobuf": "PROTOBUF", "json_schema": "JSON"}  # the library's SchemaId types
# Statuses that say the registry (or the way to it) is in trouble, not the record: a timeout,
# throttling, its own failures, and credentials it refuses (an operator fixes those; the records
# wait).
_REGISTRY_TROUBLE = frozenset({401, 403, 408, 429})


class _Client(SchemaRegistryClient):
    """confluent-kafka's client, tolerant of one gap in Apicurio Registry's Confluent-compatible API.

    The Protobuf deserializer asks for the writer's schema with `format=serialized` (a base64
    FileDescriptorProto). Apicurio 3.3 answers 500 for a schema that was registered as a serialized
    descriptor (which is how confluent-kafka's own ProtobufSerializer registers it), yet returns
    that same base64 text when asked without a format; so ask again without one. A registry that
    answers the first request (Confluent's) never takes the second path."""

    def get_schema(self, schema_id: int, subject_name: str | None = None, fmt: str | None = None,
                   reference_format: str | None = None) -> Any:  # fmt: skip
        try:
            return super().get_schema(schema_id, subject_name, fmt, reference_format)
        except SchemaRegistryError as exc:
            if fmt != "serialized" or exc.http_status_code != 500:
                raise
            return super().get_schema(schema_id, subject_name, None, reference_format)


class _RegistryTrouble(Exception):
    """One failed try to reach the registry; retried, then reported as `Unavailable`."""


def registry_client(settings: SchemaRegistrySettings) -> SchemaRegistryClient:
    """confluent-kafka's client for `schema_registry`; ConfigError naming the key for a property it refuses."""
    conf: dict[str, Any] = {"url": settings.url, "timeout": settings.timeout_s,
                            "max.retries": 0}  # fmt: skip  - retries are ours, bounded by retry_s
    if settings.username is not None or settings.password is not None:
        conf["basic.auth.user.info"] = f"{settings.username or ''}:{settings.password or ''}"
    for key, value in (("ssl.ca.location", settings.ssl_ca_location),
                       ("ssl.certificate.location", settings.ssl_certificate_location),
                       ("ssl.key.location", settings.ssl_key_location)):  # fmt: skip
        if value is not None:
            conf[key] = value
    conf |= settings.client
    try:
        return _Client(conf)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"schema_registry: {exc}") from None
    except OSError as exc:  # a TLS file that is missing or unreadable: the library does not say which
        files = ", ".join(k.replace(".", "_") for k in ("ssl.ca.location", "ssl.certificate.location",
                                                       "ssl.key.location") if k in conf)  # fmt: skip
        raise ConfigError(f"schema_registry: cannot read its TLS files ({files}): {exc.strerror or exc}") from None


def check_reachable(client: SchemaRegistryClient, settings: SchemaRegistrySettings) -> None:
    """The pre-flight: the registry answers (lists its subjects); else `Unavailable`."""

    def list_subjects() -> None:
        try:
            client.get_subjects()
        except (SchemaRegistryError, httpx.HTTPError) as exc:
            raise _RegistryTrouble(f"{type(exc).__name__}: {exc}") from None

    _with_retries(list_subjects, settings.retry_s)


def retried(call: Any, retry_s: float) -> Any:
    """`call()` against the registry, tried again while the registry is in trouble (a timeout, a
    refused connection, throttling, its own failures, credentials it refuses) for up to `retry_s`,
    then `Unavailable`. Its other answers (a subject or schema it does not hold) raise as they came."""

    def once() -> Any:
        try:
            return call()
        except SchemaRegistryError as exc:
            if exc.http_status_code in _REGISTRY_TROUBLE or exc.http_status_code >= 500:
                raise _RegistryTrouble(str(exc)) from None
            raise
        except httpx.HTTPError as exc:
            raise _RegistryTrouble(f"{type(exc).__name__}: {exc}") from None

    return _with_retries(once, retry_s)


def load_message_type(spec: str) -> type[ProtobufMessage]:
    """`module:Class`, the generated Protobuf class the producers use; ConfigError when it is not one."""
    module_name, _, name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"decode.message_type: cannot load {spec!r} ({exc})") from None
    if not (isinstance(found, type) and issubclass(found, ProtobufMessage)):
        raise ConfigError(f"decode.message_type: {spec!r} is not a generated Protobuf message class")
    return found


class RegistryDecoder:
    """Reads one registry format; raises DecodeError (the record's fault) or Unavailable (the registry's)."""

    def __init__(
        self,
        fmt: str,
        client: SchemaRegistryClient,
        settings: SchemaRegistrySettings,
        max_payload_bytes: int,
        field_mapping: dict[str, str] | None = None,
        message_type: str | None = None,
    ):
        self.format = fmt
        self._retry_s = settings.retry_s
        self.max_payload_bytes = max_payload_bytes
        self._mapping = FieldMapping(field_mapping)
        # Each deserializer fetches the writer's schema by the record's id (no reader schema of
        # ours), so every registered version reads as it was written.
        if fmt == "avro":
            self._deserializer: Any = AvroDeserializer(client)
        elif fmt == "protobuf":
            assert message_type is not None  # the settings refuse protobuf without it
            self._deserializer = ProtobufDeserializer(load_message_type(message_type),
                                                      {"use.deprecated.format": False}, client)  # fmt: skip
        else:
            self._deserializer = JSONDeserializer(None, schema_registry_client=client)
        # Outcomes decoded ahead on the poll thread, by record coordinates, until the loop asks.
        self._ahead: dict[tuple[str | None, int | None, int | None], ContentEvent | Exception] = {}
        self._lock = threading.Lock()  # the deserializers' caches are not written from two threads at once

    def ahead(self, records: Sequence[InputRecord]) -> None:
        unavailable: Unavailable | None = None
        for record in records:
            outcome: ContentEvent | Exception
            if unavailable is not None:
                outcome = unavailable  # retried once for the batch already: the poll thread must go on polling
            else:
                try:
                    outcome = self._decode_now(record)
                except DecodeError as exc:
                    outcome = exc
                except Unavailable as exc:
                    outcome = unavailable = exc
            self._ahead[(record.topic(), record.partition(), record.offset())] = outcome

    def decode(self, record: InputRecord) -> ContentEvent:
        outcome = self._ahead.pop((record.topic(), record.partition(), record.offset()), None)
        if outcome is None:
            return self._decode_now(record)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _decode_now(self, record: InputRecord) -> ContentEvent:
        value = check_size(record.value(), self.max_payload_bytes)
        topic = record.topic() or ""
        ctx = SerializationContext(topic, MessageField.VALUE, record.headers())
        with self._lock:
            doc = self._deserialize(value, ctx, topic)
        if isinstance(doc, ProtobufMessage):
            doc = json_format.MessageToDict(doc, preserving_proto_field_name=True)
        return self._mapping.to_event(doc, record, f"a {self.format} record")

    def _deserialize(self, value: bytes, ctx: SerializationContext, topic: str) -> Any:
        try:
            return retried(lambda: self._deserializer(value, ctx), self._retry_s)
        except Unavailable:
            raise  # the registry's trouble, retried already: the record waits
        except SchemaRegistryError as exc:  # the registry's answer about this record's schema
            raise DecodeError(ErrorType.DESERIALIZATION_FAILED,
                              f"{self._schema_id(value, ctx)}, subject {topic}-value: {exc}") from None  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - whatever the decoder meets in bytes that do not match their schema
            raise DecodeError(ErrorType.DESERIALIZATION_FAILED,
                              f"{self._schema_id(value, ctx)}, subject {topic}-value: the bytes do not match the "
                              f"schema ({type(exc).__name__}: {exc})") from None  # fmt: skip

    def _schema_id(self, value: bytes, ctx: SerializationContext) -> str:
        """The record's schema id as the library reads it (header, else prefix), for a dead letter's message."""
        schema_id = SchemaId(_SCHEMA_TYPES[self.format])
        try:
            dual_schema_id_deserializer(value, ctx, schema_id)
        except Exception:  # noqa: BLE001 - no framing at all: that is what the message then says
            return f"{self.format} record without a schema id"
        return f"{self.format} schema id {schema_id.id if schema_id.id is not None else schema_id.guid}"


def _with_retries(call: Any, retry_s: float) -> Any:
    """`call()`, retried with exponential back-off while the registry is in trouble, for up to `retry_s`."""
    try:
        return call()
    except _RegistryTrouble:
        pass  # the common case above costs no retry machinery; now try again for up to retry_s
    try:
        for attempt in Retrying(retry=retry_if_exception_type(_RegistryTrouble), stop=stop_after_delay(retry_s),
                                wait=wait_exponential(multiplier=0.1, max=2.0), reraise=False):  # fmt: skip
            with attempt:
                return call()
    except RetryError as exc:
        reason = exc.last_attempt.exception()
        raise Unavailable(REGISTRY, str(reason), retry_after_s=2.0) from None
    raise AssertionError("unreachable: Retrying either returns or raises")

