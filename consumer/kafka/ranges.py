"""Bounded reads: the records between two offsets of some partitions, outside any consumer group.

Used to rebuild state from a topic's recent past (chat context, offender counts) and to read
a topic's outputs back (backtests). The reader is assigned its partitions, belongs to no
group and commits nothing, so it never disturbs the consumers of the same topics.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition


def read_ranges(config: dict[str, Any], ranges: list[tuple[str, int, int, int]], timeout: float = 30.0) -> list[Message]:
    """Records [start, end) of each (topic, partition, start, end), read with an assigned consumer
    that belongs to no group and commits nothing; start is clamped to the earliest retained offset."""
    wanted = [r for r in ranges if r[3] > r[2]]
    if not wanted:
        return []
    reader = Consumer({**config, "group.id": "safeguard-tail-reader", "enable.auto.commit": False,
                       "enable.partition.eof": False})  # fmt: skip
    try:
        assignment, remaining = [], {}
        for topic, partition, start, end in wanted:
            low, _ = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            start = max(start, low)
            if start < end:
                assignment.append(TopicPartition(topic, partition, start))
                remaining[(topic, partition)] = end
        reader.assign(assignment)
        found: list[Message] = []
        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            for message in reader.consume(500, timeout=0.5):
                if message.error() is not None:
                    continue
                key = (message.topic(), message.partition())
                end = remaining.get(key)
                if end is None or message.offset() >= end:
                    continue
                found.append(message)
            # By position, not by last offset seen: transaction markers occupy offsets too.
            for (topic, partition), end in list(remaining.items()):
                if reader.position([TopicPartition(topic, partition)])[0].offset >= end:
                    del remaining[(topic, partition)]
        return found
    finally:
        reader.close()
