"""Settings of human review (`review:`), of the bridge to ROOST's Coop (`review.coop`) and of the
review console (`review.console`, in console.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from consumer.config.console import ConsoleSettings

Reason = Literal["undecided", "low_confidence", "disagreement", "appeal", "sampled"]
REASONS: tuple[Reason, ...] = ("undecided", "low_confidence", "disagreement", "appeal", "sampled")


class CoopAction(BaseModel):
    """What a Coop action taken by a moderator means as a decision."""

    model_config = ConfigDict(extra="forbid")

    violation: bool
    category: str | None = None
    rule_ids: list[str] = Field(default_factory=list)


class CoopSettings(BaseModel):
    """The bridge to a Coop instance (`safeguard-consumer review coop-bridge`)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="Coop's base URL, e.g. https://coop.example.com")
    api_key: SecretStr | None = Field(default=None, description="X-API-KEY; keep it in SAFEGUARD_REVIEW__COOP__API_KEY")
    item_type_id: str | None = Field(default=None, description="the Coop Item Type the review items are sent as")
    webhook_public_key: str | None = Field(
        default=None, description="PEM of Coop's webhook signature verification key (Settings > API Keys)"
    )
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8090, ge=0, le=65535)
    webhook_read_timeout_s: float = Field(
        default=10.0, gt=0, description="a webhook's headers and body must arrive within this; a stalled one is closed"
    )
    webhook_max_age_s: float = Field(
        default=86400.0, gt=0, description="a signed webhook whose createdAt is further than this from now is refused "
        "(longer than Coop's five retries take)",
    )
    actions: dict[str, CoopAction] = Field(
        default_factory=dict, description="Coop action id -> the decision it stands for"
    )
    group_id: str | None = Field(default=None, description="the bridge's consumer group; default <kafka.group_id>.coop")


class ReviewSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="open reviews and apply decisions (needs the three topics)")
    topic: str = Field(default="review-items", description="review items, keyed like the input")
    decisions_topic: str = Field(default="review-decisions", description="moderators' decisions, keyed by review_id")
    appeals_topic: str = Field(default="review-appeals", description="users' appeals")
    when: list[Reason] = Field(
        default_factory=lambda: ["undecided", "low_confidence", "disagreement", "appeal", "sampled"],
        description="which reasons open a review",
    )
    min_confidence: Literal["low", "medium", "high"] = Field(
        default="medium", description="a reasoner answer below this confidence tier opens a low_confidence review"
    )
    sample_fraction: float = Field(default=0.0, ge=0, le=1, description="share of decided results sent for review")
    group_id: str | None = Field(
        default=None, description="the decisions/appeals consumer group; default <kafka.group_id>.review"
    )
    appeal_search_records: int = Field(
        default=10_000, ge=1, description="verdict-topic records read back per partition to find an appealed verdict"
    )
    max_items: int = Field(default=1_000_000, ge=1, description="review items held in memory (oldest decided go first)")
    coop: CoopSettings = Field(default_factory=CoopSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    def opens(self, reason: str) -> bool:
        return self.enabled and reason in self.when
