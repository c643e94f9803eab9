"""Settings of chat moderation: conversation context and repeat offenders (`chat:`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OffenderThreshold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    violations: int = Field(ge=1, description="violations within the window")
    action: str = Field(description="the action at least taken from this count on")


class ChatSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context_messages: int = Field(default=0, ge=0, description="history per conversation; 0: off")
    context_seconds: float = Field(default=900.0, gt=0)
    max_channels: int = Field(default=10_000, ge=1)
    max_message_chars: int = Field(default=500, ge=1)
    rebuild_records: int = Field(default=200, ge=0, description="input records read back per assigned partition")
    offender_window_s: float = Field(default=86_400.0, gt=0)
    offender_thresholds: list[OffenderThreshold] = Field(default_factory=list)
    max_authors: int = Field(default=100_000, ge=1)
