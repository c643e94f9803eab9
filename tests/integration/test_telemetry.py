"""Tracing, metrics and health against the real broker, with an in-memory span exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumer.classify.keyword import KeywordClassifier
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from tests.kafka_helpers import Collector, create_topics, event_json, http_get, produce, unique, wait_for
from tests.runner import settings_for

pytestmark = pytest.mark.kafka

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PRODUCER_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PRODUCER_SPAN_ID:016x}-01".encode()


def header(message, name: str) -> bytes | None:
    return dict(message.headers() or []).get(name)


def test_event_spans_continue_the_producer_trace_and_outputs_carry_it_on(kafka, policies_dir):
    topic, group = unique("traced"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, [event_json(1, "kys"), b"{not json"], headers=[("traceparent", TRACEPARENT)])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = settings_for(kafka, group, topic, policies_dir)
    pipeline = Pipeline(settings, KeywordClassifier(), PolicyStore(settings.policies.directory), tracer_provider=provider)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(pipeline) as running:
            messages = outputs.until(2, timeout=60)
            running.stop()
    finally:
        outputs.close()

    spans = exporter.get_finished_spans()
    events = sorted((s for s in spans if s.name == f"process {topic}"), key=lambda s: s.attributes["messaging.kafka.offset"])
    assert len(events) == 2
    for span in events:
        assert span.context.trace_id == TRACE_ID
        assert span.parent.span_id == PRODUCER_SPAN_ID  # a child of the producer's span
        assert span.attributes["messaging.system"] == "kafka"
        assert span.attributes["messaging.destination.name"] == topic
        assert span.attributes["messaging.consumer.group.name"] == group
    good, bad = events
    assert bad.attributes["error.type"] == "invalid_json"
    classify = [s for s in spans if s.name == "classify chat-harassment"]
    assert len(classify) == 1 and classify[0].parent.span_id == good.context.span_id
    assert classify[0].attributes["safeguard.policy.version"]
    assert not any("safeguard.content" in s.attributes for s in spans)  # content stays out by default

    by_offset = {}
    for message in messages:
        traceparent = header(message, "traceparent").decode()
        _, trace_id, span_id, _ = traceparent.split("-")
        by_offset[message.topic()] = (int(trace_id, 16), int(span_id, 16))
    assert by_offset[f"{topic}.verdicts"] == (TRACE_ID, good.context.span_id)
    assert by_offset[f"{topic}.dlq"] == (TRACE_ID, bad.context.span_id)


def test_metrics_count_the_run_and_readyz_turns_ready_after_assignment(kafka, policies_dir):
    topic, group = unique("metrics"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=2)
    produce(kafka, topic, [event_json(i, "kys" if i < 3 else None) for i in range(10)] + [b"{bad", b"\xff"])
    settings = settings_for(kafka, group, topic, policies_dir)
    pipeline = Pipeline(settings, KeywordClassifier(), PolicyStore(settings.policies.directory))
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(pipeline) as running:
            wait_for(lambda: pipeline.http is not None, timeout=30, message="the HTTP server")
            port = pipeline.http.port
            assert http_get(port, "/healthz")[0] == 200
            wait_for(lambda: http_get(port, "/readyz")[0] == 200, timeout=60, message="/readyz to turn ready")
            outputs.until(12, timeout=60)
            wait_for(lambda: "safeguard_dead_letters_total" in http_get(port, "/metrics")[1], timeout=10,
                     message="metrics")
            status, text = http_get(port, "/metrics")
            running.stop()
    finally:
        outputs.close()
    assert status == 200
    lines = [line for line in text.splitlines() if line.startswith("safeguard_")]

    def value(name: str, *labels: str) -> float:
        found = [float(line.rsplit(" ", 1)[1]) for line in lines
                 if line.startswith((name + "{", name + " ")) and all(label in line for label in labels)]
        assert found, f"{name} {labels} not in metrics:\\n" + "\\n".join(lines)
        return sum(found)

    assert value("safeguard_events_consumed_total", f'messaging_destination_name="{topic}"') == 12
    assert value("safeguard_verdicts_total", 'safeguard_violation="true"', 'safeguard_action="delete"') == 3
    assert value("safeguard_verdicts_total", 'safeguard_violation="false"') == 7
    assert value("safeguard_dead_letters_total", 'error_type="invalid_json"') == 1
    assert value("safeguard_dead_letters_total", 'error_type="invalid_encoding"') == 1
    assert value("safeguard_dead_letters_total", 'error_type="no_policy"') == 0  # present before it happens
    assert value("safeguard_event_duration_seconds_count") == 12
    assert value("safeguard_classify_duration_seconds_count") == 10
    # The keyword classifier answers at once (classify_now), so the batcher is idle but exported.
    assert value("safeguard_batcher_concurrency_limit") >= 1
    assert value("safeguard_batcher_in_flight_requests") == 0
    assert "otel_scope" not in text


def test_cascade_stage_shares_reach_the_metrics(kafka, policies_dir):
    pytest.importorskip("sklearn", reason="the cascade's lexical stage needs scikit-learn (requirements/cascade.txt)")
    from consumer.classify.cascade import CascadeSettings, make_cascade

    topic, group = unique("cascade-metrics"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, [event_json(i, "FREE NITRO claim now at discord-gift.xyz") for i in range(5)])
    settings = settings_for(kafka, group, topic, policies_dir, policies={"default": "spam-scams"})
    store = PolicyStore(settings.policies.directory)
    pipeline = Pipeline(settings, make_cascade(CascadeSettings(), None, store), store)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(pipeline) as running:
            outputs.until(5, timeout=60)
            wait_for(lambda: pipeline.http is not None, timeout=10, message="HTTP server")
            text = http_get(pipeline.http.port, "/metrics")[1]
            running.stop()
    finally:
        outputs.close()
    decided = {line.split("safeguard_stage=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("safeguard_cascade_decided")}
    assert decided.get("cache", 0) == 4  # the same message four more times: answered from the cache
    assert sum(decided.values()) == 5
    assert "safeguard_cascade_cache_hit_ratio{" in text


def test_healthz_fails_when_the_engine_reports_itself_unhealthy(kafka, policies_dir):
    from tests.plugins import SlowClassifier

    class DyingEngine(SlowClassifier):
        healthy = True

        async def check_health(self) -> None:
            if not self.healthy:
                raise RuntimeError("engine core died")

    topic, group = unique("health"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    settings = settings_for(kafka, group, topic, policies_dir, telemetry={"http_port": 0, "engine_health_interval_s": 0.5})
    engine = DyingEngine()
    pipeline = Pipeline(settings, engine, PolicyStore(settings.policies.directory))
    with BackgroundPipeline(pipeline) as running:
        wait_for(lambda: pipeline.http is not None and http_get(pipeline.http.port, "/healthz")[0] == 200, timeout=30,
                 message="healthy")
        engine.healthy = False
        wait_for(lambda: http_get(pipeline.http.port, "/healthz")[0] == 503, timeout=10, message="/healthz to fail")
        assert "engine core died" in http_get(pipeline.http.port, "/healthz")[1]
        running.stop()
