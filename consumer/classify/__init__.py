"""The boundary between the pipeline and any engine: the `Classifier` Protocol.

The pipeline hands a classifier one (event, policy) request at a time, as many concurrently
as the classifier's `capacity()` allows, and gets back a `Classification` or a
`ClassificationFailed` naming the dead-letter error type. This module holds the contract only
and imports no implementation. Implementations: `keyword` (deterministic pattern matching
from the policy's `patterns`), `engine` (gpt-oss-safeguard on vLLM), `cascade` (cheap stages
in front of a reasoner), and any user class loaded by `plugin`; `factory` builds the one the
configuration names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from consumer.classify.exceptions import ClassificationFailed
from consumer.events import ContentEvent
from consumer.policy import Policy


class EventView(Protocol):
    """An event's view for the classifier, not built yet: `content` is at hand, the whole event
    is built by calling it (once; later calls return the same event)."""

    content: str

    def __call__(self) -> ContentEvent: ...


class ClassifyRequest:
    """One (event, policy) classification.

    `event` is the event as the classifier should see it: in a chat stream, with the
    conversation's earlier messages as context and the authors pseudonymised
    (`consumer.pipeline.chat`). Building that view costs more than a cheap stage's whole
    decision, so the pipeline may hand over an `EventView` instead: it is built on the first
    read of `event`. A classifier that needs the text alone reads `content`, which builds
    nothing. `deadline`: time.monotonic() after which the request is abandoned.
    """

    __slots__ = ("_event", "content", "policy", "request_id", "deadline")  # one is made per (record, policy)

    def __init__(self, event: ContentEvent | EventView, policy: Policy, request_id: str, deadline: float | None = None):
        self._event = event
        self.content = event.content
        self.policy = policy
        self.request_id = request_id
        self.deadline = deadline

    @property
    def event(self) -> ContentEvent:
        event = self._event
        if not isinstance(event, ContentEvent):
            event = self._event = event()
        return event

    def __repr__(self) -> str:
        return f"ClassifyRequest({self.request_id!r}, policy={self.policy.ref!r})"


@dataclass
class Classification:
    violation: bool
    category: str | None = None
    rule_ids: list[str] = field(default_factory=list)
    confidence: str | None = None
    rationale: str | None = None
    reasoning: str | None = None
    model: str = "unknown"
    stage: str | None = None  # which stage decided, one of `consumer.stages` (cache, lexical, ..., undecided)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Capacity:
    """How much work the classifier can hold at once; the batcher never exceeds it."""

    max_sequences: int
    max_tokens: int | None = None  # KV-cache tokens, when the engine knows them


@runtime_checkable
class Classifier(Protocol):
    name: str

    async def start(self) -> None: ...

    def capacity(self) -> Capacity: ...

    async def classify(self, request: ClassifyRequest) -> Classification:
        """Classify one request; raise ClassificationFailed when no verdict is possible for it,
        `consumer.errors.Unavailable` when what the classifier needs is down (never the record's
        fault: the pipeline keeps the record and asks again)."""
        ...

    async def close(self) -> None: ...


# What a classifier may offer besides the contract, each a Protocol of its own so that the
# pipeline asks with isinstance, once, and a plugin implements only what it has.


@runtime_checkable
class AnswersAtOnce(Protocol):
    def classify_now(self, request: ClassifyRequest) -> Classification | None:
        """An answer the classifier can give without waiting (a keyword match, a cache hit), or
        None to be asked through the batcher. The pipeline then skips the batcher and its
        queueing for that request."""
        ...


@runtime_checkable
class AnswersManyAtOnce(Protocol):
    def classify_now_many(self, requests: Sequence[ClassifyRequest]) -> list[Classification | ClassificationFailed | None]:
        """`classify_now` for a batch (a poll batch's requests, in order), one entry per request:
        its answer, its failure (a `ClassificationFailed` returned, not raised: it costs that
        request only), or None to be asked through the batcher. What a classifier gains: one
        pass of its fixed costs (a vectorisation, a matrix product, a calibration call) for the
        whole batch instead of one per request."""
        ...


@runtime_checkable
class ReportsHealth(Protocol):
    async def check_health(self) -> None:
        """Raise when the classifier can no longer answer (an engine whose core died)."""
        ...


@runtime_checkable
class ProbesDependency(Protocol):
    async def probe(self, dependency: str) -> bool | None:
        """While `dependency` (as named by an `Unavailable` this classifier raised) is down: True
        once it answers again, False while it does not, None when this classifier cannot ask it."""
        ...


@runtime_checkable
class LearnsFromReview(Protocol):
    async def learn_from_review(
        self, request: ClassifyRequest, answer: Classification, heads: bool = True, corrects: bool = False
    ) -> None:
        """A person's answer for this (event, policy): from now on the same content is answered
        with it, and with `heads` the learned stages take it as a label weighted above the
        reasoner's (False when the answer is replayed at start and the heads saved it already).
        `corrects`: a lead's overturn, whose answer replaces an earlier person's: what the heads
        learned of this content under the other label is forgotten."""
        ...


@runtime_checkable
class ReportsDisagreements(Protocol):
    # Called on the event loop when a shadow check's reasoner answer disagrees with the cheap
    # verdict already given: (request, cheap verdict, reasoner verdict).
    on_disagreement: Callable[[ClassifyRequest, Classification, Classification], None] | None


@runtime_checkable
class CountsDecisions(Protocol):
    counters: Mapping[str, Any]  # policy id -> what decided how often, for the metrics
