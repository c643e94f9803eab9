"""bench/tracing_records: a side runs in a process of its own, on its checkout's package."""

from __future__ import annotations

from bench import tracing_records


def test_a_side_measures_its_checkouts_unsampled_records():
    figure = tracing_records._side(tracing_records.REPO, records=2000, batch=500)
    assert 0 < figure < 1000  # µs a record: a figure, not a failure's output
