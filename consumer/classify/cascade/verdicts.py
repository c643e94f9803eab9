"""The cascade's own answers: a cheap stage's decision, the best guess when nothing decided and
no reasoner is configured, and a copy of an earlier verdict (from the cache, or for a copy
of content decided in the same batch)."""

from __future__ import annotations

from consumer import stages
from consumer.classify import Classification
from consumer.classify.cascade.stage import Decision


def cheap(stage: str, decision: Decision, target: float) -> Classification:
    """A cheap stage's decision at or above the target precision."""
    return Classification(
        violation=decision.violation,
        # The heads are binary: they know whether, not which category. A violation without
        # a category takes the policy's `violation` action (flag by default), not a
        # category's (which may delete).
        category=None if decision.violation else "safe",
        confidence=f"{decision.confidence:.3f}",
        rationale=f"{stage} stage, calibrated confidence {decision.confidence:.3f} >= target precision {target:g}",
        model=f"cascade:{stage}",
        stage=stage,
    )


def undecided(stage: str, decision: Decision, target: float) -> Classification:
    """The most confident stage's answer below the target precision, marked as such."""
    return Classification(
        violation=decision.violation,
        category=None if decision.violation else "safe",
        confidence=f"{decision.confidence:.3f}",
        rationale=f"{stage} stage below target precision {target:g} "
        f"(calibrated confidence {decision.confidence:.3f}); no reasoner configured",
        model=f"cascade:{stage}:undecided",
        stage=stages.UNDECIDED,
    )


def as_cached(verdict: Classification, model: str = "cascade:cache") -> Classification:
    """An earlier verdict answered again: from the cache, having spent nothing. Built field by
    field: dataclasses.replace took 1.2 µs where this takes 0.4, and cache hits are common."""
    return Classification(
        violation=verdict.violation,
        category=verdict.category,
        rule_ids=verdict.rule_ids,
        confidence=verdict.confidence,
        rationale=verdict.rationale,
        model=model,
        stage=stages.CACHE,
    )
