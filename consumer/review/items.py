"""Opening reviews: which results a person should look at, and the review item that asks them.

`ReviewRule` owns the rule "a result gets `review` when a person should look": it names the
reason of one (event, policy) result, or None; `ReviewOpener` applies it to a verdict's
results on the event loop (and remembers cheap decisions a shadow check may contradict); `review_item` builds the self-contained
`ReviewItem` (consumer.events) from what the pipeline had at hand: the event as the model saw
it, the machine's result, the source coordinates, the other policies' results.

Review ids are derived from the source coordinates, the policy and the reason, so a record
read again after a crash opens the same review, not a second one.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from consumer import stages
from consumer.classify import Classification
from consumer.config.review import ReviewSettings
from consumer.events import (
    ContentEvent,
    Document,
    MachineResult,
    PolicyResult,
    ReviewContextMessage,
    ReviewEvent,
    ReviewItem,
    ReviewReason,
    SourceRecord,
    policy_key,
)
from consumer.policy import Policy

# The reasoner's confidence tiers (the guide's rich output), lowest first.
CONFIDENCE_TIERS = ("low", "medium", "high")


def review_id_for(source: Document, policy_key: str, reason: str) -> str:
    """The same record, policy (its key: `community/id`, or the id) and reason always give the
    same id (at-least-once re-reads)."""
    text = f"{source['topic']}\x00{source['partition']}\x00{source['offset']}\x00{policy_key}\x00{reason}"
    return "rv-" + hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


class ReviewRule:
    """Names why a result needs a person, per `review:`; samples exactly `sample_fraction` of the
    decided results of each policy, spread evenly (the n-th is sampled when floor(n * fraction)
    steps up). Used on the event loop only."""

    def __init__(self, settings: ReviewSettings):
        self.settings = settings
        self._min_tier = CONFIDENCE_TIERS.index(settings.min_confidence)
        self._ticks: dict[str, int] = {}

    def reason_for(self, policy: Policy, outcome: Classification) -> ReviewReason | None:
        s = self.settings
        if not s.enabled:
            return None
        if outcome.stage == stages.UNDECIDED:
            return ReviewReason.UNDECIDED if s.opens("undecided") else None
        if outcome.stage == stages.HUMAN or (outcome.model or "").endswith(":human"):
            return None  # a person decided this content already
        if (
            s.opens("low_confidence")
            and outcome.stage not in stages.NOT_REASONER
            and outcome.confidence in CONFIDENCE_TIERS
            and CONFIDENCE_TIERS.index(outcome.confidence) < self._min_tier
        ):
            return ReviewReason.LOW_CONFIDENCE
        if s.sample_fraction > 0 and s.opens("sampled"):
            tick = self._ticks.get(policy.key, 0) + 1
            self._ticks[policy.key] = tick
            if math.floor(tick * s.sample_fraction) != math.floor((tick - 1) * s.sample_fraction):
                return ReviewReason.SAMPLED
        return None


def review_event(original: ContentEvent, view: ContentEvent) -> ReviewEvent:
    """The event as the model saw it: its context, authors as pseudonyms, never a user id."""
    pseudonymised = view is not original
    author = view.author_id if pseudonymised else ("user-1" if original.author_id is not None else None)
    return ReviewEvent(
        event_id=original.event_id,
        content=original.content,
        content_type=original.content_type,
        author=author,
        created_at=original.created_at,
        context=[ReviewContextMessage(author=m.author_id if pseudonymised else None, content=m.content)
                 for m in view.context],  # fmt: skip
        metadata=original.metadata,
    )


def machine_result(result: Document) -> MachineResult:
    """The machine's part of a `PolicyResult` document."""
    return MachineResult(
        violation=result["violation"],
        category=result.get("category"),
        rule_ids=list(result.get("rule_ids") or []),
        confidence=result.get("confidence"),
        rationale=result.get("rationale"),
        stage=result.get("stage"),
        model=result["model"],
        action=result["action"],
        reasoning=result.get("reasoning"),
    )


def review_item(
    reason: ReviewReason,
    result: Document,
    event: ReviewEvent,
    source: Document,
    subject: ContentEvent,
    other_results: list[Document] = (),  # type: ignore[assignment]
    appeal: str | None = None,
    second_opinion: MachineResult | None = None,
    created_at: datetime | None = None,
) -> ReviewItem:
    """The review item for one policy's `result` of `event`; `subject` gives the ids the corrected
    verdict carries (author, community, conversation)."""
    community = result.get("policy_community")
    return ReviewItem(
        review_id=review_id_for(source, policy_key(result["policy_id"], community), reason.value),
        reason=reason,
        created_at=created_at or datetime.now(timezone.utc),
        policy_id=result["policy_id"],
        policy_version=result["policy_version"],
        policy_community=community,
        event=event,
        machine=machine_result(result),
        source=SourceRecord.model_validate(source),
        author_id=subject.author_id,
        community_id=subject.community_id,
        context_id=subject.context_id,
        other_results=[PolicyResult.model_validate(r) for r in other_results],
        appeal=appeal,
        second_opinion=second_opinion,
    )


def pending(reason: ReviewReason, review_id: str) -> dict[str, Any]:
    """The `review` object of a result awaiting a person."""
    return {"status": "pending", "reason": reason.value, "review_id": review_id}


# How many recent cheap decisions are remembered for a shadow check's disagreement to open a
# review about (the shadow answer comes back within seconds).
RECENT_CHEAP_DECISIONS = 4096


class ReviewOpener(ReviewRule):
    """On the event loop: marks the results a person should look at and builds their items."""

    def __init__(self, settings: ReviewSettings):
        super().__init__(settings)
        self._recent: OrderedDict[str, tuple[ContentEvent, Document, bytes | None, list[Document]]] = OrderedDict()
        self._disagreements = settings.opens("disagreement")

    def open(
        self,
        event: ContentEvent,
        view: ContentEvent,
        source: Callable[[], Document],
        results: list[Document],
        outcomes: list[Classification],
        policies: list[Policy],
    ) -> list[ReviewItem]:
        """Marks `results` in place and returns the review items to send with the verdict."""
        if not self.settings.enabled:
            return []
        items: list[tuple[int, ReviewReason]] = []
        where: Document | None = None
        for i, (result, outcome, policy) in enumerate(zip(results, outcomes, policies)):
            reason = self.reason_for(policy, outcome)
            if reason is None:
                continue
            where = where or source()
            result["review"] = pending(reason, review_id_for(where, policy.key, reason.value))
            items.append((i, reason))
        if not items:
            return []
        assert where is not None
        shown = review_event(event, view)
        return [
            review_item(reason, results[i], shown, where, event, [r for j, r in enumerate(results) if j != i])
            for i, reason in items
        ]

    def remember(self, request_id: str, event: ContentEvent, source: Document, key: bytes | None,
                 results: list[Document]) -> None:  # fmt: skip
        """A cheap stage's decision a shadow check may contradict later."""
        if not self._disagreements:
            return
        self._recent[request_id] = (event, source, key, results)
        while len(self._recent) > RECENT_CHEAP_DECISIONS:
            self._recent.popitem(last=False)

    @property
    def remembers(self) -> bool:
        return self._disagreements

    def disagreement(
        self, request_id: str, view: ContentEvent, policy: Policy, reasoner: Classification
    ) -> tuple[ReviewItem, bytes | None] | None:
        """The review a shadow disagreement opens, with its key; None when the decision is forgotten."""
        remembered = self._recent.pop(request_id, None)
        if remembered is None:
            return None
        event, source, key, results = remembered
        mine = [r for r in results if r["policy_id"] == policy.id and r.get("policy_community") == policy.community]
        if not mine:
            return None
        result = mine[0]
        others = [r for r in results if r is not result]
        second = MachineResult(violation=reasoner.violation, category=reasoner.category,
                               rule_ids=list(reasoner.rule_ids), confidence=reasoner.confidence,
                               rationale=reasoner.rationale, stage=reasoner.stage, model=reasoner.model,
                               action=result["action"])  # fmt: skip
        item = review_item(ReviewReason.DISAGREEMENT, result, review_event(event, view), source, event, others,
                           second_opinion=second)  # fmt: skip
        return item, key
