"""Tracing set-up from OTEL_* variables, header propagation, and JSON logs with trace ids."""

import logging

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider

from consumer.pipeline.telemetry import logs, metrics, tracing


def test_exporter_follows_otel_traces_exporter(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.tracer_provider_from_env() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert isinstance(tracing.tracer_provider_from_env(), TracerProvider)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(tracing.TelemetryError, match="unsupported exporter 'zipkin'"):
        tracing.tracer_provider_from_env()


def test_headers_round_trip_and_corrupt_ones_are_ignored():
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span("s")
    headers = tracing.inject(span)
    assert [name for name, _ in headers] == ["traceparent"]
    context = tracing.extract(headers + [("other", b"x")])
    child = provider.get_tracer("t").start_span("child", context=context)
    assert child.parent.span_id == span.get_span_context().span_id
    assert tracing.extract([("traceparent", b"\xff\xfe")]) == {}


def test_json_logs_carry_the_current_trace_and_span_ids():
    provider = TracerProvider()
    formatter = logs.JsonLogFormatter()
    record = logging.LogRecord("consumer.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    assert "trace_id" not in orjson.loads(formatter.format(record))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        entry = orjson.loads(formatter.format(record))
    assert entry["message"] == "hello world" and entry["level"] == "INFO"
    assert entry["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert entry["span_id"] == f"{span.get_span_context().span_id:016x}"


def test_latency_histogram_exposes_cumulative_prometheus_buckets():
    from prometheus_client import CollectorRegistry, generate_latest

    histogram = metrics.LatencyHistogram("demo_duration_seconds", "demo", "outcome", bounds=(0.005, 0.01))
    for value in (0.001, 0.005, 0.007, 0.01, 0.012):  # a value equal to a bound belongs to that bound's bucket
        histogram.record(value, "verdict")
    histogram.record(0.003, "dead_letter")
    registry = CollectorRegistry()
    registry.register(histogram)
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")}
    assert lines['demo_duration_seconds_bucket{le="0.005",outcome="verdict"}'] == 2
    assert lines['demo_duration_seconds_bucket{le="0.01",outcome="verdict"}'] == 4
    assert lines['demo_duration_seconds_bucket{le="+Inf",outcome="verdict"}'] == 5
    assert lines['demo_duration_seconds_count{outcome="verdict"}'] == 5
    assert abs(lines['demo_duration_seconds_sum{outcome="verdict"}'] - 0.035) < 1e-9
    assert lines['demo_duration_seconds_count{outcome="dead_letter"}'] == 1


def test_a_batch_of_latencies_counts_as_each_one_would():
    one_by_one = metrics.LatencyHistogram("a", "a", "outcome", bounds=(0.005, 0.01))
    batched = metrics.LatencyHistogram("a", "a", "outcome", bounds=(0.005, 0.01))
    values = [0.001, 0.005, 0.007, 0.01, 0.012, 0.5]
    for value in values:
        one_by_one.record(value, "verdict")
    batched.record_many(values[:2], "verdict")
    batched.record_many(values[2:], "verdict")
    [expected], [got] = one_by_one.collect(), batched.collect()
    assert [(s.name, s.labels, s.value) for s in got.samples] == [(s.name, s.labels, s.value) for s in expected.samples]
    assert next(s.value for s in got.samples if s.name == "a_count") == 6


def test_the_figures_a_stage_declares_are_exported_under_their_names():
    from prometheus_client import generate_latest

    from consumer.pipeline.batcher import Batcher
    from consumer.pipeline.telemetry import Telemetry

    class Figures:  # the attributes Batcher.FIGURES reads, as a running batcher has them
        avg_batch_size, avg_batch_tokens, in_flight, in_flight_tokens = 12.5, 900.0, 3, 4096
        concurrency_limit, queued, avg_queue_wait_s = 64, 7, 0.25

    provider, registry = metrics.prometheus_meter_provider()
    Telemetry.create("g", meter_provider=provider, registry=registry).observe_figures(Batcher.FIGURES, Figures())
    exported = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in generate_latest(registry).decode().splitlines() if line.startswith("safeguard_batcher")}
    assert exported == {
        "safeguard_batcher_batch_size": 12.5, "safeguard_batcher_batch_tokens": 900.0,
        "safeguard_batcher_in_flight_requests": 3, "safeguard_batcher_in_flight_tokens": 4096,
        "safeguard_batcher_concurrency_limit": 64, "safeguard_batcher_queued_requests": 7,
        "safeguard_batcher_queue_wait_seconds": 0.25,
    }


class _Record:
    """What `Telemetry.record_spans` reads of a consumed record."""

    def __init__(self, headers=None):
        self._headers = headers

    def headers(self):
        return self._headers

    def topic(self):
        return "chat"

    def partition(self):
        return 2

    def offset(self):
        return 41

    def key(self):
        return b"channel-7"


def _ratio_telemetry(monkeypatch, ratio, sampler="parentbased_traceidratio"):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from consumer.pipeline.telemetry import Telemetry

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # and the in-memory one below, to read the spans
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", str(ratio))
    provider = tracing.tracer_provider_from_env()
    exported = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    meter_provider = metrics.prometheus_meter_provider()[0]
    return Telemetry.create("g", meter_provider=meter_provider, tracer_provider=provider), exported


def test_a_ratio_sampler_decides_roots_as_the_sdk_would(monkeypatch):
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    telemetry, exported = _ratio_telemetry(monkeypatch, 0.3)
    sdk = TraceIdRatioBased(0.3)
    spans = [telemetry.record_spans([_Record()])[0] for _ in range(2000)]
    sampled = [s for s in spans if s.is_recording()]
    for span in spans:  # the decision is TraceIdRatioBased's on the same trace id, sampled or not
        context = span.get_span_context()
        assert context.is_valid
        assert span.is_recording() == sdk.should_sample(None, context.trace_id, "x").decision.is_sampled()
        span.end()
    assert 450 < len(sampled) < 750  # 600 expected; the bounds are 6 standard deviations away
    assert len(exported.get_finished_spans()) == len(sampled)
    attributes = exported.get_finished_spans()[0].attributes
    assert attributes["messaging.kafka.offset"] == 41 and attributes["messaging.kafka.message.key"] == "channel-7"
    telemetry.shutdown()


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_a_poll_batchs_roots_are_decided_at_once_as_the_sdk_would(monkeypatch, ratio):
    """`record_spans`: the roots of a batch from one draw, the records with a parent as one by one."""
    from opentelemetry import trace
    from opentelemetry.propagate import get_global_textmap
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    parent = TracerProvider().get_tracer("t").start_span("producer")  # sampled: followed at any ratio
    telemetry, exported = _ratio_telemetry(monkeypatch, ratio)
    sdk = TraceIdRatioBased(ratio)
    batch = [_Record(tracing.inject(parent)) if i % 10 == 0 else _Record() for i in range(2000)]
    spans = telemetry.record_spans(batch)
    assert len(spans) == len(batch)
    roots = [span for record, span in zip(batch, spans) if not record.headers()]
    children = [span for record, span in zip(batch, spans) if record.headers()]
    assert all(s.is_recording() and s.parent.span_id == parent.get_span_context().span_id for s in children)
    for span in roots:
        context = span.get_span_context()
        decision = sdk.should_sample(None, context.trace_id, "x").decision
        assert context.is_valid and span.is_recording() == decision.is_sampled()
        if not span.is_recording():
            carrier = {}
            get_global_textmap().inject(carrier, context=trace.set_span_in_context(span))
            assert tracing.inject(span) == [("traceparent", carrier["traceparent"].encode())]
    sampled = sum(span.is_recording() for span in roots)
    assert {0.0: sampled == 0, 0.3: 390 < sampled < 690, 1.0: sampled == len(roots)}[ratio], sampled  # 540 expected
    assert len({span.get_span_context().trace_id for span in roots}) == len(roots)
    for span in spans:
        span.end()
    assert len(exported.get_finished_spans()) == sampled + len(children)
    telemetry.shutdown()


def test_an_unsampled_record_still_carries_its_trace_on_as_the_propagator_writes_it(monkeypatch):
    from opentelemetry import trace
    from opentelemetry.propagate import get_global_textmap

    telemetry, exported = _ratio_telemetry(monkeypatch, 0.0)
    span = telemetry.record_spans([_Record()])[0]
    assert isinstance(span, tracing.UnsampledSpan) and not span.is_recording()
    carrier = {}
    get_global_textmap().inject(carrier, context=trace.set_span_in_context(span))
    assert tracing.inject(span) == [(name, value.encode()) for name, value in carrier.items()]
    assert tracing.inject(span)[0][1].endswith(b"-02")  # not sampled; the trace id is random (W3C level 2)
    span.end()
    assert exported.get_finished_spans() == ()
    telemetry.shutdown()


def test_a_sampled_parent_is_followed_at_any_ratio(monkeypatch):
    parent = TracerProvider().get_tracer("t").start_span("producer")
    telemetry, exported = _ratio_telemetry(monkeypatch, 0.0)
    span = telemetry.record_spans([_Record(tracing.inject(parent) + [("other", b"x")])])[0]
    assert span.is_recording()
    assert span.parent.span_id == parent.get_span_context().span_id
    span.end()
    assert len(exported.get_finished_spans()) == 1
    telemetry.shutdown()


def test_a_sampler_ratio_that_is_not_one_stops_with_the_variable_named(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1%")
    with pytest.raises(tracing.TelemetryError, match="OTEL_TRACES_SAMPLER_ARG"):
        tracing.tracer_provider_from_env()


def test_a_record_without_trace_headers_starts_a_trace_of_its_own(monkeypatch):
    from opentelemetry import trace

    telemetry, _ = _ratio_telemetry(monkeypatch, 1.0)
    current = TracerProvider().get_tracer("t").start_span("whatever runs the loop")
    with trace.use_span(current, end_on_exit=True):
        span = telemetry.record_spans([_Record()])[0]
    assert span.is_recording() and span.parent is None
    assert span.get_span_context().trace_id != current.get_span_context().trace_id
    span.end()
    telemetry.shutdown()



@pytest.mark.parametrize("sampler", ["parentbased_traceidratio", "traceidratio"])
def test_a_record_under_a_producers_trace_gets_the_span_the_sdk_would_start(monkeypatch, sampler):
    import random

    from opentelemetry import trace
    from opentelemetry.propagate import get_global_textmap
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    telemetry, exported = _ratio_telemetry(monkeypatch, 0.5, sampler)
    ratio = TraceIdRatioBased(0.5)
    sdk = TracerProvider(sampler=ratio if sampler == "traceidratio" else ParentBased(ratio)).get_tracer("t")
    rng = random.Random(3)
    plain = [f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-{flags:02x}".encode()
             for flags in (0, 1, 2, 3, 0x80) for _ in range(40)]  # fmt: skip
    ids = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
    other_forms = [f"00-{ids.upper()}-00", f" 00-{ids}-00", f"01-{ids}-00-x", f"00-{ids}-00-x",
                   "00-" + "0" * 32 + "-00f067aa0ba902b7-00"]  # fmt: skip
    cases = [[("traceparent", p)] for p in plain + [f.encode() for f in other_forms]]
    cases += [[("Traceparent", plain[0]), ("tracestate", b"vendor=1")], [("other", b"x")]]
    shortcuts = recorded = 0
    for headers in cases:
        span = telemetry.record_spans([_Record(headers)])[0]
        shortcuts += isinstance(span, tracing.UnsampledSpan)
        recorded += span.is_recording()
        parent = trace.get_current_span(tracing.extract(headers)).get_span_context()
        if parent.is_valid:  # else a trace of its own, at a random id
            expected = sdk.start_span("x", context=tracing.extract(headers))
            ours, theirs = span.get_span_context(), expected.get_span_context()
            assert span.is_recording() == expected.is_recording(), headers
            assert (ours.trace_id, ours.trace_flags, ours.trace_state, ours.is_remote) == (
                theirs.trace_id, theirs.trace_flags, theirs.trace_state, theirs.is_remote), headers  # fmt: skip
        carrier = {}
        get_global_textmap().inject(carrier, context=trace.set_span_in_context(span))
        assert tracing.inject(span) == [(name, value.encode()) for name, value in carrier.items()]
        span.end()
    assert 50 < shortcuts < 200  # the plain parents that are not sampled, and only those
    assert len(exported.get_finished_spans()) == recorded
    telemetry.shutdown()


def _without_ids_and_times(spans):
    """The OTLP request of `spans`, their ids and times zeroed (ours and the SDK's differ there)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    request = encode_spans(spans)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.trace_id = span.span_id = b"\1" * len(span.span_id)
                span.parent_span_id = b"\1" * len(span.parent_span_id)
                span.start_time_unix_nano = span.end_time_unix_nano = 1
                for event in span.events:
                    event.time_unix_nano = 1
                    for attribute in event.attributes:
                        if attribute.key == "exception.stacktrace":  # the lines differ
                            attribute.value.string_value = attribute.value.string_value.splitlines()[-1]
    return request


def _as_the_sdk_makes_them(telemetry, exported, play):
    """`play(record_span, start_child)` run on a sampled root of `telemetry` (made by its recorder)
    and on the SDK's own tracer set up alike; both exports."""
    from opentelemetry.sdk.trace import SpanLimits
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    import consumer

    span = telemetry.record_spans([_Record()])[0]
    assert type(span) is tracing.RecordedSpan
    play(span, lambda parent, name, attributes, start: tracing.start_child(telemetry.tracer, parent, name, attributes, start))
    sdk_exported = InMemorySpanExporter()
    provider = TracerProvider(resource=telemetry.provider.resource, span_limits=SpanLimits(),
                              sampler=ParentBased(TraceIdRatioBased(1.0)))  # fmt: skip
    provider.add_span_processor(SimpleSpanProcessor(sdk_exported))
    tracer = provider.get_tracer("safeguard-consumer", consumer.__version__)
    twin = tracer.start_span("process chat", kind=SpanKind.CONSUMER, attributes=telemetry._attributes(_Record()))
    play(twin, lambda parent, name, attributes, start: tracing.start_child(tracer, parent, name, attributes, start))
    return exported.get_finished_spans(), sdk_exported.get_finished_spans()


def test_a_sampled_records_spans_are_exported_as_the_sdks_would_be(monkeypatch):
    import time

    from opentelemetry.trace import Status, StatusCode

    def play(span, start_child):
        span.set_attribute("safeguard.event_id", "evt-1")
        child = start_child(span, "classify chat", {"safeguard.policy.id": "chat", "safeguard.violation": True},
                            time.time_ns())  # fmt: skip
        child.set_status(Status(StatusCode.ERROR, "timeout"))
        child.set_status(StatusCode.UNSET)  # ignored, as by the SDK
        child.end()
        child.set_attribute("late", 1)  # an ended span takes nothing more
        span.set_status(Status(StatusCode.OK))
        span.set_status(Status(StatusCode.ERROR, "after OK"))  # OK is final
        span.update_name("process chat")
        span.add_event("retried", {"attempt": 2})
        assert span.is_recording() and not child.is_recording()
        span.end()
        span.end()  # ended once

    telemetry, exported = _ratio_telemetry(monkeypatch, 1.0)
    ours, sdks = _as_the_sdk_makes_them(telemetry, exported, play)
    assert len(ours) == 2 and ours[0].parent.span_id == ours[1].context.span_id
    assert ours[0].context.trace_id == ours[1].context.trace_id and ours[1].parent is None
    assert ours[1].context.trace_flags == sdks[1].context.trace_flags  # sampled, random trace id
    assert _without_ids_and_times(ours) == _without_ids_and_times(sdks)
    telemetry.shutdown()


def test_a_recorded_span_keeps_the_span_limits_and_records_an_exception(monkeypatch):
    from opentelemetry import trace

    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "5")

    def play(span, start_child):
        span.set_attributes({"safeguard.content": "longer than four", "more": "x", "and.more": "y"})
        with pytest.raises(KeyError), trace.use_span(span, end_on_exit=True):
            raise KeyError("missing")

    telemetry, exported = _ratio_telemetry(monkeypatch, 1.0)
    ours, sdks = _as_the_sdk_makes_them(telemetry, exported, play)
    assert ours[0].dropped_attributes == sdks[0].dropped_attributes > 0
    assert ours[0].events[0].name == "exception" and ours[0].status.status_code.name == "ERROR"
    assert _without_ids_and_times(ours) == _without_ids_and_times(sdks)
    telemetry.shutdown()


def test_a_record_under_a_producers_sampled_trace_is_recorded_as_the_sdk_would(monkeypatch):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    import consumer

    producer = TracerProvider().get_tracer("t").start_span("producer")
    headers = tracing.inject(producer) + [("tracestate", b"vendor=7")]
    telemetry, exported = _ratio_telemetry(monkeypatch, 0.0)  # the parent decides, whatever the ratio
    span = telemetry.record_spans([_Record(headers)])[0]
    assert type(span) is tracing.RecordedSpan and span.is_recording()
    span.end()
    sdk_exported = InMemorySpanExporter()
    provider = TracerProvider(resource=telemetry.provider.resource, sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(sdk_exported))
    twin = provider.get_tracer("safeguard-consumer", consumer.__version__).start_span(
        "process chat", context=tracing.extract(headers), kind=SpanKind.CONSUMER, attributes=telemetry._attributes(_Record()))
    twin.end()
    ours, sdks = exported.get_finished_spans(), sdk_exported.get_finished_spans()
    assert ours[0].parent == sdks[0].parent and ours[0].parent.is_remote
    assert ours[0].context.trace_id == sdks[0].context.trace_id
    assert ours[0].context.trace_flags == sdks[0].context.trace_flags
    assert ours[0].context.trace_state == sdks[0].context.trace_state and ours[0].context.trace_state["vendor"] == "7"
    assert _without_ids_and_times(ours) == _without_ids_and_times(sdks)
    telemetry.shutdown()
