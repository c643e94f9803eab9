"""What a replay reads and how fast: `--from`/`--to` bounds, the offset range they resolve to,
and the `--rate` cap (a token bucket)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel

from consumer.kafka.client import TopicPartition
from consumer.replay import ReplayError

METADATA_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Bound:
    """`--from`/`--to`: `earliest`, `now`, an offset (the same in every partition), or an
    ISO-8601 time (UTC when it names no zone). A time START is inclusive, a time END exclusive."""

    kind: Literal["earliest", "now", "offset", "time"]
    value: int = 0  # the offset, or the time in milliseconds since the epoch

    @classmethod
    def parse(cls, text: str) -> Bound:
        text = text.strip()
        if text in ("earliest", "now"):
            return cls(text)  # type: ignore[arg-type]
        if text.isdigit():
            return cls("offset", int(text))
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ReplayError(f"{text!r} is not an ISO-8601 time, an offset, 'earliest' or 'now'") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return cls("time", int(moment.timestamp() * 1000))

    @classmethod
    def since(cls, moment: datetime | None) -> Bound:
        """From `moment` on, or from the earliest record when None."""
        return cls("earliest") if moment is None else cls("time", int(moment.timestamp() * 1000))


class OffsetRange(BaseModel):
    """The offsets one partition's replay covers, and how far its outputs are delivered."""

    start: int
    end: int  # exclusive
    next: int  # the first offset whose output is not known to be delivered


def resolve_ranges(
    consumer: Any, topic: str, partitions: list[int] | None, start: Bound, end: Bound
) -> dict[int, OffsetRange]:
    """Offsets [start, end) per partition, fixed now: `now` and a future END are today's high watermark."""
    found = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise ReplayError(f"topic {topic!r} does not exist or cannot be described")
    chosen = partitions or sorted(found.partitions)
    unknown = sorted(set(chosen) - set(found.partitions))
    if unknown:
        raise ReplayError(f"topic {topic!r} has no partition {', '.join(map(str, unknown))}")
    marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=METADATA_TIMEOUT_S) for p in chosen}

    def offsets(bound: Bound) -> dict[int, int]:
        if bound.kind == "time":
            query = [TopicPartition(topic, p, bound.value) for p in chosen]
            answers = consumer.offsets_for_times(query, timeout=METADATA_TIMEOUT_S)
            for tp in answers:
                if tp.error is not None:
                    raise ReplayError(f"cannot look up a time in {topic}[{tp.partition}]: {tp.error}")
            # -1: no record at or after that time yet, so the range ends (or starts) at today's end
            return {tp.partition: marks[tp.partition][1] if tp.offset < 0 else tp.offset for tp in answers}
        low_high = {"earliest": 0, "now": 1}
        if bound.kind in low_high:
            return {p: marks[p][low_high[bound.kind]] for p in chosen}
        return {p: min(max(bound.value, marks[p][0]), marks[p][1]) for p in chosen}

    if _backwards(start, end):
        raise ReplayError("--from is after --to: the range is empty; swap them")
    starts, ends = offsets(start), offsets(end)
    backwards = [p for p in chosen if ends[p] < starts[p]]
    if backwards:
        # An empty replay with exit 0 looks like "nothing changed": say the range is upside down.
        where = f" ({topic}[{backwards[0]}]: {starts[backwards[0]]} > {ends[backwards[0]]})"
        raise ReplayError(f"--from is after --to{where}: the range is empty; swap them")
    return {p: OffsetRange(start=starts[p], end=max(starts[p], ends[p]), next=starts[p]) for p in chosen}


def _backwards(start: Bound, end: Bound) -> bool:
    """Bounds that are in the wrong order whatever the topic holds."""
    if start.kind == end.kind and start.kind in ("offset", "time"):
        return start.value > end.value
    return (start.kind == "now" and end.kind != "now") or (end.kind == "earliest" and start.kind != "earliest")


def parse_rate(text: str) -> float:
    """`N`, `N/s`, `N/min` or `N/h` events per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|min|m|h))?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ReplayError(f"--rate {text!r}: expected a positive number of events, e.g. 200/s or 6000/min")
    per = {None: 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) / per


class TokenBucket:
    """At most `rate` events a second: over any t seconds, no more than rate*t + burst, where the
    burst is a tenth of a second's worth (at least 1). Starts empty. Used by one thread only."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(1.0, rate / 10)
        self._clock = clock
        self._tokens = 0.0
        self._last = clock()

    def take(self, wanted: int, timeout: float) -> int:
        """Take up to `wanted` tokens, waiting at most `timeout` for the first; returns how many."""
        deadline = self._clock() + timeout
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            granted = min(wanted, int(self._tokens))
            if granted >= 1:
                self._tokens -= granted
                return granted
            if now >= deadline:
                return 0
            time.sleep(min((1 - self._tokens) / self.rate, deadline - now))

    def refund(self, tokens: int) -> None:
        """Return tokens taken for events that did not come (fewer records than asked for)."""
        self._tokens = min(self.burst, self._tokens + tokens)
