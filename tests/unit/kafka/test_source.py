"""The source's window: a full window that drains quickly is waited out, not paused.

A test double stands in for the Kafka consumer here (this is the unit test of one stage);
the integration tests run the source against the real broker.
"""

from __future__ import annotations

import threading
import time

from confluent_kafka import TopicPartition

from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.source import PAUSE_AFTER_S, Source


class FakeMessage:
    def __init__(self, offset: int):
        self._offset = offset

    def topic(self) -> str:
        return "chat"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return b"{}"

    def error(self) -> None:
        return None


class FakeConsumer:
    """Hands out `total` records, as many as asked for at a time; records pauses and commits."""

    def __init__(self, total: int):
        self._next, self._total = 0, total
        self.paused: list[float] = []
        self.commits: list[tuple[list[TopicPartition], bool]] = []

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        return None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        count = min(num_messages, self._total - self._next)
        if count <= 0:
            time.sleep(min(timeout, 0.01))
            return []
        batch = [FakeMessage(o) for o in range(self._next, self._next + count)]
        self._next += count
        return batch

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("chat", 0)]

    def incremental_assign(self, partitions) -> None:
        return None

    def pause(self, partitions) -> None:
        self.paused.append(time.monotonic())

    def resume(self, partitions) -> None:
        return None

    def commit(self, offsets=None, asynchronous: bool = True) -> None:
        self.commits.append((offsets, asynchronous))

    def consumer_group_metadata(self) -> None:
        return None

    def close(self) -> None:
        return None


def run_source(total: int, window: int, complete_after_s: float) -> tuple[FakeConsumer, list[int]]:
    """A source over `total` records with a `window`; each batch handed on is marked done
    `complete_after_s` later, from another thread (as delivery reports would be)."""
    consumer, tracker, seen = FakeConsumer(total), OffsetTracker(), []

    def deliver(received) -> None:
        seen.extend(message.offset() for message, _ in received)
        tickets = [ticket for _, ticket in received]
        threading.Timer(complete_after_s, tracker.done_many, args=(tickets,)).start()

    source = Source(consumer, ["chat"], tracker, deliver, on_fatal=print, max_in_flight_events=window,
                    max_in_flight_bytes=1 << 30, commit_interval_s=0.05, revoke_drain_s=0.0)  # fmt: skip
    source.start()
    deadline = time.monotonic() + 20
    while (len(seen) < total or tracker.in_flight()) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a periodic commit of the last positions
    source.close()
    return consumer, seen


def test_a_window_that_drains_quickly_is_waited_for_not_paused():
    consumer, seen = run_source(total=200, window=20, complete_after_s=0.02)
    assert seen == list(range(200))
    assert consumer.paused == []  # pausing would cost a fetch round trip after every resume


def test_a_window_full_for_longer_than_pause_after_s_pauses_the_partitions():
    consumer, seen = run_source(total=30, window=10, complete_after_s=PAUSE_AFTER_S + 0.5)
    assert seen == list(range(30))
    assert consumer.paused  # a slow classifier: pause, keep polling


def test_periodic_commits_do_not_wait_and_the_one_on_close_does():
    consumer, _ = run_source(total=50, window=100, complete_after_s=0.0)
    *periodic, last = consumer.commits
    assert periodic and all(asynchronous for _, asynchronous in periodic)
    # The double never reports a commit's outcome, so nothing counts as committed and the
    # close commits the final positions again, waiting for the broker this time.
    offsets, asynchronous = last
    assert asynchronous is False
    assert [(tp.topic, tp.partition, tp.offset) for tp in offsets] == [("chat", 0, 50)]


def test_the_commit_callback_marks_what_the_broker_accepted_and_a_failure_leaves_it_pending():
    from confluent_kafka import KafkaError

    from consumer.kafka.source import OffsetCommitter

    tracker = OffsetTracker()
    tracker.done_many(tracker.track_many([("chat", 0, 0, 1), ("chat", 1, 0, 1)]))
    committer = OffsetCommitter(tracker, commit_at=1)
    committer.committed(KafkaError(KafkaError.REQUEST_TIMED_OUT), [TopicPartition("chat", 0, 1)])
    assert tracker.commit_positions() == {("chat", 0): 1, ("chat", 1): 1}
    committer.committed(None, [TopicPartition("chat", 0, 1)])
    assert tracker.commit_positions() == {("chat", 1): 1}  # the next commit retries only partition 1
