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
