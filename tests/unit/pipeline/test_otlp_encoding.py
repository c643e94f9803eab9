"""The OTLP request `SpanEncoder` writes parses to the one the SDK's encoder builds, for any span
the SDK can make; the exporter sends it where `OTEL_EXPORTER_OTLP_*` say."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from consumer.pipeline.telemetry import tracing
from consumer.pipeline.telemetry.otlp_encoding import SpanEncoder, SpanExporter

# A few names and values, so that spans share attributes (the encoder keeps them) and a name
# meets 1, True and 1.0, or 0.0 and -0.0, which are equal as keys of a dict.
_NAMES = st.sampled_from(["messaging.system", "safeguard.violation", "n", "é.clé", "x" * 200])
_VALUES = st.one_of(
    st.sampled_from([1, True, 1.0, 0, False, 0.0, -0.0, "", "kafka", "allow"]),
    st.text(max_size=300),  # lone surrogates included: the SDK leaves such a value out
    st.integers(min_value=-(1 << 70), max_value=1 << 70),  # beyond int64 too: left out as well
    st.floats(allow_nan=False),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.lists(st.text(max_size=5), max_size=3),
)
_ATTRIBUTES = st.dictionaries(_NAMES, _VALUES, max_size=6)
_CONTEXTS = st.builds(
    lambda trace_id, span_id, remote, state: SpanContext(
        trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", state)]) if state else None,
    ),
    st.integers(min_value=1, max_value=(1 << 128) - 1),
    st.integers(min_value=1, max_value=(1 << 64) - 1),
    st.booleans(),
    st.sampled_from(["", "a1", "b-2"]),
)  # fmt: skip
_SPAN = st.fixed_dictionaries(
    {
        "tracer": st.integers(min_value=0, max_value=3),
        "name": st.text(max_size=20),
        "kind": st.sampled_from(list(SpanKind)),
        "parent": st.one_of(st.none(), _CONTEXTS),
        "attributes": _ATTRIBUTES,
        "later": _ATTRIBUTES,
        "status": st.sampled_from([None, (StatusCode.OK, None), (StatusCode.ERROR, "timeout"), (StatusCode.ERROR, None)]),
        "event": st.one_of(st.none(), _ATTRIBUTES),
        "link": st.one_of(st.none(), _CONTEXTS),
        "times": st.one_of(st.none(), st.tuples(st.integers(0, 1 << 62), st.integers(0, 1 << 62))),
    }
)


class _Spans:
    """Two resources, four tracers (scopes with and without a version or schema URL)."""

    def __init__(self) -> None:
        self.finished = InMemorySpanExporter()
        resources = [
            Resource.create({"service.name": "safeguard-consumer", "service.version": "1"}),
            Resource({"service.name": "other", "n": 3}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
        ]
        self.tracers = []
        for i, resource in enumerate(resources):
            provider = TracerProvider(resource=resource)
            provider.add_span_processor(SimpleSpanProcessor(self.finished))
            self.tracers.append(provider.get_tracer(f"scope-{i}"))
            self.tracers.append(provider.get_tracer(f"scope-{i}", "2.0", schema_url="https://example.com/s"))

    def make(self, spec: dict) -> None:
        tracer = self.tracers[spec["tracer"]]
        context = trace.set_span_in_context(NonRecordingSpan(spec["parent"])) if spec["parent"] else None
        links = [Link(spec["link"], {"k": "v"})] if spec["link"] else ()
        start = spec["times"][0] if spec["times"] else None
        span = tracer.start_span(spec["name"], context=context, kind=spec["kind"], attributes=spec["attributes"],
                                 links=links, start_time=start)  # fmt: skip
        span.set_attributes(spec["later"])
        if spec["status"]:
            span.set_status(Status(*spec["status"]))
        if spec["event"] is not None:
            span.add_event("exception", spec["event"])
        span.end(end_time=spec["times"][1] if spec["times"] else None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(_SPAN, min_size=1, max_size=8), min_size=1, max_size=3))
def test_a_request_parses_to_the_sdks_own(batches):
    spans = _Spans()
    encoder = SpanEncoder()  # one encoder for every batch: what it keeps must not leak across
    for batch in batches:
        spans.finished.clear()
        for spec in batch:
            spans.make(spec)
        finished = spans.finished.get_finished_spans()
        ours = ExportTraceServiceRequest.FromString(encoder.encode_request(finished))
        assert ours == encode_spans(finished)


def test_values_equal_as_dict_keys_keep_their_own_type():
    """1, True and 1.0 (and 0.0, -0.0) are one key of the encoder's attribute cache."""
    spans = _Spans()
    for value in (1, True, 1.0, 0, False, 0.0, -0.0, 1, 0.0):
        spans.make({"tracer": 0, "name": "s", "kind": SpanKind.INTERNAL, "parent": None, "attributes": {"n": value},
                    "later": {}, "status": None, "event": None, "link": None, "times": None})  # fmt: skip
    finished = spans.finished.get_finished_spans()
    assert ExportTraceServiceRequest.FromString(SpanEncoder().encode_request(finished)) == encode_spans(finished)


def test_the_plain_spans_encoding_is_the_sdks_byte_for_byte():
    """Not only equal once parsed: a plain span's bytes are the ones protobuf writes."""
    spans = _Spans()
    for i in range(3):
        spec = {"tracer": i % 2, "name": "process chat", "kind": SpanKind.CONSUMER, "parent": None,
                "attributes": {"messaging.kafka.offset": i, "messaging.system": "kafka", "safeguard.violation": i == 1,
                               "safeguard.score": 0.25 * i},
                "later": {"safeguard.event_id": f"evt-{i}"}, "status": None, "event": None, "link": None, "times": None}  # fmt: skip
        spans.make(spec)
    finished = spans.finished.get_finished_spans()
    assert SpanEncoder().encode_request(finished) == encode_spans(finished).SerializeToString()


class _Collector:
    """An OTLP/HTTP endpoint on 127.0.0.1 that keeps each request's body and answers `status`."""

    def __init__(self, status: int = 200):
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                collector.paths.append(self.path)
                collector.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def collector():
    started = _Collector()
    yield started
    started.stop()


def test_run_exports_through_this_encoder_to_the_configured_endpoint(monkeypatch, collector):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    provider = tracing.tracer_provider_from_env()
    kept = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("safeguard-consumer")
    for i in range(5):
        span = tracer.start_span("process chat", kind=SpanKind.CONSUMER, attributes={"messaging.kafka.offset": i})
        span.set_attribute("safeguard.event_id", f"evt-{i}")
        span.end()
    assert provider.force_flush()
    provider.shutdown()
    assert collector.paths == ["/v1/traces"]
    sent = ExportTraceServiceRequest.FromString(collector.bodies[0])
    assert sent == encode_spans(kept.get_finished_spans())
    assert [s.name for s in sent.resource_spans[0].scope_spans[0].spans] == ["process chat"] * 5


def test_a_refused_or_oversized_batch_is_a_failed_export():
    refusing = _Collector(status=400)
    try:
        spans = _Spans()
        spans.make({"tracer": 0, "name": "s", "kind": SpanKind.INTERNAL, "parent": None, "attributes": {"a": "x" * 500},
                    "later": {}, "status": None, "event": None, "link": None, "times": None})  # fmt: skip
        finished = spans.finished.get_finished_spans()
        exporter = SpanExporter(endpoint=f"{refusing.endpoint}/v1/traces")
        assert exporter.export(finished) is SpanExportResult.FAILURE
        assert len(refusing.bodies) == 1  # a 400 is not retried
        small = SpanExporter(endpoint=f"{refusing.endpoint}/v1/traces", max_request_size=100)
        assert small.export(finished) is SpanExportResult.FAILURE
        assert len(refusing.bodies) == 1  # dropped before sending
    finally:
        refusing.stop()
