"""Telemetry: what an on-call needs to follow one message and the system, in three roles.

- `tracing`: W3C trace context through the records' headers and the tracer the `OTEL_*`
  variables ask for;
- `metrics`: the pipeline's counters, gauges and latency histograms, and the figures a stage
  declares for itself (`Figure`);
- `logs`: JSON log lines carrying the current trace and span ids.

`Telemetry` is what one pipeline reports to: its tracer and its metric instruments. Content and
reasoning never become span attributes unless `telemetry.trace_content` is set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind

import consumer
from consumer.pipeline.telemetry.metrics import PipelineMetrics
from consumer.pipeline.telemetry.tracing import RootSampling, UnsampledSpan, extract

_ROOT = Context()  # the parent of a record without headers (a Context is immutable: one will do)


@dataclass
class Telemetry(PipelineMetrics):
    """The tracer and the metric instruments one pipeline reports to."""

    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    group: str = ""
    trace_content: bool = False
    provider: TracerProvider | None = None
    roots: RootSampling | None = None  # the provider's ratio sampler's roots, decided without the SDK

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
        roots = getattr(tracer_provider, "roots", None)  # a RecordTracerProvider's (tracing from OTEL_*)
        created = cls(meter, tracer=tracer, group=group, trace_content=trace_content, provider=tracer_provider,
                      roots=roots)  # fmt: skip
        if registry is not None:
            registry.register(created.e2e_latency)
            registry.register(created.engine_latency)
        return created

    def record_spans(self, messages: Sequence[Any]) -> list[Span]:
        """The span of each consumed record of a poll batch, consume to output; a child of the
        producer's context.

        With tracing off, the producer's own (non-recording) span stands in, so the outputs
        still carry the producer's trace context on, at no cost (and a record without headers
        costs no context at all). A record that the ratio sampler does not sample, without a parent
        or under a producer's trace that is not sampled, gets its non-recording span from `roots`,
        without the SDK; the batch's roots are decided at once, and the span of a sampled root, or of
        a record under a sampled parent that a parent-based sampler follows, is made by
        `roots.recorder` (`tracing.SpanRecorder`). The attributes are set once a span records: the
        samplers the SDK ships do not read them.
        """
        if self.provider is None:
            return [trace.get_current_span(extract(h)) if (h := m.headers()) else trace.INVALID_SPAN for m in messages]
        roots = self.roots
        spans: list[Span] = []
        drawn: list[UnsampledSpan | int] = []
        for message in messages:
            headers = message.headers()
            context = _ROOT  # a root, whatever span is current
            if headers:
                unsampled = roots.unsampled_child(headers) if roots is not None else None
                if unsampled is not None:
                    spans.append(unsampled)
                    continue
                context = extract(headers)
                parent = trace.get_current_span(context).get_span_context()
                if parent.is_valid:
                    if roots is not None and roots.follows(parent):
                        spans.append(roots.recorder.under(parent, f"process {message.topic()}", SpanKind.CONSUMER,
                                                          self._attributes(message), time.time_ns()))  # fmt: skip
                    else:
                        spans.append(self._start(message, context))
                    continue
            if roots is not None:  # a root: decided here
                if not drawn:
                    drawn = roots.roots(len(messages))
                root = drawn.pop()
                if type(root) is not int:
                    spans.append(root)
                else:
                    spans.append(roots.recorder.root(root, f"process {message.topic()}", SpanKind.CONSUMER,
                                                     self._attributes(message)))  # fmt: skip
                continue
            spans.append(self._start(message, context))
        return spans

    def _start(self, message: Any, context: Context) -> Span:
        topic = message.topic()
        span = self.tracer.start_span(f"process {topic}", context=context, kind=SpanKind.CONSUMER)
        if span.is_recording():
            span.set_attributes(self._attributes(message))
        return span

    def _attributes(self, message: Any) -> dict[str, Any]:
        """A sampled record's span's attributes (OpenTelemetry's messaging conventions)."""
        key = message.key()
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": message.topic(),
            "messaging.destination.partition.id": str(message.partition()),
            "messaging.kafka.offset": message.offset(),
            "messaging.consumer.group.name": self.group,
        }
        if key is not None:
            attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
        return attributes

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
