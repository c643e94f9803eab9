"""Appeals: a user contests a verdict; a person reviews the event with `reason: appeal`.

An appeal names the event by its source coordinates (exact) or by its event id. The machine
verdict is found by reading back the tail of the verdict topic (`review.appeal_search_records`
per partition, bounded reads: `consumer.kafka.ranges`), and the event itself by reading the
input record at the verdict's source coordinates, so an appeal needs no store beyond Kafka's
retention. The event is shown as it was recorded: its own `context` field, authors as
pseudonyms; the chat window the consumer built at the time is not kept, so it is not shown.

One (event, policy) opens one appeal review: its id comes from the source coordinates, so a
repeated appeal finds the review already open (or decided) and adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from consumer.errors import Unavailable
from consumer.events import (
    Appeal,
    ContentEvent,
    Document,
    ErrorType,
    ReviewContextMessage,
    ReviewEvent,
    ReviewItem,
    ReviewReason,
    SourceRecord,
    policy_key,
)
from consumer.kafka.client import Consumer, Message, TopicPartition
from consumer.kafka.ranges import OffsetSpan, iter_ranges, read_ranges
from consumer.policy.actions import rank
from consumer.review.decisions import RejectedInput
from consumer.review.items import review_item


def tail_spans(config: dict[str, Any], topic: str, records: int) -> list[OffsetSpan]:
    """The last `records` offsets of every partition of `topic`."""
    probe = Consumer({**config, "group.id": "safeguard-appeal-probe", "enable.auto.commit": False})
    try:
        metadata = probe.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        spans = []
        for partition in metadata.partitions:
            low, high = probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            spans.append((topic, partition, max(low, high - records), high))
        return spans
    finally:
        probe.close()


def find_verdict(config: dict[str, Any], verdict_topic: str, appeal: Appeal,
                 records: int) -> tuple[Document, SourceRecord] | None:  # fmt: skip
    """The newest machine verdict for the appealed event within the verdict topic's tail, and where it is."""
    found: tuple[Document, SourceRecord] | None = None
    found_at = -1
    for message in iter_ranges(config, tail_spans(config, verdict_topic, records), timeout=60):
        try:
            verdict = orjson.loads(message.value())
        except (orjson.JSONDecodeError, TypeError):
            continue
        if not isinstance(verdict, dict) or verdict.get("kind") != "verdict" or verdict.get("decided_by") == "human":
            continue
        if verdict.get("replay") is not None:
            continue
        source = verdict.get("source") or {}
        if appeal.source is not None:
            hit = (source.get("topic"), source.get("partition"), source.get("offset")) == (
                appeal.source.topic, appeal.source.partition, appeal.source.offset)  # fmt: skip
        else:
            hit = verdict.get("event_id") == appeal.event_id
        if hit and message.offset() > found_at:  # a record read twice has two verdicts: the later stands
            at = SourceRecord(topic=message.topic(), partition=message.partition(), offset=message.offset())
            found, found_at = (verdict, at), message.offset()
    return found


def appeal_item(
    config: dict[str, Any],
    verdict_topic: str,
    appeal: Appeal,
    records: int,
    decode: Callable[[Message], ContentEvent],
) -> tuple[ReviewItem, bytes | None]:
    """The review item an appeal opens and the input record's key (the item is keyed like the
    input); RejectedInput (appeal_not_found) when the verdict, the policy or the input record
    cannot be found."""
    found = find_verdict(config, verdict_topic, appeal, records)
    if found is None:
        raise RejectedInput(ErrorType.APPEAL_NOT_FOUND, f"no verdict for the appealed event in the last {records} "
                                                        f"records of each partition of {verdict_topic}")  # fmt: skip
    verdict, verdict_at = found
    results = verdict.get("results") or []
    if appeal.policy_id is not None:  # its key: `community/id` names a community's own policy
        chosen = [r for r in results
                  if policy_key(r.get("policy_id", ""), r.get("policy_community")) == appeal.policy_id]  # fmt: skip
    else:  # the policy whose result asked for the most severe action
        chosen = sorted(results, key=lambda r: rank(r.get("action", "allow")), reverse=True)[:1]
    if not chosen:
        raise RejectedInput(ErrorType.APPEAL_NOT_FOUND, "the appealed verdict has no result for that policy")
    result = chosen[0]
    source = verdict["source"]
    records_read = read_ranges(config, [(source["topic"], source["partition"], source["offset"], source["offset"] + 1)],
                               timeout=30)  # fmt: skip
    if not records_read or records_read[0].value() is None:
        raise RejectedInput(ErrorType.APPEAL_NOT_FOUND, "the appealed input record is no longer retained")
    try:
        event = decode(records_read[0])
    except Unavailable:
        raise  # a schema registry that does not answer is not the appeal's fault: never appeal_not_found
    except Exception:  # noqa: BLE001 - the input record had a verdict, so it decoded once; its mapping changed
        raise RejectedInput(ErrorType.APPEAL_NOT_FOUND, "the appealed input record no longer decodes") from None
    others = [r for r in results if r is not result]
    item = review_item(ReviewReason.APPEAL, result, recorded_event(event), source, event, others, appeal=appeal.reason)
    item.author_violations = verdict.get("offender_violations")
    item.verdict = verdict_at  # the appeal's corrected verdict names the appealed one
    return item, records_read[0].key()


def recorded_event(event: ContentEvent) -> ReviewEvent:
    """The event as it was recorded, authors replaced by pseudonyms in order of appearance."""
    names: dict[str, str] = {}

    def name(author: str | None) -> str | None:
        return None if author is None else names.setdefault(author, f"user-{len(names) + 1}")

    context = [ReviewContextMessage(author=name(m.author_id), content=m.content) for m in event.context]
    return ReviewEvent(
        event_id=event.event_id,
        content=event.content,
        content_type=event.content_type,
        author=name(event.author_id),
        created_at=event.created_at,
        context=context,
        metadata=event.metadata,
    )
