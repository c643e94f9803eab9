"""The in-flight window bounds what a crash redoes: delivered records count until committed.

The source runs against the test double of tests/unit/test_source.py here; the SIGKILL
tests of tests/integration/test_crash_bounds.py measure the bound against the real broker.
"""

from __future__ import annotations

import threading
import time

from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.source import Source
from tests.unit.kafka.test_source import FakeConsumer


def test_delivered_records_count_in_the_window_until_their_commit():
    tracker = OffsetTracker()
    tickets = tracker.track_many([("chat", 0, offset, 10) for offset in range(4)])
    tracker.done_many(tickets[:3])
    assert (tracker.in_flight(), tracker.uncommitted(), tracker.committable()) == (1, 4, 3)
    assert tracker.wait_for_room(4, 1 << 20, timeout=0.01) is False  # a crash now would redo 4 records
    tracker.mark_committed(tracker.commit_positions())
    assert (tracker.uncommitted(), tracker.committable()) == (1, 0)
    assert tracker.wait_for_room(4, 1 << 20, timeout=0.01) is True


def test_records_done_above_a_gap_count_too_and_a_revoke_releases_them():
    tracker = OffsetTracker()
    tickets = tracker.track_many([("chat", 0, offset, 10) for offset in range(3)])
    tracker.done_many(tickets[1:])  # offset 0 is still being classified
    assert (tracker.uncommitted(), tracker.committable(), tracker.commit_positions()) == (3, 0, {})
    tracker.forget([("chat", 0)])
    assert (tracker.uncommitted(), tracker.committable(), tracker.in_flight()) == (0, 0, 0)


def test_at_full_speed_the_window_holds_and_commits_follow_it_not_the_interval():
    """Records complete at once; the commit interval (60 s) never comes: only the window makes
    commits happen, and the uncommitted records never exceed it."""
    window, total = 50, 2000
    consumer, tracker = FakeConsumer(total), OffsetTracker()
    seen: list[int] = []
    peak = 0

    def deliver(received) -> None:
        nonlocal peak
        seen.extend(message.offset() for message, _ in received)
        peak = max(peak, tracker.uncommitted())
        tracker.done_many([ticket for _, ticket in received])

    source = Source(consumer, ["chat"], tracker, deliver, on_fatal=print, max_in_flight_events=window,
                    max_in_flight_bytes=1 << 30, commit_interval_s=60.0, revoke_drain_s=0.0)  # fmt: skip
    source.start()
    deadline = time.monotonic() + 20
    while len(seen) < total and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close()
    assert seen == list(range(total))
    assert peak <= window
    committed = [tp.offset for offsets, _ in consumer.commits for tp in offsets]
    assert committed == sorted(committed) and committed[-1] == total
    assert len(consumer.commits) >= total // window  # at least one commit per window's worth
    assert consumer.paused == []  # committing freed the window without pausing
    assert not [t for t in threading.enumerate() if t.name == "source-poll"]
