"""Bounded reads: the records between two offsets of some partitions, outside any consumer group.

Used to rebuild state from a topic's recent past (chat context, offender counts) and to read
a topic's outputs back (backtests). The reader is assigned its partitions, belongs to no
group and commits nothing, so it never disturbs the consumers of the same topics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from consumer.kafka.poll import POLL_BATCH

# (topic, partition, start, end): the records [start, end) of one partition
OffsetSpan = tuple[str, int, int, int]


def read_ranges(config: dict[str, Any], ranges: list[OffsetSpan], timeout: float = 30.0) -> list[Message]:
    """Records [start, end) of each (topic, partition, start, end), read with an assigned consumer
    that belongs to no group and commits nothing; start is clamped to the earliest retained offset."""
    return list(iter_ranges(config, ranges, timeout))


def iter_ranges(
    config: dict[str, Any],
    ranges: list[OffsetSpan],
    timeout: float | None = None,
    group_id: str = "safeguard-tail-reader",
) -> Iterator[Message]:
    """`read_ranges` as the records arrive, for reads too long to hold in memory (a whole topic).

    Without `timeout`, reads until every range is done; with it, stops at the deadline with
    what was read. `group_id` only names the reader: it never joins the group nor commits."""
    wanted = [r for r in ranges if r[3] > r[2]]
    if not wanted:
        return
    reader = Consumer({**config, "group.id": group_id, "enable.auto.commit": False,
                       "enable.partition.eof": True})  # fmt: skip
    try:
        assignment, remaining = [], {}
        for topic, partition, start, end in wanted:
            low, _ = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            start = max(start, low)
            if start < end:
                assignment.append(TopicPartition(topic, partition, start))
                remaining[(topic, partition)] = end
        reader.assign(assignment)
        deadline = None if timeout is None else time.monotonic() + timeout
        while remaining and (deadline is None or time.monotonic() < deadline):
            for message in reader.consume(POLL_BATCH, timeout=0.5):
                key = (message.topic(), message.partition())
                end = remaining.get(key)
                error = message.error()
                if error is not None:
                    # End of the partition at or past END: what is left below END are transaction markers.
                    if error.code() == KafkaError._PARTITION_EOF and end is not None and message.offset() >= end:
                        del remaining[key]
                    continue
                if end is None or message.offset() >= end:
                    continue
                yield message
            # By position, not by last offset seen: transaction markers occupy offsets too.
            for (topic, partition), end in list(remaining.items()):
                if reader.position([TopicPartition(topic, partition)])[0].offset >= end:
                    del remaining[(topic, partition)]
    finally:
        reader.close()


def assign_from_earliest(consumer: Any, topics: tuple[str, ...] | list[str]) -> dict[tuple[str, int], int]:
    """Assign every partition of `topics` to `consumer` (no group) from its earliest offset, to
    read the topics whole and then follow them; returns the end offsets, now, of the partitions
    that hold records. A topic that cannot be described raises RuntimeError naming it."""
    assignment, ends = [], {}
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise RuntimeError(f"topic {topic!r} is not available: {metadata.error if metadata else 'unknown'}")
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            assignment.append(TopicPartition(topic, partition, low))
            if high > low:
                ends[(topic, partition)] = high
    consumer.assign(assignment)
    return ends
