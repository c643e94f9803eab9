"""Event contracts: what comes in (ContentEvent), what goes out (Verdict, DeadLetter).

These pydantic models are the single source of the JSON Schemas under `schemas/`
(`safeguard-consumer schemas export`); a test fails when the two drift apart.
"""

from __future__ import annotations

import base64
import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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


class PolicyResult(BaseModel):
    """One policy's decision on one event."""

    policy_id: str
    policy_version: str
    violation: bool
    category: str | None = None
    rule_ids: list[str] = Field(default_factory=list)
    confidence: str | None = None
    rationale: str | None = None
    action: str = Field(description="from the policy's actions map: allow, flag, delete, timeout or escalate")
    reasoning: str | None = Field(default=None, description="analysis channel; only when enabled")
    model: str
    stage: str | None = Field(
        default=None, description="which stage decided: cache, lexical, embedding, reasoner or undecided (a cascade)"
    )
    latency_ms: float


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


EXPORTED_MODELS: dict[str, type[BaseModel]] = {
    "content-event": ContentEvent,
    "verdict": Verdict,
    "dead-letter": DeadLetter,
}
