"""Event contracts: what comes in (ContentEvent), what goes out (Verdict, DeadLetter), and the
human review loop's records (ReviewItem out; ReviewDecision, ReviewNote and Appeal in).

These pydantic models are the single source of the JSON Schemas under `schemas/`
(`safeguard-consumer schemas export`); a test fails when the two drift apart.
"""

from __future__ import annotations

import base64
import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

# The shapes outputs travel in before they are bytes on the wire.
Headers = list[tuple[str, bytes | None]]  # Kafka record headers
Document = dict[str, Any]  # a JSON-ready output: a verdict or a dead letter


def _int_id_to_str(value: Any) -> Any:
    # Chat platforms use integer ids (Discord snowflakes); accept them as their decimal text.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Id = Annotated[str, BeforeValidator(_int_id_to_str)]


class ErrorType(str, enum.Enum):
    """Why a record became a dead letter; the values are the dead-letter `error.type`."""

    INVALID_JSON = "invalid_json"
    INVALID_ENCODING = "invalid_encoding"
    SCHEMA_VIOLATION = "schema_violation"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    NO_POLICY = "no_policy"
    CLASSIFIER_ERROR = "classifier_error"
    UNPARSEABLE_OUTPUT = "unparseable_output"
    OUTPUT_REJECTED = "output_rejected"
    # registry formats: an unknown schema id, or bytes that do not match their schema
    DESERIALIZATION_FAILED = "deserialization_failed"
    # the review loop's inputs (decisions and appeals topics)
    UNKNOWN_REVIEW = "unknown_review"
    CONFLICTING_DECISION = "conflicting_decision"
    APPEAL_NOT_FOUND = "appeal_not_found"


class ContextMessage(BaseModel):
    """An earlier message of the same conversation, shown to the classifier as context."""

    model_config = ConfigDict(extra="ignore")

    content: str
    author_id: Id | None = None
    event_id: Id | None = None
    created_at: datetime | None = None


class ContentEvent(BaseModel):
    """One piece of user content to classify: a chat message, a review, a forum post."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    event_id: Id = Field(min_length=1, max_length=512)
    content: str = Field(min_length=1)
    content_type: str | None = Field(default=None, description="e.g. chat_message, review, forum_post")
    author_id: Id | None = None
    context_id: Id | None = Field(default=None, description="channel, thread or listing")
    community_id: Id | None = Field(default=None, description="guild, server or shop")
    created_at: datetime | None = None
    context: list[ContextMessage] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="free-form; chat streams may set event_type (create, edit, delete) and reply_to (an event_id)",
    )


class SourceRecord(BaseModel):
    """Where an output came from: the input record's coordinates."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


class ReviewReason(str, enum.Enum):
    """Why a person should look at a result; the values are `review.reason`."""

    UNDECIDED = "undecided"  # no stage reached the target precision and no reasoner decided
    LOW_CONFIDENCE = "low_confidence"  # the reasoner's confidence is below review.min_confidence
    DISAGREEMENT = "disagreement"  # a shadow check disagreed with a cheap stage
    APPEAL = "appeal"  # a user appealed the verdict
    SAMPLED = "sampled"  # review.sample_fraction of decided results, for quality control


class ReviewStatus(BaseModel):
    """A result's place in human review: `pending` on the machine verdict, `decided` on the corrected one."""

    status: Literal["pending", "decided"]
    reason: ReviewReason
    review_id: str


def policy_key(policy_id: str, community: str | None) -> str:
    """A policy's key among the policies in force: its id, scoped by the community that owns it."""
    return f"{community}/{policy_id}" if community else policy_id


class PolicyResult(BaseModel):
    """One policy's decision on one event."""

    policy_id: str
    policy_version: str
    policy_community: str | None = Field(
        default=None, description="the community whose own policy this is; null: a platform (baseline) policy"
    )
    violation: bool
    category: str | None = None
    rule_ids: list[str] = Field(default_factory=list)
    confidence: str | None = None
    rationale: str | None = None
    action: str = Field(description="from the policy's actions map: allow, flag, delete, timeout or escalate")
    reasoning: str | None = Field(default=None, description="analysis channel; only when enabled")
    model: str
    stage: str | None = Field(
        default=None,
        description="which stage decided: cache, lexical, embedding, reasoner or undecided (a cascade), human",
    )
    latency_ms: float
    review: ReviewStatus | None = Field(default=None, description="set when a person should look, or has looked")


class ReplayInfo(BaseModel):
    """Set on outputs of `safeguard-consumer replay`: which replay run produced them."""

    run_id: str
    started_at: datetime
    policies: list[str] = Field(description="id@version of every policy in force for the replay")


class VerdictTruncation(BaseModel):
    """What was cut from a verdict so that it fits the verdict topic (consumer.kafka.budget)."""

    cut: list[Literal["key", "reasoning", "rationale", "results"]] = Field(
        description="in the order cut: the record key (replaced by its sha256), reasoning, rationales, whole results"
    )
    original_bytes: int = Field(description="key, value and headers of the verdict before it was cut")
    results_omitted: int = Field(default=0, description="policy results left out, those without a violation first")
class Supersedes(BaseModel):
    """The verdict a corrected verdict replaces: undo or confirm what it asked for."""

    event_id: str
    source: SourceRecord
    review_id: str
    decided_by: Literal["machine", "human"] = Field(
        default="machine", description="whose verdict is replaced: the machine's, or a person's (a lead's overturn)"
    )
    decision: SourceRecord | None = Field(
        default=None, description="decided_by human: the decisions-topic record whose corrected verdict is replaced"
    )
    verdict: SourceRecord | None = Field(
        default=None, description="on an appeal: where the appealed verdict is on the verdict topic"
    )


class Verdict(BaseModel):
    """The output for one input event: every applicable policy's result and the overall call."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["verdict"] = "verdict"
    event_id: str
    source: SourceRecord
    violation: bool = Field(description="true if any policy found a violation")
    action: str = Field(description="the most severe action of all results, after repeat-offender upgrades")
    severity: str = Field(description="none, low, medium, high or critical, from the action")
    results: list[PolicyResult]
    author_id: str | None = None
    community_id: str | None = None
    context_id: str | None = None
    offender_violations: int | None = Field(
        default=None, description="the author's violations in this community within the offender window"
    )
    note: str | None = Field(default=None, description="e.g. why an event got no classification")
    latency_ms: float
    consumer_version: str
    replay: ReplayInfo | None = Field(default=None, description="set when a replay produced this verdict")
    truncated: VerdictTruncation | None = Field(
        default=None, description="set when the verdict was cut to fit its topic"
    )
    decided_by: Literal["machine", "human"] = "machine"
    supersedes: Supersedes | None = Field(default=None, description="set on a corrected verdict (decided_by human)")
    appeal: Literal["upheld", "overturned"] | None = Field(
        default=None, description="on a person's verdict on an appeal: whether the appealed answer stands"
    )


class CutField(BaseModel):
    """A field of the original record cut short so that the dead letter fits its topic."""

    size: int = Field(description="bytes of the whole field: the value or key, or the JSON of the headers array")
    kept: int = Field(description="bytes of it still in the dead letter, a prefix")
    sha256: str = Field(description="hex digest of the whole field's bytes")


class OriginalRecord(BaseModel):
    """The failed input record, byte for byte (key, value and header values in base64), or, when
    `truncated`, abbreviated: fetch the full record at the dead letter's `source` coordinates
    while the topic retains it, and check it against the cut fields' sha256."""

    key_b64: str | None
    value_b64: str | None
    headers: list[tuple[str, str | None]] = Field(
        default_factory=list, description="(name, base64 value) in the original order"
    )
    truncated: bool = Field(default=False, description="true when a field below was cut to fit the dead-letter topic")
    value_cut: CutField | None = None
    key_cut: CutField | None = None
    headers_cut: CutField | None = Field(default=None, description="the headers are cut whole: `headers` is empty")

    @classmethod
    def capture(
        cls, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]] | None
    ) -> OriginalRecord:
        return cls(
            key_b64=_b64(key),
            value_b64=_b64(value),
            headers=[(name, _b64(v)) for name, v in (headers or [])],
        )

    def value_bytes(self) -> bytes | None:
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)

    def key_bytes(self) -> bytes | None:
        return None if self.key_b64 is None else base64.b64decode(self.key_b64)


class DeadLetterError(BaseModel):
    type: ErrorType
    message: str
    raw_output: str | None = Field(default=None, description="the model's raw completion, if any")


class DeadLetter(BaseModel):
    """An input record that could not get a verdict, with the reason and its original bytes."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["dead_letter"] = "dead_letter"
    error: DeadLetterError
    source: SourceRecord
    original: OriginalRecord
    event_id: str | None = None
    attempts: int = 1
    failed_at: datetime
    consumer_version: str
    replay: ReplayInfo | None = Field(default=None, description="set when a replay produced this dead letter")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# -- human review -------------------------------------------------------------------------------


class ReviewContextMessage(BaseModel):
    """An earlier message of the conversation, as the model saw it: the author as a pseudonym."""

    author: str | None = Field(default=None, description="user-1, user-2, ...: stable within the conversation")
    content: str


class ReviewEvent(BaseModel):
    """The event under review, as the model saw it."""

    event_id: str
    content: str
    content_type: str | None = None
    author: str | None = Field(default=None, description="the author's pseudonym in the conversation")
    created_at: datetime | None = None
    context: list[ReviewContextMessage] = Field(default_factory=list, description="earlier messages, oldest first")
    metadata: dict[str, Any] = Field(default_factory=dict)


class MachineResult(BaseModel):
    """What the machine answered for the policy under review."""

    violation: bool
    category: str | None = None
    rule_ids: list[str] = Field(default_factory=list)
    confidence: str | None = None
    rationale: str | None = None
    stage: str | None = None
    model: str
    action: str = Field(description="the action the machine verdict asked for on this policy's account")
    reasoning: str | None = Field(default=None, description="the reasoner's analysis channel, where kept")


class ReviewItem(BaseModel):
    """One (event, policy) a person should decide; self-contained: everything a reviewer needs,
    and everything the consumer needs to issue the corrected verdict long after."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["review_item"] = "review_item"
    review_id: str
    reason: ReviewReason
    created_at: datetime
    policy_id: str
    policy_version: str
    policy_community: str | None = Field(
        default=None, description="the community whose own policy is reviewed; null: a platform policy"
    )
    event: ReviewEvent
    machine: MachineResult
    source: SourceRecord = Field(description="the input record's coordinates")
    author_id: str | None = Field(default=None, description="for the corrected verdict; not shown to the model")
    community_id: str | None = None
    context_id: str | None = None
    other_results: list[PolicyResult] = Field(
        default_factory=list, description="the machine verdict's results for the other policies, which stand"
    )
    appeal: str | None = Field(default=None, description="the appellant's reason, for reason appeal")
    second_opinion: MachineResult | None = Field(
        default=None, description="for reason disagreement: the reasoner's answer that disagreed with `machine`"
    )
    truncated: list[Literal["key", "reasoning", "rationale", "context", "content"]] | None = Field(
        default=None,
        description="what was cut, in order, to fit the review topic (consumer.kafka.budget); the whole "
        "record is at `source` while the input topic retains it",
    )
    author_violations: int | None = Field(
        default=None,
        description="the author's violations in this community within chat.offender_window_s before this event; "
        "null when offender counting is off",
    )
    verdict: SourceRecord | None = Field(
        default=None, description="for reason appeal: where the appealed verdict is on the verdict topic"
    )

    @property
    def policy_key(self) -> str:
        """The reviewed policy's key among the policies in force (`community/id`, or the id)."""
        return policy_key(self.policy_id, self.policy_community)


class ReviewDecision(BaseModel):
    """A person's answer to one review item. `decision`: the first read per `review_id` counts;
    `overturn`: a lead replaces the answer that stands on a decided item, with a reason (`note`)."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["decision", "overturn"] = "decision"
    review_id: str = Field(min_length=1)
    violation: bool
    category: str | None = None
    rule_ids: list[str] = Field(default_factory=list)
    note: str | None = Field(default=None, description="the corrected verdict's rationale; an overturn's reason")
    reviewer_id: Id = Field(min_length=1)
    decided_at: datetime

    @model_validator(mode="after")
    def _overturn_says_why(self) -> ReviewDecision:
        if self.kind == "overturn" and not (self.note or "").strip():
            raise ValueError("an overturn needs a note: the reason")
        return self


class ReviewNote(BaseModel):
    """Not a decision, beside them on the decisions topic (keyed by review id): an escalation to
    the lead queue or an internal comment, shown to the next person who opens the item. It yields
    no corrected verdict and no dead letter."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["escalation", "comment"]
    review_id: str = Field(min_length=1)
    text: str = Field(min_length=1, max_length=4000, description="the escalation's reason, or the comment")
    reviewer_id: Id = Field(min_length=1)
    written_at: datetime


class Appeal(BaseModel):
    """A user's appeal of a verdict: names the event by id or by its source coordinates."""

    model_config = ConfigDict(extra="ignore")

    event_id: Id | None = None
    source: SourceRecord | None = None
    policy_id: str | None = Field(
        default=None, description="the policy appealed, its id or community/id; default: the one that acted"
    )
    reason: str = Field(min_length=1, max_length=4000)
    appellant_id: Id | None = None
    appealed_at: datetime | None = None

    @model_validator(mode="after")
    def _names_the_event(self) -> Appeal:
        if self.event_id is None and self.source is None:
            raise ValueError("an appeal needs event_id or source")
        return self


EXPORTED_MODELS: dict[str, type[BaseModel]] = {
    "content-event": ContentEvent,
    "verdict": Verdict,
    "dead-letter": DeadLetter,
    "review-item": ReviewItem,
    "review-decision": ReviewDecision,
    "review-note": ReviewNote,
    "appeal": Appeal,
}
