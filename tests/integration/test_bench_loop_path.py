"""bench/loop_path: the keyword case's pipeline from memory to memory gives every record its
output through the pipeline's own source and sink roles, its figures measured from the window
the bench marks (the broker serves the pipeline's start-up only)."""

from __future__ import annotations

import pytest

from bench import loop_path
from bench.workload import Spec
from tests.kafka_helpers import create_topics, unique

pytestmark = pytest.mark.kafka


def test_a_side_runs_the_keyword_pipeline_from_memory_to_memory(kafka: str) -> None:
    out, dlq = unique("loop-out"), unique("loop-dlq")
    create_topics(kafka, out, dlq)
    result = loop_path.side("keyword", Spec(kafka, unique("loop-in"), out, dlq, unique("loop-path"), 1200))
    assert (result["verdicts"], result["dead_letters"]) == (1200, 0)
    assert result["events"] == 1200 and result["cpu_us_main"] > 0


def test_the_records_are_spread_over_the_partitions_in_order() -> None:
    records = loop_path.messages(3000, "chat")
    by_partition: dict[int, list[int]] = {}
    for record in records:
        by_partition.setdefault(record.partition(), []).append(record.offset())
    assert sorted(by_partition) == list(range(loop_path.PARTITIONS))
    assert all(offsets == list(range(len(offsets))) for offsets in by_partition.values())
    assert records[0].timestamp()[0] == 1 and records[0].value().startswith(b"{")
