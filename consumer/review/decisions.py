"""Decisions: reading a person's answer and turning it into a corrected verdict.

The corrected verdict is built from the review item alone (it is self-contained), never from
memory of the machine verdict, so a decision taken days later, after restarts, yields the same
output: the same event and source coordinates, `decided_by: "human"`, the reviewer's answer
as the reviewed policy's result, the other policies' results as the machine gave them, and
`supersedes` naming the verdict it replaces: the machine's (for an appeal, the appealed one at
its verdict-topic coordinates), or, for a lead's overturn, the corrected verdict of the answer
it overturns (named by that decision record's coordinates: it produced that verdict alone).
On an appeal the verdict also says whether the appealed answer was upheld or overturned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

import consumer
from consumer import stages
from consumer.classify import Classification
from consumer.errors import RecordFault
from consumer.events import (
    DeadLetter,
    DeadLetterError,
    Document,
    ErrorType,
    OriginalRecord,
    PolicyResult,
    ReviewDecision,
    ReviewItem,
    ReviewNote,
    ReviewReason,
    ReviewStatus,
    SourceRecord,
    Supersedes,
    Verdict,
)
from consumer.kafka.client import Message
from consumer.policy import Policy, most_severe
from consumer.policy.actions import SEVERITY
from consumer.policy.communities import CommunityIndex
from consumer.policy.parse import action_for
from consumer.review.state import Applied

M = TypeVar("M", bound=BaseModel)


class RejectedInput(RecordFault):
    """A decision or appeal that cannot be applied; becomes a dead letter of `error_type`."""


def parse(model: type[M], value: bytes | None) -> M:
    """A decision or an appeal from a record's value; RejectedInput names what is wrong (fields, not values)."""
    return _validate(model, _loads(value))


def parse_record(value: bytes | None) -> ReviewDecision | ReviewNote:
    """A record of the decisions topic: a decision or overturn, or a note (escalation, comment)."""
    data = _loads(value)
    kind = data.get("kind") if isinstance(data, dict) else None
    return _validate(ReviewNote if kind in ("escalation", "comment") else ReviewDecision, data)


def _loads(value: bytes | None) -> object:
    if value is None:
        raise RejectedInput(ErrorType.INVALID_JSON, "empty record")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        raise RejectedInput(ErrorType.INVALID_JSON, "not valid JSON") from None


def _validate(model: type[M], data: object) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                           for e in exc.errors(include_input=False, include_url=False))  # fmt: skip
        raise RejectedInput(ErrorType.SCHEMA_VIOLATION, f"not a {model.__name__}: {fields}") from None


def human_result(
    item: ReviewItem, decision: ReviewDecision, policy: Policy | None, actions: dict[str, str] | None = None
) -> PolicyResult:
    """The reviewer's answer as the policy's result; its action from the policy's actions map in
    force now (`actions`: that map with the event's community's `baseline_actions` laid over it;
    the item's own version when the policy is gone)."""
    if policy is not None:
        action = action_for(policy.actions if actions is None else actions, decision.violation, decision.category)
    else:
        action = "flag" if decision.violation else "allow"
    latency_ms = max(0.0, (decision.decided_at - item.created_at).total_seconds() * 1000)
    return PolicyResult(
        policy_id=item.policy_id,
        policy_version=item.policy_version,
        policy_community=item.policy_community,
        violation=decision.violation,
        category=decision.category,
        rule_ids=decision.rule_ids,
        confidence=None,
        rationale=decision.note,
        action=action,
        model=stages.HUMAN,
        stage=stages.HUMAN,
        latency_ms=latency_ms,
        review=ReviewStatus(status="decided", reason=item.reason, review_id=item.review_id),
    )


def corrected_verdict(
    item: ReviewItem,
    decision: ReviewDecision,
    policies: Callable[[], Mapping[str, Policy]],
    replaces: Applied | None = None,
    communities: CommunityIndex | None = None,
) -> Document:
    """The verdict that replaces the machine's for the reviewed event (`replaces`: for an
    overturn, the person's answer in force before it, whose corrected verdict this one replaces).
    The reviewed policy is looked up by its key (`community/id`); `communities`: where the event's
    community overrides a platform policy's actions."""
    policy = policies().get(item.policy_key)
    actions = None
    if communities is not None and policy is not None and policy.community is None:
        community = communities.get(item.community_id)
        actions = community.actions.get(policy.id) if community is not None else None
    results = [*item.other_results, human_result(item, decision, policy, actions)]
    # Results still awaiting a person do not count as found violations (they hold).
    decided = [r for r in results if not (r.review and r.review.status == "pending" and r.stage == stages.UNDECIDED)]
    action = most_severe([r.action for r in results])
    latency_ms = max(0.0, (datetime.now(timezone.utc) - item.created_at).total_seconds() * 1000)
    verdict = Verdict(
        event_id=item.event.event_id,
        source=item.source,
        violation=any(r.violation for r in decided),
        action=action,
        severity=SEVERITY.get(action, "low"),
        results=results,
        author_id=item.author_id,
        community_id=item.community_id,
        context_id=item.context_id,
        note=(f"overturned by {decision.reviewer_id}" if replaces else "decided by a person")
        + f" ({item.reason.value} review {item.review_id})",
        latency_ms=latency_ms,
        consumer_version=consumer.__version__,
        decided_by="human",
        supersedes=_supersedes(item, replaces),
        appeal=None if item.reason != ReviewReason.APPEAL
        else ("upheld" if decision.violation == item.machine.violation else "overturned"),
    )
    return verdict.model_dump(mode="json")


def _supersedes(item: ReviewItem, replaces: Applied | None) -> Supersedes:
    named = Supersedes(event_id=item.event.event_id, source=item.source, review_id=item.review_id)
    if replaces is None:
        named.verdict = item.verdict
    else:
        topic, partition, offset = replaces.at
        named.decided_by = "human"
        named.decision = SourceRecord(topic=topic, partition=partition, offset=offset)
    return named


def as_classification(decision: ReviewDecision) -> Classification:
    """The decision as a classifier's answer, for the cache and the heads."""
    return Classification(
        violation=decision.violation,
        category=decision.category if decision.violation else (decision.category or "safe"),
        rule_ids=list(decision.rule_ids),
        rationale=decision.note,
        model=stages.HUMAN,
        stage=stages.HUMAN,
    )


def dead_letter(message: Message, error_type: ErrorType, reason: str) -> Document:
    """A decision or appeal record that could not be applied, with its original bytes."""
    ts_type, ts = message.timestamp()
    letter = DeadLetter(
        error=DeadLetterError(type=error_type, message=reason),
        source=SourceRecord(topic=message.topic(), partition=message.partition(), offset=message.offset(),
                            timestamp_ms=ts if ts_type else None),  # fmt: skip
        original=OriginalRecord.capture(message.key(), message.value(), message.headers()),
        failed_at=datetime.now(timezone.utc),
        consumer_version=consumer.__version__,
    )
    return letter.model_dump(mode="json")
