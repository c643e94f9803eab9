"""What a replay reads and how fast: bounds, the rate cap."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from consumer.replay import ReplayError
from consumer.replay.bounds import Bound, TokenBucket, parse_rate, resolve_ranges


def test_bounds_are_earliest_now_an_offset_or_a_time_in_utc_when_unzoned():
    assert Bound.parse("earliest") == Bound("earliest")
    assert Bound.parse(" now ") == Bound("now")
    assert Bound.parse("42") == Bound("offset", 42)
    moment = datetime(2025, 6, 1, tzinfo=timezone.utc)
    assert Bound.parse("2025-06-01T00:00:00") == Bound("time", int(moment.timestamp() * 1000))
    assert Bound.parse("2025-06-01T02:00:00+02:00") == Bound("time", int(moment.timestamp() * 1000))
    assert Bound.since(None) == Bound("earliest")
    assert Bound.since(moment) == Bound("time", int(moment.timestamp() * 1000))
    with pytest.raises(ReplayError, match="not an ISO-8601 time"):
        Bound.parse("yesterday")


@pytest.mark.parametrize(("text", "per_second"), [("200", 200), ("200/s", 200), ("6000/min", 100), ("36/h", 0.01)])
def test_rates_are_events_per_second(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["0", "-5/s", "fast", "10/day"])
def test_a_rate_that_is_not_a_positive_count_is_refused(text):
    with pytest.raises(ReplayError, match="--rate"):
        parse_rate(text)


def test_the_token_bucket_starts_empty_and_holds_a_tenth_of_a_second():
    now = [0.0]
    bucket = TokenBucket(100.0, clock=lambda: now[0])
    assert bucket.take(50, timeout=0) == 0
    now[0] = 1.0  # a whole second's worth, but the burst is 10
    assert bucket.take(50, timeout=0) == 10
    assert bucket.take(50, timeout=0) == 0
    bucket.refund(3)  # three of those records did not come
    assert bucket.take(50, timeout=0) == 3


class TopicDouble:
    """The metadata calls resolve_ranges makes, for one topic of two partitions holding 10..20."""

    def list_topics(self, topic, timeout):
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None, 1: None})})

    def get_watermark_offsets(self, tp, timeout):
        return (10, 20)


@pytest.mark.parametrize("start, end", [("now", "earliest"), ("15", "12"), ("now", "12"), ("2026-02-01", "2026-01-01")])
def test_a_backwards_range_is_an_error_not_an_empty_run(start, end):
    with pytest.raises(ReplayError, match="--from is after --to"):
        resolve_ranges(TopicDouble(), "t", None, Bound.parse(start), Bound.parse(end))


def test_a_forward_range_resolves():
    ranges = resolve_ranges(TopicDouble(), "t", None, Bound.parse("earliest"), Bound.parse("now"))
    assert {p: (r.start, r.end) for p, r in ranges.items()} == {0: (10, 20), 1: (10, 20)}
