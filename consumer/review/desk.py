"""`ReviewDesk`: what the pipeline holds of human review, behind one small interface.

- `open(...)`, on the event loop for each verdict: marks the results a person should look at
  and returns their review items (`ReviewOpener`); the pipeline sends them with the verdict,
  under the record's ticket, so the record's offset is committed only once the verdict and
  every review item were delivered;
- `start()` / `stop()`: the review loop (`ReviewLoop`: state rebuilt from the topics,
  decisions and appeals applied, committed after delivery);
- what a decision teaches: the classifier's `learn_from_review` (the cache answers the content
  with the person's answer from now on; the cascade's heads learn it), on the event loop;
- shadow disagreements (`ReportsDisagreements`) open reviews through the loop's producer.

Disabled (`review.enabled: false`, or a pipeline whose sink carries no review items: a replay),
only one rule stays: an undecided result takes the policy's review action (hold).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from consumer import stages
from consumer.classify import (
    Classification,
    Classifier,
    ClassifyRequest,
    LearnsFromReview,
    ReportsDisagreements,
)
from consumer.config import Settings
from consumer.config.review import ReviewSettings
from consumer.events import ContentEvent, Document, ReviewItem
from consumer.kafka import records
from consumer.kafka.client import Message
from consumer.policy import Policy
from consumer.review import metrics
from consumer.review.decisions import as_classification
from consumer.review.items import ReviewOpener
from consumer.review.loop import ReviewLoop
from consumer.review.state import Decided, ReviewState

log = logging.getLogger(__name__)


class ReviewDesk:
    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        policies: Callable[[], Mapping[str, Policy]],
        decode: Callable[[Message], ContentEvent],
        enabled: bool,
        meter: Any = None,
        registry: Any = None,
    ):
        review = settings.review if enabled else ReviewSettings(enabled=False)
        self.enabled = review.enabled
        self.opener = ReviewOpener(review)
        self.state = ReviewState(review.max_items)
        self._settings = settings
        self._classifier = classifier
        self._policies = policies
        self._decode = decode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.review_loop: ReviewLoop | None = None
        self.taught = 0
        if self.enabled and meter is not None:
            cheap = stages.LEARNED if review.opens("disagreement") else ()
            metrics.register(meter, self.state, registry,
                             lambda: [(policy, stage) for policy in self._policies() for stage in cheap])  # fmt: skip

    def open(
        self,
        event: ContentEvent,
        requests: list[ClassifyRequest],
        record: Message,
        results: list[Document],
        outcomes: list[Classification],
    ) -> list[ReviewItem]:
        """`requests`: the event's, one per result; `record`: the input record. Disabled, nothing
        is built: this is asked of every verdict."""
        if not self.enabled:
            return []
        return self.opener.open(event, requests[0].event, lambda: records.source_of(record), results, outcomes,
                                [request.policy for request in requests])  # fmt: skip

    def remember(self, requests: list[ClassifyRequest], event: ContentEvent, record: Message,
                 results: list[Document]) -> None:  # fmt: skip
        """Cheap-stage decisions a shadow check may contradict (only when disagreements open reviews)."""
        if self.review_loop is None or not self.opener.remembers:
            return
        where = None
        for request, result in zip(requests, results):
            if result.get("stage") in stages.LEARNED:
                where = where or records.source_of(record)
                self.opener.remember(request.request_id, event, where, record.key(), results)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, on_fatal: Callable[[str], None]) -> None:
        """Blocking (the state is rebuilt from the topics first): call it off the event loop."""
        self._loop = loop
        if not self.enabled:
            return
        self.review_loop = ReviewLoop(self._settings, self.state, self._policies, self._decode, self._decided, on_fatal)
        try:
            self.review_loop.start()
        except Exception as exc:  # noqa: BLE001 - e.g. a review topic missing: stop with the reason, exit 1
            log.error("the review loop cannot start: %s", exc)
            on_fatal(f"the review loop cannot start: {type(exc).__name__}: {exc}")
            return
        if isinstance(self._classifier, ReportsDisagreements) and self.opener.remembers:
            self._classifier.on_disagreement = self._disagreement

    def stop(self) -> None:
        if self.review_loop is not None:
            self.review_loop.stop()

    # -- what decisions teach ------------------------------------------------------------------

    def _decided(self, decided: Decided, live: bool) -> None:
        """On the review loop's thread: teach the classifier on the event loop."""
        if self._loop is not None and isinstance(self._classifier, LearnsFromReview):
            self._loop.call_soon_threadsafe(self._teach_soon, decided, live)

    def _teach_soon(self, decided: Decided, live: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._teach(decided, live))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _teach(self, decided: Decided, live: bool) -> None:
        item = decided.item
        policy = self._policies().get(item.policy_key)
        if policy is None or policy.version != item.policy_version:
            return  # a decision under another version of the policy teaches this one nothing
        event = ContentEvent(event_id=item.event.event_id, content=item.event.content)
        request = ClassifyRequest(event, policy, f"{item.review_id}/review")
        try:
            await self._classifier.learn_from_review(  # type: ignore[attr-defined]
                request, as_classification(decided.decision), heads=live, corrects=decided.replaces is not None
            )
            self.taught += 1
        except Exception:  # noqa: BLE001 - learning is an improvement, never a reason to stop
            log.exception("learning from review %s failed", item.review_id)

    def _disagreement(self, request: ClassifyRequest, cheap: Classification, reasoner: Classification) -> None:
        opened = self.opener.disagreement(request.request_id, request.event, request.policy, reasoner)
        if opened is not None and self.review_loop is not None:
            self.review_loop.submit(*opened)
