"""Finished spans to an OTLP `ExportTraceServiceRequest`, written in protobuf's wire format.

The OTLP exporters encode each span by building protobuf messages in Python: a `KeyValue` and an
`AnyValue` per attribute, the resource's attributes hashed (as JSON) once per span to group them.
A sampled record's two spans cost about 572k instructions to encode that way, more than the SDK
spends making them; `encode_request` writes the bytes directly, and keeps the fields of recent
attributes (most spans repeat the topic, the group, the policy, the verdict): 137k
(`bench/span_export.py --instructions`). That covers spans with string, integer, float and
boolean attributes; a span with anything else (events, links, an attribute of another type, an
integer beyond 64 bits) is encoded by the SDK's own encoder and its bytes embedded as they are,
so what a collector receives parses to the SDK's own request (the tests compare them over
generated spans). `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` keeps the SDK's gRPC exporter as it is.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import logging

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import SpanKind

# OTLP's SpanKind numbers (trace.proto): the SDK's enum starts at 0, the wire's at 1.
_KINDS = {
    kind: b"\x30" + bytes((number,))
    for kind, number in ((SpanKind.INTERNAL, 1), (SpanKind.SERVER, 2), (SpanKind.CLIENT, 3), (SpanKind.PRODUCER, 4),
                         (SpanKind.CONSUMER, 5))
}  # fmt: skip
# Span.flags: the parent's is_remote is known (0x100), and true (0x200); fixed32, field 16.
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", 0x100)
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", 0x300)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_ATTRIBUTE_CACHE_LIMIT = 4096

_log = logging.getLogger(__name__)


class _NotPlain(Exception):
    """A span the direct encoding does not cover (the SDK's encoder takes any that fails)."""


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the payload."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else _varint(n)) + payload


_Group = tuple[tuple[bytes, bytes], tuple[bytes, bytes]]  # (resource, its schema URL), (scope, its schema URL)


class SpanEncoder:
    """Encodes batches of finished spans; keeps recent attributes' encoding, and each resource's
    and scope's, between batches."""

    def __init__(self) -> None:
        # (name, value) -> the attribute's field: most spans repeat most of their attributes
        # (the topic, the group, the policy, the verdict).
        self._attributes: dict[tuple[str, object], tuple[type, bytes]] = {}
        # (id(resource), id(scope)) -> the objects (held, so that their ids stay theirs) and their
        # encoding as fields of ResourceSpans and ScopeSpans.
        self._names: dict[str, bytes] = {}  # span name -> its field
        self._groups: dict[tuple[int, int], tuple[object, object, _Group]] = {}

    def encode_request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialized `ExportTraceServiceRequest` of `spans`: grouped by resource, then by
        instrumentation scope, in the order each first appears, as the SDK groups them."""
        by_resource: dict[tuple[bytes, bytes], dict[tuple[bytes, bytes], list[bytes]]] = {}
        for span in spans:
            resource, scope = self._group(span)
            scopes = by_resource.get(resource)
            if scopes is None:
                scopes = by_resource[resource] = {}
            encoded = scopes.get(scope)
            if encoded is None:
                encoded = scopes[scope] = []
            encoded.append(self.encode_span(span))
        out = []
        for (resource, resource_schema), scopes in by_resource.items():
            scope_spans = b"".join(
                _field(b"\x12", scope + b"".join([_field(b"\x12", s) for s in encoded]) + scope_schema)
                for (scope, scope_schema), encoded in scopes.items()
            )
            out.append(_field(b"\x0a", resource + scope_spans + resource_schema))
        return b"".join(out)

    def _group(self, span: ReadableSpan) -> _Group:
        resource, scope = span.resource, span.instrumentation_scope
        key = (id(resource), id(scope))
        held = self._groups.get(key)
        if held is None or held[0] is not resource or held[1] is not scope:
            held = self._groups[key] = (resource, scope, _encode_group(span))
        return held[2]

    def encode_span(self, span: ReadableSpan) -> bytes:
        """One span's `Span` message."""
        try:
            return self._plain_span(span)
        except Exception:  # noqa: BLE001 - whatever this path does not cover, the SDK's encodes
            return _sdk_span(span)

    def _plain_span(self, span: ReadableSpan) -> bytes:
        if span.events or span.links or span.dropped_attributes:
            raise _NotPlain
        context = span.context
        parent = span.parent
        parts = [
            b"\x0a\x10", context.trace_id.to_bytes(16, "big"),
            b"\x12\x08", context.span_id.to_bytes(8, "big"),
        ]  # fmt: skip
        state = context.trace_state
        if state:
            parts.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items()).encode()))
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        name = self._names.get(span.name)
        if name is None:
            name = _field(b"\x2a", span.name.encode())
            if len(self._names) < _ATTRIBUTE_CACHE_LIMIT:
                self._names[span.name] = name
        parts += (name, _KINDS[span.kind])
        if span.start_time:
            parts += (b"\x39", _pack_fixed64(span.start_time))
        if span.end_time:
            parts += (b"\x41", _pack_fixed64(span.end_time))
        cache = self._attributes
        for item in span.attributes.items():
            kind = type(item[1])
            cached = cache.get(item)
            if cached is not None and cached[0] is kind:  # 1, True and 1.0 are one key
                parts.append(cached[1])
                continue
            field = _attribute_field(item[0], item[1])
            if kind is not float:  # 0.0 and -0.0 are one key too
                if len(cache) >= _ATTRIBUTE_CACHE_LIMIT:
                    cache.clear()  # unique values (offsets, ids) fill it; the common ones come back
                cache[item] = (kind, field)
            parts.append(field)
        status = span.status
        code = status.status_code.value
        if code or status.description:
            message = _field(b"\x12", status.description.encode()) if status.description else b""
            parts.append(_field(b"\x7a", message + (b"\x18" + bytes((code,)) if code else b"")))
        else:
            parts.append(b"\x7a\x00")  # an empty Status: the SDK always sets one
        parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        return b"".join(parts)


def _attribute_field(key: str, value: object) -> bytes:
    """A span's attribute: field 9, a `KeyValue` of the key and an `AnyValue`."""
    kind = type(value)
    if kind is str:
        any_value = _field(b"\x0a", value.encode())  # type: ignore[attr-defined]
    elif kind is bool:
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
            raise _NotPlain  # the SDK logs and leaves such an attribute out
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # type: ignore[operator]
    elif kind is float:
        any_value = b"\x21" + _pack_double(value)
    else:
        raise _NotPlain
    return _field(b"\x4a", _field(b"\x0a", key.encode()) + _field(b"\x12", any_value))


def _encode_group(span: ReadableSpan) -> _Group:
    """A span's resource and scope as the SDK encodes them (by encoding the span), as fields."""
    resource_spans = encode_spans([span]).resource_spans[0]
    scope_spans = resource_spans.scope_spans[0]
    return (
        (_field(b"\x0a", resource_spans.resource.SerializePartialToString()), _schema(b"\x1a", resource_spans.schema_url)),
        (_field(b"\x0a", scope_spans.scope.SerializePartialToString()), _schema(b"\x1a", scope_spans.schema_url)),
    )


def _schema(tag: bytes, url: str) -> bytes:
    return _field(tag, url.encode()) if url else b""


def _sdk_span(span: ReadableSpan) -> bytes:
    return encode_spans([span]).resource_spans[0].scope_spans[0].spans[0].SerializePartialToString()


class SpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter (endpoint, headers, TLS, compression, timeout and retries
    from the same `OTEL_EXPORTER_OTLP_*` variables), with the request encoded by `SpanEncoder`.
    `export` is the SDK's own, step for step, but for the encoder."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            _log.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            try:
                body = self._encoder.encode_request(spans)
            except Exception as error:  # noqa: BLE001 - as the SDK's: a batch that fails to encode is dropped, logged
                _log.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            if 0 < self._max_request_size < len(body):
                _log.warning("Dropping span batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                             len(body), self._max_request_size)  # fmt: skip
                result.error = ValueError(f"span batch of {len(body)} bytes exceeds max_request_size")
                return SpanExportResult.FAILURE
            sent = self._client.export(body)
            if not sent.success:
                result.error = sent.error
                if sent.status_code is not None:
                    result.error_attrs = {HTTP_RESPONSE_STATUS_CODE: sent.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
