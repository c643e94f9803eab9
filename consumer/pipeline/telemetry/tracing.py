"""Tracing: W3C trace context carried through the records' headers, and the tracer provider the
standard `OTEL_*` environment variables ask for.

`OTEL_TRACES_EXPORTER` (`otlp`, `console` or `none`, the default), `OTEL_SERVICE_NAME`,
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, or `grpc` where
the gRPC exporter is installed) and `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`
(production: `parentbased_traceidratio` and a ratio such as 0.01). `traceparent`/`tracestate`/
`baggage` are read from input record headers, so each event's span is a child of the producer's,
and written into the verdict and dead-letter headers, so downstream consumers continue the trace.

Records that are not sampled cost next to nothing: with a ratio sampler from the environment,
a record without a parent is decided here (`RootSampling`: the same test of the trace id as
`TraceIdRatioBased`), and one that is not sampled gets an `UnsampledSpan` and its `traceparent`
without the SDK's span machinery (the SDK's way: about 15 µs a record at a 1% ratio, more than
the rest of a keyword-decided record's handling); a sampled one gets a `RecordedSpan` from
`SpanRecorder` with the trace id decided here, as does a record under a producer's sampled trace
with a parent-based sampler. A record whose producer's trace is not sampled (its `traceparent` in
the plain W3C form, no `tracestate`) gets its `UnsampledSpan` the same way, without the propagator
and the SDK (13.5 -> 3 µs a record in a micro-benchmark). Sampled spans go out through the SDK's
OTLP/HTTP exporter with `otlp_encoding`'s encoder.
"""

from __future__ import annotations

import binascii
import os
import random
import re
import time
import traceback
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context, get_current
from opentelemetry.propagate import get_global_textmap
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

import consumer
from consumer.errors import Fatal
from consumer.events import Headers

_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
TRACER_SCOPE = InstrumentationScope("safeguard-consumer", consumer.__version__)  # the pipeline's tracer's


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


# The propagators OpenTelemetry sets up when OTEL_PROPAGATORS asks for W3C's (the default): their
# headers are written here directly, as long as nobody installed others since.
_W3C_PROPAGATORS = ("tracecontext,baggage", "tracecontext")
_W3C_TEXTMAP = (
    get_global_textmap()
    if os.environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").replace(" ", "") in _W3C_PROPAGATORS
    else None
)


def _writes_w3c() -> bool:
    """True when the headers `inject` writes are W3C's alone, from the span's ids."""
    return get_global_textmap() is _W3C_TEXTMAP and not get_current()


def inject(span: Span) -> Headers:
    """Trace headers that make `span` the parent of whatever reads the output record."""
    # _writes_w3c(), written out: 99 records in 100 take this way, and a call each was counted.
    if type(span) is UnsampledSpan and get_global_textmap() is _W3C_TEXTMAP and not get_current():
        return [("traceparent", span.traceparent)]
    context = span.get_span_context()
    if not context.is_valid:
        return []  # no trace to carry on (tracing off, and the input had none)
    if _writes_w3c():
        # What TraceContextTextMapPropagator writes, without a Context and a carrier per record; an
        # empty current context has no baggage to carry.
        parent = b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, int(context.trace_flags))
        if context.trace_state:
            return [("traceparent", parent), ("tracestate", context.trace_state.to_header().encode("ascii"))]
        return [("traceparent", parent)]
    carrier: dict[str, str] = {}
    get_global_textmap().inject(carrier, context=trace.set_span_in_context(span))
    return [(name, value.encode("ascii")) for name, value in carrier.items()]


# The traceparent that producers write (version 00, lower-case hex, nothing around it). Any other
# form takes the propagator's way, which knows them all.
_PLAIN_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NO_SPAN_ID = b"0" * 16
_CHILD_FLAGS = {0: TraceFlags(TraceFlags.DEFAULT), TraceFlags.RANDOM_TRACE_ID: TraceFlags(TraceFlags.RANDOM_TRACE_ID)}


class RootSampling:
    """A ratio sampler's decision for a root span (a record without a parent), taken before the
    SDK is asked: `TraceIdRatioBased`'s own test of the trace id. `roots()` gives the span of each
    record that is not sampled, and the trace id of a sampled one, whose span `recorder` starts.
    `unsampled_child` is the same shortcut for a record whose producer's trace is not sampled."""

    def __init__(self, sampler: TraceIdRatioBased, parent_based: bool, recorder: SpanRecorder):
        self._bound = sampler.bound
        self._limit = TraceIdRatioBased.TRACE_ID_LIMIT
        self._parent_based = parent_based
        self.recorder = recorder
        flags = TraceFlags.DEFAULT | TraceFlags.RANDOM_TRACE_ID  # the trace ids are random (W3C level 2)
        self._unsampled = b"00-%%b%%b-%%b-%02x" % flags  # an unsampled root's traceparent, for its ids
        # The bound as 16 hex digits, compared with the trace id's last 16; None: every root sampled.
        self._bound_hex = b"%016x" % self._bound if self._bound <= self._limit else None

    def unsampled_child(self, headers: Headers) -> UnsampledSpan | None:
        """The span the SDK would start under the producer's trace in `headers` when it would not
        sample it (`ParentBased`: the parent is not sampled; a plain ratio: the trace id fails its
        test). None where the SDK must decide: no traceparent, a sampled one, a tracestate to carry
        on, another propagator, or a traceparent in any but the plain form."""
        if get_global_textmap() is not _W3C_TEXTMAP:
            return None
        parent = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == "traceparent":
                parent = value  # the last one counts, as in the propagator's carrier
            elif lowered == "tracestate":
                return None
        match = _PLAIN_TRACEPARENT.fullmatch(parent) if parent is not None else None
        if match is None:
            return None
        trace_id, flags = int(match[1], 16), int(match[3], 16)
        if not trace_id or match[2] == _NO_SPAN_ID:
            return None  # invalid: the propagator ignores it, the record starts a trace of its own
        sampled = flags & TraceFlags.SAMPLED if self._parent_based else trace_id & self._limit < self._bound
        if sampled:
            return None
        # The SDK's flags for a span it does not sample: the parent's random-trace-id bit, nothing else.
        own = _CHILD_FLAGS[flags & TraceFlags.RANDOM_TRACE_ID]
        span_id = random.getrandbits(64) or RandomIdGenerator().generate_span_id()
        return UnsampledSpan(b"00-%032x-%016x-%02x" % (trace_id, span_id, own))

    def follows(self, parent: SpanContext) -> bool:
        """Whether the sampler samples a span under `parent` (valid) because the parent is:
        `ParentBased`'s, for a sampled parent. Otherwise the SDK decides."""
        return self._parent_based and parent.trace_flags.sampled

    def roots(self, n: int) -> list[UnsampledSpan | int]:
        """`n` new roots, decided at once (a poll batch's records without a parent): for each,
        the `UnsampledSpan` of a root the ratio does not sample, or the trace id of one it does
        (for `recorder.root`). The ids come from one draw of random bytes and are tested and written
        as hex, without an integer per record: an unsampled record's span, header and end cost
        1.1 µs against 1.9 one by one (`bench/tracing_records.py`)."""
        raw = random.randbytes(24 * n)  # a trace id (16 bytes) and a span id (8) each
        while b"\0" * 8 in raw:  # an id of zeros is invalid: draw again (about never)
            raw = random.randbytes(24 * n)
        # 8 bytes a group: a trace id's high and low halves, then the span id, in 16 hex digits each.
        groups = iter(binascii.hexlify(raw, b"-", 8).split(b"-"))
        bound, unsampled = self._bound_hex, self._unsampled
        roots: list[UnsampledSpan | int] = []
        for high, low, span_id in zip(groups, groups, groups):
            # TraceIdRatioBased's test, trace_id & TRACE_ID_LIMIT < bound, on the last 16 hex digits.
            if bound is None or low < bound:
                roots.append(int(high + low, 16))
            else:
                roots.append(UnsampledSpan(unsampled % (high, low, span_id)))
        return roots


class UnsampledSpan(Span):
    """A span that is not sampled: what the SDK's `NonRecordingSpan` is, held as the `traceparent`
    that `inject` writes; its `SpanContext` (a validated tuple) is made only when asked for."""

    __slots__ = ("traceparent",)

    def __init__(self, traceparent: bytes):
        self.traceparent = traceparent  # b"00-<trace id>-<span id>-<flags>", lower-case hex

    def get_span_context(self) -> SpanContext:
        parent = self.traceparent
        return SpanContext(int(parent[3:35], 16), int(parent[36:52], 16), is_remote=False,
                           trace_flags=TraceFlags(int(parent[53:55], 16)))  # fmt: skip

    def is_recording(self) -> bool:
        return False

    def end(self, end_time: int | None = None) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        pass

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        pass

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        pass

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        pass

    def __repr__(self) -> str:
        return f"UnsampledSpan({self.get_span_context()!r})"


_SAMPLED = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_UNSET = Status(StatusCode.UNSET)


class SpanRecorder:
    """Makes the sampled spans of records (without a parent, or under a producer's sampled trace
    with a parent-based sampler), and of their classifications, without the SDK's `Span`: what the
    SDK's tracer would make of them (the ratio sampler has decided; a child of a sampled span is
    sampled) at about a quarter of its cost (`bench/span_export.py`), its attribute checks (the attributes are the pipeline's own, of known types) and locks (a record's
    spans live on the event loop) left out. An ended span goes to the provider's span processors as
    the `ReadableSpan` the SDK's would give them, within the provider's `SpanLimits`."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, processors: list[SpanProcessor],
                 limits: SpanLimits):  # fmt: skip
        self.resource = resource
        self.scope = scope
        self.processors = processors  # the provider's, as it adds them
        self.limits = limits
        self._checked = limits.max_span_attribute_length is not None  # else only the count is bounded

    def root(self, trace_id: int, name: str, kind: SpanKind, attributes: dict[str, types.AnyValue]) -> RecordedSpan:
        """The span of a record whose trace starts here, sampled, with `trace_id`."""
        context = SpanContext(trace_id, _span_id(), is_remote=False, trace_flags=_SAMPLED)
        return RecordedSpan(self, name, context, None, kind, attributes, time.time_ns())

    def under(self, parent: SpanContext, name: str, kind: SpanKind, attributes: dict[str, types.AnyValue],
              start_time: int) -> RecordedSpan:  # fmt: skip
        """A sampled span under `parent` (sampled): the trace's id and state, the parent's
        random-trace-id bit, as the SDK's ParentBased sampler and tracer give it."""
        flags = TraceFlags(TraceFlags.SAMPLED | (parent.trace_flags & TraceFlags.RANDOM_TRACE_ID))
        context = SpanContext(parent.trace_id, _span_id(), is_remote=False, trace_flags=flags,
                              trace_state=parent.trace_state)  # fmt: skip
        return RecordedSpan(self, name, context, parent, kind, attributes, start_time)

    def finish(self, span: RecordedSpan, end_time: int) -> None:
        attributes: types.Attributes = span._attributes
        bound = self.limits.max_span_attributes
        if self._checked or (bound is not None and len(span._attributes) > bound):
            attributes = BoundedAttributes(bound, span._attributes, immutable=True,
                                           max_value_len=self.limits.max_span_attribute_length)  # fmt: skip
        ended = ReadableSpan(
            name=span._name, context=span._context, parent=span._parent, resource=self.resource,
            attributes=attributes, events=span._events or (), kind=span._kind, status=span._status,
            start_time=span._start_time, end_time=end_time, instrumentation_scope=self.scope,
        )  # fmt: skip
        for processor in self.processors:
            processor.on_end(ended)


def _span_id() -> int:
    return random.getrandbits(64) or RandomIdGenerator().generate_span_id()  # 0 is not a span id


class RecordedSpan(Span):
    """A sampled span `SpanRecorder` made; the SDK span's behaviour (`set_status`, events, what an
    ended span ignores) for what the pipeline does with it."""

    __slots__ = ("_recorder", "_name", "_context", "_parent", "_kind", "_attributes", "_start_time", "_status",
                 "_events", "_ended")  # fmt: skip

    def __init__(self, recorder: SpanRecorder, name: str, context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, attributes: dict[str, types.AnyValue], start_time: int):  # fmt: skip
        self._recorder = recorder
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._start_time = start_time
        self._status = _UNSET
        self._events: BoundedList | None = None
        self._ended = False

    def child(self, name: str, attributes: dict[str, types.AnyValue], start_time: int) -> RecordedSpan:
        """A span under this one (sampled as this one is), of kind internal."""
        return self._recorder.under(self._context, name, SpanKind.INTERNAL, attributes, start_time)

    @property
    def name(self) -> str:
        return self._name

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if not self._ended:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if not self._ended:
            self._attributes.update(attributes)

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended or self._status.status_code is StatusCode.OK:
            return  # as the SDK's: OK is final
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._ended:
            return
        limits = self._recorder.limits
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(limits.max_event_attributes, attributes, immutable=True,
                                    max_value_len=limits.max_attribute_length)  # fmt: skip
        self._events.append(Event(name, bounded, timestamp))

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module, qualname = type(exception).__module__, type(exception).__qualname__
        recorded: dict[str, types.AnyValue] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", {**recorded, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._recorder.finish(self, end_time if end_time is not None else time.time_ns())

    def __repr__(self) -> str:
        return f"RecordedSpan({self._name!r}, {self._context!r})"


def start_child(tracer: trace.Tracer, parent: Span, name: str, attributes: dict[str, types.AnyValue],
                start_time: int) -> Span:  # fmt: skip
    """A span under `parent` (of kind internal): `SpanRecorder`'s under one of its spans, else the
    tracer's."""
    if type(parent) is RecordedSpan:
        return parent.child(name, attributes, start_time)
    return tracer.start_span(name, context=trace.set_span_in_context(parent), attributes=attributes,
                             start_time=start_time)  # fmt: skip


class RecordTracerProvider(TracerProvider):
    """The provider `tracer_provider_from_env` builds; with a ratio sampler, `roots` decides the
    roots and its `recorder` makes the sampled ones."""

    def __init__(self, ratio: TraceIdRatioBased | None, parent_based: bool, scope: InstrumentationScope,
                 **kwargs: Any):  # fmt: skip
        limits = SpanLimits()
        super().__init__(span_limits=limits, **kwargs)
        self._processors: list[SpanProcessor] = []
        recorder = SpanRecorder(self.resource, scope, self._processors, limits)
        self.roots = RootSampling(ratio, parent_based, recorder) if ratio is not None else None

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self._processors.append(span_processor)


def tracer_provider_from_env(service_name: str | None = None) -> TracerProvider | None:
    """A TracerProvider for `OTEL_TRACES_EXPORTER`, or None when tracing is off (`none`)."""
    exporters = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if e.strip()]
    if not exporters or exporters == ["none"]:
        return None
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name or "safeguard-consumer"),
         "service.version": consumer.__version__}
    )  # fmt: skip
    sampler, ratio = _sampler_from_env()
    provider = RecordTracerProvider(ratio, isinstance(sampler, ParentBased), TRACER_SCOPE, resource=resource,
                                    sampler=sampler)  # fmt: skip
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(name)))
    return provider


def _sampler_from_env() -> tuple[Sampler | None, TraceIdRatioBased | None]:
    """The sampler OTEL_TRACES_SAMPLER names, and its ratio sampler for roots where it has one.
    None: the SDK reads the variables itself (the other samplers)."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name not in ("traceidratio", "parentbased_traceidratio"):
        return None, None
    arg = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    try:
        ratio = TraceIdRatioBased(float(arg))
    except ValueError:  # the SDK would fall back to 1.0 quietly: every record traced
        raise TelemetryError(f"OTEL_TRACES_SAMPLER_ARG: {arg!r} is not a ratio between 0 and 1") from None
    return (ParentBased(ratio) if name.startswith("parentbased") else ratio), ratio


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
    from consumer.pipeline.telemetry.otlp_encoding import SpanExporter as OTLPHTTPSpanExporter

    return OTLPHTTPSpanExporter()
