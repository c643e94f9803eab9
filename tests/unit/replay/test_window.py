"""A replay window whose --from is after its --to is an error, not an empty run with exit 0."""

from types import SimpleNamespace

import pytest

from consumer.replay.run import Bound, ReplayError, resolve_window


class TopicDouble:
    """The metadata calls resolve_window makes, for one topic of two partitions holding 10..20."""

    def list_topics(self, topic, timeout):
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None, 1: None})})

    def get_watermark_offsets(self, tp, timeout):
        return (10, 20)


@pytest.mark.parametrize("start, end", [("now", "earliest"), ("15", "12"), ("now", "12"), ("2026-02-01", "2026-01-01")])
def test_a_backwards_window_is_an_error(start, end):
    with pytest.raises(ReplayError, match="--from is after --to"):
        resolve_window(TopicDouble(), "t", None, Bound.parse(start), Bound.parse(end))


def test_a_forward_window_resolves():
    window = resolve_window(TopicDouble(), "t", None, Bound.parse("earliest"), Bound.parse("now"))
    assert {p: (w.start, w.end) for p, w in window.items()} == {0: (10, 20), 1: (10, 20)}
