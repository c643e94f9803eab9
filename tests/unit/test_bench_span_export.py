"""The span export bench's sides run, and both ways of making a sampled record's spans make the same spans."""

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from bench import span_export


def test_each_side_runs_and_both_ways_make_the_same_spans():
    for name in span_export.SIDES:
        assert span_export.side(name, 30) > 0
    made = {}
    for recorder in (False, True):
        telemetry, keep = span_export._telemetry()
        span_export._make(telemetry, [span_export._Record(i) for i in range(3)], recorder=recorder)
        request = encode_spans(keep.spans)
        for span in request.resource_spans[0].scope_spans[0].spans:
            span.trace_id = span.span_id = span.parent_span_id = b""
            span.start_time_unix_nano = span.end_time_unix_nano = 0
        made[recorder] = request
    assert made[True] == made[False]
    assert len(made[True].resource_spans[0].scope_spans[0].spans) == 6
