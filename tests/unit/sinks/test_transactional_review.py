"""Exactly-once with review: the transactional sink holds a record's review items with its verdict,
and the record's offset becomes committable only once every one of its outputs is held.

The sink's public interface only; its producer is never contacted (nothing is committed here:
tests/integration/test_exactly_once_review.py commits against the real broker)."""

from __future__ import annotations

from consumer.kafka.budget import OutputBudget
from consumer.kafka.offsets import OffsetTracker, OutputJoin
from consumer.sinks.kafka import TransactionalSink
from tests.unit.pipeline.test_outputs import FakeMessage

PRODUCER = {"bootstrap.servers": "127.0.0.1:9"}  # never contacted: nothing is produced before a commit
UNREAD = OutputBudget(PRODUCER, "verdicts", "dlq")
ITEM = {"review_id": "rv-1", "event": {"event_id": "e1", "content": "hi"}}


def sink_with_join() -> tuple[TransactionalSink, OffsetTracker, OutputJoin]:
    tracker = OffsetTracker()
    join = OutputJoin(tracker.done_many)
    sink = TransactionalSink(PRODUCER, "verdicts", "dlq", tracker, "tx", lambda _reason: None, budget=UNREAD,
                             on_done=join.done_many)  # fmt: skip
    return sink, tracker, join


def test_an_offset_is_not_committable_until_the_verdict_joins_its_review_items():
    sink, tracker, join = sink_with_join()
    try:
        ticket = tracker.track("chat", 3, 42, 10)
        join.expect(ticket, 3)  # a verdict and two review items, as the output step announces them
        sink.send_review_item("reviews", ITEM, FakeMessage(), ticket, [])
        sink.send_review_item("reviews", ITEM | {"review_id": "rv-2"}, FakeMessage(), ticket, [])
        assert tracker.commit_positions() == {}  # two of three outputs held: the offset waits
        assert tracker.in_flight() == 1
        sink.send_verdict({"event_id": "e1", "results": []}, FakeMessage(), ticket, [])
        assert tracker.commit_positions() == {("chat", 3): 43}  # all three held: one transaction takes them
        assert tracker.in_flight() == 0
    finally:
        sink.close()


def test_the_verdict_first_still_waits_for_the_review_items():
    sink, tracker, join = sink_with_join()
    try:
        ticket = tracker.track("chat", 3, 42, 10)
        join.expect(ticket, 2)
        sink.send_verdict({"event_id": "e1", "results": []}, FakeMessage(), ticket, [])
        assert tracker.commit_positions() == {}
        sink.send_review_item("reviews", ITEM, FakeMessage(), ticket, [])
        assert tracker.commit_positions() == {("chat", 3): 43}
    finally:
        sink.close()

