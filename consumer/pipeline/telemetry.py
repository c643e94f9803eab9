"""Tracing, metrics and structured logs: what an on-call needs to follow one message and the system.

Tracing follows the standard `OTEL_*` environment variables: `OTEL_TRACES_EXPORTER`
(`otlp`, `console` or `none`, the default), `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, or `grpc` where the gRPC exporter is
installed) and `OTEL_TRACES_SAMPLER`. W3C `traceparent`/`tracestate`/`baggage` are read from
input record headers, so each event's span is a child of the producer's, and written into
the verdict and dead-letter headers, so downstream consumers continue the trace.

Metrics are OpenTelemetry instruments read by a Prometheus reader, beside two latency
histograms counted in plain Python (`LatencyHistogram`) in the same registry; `consumer.pipeline.http`
serves them on `/metrics`. Content and reasoning never become span attributes unless
`telemetry.trace_content` is set.
"""

from __future__ import annotations

import logging
import os
import sys
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.propagate import get_global_textmap
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind

import consumer
from consumer.errors import Fatal
from consumer.events import Headers

_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
# Seconds, Prometheus's base unit.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The batcher's figures (`Gauges.batcher` keys), one gauge each: (name, unit, description).
BATCHER_FIGURES = {
    "avg_batch_size": ("safeguard.batcher.batch_size", "", "requests per micro-batch, recent average"),
    "avg_batch_tokens": ("safeguard.batcher.batch_tokens", "", "estimated prompt tokens per micro-batch, recent average"),
    "in_flight_requests": ("safeguard.batcher.in_flight_requests", "", "requests the classifier holds"),
    "in_flight_tokens": ("safeguard.batcher.in_flight_tokens", "", "estimated KV-cache tokens of the requests in flight"),
    "concurrency_limit": ("safeguard.batcher.concurrency_limit", "", "requests the batcher lets the classifier hold"),
    "queued": ("safeguard.batcher.queued_requests", "", "requests waiting for a micro-batch"),
    "avg_queue_wait_s": ("safeguard.batcher.queue_wait", "s", "time a request waits for its micro-batch, recent average"),
}
TOKEN_KINDS = ("prompt", "cached", "completion")


class TelemetryError(Fatal, ValueError):
    """An OTEL_* setting that cannot be honoured; the CLI exits 2 with it."""


def _carrier(headers: Headers | None) -> dict[str, str]:
    carrier = {}
    for name, value in headers or ():
        if value is not None and name.lower() in _TRACE_HEADERS:
            try:
                carrier[name.lower()] = value.decode("ascii")
            except UnicodeDecodeError:
                continue  # a corrupt header must not cost the record
    return carrier


def extract(headers: Headers | None) -> Context:
    """The producer's trace context from a record's headers (empty context if none)."""
    if not headers:
        return Context()
    return get_global_textmap().extract(_carrier(headers))


def inject(span: Span) -> Headers:
    """Trace headers that make `span` the parent of whatever reads the output record."""
    if not span.get_span_context().is_valid:
        return []  # no trace to carry on (tracing off, and the input had none)
    carrier: dict[str, str] = {}
    get_global_textmap().inject(carrier, context=trace.set_span_in_context(span))
    return [(name, value.encode("ascii")) for name, value in carrier.items()]


def tracer_provider_from_env(service_name: str | None = None) -> TracerProvider | None:
    """A TracerProvider for `OTEL_TRACES_EXPORTER`, or None when tracing is off (`none`)."""
    exporters = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if e.strip()]
    if not exporters or exporters == ["none"]:
        return None
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name or "safeguard-consumer"),
         "service.version": consumer.__version__}
    )  # fmt: skip
    provider = TracerProvider(resource=resource)
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(name)))
    return provider


def _span_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise TelemetryError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r} (use otlp, console or none)")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TelemetryError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc installed"
            ) from None
        return OTLPSpanExporter()
    if protocol != "http/protobuf":
        raise TelemetryError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


@dataclass
class Gauges:
    """Callbacks the observable instruments read at scrape time (set by the pipeline)."""

    in_flight: Callable[[], int] = lambda: 0
    held_back: Callable[[], int] = lambda: 0
    lag: Callable[[], dict[tuple[str, int], int]] = dict
    batcher: Callable[[], dict[str, float]] = dict  # figure name -> value
    policy_reloads: Callable[[], int] = lambda: 0
    cascade: Callable[[], dict[str, Any]] = dict  # policy id -> consumer.classify.cascade PolicyCounters


@dataclass
class Telemetry:
    """The tracer and the metric instruments one pipeline reports to."""

    tracer: trace.Tracer
    meter: Meter
    group: str = ""
    trace_content: bool = False
    gauges: Gauges = field(default_factory=Gauges)
    provider: TracerProvider | None = None

    def __post_init__(self) -> None:
        m = self.meter
        # Counted in plain dicts on the hot path and read by observable counters at scrape time:
        # an SDK `Counter.add` per record costs more than the rest of a cheap record's handling.
        self.consumed: Counter[str] = Counter()  # by topic
        self.verdicts: Counter[tuple[str, bool, str]] = Counter()  # by (policy id, violation, action)
        self.dead_letters: Counter[str] = Counter()  # by error.type
        self.tokens: Counter[tuple[str, str]] = Counter()  # by (policy id, kind)
        m.create_observable_counter(
            "safeguard.events.consumed", [self._observe_consumed], description="records read from input topics"
        )
        m.create_observable_counter(
            "safeguard.verdicts", [self._observe_verdicts], description="verdicts by policy and outcome"
        )
        m.create_observable_counter(
            "safeguard.dead_letters", [self._observe_dead_letters], description="dead letters by error.type"
        )
        m.create_observable_counter(
            "safeguard.tokens", [self._observe_tokens], description="tokens by kind: prompt, cached, completion"
        )
        self.e2e_latency = LatencyHistogram(
            "safeguard_event_duration_seconds", "consumed to output sent", "safeguard_outcome"
        )
        self.engine_latency = LatencyHistogram(
            "safeguard_classify_duration_seconds", "one classification, queue wait included", "safeguard_policy_id"
        )
        m.create_observable_counter(
            "safeguard.policy.reloads", [self._observe_reloads], description="policy sets reloaded"
        )
        m.create_observable_gauge("safeguard.in_flight", [self._observe_in_flight], description="records in flight")
        m.create_observable_counter(
            "safeguard.outputs.held_back", [self._observe_held_back],
            description="outputs that waited for room in the producer's queue: the broker is slower than the consumer",
        )  # fmt: skip
        m.create_observable_gauge(
            "safeguard.consumer.lag", [self._observe_lag], description="messages behind the end, per partition"
        )
        for figure, (name, unit, description) in BATCHER_FIGURES.items():
            m.create_observable_gauge(name, [self._batcher_figure(figure)], unit=unit, description=description)
        m.create_observable_counter(
            "safeguard.cascade.decided", [self._observe_decided], description="events decided, by policy and stage"
        )
        for kind in ("cache_hit", "escalation", "shadow_disagreement"):
            m.create_observable_gauge(
                f"safeguard.cascade.{kind}_ratio", [self._cascade_rate(kind)],
                description=f"per policy: the {kind.replace('_', ' ')} rate (0 to 1)",
            )  # fmt: skip
        m.create_observable_gauge(
            "safeguard.cascade.calibration_error", [self._observe_calibration],
            description="expected calibration error of each learned stage, per policy",
        )  # fmt: skip

    @classmethod
    def create(
        cls,
        group: str,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        trace_content: bool = False,
        registry: Any = None,
    ) -> Telemetry:
        """`registry`: the Prometheus registry that also exposes the latency histograms."""
        from opentelemetry import metrics

        tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("safeguard-consumer", consumer.__version__)
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("safeguard-consumer", consumer.__version__)
        created = cls(tracer, meter, group=group, trace_content=trace_content, provider=tracer_provider)
        if registry is not None:
            registry.register(created.e2e_latency)
            registry.register(created.engine_latency)
        return created

    def record_span(self, message: Any) -> Span:
        """The span of one consumed record, consume to output; a child of the producer's context.

        With tracing off, the producer's own (non-recording) span stands in, so the outputs
        still carry the producer's trace context on, at no cost (and a record without headers
        costs no context at all).
        """
        headers = message.headers()
        if self.provider is None:
            return trace.get_current_span(extract(headers)) if headers else trace.INVALID_SPAN
        topic, key = message.topic(), message.key()
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(message.partition()),
            "messaging.kafka.offset": message.offset(),
            "messaging.consumer.group.name": self.group,
        }
        if key is not None:
            attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
        return self.tracer.start_span(
            f"process {topic}", context=extract(headers), kind=SpanKind.CONSUMER, attributes=attributes
        )

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()

    def _observe_consumed(self, _: CallbackOptions) -> Iterable[Observation]:
        for topic, count in list(self.consumed.items()):
            yield Observation(count, {"messaging.destination.name": topic})

    def _observe_verdicts(self, _: CallbackOptions) -> Iterable[Observation]:
        for (policy, violation, action), count in list(self.verdicts.items()):
            yield Observation(
                count,
                {"safeguard.policy.id": policy, "safeguard.violation": str(violation).lower(), "safeguard.action": action},
            )

    def _observe_dead_letters(self, _: CallbackOptions) -> Iterable[Observation]:
        for error_type, count in list(self.dead_letters.items()):
            yield Observation(count, {"error.type": error_type})

    def _observe_tokens(self, _: CallbackOptions) -> Iterable[Observation]:
        for (policy, kind), count in list(self.tokens.items()):
            yield Observation(count, {"safeguard.policy.id": policy, "safeguard.token.kind": kind})

    def _observe_held_back(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.held_back())

    def _observe_in_flight(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.in_flight())

    def _observe_lag(self, _: CallbackOptions) -> Iterable[Observation]:
        for (topic, partition), lag in self.gauges.lag().items():
            yield Observation(lag, {"messaging.destination.name": topic, "messaging.destination.partition.id": str(partition)})

    def _observe_decided(self, _: CallbackOptions) -> Iterable[Observation]:
        for policy, counters in self.gauges.cascade().items():
            for stage, count in counters.decided.items():
                yield Observation(count, {"safeguard.policy.id": policy, "safeguard.stage": stage})

    def _cascade_rate(self, kind: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            for policy, c in self.gauges.cascade().items():
                yield Observation(getattr(c, f"{kind}_rate"), {"safeguard.policy.id": policy})

        return observe

    def _observe_calibration(self, _: CallbackOptions) -> Iterable[Observation]:
        for policy, c in self.gauges.cascade().items():
            for stage, error in c.calibration_error.items():
                if error is not None:
                    yield Observation(error, {"safeguard.policy.id": policy, "safeguard.stage": stage})

    def _observe_reloads(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.policy_reloads())

    def _batcher_figure(self, figure: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            value = self.gauges.batcher().get(figure)
            if value is not None:
                yield Observation(value)

        return observe

    def expect(self, topics: Iterable[str], policies: Iterable[Any], error_types: Iterable[str]) -> None:
        """Every counter's series at 0 from the start, so a rate() or an alert on a series that
        has not happened yet (no dead letter so far) works: the named input topics, each
        policy's verdict outcomes and token kinds, every dead-letter error.type."""
        for topic in topics:
            self.consumed.setdefault(topic, 0)
        for error_type in error_types:
            self.dead_letters.setdefault(error_type, 0)
        for policy in policies:
            outcomes = {(False, policy.action_for(False, None)), (True, policy.action_for(True, None))}
            outcomes.update((True, policy.action_for(True, category)) for category in policy.categories)
            for violation, action in outcomes:
                self.verdicts.setdefault((policy.id, violation, action), 0)
            for kind in TOKEN_KINDS:
                self.tokens.setdefault((policy.id, kind), 0)


class LatencyHistogram:
    """A latency histogram by one label, counted in plain lists and exposed to Prometheus as a
    collector of the registry.

    Not an SDK Histogram: its `record` costs about 20 µs (attribute hashing, locks,
    measurement objects), more than everything else a cheaply decided record costs. Recorded
    on the event loop only; a scrape reads the lists as they are.
    """

    def __init__(self, name: str, description: str, label: str, bounds: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.name = name
        self.description = description
        self.label = label
        self.bounds = bounds
        # label value -> [count per bucket..., count above the last bound, sum of the values]
        self._series: dict[str, list[float]] = {}

    def record(self, value: float, label_value: str, count: int = 1) -> None:
        """`count` observations of `value` (a batch decided together: one call, not one per record)."""
        series = self._series.get(label_value)
        if series is None:
            series = self._series[label_value] = [0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += count  # the first bucket whose bound is >= value
        series[-1] += value * count

    def expect(self, label_value: str) -> None:
        """The series at 0 before its first observation."""
        self._series.setdefault(label_value, [0] * (len(self.bounds) + 2))

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self.name, self.description, labels=[self.label])
        for label_value, series in list(self._series.items()):
            series = list(series)
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), series[:-1]):
                cumulative += int(count)
                buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
            family.add_metric([label_value], buckets, series[-1])
        yield family


def prometheus_meter_provider() -> tuple[MeterProvider, Any]:
    """A MeterProvider whose metrics a Prometheus registry exposes; returns (provider, registry)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry

    # A registry of its own, so two pipelines in one process (tests) do not share series.
    registry = CollectorRegistry()
    # No otel_scope_* labels on every series: one scope (this consumer) says nothing.
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    return MeterProvider(metric_readers=[reader]), registry


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line, with the current trace and span ids when a span is active."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = f"{context.trace_id:032x}"
            entry["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, json_format: bool) -> None:
    import time

    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        formatter = JsonLogFormatter()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
