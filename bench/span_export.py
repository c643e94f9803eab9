"""A sampled record's tracing alone: its two spans made, and encoded for OTLP, the SDK's way and ours.

At the deployed 1%, one record in a hundred is sampled: the span of the record and the span of its
classification, made and ended, then encoded (and sent) by the batch span processor's thread. This
bench measures those two steps per sampled record, each way in a process of its own, no Kafka:

- make, SDK: the SDK tracer's spans, as `Telemetry` made them before `SpanRecorder`
  (`start_span`, the attributes set once the span records, the child through the tracer);
- make, recorder: `Telemetry.record_spans` at a ratio of 1 (every root sampled, made by
  `tracing.SpanRecorder`) and `tracing.start_child`, as the pipeline makes them now;
- encode, SDK: `encode_spans(batch).SerializePartialToString()`, what the OTLP exporters run;
- encode, ours: `otlp_encoding.SpanEncoder.encode_request(batch)`, what `run`'s exporter runs;

both in batches of 512 spans (the batch span processor's). Timing alternates the sides round by
round (CPU µs per record, medians); `--instructions` counts them under callgrind at two sizes
(the difference over the difference, start-up cancelled), which this VM's noise does not move.

    python -m bench.span_export
    python -m bench.span_export --instructions      # about a minute
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import callgrind
from bench.workload import REPO, mark_window

SIDES = ("make-sdk", "make-recorder", "encode-sdk", "encode-ours")
BATCH = 512  # spans an export (the batch span processor's default)


class _Record:
    """What a consumed record's span reads of it."""

    def __init__(self, offset: int):
        self._offset = offset

    def headers(self) -> None:
        return None

    def topic(self) -> str:
        return "chat"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"channel-%d" % (self._offset % 50)


class _Keep:
    """A span processor that keeps the ended spans (the batch span processor's queue, without its thread)."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def _on_ending(self, span: Any) -> None:
        return None

    def on_end(self, span: Any) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_POLICY = {"safeguard.policy.id": "chat-harassment", "safeguard.policy.version": "3"}
_DESCRIBED = {"safeguard.model": "keyword", "gen_ai.usage.input_tokens": 0, "gen_ai.usage.output_tokens": 0,
              "safeguard.cached_tokens": 0, "safeguard.violation": False}  # fmt: skip
_VERDICT = {"safeguard.violation": False, "safeguard.action": "allow"}


def _telemetry() -> tuple[Any, _Keep]:
    """A pipeline's telemetry as `run` builds it at a ratio of 1, its spans kept."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from consumer.pipeline.telemetry import Telemetry
    from consumer.pipeline.telemetry.tracing import TRACER_SCOPE, RecordTracerProvider

    ratio = TraceIdRatioBased(1.0)
    provider = RecordTracerProvider(ratio, True, TRACER_SCOPE, resource=Resource.create({"service.name": "bench"}),
                                    sampler=ParentBased(ratio))  # fmt: skip
    keep = _Keep()
    provider.add_span_processor(keep)  # type: ignore[arg-type]
    return Telemetry.create("bench", meter_provider=MeterProvider(), tracer_provider=provider), keep


def _make(telemetry: Any, records: list[_Record], recorder: bool) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from consumer.pipeline.telemetry.tracing import start_child

    tracer = telemetry.tracer
    for record in records:
        if recorder:
            span = telemetry.record_spans([record])[0]
        else:
            span = tracer.start_span("process chat", context=None, kind=SpanKind.CONSUMER)
            span.set_attributes(telemetry._attributes(record))
        span.set_attribute("safeguard.event_id", f"evt-{record.offset()}")
        started = time.time_ns()
        if recorder:
            child = start_child(tracer, span, "classify chat-harassment", {**_POLICY, **_DESCRIBED}, started)
        else:
            child = tracer.start_span("classify chat-harassment", context=trace.set_span_in_context(span),
                                      attributes=dict(_POLICY), start_time=started)  # fmt: skip
            child.set_attributes(_DESCRIBED)
        child.end()
        span.set_attributes(_VERDICT)
        span.end()


def side(name: str, records: int) -> float:
    """Run one side on `records` sampled records in this process; CPU µs a record (its window marked)."""
    telemetry, keep = _telemetry()
    batch = [_Record(i) for i in range(records)]
    _make(telemetry, [_Record(i) for i in range(20)], recorder=True)  # warm both ways' code
    _make(telemetry, [_Record(i) for i in range(20)], recorder=False)
    if name.startswith("encode"):
        _make(telemetry, batch, recorder=True)
    spans, keep.spans = keep.spans[40:], []
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from consumer.pipeline.telemetry.otlp_encoding import SpanEncoder

    encoder = SpanEncoder()
    encoder.encode_request(spans[:10])
    mark_window()
    started = time.thread_time()
    if name == "make-sdk":
        _make(telemetry, batch, recorder=False)
    elif name == "make-recorder":
        _make(telemetry, batch, recorder=True)
    else:
        for at in range(0, len(spans), BATCH):
            if name == "encode-sdk":
                encode_spans(spans[at : at + BATCH]).SerializePartialToString()
            else:
                encoder.encode_request(spans[at : at + BATCH])
    spent = time.thread_time() - started
    mark_window()
    return spent * 1e6 / records


def _run_side(name: str, records: int) -> float:
    done = subprocess.run([sys.executable, "-m", "bench.span_export", "--side", name, str(records)], cwd=REPO,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return float(done.stdout.split()[-1])


def _count(name: str, folder: Path) -> float:
    counts = []
    for records in callgrind.SIZES:
        out = folder / f"{name}-{records}.callgrind"
        command = [sys.executable, "-m", "bench.span_export", "--side", name, str(records)]
        counts.append(callgrind.count_window(command, REPO, {"PYTHONPATH": str(REPO)}, out, timeout=900))
    return callgrind.per_event((counts[0], counts[1]), callgrind.SIZES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.span_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="sampled records a round (timing)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="count instructions under valgrind instead")
    parser.add_argument("--side", nargs=2, metavar=("SIDE", "RECORDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(f"{side(args.side[0], int(args.side[1])):.3f}")
        return 0
    if args.instructions:
        if not callgrind.available():
            parser.error(f"--instructions {callgrind.MISSING}")
        with tempfile.TemporaryDirectory(prefix="span-export-") as folder:
            figures = {name: _count(name, Path(folder)) for name in SIDES}
        unit, fmt = "instructions a sampled record", "{:10.0f}"
    else:
        runs: dict[str, list[float]] = {name: [] for name in SIDES}
        for _ in range(args.rounds):
            for name in SIDES:
                runs[name].append(_run_side(name, args.records))
        figures = {name: statistics.median(values) for name, values in runs.items()}
        unit, fmt = f"CPU µs a sampled record (median of {args.rounds} rounds)", "{:10.1f}"
    print(f"{unit}: two spans (the record's, its classification's), batches of {BATCH} to encode")
    for name in SIDES:
        print(f"  {name:14s} {fmt.format(figures[name])}")
    print(f"  make: recorder / SDK {figures['make-recorder'] / figures['make-sdk']:.2f}; "
          f"encode: ours / SDK {figures['encode-ours'] / figures['encode-sdk']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
