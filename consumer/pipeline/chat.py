"""Conversation context and repeat offenders, for chat moderation.

Many violations (harassment, dog-piling, raids) show only in the conversation. The
`Conversations` stage keeps, per `context_id` (a channel or thread), the last
`context_messages` messages of at most `context_seconds`, built from the stream itself, and
gives the classifier a view of each event with that history attached and the authors
replaced by pseudonyms that are stable within the conversation ("user-1", "user-2", ...):
the model sees who said what, never a user id. Memory is bounded: at most `max_channels`
conversations (least recently used are dropped), each message's text cut to
`max_message_chars`.

`Offenders` counts each author's violations per community over a rolling window; crossing a
configured threshold upgrades the verdict's action (e.g. delete -> timeout -> escalate).

`rebuild` restores both after a restart or a partition assignment by reading back a bounded
tail of the input topics (conversations) and of the verdict topic (offender counts), so no
external store is needed. Events arrive keyed by
channel, so one consumer sees a whole channel; offender counts are per consumer instance
(key by community to make them global).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from consumer.config.chat import ChatSettings
from consumer.events import ContentEvent, ContextMessage
from consumer.kafka.client import Message, TopicPartition
from consumer.kafka.ranges import read_ranges
from consumer.decode import DecodeError
from consumer.errors import Unavailable
from consumer.policy.actions import rank

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    event_id: str
    author_id: str | None
    content: str
    at: float


class Conversations:
    """Bounded per-channel history; thread-safe (rebuilds run on the poll thread)."""

    def __init__(self, settings: ChatSettings, clock=time.time):
        self._settings = settings
        self._clock = clock
        self._channels: OrderedDict[str, deque[_Entry]] = OrderedDict()
        self._lock = threading.Lock()
        self.enabled = settings.context_messages > 0  # read per event: an attribute, not a property

    def __len__(self) -> int:
        return len(self._channels)

    def stored_messages(self) -> int:
        with self._lock:
            return sum(len(d) for d in self._channels.values())

    def observe(self, event: ContentEvent) -> ContentEvent:
        """Record the event in its conversation; return the view the classifier should see."""
        view = self.observe_lazily(event)
        return view if isinstance(view, ContentEvent) else view()

    def observe_lazily(self, event: ContentEvent) -> ContentEvent | PseudonymisedView:
        """`observe`, the view left unbuilt (an `EventView`): a classifier that reads the
        content alone never pays for the context's copies."""
        if not self.enabled or event.context_id is None:
            # Authors only reach the prompt beside a context; without one there is nothing to hide.
            return PseudonymisedView(event, []) if event.context else event
        kind = event.metadata.get("event_type", "create")
        now = self._timestamp(event)
        with self._lock:
            history = self._channel(event.context_id)
            self._expire(history, now)
            if kind == "delete":
                _remove(history, event.event_id)
                return event
            earlier = [e for e in history if e.event_id != event.event_id]
            reply_to = event.metadata.get("reply_to")
            if reply_to and not any(e.event_id == reply_to for e in earlier):
                replied = next((e for d in self._channels.values() for e in d if e.event_id == reply_to), None)
                if replied is not None:  # fell out of the window but is still in memory
                    earlier.insert(0, replied)
            if kind == "edit":
                _remove(history, event.event_id)  # the edited text replaces the original
            history.append(_Entry(event.event_id, event.author_id, event.content[: self._settings.max_message_chars], now))
        return PseudonymisedView(event, earlier)

    def remember(self, event: ContentEvent) -> None:
        """Add history without classifying (a rebuild): no view is built."""
        if self.enabled and event.context_id is not None:
            self.observe_lazily(event)

    def _channel(self, context_id: str) -> deque[_Entry]:
        history = self._channels.get(context_id)
        if history is None:
            history = self._channels[context_id] = deque(maxlen=self._settings.context_messages)
            while len(self._channels) > self._settings.max_channels:
                self._channels.popitem(last=False)
        else:
            self._channels.move_to_end(context_id)
        return history

    def _expire(self, history: deque[_Entry], now: float) -> None:
        while history and now - history[0].at > self._settings.context_seconds:
            history.popleft()

    def _timestamp(self, event: ContentEvent) -> float:
        return event.created_at.timestamp() if event.created_at else self._clock()


def _remove(history: deque[_Entry], event_id: str) -> None:
    for entry in [e for e in history if e.event_id == event_id]:
        history.remove(entry)


class PseudonymisedView:
    """An event with its context (what it carries, then the conversation's `earlier` messages)
    and its authors replaced by per-conversation pseudonyms, in order of appearance: an
    `EventView` (consumer.classify), built on the first call."""

    __slots__ = ("_event", "_earlier", "_built", "content")

    def __init__(self, event: ContentEvent, earlier: list[_Entry]):
        self._event = event
        self._earlier = earlier
        self._built: ContentEvent | None = None
        self.content = event.content

    def __call__(self) -> ContentEvent:
        if self._built is None:
            event = self._event
            context = list(event.context) + [
                ContextMessage(content=e.content, author_id=e.author_id, event_id=e.event_id) for e in self._earlier
            ]
            self._built = _pseudonymised(event, context)
        return self._built


def _pseudonymised(event: ContentEvent, context: list[ContextMessage]) -> ContentEvent:
    """The event with authors replaced by per-conversation pseudonyms, in order of appearance."""
    if not context and event.author_id is None:
        return event
    names: dict[str, str] = {}

    def name(author: str | None) -> str | None:
        if author is None:
            return None
        return names.setdefault(author, f"user-{len(names) + 1}")

    # Built anew rather than model_copy'd, which costs more.
    renamed = [
        ContextMessage(content=m.content, author_id=name(m.author_id), event_id=m.event_id, created_at=m.created_at)
        for m in context
    ]
    return event.model_copy(update={"context": renamed, "author_id": name(event.author_id)})


class Offenders:
    """Rolling per-(community, author) violation counts that upgrade actions at thresholds.

    A community's own thresholds (its policies' `offender_thresholds`, passed per verdict) replace
    the configured ones for its events; `()` turns counting off there. `enabled`: thresholds are
    configured (`chat.offender_thresholds`); the rebuild after a restart also runs where only
    communities have their own (`rebuild`'s `count_offenders`)."""

    def __init__(self, settings: ChatSettings, clock=time.time):
        self._settings = settings
        self._thresholds = tuple(sorted((t.violations, t.action) for t in settings.offender_thresholds))
        self.enabled = bool(self._thresholds)
        self._clock = clock
        self._violations: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._violations)

    def counts(self, thresholds: tuple[tuple[int, str], ...] | None = None) -> bool:
        """Whether verdicts under `thresholds` (None: the configured ones) are counted."""
        return bool(self._thresholds if thresholds is None else thresholds)

    def record(self, community_id: str | None, author_id: str | None, violation: bool, action: str,
               at: float | None = None, thresholds: tuple[tuple[int, str], ...] | None = None) -> tuple[str, int]:
        """Count a verdict; returns (the action after upgrades, the author's violations in the window).
        `thresholds`: (violations, action) by rising count, the community's; None: the configured ones."""
        if thresholds is None:
            thresholds = self._thresholds
        if not thresholds or author_id is None:
            return action, 0
        count = self._count((community_id or "", author_id), violation, at if at is not None else self._clock())
        if not violation:
            return action, count
        for violations, upgrade in thresholds:
            if count >= violations and rank(upgrade) > rank(action):
                action = upgrade
        return action, count

    def _count(self, key: tuple[str, str], violation: bool, now: float) -> int:
        """Count one verdict of (community, author) at `now`; the violations in the window."""
        with self._lock:
            times = self._violations.get(key)
            if times is None:
                if not violation:
                    return 0
                times = self._violations[key] = deque()
                while len(self._violations) > self._settings.max_authors:
                    self._violations.popitem(last=False)
            else:
                self._violations.move_to_end(key)
            while times and now - times[0] > self._settings.offender_window_s:
                times.popleft()
            if violation:
                times.append(now)
            return len(times)

    def count(self, community_id: str | None, author_id: str | None, at: float | None = None,
              thresholds: tuple[tuple[int, str], ...] | None = None) -> int | None:
        """The author's violations in the window so far, without counting anything; None when off."""
        if not self.counts(thresholds) or author_id is None:
            return None
        now = at if at is not None else self._clock()
        with self._lock:
            times = self._violations.get((community_id or "", author_id), ())
            return sum(1 for t in times if now - t <= self._settings.offender_window_s)

    def replay(self, verdicts: Iterable[dict]) -> None:
        """Count earlier verdicts again (a rebuild from the verdict topic's tail), whatever the
        thresholds: a community's own apply when its next verdict is recorded."""
        for verdict in verdicts:
            if verdict.get("violation") and verdict.get("author_id"):
                at = (verdict.get("source") or {}).get("timestamp_ms")
                self._count((verdict.get("community_id") or "", verdict["author_id"]), True,
                            at / 1000 if at else self._clock())  # fmt: skip


def rebuild(
    consumer: Any,
    partitions: list[TopicPartition],
    conversations: Conversations,
    offenders: Offenders,
    decode: Callable[[Message], ContentEvent],
    client: dict[str, Any],
    verdict_topic: str,
    tail: int,
    count_offenders: bool,
) -> None:
    """Read back the last `tail` records so conversations and offender counts survive restarts:
    the input before each assigned partition's committed offset, and the verdict topic's end
    (its verdicts about the assigned partitions). `consumer` is the group consumer that was
    just assigned `partitions`. `count_offenders`: configured or community thresholds exist."""
    if not tail or not (conversations.enabled or count_offenders):
        return
    assigned = {(tp.topic, tp.partition) for tp in partitions}
    if conversations.enabled:
        committed = consumer.committed(partitions, timeout=10)
        ranges = [(tp.topic, tp.partition, tp.offset - tail, tp.offset) for tp in committed if tp.offset > 0]
        for message in read_ranges(client, ranges):
            try:
                conversations.remember(decode(message))
            except DecodeError:
                continue
            except Unavailable as exc:  # context is a help, not a duty: start without it rather than wait
                log.warning("conversation rebuild stopped early: %s", exc)
                break
    if count_offenders:
        metadata = consumer.list_topics(verdict_topic, timeout=10)
        ranges = []
        for partition in metadata.topics[verdict_topic].partitions if verdict_topic in metadata.topics else ():
            _, high = consumer.get_watermark_offsets(TopicPartition(verdict_topic, partition), timeout=10)
            ranges.append((verdict_topic, partition, high - tail, high))
        verdicts = (orjson.loads(m.value()) for m in read_ranges(client, ranges))
        offenders.replay(
            v for v in verdicts if (v.get("source", {}).get("topic"), v.get("source", {}).get("partition")) in assigned
        )
    log.info("rebuilt chat state for %d partitions: %d conversations, %d authors",
             len(partitions), len(conversations), len(offenders))  # fmt: skip
