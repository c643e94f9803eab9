"""What the cascade did, per policy: plain attributes the metrics exporter reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from consumer import stages


@dataclass
class PolicyCounters:
    """What the cascade did for one policy since start."""

    requests: int = 0
    decided: dict[str, int] = field(default_factory=lambda: dict.fromkeys(stages.CASCADE, 0))
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

    def cache_hit(self, requests: int = 1) -> None:
        """Requests answered from the verdict cache."""
        self.cache_hits += requests
        self.decided[stages.CACHE] += requests

    def coalesced_copy(self) -> None:
        """A copy of content answered with the verdict of an identical request asked at the same time."""
        self.coalesced += 1
        self.decided[stages.CACHE] += 1

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
