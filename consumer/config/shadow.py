"""Settings of shadow runs (`shadow:`): candidate policy versions (front matter `shadow_of:`)
classifying a sample of the live traffic beside the live policy, their results on a topic of
their own (`consumer.pipeline.shadow`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ShadowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="run the candidates in force on a sample of live traffic")
    topic: str = Field(default="policy-shadow", description="shadow results, one per sampled event and candidate")
    sample_fraction: float = Field(
        default=0.1, ge=0, le=1,
        description="share of the events routed to a live policy that its candidates see; chosen by the record's "
        "topic, partition and offset, so a re-read samples the same records",
    )  # fmt: skip
    max_in_flight: int = Field(
        default=16, ge=1,
        description="candidate classifications waiting for a slower stage or the reasoner at once; a sampled "
        "event beyond it is skipped (counted), never waited for",
    )  # fmt: skip
