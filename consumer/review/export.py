"""Decisions as labelled data: `safeguard-consumer review export` and `review pending`.

Reads the review topic and the decisions topic from their earliest retained offsets (bounded
reads: up to their end offsets when the export starts) into a `ReviewState`, the same rules
the consumer applies (the first decision per review id counts), and writes one line per
decided review of the policy in `policy eval`'s format: `{"id", "content", "label"}`, plus
what a policy author wants beside it (category, policy version, reason, what the machine
answered, reviewer, time). A policy author then evaluates the next version on what
moderators actually saw: `safeguard-consumer policy eval NEW.md --data FILE.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from consumer.durable import replacing
from consumer.events import ReviewItem
from consumer.kafka.client import Consumer, TopicPartition
from consumer.kafka.ranges import OffsetSpan, iter_ranges
from consumer.review.decisions import RejectedInput, parse_record
from consumer.review.state import ReviewState


def whole_topic(config: dict[str, Any], topic: str) -> list[OffsetSpan]:
    probe = Consumer({**config, "group.id": "safeguard-review-export", "enable.auto.commit": False})
    try:
        metadata = probe.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        return [(topic, p, *probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)) for p in metadata.partitions]
    finally:
        probe.close()


def read_state(config: dict[str, Any], review_topic: str, decisions_topic: str) -> ReviewState:
    """Every review item, then every record of the decisions topic, as the consumer would apply them."""
    state = ReviewState()
    for message in iter_ranges(config, whole_topic(config, review_topic)):
        try:
            state.add_item(ReviewItem.model_validate_json(message.value() or b""), message.key())
        except ValueError:
            continue
    for message in iter_ranges(config, whole_topic(config, decisions_topic)):
        try:
            record = parse_record(message.value())
        except RejectedInput:
            continue
        state.add_record(record, (message.topic(), message.partition(), message.offset()))
    return state


def labelled_rows(state: ReviewState, policy_id: str, version: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for decided in state.decided_items():
        # A lead's overturn corrects the label: the answer in force is the one to learn from.
        item, decision = decided.item, (state.standing(decided.item.review_id) or decided).decision
        if item.policy_key != policy_id or (version is not None and item.policy_version != version):
            continue
        rows.append({
            "id": item.review_id,
            "content": item.event.content,
            "label": int(decision.violation),
            "category": decision.category,
            "rule_ids": decision.rule_ids,
            "policy_id": item.policy_id,
            "policy_community": item.policy_community,
            "policy_version": item.policy_version,
            "reason": item.reason.value,
            "machine_violation": int(item.machine.violation),
            "machine_stage": item.machine.stage,
            "reviewer_id": decision.reviewer_id,
            "decided_at": decision.decided_at.isoformat(),
            "event_id": item.event.event_id,
        })  # fmt: skip
    return rows


def export_decisions(
    config: dict[str, Any], review_topic: str, decisions_topic: str, policy_id: str, out: Path, version: str | None = None
) -> int:
    """Write the policy's decided reviews to `out` (whole or not at all); returns how many."""
    rows = labelled_rows(read_state(config, review_topic, decisions_topic), policy_id, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as handle:
        for row in rows:
            handle.write(orjson.dumps(row) + b"\n")
    return len(rows)
