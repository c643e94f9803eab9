"""Tracing: W3C trace context carried through the records' headers, and the tracer provider the
standard `OTEL_*` environment variables ask for.

`OTEL_TRACES_EXPORTER` (`otlp`, `console` or `none`, the default), `OTEL_SERVICE_NAME`,
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, or `grpc` where
the gRPC exporter is installed) and `OTEL_TRACES_SAMPLER`. `traceparent`/`tracestate`/`baggage`
are read from input record headers, so each event's span is a child of the producer's, and
written into the verdict and dead-letter headers, so downstream consumers continue the trace.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span

import consumer
from consumer.errors import Fatal
from consumer.events import Headers

_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


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
