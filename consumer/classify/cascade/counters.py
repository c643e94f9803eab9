"""What the cascade did, per policy: plain attributes the metrics exporter reads."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("cache", "lexical", "embedding", "reasoner", "undecided")


@dataclass
class PolicyCounters:
    """What the cascade did for one policy since start."""

    requests: int = 0
    decided: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    cache_hits: int = 0
    cache_misses: int = 0
    coalesced: int = 0  # copies that waited for an identical request already in flight
    escalations: int = 0
    learned: int = 0  # reasoner verdicts the heads learned from
    learned_human: int = 0  # people's decisions the heads learned from (each HUMAN_LABEL_WEIGHT times)
    shadow_sent: int = 0
    shadow_disagreed: int = 0
    shadow_skipped: int = 0  # sampled, but the reasoner was saturated
    shadow_failed: int = 0
    calibration_error: dict[str, float | None] = field(default_factory=dict)

    @property
    def escalation_rate(self) -> float:
        return self.escalations / self.requests if self.requests else 0.0

    @property
    def cache_hit_rate(self) -> float:
        looked_up = self.cache_hits + self.cache_misses
        return self.cache_hits / looked_up if looked_up else 0.0

    @property
    def shadow_disagreement_rate(self) -> float:
        answered = self.shadow_sent - self.shadow_failed
        return self.shadow_disagreed / answered if answered > 0 else 0.0
