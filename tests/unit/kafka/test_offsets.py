"""The offset tracker commits only the contiguous delivered prefix of each partition."""

from consumer.kafka.offsets import OffsetTracker


def test_commit_position_waits_for_the_lowest_unfinished_offset():
    tracker = OffsetTracker()
    tickets = [tracker.track("t", 0, offset, size=10) for offset in range(5)]
    for i in (1, 2, 4):
        tracker.done(tickets[i])
    assert tracker.commit_positions() == {}  # offset 0 is not delivered yet
    tracker.done(tickets[0])
    assert tracker.commit_positions() == {("t", 0): 3}  # 0,1,2 delivered; 3 still in flight
    tracker.mark_committed({("t", 0): 3})
    assert tracker.commit_positions() == {}
    tracker.done(tickets[3])
    assert tracker.commit_positions() == {("t", 0): 5}
    assert tracker.in_flight() == 0 and tracker.in_flight_bytes == 0


def test_partitions_are_independent():
    tracker = OffsetTracker()
    a = tracker.track("t", 0, 10, 1)
    tracker.track("t", 1, 20, 1)
    tracker.done(a)
    assert tracker.commit_positions() == {("t", 0): 11}
    assert tracker.in_flight() == 1
    assert tracker.in_flight([("t", 1)]) == 1 and tracker.in_flight([("t", 0)]) == 0


def test_forgotten_partition_ignores_late_deliveries_and_frees_the_window():
    tracker = OffsetTracker()
    old = tracker.track("t", 0, 5, size=100)
    tracker.forget([("t", 0)])
    assert tracker.in_flight() == 0 and tracker.in_flight_bytes == 0
    fresh = tracker.track("t", 0, 5, size=100)  # re-assigned and read again
    tracker.done(old)  # a delivery report from before the revoke
    assert tracker.commit_positions() == {}
    tracker.done(fresh)
    assert tracker.commit_positions() == {("t", 0): 6}


def test_duplicate_done_counts_once():
    tracker = OffsetTracker()
    first, second = tracker.track("t", 0, 0, 1), tracker.track("t", 0, 1, 1)
    tracker.done(second)
    tracker.done(second)
    assert tracker.in_flight() == 1
    tracker.done(first)
    assert tracker.commit_positions() == {("t", 0): 2}


def test_wait_until_drained_times_out_while_work_is_in_flight():
    tracker = OffsetTracker()
    ticket = tracker.track("t", 0, 0, 1)
    assert tracker.wait_until_drained(0.05) is False
    tracker.done(ticket)
    assert tracker.wait_until_drained(0.05) is True
