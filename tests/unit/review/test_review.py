"""The review package's stages through their public interfaces: which results open reviews,
what a decision produces, which decision counts, and a record's several outputs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from consumer.classify import Classification
from consumer.config.review import ReviewSettings
from consumer.events import (
    ContentEvent,
    ErrorType,
    ReviewDecision,
    ReviewReason,
    Verdict,
)
from consumer.kafka.offsets import OffsetTracker, OutputJoin
from consumer.pipeline import outputs
from consumer.policy import Policy
from consumer.policy.communities import CommunityIndex
from consumer.review.decisions import RejectedInput, corrected_verdict, parse
from consumer.review.items import ReviewOpener, review_event
from consumer.review.state import ReviewState

POLICY = Policy(id="chat-harassment", version="v1", text="", actions={"harassment": "delete"})
SOURCE = {"topic": "chat", "partition": 0, "offset": 7, "timestamp_ms": None}


def open_one(opener: ReviewOpener, outcome: Classification, offset: int = 7) -> tuple[dict, list]:
    event = ContentEvent(event_id=f"e{offset}", content="nice build!", author_id="u1", context_id="general")
    results = [outputs.policy_result(POLICY, outcome, 1.0)]
    items = opener.open(event, event, lambda: SOURCE | {"offset": offset}, results, [outcome], [POLICY])
    return results[0], items


UNDECIDED = Classification(violation=True, confidence="0.504", model="cascade:lexical:undecided", stage="undecided")


def test_an_undecided_result_holds_and_opens_a_review_with_the_event_as_the_model_saw_it():
    marked, items = open_one(ReviewOpener(ReviewSettings(enabled=True)), UNDECIDED)
    assert marked["action"] == "hold"
    assert marked["review"] == {"status": "pending", "reason": "undecided", "review_id": items[0].review_id}
    (item,) = items
    assert item.event.content == "nice build!" and item.event.author == "user-1" and item.author_id == "u1"
    assert item.machine.stage == "undecided" and item.machine.action == "hold" and item.source.offset == 7
    # The same record read again (at least once) opens the same review.
    assert open_one(ReviewOpener(ReviewSettings(enabled=True)), UNDECIDED)[1][0].review_id == item.review_id


def test_without_review_an_undecided_result_holds_but_opens_nothing():
    marked, items = open_one(ReviewOpener(ReviewSettings(enabled=False)), UNDECIDED)
    assert marked["action"] == "hold" and marked["review"] is None and items == []


def test_a_reasoner_answer_below_min_confidence_opens_a_low_confidence_review():
    opener = ReviewOpener(ReviewSettings(enabled=True, min_confidence="high"))
    low = Classification(violation=True, category="harassment", confidence="medium", model="gpt-oss", stage="reasoner")
    marked, items = open_one(opener, low)
    assert marked["review"]["reason"] == "low_confidence" and marked["action"] == "delete"  # the answer stands
    high = Classification(violation=True, category="harassment", confidence="high", model="gpt-oss", stage="reasoner")
    assert open_one(opener, high)[1] == []
    cached = Classification(violation=True, confidence="low", model="cascade:cache", stage="cache")
    assert open_one(opener, cached)[1] == []  # a copy of an answer already seen


def test_sampling_opens_exactly_the_configured_share_of_decided_results():
    opener = ReviewOpener(ReviewSettings(enabled=True, sample_fraction=0.1))
    decided = Classification(violation=False, category="safe", model="keyword", stage=None)
    reasons = [open_one(opener, decided, offset=i)[0]["review"] for i in range(100)]
    assert sum(1 for r in reasons if r) == 10 and {r["reason"] for r in reasons if r} == {"sampled"}


def test_the_model_view_keeps_pseudonyms_and_never_a_user_id():
    from consumer.events import ContextMessage

    original = ContentEvent(event_id="e1", content="you know what to do", author_id="u-4410", context_id="c",
                            context=[ContextMessage(content="hi", author_id="u-8123")])
    view = original.model_copy(update={"author_id": "user-2",
                                       "context": [ContextMessage(content="hi", author_id="user-1")]})
    shown = review_event(original, view)
    assert shown.author == "user-2" and [c.author for c in shown.context] == ["user-1"]
    assert "u-4410" not in shown.model_dump_json() and "u-8123" not in shown.model_dump_json()


def item_and_decision(violation: bool, **extra):
    _, (item,) = open_one(ReviewOpener(ReviewSettings(enabled=True)), UNDECIDED)
    later = item.created_at + timedelta(minutes=5)
    return item, ReviewDecision(review_id=item.review_id, violation=violation, reviewer_id="mod-1", decided_at=later,
                                **extra)


def test_a_corrected_verdict_is_the_same_event_decided_by_a_person_and_names_what_it_supersedes():
    item, decision = item_and_decision(True, category="harassment", rule_ids=["H1"], note="slur in context")
    verdict = Verdict.model_validate(corrected_verdict(item, decision, lambda: {POLICY.id: POLICY}))
    assert verdict.decided_by == "human" and verdict.event_id == item.event.event_id
    assert verdict.supersedes is not None and verdict.supersedes.source == item.source
    assert verdict.supersedes.review_id == item.review_id
    (human,) = verdict.results
    assert human.violation and human.action == "delete" and human.rule_ids == ["H1"] and human.stage == "human"
    assert human.review is not None and human.review.status == "decided" and human.latency_ms == 300_000
    assert verdict.violation and verdict.action == "delete" and verdict.author_id == "u1"


def test_a_community_policys_review_is_decided_into_a_corrected_verdict_naming_that_community_policy():
    # Two communities and the platform use one id: the item and its verdict name the community's, by key.
    own = Policy(id=POLICY.id, version="gamers-v1", text="", community="gamers", actions={"harassment": "timeout"},
                 baseline_actions={POLICY.id: {"harassment": "allow"}})  # fmt: skip
    other = Policy(id=POLICY.id, version="kids-v1", text="", community="kids", actions={"harassment": "escalate"})
    policies = {p.key: p for p in (POLICY, own, other)}
    event = ContentEvent(event_id="e8", content="git gud", author_id="u1", community_id="gamers")
    platform_result = outputs.policy_result(POLICY, UNDECIDED, 1.0)
    own_result = outputs.policy_result(own, UNDECIDED, 1.0)
    items = ReviewOpener(ReviewSettings(enabled=True)).open(event, event, lambda: SOURCE, [platform_result, own_result],
                                                          [UNDECIDED, UNDECIDED], [POLICY, own])  # fmt: skip
    platform_item, item = items
    assert (item.policy_id, item.policy_community, item.policy_key) == (POLICY.id, "gamers", "gamers/chat-harassment")
    assert platform_item.policy_community is None and platform_item.review_id != item.review_id
    later = item.created_at + timedelta(minutes=1)
    decision = ReviewDecision(review_id=item.review_id, violation=True, category="harassment", reviewer_id="mod-1",
                              decided_at=later)  # fmt: skip
    communities = CommunityIndex(lambda: policies)
    verdict = Verdict.model_validate(corrected_verdict(item, decision, lambda: policies, communities=communities))
    human = verdict.results[-1]
    assert (human.policy_id, human.policy_version, human.policy_community) == (POLICY.id, "gamers-v1", "gamers")
    assert human.action == "timeout"  # the community policy's own actions, not the platform's or another community's
    assert verdict.community_id == "gamers" and verdict.decided_by == "human"
    # The platform policy's review of the same event: the community's baseline_actions apply to its answer.
    decided = ReviewDecision(review_id=platform_item.review_id, violation=True, category="harassment",
                             reviewer_id="mod-1", decided_at=later)  # fmt: skip
    corrected = corrected_verdict(platform_item, decided, lambda: policies, communities=communities)
    platform = Verdict.model_validate(corrected)
    assert platform.results[-1].policy_community is None and platform.results[-1].action == "allow"


def test_malformed_decisions_are_rejected_with_their_error_type_and_no_values():
    with pytest.raises(RejectedInput) as bad_json:
        parse(ReviewDecision, b'{"review_id": ')
    assert bad_json.value.error_type is ErrorType.INVALID_JSON
    with pytest.raises(RejectedInput) as missing:
        parse(ReviewDecision, b'{"review_id": "rv-1", "violation": "perhaps", "secret": "x"}')
    assert missing.value.error_type is ErrorType.SCHEMA_VIOLATION
    assert "violation" in str(missing.value) and "reviewer_id" in str(missing.value) and "perhaps" not in str(missing.value)


def test_the_first_decision_counts_even_when_it_arrives_before_its_item():
    item, first = item_and_decision(False)
    _, again = item_and_decision(True)
    state = ReviewState()
    assert state.add_decision(first, ("d", 0, 0)) is None  # the item is not read yet
    (decided,) = state.add_item(item)
    assert decided.decision == first
    assert state.add_decision(again, ("d", 0, 1)) is None
    applied = state.applied(item.review_id)
    assert applied is not None and applied.at == ("d", 0, 0) and state.open_reviews() == {}
    assert state.agreement == {("chat-harassment", "undecided", False): 1}
    assert state.latency_sum_s == 300 and sum(state.latency_buckets) == 1
    assert state.add_item(item) == []  # the same item read twice


def test_a_record_with_a_verdict_and_review_items_is_done_when_the_last_is_delivered():
    tracker = OffsetTracker()
    joined = OutputJoin(tracker.done_many)
    first, second = tracker.track("t", 0, 0, 10), tracker.track("t", 0, 1, 10)
    joined.expect(first, 3)
    joined.done_many([first, second])
    assert tracker.commit_positions() == {}  # offset 0 still waits for two outputs
    joined.done_many([first])
    assert tracker.commit_positions() == {}
    joined.done_many([first])
    assert tracker.commit_positions() == {("t", 0): 2}


def test_review_reasons_and_config_names_agree():
    from consumer.config.review import REASONS

    assert set(REASONS) == {r.value for r in ReviewReason}
    assert ReviewSettings(enabled=True, when=["appeal"]).opens("appeal")
    assert not ReviewSettings(enabled=True, when=["appeal"]).opens("undecided")


def test_a_shadow_disagreement_opens_a_review_with_both_answers():
    opener = ReviewOpener(ReviewSettings(enabled=True))
    cheap = Classification(violation=True, confidence="0.970", model="cascade:lexical", stage="lexical")
    event = ContentEvent(event_id="e9", content="free nitro?", author_id="u1")
    results = [outputs.policy_result(POLICY, cheap, 1.0)]
    opener.remember("e9/chat-harassment", event, SOURCE, b"key", results)
    reasoner = Classification(violation=False, category="safe", confidence="high", model="gpt-oss", stage="reasoner")
    opened = opener.disagreement("e9/chat-harassment", event, POLICY, reasoner)
    assert opened is not None
    item, key = opened
    assert key == b"key" and item.reason is ReviewReason.DISAGREEMENT
    assert item.machine.stage == "lexical" and item.machine.violation
    assert item.second_opinion is not None and item.second_opinion.violation is False
    assert opener.disagreement("e9/chat-harassment", event, POLICY, reasoner) is None  # once


def test_the_metrics_show_open_reviews_agreement_and_decision_latency():
    from prometheus_client import generate_latest

    from consumer.pipeline.telemetry.metrics import prometheus_meter_provider
    from consumer.review import metrics

    provider, registry = prometheus_meter_provider()
    state = ReviewState()
    metrics.register(provider.get_meter("test"), state, registry)
    item, decision = item_and_decision(False)
    state.add_item(item)
    assert 'safeguard_review_open{' in generate_latest(registry).decode()
    state.add_decision(decision, ("d", 0, 0))
    lines = generate_latest(registry).decode().splitlines()
    agreed = [line for line in lines if line.startswith("safeguard_review_decisions_total{")]
    assert len(agreed) == 1 and 'agreed="false"' in agreed[0] and 'stage="undecided"' in agreed[0]
    assert "safeguard_review_decision_latency_seconds_sum 300.0" in lines
    assert not any(line.startswith("safeguard_review_open{") for line in lines)
    # Not a disagreement review, yet both sides of its (policy, stage) are there, at 0.
    right = sorted(line for line in lines if line.startswith("safeguard_review_disagreement_right_total{"))
    assert len(right) == 2 and all(line.endswith(" 0.0") for line in right), right
    assert 'side="cheap"' in right[0] and 'side="reasoner"' in right[1]


def test_the_disagreement_counters_of_the_policies_in_force_show_at_0_before_any_decision():
    from prometheus_client import generate_latest

    from consumer.pipeline.telemetry.metrics import prometheus_meter_provider
    from consumer.review import metrics

    provider, registry = prometheus_meter_provider()
    metrics.register(provider.get_meter("test"), ReviewState(), registry,
                     lambda: [(POLICY.id, "lexical"), (POLICY.id, "embedding")])  # fmt: skip
    lines = generate_latest(registry).decode().splitlines()
    right = sorted(line for line in lines if line.startswith("safeguard_review_disagreement_right_total{"))
    assert len(right) == 4 and all(line.endswith(" 0.0") for line in right), right
    assert sum(f'policy="{POLICY.id}"' in line for line in right) == 4
